"""Synthetic-gold Best-of-N over-optimization (GRM paper Fig 2, after Gao et al. 2022).

Gao et al. stand a stronger reward model in for human preference (the "gold"), relabel a
training set with the gold's preferences, train weaker "proxy" reward models on it, then measure
how the gold score of the proxy's best-of-n pick moves as n (and KL_bon = log n - (n-1)/n) grows.
Here, on one backbone so every reward model shares a frozen bottom (mode ``topk``):

- gold: trained on MORE and DIFFERENT data than any proxy: AlpacaEval GPT-4-judged (win, loss)
  pairs plus HH-RLHF human pairs, more epochs (``gold_config``, name ``bon_gold``);
- proxies: BT, BSR, GRM, BSR+GRM (``rmlib.reward.variants.VARIANTS``) x seeds, trained on a smaller, disjoint pool of
  existing pairs whose labels are REPLACED by the gold's (``relabel_pairs``: chosen = the reply
  the gold scores higher; ties counted and dropped), as the GRM paper relabels Unified-Feedback
  pairs with its 7B gold (names ``bon_proxy_<variant>_s<seed>``); optionally with label noise
  (``add_label_noise``: Coste et al. 2023's 25%, every other pair coin-flipped, drawn per pair
  by a hash of (seed, pair id));
- prompts: BoN evaluation prompts are disjoint from every reward model's training prompts, and
  the gold's prompts from the proxies' (``make_gold_split``, checked by ``check_disjoint``).

Checkpoints live in ``<run_dir>/models/<name>/final`` (``final_dirs``, ``trained_models``), so
later notebooks (RLOO) reuse the same gold and proxies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, concatenate_datasets

from rmlib.core.atomic_io import write_json_atomic
from rmlib.data import Loaded, alpaca_eval_pairs
from rmlib.data.exclusions import EXCLUDED_GENERATORS
from rmlib.data.schema import PAIR_COLUMNS, pair_row, to_dataset
from rmlib.reward import variants as rm_variants
from rmlib.reward.config import RMConfig

logger = logging.getLogger(__name__)


GOLD_NAME = "bon_gold"


PROXY_PREFIX = "bon_proxy_"


BON_SOURCES = ("alpaca_eval", "hh", "mt_bench")


ORACLE = "oracle"  # the curve of best-of-n picked BY THE GOLD itself: the best any proxy could do


# Proxy variants: the named recipes of rmlib.reward.variants (BT, BSR, GRM, BSR+GRM, ...), so notebooks
# 03, 04 and 05 train the same thing under the same name.
VARIANTS = rm_variants.VARIANTS


ENSEMBLE_PREFIX = "bon_ens_"


ENSEMBLE_KINDS = ("mean", "min")  # Coste et al. 2023: mean and worst-case (WCO) of the members' scores


ENSEMBLE_SEED = -1  # an ensemble is no single seed: its curves carry this seed


VARIANT_LABELS = {**{name: v.label for name, v in VARIANTS.items()},
                  **{f"{name}_{kind}": f"{v.label} ensemble ({kind})" for name, v in VARIANTS.items()
                     for kind in ENSEMBLE_KINDS},
                  ORACLE: "oracle (gold picks)"}


# -- names and folders ---------------------------------------------------------------------------
def proxy_name(variant: str, seed: int) -> str:
    """Run name of a proxy: ``bon_proxy_<variant>_s<seed>`` (``rmlib.reward.variants.run_name``)."""
    rm_variants.get_variants([variant])
    return rm_variants.run_name(variant, int(seed), PROXY_PREFIX)


def ensemble_name(variant: str, kind: str) -> str:
    """Score column of an ensemble of one variant's seeds: ``bon_ens_<kind>_<variant>``; its curves
    carry the variant ``<variant>_<kind>`` (e.g. ``bt_mean``) and seed ``ENSEMBLE_SEED``."""
    rm_variants.get_variants([variant])
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"ensemble kind {kind!r} is not one of {', '.join(ENSEMBLE_KINDS)}")
    return f"{ENSEMBLE_PREFIX}{kind}_{variant}"


def parse_proxy_name(name: str) -> tuple[str, int]:
    """(variant, seed) of a proxy run name, or (``<variant>_<kind>``, ``ENSEMBLE_SEED``) of an
    ``ensemble_name``; ValueError for anything else."""
    m = re.fullmatch(rf"{ENSEMBLE_PREFIX}(?P<kind>{'|'.join(ENSEMBLE_KINDS)})_(?P<variant>.+)", name)
    if m and m["variant"] in VARIANTS:
        return f"{m['variant']}_{m['kind']}", ENSEMBLE_SEED
    m = re.fullmatch(rf"{PROXY_PREFIX}(?P<variant>.+)_s(?P<seed>\d+)", name)
    if not m or m["variant"] not in VARIANTS:
        raise ValueError(f"{name!r} is not a proxy run name ({PROXY_PREFIX}<variant>_s<seed>, variant in "
                         f"{', '.join(VARIANTS)})")
    return m["variant"], int(m["seed"])


def model_dir(run_dir, name: str) -> Path:
    """``<run_dir>/models/<name>``: the RMConfig.output_dir of a run (its export is ``final/``)."""
    return Path(run_dir) / "models" / name


def final_dirs(run_dir, variants: Sequence[str], seeds: Sequence[int], include_gold: bool = True) -> dict[str, Path]:
    """``{name: <run_dir>/models/<name>/final}`` for the gold and every proxy of the grid (existing or not)."""
    names = ([GOLD_NAME] if include_gold else []) + [proxy_name(v, s) for v in _check_variants(variants)
                                                     for s in _check_seeds(seeds)]
    return {n: model_dir(run_dir, n) / "final" for n in names}


def trained_models(run_dir) -> dict[str, Path]:
    """Every FINISHED gold/proxy run under ``<run_dir>/models`` (``final/rmlib_reward.json`` present):
    ``{name: final folder}``, the gold first, then proxies sorted by name. For later notebooks (RLOO)."""
    root = Path(run_dir) / "models"
    found = {}
    for path in sorted(root.glob("bon_*/final")):
        name = path.parent.name
        if (path / "rmlib_reward.json").exists() and (name == GOLD_NAME or name.startswith(PROXY_PREFIX)):
            found[name] = path
    return dict(sorted(found.items(), key=lambda kv: (kv[0] != GOLD_NAME, kv[0])))


def _check_variants(variants) -> list[str]:
    variants = list(variants)
    if not variants:
        raise ValueError("variants is empty: give at least one of " + ", ".join(VARIANTS))
    return [v.name for v in rm_variants.get_variants(variants)]


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds)
    if not seeds or any(not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0 for s in seeds):
        raise ValueError(f"seeds={seeds!r} must be a non-empty list of integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={seeds!r} has repeats")
    return [int(s) for s in seeds]


# -- prompts and the data split -------------------------------------------------------------------
def prompt_key(messages) -> str:
    """Identity of a prompt across sources: its (role, stripped content) turns as JSON."""
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


def check_disjoint(prompt_sets: Mapping[str, Iterable[str]]) -> None:
    """Raise ValueError naming the two sets and an example when any two share a prompt key."""
    sets = {name: set(keys) for name, keys in prompt_sets.items()}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sets[a] & sets[b]
            if common:
                raise ValueError(f"prompt sets {a!r} and {b!r} share {len(common)} prompt(s), e.g. "
                                 f"{sorted(common)[0][:120]!r}")


@dataclass
class GoldSplit:
    """Who trains and who is evaluated on which prompts (all three prompt sets pairwise disjoint)."""

    bon_prompts: pd.DataFrame   # prompt_id, messages, source, category: the Best-of-N evaluation prompts
    gold_train: Dataset         # normalized pairs, original (GPT-4 / human) labels: trains the gold
    proxy_pool: Dataset         # normalized pairs, original labels: the gold relabels them for the proxies
    prompts: dict[str, set[str]]  # "bon" | "gold" | "proxy" -> prompt keys
    config: dict = field(default_factory=dict)

    def sizes(self) -> pd.DataFrame:
        """Pairs and distinct prompts per part and source."""
        rows = []
        for part, ds in (("gold_train", self.gold_train), ("proxy_pool", self.proxy_pool)):
            frame = pd.DataFrame({"source": ds["source"], "key": [prompt_key(p) for p in ds["prompt"]]})
            for source, g in frame.groupby("source", sort=True):
                rows.append({"part": part, "source": source, "pairs": len(g), "prompts": g["key"].nunique()})
        for source, g in self.bon_prompts.groupby("source", sort=True):
            rows.append({"part": "bon_eval", "source": source, "pairs": 0, "prompts": len(g)})
        return pd.DataFrame(rows, columns=["part", "source", "pairs", "prompts"])


def save_prompt_sets(split: GoldSplit, folder) -> dict[str, Path]:
    """Write the prompt keys (``prompt_key`` strings, sorted JSON lists) for later notebooks:
    ``rm_training_prompts.json`` (every prompt the gold or a proxy trained on: keep them out of
    RLOO prompts, e.g. notebook 05's ``exclude_prompts_file``) and ``bon_prompts.json``."""
    folder = Path(folder)
    out = {"rm_training_prompts": folder / "rm_training_prompts.json", "bon_prompts": folder / "bon_prompts.json"}
    write_json_atomic(out["rm_training_prompts"], sorted(split.prompts["gold"] | split.prompts["proxy"]))
    write_json_atomic(out["bon_prompts"], sorted(split.prompts["bon"]))
    return out


def _subsample(ds: Dataset, k: int, rng: np.random.Generator, what: str) -> Dataset:
    if k > len(ds):
        raise ValueError(f"{what}={k} exceeds the {len(ds)} pairs available on that side's prompts (raise "
                         "max_pairs_per_prompt or move prompt_frac_gold)")
    return ds.select(np.sort(rng.choice(len(ds), k, replace=False)).tolist()) if k < len(ds) else ds


def _split_keys(keys: list, frac: float, rng: np.random.Generator) -> tuple[list, list]:
    order = rng.permutation(len(keys))
    k = int(round(frac * len(keys)))
    return [keys[i] for i in order[:k]], [keys[i] for i in order[k:]]


def _check_count(name: str, value, minimum: int = 0) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_gold_split(responses, hh_pairs: Dataset | None = None, mt_bench_questions: Dataset | None = None, *,
                    bon_source: str = "alpaca_eval", n_bon_prompts: int = 24, n_gold_alpaca: int = 300,
                    n_gold_hh: int = 200, n_proxy_alpaca: int = 80, n_proxy_hh: int = 48,
                    prompt_frac_gold: float = 0.6, max_pairs_per_prompt: int | None = 4, seed: int = 0,
                    exclude_generators: Mapping[str, str] | None = None) -> GoldSplit:
    """Disjoint prompts for Best-of-N evaluation, the gold's training pairs and the proxies' pool.

    responses: ``load_alpaca_eval_responses()`` (Loaded or Dataset); hh_pairs: ``load_hh_rlhf()``
    pairs (needed when n_gold_hh, n_proxy_hh > 0 or bon_source == "hh"); mt_bench_questions:
    ``load_mt_bench_questions()`` (needed for bon_source == "mt_bench"; first turns are used).

    1. ``n_bon_prompts`` prompts of ``bon_source`` are set aside for Best-of-N (random, by ``seed``).
    2. The other AlpacaEval prompts (and HH prompts) are split at random: ``prompt_frac_gold`` to
       the gold, the rest to the proxy pool.
    3. AlpacaEval (win, loss) pairs (GPT-4 judged, same prompt, at most ``max_pairs_per_prompt``
       per prompt, generators of ``EXCLUDED_GENERATORS`` left out) and HH pairs are drawn on each
       side: ``n_gold_*`` for the gold, ``n_proxy_*`` for the pool. A count above what a side
       holds raises ValueError naming the parameter.
    """

    if bon_source not in BON_SOURCES:
        raise ValueError(f"bon_source={bon_source!r} is not allowed; allowed: {', '.join(BON_SOURCES)}")
    n_bon_prompts = _check_count("n_bon_prompts", n_bon_prompts, 1)
    counts = {k: _check_count(k, v) for k, v in dict(n_gold_alpaca=n_gold_alpaca, n_gold_hh=n_gold_hh,
                                                     n_proxy_alpaca=n_proxy_alpaca, n_proxy_hh=n_proxy_hh).items()}
    if counts["n_gold_alpaca"] + counts["n_gold_hh"] < 1 or counts["n_proxy_alpaca"] + counts["n_proxy_hh"] < 1:
        raise ValueError("the gold (n_gold_alpaca + n_gold_hh) and the proxy pool (n_proxy_alpaca + n_proxy_hh) "
                         "each need at least one pair")
    if not (isinstance(prompt_frac_gold, (int, float)) and 0 < prompt_frac_gold < 1):
        raise ValueError(f"prompt_frac_gold must be in (0, 1), got {prompt_frac_gold!r}")
    if max_pairs_per_prompt is not None:
        _check_count("max_pairs_per_prompt", max_pairs_per_prompt, 1)
    needs_hh = counts["n_gold_hh"] + counts["n_proxy_hh"] > 0 or bon_source == "hh"
    if needs_hh and hh_pairs is None:
        raise ValueError("hh_pairs is needed (n_gold_hh / n_proxy_hh > 0 or bon_source='hh'): pass "
                         "load_hh_rlhf().dataset")
    if bon_source == "mt_bench" and mt_bench_questions is None:
        raise ValueError("bon_source='mt_bench' needs mt_bench_questions=load_mt_bench_questions().dataset")
    config = dict(bon_source=bon_source, n_bon_prompts=n_bon_prompts, **counts, prompt_frac_gold=prompt_frac_gold,
                  max_pairs_per_prompt=max_pairs_per_prompt, seed=seed)
    rng = np.random.default_rng(seed)
    bon_rows: list[dict] = []

    # AlpacaEval: prompts -> (bon) / gold / proxy, then (win, loss) pairs on each side
    if isinstance(responses, Loaded):
        responses = responses.dataset
    exclude = EXCLUDED_GENERATORS if exclude_generators is None else dict(exclude_generators)
    meta = responses.select_columns(["prompt_id", "instruction", "category", "generator"]).to_pandas()
    generators = sorted(set(meta["generator"]) - set(exclude))
    firsts = meta.drop_duplicates("prompt_id").sort_values("prompt_id")
    alpaca_ids = firsts["prompt_id"].tolist()
    order = rng.permutation(len(alpaca_ids))
    alpaca_ids = [alpaca_ids[i] for i in order]
    if bon_source == "alpaca_eval":
        if n_bon_prompts >= len(alpaca_ids):
            raise ValueError(f"n_bon_prompts={n_bon_prompts} leaves no AlpacaEval prompt for training "
                             f"({len(alpaca_ids)} prompts)")
        by_id = firsts.set_index("prompt_id")
        for pid in alpaca_ids[:n_bon_prompts]:
            bon_rows.append({"prompt_id": f"alpaca_eval:{pid}",
                             "messages": [{"role": "user", "content": by_id.loc[pid, "instruction"]}],
                             "source": "alpaca_eval", "category": by_id.loc[pid, "category"]})
        alpaca_ids = alpaca_ids[n_bon_prompts:]
    gold_p, proxy_p = _split_keys(alpaca_ids, prompt_frac_gold, rng)
    parts = {"gold": [], "proxy": []}
    for side, prompts in (("gold", gold_p), ("proxy", proxy_p)):
        k = counts[f"n_{side}_alpaca"]
        if k:
            pairs = alpaca_eval_pairs(responses, prompts=prompts, generators=generators,
                                      max_pairs_per_prompt=max_pairs_per_prompt, seed=seed)
            parts[side].append(_subsample(pairs, k, rng, f"n_{side}_alpaca"))

    # HH-RLHF: pairs grouped by prompt, so one prompt never lands on two sides
    if needs_hh:
        keys = [prompt_key(p) for p in hh_pairs["prompt"]]
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        hh_keys = sorted(groups)
        hh_keys = [hh_keys[i] for i in rng.permutation(len(hh_keys))]
        if bon_source == "hh":
            if n_bon_prompts >= len(hh_keys):
                raise ValueError(f"n_bon_prompts={n_bon_prompts} leaves no HH prompt for training ({len(hh_keys)})")
            for key in hh_keys[:n_bon_prompts]:
                first = groups[key][0]
                bon_rows.append({"prompt_id": f"hh:{hh_pairs[first]['id']}", "messages": hh_pairs[first]["prompt"],
                                 "source": "hh-rlhf", "category": hh_pairs[first]["category"]})
            hh_keys = hh_keys[n_bon_prompts:]
        gold_k, proxy_k = _split_keys(hh_keys, prompt_frac_gold, rng)
        for side, side_keys in (("gold", gold_k), ("proxy", proxy_k)):
            k = counts[f"n_{side}_hh"]
            if k:
                rows = sorted(i for key in side_keys for i in groups[key])
                parts[side].append(_subsample(hh_pairs.select(rows), k, rng, f"n_{side}_hh"))

    if bon_source == "mt_bench":
        q = mt_bench_questions
        if n_bon_prompts > len(q):
            raise ValueError(f"n_bon_prompts={n_bon_prompts} exceeds the {len(q)} MT-Bench questions")
        for i in sorted(rng.choice(len(q), n_bon_prompts, replace=False).tolist()):
            bon_rows.append({"prompt_id": f"mt_bench:{q[i]['question_id']}",
                             "messages": [{"role": "user", "content": q[i]["turns"][0]}],
                             "source": "mt_bench", "category": q[i]["category"]})

    gold_train = concatenate_datasets(parts["gold"]).select_columns(PAIR_COLUMNS)
    proxy_pool = concatenate_datasets(parts["proxy"]).select_columns(PAIR_COLUMNS)
    bon_prompts = pd.DataFrame(bon_rows, columns=["prompt_id", "messages", "source", "category"])
    prompts = {"bon": {prompt_key(m) for m in bon_prompts["messages"]},
               "gold": {prompt_key(p) for p in gold_train["prompt"]},
               "proxy": {prompt_key(p) for p in proxy_pool["prompt"]}}
    check_disjoint(prompts)
    split = GoldSplit(bon_prompts, gold_train, proxy_pool, prompts, config)
    logger.info("gold split (seed %d):\n%s", seed, split.sizes().to_string(index=False))
    return split


# -- relabeling by the gold ------------------------------------------------------------------------
@dataclass
class Relabeled:
    """Pairs relabeled by the gold and what happened to each input pair."""

    pairs: Dataset          # chosen = the reply the gold scores higher; chosen_score / rejected_score = gold scores
    n_in: int
    n_flipped: int          # the gold prefers the originally rejected reply (chosen/rejected swapped)
    dropped: dict[str, list[str]]  # reason -> pair ids: "tie" (|gold difference| <= tie_tol), "unscored" (NaN)
    noise: NoisyLabels | None = None  # the label noise added after relabeling (``add_label_noise``), if any

    @property
    def n_ties(self) -> int:
        return len(self.dropped.get("tie", []))

    @property
    def n_unscored(self) -> int:
        return len(self.dropped.get("unscored", []))

    @property
    def agreement(self) -> float:
        """Share of the kept pairs on which the gold agrees with the original label."""
        kept = len(self.pairs)
        return (kept - self.n_flipped) / kept if kept else math.nan

    def report(self) -> dict:
        out = {"pairs_in": self.n_in, "kept": len(self.pairs), "flipped": self.n_flipped,
               "dropped_ties": self.n_ties, "dropped_unscored": self.n_unscored,
               "agreement_with_original_labels": self.agreement}
        if self.noise is not None:
            out.update({f"noise_{k}": v for k, v in self.noise.report().items()})
        return out


def relabel_pairs(pairs: Dataset, chosen_scores, rejected_scores, tie_tol: float = 0.0, *,
                  label_noise: float = 0.0, noise_seed: int = 0, noise_scheme: str = "coin_flip") -> Relabeled:
    """Relabel pairs with gold scores of their (original) chosen and rejected replies.

    The new chosen is the reply with the HIGHER gold score; ``chosen_score``/``rejected_score`` hold
    the gold scores (generators swapped along). A pair with |s_c - s_r| <= ``tie_tol`` is a tie and a
    pair with a NaN score (e.g. replies identical after truncation) cannot be labeled: both are
    dropped and counted by reason, never kept silently. Ids and all other fields are kept.

    ``label_noise`` p > 0: then ``add_label_noise(pairs, p, noise_seed, noise_scheme)`` on the gold
    labels (Coste et al. 2023: p = 0.25); a wrongly labelled pair keeps its gold scores swapped along,
    so ``chosen_score < rejected_score`` marks it. ``Relabeled.noise`` says which pairs were touched.
    """
    c = np.asarray(chosen_scores, dtype=float)
    r = np.asarray(rejected_scores, dtype=float)
    if c.shape != (len(pairs),) or r.shape != (len(pairs),):
        raise ValueError(f"need one gold score per pair and side: {len(pairs)} pairs, got {c.shape} and {r.shape}")
    if not (isinstance(tie_tol, (int, float)) and tie_tol >= 0):
        raise ValueError(f"tie_tol must be a number >= 0, got {tie_tol!r}")
    _check_noise(label_noise, noise_scheme)
    rows, dropped, flipped = [], {"tie": [], "unscored": []}, 0
    for row, sc, sr in zip(pairs.to_list(), c, r):
        if not (np.isfinite(sc) and np.isfinite(sr)):
            dropped["unscored"].append(row["id"])
            continue
        if abs(sc - sr) <= tie_tol:
            dropped["tie"].append(row["id"])
            continue
        if sr > sc:  # the gold prefers the originally rejected reply
            flipped += 1
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"],
                   "chosen_generator": row["rejected_generator"], "rejected_generator": row["chosen_generator"]}
            sc, sr = sr, sc
        rows.append(pair_row(**{**{k: row[k] for k in PAIR_COLUMNS}, "chosen_score": float(sc),
                                "rejected_score": float(sr)}))
    relabeled, noise = to_dataset(rows), None
    if label_noise > 0:
        noise = add_label_noise(relabeled, label_noise, noise_seed, noise_scheme)
        relabeled = noise.pairs
    out = Relabeled(relabeled, len(pairs), flipped, {k: v for k, v in dropped.items() if v}, noise)
    logger.info("relabeled %d pairs by the gold: %s", len(pairs), out.report())
    return out


