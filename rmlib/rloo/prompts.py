"""RLOO prompt sets: a deterministic pool (AlpacaEval instructions, HH-RLHF first human turns)
split into training prompts and a fixed evaluation set, disjoint by text, without the prompts the
reward models trained on (``exclude``); ``prompt_stream`` lays the training prompts out in the
order training reads them (so a resume never depends on sampler state).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from rmlib.data import load_alpaca_eval_responses, load_hh_rlhf
from rmlib.model.encoding import format_prompt

PROMPT_SOURCES = ("alpaca_eval", "hh-rlhf")


# -- prompts ----------------------------------------------------------------------------------------
def _prompt_id(source: str, text: str) -> str:
    return f"{source}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def first_user_turn(messages) -> str | None:
    """The text of the first user message of a conversation (None if there is none)."""
    for m in messages or []:
        if m.get("role") == "user":
            return str(m.get("content", "")).strip()
    return None


def rm_training_prompts(pairs) -> set[str]:
    """First user turns of a pair dataset's prompts: pass as ``exclude`` to keep RM-training
    prompts out of the RLOO prompt sets."""
    return {t for t in (first_user_turn(p) for p in pairs["prompt"]) if t}


def exclusion_texts(items) -> set[str]:
    """Prompt texts to exclude, from any mix of: plain texts, chat-message lists, or prompt keys
    (``rmlib.analysis.synthetic_gold.prompt_key``: JSON lists of [role, content]). Conversations contribute their
    first user turn (what an RLOO prompt from that conversation would be)."""
    out = set()
    for item in items:
        if isinstance(item, str) and item.startswith("[["):
            try:
                item = [{"role": r, "content": c} for r, c in json.loads(item)]
            except (ValueError, TypeError):
                pass  # a text that merely starts with "[["
        text = first_user_turn(item) if isinstance(item, list) else str(item).strip()
        if text:
            out.add(text)
    return out


def prompt_candidates(sources=PROMPT_SOURCES) -> list[dict]:
    """Single-turn prompts ``{"source", "text"}`` from the Best-of-N sources, in source order:
    ``alpaca_eval`` (the 805 AlpacaEval instructions), ``hh-rlhf`` (first human turn of each
    HH-RLHF harmless conversation)."""
    sources = list(sources)
    bad = [s for s in sources if s not in PROMPT_SOURCES]
    if bad or not sources:
        raise ValueError(f"prompt sources {bad or sources!r} not allowed; allowed: {', '.join(PROMPT_SOURCES)}")
    out = []
    for source in sources:
        if source == "alpaca_eval":

            texts = sorted(set(load_alpaca_eval_responses().dataset["instruction"]))
        else:

            texts = [first_user_turn(p) for p in load_hh_rlhf().dataset["prompt"]]
        out += [{"source": source, "text": t.strip()} for t in texts if t and t.strip()]
    return out


@dataclass
class PromptSets:
    """Training prompts and the fixed evaluation prompts (disjoint by text), plus what was left out.

    Each prompt: ``{"prompt_id", "source", "text", "prompt": [{"role": "user", "content": text}]}``."""

    train: list[dict]
    eval: list[dict]
    report: dict

    def digest(self) -> str:
        """Hash of both sets (ids in order): part of a run's identity."""
        ids = [p["prompt_id"] for p in self.train] + ["|"] + [p["prompt_id"] for p in self.eval]
        return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def split_prompts(candidates: list[dict], n_train: int, n_eval: int, seed: int = 0, exclude=(),
                  tokenizer=None, max_prompt_tokens: int | None = None) -> PromptSets:
    """Deterministic train / evaluation prompt sets from ``candidates`` (``{"source", "text"}``).

    Texts are stripped and de-duplicated (a text in several sources keeps the alphabetically
    first source), ``exclude`` texts removed (anything ``exclusion_texts`` reads), and with
    ``tokenizer`` + ``max_prompt_tokens`` the prompts whose chat-formatted length exceeds it
    removed (all counted in ``report``); the rest is sorted by text (so the input order does not
    matter) and shuffled with ``seed``. The first ``n_eval`` form the evaluation set, the next
    ``n_train`` the training set: the evaluation set does not change when ``n_train`` does.
    Raises naming the numbers when too few prompts are left.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_eval", n_eval, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_prompt_tokens is not None and (tokenizer is None or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r} needs a tokenizer and must be >= 1")
    excluded = exclusion_texts(exclude)
    seen: dict[str, str] = {}
    report = {"candidates": len(candidates), "duplicates": 0, "excluded": 0, "too_long": 0}
    for source, text in sorted((str(c["source"]), str(c["text"]).strip()) for c in candidates):
        if not text:
            continue
        if text in seen:
            report["duplicates"] += 1
        elif text in excluded:
            report["excluded"] += 1
            seen[text] = ""  # counted once
        else:
            seen[text] = source
    kept = sorted((t, s) for t, s in seen.items() if s)
    if max_prompt_tokens is not None:
        def fits(text):
            ids = tokenizer(format_prompt(tokenizer, [{"role": "user", "content": text}]),
                            add_special_tokens=False)["input_ids"]
            return len(ids) <= max_prompt_tokens
        ok = [fits(t) for t, _ in kept]
        report["too_long"] = ok.count(False)
        kept = [k for k, good in zip(kept, ok) if good]
    if n_train + n_eval > len(kept):
        raise ValueError(f"n_train={n_train} + n_eval={n_eval} exceeds the {len(kept)} usable prompts "
                         f"({report})")
    order = np.random.default_rng(seed).permutation(len(kept))
    rows = [{"prompt_id": _prompt_id(s, t), "source": s, "text": t, "prompt": [{"role": "user", "content": t}]}
            for t, s in (kept[i] for i in order[: n_eval + n_train])]
    report.update(usable=len(kept), n_train=n_train, n_eval=n_eval, seed=seed)
    return PromptSets(train=rows[n_eval:], eval=rows[:n_eval], report=report)


def build_prompt_sets(n_train: int, n_eval: int, seed: int = 0, sources=PROMPT_SOURCES, exclude=(),
                      tokenizer=None, max_prompt_tokens: int | None = None) -> PromptSets:
    """``split_prompts`` of ``prompt_candidates(sources)``: the RLOO training and evaluation prompts."""
    return split_prompts(prompt_candidates(sources), n_train, n_eval, seed, exclude, tokenizer, max_prompt_tokens)


def prompt_stream(prompts: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts read in order by training: successive passes over ``prompts``, each pass a
    permutation seeded by (seed, pass number). The trainer reads this list without shuffling."""
    if not prompts:
        raise ValueError("no training prompts")
    out: list[dict] = []
    k = 0
    while len(out) < n:
        perm = np.random.default_rng([seed, k]).permutation(len(prompts))
        out += [prompts[i] for i in perm]
        k += 1
    return out[:n]
