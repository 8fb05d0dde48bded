"""rmlib.core.manifest: notebooks record what they wrote by (notebook, role); readers look it up."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from rmlib.core import manifest


def test_record_result_writes_paths_relative_to_the_run(tmp_path):
    run, figs = tmp_path / "runs" / "cpu", tmp_path / "figures"
    table, fig = run / "results" / "01_findings.csv", figs / "01_head_norm.png"
    for p in (table, fig):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    assert manifest.record_result(run, "01_norm_dispersion", "findings", table) == table
    manifest.record_result(run, "01_norm_dispersion", "figure", fig)
    data = json.loads((run / "results" / "manifest.json").read_text())
    assert data == {"01_norm_dispersion": {"findings": ["results/01_findings.csv"],
                                           "figure": ["../../figures/01_head_norm.png"]}}
    assert manifest.recorded(run, "01_norm_dispersion", "figure") == [fig]
    assert manifest.recorded_one(run, "01_norm_dispersion", "findings") == table
    assert manifest.recorded_one(run, "02_train_rm", "training") is None
    assert not [p.name for p in (run / "results").iterdir() if p.name.endswith(".tmp")]  # atomic: no temp left


def test_a_role_keeps_every_file_in_recording_order_once(tmp_path):
    names = ["b.png", "a.png", "b.png", "c.png"]
    for name in names:
        (tmp_path / name).write_text("x")
        manifest.record_result(tmp_path, "04_bon_curves", "figure", tmp_path / name)
    assert [p.name for p in manifest.recorded(tmp_path, "04_bon_curves", "figure")] == ["b.png", "a.png", "c.png"]
    (tmp_path / "a.png").unlink()  # recorded, then removed: not offered to readers
    assert [p.name for p in manifest.recorded(tmp_path, "04_bon_curves", "figure")] == ["b.png", "c.png"]
    assert manifest.recorded_one(tmp_path, "04_bon_curves", "figure").name == "c.png"


def test_malformed_manifest_is_named_and_bad_arguments_refused(tmp_path):
    path = manifest.manifest_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        manifest.record_result(tmp_path, "02_train_rm", "training", tmp_path / "x.csv")
    assert path.read_text() == "{not json"  # left as it was
    path.write_text(json.dumps({"02_train_rm": {"training": "x.csv"}}))
    with pytest.raises(ValueError, match="not a results manifest"):
        manifest.read_manifest(tmp_path)
    with pytest.raises(ValueError, match="non-empty"):
        manifest.record_result(tmp_path, "02_train_rm", "", tmp_path / "x.csv")


def _record_many(run_dir, worker):
    for i in range(20):
        manifest.record_result(run_dir, f"nb{worker}", "table", f"{run_dir}/results/{worker}_{i}.csv")


def test_concurrent_writers_lose_no_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), w)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    data = manifest.read_manifest(tmp_path)
    assert [len(data[f"nb{w}"]["table"]) for w in range(2)] == [20, 20]
