"""Every loader on a corpus of bad inputs: a DataError naming file/line/field, or counted drops.

The committed corpus is tests/bad_inputs/ (described case by case in cases.json, each with a
``kind``); binary or bulky cases (parquet, gzip, over-long texts, non-UTF-8) are written by
the tests below.
"""

import gzip
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rmlib.data import (
    DataError,
    load_alpaca_eval_responses,
    load_hh_rlhf,
    load_hhh_alignment,
    load_lfqa_expert,
    load_mt_bench_questions,
    load_preference_file,
    load_source,
)

BAD = Path(__file__).parent / "bad_inputs"
CASES = json.loads((BAD / "cases.json").read_text())
LOADERS = {
    "file": load_preference_file,
    "hh": lambda p: load_hh_rlhf(path=p),
    "lfqa": lambda p: load_lfqa_expert(path=p),
    "alpaca_eval": lambda p: load_alpaca_eval_responses(path=p),
    "alpaca_eval_pairs": lambda p: load_source("alpaca_eval_pairs", path=p),
    "hhh": lambda p: load_hhh_alignment(path=p),
    "mt_bench_questions": lambda p: load_mt_bench_questions(path=p),
}
# a drop example names the file and the 0-based row: "model-x.json:3", "a.json:0|b.json:2" for pairs
_ONE_ROW = r"[\w.\-]+\.(?:json|jsonl|parquet)(?:\.gz)?:\d+"
ROW_ID = re.compile(rf"{_ONE_ROW}(?:\|{_ONE_ROW})?")


def check_error(exc: DataError, path: Path, expect: dict):
    msg = str(exc)
    assert isinstance(exc, ValueError)
    assert exc.__cause__ is None and "Traceback" not in msg  # our message, not a library's exception
    assert expect.get("file", path.name) in msg, msg  # the file (inside the folder, for folder loaders)
    if "line" in expect:
        assert exc.line == expect["line"] and f"{exc.unit} {expect['line']}" in msg, msg
    if "field" in expect:
        assert exc.field == expect["field"] and repr(expect["field"]) in msg, msg
    if "contains" in expect:
        assert expect["contains"] in msg, msg


def check_drops(loaded, case: dict):
    ds, drops = loaded
    assert dict(drops.counts) == case["drops"]
    assert len(ds) == case["kept"]
    assert len(ds) + drops.total == case["rows"]  # every row is kept or counted
    for reason in case["drops"]:
        assert drops.examples(reason), f"no example id for {reason!r}"
        assert all(ROW_ID.fullmatch(e) for e in drops.examples(reason)), drops.examples(reason)
    for what, n in case.get("kept_notes", {}).items():
        assert drops.kept[what] == n
    frame = drops.as_frame()
    assert list(frame.columns) == ["source", "reason", "count", "examples"]
    assert frame["count"].sum() == drops.total


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_corpus(case):
    path = BAD / case["path"]
    load = LOADERS[case["loader"]]
    if "error" in case:
        with pytest.raises(DataError) as e:
            load(path)
        check_error(e.value, path, case["error"])
    else:
        check_drops(load(path), case)


def test_cases_cover_every_corpus_file():
    used = {c["path"].split("/")[0] for c in CASES}
    on_disk = {p.name for p in BAD.iterdir()} - {"cases.json"}
    assert on_disk <= used


@pytest.mark.parametrize("loader", ["file", "hh", "lfqa", "alpaca_eval", "hhh", "mt_bench_questions"])
def test_every_file_loader_meets_every_file_level_failure(loader):
    """Each loader that reads local files has a case for a missing file, a broken JSON file, an
    empty file and odd rows (the cases themselves run in test_corpus)."""
    kinds = {c["kind"] for c in CASES if c["loader"] == loader}
    assert {"nonexistent file", "broken JSON", "empty file", "odd rows"} <= kinds, kinds


OK = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}


