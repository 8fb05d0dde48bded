"""Running the synthetic-gold Best-of-N experiment (notebook 04): train the gold and proxies (or
reuse them), score the proxy pool with the gold, sample the policy, score every sample with every
reward model, save the run's bookkeeping. Each step is resumable or cached; the setup it runs
(names, prompt split, relabeling, configs) is ``rmlib.analysis.synthetic_gold``, the shared zoo of
proxies at each label-noise level ``rmlib.analysis.zoo``. ``analyze_level`` turns one level's scores
into the curves, Gao fits, the "BT over-optimizes here" line and the mitigation verdicts.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import Dataset

from rmlib.analysis import bon, claims, ensembles, gao_fit, zoo
from rmlib.analysis.benchmarks import model_pair_scorer
from rmlib.analysis.stats import pairwise_accuracy_table
from rmlib.analysis.synthetic_gold import (
    ORACLE,
    PROXY_PREFIX,
    VARIANT_LABELS,
    parse_proxy_name,
)
from rmlib.core.atomic_io import write_json_atomic, write_table_atomic
from rmlib.core.precision import resolve_bf16
from rmlib.model import assets, generation, reward_model, score_cache
from rmlib.model.assets import load_tokenizer
from rmlib.model.reward_model import load_reward_model
from rmlib.reward import variants as rm_variants


def score_pairs_cached(final_dir, pairs: Dataset, path, max_length: int = 256, batch_size: int = 8,
                       bf16: bool | str = "auto", progress: bool = True) -> pd.DataFrame:
    """Rewards of every pair's chosen and rejected reply by the reward model in ``final_dir``
    (``rmlib.analysis.benchmarks.model_pair_scorer``: prompt cut from the left; replies identical after truncation
    get NaN). Cached in ``path`` (CSV: id, chosen, rejected, model, max_length); the cache is used
    only when the model (``reward_model.model_digest``), max_length and pair ids all match."""

    path, digest, ids = Path(path), reward_model.model_digest(final_dir), list(pairs["id"])
    if path.exists():
        old = pd.read_csv(path, dtype={"id": str, "model": str})
        if (len(old) == len(ids) and old["id"].tolist() == ids and (old["model"] == digest).all()
                and (old["max_length"] == max_length).all()):
            return old
    model, tok = load_reward_model(final_dir), load_tokenizer(final_dir)
    c, r = model_pair_scorer(model, tok, max_length, batch_size, bf16, progress)(pairs)
    out = pd.DataFrame({"id": ids, "chosen": c, "rejected": r, "model": digest, "max_length": max_length})
    write_table_atomic(path, out)
    del model
    gc.collect()
    return out


def gold_quality_table(pairs: Dataset, chosen_scores, rejected_scores, n_boot: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """The gold's pairwise accuracy against the ORIGINAL labels of held-out pairs, by source
    (alpaca_eval: GPT-4 judgments; hh-rlhf: human), ties and NaN counted wrong, 95% bootstrap CI."""

    table = pairwise_accuracy_table(chosen_scores, rejected_scores, list(pairs["source"]), n_boot=n_boot, seed=seed)
    labels = {"alpaca_eval": "alpaca_eval (vs GPT-4)", "hh-rlhf/harmless-base": "hh-rlhf (vs human)"}
    return table.assign(category=table["category"].map(lambda c: labels.get(c, c))).rename(
        columns={"category": "held_out_set"})


def train_runs_table(configs: Mapping, train_pairs: Dataset, eval_pairs: Dataset | None = None,
                     callbacks: Callable[[str], list] | None = None) -> pd.DataFrame:
    """Train (or reuse) every config in turn (``rmlib.reward.variants.train_configs``); one row per run:
    name, variant, seed, final_dir, train_pairs, steps, train_seconds, pairs_per_second, train_loss,
    eval_accuracy (with ``eval_pairs``), wall_seconds (small when a finished run was reused).
    ``callbacks(name)``: per-run trainer callbacks (the zoo's per-epoch probes, ``zoo.Probes``)."""
    rows = []
    for name, config in configs.items():
        t0 = time.perf_counter()
        result = rm_variants.train_configs({name: config}, train_pairs, eval_pairs, callbacks)[name]
        wall = time.perf_counter() - t0
        variant, seed = parse_proxy_name(name) if name.startswith(PROXY_PREFIX) else ("gold", config.seed)
        m = result.metrics
        rows.append({"name": name, "variant": variant, "seed": seed, "final_dir": str(result.final_dir),
                     "train_pairs": m.get("train_pairs"), "steps": m.get("steps"),
                     "train_seconds": m.get("train_seconds"), "pairs_per_second": m.get("pairs_per_second"),
                     "train_loss": m.get("train_loss"), "eval_accuracy": m.get("eval_accuracy", math.nan),
                     "wall_seconds": wall})
    return pd.DataFrame(rows)


def policy_slug(policy: str) -> str:
    """A folder-safe name for a policy (short name, path or hub id)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(policy)).strip("_") or "policy"


def sample_policy(policy: str, prompts: pd.DataFrame, out_path, n: int, batch_size: int = 32,
                  max_new_tokens: int = 96, temperature: float = 0.7, top_p: float = 0.95, seed: int = 0,
                  bf16: bool | str = "auto", progress: bool = True, capture_for: Mapping[str, Path] | None = None,
                  capture_max_length: int | None = None) -> pd.DataFrame:
    """N samples per BoN prompt from ``policy`` with its chat template (``generation.sample_responses``:
    resumable, per-sample seeds). The policy loads in bf16 when ``bf16`` resolves true (``rmlib.core.precision``; no per-step
    weight casts).

    ``capture_for``: the reward models (``{name: folder}``, as ``score_with_all`` gets them) whose frozen
    bottom is the policy's (top-k models of the base policy): the samples' bottom-store entries are
    recorded while sampling (``rmlib.model.bottom_capture``), encoded as ``score_with_all`` will encode
    them with ``max_length=capture_max_length``, so scoring runs only the top layers. The policy then
    loads in float32, the reward models' dtype (the store key covers it; under bf16 autocast the matmuls
    are bf16 either way); a policy whose bottom is not theirs is refused (ValueError)."""


    if not {"prompt_id", "messages"} <= set(prompts.columns):
        raise ValueError("prompts needs prompt_id and messages columns (GoldSplit.bon_prompts)")

    bf16 = resolve_bf16(bf16)
    tok = assets.load_tokenizer(policy)
    capture = {}
    if capture_for:
        store = capture_store_for(capture_for, bf16)
        if store is not None:
            capture = {"capture_store": store, "capture_tokenizer": load_tokenizer(next(iter(capture_for.values()))),
                       "capture_max_length": capture_max_length}
    dtype = torch.float32 if capture or not bf16 else torch.bfloat16
    model = assets.load_causal_lm(policy, dtype=dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    try:
        return generation.sample_responses(model, tok, [list(m) for m in prompts["messages"]], list(prompts["prompt_id"]),
                                    n=n, out_path=out_path, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, seed=seed, bf16=bf16, progress=progress,
                                    **capture)
    finally:
        del model
        gc.collect()


def capture_store_for(model_dirs: Mapping[str, Path], bf16: bool | str = "auto"):
    """The bottom store (``rmlib.model.bottom_store.store_for``) that most of the saved reward models in
    ``model_dirs`` score through (None when none has a frozen bottom); models are loaded one at a time
    (as ``score_with_all`` loads them: float32), as the store key digests their bottom weights."""
    from rmlib.model.bottom_store import store_for

    bf16 = resolve_bf16(bf16)
    stores, users = {}, {}
    for name, path in model_dirs.items():
        model = load_reward_model(path)
        store = store_for(model, bf16_autocast=bf16)
        if store is not None:
            stores.setdefault(store.key["store"], store.__class__(store.root, store.key, store.hidden_size))
            users.setdefault(store.key["store"], []).append(name)
        del model
        gc.collect()
    if not stores:
        return None
    best = max(users, key=lambda k: len(users[k]))
    others = [n for k, names in users.items() if k != best for n in names]
    if others:
        logging.getLogger(__name__).info("bottom capture serves %s; %s score through other stores (built when "
                                         "scored)", users[best], others)
    return stores[best].refresh()


def score_with_all(model_dirs: Mapping[str, Path], samples: pd.DataFrame, cache_path, max_length: int | None = None,
                   batch_size: int = 16, bf16: bool | str = "auto", progress: bool = True) -> pd.DataFrame:
    """Score every sample with every saved reward model (gold and proxies), one model at a time
    (``score_cache.score_samples_multi``): the top-k models share the bottom store, so the samples' frozen
    bottom runs once in all. Cached per model version in ``cache_path``. Returns prompt_id,
    sample_index and one column per model name."""

    missing = [n for n, p in model_dirs.items() if not (Path(p) / "rmlib_reward.json").exists()]
    if missing:
        raise FileNotFoundError(f"no finished reward model for {missing} (train them first)")
    keys = {n: f"{n}@{reward_model.model_digest(p)}" for n, p in model_dirs.items()}
    tokenizer = load_tokenizer(next(iter(model_dirs.values())))
    return score_cache.score_samples_multi({n: Path(p) for n, p in model_dirs.items()}, tokenizer, samples, cache_path,
                                   batch_size=batch_size, bf16=bf16, max_length=max_length, cache_keys=keys,
                                   progress=progress)


def save_meta(path, **parts) -> Path:
    """Write the run's bookkeeping (split sizes, relabel report, timings, config) as JSON, atomically."""
    def plain(x):
        if isinstance(x, pd.DataFrame):
            return json.loads(x.to_json(orient="records"))
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, (np.integer, np.floating, np.bool_)):
            return x.item()
        if isinstance(x, Path):
            return str(x)
        return x

    return write_json_atomic(path, plain(parts))


