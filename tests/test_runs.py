"""Run folders (rmlib.core.runs): checkpoint steps, the completeness filter of each run kind (reward
model, RLOO), the stale set-aside, finished runs, and the records callback. Folders are laid out by
hand as a kill leaves them; nothing is trained here (the RLOO kill-and-resume tests are in
test_rloo.py, the reward-model ones in test_reliability.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.trainer_utils import get_last_checkpoint

from rmlib.core import runs
from rmlib.reward import trainer as rm_trainer
from rmlib.reward.config import RMConfig
from rmlib.rloo import config as rloo_config
from rmlib.rloo import trainer as rloo_trainer
from rmlib.rloo.tracker import RECORDS_FILE

STATE = json.dumps({"global_step": 1, "log_history": []}, indent=2)


def _checkpoint(out: Path, step: int, files=(), state: str | None = STATE, identity=None) -> Path:
    """A ``checkpoint-<step>`` folder holding ``files`` (dummy bytes), ``trainer_state.json`` with
    the text ``state`` (None: no such file) and, unless None, the identity file ``(name, content)``."""
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in files:
        (ckpt / name).write_bytes(b"weights")
    if state is not None:
        (ckpt / "trainer_state.json").write_text(state)
    if identity is not None:
        (ckpt / identity[0]).write_text(json.dumps(identity[1]))
    return ckpt


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- checkpoint steps ------------------------------------------------------------------------------
def test_checkpoint_step_names_folders_only(tmp_path):
    assert runs.checkpoint_step(_checkpoint(tmp_path, 12)) == 12
    (tmp_path / "checkpoint-3").write_text("a file")
    (tmp_path / "checkpoint-x").mkdir()
    (tmp_path / "stale-checkpoint-4").mkdir()
    for name in ("checkpoint-3", "checkpoint-x", "stale-checkpoint-4", "checkpoint-5"):  # 5: does not exist
        assert runs.checkpoint_step(tmp_path / name) is None, name
    assert runs.checkpoint_step(str(tmp_path / "checkpoint-12")) == 12


def test_checkpoints_newest_first_by_number(tmp_path):
    for step in (2, 10, 9):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-11").write_text("a file")
    assert [p.name for p in runs.checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-9", "checkpoint-2"]
    assert runs.checkpoints(tmp_path / "missing") == []


# -- the completeness filter -----------------------------------------------------------------------
def test_reward_model_checkpoints_cut_short_are_skipped_with_a_warning(tmp_path, caplog):
    weights = rm_trainer.TRAINABLE_WEIGHTS
    _checkpoint(tmp_path, 2, [weights])
    _checkpoint(tmp_path, 4, [])  # killed before the weights
    _checkpoint(tmp_path, 6, [weights], state=STATE[: len(STATE) // 2])  # killed while writing trainer_state.json
    _checkpoint(tmp_path, 8, [weights], state=None)  # killed before trainer_state.json
    _checkpoint(tmp_path, 10, [weights], state="")  # created, not yet written
    assert get_last_checkpoint(tmp_path).endswith("checkpoint-10")  # the newest folder, whatever it holds
    with caplog.at_level(logging.WARNING, logger="rmlib.core.runs"):
        assert rm_trainer.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4
    for step, gap in ((10, "trainer_state.json"), (8, "trainer_state.json"), (6, "trainer_state.json"),
                      (4, weights)):
        assert any(f"checkpoint-{step} is incomplete" in w and gap in w for w in warned), (step, warned)


def test_reward_model_without_a_complete_checkpoint(tmp_path):
    assert rm_trainer.last_checkpoint(tmp_path / "missing") is None
    assert rm_trainer.last_checkpoint(tmp_path) is None
    _checkpoint(tmp_path, 2, [], state=None)
    assert rm_trainer.last_checkpoint(tmp_path) is None


@pytest.mark.parametrize("weights", ["adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json"])
def test_rloo_checkpoint_needs_policy_weights_and_records(tmp_path, weights):
    _checkpoint(tmp_path, 1, [weights, RECORDS_FILE])
    _checkpoint(tmp_path, 2, [RECORDS_FILE])  # no policy weights
    _checkpoint(tmp_path, 3, [weights])  # no records: killed before the tracker's on_save
    _checkpoint(tmp_path, 4, [weights, RECORDS_FILE], state=STATE[:10])  # trainer_state.json cut short
    _checkpoint(tmp_path, 5, [rm_trainer.TRAINABLE_WEIGHTS, RECORDS_FILE])  # a reward model's weights
    assert rloo_trainer.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    assert runs.checkpoint_gaps(tmp_path / "checkpoint-1", rloo_trainer.CHECKPOINT_FILES) == []
    assert runs.checkpoint_gaps(tmp_path / "checkpoint-3", rloo_trainer.CHECKPOINT_FILES) == [f"no {RECORDS_FILE}"]
    assert runs.checkpoint_gaps(tmp_path / "checkpoint-2", rloo_trainer.CHECKPOINT_FILES) == [
        "no adapter_model.safetensors or model.safetensors or model.safetensors.index.json"]


def test_checkpoint_gaps_lists_every_gap(tmp_path):
    ckpt = _checkpoint(tmp_path, 1, ["a"], state=None)
    assert runs.checkpoint_gaps(ckpt, ["a", "b", ("c", "d")]) == [
        "trainer_state.json missing or unreadable", "no b", "no c or d"]
    assert runs.checkpoint_gaps(ckpt, []) == ["trainer_state.json missing or unreadable"]


# -- the stale set-aside ---------------------------------------------------------------------------
MINE, OTHER = {"config": {"beta": 0.05}}, {"config": {"beta": 0.1}}


def _rloo_folder(out: Path, result_identity=MINE) -> None:
    files = ["adapter_model.safetensors", RECORDS_FILE]
    _checkpoint(out, 1, files, identity=(rloo_config.CONFIG_FILE, MINE))
    _checkpoint(out, 2, files, identity=(rloo_config.CONFIG_FILE, OTHER))
    _checkpoint(out, 3, files)  # cut short before its identity was written
    (_checkpoint(out, 4, files) / rloo_config.CONFIG_FILE).write_text("{")  # unreadable identity
    (out / "final").mkdir()
    (out / "final" / "adapter_model.safetensors").write_bytes(b"final")
    (out / RECORDS_FILE).write_text('{"step": 0}\n')
    (out / rloo_config.RESULT_FILE).write_text(json.dumps({"identity": result_identity}))


def test_set_aside_moves_other_runs_and_deletes_nothing(tmp_path):
    _rloo_folder(tmp_path, result_identity=OTHER)
    before = _tree(tmp_path)
    rloo_trainer._set_aside_stale(tmp_path, MINE)
    (stale,) = tmp_path.glob("stale-*")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", stale.name]
    assert sorted(p.name for p in stale.iterdir()) == sorted(
        ["checkpoint-2", "checkpoint-3", "checkpoint-4", "final", RECORDS_FILE, rloo_config.RESULT_FILE])
    after = {k.removeprefix(stale.name + "/"): v for k, v in _tree(tmp_path).items()}
    assert after == before  # every file kept, byte for byte
    assert rloo_trainer.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")


def test_set_aside_leaves_a_folder_of_the_same_run_alone(tmp_path):
    files = ["adapter_model.safetensors", RECORDS_FILE]
    for step in (1, 2):
        _checkpoint(tmp_path, step, files, identity=(rloo_config.CONFIG_FILE, MINE))
    (tmp_path / "final").mkdir()
    (tmp_path / rloo_config.RESULT_FILE).write_text(json.dumps({"identity": MINE}))
    before = _tree(tmp_path)
    assert runs.set_aside_stale(tmp_path, MINE, rloo_config.CONFIG_FILE, result=(rloo_config.RESULT_FILE, "identity"),
                                outputs=("final", rloo_config.RESULT_FILE)) is None
    assert _tree(tmp_path) == before and not list(tmp_path.glob("stale-*"))
    assert runs.set_aside_stale(tmp_path / "missing", MINE, rloo_config.CONFIG_FILE) is None


def test_set_aside_of_a_result_alone_and_twice_in_one_second(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.time, "strftime", lambda fmt: "20250101-000000")
    for identity in (OTHER, {"config": {"beta": 0.2}}):
        (tmp_path / "final").mkdir()
        (tmp_path / rloo_config.RESULT_FILE).write_text(json.dumps({"identity": identity}))
        runs.set_aside_stale(tmp_path, MINE, rloo_config.CONFIG_FILE, result=(rloo_config.RESULT_FILE, "identity"),
                             outputs=("final", rloo_config.RESULT_FILE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale-20250101-000000", "stale-20250101-000000-1"]
    got = [json.loads((tmp_path / name / rloo_config.RESULT_FILE).read_text())["identity"]
           for name in ("stale-20250101-000000", "stale-20250101-000000-1")]
    assert got == [OTHER, {"config": {"beta": 0.2}}]


def test_reward_model_set_aside_by_config(tmp_path):
    config = RMConfig(output_dir=str(tmp_path), max_steps=2)
    mine = rm_trainer._jsonable(config.summary())
    other = rm_trainer._jsonable(RMConfig(output_dir=str(tmp_path), max_steps=2, loss="bsr").summary())
    weights = [rm_trainer.TRAINABLE_WEIGHTS]
    _checkpoint(tmp_path, 2, weights, identity=(rm_trainer.CONFIG_FILE, mine))
    _checkpoint(tmp_path, 4, weights, identity=(rm_trainer.CONFIG_FILE, other))
    (tmp_path / "final").mkdir()
    (tmp_path / rm_trainer.RESULT_FILE).write_text(json.dumps({"config": other}))
    rm_trainer._set_aside_stale_checkpoints(config)
    (stale,) = tmp_path.glob("stale-*")
    assert sorted(p.name for p in stale.iterdir()) == ["checkpoint-4", "final", rm_trainer.RESULT_FILE]
    assert rm_trainer.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


# -- finished runs ---------------------------------------------------------------------------------
def test_finished_result_needs_its_files_and_equal_identity(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"identity": MINE, "data": 1, "metrics": {"steps": 3}}))
    assert runs.finished_result(tmp_path, "result.json", {"identity": MINE}, needs=("final",)) is None
    (tmp_path / "final").mkdir()
    meta = runs.finished_result(tmp_path, "result.json", {"identity": MINE}, needs=("final",))
    assert meta["metrics"] == {"steps": 3}
    assert runs.finished_result(tmp_path, "result.json", {"identity": MINE, "data": 2}) is None
    assert runs.finished_result(tmp_path, "result.json", {"identity": OTHER}) is None
    assert runs.finished_result(tmp_path, "missing.json", {}) is None


# -- the records callback --------------------------------------------------------------------------
class StepRecords(runs.RecordsCallback):
    filename = "steps.jsonl"
    label = "step records"

    def _record(self, args, state, model) -> None:
        self.records.append({"step": state.global_step, "model": model})
        self._write(args, state, self._path(args))


def test_records_callback_saves_into_checkpoints_and_resumes_from_them(tmp_path, caplog):
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=0, is_world_process_zero=True)
    cb = StepRecords()
    cb.on_train_begin(args, state, None, model="m0")
    for step in (2, 3):
        state.global_step = step
        cb._record(args, state, f"m{step}")
        if step == 2:
            (tmp_path / "checkpoint-2").mkdir()
            cb.on_save(args, state, None)
    assert cb._has(3) and not cb._has(2)
    cb.on_save(args, state, None)  # no checkpoint-3 folder: nothing written there
    assert not (tmp_path / "checkpoint-3").exists()
    assert [r["step"] for r in runs.read_records(tmp_path / "steps.jsonl")] == [0, 2, 3]
    assert [r["step"] for r in runs.read_records(tmp_path / "checkpoint-2" / "steps.jsonl")] == [0, 2]

    resumed = StepRecords()  # a new process, resuming from checkpoint-2
    resumed.on_train_begin(args, SimpleNamespace(global_step=2, is_world_process_zero=True), None)
    assert resumed.records == [{"step": 0, "model": "m0"}, {"step": 2, "model": "m2"}]
    assert runs.read_records(tmp_path / "steps.jsonl") == resumed.records  # the newer record dropped

    other = tmp_path / "other"
    with caplog.at_level(logging.WARNING, logger="rmlib.core.runs"):
        StepRecords().on_train_begin(SimpleNamespace(output_dir=str(other)),
                                     SimpleNamespace(global_step=4, is_world_process_zero=False), None)
    assert "step records: resuming at step 4 but no steps.jsonl found" in caplog.text
    assert not other.exists()  # only the main process writes


def test_records_roundtrip_keeps_non_ascii_text(tmp_path):
    records = [{"step": 0, "completion": "Grüße, 你好"}, {"step": 1, "value": 0.5}]
    runs.write_records(tmp_path / "r.jsonl", records)
    assert runs.read_records(tmp_path / "r.jsonl") == records
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # no temp file left
