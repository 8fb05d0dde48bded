"""The four over-optimization scenarios of the BSR paper (Hong et al. 2025, Table 5), on AlpacaEval.

BSR trains on UltraFeedback prompts x 17 models with ArmoRM gold scores and evaluates on
Val1 in-domain (other responses of the train prompts; binary accuracy), Val2 prompt-OOD
(held-out prompts, same models; Kendall tau vs gold), Val3 response-OOD (train prompts,
responses of new models; tau), Val4 mutual-OOD (both new; tau). Here the same design is
built from AlpacaEval's GPT-4 judgments (gold +1 beats the shared reference, -1 loses,
0 tie; see ``rmlib.data.alpaca_eval``):

- prompts are split into train / unseen (stratified by AlpacaEval source ``category``),
  generators into train / new (stratified by win rate, so both sides span weak to strong
  models; the win rate is computed on all prompts and only used to form the strata);
- train pairs: train prompts x train generators, (gold +1, gold -1) on the same prompt,
  capped per prompt. On every train prompt the train-generator responses are first split
  at random (within each gold value) into a train side and a Val1 side, so Val1 pairs share
  no RESPONSE with the train pairs (only prompts and generators, as in BSR's Val1);
- Val1..Val4 are each a table of responses (id, prompt_id, instruction, category,
  generator, output, gold) for per-prompt Kendall tau-b of RM scores vs gold, and the pairs
  the gold orders among those responses (every +1 x -1 of a prompt) for accuracy. Only
  prompts with at least one +1 and one -1 response are kept (others cannot order any pair;
  they are counted). ``max_responses_per_prompt`` keeps one +1, one -1 and a random rest;
  ``max_prompts_per_split`` a category-stratified random subset of prompts.

Both metrics are computed for all four scenarios; ``HEADLINE_METRIC`` names the one BSR
reports for each. Everything is deterministic given ``seed``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from datasets import Dataset

from rmlib.analysis.benchmarks import stratified_sample
from rmlib.analysis.stats import (
    bootstrap_accuracy,
    bootstrap_mean,
    correct_pairs,
    group_rng,
    per_prompt_taus,
    percentile_interval,
)
from rmlib.data import Loaded, alpaca_eval_pairs
from rmlib.data.exclusions import EXCLUDED_GENERATORS
from rmlib.model.scoring import score_texts

logger = logging.getLogger(__name__)


SCENARIOS = ("val1_in_domain", "val2_prompt_ood", "val3_response_ood", "val4_mutual_ood")


HEADLINE_METRIC = {"val1_in_domain": "accuracy", "val2_prompt_ood": "kendall_tau_b",
                   "val3_response_ood": "kendall_tau_b", "val4_mutual_ood": "kendall_tau_b"}  # BSR Table 5


RESPONSE_COLUMNS = ["id", "prompt_id", "instruction", "category", "generator", "output", "gold"]


RESULT_COLUMNS = ["scenario", "metric", "value", "ci_low", "ci_high", "n_prompts", "n_pairs", "n_responses",
                  "n_skipped_prompts"]


N_GENERATOR_STRATA = 5  # win-rate bins for the generator split


@dataclass
class ValSet:
    """One validation scenario: responses for tau, and the pairs gold orders among them."""

    name: str
    prompts: list[int]        # the scenario's prompt pool (train or unseen prompts)
    generators: list[str]     # its generator pool (train or new generators)
    responses: pd.DataFrame   # RESPONSE_COLUMNS, sorted by (prompt_id, generator)
    pairs: Dataset            # normalized pair schema; chosen gold +1, rejected gold -1, ids "<chosen>|<rejected>"
    n_prompts_without_win_and_loss: int = 0  # pool prompts dropped: no +1 or no -1 response


@dataclass
class ScenarioSplit:
    """Train pairs and the four validation scenarios (``val`` keyed by ``SCENARIOS``)."""

    train_prompts: list[int]
    unseen_prompts: list[int]
    train_generators: list[str]
    new_generators: list[str]
    excluded_generators: dict[str, str]
    train_responses: pd.DataFrame  # train-side responses (train pairs come from these), RESPONSE_COLUMNS
    train_pairs: Dataset           # normalized pair schema, for training
    val: dict[str, ValSet]
    config: dict = field(default_factory=dict)  # the make_scenarios arguments (save with results)


def _responses_frame(responses) -> tuple[Dataset, pd.DataFrame]:
    if isinstance(responses, Loaded):
        responses = responses.dataset
    if not isinstance(responses, Dataset):
        raise TypeError("responses must be the Dataset (or Loaded) from load_alpaca_eval_responses()")
    df = responses.select_columns(RESPONSE_COLUMNS).to_pandas()
    df["_row"] = np.arange(len(df))
    return responses, df


def _split(keys: Sequence, strata: Sequence, frac: float, rng: np.random.Generator, what: str):
    """(train keys, held-out keys), both sorted; ``frac`` of the keys (stratified) go to train."""
    keys = np.asarray(keys, dtype=object)
    k = int(round(frac * len(keys)))
    if not 0 < k < len(keys):
        raise ValueError(f"{what}: fraction {frac} of {len(keys)} leaves one side empty")
    take = np.zeros(len(keys), bool)
    take[stratified_sample(strata, k, rng)] = True
    return sorted(keys[take].tolist()), sorted(keys[~take].tolist())


def _val1_side(df: pd.DataFrame, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Bool mask: within each (prompt, gold) group, round(frac * size) random responses go to Val1."""
    key = pd.Series(rng.random(len(df)), index=df.index)
    g = df.groupby(["prompt_id", "gold"])
    rank = key.groupby([df["prompt_id"], df["gold"]]).rank(method="first") - 1
    n_val = np.floor(frac * g["gold"].transform("size") + 0.5)
    return (rank < n_val).to_numpy()


