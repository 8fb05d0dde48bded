"""Named reward-model variants and the seed x variant grid the experiment notebooks train.

A variant is a loss, its parameters and a GRM regularizer, everything else (backbone, mode,
data, optimiser) comes from the notebook's shared settings, so the variants of one grid differ
only in what they are named after. BSR's lambda is given in the OFFICIAL code's convention
(``bsr_lambda``, the paper's {1e-4, 1e-3, 1e-2}) and converted to rmlib's literal formula:
``lam = bsr_lambda * per_device_train_batch_size`` (see ``rmlib.losses.bsr``).

Every run goes through ``train_reward_model(..., reuse=True)`` into
``<run_dir>/models/<prefix><variant>_s<seed>``: a finished run of the same configuration and
data is loaded, not retrained, so notebooks share runs and a rerun redoes only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rmlib.train import RMConfig, TrainResult, train_reward_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One reward-model recipe: loss (+ params), GRM regularizer, and a label for tables/figures."""

    name: str
    label: str
    loss: str = "bt"
    loss_params: dict = field(default_factory=dict)
    bsr_lambda: float | None = None  # official-code lambda; converted with the per-device batch
    regularizer: str = "none"

    def config_fields(self, per_device_batch: int) -> dict:
        params = dict(self.loss_params)
        if self.bsr_lambda is not None:
            params["lam"] = self.bsr_lambda * per_device_batch
        return {"loss": self.loss, "loss_params": params, "regularizer": self.regularizer}


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("bt", "BT"),
    Variant("bsr", "BSR (λ=1e-3)", loss="bsr", bsr_lambda=1e-3),
    Variant("bsr_1e-4", "BSR (λ=1e-4)", loss="bsr", bsr_lambda=1e-4),
    Variant("bsr_1e-2", "BSR (λ=1e-2)", loss="bsr", bsr_lambda=1e-2),
    Variant("center", "BT + centering", loss="center", loss_params={"coef": 0.01}),
    Variant("grm", "GRM (SFT reg.)", regularizer="sft"),
    Variant("grm_dpo_noref", "GRM (DPO-noref reg.)", regularizer="dpo_noref"),
    Variant("bsr+grm", "BSR + GRM", loss="bsr", bsr_lambda=1e-3, regularizer="sft"),
]}


def get_variants(names: Sequence[str]) -> list[Variant]:
    """The named variants, in order; an unknown name raises ValueError listing the known ones."""
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"variants {list(names)} repeat a name")
    return [VARIANTS[n] for n in names]


def run_name(variant: str, seed: int, prefix: str = "") -> str:
    return f"{prefix}{variant}_s{seed}"


def variant_config(variant: Variant | str, seed: int, run_dir: str | Path, prefix: str = "", **settings) -> RMConfig:
    """The RMConfig of one (variant, seed): ``settings`` are the shared RMConfig fields."""
    variant = VARIANTS[variant] if isinstance(variant, str) else variant
    clash = sorted({"loss", "loss_params", "regularizer", "seed", "output_dir"} & set(settings))
    if clash:
        raise ValueError(f"settings {clash} are set per variant/seed; remove them from the shared settings")
    batch = settings.get("per_device_train_batch_size", RMConfig.per_device_train_batch_size)
    return RMConfig(output_dir=str(Path(run_dir) / "models" / run_name(variant.name, seed, prefix)), seed=seed,
                    **variant.config_fields(batch), **settings)


def train_grid(variants: Sequence[str], seeds: Sequence[int], train_pairs, eval_pairs=None, *, run_dir: str | Path,
               prefix: str = "", callbacks: Callable[[Variant, int], list] | None = None,
               **settings) -> dict[tuple[str, int], TrainResult]:
    """Train (or reuse) every (variant, seed) on the same data; {(variant, seed): TrainResult}.

    ``callbacks(variant, seed)`` gives per-run trainer callbacks (e.g. a NormProbeCallback)."""
    chosen = get_variants(variants)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    results = {}
    for seed in seeds:
        for variant in chosen:
            config = variant_config(variant, seed, run_dir, prefix, **settings)
            logger.info("training %s (seed %d) -> %s", variant.name, seed, config.output_dir)
            cbs = callbacks(variant, seed) if callbacks else None
            results[(variant.name, seed)] = train_reward_model(config, train_pairs, eval_pairs, callbacks=cbs, reuse=True)
    return results


def grid_table(results: dict[tuple[str, int], TrainResult]) -> pd.DataFrame:
    """One tidy row per run: variant, label, seed, held-out accuracy (if evaluated), steps, times."""
    rows = []
    for (name, seed), res in results.items():
        m = res.metrics
        rows.append({"variant": name, "label": VARIANTS[name].label, "seed": seed,
                     "eval_accuracy": m.get("eval_accuracy"), "steps": m.get("steps"),
                     "train_seconds": m.get("train_seconds"), "pairs_per_second": m.get("pairs_per_second"),
                     "bottom_store_seconds": m.get("bottom_store_seconds"), "output_dir": str(res.output_dir)})
    return pd.DataFrame(rows)