# -- label noise (Coste et al. 2023) -----------------------------------------------------------------
NOISE_SCHEMES = ("coin_flip", "flip")


@dataclass
class NoisyLabels:
    """Pairs after ``add_label_noise`` and which ones it touched (ids)."""

    pairs: Dataset
    p: float                # the expected share of wrong labels
    scheme: str
    seed: int
    randomized: list[str]   # pairs whose label was re-drawn (coin_flip) or chosen to flip (flip)
    flipped: list[str]      # pairs whose chosen and rejected were swapped: now labelled wrongly

    def report(self) -> dict:
        n = len(self.pairs)
        return {"p": self.p, "scheme": self.scheme, "seed": self.seed, "pairs": n,
                "randomized": len(self.randomized), "flipped": len(self.flipped),
                "flipped_share": len(self.flipped) / n if n else math.nan}


def _check_noise(p, scheme: str) -> None:
    if scheme not in NOISE_SCHEMES:
        raise ValueError(f"noise scheme {scheme!r} is not one of {', '.join(NOISE_SCHEMES)}")
    top = 0.5
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= top:
        raise ValueError(f"label noise p must be a number in [0, {top}] (the expected share of wrong labels), got {p!r}")


def pair_uniforms(seed: int, pair_id: str) -> tuple[float, float]:
    """Two uniforms in [0, 1) fixed by (seed, pair id): BLAKE2b of both, split into two 64-bit words.
    A pair's draw depends on nothing else (not its position, the batch, or the other pairs)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{pair_id}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / 2**64, int.from_bytes(digest[8:], "little") / 2**64


def add_label_noise(pairs: Dataset, p: float, seed: int, scheme: str = "coin_flip") -> NoisyLabels:
    """Make an expected share ``p`` of the pairs' labels wrong, deterministically per pair.

    ``scheme="coin_flip"`` (default) is Coste et al. 2023's (github tlc4418/llm_optimization,
    ``src/data_utils/oa_custom_datasets/rank_datasets.py``, ``CustomHFPref``: ``preference =
    row["preference"]  # if (not train or i % 2 == 0) else random.randint(0, 1)``, the noise part
    left commented out in the released code, switched on for the paper's 25% label-noise runs):
    every other TRAINING pair gets a fair-coin label, so half the pairs are re-drawn and a
    quarter end up wrong. Here a pair is re-drawn when its first
    uniform (``pair_uniforms(seed, id)``) is below 2p (p = 0.25: half the pairs, as Coste's every
    other one, but chosen by a hash of (seed, id) instead of the position, so the draw does not
    depend on order, batching or the other pairs) and its coin (second uniform < 1/2) swaps chosen
    and rejected. ``scheme="flip"``: each pair is swapped with probability p (first uniform < p).

    Swapping moves the reply texts, generators and scores together, so a pair relabeled by a gold
    (``relabel_pairs``) has ``chosen_score < rejected_score`` exactly when its label is now wrong.
    Evaluation pairs stay clean (Coste: ``not train``): add noise only to training pairs. Pair ids
    must be unique (they are the pair's identity). p in [0, 0.5].
    """
    _check_noise(p, scheme)
    ids = list(pairs["id"])
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"pair ids must be unique to draw label noise per pair; {dup!r} repeats")
    rows, randomized, flipped = [], [], []
    for row in pairs.to_list():
        u_pick, u_coin = pair_uniforms(seed, row["id"])
        if scheme == "coin_flip":
            picked = u_pick < 2 * p
            swap = picked and u_coin < 0.5
        else:
            picked = swap = u_pick < p
        if picked:
            randomized.append(row["id"])
        if swap:
            flipped.append(row["id"])
            row = {**row, "chosen": row["rejected"], "rejected": row["chosen"],
                   "chosen_generator": row["rejected_generator"], "rejected_generator": row["chosen_generator"],
                   "chosen_score": row["rejected_score"], "rejected_score": row["chosen_score"]}
        rows.append(pair_row(**{k: row[k] for k in PAIR_COLUMNS}))
    out = NoisyLabels(to_dataset(rows), float(p), scheme, int(seed), randomized, flipped)
    logger.info("label noise: %s", out.report())
    return out






# -- training configs -------------------------------------------------------------------------------
def gold_config(run_dir, **train_kw):
    """RMConfig of the gold (BT loss, linear head) in ``<run_dir>/models/bon_gold``; ``train_kw``:
    any RMConfig field (backbone, mode, top_k_layers, num_train_epochs, learning_rate, ...)."""

    bad = {"output_dir", "loss", "regularizer"} & set(train_kw)
    if bad:
        raise ValueError(f"gold_config sets {sorted(bad)} itself")
    return RMConfig(output_dir=str(model_dir(run_dir, GOLD_NAME)), loss="bt", regularizer="none", **train_kw)


def check_gold_seed(gold_seed: int, proxy_seeds: Sequence[int]) -> int:
    """The gold's seed must differ from every proxy seed: the seed fixes the reward head's
    initialization, and a proxy starting where the gold started would agree with it for free."""
    if not isinstance(gold_seed, (int, np.integer)) or isinstance(gold_seed, bool) or gold_seed < 0:
        raise ValueError(f"gold_seed must be an integer >= 0, got {gold_seed!r}")
    if gold_seed in set(_check_seeds(proxy_seeds)):
        raise ValueError(f"gold_seed={gold_seed} is also a proxy seed ({list(proxy_seeds)}): the gold and that proxy "
                         "would share their head initialization; pick another gold_seed")
    return int(gold_seed)


def proxy_configs(run_dir, variants: Sequence[str], seeds: Sequence[int], *, grm_alpha: float = 0.01,
                  grm_beta: float = 0.1, **train_kw) -> dict:
    """``{proxy name: RMConfig}`` for every (variant, seed) (``rmlib.reward.variants.variant_config``, BSR's
    lambda given in the official convention and scaled by the batch) + the shared ``train_kw``
    (backbone, head, mode, top_k_layers, lr, batch size, epochs, max_length, ...).
    grm_alpha / grm_beta: GRM's (1 - alpha) L_reward + alpha L_reg and the beta inside its SFT term."""
    variants, seeds = _check_variants(variants), _check_seeds(seeds)
    bad = {"output_dir", "loss", "loss_params", "regularizer", "alpha", "beta", "seed"} & set(train_kw)
    if bad:
        raise ValueError(f"proxy_configs sets {sorted(bad)} itself (use variants, grm_alpha, grm_beta, seeds)")
    for name, value in (("grm_alpha", grm_alpha), ("grm_beta", grm_beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not grm_alpha < 1:
        raise ValueError(f"grm_alpha must be < 1 (GRM: (1 - alpha) L_reward + alpha L_reg), got {grm_alpha!r}")
    return {proxy_name(v, s): rm_variants.variant_config(v, s, run_dir, PROXY_PREFIX, alpha=float(grm_alpha),
                                                         beta=float(grm_beta), **train_kw)
            for v in variants for s in seeds}




# -- sampling and scoring ---------------------------------------------------------------------------