def _pick_responses(group: pd.DataFrame, k: int | None, rng: np.random.Generator) -> pd.DataFrame:
    """At most ``k`` responses of one prompt: one +1 and one -1 first, then a random rest."""
    if k is None or len(group) <= k:
        return group
    wins, losses = np.flatnonzero(group["gold"].to_numpy() > 0), np.flatnonzero(group["gold"].to_numpy() < 0)
    first = [rng.choice(wins), rng.choice(losses)]
    rest = np.setdiff1d(np.arange(len(group)), first)
    chosen = np.concatenate([first, rng.choice(rest, size=k - 2, replace=False)])
    return group.iloc[np.sort(chosen)]


def _make_valset(name: str, responses: Dataset, pool: pd.DataFrame, prompts: list[int], generators: list[str],
                 max_responses_per_prompt: int | None, max_prompts_per_split: int | None, seed: int) -> ValSet:
    rng = group_rng(seed, name)
    has = pool.groupby("prompt_id")["gold"].agg(win=lambda g: (g > 0).any(), loss=lambda g: (g < 0).any())
    ok = has.index[has["win"] & has["loss"]].to_numpy()
    n_without = len(prompts) - len(ok)
    if max_prompts_per_split is not None and len(ok) > max_prompts_per_split:
        cats = pool.drop_duplicates("prompt_id").set_index("prompt_id").loc[ok, "category"]
        ok = ok[stratified_sample(cats.tolist(), max_prompts_per_split, rng)]
    keep = pool[pool["prompt_id"].isin(set(ok.tolist()))].sort_values(["prompt_id", "generator"])
    picked = [_pick_responses(g, max_responses_per_prompt, rng) for _, g in keep.groupby("prompt_id", sort=True)]
    table = pd.concat(picked) if picked else keep
    pairs = alpaca_eval_pairs(responses.select(table["_row"].tolist()))
    if not len(pairs):
        logger.warning("scenario %s has no pairs (pool of %d prompts x %d generators)", name, len(prompts),
                       len(generators))
    return ValSet(name, list(prompts), list(generators), table[RESPONSE_COLUMNS].reset_index(drop=True), pairs,
                  int(n_without))


