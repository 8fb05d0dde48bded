"""Training entry point on the tiny model: every regularizer and mode runs, seeds repeat,
resume equals an uninterrupted run, a NaN loss stops with the step and loss part named."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import toy_pairs
from datasets import Dataset

from rmlib.model.reward_model import load_reward_model
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import last_checkpoint, log_history_frame, train_reward_model


@pytest.fixture(scope="module")
def pairs():
    return toy_pairs("t")


def _config(tmp_path, backbone, **kw):
    base = dict(backbone=backbone, output_dir=str(tmp_path), max_steps=4, logging_steps=1, save_steps=2,
                per_device_train_batch_size=2, learning_rate=1e-3, bf16=False, disable_tqdm=True, seed=0)
    base.update(kw)
    return RMConfig(**base)


def _losses(result):
    return [round(r["loss/total"], 6) for r in result.log_history if "loss/total" in r]


@pytest.mark.parametrize("loss,regularizer,mode", [
    ("bt", "none", "full"), ("bsr", "sft", "full"), ("center", "dpo_noref", "lora"),
    ("bsr", "dpo", "full"), ("bt", "dpo", "lora"), ("hinge", "sft_nll", "topk"), ("logitnorm", "none", "frozen"),
])
def test_every_loss_regularizer_mode_trains(tmp_path, tiny_backbone, pairs, loss, regularizer, mode):
    cfg = _config(tmp_path, tiny_backbone, loss=loss, regularizer=regularizer, mode=mode, top_k_layers=1, lora_r=4)
    res = train_reward_model(cfg, pairs, pairs.select(range(4)))
    frame = log_history_frame(res.log_history)
    for col in ["loss/total", "loss/reg", "rewards/accuracy", "rewards/std", "model/head_norm", "hidden/norm_mean"]:
        assert col in frame.columns and frame[col].notna().all(), col
    assert (frame["loss/reg"] > 0).all() == (regularizer != "none")
    assert 0.0 <= res.metrics["eval_accuracy"] <= 1.0
    loaded = load_reward_model(res.final_dir)
    assert loaded.head_kind == "linear"
    meta = json.loads((res.output_dir / "metrics.json").read_text())
    assert meta["config"]["loss"] == loss and meta["config"]["regularizer"] == regularizer


def test_training_moves_accuracy_on_an_easy_task(tmp_path, tiny_backbone, pairs):
    cfg = _config(tmp_path, tiny_backbone, max_steps=24, learning_rate=3e-3)
    res = train_reward_model(cfg, pairs, pairs)
    assert res.metrics["eval_accuracy"] == 1.0  # the four reply styles are trivially separable


def test_same_seed_same_numbers(tmp_path, tiny_backbone, pairs):
    a = train_reward_model(_config(tmp_path / "a", tiny_backbone, loss="bsr"), pairs, pairs.select(range(4)))
    b = train_reward_model(_config(tmp_path / "b", tiny_backbone, loss="bsr"), pairs, pairs.select(range(4)))
    c = train_reward_model(_config(tmp_path / "c", tiny_backbone, loss="bsr", seed=1), pairs, pairs.select(range(4)))
    assert _losses(a) == _losses(b) and a.metrics["eval_margin"] == b.metrics["eval_margin"]
    assert _losses(a) != _losses(c)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_backbone, pairs):
    full = train_reward_model(_config(tmp_path / "full", tiny_backbone, max_steps=6, regularizer="sft"), pairs)
    part_dir = tmp_path / "part"
    train_reward_model(_config(part_dir, tiny_backbone, max_steps=6, regularizer="sft"), pairs)
    # simulate a kill after step 4: keep only checkpoint-4, as if the run died before step 6
    import shutil
    shutil.rmtree(part_dir / "checkpoint-6")
    shutil.rmtree(part_dir / "final")
    assert last_checkpoint(part_dir).endswith("checkpoint-4")
    resumed = train_reward_model(_config(part_dir, tiny_backbone, max_steps=6, regularizer="sft"), pairs)
    assert resumed.metrics["resumed_from"].endswith("checkpoint-4")
    assert _losses(resumed)[-2:] == _losses(full)[-2:]
    a = load_reward_model(full.final_dir).state_dict()
    b = load_reward_model(resumed.final_dir).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_naming_step_and_part_and_keeps_checkpoint(tmp_path, tiny_backbone, pairs, monkeypatch):
    from rmlib.model import reward_model

    original = reward_model.RewardModel.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] > 3:  # steps 1-3 fine, then NaN rewards
            out.rewards = out.rewards * float("nan")
        return out

    monkeypatch.setattr(reward_model.RewardModel, "forward", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 3.*loss/"):
        train_reward_model(_config(tmp_path, tiny_backbone, max_steps=6), pairs)
    assert last_checkpoint(tmp_path).endswith("checkpoint-2")


@pytest.mark.parametrize("bad,match", [
    (dict(loss="bradley"), "bt"), (dict(loss="bsr", loss_params={"lam": -1.0}), "lam"),
    (dict(regularizer="sft", alpha=1.5), "alpha"), (dict(mode="half"), "topk"),
    (dict(loss="bsr", loss_params={"lambda": 1e-3}), "lam"),
    (dict(loss="bsr", loss_params="{lam: 1e-3}"), "loss_params: not valid JSON"),
    (dict(loss="bsr", loss_params="[0.001]"), "loss_params must be a JSON object"),
])
def test_bad_parameters_fail_at_once_naming_allowed_values(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        RMConfig(output_dir=str(tmp_path), **bad)


def test_loss_params_as_json_text(tmp_path):
    cfg = RMConfig(output_dir=str(tmp_path), loss="bsr", loss_params='{"lam": 0.001, "global_batch": true}')
    assert cfg.loss_params == {"lam": 0.001, "global_batch": True}
    assert RMConfig(output_dir=str(tmp_path), loss_params=None).loss_params == {}


def test_reuse_returns_a_finished_run_without_training(tmp_path, tiny_backbone, pairs, monkeypatch):
    from rmlib.reward import trainer as rm_trainer

    first = train_reward_model(_config(tmp_path, tiny_backbone), pairs, pairs.select(range(4)))
    def retrain(*a, **k):
        raise RuntimeError("retrained")

    monkeypatch.setattr(rm_trainer.RMTrainer, "train", retrain)
    again = train_reward_model(_config(tmp_path, tiny_backbone), pairs, pairs.select(range(4)), reuse=True)
    assert again.metrics == json.loads(json.dumps(first.metrics))
    assert len(again.log_history) == len(first.log_history)
    with pytest.raises(RuntimeError, match="retrained"):  # other data -> not reused
        train_reward_model(_config(tmp_path, tiny_backbone), pairs.select(range(8)), pairs.select(range(4)), reuse=True)


def test_checkpoints_of_another_config_are_set_aside_not_resumed(tmp_path, tiny_backbone, pairs):
    train_reward_model(_config(tmp_path, tiny_backbone, max_steps=2), pairs)
    res = train_reward_model(_config(tmp_path, tiny_backbone, max_steps=2, loss="bsr"), pairs)
    assert res.metrics["resumed_from"] is None
    stale = list(tmp_path.glob("stale-*"))
    assert len(stale) == 1 and (stale[0] / "checkpoint-2").is_dir() and (stale[0] / "final").is_dir()


class TestMarginLoss:
    """GRM's margin baseline: m_i = |chosen_score - rejected_score| per pair, passed by RMTrainer."""

    SCORES = [(5.0, 3.0), (2.0, 2.5), (7.0, 1.0), (4.0, 4.0)]  # m = 2, 0.5, 6, 0

    @pytest.fixture(scope="class")
    def scored(self, pairs):
        rows = [dict(pairs[i], chosen_score=c, rejected_score=r) for i, (c, r) in enumerate(self.SCORES)]
        return Dataset.from_list(rows)

    def test_margin_loss_differs_from_bt_by_the_hand_computed_amount(self, tmp_path, tiny_backbone, scored, tokenizer):
        from rmlib.model.encoding import PairCollator, encode_pairs
        from rmlib.model.reward_model import ModelSpec, build_reward_model
        from rmlib.reward.trainer import RMTrainer

        enc, _ = encode_pairs(scored, tokenizer, max_length=64)
        batch = PairCollator(tokenizer.pad_token_id)(list(enc))
        torch.testing.assert_close(batch["margin"], torch.tensor([2.0, 0.5, 6.0, 0.0]))
        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
        with torch.no_grad():
            r = model(batch["input_ids"], batch["attention_mask"]).rewards.double()
        d = r[:4] - r[4:]
        m = torch.tensor([2.0, 0.5, 6.0, 0.0], dtype=torch.float64)
        expected = (-torch.nn.functional.logsigmoid(d - m)).mean() - (-torch.nn.functional.logsigmoid(d)).mean()
        assert expected > 0.5  # a real difference, not rounding
        values = {}
        for loss in ("bt", "margin"):
            cfg = _config(tmp_path / loss, tiny_backbone, loss=loss)
            trainer = RMTrainer(model=model, args=cfg, loss_spec=cfg.loss_spec)
            with torch.no_grad():
                values[loss] = trainer.compute_loss(model, dict(batch)).item()
        assert values["margin"] - values["bt"] == pytest.approx(expected.item(), abs=1e-5)

    def test_unscored_pairs_raise_naming_the_scores(self, tmp_path, tiny_backbone, pairs):
        cfg = _config(tmp_path, tiny_backbone, loss="margin")
        with pytest.raises(ValueError, match=r"16 of 16 pairs .*chosen_score/rejected_score.*loss_params"):
            train_reward_model(cfg, pairs)
        from rmlib.reward.trainer import per_pair_margins

        with pytest.raises(ValueError, match=r"1 of 2 pairs of this batch"):
            per_pair_margins(cfg.loss_spec, torch.tensor([1.0, float("nan")]), 2)
        const = _config(tmp_path, tiny_backbone, loss="margin", loss_params={"margin": 0.5}).loss_spec
        assert per_pair_margins(const, None, 2) is None  # a constant margin needs no scores (BSR code)

    def test_trains_on_scored_pairs_through_the_cached_path(self, tmp_path, tiny_backbone, scored, monkeypatch):
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path / "cache"))
        cfg = _config(tmp_path / "run", tiny_backbone, loss="margin", mode="topk", top_k_layers=1, max_steps=2)
        res = train_reward_model(cfg, scored)
        frame = log_history_frame(res.log_history)
        assert (frame["loss/reward"] != frame["loss/bt"]).all()