def test_parquet_drops(tmp_path):
    rows = [OK, {**OK, "chosen": None}, {**OK, "chosen_score": math.nan, "rejected_score": 1.0},
            {**OK, "chosen_score": math.inf, "rejected_score": 1.0}, {**OK, "rejected": "4"}]
    rows = [{"chosen_score": None, "rejected_score": None, **r} for r in rows]
    f = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    check_drops(load_preference_file(f), {
        "rows": 5, "kept": 1, "drops": {"missing chosen": 1, "non-finite score": 2, "identical chosen/rejected": 1}})


MSG = lambda role, content: {"role": role, "content": content}  # noqa: E731
# user parquet files: one table per case (a parquet column has one type, so mixed types come as strings)
PARQUET_CASES = {
    "empty strings": ([{"prompt": "", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": " ", "rejected": "b"},
                       {"prompt": "q", "chosen": "a", "rejected": "\n"}, OK],
                      {"empty prompt": 1, "empty chosen": 1, "empty rejected": 1}),
    "null fields": ([{"prompt": None, "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": None}, OK],
                    {"missing prompt": 1, "missing rejected": 1}),
    "integer replies": ([{"prompt": "q", "chosen": 1, "rejected": "b"}, {"prompt": "q", "chosen": 2, "rejected": "c"}],
                        {"non-string chosen": 2}),
    "binary replies": ([{"prompt": "q", "chosen": b"a", "rejected": "b"}], {"non-string chosen": 1}),
    "scores as strings": ([{**OK, "chosen_score": "1", "rejected_score": "0"}, {**OK, "chosen_score": "x", "rejected_score": "0"},
                           {**OK, "chosen_score": "2", "rejected_score": " 2.0 "}, {**OK, "chosen_score": "nan", "rejected_score": "0"}],
                          {"unparsable score": 1, "tie": 1, "non-finite score": 1}),
    "ties": ([{**OK, "chosen_score": 1.0, "rejected_score": 1.0}, {**OK, "chosen_score": 2.0, "rejected_score": 1.0}],
             {"tie": 1}),
    "prompt messages": ([{**OK, "prompt": [MSG("robot", "hi")]}, {**OK, "prompt": [MSG("user", None)]},
                         {**OK, "prompt": [MSG("user", " ")]}, {**OK, "prompt": []}, {**OK, "prompt": [MSG("user", "hi")]}],
                        {"bad prompt message": 1, "missing prompt message": 1, "empty prompt message": 1, "empty prompt": 1}),
    "identical after strip": ([{**OK, "rejected": " 4 "}, OK], {"identical chosen/rejected": 1}),
}


@pytest.mark.parametrize("name", list(PARQUET_CASES))
def test_parquet_corpus(tmp_path, name):
    rows, drops = PARQUET_CASES[name]
    f = tmp_path / "user.parquet"
    pq.write_table(pa.Table.from_pylist(rows), f)
    check_drops(load_preference_file(f), {"rows": len(rows), "kept": len(rows) - sum(drops.values()), "drops": drops})


@pytest.mark.parametrize("content, expect", [
    (None, {"contains": "not found"}),
    (b"", {"line": 1, "contains": "empty"}),
    ("zero rows", {"line": 1, "contains": "no records"}),
])
def test_parquet_file_level_errors(tmp_path, content, expect):
    f = tmp_path / "user.parquet"
    if content == "zero rows":
        schema = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())])
        pq.write_table(pa.Table.from_pylist([], schema=schema), f)
    elif content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    check_error(e.value, f, expect)


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    """An OS error while reading (permissions, a dead mount) names the file, not a pathlib traceback."""
    f = tmp_path / "locked.jsonl"
    f.write_text(json.dumps(OK) + "\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    check_error(e.value, f, {"contains": "Permission denied"})


def test_parquet_messages_prompt(tmp_path):
    f = tmp_path / "msgs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]), f)
    ds, drops = load_preference_file(f)
    assert ds[0]["prompt"] == [{"role": "user", "content": "hi"}] and drops.total == 0


def test_parquet_missing_column(tmp_path):
    f = tmp_path / "nochosen.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "rejected": "b"}]), f)
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    check_error(e.value, f, {"line": 1, "field": "chosen"})


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "broken.parquet"
    f.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    check_error(e.value, f, {"contains": "parquet"})


def test_gzipped_jsonl_and_corrupt_gzip(tmp_path):
    good = tmp_path / "prefs.jsonl.gz"
    good.write_bytes(gzip.compress((json.dumps(OK) + "\n" + json.dumps({**OK, "rejected": "4"}) + "\n").encode()))
    ds, drops = load_preference_file(good)
    assert len(ds) == 1 and drops["identical chosen/rejected"] == 1
    assert ds[0]["id"] == "prefs.jsonl.gz:0"
    bad = tmp_path / "truncated.jsonl.gz"
    bad.write_bytes(good.read_bytes()[:20])
    with pytest.raises(DataError) as e:
        load_preference_file(bad)
    check_error(e.value, bad, {"contains": "gzip"})


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(json.dumps(OK).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    check_error(e.value, f, {"line": 2, "contains": "UTF-8"})


def test_overlong_texts_are_kept(tmp_path):
    """Over-long texts are not the loader's business: truncation happens at tokenization."""
    long = "word " * 50_000
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps({"prompt": long, "chosen": long + "a", "rejected": long + "b"}) + "\n")
    ds, drops = load_preference_file(f)
    assert drops.total == 0 and len(ds) == 1 and len(ds[0]["chosen"]) == len(long) + 1


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_overlong_texts_are_cut_and_counted_at_encoding(tmp_path, tokenizer, fmt):
    """Loaded whole, then ``encode_pairs`` cuts the prompt from the left and an over-long reply at
    its end, counts both, and drops (listing the id) a pair whose replies are identical once cut."""
    from rmlib.model.encoding import encode_pairs, format_prompt, format_reply

    long = " ".join(f"w{i}" for i in range(600))  # ~1,200 tokens
    rows = [{"prompt": long, "chosen": "Short yes.", "rejected": "Short no."},            # prompt cut
            {"prompt": "q?", "chosen": long, "rejected": "no."},                          # reply cut
            {"prompt": "q?", "chosen": long + " tail A", "rejected": long + " tail B"},   # identical once cut
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}]
    f = tmp_path / f"long.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), f)
    else:
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds, drops = load_preference_file(f)
    assert len(ds) == 4 and drops.total == 0
    enc, stats = encode_pairs(ds, tokenizer, max_length=64)
    assert (stats.pairs, stats.prompt_truncated, stats.reply_truncated) == (4, 1, 2)
    assert stats.dropped_identical_after_truncation == [f"long.{fmt}:2"]
    assert enc["id"] == [f"long.{fmt}:0", f"long.{fmt}:1", f"long.{fmt}:3"]
    for r in enc:
        assert len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) == r["length"] <= 64
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    p0 = ids(format_prompt(tokenizer, ds[0]["prompt"]))
    assert enc[0]["prompt_ids"] == p0[-len(enc[0]["prompt_ids"]):] and len(enc[0]["prompt_ids"]) < len(p0)  # left cut
    assert enc[0]["chosen_ids"] == ids(format_reply(tokenizer, ds[0]["prompt"], "Short yes."))  # reply whole
    c1 = ids(format_reply(tokenizer, ds[1]["prompt"], long))
    assert enc[1]["chosen_ids"] == c1[: len(enc[1]["chosen_ids"])] and len(enc[1]["chosen_ids"]) < len(c1)  # end cut


def test_jsonl_named_json_and_blank_lines(tmp_path):
    f = tmp_path / "lines.json"
    f.write_text(json.dumps(OK) + "\n\n" + json.dumps({**OK, "chosen": "four"}) + "\n")
    ds, drops = load_preference_file(f)
    assert len(ds) == 2 and ds["id"] == ["lines.json:0", "lines.json:2"]


def test_error_is_not_a_library_traceback(tmp_path):
    """A DataError is raised from our code, with the library's exception not chained in."""
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": \n')
    with pytest.raises(DataError) as e:
        load_preference_file(f)
    assert e.value.__cause__ is None and e.value.__suppress_context__
