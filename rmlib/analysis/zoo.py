"""The shared reward-model zoo of issue 19 (``docs/regime_design.md`` §1): trained once, by notebook
04, and read by notebooks 01 and 05.

One gold (``synthetic_gold.GOLD_NAME``, ``<run_dir>/models/bon_gold``) and proxies at each label-noise
level p (Coste et al. 2023: p = 0.25, half the training pairs coin-flipped; a clean p = 0 copy of the
same pairs), every proxy trained with the per-epoch probes of ``dispersion.NormProbeCallback``
(training probe, held-out gold-labelled pairs, OOD pairs). Layout, one folder per noise level:

    <run_dir>/zoo/noise25/models/bon_proxy_<variant>_s<seed>/final     the proxy (norm_records.jsonl beside)
    <run_dir>/zoo/noise25/{train,heldout,ood}_pairs.json                the pairs it was trained and probed on

A plan is ``{p: {variant: [seeds]}}`` (``plan``): the noisy level trains ``proxies_noisy`` (e.g. BT x 3
seeds, whose mean and worst case are the ensembles ``bt_mean`` / ``bt_min``, BSR, GRM), the clean
level ``proxies_clean``. Best-of-N score columns carry the level (``score_column``:
``bon_proxy_bt_s0@noise25``); ``scores_at`` gives one level's columns under the plain proxy names, so
``rmlib.analysis.bon`` / ``gao_fit`` / ``ensembles`` work on each level unchanged.

Which notebook reads what (``READERS``): 04 writes everything above; 01 reads every proxy's
``norm_records.jsonl`` and the noisy level's pairs (its top-8 arm trains on them); 05 optimizes
against the noisy level's BT and BSR proxies, scored by the gold.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from datasets import Dataset

from rmlib.analysis import dispersion, synthetic_gold
from rmlib.core.atomic_io import write_json_atomic
from rmlib.model.encoding import encode_pairs

PAIR_SETS = ("train", "heldout", "ood")  # what each noise level's folder keeps (``save_pairs``)

READERS = {
    "04_bon_curves": "trains the gold and every proxy of the plan (with per-epoch probes), writes the pair sets",
    "01_norm_dispersion": "reads every proxy's norm_records.jsonl and the noisy level's pair sets (top-k arm)",
    "05_rloo": "reads the noisy level's BT and BSR proxies and the gold",
}


# -- names and folders ---------------------------------------------------------------------------
def check_noise(p) -> float:
    """A label-noise level: a number in [0, 0.5] (the expected share of wrong labels)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 <= p <= 0.5):
        raise ValueError(f"label noise must be a number in [0, 0.5], got {p!r}")
    return float(p)


def noise_tag(p: float) -> str:
    """``noise25`` for p = 0.25 (whole percent; a finer level is refused rather than rounded)."""
    pct = check_noise(p) * 100
    if abs(pct - round(pct)) > 1e-9:
        raise ValueError(f"label noise {p!r} is not a whole percent")
    return f"noise{round(pct)}"


def noise_label(p: float) -> str:
    return f"{check_noise(p):.0%} label noise"


def level_dir(run_dir, p: float) -> Path:
    """``<run_dir>/zoo/noise<pct>``: one noise level's proxies and pairs."""
    return Path(run_dir) / "zoo" / noise_tag(p)


def proxy_final_dir(run_dir, p: float, variant: str, seed: int) -> Path:
    """The exported proxy (``final/``) of (noise level, variant, seed)."""
    return synthetic_gold.model_dir(level_dir(run_dir, p), synthetic_gold.proxy_name(variant, seed)) / "final"


def noise_of_path(path) -> float | None:
    """The noise level of a zoo proxy folder (``.../zoo/noise25/models/...``: 0.25), None for a folder
    outside the zoo (notebook 05 states the level of the proxies it optimizes against)."""
    m = re.search(r"(?:^|/)zoo/noise(\d+)/", Path(path).as_posix())
    return int(m[1]) / 100 if m else None


def score_column(name: str, p: float) -> str:
    """Best-of-N score column of a proxy at a noise level: ``<proxy name>@noise<pct>``."""
    synthetic_gold.parse_proxy_name(name)
    return f"{name}@{noise_tag(p)}"


def parse_score_column(column: str) -> tuple[str, float]:
    """(proxy name, noise level) of a ``score_column``; ValueError for anything else."""
    m = re.fullmatch(r"(?P<name>.+)@noise(?P<pct>\d+)", column)
    if not m:
        raise ValueError(f"{column!r} is not a zoo score column (<proxy name>@noise<pct>)")
    synthetic_gold.parse_proxy_name(m["name"])
    return m["name"], int(m["pct"]) / 100


