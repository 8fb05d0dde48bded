"""Reliability (issue 10): kill -9 and resume in real subprocesses (reward-model training, Best-of-N
sampling), same seed -> same results table, NaN/inf losses, atomic outputs, and bad parameters that
fail at once naming the allowed values. The bad-input corpus is in test_bad_inputs.py; RLOO's
kill-and-resume is in test_rloo.py.

The kill tests park the child at a chosen point (a callback that sleeps) and SIGKILL it there, so
the point of death is the same on every run; the kill itself is a real ``kill -9`` of a real
process, with nothing flushed or cleaned up on the way out.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from datasets import Dataset

from rmlib.core.atomic_io import (
    save_figure_atomic,
    write_json_atomic,
    write_table_atomic,
)
from rmlib.pipeline import presets, reproduce
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import last_checkpoint, results_row, train_reward_model

REPLIES = [
    ("Sure, here is a careful answer with details.", "No."),
    ("I can help with that safely.", "Figure it out yourself."),
    ("Here are three options to consider.", "Whatever."),
    ("Let me explain step by step.", "I won't."),
]
PAIR_ROWS = [{"id": f"t:{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}],
              "chosen": REPLIES[i % 4][0], "rejected": REPLIES[i % 4][1]} for i in range(16)]
# 6 optimizer steps of 2 pairs, a checkpoint every 2 steps, a log line every step
BASE = dict(max_steps=6, logging_steps=1, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
            bf16=False, disable_tqdm=True, seed=0)


def _timing(key: str) -> bool:
    """Wall-clock metrics (train_seconds, pairs_per_second, ...): differ between any two runs."""
    return key.endswith(("seconds", "per_second"))


CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pairs():
    return Dataset.from_list(PAIR_ROWS)


def _train(cfg: dict, out: Path, data, **kw):
    return train_reward_model(RMConfig(**cfg, output_dir=str(out)), data, data.select(range(4)), **kw)


# -- real subprocesses, killed with SIGKILL ------------------------------------------------------
def _start_child(code: str, args: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], env=CHILD_ENV, stdout=f,
                                stderr=subprocess.STDOUT, cwd=log.parent)


def _kill_when_parked(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 300) -> None:
    """Wait until the child says it reached its kill point, then SIGKILL it."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the child exited ({proc.returncode}) before its kill point:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child did not reach its kill point in {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


TRAIN_CHILD = r"""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from datasets import Dataset
from transformers import TrainerCallback
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import train_reward_model

args = json.loads(sys.argv[1])
pairs = Dataset.from_list(args["rows"])

class ParkAfterStep(TrainerCallback):
    # on_step_end runs after the optimizer step and before that step's log/checkpoint
    def on_step_end(self, targs, state, control, **kw):
        if state.global_step == args["park_at"]:
            Path(args["marker"]).write_text(str(state.global_step))
            time.sleep(600)

train_reward_model(RMConfig(**args["config"]), pairs, pairs.select(range(4)), callbacks=[ParkAfterStep()])
print("finished without being killed", flush=True)
"""

# "lora" (BSR + GRM's SFT term): the generic Trainer checkpoint path, with adapter weights and the
# LM head; "topk": the same assertions on the top-k mode and its fast path. (Mode "full" is resumed
# in-process in test_train.py.)
KILL_MODES = {
    "lora": dict(mode="lora", loss="bsr", loss_params={"lam": 0.01}, regularizer="sft", lora_r=4),
    "topk": dict(mode="topk", top_k_layers=1, loss="bt"),
}


@pytest.fixture(scope="module", params=list(KILL_MODES))
def killed_run(request, tmp_path_factory, tiny_backbone, pairs):
    """A run SIGKILLed after step 3 (checkpoint-2 on disk, step 3 done but not saved), then resumed
    in this process; and an uninterrupted run of the same config and seed."""
    tmp = tmp_path_factory.mktemp(f"kill_{request.param}")
    cfg = dict(BASE, backbone=tiny_backbone, **KILL_MODES[request.param])
    marker, log = tmp / "parked", tmp / "child.log"
    child = _start_child(TRAIN_CHILD, {"rows": PAIR_ROWS, "config": dict(cfg, output_dir=str(tmp / "run")),
                                       "park_at": 3, "marker": str(marker)}, log)
    reference = _train(cfg, tmp / "reference", pairs)  # computed while the child starts
    _kill_when_parked(child, marker, log)
    run = tmp / "run"
    after_kill = SimpleNamespace(checkpoints=sorted(p.name for p in run.glob("checkpoint-*")),
                                 last=last_checkpoint(run), final=(run / "final").exists(),
                                 metrics=(run / "metrics.json").exists())
    resumed = _train(cfg, run, pairs)
    return SimpleNamespace(mode=request.param, reference=reference, resumed=resumed, after_kill=after_kill)


