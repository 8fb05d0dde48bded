"""Named reward-model variants and the seed x variant grid the experiment notebooks train.

A variant is a loss, its parameters and a GRM regularizer, everything else (backbone, mode,
data, optimiser) comes from the notebook's shared settings, so the variants of one grid differ
only in what they are named after. BSR's lambda is given in the OFFICIAL code's convention
(``bsr_lambda``, the paper's {1e-4, 1e-3, 1e-2}) and converted to rmlib's literal formula:
``lam = bsr_lambda * per_device_train_batch_size`` (see ``rmlib.reward.losses.bsr``).

Every run goes through ``train_reward_model(..., reuse=True)`` into
``<run_dir>/models/<prefix><variant>_s<seed>``: a finished run of the same configuration and
data is loaded, not retrained, so notebooks share runs and a rerun redoes only what is missing.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rmlib.model.reward_model import load_reward_model
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import TrainResult, train_reward_model

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
    Variant("bsr_grm", "BSR + GRM", loss="bsr", bsr_lambda=1e-3, regularizer="sft"),
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


def train_configs(configs: dict[str, RMConfig], train_pairs, eval_pairs=None,
                  callbacks: Callable[[str], list] | None = None) -> dict[str, TrainResult]:
    """Train (or reuse: ``train_reward_model(..., reuse=True)``) every named config in turn.

    The returned results hold no model (``model`` is None, freed after each run so a grid never
    holds several models in memory); ``load(result)`` loads the export when it is needed.
    ``callbacks(name)`` gives per-run trainer callbacks (e.g. a NormProbeCallback)."""

    results = {}
    for name, config in configs.items():
        logger.info("training %s -> %s", name, config.output_dir)
        result = train_reward_model(config, train_pairs, eval_pairs, callbacks=callbacks(name) if callbacks else None,
                                    reuse=True)
        result.model = None
        results[name] = result
        gc.collect()
    return results


def load(result: TrainResult):
    """The exported reward model of a run (``<output_dir>/final``), ready to score."""

    return load_reward_model(result.final_dir)


def train_grid(variants: Sequence[str], seeds: Sequence[int], train_pairs, eval_pairs=None, *, run_dir: str | Path,
               prefix: str = "", callbacks: Callable[[Variant, int], list] | None = None,
               **settings) -> dict[tuple[str, int], TrainResult]:
    """Train (or reuse) every (variant, seed) on the same data; {(variant, seed): TrainResult}
    (models freed: see ``train_configs``). ``callbacks(variant, seed)`` gives per-run callbacks."""
    chosen = get_variants(variants)
    if not seeds:
        raise ValueError("seeds is empty: give at least one seed")
    keys = {run_name(v.name, s, prefix): (v, s) for s in seeds for v in chosen}
    configs = {name: variant_config(v, s, run_dir, prefix, **settings) for name, (v, s) in keys.items()}
    per_run = (lambda name: callbacks(*keys[name])) if callbacks else None
    done = train_configs(configs, train_pairs, eval_pairs, per_run)
    return {(keys[name][0].name, keys[name][1]): result for name, result in done.items()}


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