def make_scenarios(responses, prompt_frac_train: float = 0.5, generator_frac_train: float = 0.7,
                   n_train_pairs: int | None = None, max_pairs_per_prompt: int | None = 16,
                   val1_frac: float = 0.2, max_responses_per_prompt: int | None = 8,
                   max_prompts_per_split: int | None = None, seed: int = 0,
                   exclude_generators: dict[str, str] | None = None) -> ScenarioSplit:
    """Build train pairs and the four scenarios from AlpacaEval responses (see module docstring).

    Args:
        responses: ``load_alpaca_eval_responses()`` (the Loaded or its dataset).
        prompt_frac_train: share of prompts used for training (rest: unseen, Val2/Val4).
        generator_frac_train: share of generators used for training (rest: new, Val3/Val4).
        n_train_pairs: cap on train pairs (uniform random subset of the capped pairs); None = all.
        max_pairs_per_prompt: cap on (win, loss) train pairs per prompt; None = all.
        val1_frac: share of each train prompt's responses (per gold value) held out for Val1.
        max_responses_per_prompt: cap on responses per prompt in each Val table (>= 2; None = all).
        max_prompts_per_split: cap on prompts per Val scenario (None = all).
        seed: fixes every random choice.
        exclude_generators: {generator: reason}; default ``EXCLUDED_GENERATORS``.
    """
    if not (0 < prompt_frac_train < 1 and 0 < generator_frac_train < 1 and 0 <= val1_frac < 1):
        raise ValueError("prompt_frac_train and generator_frac_train must be in (0, 1), val1_frac in [0, 1)")
    if max_responses_per_prompt is not None and max_responses_per_prompt < 2:
        raise ValueError(f"max_responses_per_prompt={max_responses_per_prompt} must be >= 2 or None")
    if max_prompts_per_split is not None and max_prompts_per_split < 1:
        raise ValueError(f"max_prompts_per_split={max_prompts_per_split} must be >= 1 or None")
    config = dict(prompt_frac_train=prompt_frac_train, generator_frac_train=generator_frac_train,
                  n_train_pairs=n_train_pairs, max_pairs_per_prompt=max_pairs_per_prompt, val1_frac=val1_frac,
                  max_responses_per_prompt=max_responses_per_prompt, max_prompts_per_split=max_prompts_per_split,
                  seed=seed)
    exclude = EXCLUDED_GENERATORS if exclude_generators is None else dict(exclude_generators)
    responses, df = _responses_frame(responses)
    excluded = {g: why for g, why in exclude.items() if g in set(df["generator"])}
    df = df[~df["generator"].isin(excluded)]
    rng = np.random.default_rng(seed)

    prompt_cat = df.groupby("prompt_id")["category"].first()
    train_prompts, unseen_prompts = _split(prompt_cat.index, prompt_cat.tolist(), prompt_frac_train, rng, "prompts")
    win_rate = df.groupby("generator")["gold"].apply(lambda g: float((g > 0).mean()))
    strata = (win_rate.rank(method="first").to_numpy() - 1) * N_GENERATOR_STRATA // len(win_rate)
    train_gens, new_gens = _split(win_rate.index, strata.tolist(), generator_frac_train, rng, "generators")

    in_tp, in_up = df["prompt_id"].isin(set(train_prompts)), df["prompt_id"].isin(set(unseen_prompts))
    in_tg, in_ng = df["generator"].isin(set(train_gens)), df["generator"].isin(set(new_gens))
    seen = df[in_tp & in_tg]
    to_val1 = _val1_side(seen, val1_frac, rng)
    train_side, val1_pool = seen[~to_val1], seen[to_val1]

    train_pairs = alpaca_eval_pairs(responses.select(train_side["_row"].tolist()),
                                    max_pairs_per_prompt=max_pairs_per_prompt, seed=seed)
    if n_train_pairs is not None and len(train_pairs) > n_train_pairs:
        train_pairs = train_pairs.select(np.sort(rng.choice(len(train_pairs), n_train_pairs, replace=False)).tolist())

    pools = {
        "val1_in_domain": (val1_pool, train_prompts, train_gens),
        "val2_prompt_ood": (df[in_up & in_tg], unseen_prompts, train_gens),
        "val3_response_ood": (df[in_tp & in_ng], train_prompts, new_gens),
        "val4_mutual_ood": (df[in_up & in_ng], unseen_prompts, new_gens),
    }
    val = {name: _make_valset(name, responses, pool, p, g, max_responses_per_prompt, max_prompts_per_split, seed)
           for name, (pool, p, g) in pools.items()}
    split = ScenarioSplit(train_prompts, unseen_prompts, train_gens, new_gens, excluded,
                          train_side[RESPONSE_COLUMNS].reset_index(drop=True), train_pairs, val, config)
    logger.info("scenarios (seed %d):\n%s", seed, split_sizes(split).to_string(index=False))
    return split