def _comparable(metrics: dict) -> dict:
    """Metrics without wall-clock timing, resumed_from, and train_loss (checked on its own below)."""
    return {k: v for k, v in metrics.items() if not _timing(k) and k not in ("resumed_from", "train_loss")}


def _step_logs(history):
    """Per-step training logs and evaluation logs, without the run-level summary (timing)."""
    return [r for r in history if "loss" in r or "eval_accuracy" in r]


def test_kill_leaves_the_last_checkpoint_and_no_result(killed_run):
    k = killed_run.after_kill
    assert k.checkpoints == ["checkpoint-2"] and k.last.endswith("checkpoint-2")
    assert not k.final and not k.metrics


def test_resumed_run_ends_like_an_uninterrupted_one(killed_run):
    ref, res = killed_run.reference, killed_run.resumed
    assert res.metrics["resumed_from"].endswith("checkpoint-2") and ref.metrics["resumed_from"] is None
    assert _comparable(res.metrics) == _comparable(ref.metrics)
    assert res.metrics["steps"] == 6 and "eval_accuracy" in res.metrics
    a, b = ref.model.trainable_state_dict(), res.model.trainable_state_dict()
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name  # bit for bit
    assert _step_logs(res.log_history) == _step_logs(ref.log_history)
    for f in sorted(ref.final_dir.glob("*.safetensors")):  # the exported model, byte for byte
        assert (res.final_dir / f.name).read_bytes() == f.read_bytes(), f.name
    m_ref, m_res = (json.loads((r.output_dir / "metrics.json").read_text()) for r in (ref, res))
    for key in ("config", "data", "encode"):
        assert m_res[key] == m_ref[key], key


def test_resumed_train_loss_is_the_mean_over_the_whole_run(killed_run):
    assert killed_run.resumed.metrics["train_loss"] == pytest.approx(killed_run.reference.metrics["train_loss"],
                                                                     rel=1e-9)


def test_checkpoint_cut_short_by_a_kill_is_skipped_on_resume(tmp_path, tiny_backbone, pairs):
    """A kill while the Trainer writes the newest checkpoint's trainer_state.json (the last file it
    writes, not atomically) must not stop the resume: it falls back to the previous checkpoint."""
    cfg = dict(BASE, backbone=tiny_backbone)
    run = tmp_path / "run"
    reference = _train(cfg, run, pairs)  # leaves checkpoints 4 and 6 (save_total_limit 2)
    for p in (run / "final", run / "metrics.json"):
        os.rename(p, tmp_path / p.name)  # as if killed while saving checkpoint-6, before the end:
    state = run / "checkpoint-6" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:40])  # its last file cut short
    resumed = _train(cfg, run, pairs)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-4")
    assert resumed.metrics["eval_margin"] == reference.metrics["eval_margin"]


BON_CHILD = r"""
import json, os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from rmlib.model import generation
from rmlib.model.assets import load_tokenizer

args = json.loads(sys.argv[1])
policy = AutoModelForCausalLM.from_pretrained(args["backbone"], dtype=torch.float32)
tokenizer = load_tokenizer(args["backbone"])
append, calls = generation.append_jsonl, [0]

def append_then_park(path, rows):
    calls[0] += 1
    if calls[0] != args["park_at"]:
        return append(path, rows)
    start = os.path.getsize(path) if os.path.exists(path) else 0
    append(path, rows)
    # keep only the first `fraction` of this batch's bytes: what a write cut short by the kill leaves
    os.truncate(path, start + int((os.path.getsize(path) - start) * args["fraction"]))
    Path(args["marker"]).write_text("parked")
    time.sleep(600)

generation.append_jsonl = append_then_park
generation.sample_responses(policy, tokenizer, args["prompts"], args["ids"], out_path=args["out"], **args["kw"])
print("finished without being killed", flush=True)
"""
BON_PROMPTS = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(3)]
BON_IDS = ["q0", "q1", "q2"]
BON_CASES = {
    # one prompt per batch (n >= batch_size): 6 batches; killed in the middle of batch 4's rows
    "killed mid-line": dict(kw=dict(n=4, batch_size=2), park_at=4, fraction=0.6),
    # two prompts per batch (n < batch_size): 2 batches; killed before batch 2 reached the file
    "killed between batches": dict(kw=dict(n=2, batch_size=4), park_at=2, fraction=0.0),
}