# -- the plan ------------------------------------------------------------------------------------
def _check_members(members: Mapping, what: str) -> dict[str, list[int]]:
    if not isinstance(members, Mapping):
        raise ValueError(f"{what} must be a mapping variant -> list of seeds, got {members!r}")
    out = {}
    for variant, seeds in members.items():
        synthetic_gold.proxy_name(variant, 0)  # unknown variant: ValueError naming the known ones
        seeds = list(seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise ValueError(f"{what}[{variant!r}] must be distinct integer seeds >= 0, got {seeds!r}")
        out[variant] = seeds
    return out


def plan(proxies_noisy: Mapping, proxies_clean: Mapping, label_noise: float) -> dict[float, dict[str, list[int]]]:
    """``{label_noise: proxies_noisy, 0.0: proxies_clean}`` checked (an empty level is left out), the
    noisy level first. ``label_noise`` 0 (a paper's clean setting) needs ``proxies_clean`` empty: both
    would be the 0% level."""
    p = check_noise(label_noise)
    noisy, clean = _check_members(proxies_noisy, "proxies_noisy"), _check_members(proxies_clean, "proxies_clean")
    if not noisy:
        raise ValueError("proxies_noisy is empty: the level at label_noise is the zoo's point")
    if p == 0 and clean:
        raise ValueError("label_noise is 0, so proxies_noisy is the 0% level already: leave proxies_clean empty")
    return {p: noisy, **({0.0: clean} if clean else {})}


def all_seeds(zoo_plan: Mapping) -> list[int]:
    return sorted({s for members in zoo_plan.values() for seeds in members.values() for s in seeds})


def configs(run_dir, zoo_plan: Mapping, *, grm_alpha: float = 0.01, grm_beta: float = 0.1, **train_kw
            ) -> dict[float, dict]:
    """``{p: {proxy name: RMConfig}}`` (``synthetic_gold.proxy_configs`` per variant with its own
    seeds, output under ``level_dir(run_dir, p)``)."""
    out = {}
    for p, members in zoo_plan.items():
        out[p] = {}
        for variant, seeds in members.items():
            out[p].update(synthetic_gold.proxy_configs(level_dir(run_dir, p), [variant], seeds, grm_alpha=grm_alpha,
                                                       grm_beta=grm_beta, **train_kw))
    return out


def final_dirs(run_dir, zoo_plan: Mapping) -> dict[str, Path]:
    """``{score column: exported proxy folder}`` of every proxy of the plan (existing or not)."""
    return {score_column(synthetic_gold.proxy_name(v, s), p): proxy_final_dir(run_dir, p, v, s)
            for p, members in zoo_plan.items() for v, seeds in members.items() for s in seeds}


# -- pairs -------------------------------------------------------------------------------------
def training_sets(relabeled: Dataset, n_heldout: int, zoo_plan: Mapping, seed: int = 0
                  ) -> tuple[dict[float, Dataset], Dataset, pd.DataFrame]:
    """Split gold-relabeled pairs into ``n_heldout`` held-out pairs (clean: Coste et al. never noise
    evaluation pairs) and the training pairs, then give each level of the plan its copy of the
    training pairs with that level's label noise (``synthetic_gold.add_label_noise``, seeded by
    ``seed``; the 0% level is the clean copy). Returns ({level: pairs}, held-out pairs, one report row
    per level: level, p, pairs, randomized, flipped, flipped_share)."""
    from rmlib.data.splits import train_eval_split

    if isinstance(n_heldout, bool) or not isinstance(n_heldout, int) or n_heldout < 2:
        raise ValueError(f"n_heldout must be an integer >= 2 (the held-out probe needs a spread), got {n_heldout!r}")
    train, heldout = train_eval_split(relabeled, None, n_heldout, seed=seed)
    sets, rows = {}, []
    for p in levels(zoo_plan):
        if p > 0:
            noisy = synthetic_gold.add_label_noise(train, p, seed=seed)
            sets[p], report = noisy.pairs, noisy.report()
        else:
            sets[p], report = train, {"p": 0.0, "pairs": len(train), "randomized": 0, "flipped": 0, "flipped_share": 0.0}
        rows.append({"level": noise_label(p), **{k: report[k] for k in ("p", "pairs", "randomized", "flipped",
                                                                          "flipped_share")}})
    return sets, heldout, pd.DataFrame(rows)



def save_pairs(run_dir, p: float, **sets: Dataset) -> dict[str, Path]:
    """Write the pair sets of a level (``train``, ``heldout``, ``ood``) as JSON lists, atomically."""
    unknown = sorted(set(sets) - set(PAIR_SETS))
    if unknown:
        raise ValueError(f"unknown pair set(s) {unknown}; known: {', '.join(PAIR_SETS)}")
    return {name: write_json_atomic(level_dir(run_dir, p) / f"{name}_pairs.json", ds.to_list())
            for name, ds in sets.items()}


def load_pairs(run_dir, p: float, name: str) -> Dataset:
    """A pair set written by ``save_pairs`` (by notebook 04)."""
    path = level_dir(run_dir, p) / f"{name}_pairs.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: notebook 04_bon_curves writes it (run it first)")
    return Dataset.from_list(json.loads(path.read_text(encoding="utf-8")))