# -- one noise level of the zoo: curves, Gao fits, the regime line, mitigation rows (issue 19) -------
@dataclass
class BonLevel:
    """Best-of-N at one label-noise level: ``curves`` / ``summary`` (``bon``), ``fits`` (``gao_fit``:
    one row per variant with its seeds averaged, rm "", then one per proxy), the regime of the
    baseline (``claims.bon_overoptimizes`` on its variant row) and the ``verdicts`` of the mitigation
    claims (``mitigation_table``). Every table carries ``noise`` and ``policy``."""

    noise: float
    policy: str
    curves: pd.DataFrame
    summary: pd.DataFrame
    fits: pd.DataFrame
    regime: claims.Regime
    verdicts: pd.DataFrame

    def regime_row(self) -> dict:
        return {"experiment": "04_bon_curves", "policy": self.policy, "noise": self.noise,
                "reached": self.regime.reached, "test": self.regime.test, "numbers": self.regime.numbers,
                "line": f"{zoo.noise_label(self.noise)}" + (f", {self.policy}" if self.policy else "")
                        + f": {self.regime.line()}"}


def analyze_level(scores: pd.DataFrame, noise: float, policy: str = "", n_boot: int = 1000, seed: int = 0,
                  baseline: str = "bt") -> BonLevel:
    """Everything notebook 04 reports for one noise level of the zoo's score table (``zoo.score_column``
    columns): the level's proxies plus the seed ensembles (``ensembles.add_seed_ensembles``: mean and
    worst case of every variant with >= 2 seeds), exact Best-of-n curves, the summary with the paired
    gold difference to ``baseline`` at the largest n, Gao fits with ``n_boot`` bootstrap resamples of
    the prompts (``seed``), the baseline's regime and the mitigation verdicts."""
    frame, proxies = zoo.scores_at(scores, noise)
    frame, ens = ensembles.add_seed_ensembles(frame, proxies)
    columns = [*proxies, *ens]
    curves = bon.bon_curves(frame, columns, policy=policy)
    summary = bon.summary_table(curves, frame, baseline=baseline)
    fits = pd.concat([gao_fit.fit_table(frame, columns, by="variant", n_boot=n_boot, seed=seed),
                      gao_fit.fit_table(frame, proxies, by="rm", n_boot=n_boot, seed=seed)], ignore_index=True)
    row = fits[(fits["rm"] == "") & (fits["variant"] == baseline)]
    regime = (claims.bon_overoptimizes(row.iloc[0].to_dict()) if len(row) else
              claims.Regime(None, "Best-of-N drop from the peak / Gao fit", f"no {baseline} proxy at this level"))
    tag = {"noise": noise, "policy": policy}
    return BonLevel(noise, policy, curves.assign(**tag), summary.assign(**tag), fits.assign(**tag), regime,
                    mitigation_table(summary, regime, baseline).assign(**tag))