@pytest.mark.parametrize("case", list(BON_CASES))
def test_bon_sampling_killed_and_resumed_equals_an_uninterrupted_run(case, tmp_path, tiny_backbone):
    from transformers import AutoModelForCausalLM

    from rmlib.model.assets import load_tokenizer
    from rmlib.model.generation import read_samples, sample_responses

    c = BON_CASES[case]
    kw = dict(c["kw"], max_new_tokens=8, bf16=False, progress=False)
    killed, marker, log = tmp_path / "killed.jsonl", tmp_path / "parked", tmp_path / "child.log"
    child = _start_child(BON_CHILD, {"backbone": tiny_backbone, "prompts": BON_PROMPTS, "ids": BON_IDS,
                                     "out": str(killed), "kw": kw, "park_at": c["park_at"],
                                     "fraction": c["fraction"], "marker": str(marker)}, log)
    policy = AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32)
    tokenizer = load_tokenizer(tiny_backbone)
    fresh_path = tmp_path / "fresh.jsonl"
    fresh = sample_responses(policy, tokenizer, BON_PROMPTS, BON_IDS, out_path=fresh_path, **kw)
    _kill_when_parked(child, marker, log)

    data = killed.read_bytes()
    assert data and len(read_samples(killed)) < len(fresh)  # killed mid-file
    assert data.endswith(b"\n") == (c["fraction"] == 0.0)  # mid-line: a partial last line is on disk
    resumed = sample_responses(policy, tokenizer, BON_PROMPTS, BON_IDS, out_path=killed, **kw)
    pd.testing.assert_frame_equal(resumed, fresh)
    assert killed.read_bytes() == fresh_path.read_bytes()
    meta = lambda p: json.loads(p.with_name(p.name + ".meta.json").read_text())  # noqa: E731
    assert meta(killed) == meta(fresh_path)


# -- determinism -----------------------------------------------------------------------------------
def test_same_seed_gives_the_same_results_table(tmp_path, tiny_backbone):
    """Two runs with one seed give the same results table (every column but wall-clock timing);
    another seed does not. Two over-long pairs check the truncation counts saved with the run."""
    long = " ".join(f"w{i}" for i in range(200))
    data = Dataset.from_list(PAIR_ROWS + [
        {"id": "long:0", "prompt": [{"role": "user", "content": long}], "chosen": "Yes.", "rejected": "No."},
        {"id": "long:1", "prompt": [{"role": "user", "content": "q?"}], "chosen": long, "rejected": "No."}])
    cfg = dict(BASE, backbone=tiny_backbone, max_steps=4, save_steps=100, loss="bsr", max_length=64)
    tables = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        res = _train(dict(cfg, seed=seed), tmp_path / name, data)
        row = results_row(res, "run")
        tables[name] = row.drop(columns=[c for c in row.columns if _timing(c)])
        write_table_atomic(tmp_path / f"{name}.csv", tables[name])
        encode = json.loads((res.output_dir / "metrics.json").read_text())["encode"]
        assert encode == {"pairs": 18, "prompt_truncated": 1, "reply_truncated": 1,
                          "dropped_identical_after_truncation": []}
    pd.testing.assert_frame_equal(tables["a"], tables["b"], check_exact=True)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert tables["a"]["eval_margin"][0] != tables["c"]["eval_margin"][0]
    assert tables["a"]["train_loss"][0] != tables["c"]["train_loss"][0]


# -- NaN / inf losses --------------------------------------------------------------------------------
def _poison_logps_after(monkeypatch, n_calls: int, value: float):
    """Make RewardModel.forward return ``value`` log-probs from its (n_calls + 1)-th call on."""
    from rmlib.model import reward_model

    original, calls = reward_model.RewardModel.forward, {"n": 0}

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > n_calls and out.logps is not None:
            out.logps = torch.full_like(out.logps, value)
        return out

    monkeypatch.setattr(reward_model.RewardModel, "forward", poisoned)