# -- per-epoch probes ----------------------------------------------------------------------------
class Probes:
    """The encoded probe sets of the zoo's runs: ``probe_pairs`` training pairs (their accuracy is the
    training accuracy), the held-out gold-labelled pairs and the OOD pairs, measured at step 0, each
    epoch end and the final record (``dispersion.NormProbeCallback``). ``erank_rows``: twice the
    smallest set, so the effective ranks compare."""

    def __init__(self, tokenizer, train: Dataset, heldout: Dataset, ood: Dataset, probe_pairs: int,
                 max_length: int, every_steps: int):
        if probe_pairs < 2:
            raise ValueError(f"probe_pairs must be >= 2, got {probe_pairs}")
        self.probe = encode_pairs(train.select(range(min(probe_pairs, len(train)))), tokenizer, max_length)[0]
        self.eval_probes = {"heldout": encode_pairs(heldout, tokenizer, max_length)[0],
                            "ood": encode_pairs(ood, tokenizer, max_length)[0]}
        self.erank_rows = 2 * min(len(self.probe), *(len(v) for v in self.eval_probes.values()))
        self.every_steps = every_steps

    def callback(self, name: str = "") -> list:
        return [dispersion.NormProbeCallback(self.probe, every_steps=self.every_steps, eval_probes=self.eval_probes,
                                             erank_rows=self.erank_rows)]

    def sizes(self) -> dict[str, int]:
        return {"train probe": len(self.probe), **{k: len(v) for k, v in self.eval_probes.items()}}


def run_label(variant: str, seed: int, p: float) -> str:
    """How notebook 01 names a zoo run: ``bt s0 (25%)``."""
    return f"{variant} s{seed} ({check_noise(p):.0%})"


def records(run_dir, zoo_plan: Mapping) -> dict[str, list[dict]]:
    """``{run_label: NormProbeCallback records}`` of every proxy of the plan (written by notebook 04)."""
    out = {}
    for p, members in zoo_plan.items():
        for variant, seeds in members.items():
            for seed in seeds:
                path = proxy_final_dir(run_dir, p, variant, seed).parent / dispersion.RECORDS_FILE
                if not path.exists():
                    raise FileNotFoundError(f"{path} does not exist: notebook 04_bon_curves trains the zoo with its "
                                            "per-epoch probes (run it first, with the same zoo parameters)")
                out[run_label(variant, seed, p)] = dispersion.read_records(path)
    return out


# -- Best-of-N scores per level ----------------------------------------------------------------------
def scores_at(scores: pd.DataFrame, p: float, gold: str = synthetic_gold.GOLD_NAME) -> tuple[pd.DataFrame, list[str]]:
    """One noise level's view of the score table: prompt_id, sample_index, the gold and that level's
    proxy columns under their plain names (``bon_proxy_bt_s0``); returns (frame, proxy names)."""
    tag = noise_tag(p)
    cols = {c: c.rsplit("@", 1)[0] for c in scores.columns if c.endswith(f"@{tag}")}
    if not cols:
        raise ValueError(f"scores has no column of level {tag} (columns: {list(scores.columns)})")
    frame = scores[["prompt_id", "sample_index", gold, *cols]].rename(columns=cols)
    return frame, list(cols.values())


def levels(zoo_plan: Mapping) -> list[float]:
    """The plan's noise levels, noisy first."""
    return sorted(zoo_plan, key=lambda p: -p)


def describe_plan(zoo_plan: Mapping) -> str:
    return "; ".join(f"{noise_label(p)}: " + ", ".join(f"{v} x {len(s)} seed(s)" for v, s in members.items())
                     for p, members in zoo_plan.items())


__all__ = ["PAIR_SETS", "READERS", "Probes", "all_seeds", "check_noise", "configs", "describe_plan", "final_dirs",
           "level_dir", "levels", "load_pairs", "noise_label", "noise_tag", "parse_score_column", "plan",
           "proxy_final_dir", "records", "run_label", "save_pairs", "score_column", "scores_at"]
