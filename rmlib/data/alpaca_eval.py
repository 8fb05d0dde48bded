"""AlpacaEval (GPT-4 judge): one row per judged response, and (win, loss) pairs from them.

Each response was judged against one shared reference (text_davinci_003): preference 2 =
beats the reference (gold +1), 1 = loses (gold -1), 1.5 = tie (gold 0, kept: it matters
for Kendall tau), 0 or null = no valid judgment (dropped).
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

from datasets import Dataset, Features, Value

from rmlib.core.paths import data_dir

from .drop_report import DropReport, Loaded
from .errors import DataError, Drop
from .pairs import Collector, check_label, check_text, opt_text
from .readers import display_name, read_json
from .schema import pair_row, to_dataset

logger = logging.getLogger(__name__)

RESPONSE_FEATURES = Features({
    "id": Value("string"),
    "prompt_id": Value("int64"),     # index of the instruction among the sorted unique instructions
    "instruction": Value("string"),
    "category": Value("string"),     # the ``dataset`` field: helpful_base, koala, oasst, ...
    "generator": Value("string"),    # the file's name (= the AlpacaEval results folder)
    "output": Value("string"),       # output_2
    "preference": Value("float64"),  # 2 beats the reference, 1 loses, 1.5 tie
    "gold": Value("float64"),        # +1, -1, 0
})
GOLD = {2.0: 1.0, 1.0: -1.0, 1.5: 0.0}
SUBDIR = Path("alpaca_eval") / "alpaca_eval_gpt4"


def _preference(value) -> float:
    if value is None:
        raise Drop("null preference")
    x = check_label(value, "preference")
    if x == 0:
        raise Drop("zero preference")
    if x not in GOLD:
        raise Drop("unexpected preference")
    return x


def _generator(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".json")


def load_alpaca_eval_responses(path: str | Path | None = None) -> Loaded:
    """All ``<generator>.json(.gz)`` annotation files in ``path`` (default
    ``<data>/alpaca_eval/alpaca_eval_gpt4``), one row per judged response.

    The generator name is the file's name: ``generator_2`` inside two files is not the
    model's name (counted under ``drops.kept``). These annotations are not on the hub.
    """
    folder = Path(path) if path is not None else data_dir() / SUBDIR
    if not folder.is_dir():
        raise DataError(folder, "AlpacaEval annotations folder not found (expected <generator>.json.gz files "
                        "from tatsu-lab/alpaca_eval results/<generator>/alpaca_eval_gpt4/annotations.json; "
                        "they are not on the hub)")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz")))
    if not files:
        raise DataError(folder, "no <generator>.json(.gz) files in the folder")
    raw = []
    for f in files:
        data = read_json(f)
        if not isinstance(data, list):
            raise DataError(f, "top level is not a list of annotations", line=1)
        if not data:
            raise DataError(f, "no annotations (an empty list)", line=1)
        gen, name = _generator(f), display_name(f)
        for i, rec in enumerate(data):
            if not isinstance(rec, Mapping):
                raise DataError(f, f"expected an object, got {type(rec).__name__}", line=i + 1, unit="row")
            raw.append((f"{name}:{i}", gen, rec))
    instructions = sorted({r.get("instruction") for _, _, r in raw if isinstance(r.get("instruction"), str)})
    prompt_id = {s: i for i, s in enumerate(instructions)}
    col = Collector("alpaca_eval responses", "alpaca_eval", RESPONSE_FEATURES)
    for rid, gen, rec in raw:
        with col.row(rid):
            pref = _preference(rec.get("preference"))
            instr = check_text(rec.get("instruction"), "instruction")
            out = check_text(rec.get("output_2"), "output")
            if pref == 1.5:
                col.drops.note("tie (gold 0)", rid)
            if rec.get("generator_2") != gen:
                col.drops.note("generator_2 is not the file's generator", rid)
            col.rows.append({"id": rid, "prompt_id": prompt_id[instr], "instruction": instr,
                             "category": opt_text(rec.get("dataset"), "dataset"), "generator": gen,
                             "output": out, "preference": pref, "gold": GOLD[pref]})
    _note_oddities(col, raw)
    return col.finish(logger)


def _note_oddities(col: Collector, raw: list) -> None:
    """Note generators with identical outputs and responses judged against another reference."""
    by_gen: dict[str, list] = defaultdict(list)
    refs: dict[str, Counter] = defaultdict(Counter)
    for rid, gen, rec in raw:
        by_gen[gen].append((str(rec.get("instruction")), str(rec.get("output_2"))))
        refs[str(rec.get("instruction"))][hash(str(rec.get("output_1")))] += 1
    seen: dict[int, str] = {}
    for gen in sorted(by_gen):
        key = hash(tuple(sorted(by_gen[gen])))
        if key in seen:
            col.drops.note(f"outputs identical to another generator's ({gen} = {seen[key]})", gen, len(by_gen[gen]))
            logger.warning("alpaca_eval: %s has exactly the outputs of %s", gen, seen[key])
        seen.setdefault(key, gen)
    for rid, gen, rec in raw:
        c = refs[str(rec.get("instruction"))]
        if len(c) > 1 and c[hash(str(rec.get("output_1")))] < max(c.values()):
            col.drops.note("judged against a different reference output_1", rid)


def alpaca_eval_pairs(responses: Dataset, prompts: Iterable[int | str] | None = None,
                      generators: Iterable[str] | None = None, max_pairs_per_prompt: int | None = None,
                      seed: int = 0, drops: DropReport | None = None) -> Dataset:
    """(win, loss) pairs on the same prompt in the normalized schema.

    chosen = a response with gold +1, rejected = one with gold -1, both from ``generators``
    (all if None) and on ``prompts`` (prompt_ids or instructions; all if None). With
    ``max_pairs_per_prompt`` a sample of that many pairs per prompt, fixed by ``seed``.
    Pairs whose two outputs are identical are skipped; with ``drops`` they are counted there
    (reason "identical chosen/rejected", source "alpaca_eval_pairs"), else only logged.
    """
    if max_pairs_per_prompt is not None and max_pairs_per_prompt < 1:
        raise ValueError("max_pairs_per_prompt must be >= 1 or None")
    cols = responses.select_columns(["id", "prompt_id", "instruction", "category", "generator", "output",
                                     "gold"]).to_dict()  # plain lists: indexing a Column is slow
    keep_p = None if prompts is None else set(prompts)
    keep_g = None if generators is None else set(generators)
    groups: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    for k, (pid, instr, gen, gold) in enumerate(zip(cols["prompt_id"], cols["instruction"], cols["generator"], cols["gold"])):
        if keep_p is not None and pid not in keep_p and instr not in keep_p:
            continue
        if (keep_g is not None and gen not in keep_g) or gold == 0:
            continue
        groups[pid][0 if gold > 0 else 1].append(k)
    rows, identical = [], 0
    for pid in sorted(groups):
        wins, losses = (sorted(g, key=lambda k: (cols["generator"][k], k)) for g in groups[pid])
        pairs = [(w, l) for w in wins for l in losses]
        if max_pairs_per_prompt is not None and len(pairs) > max_pairs_per_prompt:
            pairs = sorted(random.Random(f"{seed}:{pid}").sample(pairs, max_pairs_per_prompt))
        for w, l in pairs:
            if cols["output"][w].strip() == cols["output"][l].strip():
                identical += 1
                if drops is not None:
                    drops.add("identical chosen/rejected", f"{cols['id'][w]}|{cols['id'][l]}",
                              source="alpaca_eval_pairs")
                continue
            rows.append(pair_row(
                id=f"{cols['id'][w]}|{cols['id'][l]}", prompt=[{"role": "user", "content": cols["instruction"][w]}],
                chosen=cols["output"][w], rejected=cols["output"][l], source="alpaca_eval",
                category=cols["category"][w], chosen_generator=cols["generator"][w],
                rejected_generator=cols["generator"][l], chosen_score=cols["gold"][w], rejected_score=cols["gold"][l]))
    n_prompts = sum(1 for w, l in groups.values() if w and l)
    logger.info("alpaca_eval pairs: %d pairs on %d prompts (skipped %d with identical outputs)", len(rows), n_prompts, identical)
    return to_dataset(rows)
