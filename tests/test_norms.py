"""rmlib.analysis.dispersion: dispersion statistics against hand-built matrices with known answers, the reward
decomposition on a real linear head, hidden-state extraction on the tiny model, and the training
callback (records at the right steps, identical after a resume)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from numpy.testing import assert_allclose

from rmlib.analysis import claims
from rmlib.analysis.dispersion import (
    RECORDS_FILE,
    HiddenStates,
    NormProbeCallback,
    bt_losses,
    check_decomposition,
    dispersion_findings,
    dispersion_statistics,
    dispersion_summary,
    distance_frame,
    effective_rank,
    epoch_table,
    erank_shift_table,
    extract_hidden,
    head_cosines,
    hidden_norm_frame,
    norm_stats,
    overtraining_from_records,
    pair_distance_stats,
    read_records,
    records_frame,
    reward_decomposition,
    skewness,
    spreading_from_records,
    write_records,
)
from rmlib.model.encoding import encode_pairs
from rmlib.model.reward_model import ModelSpec, build_reward_model, make_head
from rmlib.reward.config import RMConfig
from rmlib.reward.trainer import train_reward_model


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core machine: a second intra-op thread only adds contention
    (about 100x slower here). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def orthonormal(rng, n: int, k: int) -> np.ndarray:
    """n x k matrix with orthonormal columns."""
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def rows_with_norms(rng, norms, dim: int = 7) -> np.ndarray:
    """Random directions scaled to the given row norms."""
    u = rng.standard_normal((len(norms), dim))
    return u / np.linalg.norm(u, axis=1, keepdims=True) * np.asarray(norms, dtype=np.float64)[:, None]


def make_pairs(n: int, offset: int = 0) -> Dataset:
    """Hand-made pairs in the normalized schema (id, prompt messages, chosen, rejected)."""
    return Dataset.from_list([
        {"id": f"p{offset + i}",
         "prompt": [{"role": "user", "content": f"Question {offset + i}: what is {i} plus {3 * i}?"}],
         "chosen": f"The answer is {4 * i}." + " Checked twice." * (i % 3),
         "rejected": f"No idea, sorry {i}."}
        for i in range(n)
    ])


class TestEffectiveRank:
    def test_rank_one_matrix_is_one(self):
        rng = np.random.default_rng(0)
        h = np.outer(rng.standard_normal(9), rng.standard_normal(5))
        assert effective_rank(h) == pytest.approx(1.0, abs=1e-12)

    @pytest.mark.parametrize("k", [1, 2, 3, 5])
    def test_k_equal_singular_values_give_k(self, k):
        rng = np.random.default_rng(k)
        h = 7.0 * orthonormal(rng, 12, k) @ orthonormal(rng, 6, k).T  # (12, 6), singular values 7 (k times)
        assert effective_rank(h) == pytest.approx(k, rel=1e-9)

    def test_singular_values_3_and_1(self):
        rng = np.random.default_rng(1)
        h = orthonormal(rng, 5, 2) @ np.diag([3.0, 1.0]) @ orthonormal(rng, 4, 2).T
        expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
        assert effective_rank(h) == pytest.approx(expected, rel=1e-9)

    def test_raw_by_default_center_on_request(self):
        # rows m + a_i e_1: raw matrix has rank 2, centered rows are a multiple of e_1 (rank 1)
        m = np.array([0.0, 5.0, 1.0])
        h = m + np.array([-1.0, 0.0, 2.0, 3.0])[:, None] * np.array([1.0, 0.0, 0.0])
        assert effective_rank(h) > 1.1
        assert effective_rank(h, center=True) == pytest.approx(1.0, abs=1e-12)

    def test_zero_matrix_raises(self):
        with pytest.raises(ValueError, match="zero"):
            effective_rank(np.zeros((3, 4)))


class TestNormStats:
    def test_values_on_known_norms(self):
        h = rows_with_norms(np.random.default_rng(0), [1, 2, 3, 4, 10])
        s = norm_stats(h)
        # mean 4; deviations (-3,-2,-1,0,6): population variance 50/5 = 10
        assert s["mean"] == pytest.approx(4.0)
        assert s["std"] == pytest.approx(math.sqrt(10))
        assert s["cv"] == pytest.approx(math.sqrt(10) / 4)
        # linear interpolation on sorted norms at positions q*(n-1)
        assert [s[k] for k in ("q05", "q25", "q50", "q75", "q95")] == pytest.approx([1.2, 2, 3, 4, 8.8])

    def test_accepts_torch_and_rejects_vectors(self):
        assert norm_stats(torch.ones(4, 9))["mean"] == pytest.approx(3.0)
        with pytest.raises(ValueError, match=r"\(N, H\)"):
            norm_stats(np.ones(5))

    def test_pair_distances_and_skew(self):
        rng = np.random.default_rng(2)
        h_r = rng.standard_normal((4, 6))
        h_c = h_r + rows_with_norms(rng, [1, 1, 1, 4], dim=6)  # distances 1, 1, 1, 4
        s = pair_distance_stats(h_c, h_r)
        assert s["mean"] == pytest.approx(1.75)
        assert s["std"] == pytest.approx(math.sqrt(1.6875))
        # two-point distribution, p = 1/4 at the high value: g1 = (1 - 2p) / sqrt(p (1 - p)) = 2 / sqrt(3)
        assert s["skew"] == pytest.approx(2 / math.sqrt(3))
        assert skewness([5.0, 5.0]) != skewness([5.0, 5.0])  # nan when constant
        assert math.isnan(skewness([]))
        x = np.random.default_rng(3).gamma(2.0, size=200)
        d = x - x.mean()
        assert skewness(x) == pytest.approx(np.mean(d**3) / np.mean(d**2) ** 1.5, rel=1e-12)  # the formula it replaced

    def test_pair_shape_mismatch_raises(self):
        with pytest.raises(ValueError, match="differ in shape"):
            pair_distance_stats(np.ones((3, 2)), np.ones((2, 2)))


class TestDecomposition:
    H = 16

    def test_reconstruction_equals_linear_head_output(self):
        torch.manual_seed(0)
        head = make_head("linear", self.H)
        h = 3 * torch.randn(50, self.H)
        with torch.no_grad():
            rewards = head(h).squeeze(-1)
        frame = reward_decomposition(head.weight[0], h, rewards)
        assert list(frame.columns) == ["w_norm", "h_norm", "cos_psi", "reconstructed", "reward", "abs_error"]
        assert_allclose(frame["reconstructed"], rewards.numpy(), atol=1e-5)
        assert frame["cos_psi"].between(-1, 1).all()
        assert_allclose(frame["h_norm"], h.norm(dim=1).numpy(), rtol=1e-6)
        model = SimpleNamespace(head=head, head_kind="linear")
        assert check_decomposition(model, h, rewards, atol=1e-5)["abs_error"].max() < 1e-5
        with pytest.raises(AssertionError, match="1/50 rows"):
            check_decomposition(model, h, rewards + torch.eye(50)[7], atol=1e-5)

    def test_cosines_of_known_angles(self):
        w = np.array([2.0, 0.0, 0.0])
        h = np.array([[3.0, 0, 0], [-1.0, 0, 0], [0, 4.0, 0], [1.0, 1.0, 0], [0, 0, 0]])
        assert_allclose(head_cosines(w, h), [1, -1, 0, 1 / math.sqrt(2), 0], atol=1e-12)

    def test_mlp_head_raises_naming_the_head(self):
        model = SimpleNamespace(head=make_head("mlp", self.H), head_kind="mlp")
        with pytest.raises(ValueError, match="'mlp'"):
            check_decomposition(model, np.ones((2, self.H)), np.zeros(2))


class TestRecordsFrames:
    RECORDS = [
        {"step": 0, "epoch": 0.0, "epoch_end": False, "w_norm": 1.0, "erank": 3.0, "pair_distances": [1.0, 2.0]},
        {"step": 2, "epoch": 0.5, "epoch_end": False, "w_norm": 1.1, "erank": 2.5, "pair_distances": [1.5, 2.5]},
        {"step": 4, "epoch": 1.0, "epoch_end": True, "w_norm": 1.2, "erank": 2.0, "pair_distances": [2.0, 4.0]},
    ]

    def test_long_and_wide(self):
        long = records_frame(self.RECORDS)
        assert list(long.columns) == ["step", "epoch", "epoch_end", "statistic", "value"]
        assert len(long) == 3 * 2 and set(long["statistic"]) == {"w_norm", "erank"}
        assert long.query("step == 4 and statistic == 'erank'")["value"].item() == 2.0
        wide = records_frame(self.RECORDS, wide=True)
        assert len(wide) == 3 and "pair_distances" not in wide.columns

    def test_distance_frame(self):
        d = distance_frame(self.RECORDS)
        assert list(d.columns) == ["step", "epoch", "epoch_end", "pair", "distance"]
        assert d["distance"].tolist() == [1.0, 2.0, 1.5, 2.5, 2.0, 4.0]
        assert sorted(set(distance_frame(self.RECORDS, epoch_ends_only=True)["step"])) == [0, 4]

    def test_jsonl_roundtrip(self, tmp_path):
        write_records(tmp_path / RECORDS_FILE, self.RECORDS)
        assert read_records(tmp_path / RECORDS_FILE) == self.RECORDS
        assert not [p for p in tmp_path.iterdir() if p.name != RECORDS_FILE]  # no temp file left


# -- the tiny model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_backbone):
    return build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()


@pytest.fixture(scope="module")
def probe(tokenizer):
    encoded, _ = encode_pairs(make_pairs(6, offset=100), tokenizer, max_length=64)
    return encoded


class TestExtractHidden:
    def test_rewards_are_head_of_hidden_and_match_a_direct_forward(self, tiny_model, probe):
        hs = extract_hidden(tiny_model, probe, batch_size=4, bf16=False, progress=False)
        n, hidden_size = len(probe), tiny_model.config.hidden_size
        assert hs.chosen.shape == hs.rejected.shape == (n, hidden_size) and hs.chosen.dtype == np.float32
        with torch.no_grad():
            head = lambda h: tiny_model.head(torch.from_numpy(h)).squeeze(-1).numpy()  # noqa: E731
            assert_allclose(head(hs.chosen), hs.reward_chosen, atol=1e-5)
            assert_allclose(head(hs.rejected), hs.reward_rejected, atol=1e-5)
            for i in range(n):  # one sequence at a time, no padding, no length grouping
                for key, h in (("chosen_ids", hs.chosen), ("rejected_ids", hs.rejected)):
                    seq = torch.tensor([probe[i]["prompt_ids"] + probe[i][key]])
                    out = tiny_model(seq, torch.ones_like(seq))
                    assert_allclose(h[i], out.hidden[0].numpy(), atol=1e-5)
                    assert np.linalg.norm(h[i]) == pytest.approx(float(out.hidden[0].norm()), rel=1e-5)
        check_decomposition(tiny_model, hs.all, hs.rewards, atol=1e-5)

    def test_dispersion_summary_row(self, tiny_model, probe):
        hs = extract_hidden(tiny_model, probe, batch_size=8, bf16=False, progress=False)
        row = dispersion_summary(hs, tiny_model, "val1", name="bt", step=10, epoch=1.0)
        assert list(row)[:5] == ["model", "split", "epoch", "step", "n_pairs"]
        assert row["w_norm"] == pytest.approx(tiny_model.head_weight_norm())
        assert row["h_norm_mean"] == pytest.approx(np.linalg.norm(hs.all, axis=1).mean(), rel=1e-6)
        assert 1.0 <= row["erank"] <= min(hs.all.shape)
        assert row["accuracy"] == np.mean(hs.reward_chosen > hs.reward_rejected)
        long = records_frame([row])
        assert {"model", "split", "statistic", "value"} <= set(long.columns)


# -- the callback ----------------------------------------------------------------------------------
TRAIN_PAIRS = 10  # batch 2 -> 5 steps per epoch: the epoch end (step 5) is off the every-2 grid


def train(backbone, tokenizer, out_dir, max_steps: int, probe) -> NormProbeCallback:
    callback = NormProbeCallback(probe, every_steps=2, batch_size=8)
    config = RMConfig(
        backbone=backbone, output_dir=str(out_dir), max_steps=max_steps, save_steps=3, logging_steps=1,
        per_device_train_batch_size=2, learning_rate=1e-3, bf16=False, max_length=64, disable_tqdm=True,
        # the "killed" run is simulated by max_steps=3: a linear decay would depend on max_steps and
        # the runs would differ; with 1 warmup step (5% of 3 or 6 steps) + constant they do not
        lr_scheduler_type="constant_with_warmup",
    )
    train_reward_model(config, make_pairs(TRAIN_PAIRS), tokenizer=tokenizer, callbacks=[callback])
    return callback


def stats(record: dict) -> dict:
    """The numbers of a record (pair distances unrolled), for pytest.approx."""
    flat = {k: v for k, v in record.items() if k not in ("epoch", "epoch_end", "pair_distances")}
    return flat | {f"d{i}": d for i, d in enumerate(record["pair_distances"])}


@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone, tokenizer, probe, tmp_path_factory):
    out = tmp_path_factory.mktemp("norms_full")
    return out, train(tiny_backbone, tokenizer, out, 6, probe)


class TestNormProbeCallback:
    def test_records_at_start_every_2_steps_and_epoch_end(self, uninterrupted):
        out, cb = uninterrupted
        assert [r["step"] for r in cb.records] == [0, 2, 4, 5, 6]
        assert [r["epoch_end"] for r in cb.records] == [False, False, False, True, False]
        assert cb.records[3]["epoch"] == pytest.approx(1.0)
        assert all(len(r["pair_distances"]) == 6 for r in cb.records)
        assert read_records(out / RECORDS_FILE) == json.loads(json.dumps(cb.records))
        assert [r["step"] for r in read_records(out / "checkpoint-3" / RECORDS_FILE)] == [0, 2]
        assert [r["step"] for r in read_records(out / "checkpoint-6" / RECORDS_FILE)] == [0, 2, 4, 5, 6]
        assert cb.records[-1]["w_norm"] != cb.records[0]["w_norm"]  # it trained

    def test_step_zero_is_the_untrained_model(self, uninterrupted, tiny_model, probe):
        _, cb = uninterrupted
        hs = extract_hidden(tiny_model, probe, bf16=False, progress=False)  # same seed, untrained
        expected = dispersion_statistics(hs, tiny_model)
        assert {k: cb.records[0][k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)

    def test_resume_gives_the_records_of_an_uninterrupted_run(self, uninterrupted, tiny_backbone, tokenizer,
                                                              probe, tmp_path):
        _, full = uninterrupted
        stopped = train(tiny_backbone, tokenizer, tmp_path, 3, probe)
        # stopping at 3 fires on_epoch_end there: a step-3 record reaches the output-dir file but
        # not checkpoint-3, which the resume must use
        assert [r["step"] for r in stopped.records] == [0, 2, 3]
        resumed = train(tiny_backbone, tokenizer, tmp_path, 6, probe)  # a fresh callback, as in a new process
        assert [r["step"] for r in resumed.records] == [r["step"] for r in full.records]
        assert [r["epoch_end"] for r in resumed.records] == [r["epoch_end"] for r in full.records]
        for got, want in zip(resumed.records, full.records):
            assert stats(got) == pytest.approx(stats(want), rel=1e-5, abs=1e-5)
        assert [r["step"] for r in read_records(tmp_path / RECORDS_FILE)] == [0, 2, 4, 5, 6]
        frame = distance_frame(resumed.records, epoch_ends_only=True)
        assert sorted(set(frame["step"])) == [0, 5] and len(frame) == 2 * len(probe)

    def test_checkpoint_at_an_epoch_end_holds_that_record(self, probe, tiny_model, tmp_path):
        # the Trainer's order at the last step of an epoch: on_step_end, on_save, on_epoch_end
        cb = NormProbeCallback(probe, every_steps=4)
        args = SimpleNamespace(output_dir=str(tmp_path), bf16=False)
        state = SimpleNamespace(global_step=0, epoch=0.0, is_world_process_zero=True)
        cb.on_train_begin(args, state, None, model=tiny_model)
        state.global_step, state.epoch = 5, 1.0
        cb.on_step_end(args, state, None, model=tiny_model)
        (tmp_path / "checkpoint-5").mkdir()
        cb.on_save(args, state, None, model=tiny_model)
        cb.on_epoch_end(args, state, None, model=tiny_model)
        saved = read_records(tmp_path / "checkpoint-5" / RECORDS_FILE)
        assert [(r["step"], r["epoch_end"]) for r in saved] == [(0, False), (5, True)]
        assert read_records(tmp_path / RECORDS_FILE) == saved

    def test_rejects_a_raw_probe_and_bad_interval(self, probe):
        with pytest.raises(ValueError, match="encode_pairs"):
            NormProbeCallback(make_pairs(3), every_steps=2)
        with pytest.raises(ValueError, match="every_steps"):
            NormProbeCallback(probe, every_steps=0)

    def test_unwraps_wrapped_models(self, tiny_model, probe):
        # DataParallel stands in for DDP / FSDP (accelerate's extract_model_from_parallel unwraps all
        # of them); torch.compile wraps without compiling until the first call
        cb = NormProbeCallback(probe, every_steps=1)
        for wrapper in (torch.nn.DataParallel(tiny_model), torch.compile(tiny_model)):
            assert cb.measure(wrapper)["w_norm"] == pytest.approx(tiny_model.head_weight_norm())


def test_bt_loss_per_pair_and_in_the_statistics():
    rc, rr = np.array([2.0, -1.0, 0.0, 30.0]), np.array([0.0, 1.0, 0.0, -30.0])
    want = -torch.nn.functional.logsigmoid(torch.tensor(rc - rr)).numpy()
    assert_allclose(bt_losses(rc, rr), want, rtol=1e-12)
    h = HiddenStates(chosen=np.eye(4), rejected=np.eye(4)[::-1].copy(), reward_chosen=rc, reward_rejected=rr)
    row = dispersion_statistics(h)
    assert row["loss"] == pytest.approx(want.mean())
    assert row["loss_sem"] == pytest.approx(want.std(ddof=1) / 2)


@pytest.fixture(scope="module")
def eval_probes(tokenizer):
    return {name: encode_pairs(make_pairs(n, offset=offset), tokenizer, max_length=64)[0]
            for name, n, offset in (("heldout", 5, 200), ("ood", 4, 300))}


@pytest.fixture(scope="module")
def with_eval(tiny_backbone, tokenizer, probe, eval_probes, tmp_path_factory):
    out = tmp_path_factory.mktemp("norms_eval")
    callback = NormProbeCallback(probe, every_steps=2, batch_size=8, eval_probes=eval_probes, erank_rows=8)
    config = RMConfig(backbone=tiny_backbone, output_dir=str(out), max_steps=6, save_steps=3, logging_steps=1,
                      per_device_train_batch_size=2, learning_rate=1e-3, bf16=False, max_length=64, disable_tqdm=True,
                      lr_scheduler_type="constant_with_warmup")
    train_reward_model(config, make_pairs(TRAIN_PAIRS), tokenizer=tokenizer, callbacks=[callback])
    return out, callback


class TestPerEpochTracking:
    def test_eval_sets_are_measured_at_start_epoch_ends_and_the_final_record(self, with_eval):
        out, cb = with_eval
        assert [r["step"] for r in cb.records] == [0, 2, 4, 5, 6]
        has = [("heldout_accuracy" in r, "ood_h_norm_cv" in r) for r in cb.records]
        assert has == [(True, True), (False, False), (False, False), (True, True), (True, True)]
        saved = read_records(out / RECORDS_FILE)
        assert "ood_pair_dist_mean" in saved[-1] and saved[-1]["heldout_n_pairs"] == 5
        for key in ("accuracy", "loss", "h_norm_mean", "h_norm_std", "h_norm_cv", "pair_dist_mean", "reward_mean",
                    "reward_std", "erank"):
            assert all(math.isfinite(cb.records[i][f"heldout_{key}"]) for i in (0, 3, 4)), key
        assert "heldout_w_norm" not in cb.records[0] and cb.records[0]["erank_rows"] == 8
        assert cb.records[0]["ood_erank_rows"] == 8

    def test_step_zero_eval_statistics_are_the_untrained_model(self, with_eval, tiny_model, eval_probes):
        _, cb = with_eval
        for name, encoded in eval_probes.items():
            hs = extract_hidden(tiny_model, encoded, bf16=False, progress=False)
            expected = dispersion_statistics(hs, None, erank_rows=8)
            got = {k: cb.records[0][f"{name}_{k}"] for k in expected if k != "w_norm"}
            assert got == pytest.approx({k: v for k, v in expected.items() if k != "w_norm"}, rel=1e-5, abs=1e-6)

    def test_epoch_table_keeps_step_zero_and_epoch_ends(self, with_eval):
        _, cb = with_eval
        table = epoch_table(cb.records)
        assert table["step"].tolist() == [0, 5] and "pair_distances" not in table.columns
        assert {"accuracy", "heldout_accuracy", "ood_h_norm_cv", "w_norm", "loss", "heldout_loss"} <= set(table.columns)

    def test_bad_eval_probes(self, probe, eval_probes):
        with pytest.raises(ValueError, match="heldout must be an encoded pair dataset"):
            NormProbeCallback(probe, eval_probes={"heldout": make_pairs(3)})
        with pytest.raises(ValueError, match="lowercase letters"):
            NormProbeCallback(probe, eval_probes={"Held-out": eval_probes["heldout"]})
        with pytest.raises(ValueError, match="erank_rows=11 exceeds the 10 hidden states of heldout"):
            NormProbeCallback(probe, eval_probes=eval_probes, erank_rows=11)


def _epoch_records(train_acc, held_acc, held_loss, pair_dist, n=400):
    recs = [{"step": 0, "epoch": 0.0, "epoch_end": False, "accuracy": 0.5, "heldout_accuracy": 0.5,
             "heldout_loss": 0.69, "heldout_loss_sem": 0.01, "heldout_n_pairs": n, "pair_dist_mean": 1.0,
             "h_norm_cv": 0.1}]
    for e, (ta, ha, hl, d) in enumerate(zip(train_acc, held_acc, held_loss, pair_dist), start=1):
        recs.append({"step": 10 * e - 5, "epoch": e - 0.5, "epoch_end": False, "accuracy": 0.0,
                     "pair_dist_mean": 99.0, "h_norm_cv": 0.1})  # mid-epoch records never count
        recs.append({"step": 10 * e, "epoch": float(e), "epoch_end": True, "accuracy": ta, "heldout_accuracy": ha,
                     "heldout_loss": hl, "heldout_loss_sem": 0.02, "heldout_n_pairs": n, "pair_dist_mean": d,
                     "h_norm_cv": 0.1})
    return recs


def test_regimes_from_records_use_the_epoch_ends():
    over = _epoch_records([0.8, 0.93, 0.97], [0.70, 0.66, 0.62], [0.60, 0.65, 0.75], [1.0, 1.3, 1.6])
    regime = overtraining_from_records(over)
    assert regime == claims.overtraining_reached([0.8, 0.93, 0.97], [0.70, 0.66, 0.62], 400,
                                                 heldout_loss=[0.60, 0.65, 0.75], heldout_loss_sem=[0.02] * 3)
    assert regime.reached and "accuracy and loss" in regime.test
    under = _epoch_records([0.6, 0.7, 0.8], [0.60, 0.65, 0.70], [0.68, 0.66, 0.64], [1.0, 1.02, 1.03])
    assert overtraining_from_records(under).reached is False
    assert spreading_from_records(over).reached and spreading_from_records(under).reached is False
    with pytest.raises(ValueError, match="lack 'ood' statistics"):
        overtraining_from_records(over, heldout="ood")


class TestComparingModels:
    def _summary(self, model, split, erank, h_mean):
        return {"model": model, "split": split, "erank": erank, "h_norm_mean": h_mean}

    def test_erank_shift_table_and_findings_follow_the_paper_direction_when_it_holds(self):
        summaries = pd.DataFrame([
            self._summary("bt", "train", 23.34, 10.0), self._summary("bt", "ood", 33.76, 20.0),
            self._summary("bt", "id", 25.0, 12.0),
            self._summary("bsr", "train", 33.45, 10.0), self._summary("bsr", "ood", 33.59, 10.5),
            self._summary("bsr", "id", 33.5, 10.2),
        ])
        shifts = erank_shift_table(summaries).set_index(["model", "split"])
        assert shifts.loc[("bt", "ood"), "shift"] == pytest.approx(10.42)
        assert shifts.loc[("bsr", "ood"), "shift"] == pytest.approx(0.14)
        records = {"bt": [{"pair_dist_mean": 1.0, "pair_dist_std": 1.0}, {"pair_dist_mean": 3.0, "pair_dist_std": 4.0}],
                   "bsr": [{"pair_dist_mean": 1.0, "pair_dist_std": 1.0}, {"pair_dist_mean": 1.5, "pair_dist_std": 1.2}]}
        f = dispersion_findings(records, summaries).set_index(["model", "claim"])
        assert f.loc[("bt", "pair_dist_growth_mean"), "value"] == pytest.approx(3.0)
        assert f.loc[("bsr", "pair_dist_growth_std"), "value"] == pytest.approx(1.2)
        assert f.loc[("bsr", "pair_dist_growth_mean"), "verdict"] == claims.REPRODUCED  # the rule: test_claims.py
        assert f.loc[("bsr", "erank_shift_abs_mean"), "verdict"] == claims.REPRODUCED
        spread_bt = np.std([20.0, 12.0]) / np.mean([20.0, 12.0])
        assert f.loc[("bt", "h_norm_spread_across_splits"), "value"] == pytest.approx(spread_bt)
        assert pd.isna(f.loc[("bt", "erank_shift_abs_mean"), "verdict"])
        with pytest.raises(ValueError, match="no 'train' split"):
            erank_shift_table(summaries[summaries["split"] != "train"])

    def test_hidden_norm_frame(self):
        h = HiddenStates(chosen=np.array([[3.0, 4.0]]), rejected=np.array([[0.0, 2.0]]),
                         reward_chosen=np.zeros(1), reward_rejected=np.zeros(1))
        f = hidden_norm_frame({"a": h}, "bt")
        assert f["h_norm"].tolist() == [5.0, 2.0] and set(f["split"]) == {"a"} and set(f["model"]) == {"bt"}


def test_effective_rank_on_equal_rows_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 32))
    h = HiddenStates(chosen=x[:200], rejected=x[200:], reward_chosen=np.zeros(200), reward_rejected=np.zeros(200))
    small = HiddenStates(chosen=x[:20], rejected=x[20:40], reward_chosen=np.zeros(20), reward_rejected=np.zeros(20))
    full, sub = dispersion_statistics(h), dispersion_statistics(h, erank_rows=40)
    assert sub["erank_rows"] == 40 and full["erank_rows"] == 400
    assert sub["erank"] < full["erank"]  # the same distribution, fewer rows: a lower effective rank
    assert abs(dispersion_statistics(small)["erank"] - sub["erank"]) < 0.1 * sub["erank"]
    with pytest.raises(ValueError, match="erank_rows=41 exceeds the 40"):
        dispersion_statistics(small, erank_rows=41)
    rows = pd.DataFrame([{"model": "bt", "split": "train", "erank": 1.0, "erank_rows": 40},
                         {"model": "bt", "split": "ood", "erank": 2.0, "erank_rows": 400}])
    with pytest.raises(ValueError, match="do not compare"):
        erank_shift_table(rows)