def test_inf_regularizer_stops_naming_step_and_part_and_the_run_resumes(tmp_path, tiny_backbone, pairs,
                                                                        monkeypatch):
    cfg = dict(BASE, backbone=tiny_backbone, regularizer="sft")
    _poison_logps_after(monkeypatch, 3, -math.inf)  # steps 1-3 fine; step 4: log pi(y_c) = -inf, GRM term +inf
    with pytest.raises(FloatingPointError) as e:
        _train(cfg, tmp_path, pairs)
    msg = str(e.value)
    assert "step 3" in msg and "loss/reg=" in msg and "inf" in msg, msg
    assert "loss/bt" not in msg and "loss/reward" not in msg, msg  # only the parts that went bad
    ckpt = Path(last_checkpoint(tmp_path))
    assert ckpt.name == "checkpoint-2" and not (tmp_path / "final").exists() and not (tmp_path / "metrics.json").exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "trainable.safetensors").values())
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()  # the cause is fixed: the same command resumes from the last good checkpoint
    res = _train(cfg, tmp_path, pairs)
    assert res.metrics["resumed_from"].endswith("checkpoint-2") and res.metrics["steps"] == 6
    assert math.isfinite(res.metrics["eval_margin"])


def test_failed_run_leaves_the_previous_results_intact(tmp_path, tiny_backbone, pairs, monkeypatch):
    """A finished run, then a run of another config in the same folder that dies at step 4: the
    finished run's metrics.json and exported model are still there, byte for byte."""
    cfg = dict(BASE, backbone=tiny_backbone, regularizer="sft", max_steps=2)
    _train(cfg, tmp_path, pairs)
    before = {p.name: p.read_bytes() for p in [tmp_path / "metrics.json", *(tmp_path / "final").iterdir()]}
    _poison_logps_after(monkeypatch, 3, math.nan)
    with pytest.raises(FloatingPointError, match="step 3"):
        _train(dict(cfg, max_steps=6, loss="center"), tmp_path, pairs)
    for name, data in before.items():
        assert any(p.read_bytes() == data for p in tmp_path.rglob(name)), f"{name} lost or changed"
    assert not list(tmp_path.rglob("*.tmp"))


# -- atomic outputs --------------------------------------------------------------------------------
def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_table_write_failing_mid_file_keeps_the_previous_table(tmp_path):
    path = tmp_path / "results.csv"
    write_table_atomic(path, pd.DataFrame({"run": ["old"], "acc": [0.6]}))
    before = path.read_bytes()
    partial = []

    class FailsToPrint:
        def __str__(self):
            partial.extend(p.stat().st_size for p in _temp_files(tmp_path))
            raise RuntimeError("disk went away")

    rows = 150_000  # pandas writes 50,000-row chunks: two chunks reach the temp file first
    frame = pd.DataFrame({"i": range(rows), "x": ["v"] * (rows - 1) + [FailsToPrint()]})
    with pytest.raises(RuntimeError, match="disk went away"):
        write_table_atomic(path, frame)
    assert partial and partial[0] > 0  # it really failed half-way through writing
    assert path.read_bytes() == before and not _temp_files(tmp_path)


def test_markdown_table_needs_no_extra_package_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "results.md"
    frame = pd.DataFrame({"run": ["bt", "bsr|x"], "acc": [0.6, float("nan")]})
    write_table_atomic(path, frame)
    assert path.read_text() == "| run | acc |\n|---|---|\n| bt | 0.6 |\n| bsr\\|x |  |\n"
    before = path.read_bytes()
    monkeypatch.setattr("rmlib.core.atomic_io.os.replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space"):
        write_table_atomic(path, frame.assign(acc=[0.7, 0.8]))
    assert path.read_bytes() == before and not _temp_files(tmp_path)


@pytest.mark.parametrize("fmt", ["png", "pdf"])
def test_figure_whose_drawing_fails_keeps_the_previous_figure(tmp_path, fmt):
    import matplotlib.pyplot as plt
    from matplotlib.artist import Artist

    path = tmp_path / f"curves.{fmt}"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    save_figure_atomic(fig, path)
    before = path.read_bytes()
    assert len(before) > 1000

    class Explodes(Artist):
        draws = 0

        def draw(self, renderer):
            Explodes.draws += 1
            if Explodes.draws > 1:  # the first draw only measures the tight bounding box
                raise RuntimeError("renderer died")

    fig.add_artist(Explodes())
    with pytest.raises(RuntimeError, match="renderer died"):
        save_figure_atomic(fig, path)
    plt.close(fig)
    assert path.read_bytes() == before and not _temp_files(tmp_path)


