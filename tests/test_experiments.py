"""rmlib.reward.variants (variant grid, BSR lambda conversion) and rmlib.analysis.stats (seed aggregation);
the verdicts of rmlib.analysis.claims are tested in test_claims.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rmlib.analysis import stats
from rmlib.reward import variants
from rmlib.reward.losses import LossSpec


class TestVariants:
    def test_every_variant_builds_a_valid_loss_spec(self):
        for v in variants.VARIANTS.values():
            f = v.config_fields(per_device_batch=4)
            LossSpec(reward=f["loss"], reward_params=f["loss_params"], regularizer=f["regularizer"])

    @pytest.mark.parametrize("batch", [1, 4, 16])
    def test_bsr_lambda_is_the_official_one_times_the_per_device_batch(self, batch):
        assert variants.VARIANTS["bsr"].config_fields(batch)["loss_params"] == {"lam": pytest.approx(1e-3 * batch)}
        assert variants.VARIANTS["bsr_1e-2"].config_fields(batch)["loss_params"]["lam"] == pytest.approx(1e-2 * batch)
        both = variants.VARIANTS["bsr_grm"].config_fields(batch)
        assert both["regularizer"] == "sft" and both["loss"] == "bsr"

    def test_unknown_or_repeated_variant_is_named(self):
        with pytest.raises(ValueError, match=r"unknown variant\(s\) \['bst'\]; known: bt, bsr"):
            variants.get_variants(["bt", "bst"])
        with pytest.raises(ValueError, match="repeat"):
            variants.get_variants(["bt", "bt"])

    def test_variant_config_sets_names_seeds_and_refuses_clashing_settings(self, tmp_path):
        cfg = variants.variant_config("bsr", 3, tmp_path, prefix="x_", per_device_train_batch_size=8,
                                         backbone="smollm2-135m-instruct", mode="topk")
        assert cfg.output_dir == str(tmp_path / "models" / "x_bsr_s3") and cfg.seed == 3
        assert cfg.loss == "bsr" and cfg.loss_params == {"lam": pytest.approx(8e-3)} and cfg.mode == "topk"
        with pytest.raises(ValueError, match=r"\['loss'\] are set per variant"):
            variants.variant_config("bt", 0, tmp_path, loss="bsr")

    def test_grid_trains_each_variant_and_seed_once_then_reuses(self, tmp_path, tiny_backbone):
        from datasets import Dataset

        pairs = Dataset.from_list([{"id": str(i), "prompt": [{"role": "user", "content": f"q{i}"}],
                                    "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(8)])
        settings = dict(backbone=tiny_backbone, mode="topk", top_k_layers=2, bf16=False, max_steps=2,
                        disable_tqdm=True, save_strategy="no", logging_steps=1)
        runs = variants.train_grid(["bt", "bsr"], [0, 1], pairs, pairs, run_dir=tmp_path, **settings)
        assert sorted(runs) == [("bsr", 0), ("bsr", 1), ("bt", 0), ("bt", 1)]
        table = variants.grid_table(runs)
        assert table["steps"].tolist() == [2, 2, 2, 2] and table["eval_accuracy"].between(0, 1).all()
        again = variants.train_grid(["bt"], [1], pairs, pairs, run_dir=tmp_path, **settings)
        assert again[("bt", 1)].metrics == runs[("bt", 1)].metrics  # loaded, not retrained


class TestCompare:
    @pytest.fixture
    def table(self):
        rows = []
        for variant, values in {"bt": [0.60, 0.62], "bsr": [0.70, 0.72], "grm": [0.61, 0.63]}.items():
            for seed, v in enumerate(values):
                rows.append({"variant": variant, "seed": seed, "metric": "acc", "value": v,
                             "ci_low": v - 0.02, "ci_high": v + 0.02})
        return pd.DataFrame(rows)

    def test_seed_aggregate(self, table):
        agg = stats.seed_aggregate(table, ["variant", "metric"])
        bsr = agg.set_index("variant").loc["bsr"]
        assert bsr["value"] == pytest.approx(0.71) and bsr["n_seeds"] == 2
        assert bsr["seed_std"] == pytest.approx(np.std([0.70, 0.72], ddof=1))
        assert bsr["ci_low"] == pytest.approx(0.69) and bsr["ci_high"] == pytest.approx(0.73)
        with pytest.raises(ValueError, match="lacks columns"):
            stats.seed_aggregate(table, ["nope"])