def mitigation_table(summary: pd.DataFrame, regime: claims.Regime, baseline: str = "bt") -> pd.DataFrame:
    """One row per variant other than the baseline (BSR, GRM, the ensembles): "its best-of-n pick keeps
    more gold than the baseline's at the largest n" (GRM Fig 2; Coste et al. for the ensembles), the
    paired difference and its SEM over prompts, rule 1's verdict (``claims.z_verdict``) and the
    claim's verdict through ``claims.mitigation_verdict`` (tested only where the baseline over-optimizes)."""
    rows = []
    for _, r in summary.iterrows():
        if r["variant"] in (baseline, ORACLE):
            continue
        rule = claims.z_verdict(r["gold_minus_bt"], r["gold_minus_bt_sem"], want="higher")
        rows.append({"variant": r["variant"], "label": VARIANT_LABELS.get(r["variant"], r["variant"]),
                     "gold_minus_bt": r["gold_minus_bt"], "gold_minus_bt_sem": r["gold_minus_bt_sem"],
                     "n_final": r["n_final"], "rule_verdict": rule, "verdict": claims.mitigation_verdict(regime, rule)})
    return pd.DataFrame(rows, columns=["variant", "label", "gold_minus_bt", "gold_minus_bt_sem", "n_final",
                                       "rule_verdict", "verdict"])