def _pair_prompt_count(pairs: Dataset) -> int:
    return len({tuple((m["role"], m["content"]) for m in p) for p in pairs["prompt"]}) if len(pairs) else 0


def split_sizes(split: ScenarioSplit) -> pd.DataFrame:
    """One row per part (train, then the four scenarios): prompts and generators in the pool,
    prompts / generators / responses actually present, pairs, and pool prompts dropped
    because gold orders none of their responses (no +1 or no -1)."""
    rows = [{"split": "train", "prompt_pool": len(split.train_prompts), "generator_pool": len(split.train_generators),
             "prompts": _pair_prompt_count(split.train_pairs),
             "generators": split.train_responses["generator"].nunique(),
             "responses": len(split.train_responses), "pairs": len(split.train_pairs),
             "prompts_without_win_and_loss": math.nan}]
    for name in SCENARIOS:
        v = split.val[name]
        rows.append({"split": name, "prompt_pool": len(v.prompts), "generator_pool": len(v.generators),
                     "prompts": v.responses["prompt_id"].nunique(), "generators": v.responses["generator"].nunique(),
                     "responses": len(v.responses), "pairs": len(v.pairs),
                     "prompts_without_win_and_loss": v.n_prompts_without_win_and_loss})
    return pd.DataFrame(rows)


# ---- scoring and evaluation ----------------------------------------------------------------
def _prompts(responses_df: pd.DataFrame) -> list:
    """Each response's prompt: its ``messages`` if present, else its ``instruction`` (one user turn)."""
    messages = responses_df["messages"] if "messages" in responses_df.columns else [None] * len(responses_df)
    return [m if m is not None and len(m) else instruction
            for m, instruction in zip(messages, responses_df["instruction"])]


def score_responses(model, tokenizer, responses_df: pd.DataFrame, max_length: int = 256, batch_size: int = 16,
                    bf16: bool | str = "auto", progress: bool = True) -> np.ndarray:
    """Reward of every response (row order): chat-formatted prompt (``messages`` column if
    present, else ``instruction`` as one user turn) + reply, fitted into ``max_length`` as in
    training (prompt cut from the left), via ``score_texts`` (a frozen-bottom model scores through
    the shared bottom store)."""

    if len(responses_df) == 0:
        return np.zeros(0, np.float32)
    return score_texts(model, _prompts(responses_df), list(responses_df["output"]), tokenizer=tokenizer,
                       max_length=max_length, batch_size=batch_size, bf16=bf16, progress=progress,
                       desc="scoring responses")


def _pair_response_ids(pairs: Dataset) -> tuple[list[str], list[str]]:
    ids = [i.split("|") for i in pairs["id"]] if len(pairs) else []
    if any(len(p) != 2 for p in ids):
        raise ValueError("scenario pair ids must be '<chosen response id>|<rejected response id>'")
    return [p[0] for p in ids], [p[1] for p in ids]