def test_json_write_failing_keeps_the_previous_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"acc": 0.6})
    before = path.read_bytes()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot print")

    with pytest.raises(RuntimeError, match="cannot print"):
        write_json_atomic(path, {"acc": 0.7, "bad": Unprintable()})
    assert path.read_bytes() == before and not _temp_files(tmp_path)


def test_atomic_files_get_normal_permissions(tmp_path):
    """The temp file comes from mkstemp (mode 0600); the result must be readable like any new file."""
    path = write_table_atomic(tmp_path / "t.csv", pd.DataFrame({"a": [1]}))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- bad parameters fail at once, naming the allowed values ----------------------------------------
def _allowed(names):
    return lambda msg: all(str(n) in msg for n in names)


@pytest.mark.parametrize("kw, must_name", [
    (dict(loss="bradley"), ["'bradley'", "bt", "bsr", "center", "margin", "label_smoothing", "hinge", "logitnorm", "dr"]),
    (dict(regularizer="kl"), ["'kl'", "none", "sft", "sft_nll", "dpo_noref", "dpo"]),
    (dict(loss="bsr", loss_params={"lam": -0.1}), ["lam", "-0.1", ">= 0"]),
    (dict(loss="bsr", loss_params={"lambda": 1e-3}), ["'lambda'", "'lam'"]),
    (dict(loss="bt", loss_params={"lam": 1e-3}), ["'lam'", "'bt'"]),
    (dict(regularizer="sft", alpha=-0.01), ["alpha", "-0.01", "[0, 1]"]),
    (dict(regularizer="sft", alpha=1.5), ["alpha", "1.5", "[0, 1]"]),
    (dict(regularizer="sft", alpha=float("nan")), ["alpha", "nan", "[0, 1]"]),
    (dict(regularizer="sft", beta=0.0), ["beta", "> 0"]),
    (dict(mode="half"), ["'half'", "full", "lora", "topk", "frozen"]),
    (dict(head="deep"), ["'deep'", "linear", "mlp"]),
])
def test_bad_training_parameter_fails_when_the_config_is_built(tmp_path, kw, must_name):
    with pytest.raises(ValueError) as e:
        RMConfig(output_dir=str(tmp_path / "run"), **kw)
    assert _allowed(must_name)(str(e.value)), str(e.value)
    assert not (tmp_path / "run").exists()


def test_missing_model_path_fails_before_any_training(tmp_path, pairs):
    from rmlib.model.assets import ModelNotFoundError

    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError) as e:
        _train(dict(BASE, backbone=str(missing)), tmp_path / "run", pairs)
    msg = str(e.value)
    assert str(missing) in msg and "smollm2-135m-instruct" in msg and "hub id" in msg and ".gguf" in msg, msg
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_missing_model_path_fails_when_the_config_is_built(tmp_path):
    from rmlib.model.assets import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        RMConfig(output_dir=str(tmp_path / "run"), backbone=str(tmp_path / "no_such_model"))


@pytest.mark.parametrize("section, key", [("notebooks", "lamda"), ("common", "sede")])
def test_preset_key_the_notebook_does_not_accept_fails_before_anything_runs(tmp_path, monkeypatch, capsys,
                                                                              section, key):
    import papermill as pm

    params = tmp_path / "params"
    params.mkdir()
    preset = {"requires": "cpu", "common": {"seed": 0}, "notebooks": {"02_train_rm": {"n_train": 4}}}
    (preset["common"] if section == "common" else preset["notebooks"]["02_train_rm"])[key] = 0.1
    (params / "typo.yaml").write_text(json.dumps(preset))  # JSON is YAML
    monkeypatch.setattr(presets, "PARAMS_DIR", params)
    monkeypatch.setattr(pm, "execute_notebook", lambda *a, **k: pytest.fail("a notebook was started"))
    out = tmp_path / "out"
    assert reproduce.main(["--preset", "typo", "--only", "02_train_rm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    accepted = pm.inspect_notebook(str(presets.NOTEBOOK_DIR / "02_train_rm.ipynb"))
    assert f"'{key}'" in err and "02_train_rm" in err and "typo" in err, err
    assert all(name in err for name in accepted), err  # every accepted parameter is listed
    assert not out.exists()