def describe_level(level: BonLevel) -> str:
    """Markdown lines for one level, computed from its tables: the regime line, the peak of each Gao fit,
    and each mitigation verdict with its numbers."""
    head = f"**{zoo.noise_label(level.noise)}**" + (f" ({level.policy})" if level.policy else "")
    lines = [f"- {head}: {level.regime.line()}"]
    for r in level.fits[level.fits["rm"] == ""].itertuples():
        peak = (f"peaks at KL* {r.kl_star:.2f} (95% {r.kl_star_low:.2f}-{r.kl_star_high:.2f})" if r.peak_inside
                else "no peak inside the measured KL range")
        lines.append(f"  - {VARIANT_LABELS.get(r.variant, r.variant)}: Gao fit alpha {r.alpha:.3f}, beta {r.beta:.3f} "
                     f"(95% {r.beta_low:.3f} to {r.beta_high:.3f}), {peak}; gold at the largest n {r.gold_drop:.3f} "
                     f"below its peak at n = {r.n_peak} (SEM {r.gold_drop_sem:.3f}).")
    for r in level.verdicts.itertuples():
        lines.append(f"  - {r.label} vs BT at n = {r.n_final}: paired gold difference {r.gold_minus_bt:+.3f} "
                     f"(SEM {r.gold_minus_bt_sem:.3f}): {r.verdict}.")
    return "\n".join(lines)