def evaluate_scenario(val: ValSet, rewards, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Accuracy (bootstrap over pairs) and mean per-prompt tau-b (bootstrap over prompts) of
    ``rewards`` (one per row of ``val.responses``) for one scenario; two rows of RESULT_COLUMNS."""
    rewards = np.asarray(rewards, dtype=float)
    if len(rewards) != len(val.responses):
        raise ValueError(f"{len(rewards)} rewards for {len(val.responses)} responses of {val.name}")
    resp = val.responses[["id", "prompt_id", "gold"]].assign(reward=rewards)
    by_id = dict(zip(resp["id"], resp["reward"]))
    prompt_of = dict(zip(resp["id"], resp["prompt_id"]))
    cid, rid = _pair_response_ids(val.pairs)
    missing = [i for i in cid + rid if i not in by_id]
    if missing:
        raise ValueError(f"{val.name}: {len(missing)} pair responses are not in the response table, e.g. {missing[:2]}")
    correct = correct_pairs([by_id[i] for i in cid], [by_id[i] for i in rid])
    acc_lo, acc_hi = percentile_interval(bootstrap_accuracy(correct, n_boot, group_rng(seed, val.name + ":acc")))
    common = {"scenario": val.name, "n_pairs": len(correct), "n_responses": len(resp)}
    rows = [{**common, "metric": "accuracy", "value": float(correct.mean()) if len(correct) else math.nan,
             "ci_low": acc_lo, "ci_high": acc_hi, "n_prompts": len({prompt_of[i] for i in cid}),
             "n_skipped_prompts": 0}]
    taus = per_prompt_taus(resp, "prompt_id", "reward", "gold") if len(resp) else pd.Series(dtype=float)
    used = taus.dropna().to_numpy()
    tau_lo, tau_hi = percentile_interval(bootstrap_mean(used, n_boot, group_rng(seed, val.name + ":tau")))
    rows.append({**common, "metric": "kendall_tau_b", "value": float(used.mean()) if len(used) else math.nan,
                 "ci_low": tau_lo, "ci_high": tau_hi, "n_prompts": len(used),
                 "n_skipped_prompts": int(len(taus) - len(used))})
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def evaluate_scenarios(model, tokenizer, split: ScenarioSplit, scenarios: Sequence[str] = SCENARIOS,
                       max_length: int = 256, batch_size: int = 16, bf16: bool | str = "auto", n_boot: int = 1000,
                       seed: int = 0, score_fn: Callable[[pd.DataFrame], np.ndarray] | None = None,
                       progress: bool = True, return_scores: bool = False):
    """Score each scenario's responses once and report, per scenario, pairwise accuracy over
    the gold-ordered pairs (ties wrong; 95% bootstrap over pairs) and the mean per-prompt
    Kendall tau-b of rewards vs gold (95% bootstrap over prompts; prompts whose rewards or gold
    have no variation are skipped and counted).

    Returns a tidy DataFrame (RESULT_COLUMNS): scenario, metric (accuracy | kendall_tau_b),
    value, ci_low, ci_high, n_prompts, n_pairs, n_responses, n_skipped_prompts; with
    ``return_scores`` also the per-response rewards (scenario, id, prompt_id, generator, gold,
    reward). ``score_fn(responses_df) -> rewards`` replaces the model (tests, other scorers).
    """
    unknown = [s for s in scenarios if s not in split.val]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; known: {', '.join(split.val)}")
    if score_fn is None:
        def score_fn(df):
            return score_responses(model, tokenizer, df, max_length, batch_size, bf16, progress)
    tables, scores = [], []
    for name in scenarios:
        val = split.val[name]
        rewards = np.asarray(score_fn(val.responses), dtype=float)
        tables.append(evaluate_scenario(val, rewards, n_boot, seed))
        scores.append(val.responses[["id", "prompt_id", "generator", "gold"]].assign(scenario=name, reward=rewards))
    out = pd.concat(tables, ignore_index=True)
    if return_scores:
        return out, pd.concat(scores, ignore_index=True)[["scenario", "id", "prompt_id", "generator", "gold", "reward"]]
    return out
