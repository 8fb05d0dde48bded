"""RLOO against learned RMs (rmlib.rloo.trainer): reward-function wrapper, prompt sets, tracking,
kill-and-resume with a real SIGKILL, determinism, bad parameters. Tiny random models only."""

from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file

from rmlib import plots
from rmlib.analysis import rloo_curves
from rmlib.model import generation, logprobs, reward_model
from rmlib.model.reward_model import (
    ModelSpec,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from rmlib.rloo import config as rloo_config
from rmlib.rloo import prompts as rloo_prompts
from rmlib.rloo import reward_fn, tracker
from rmlib.rloo import trainer as rloo_trainer

# a chat template unlike SmolLM2's, so a wrapper using the policy's template would score differently
RM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Human:\n{{ m['content'] }}\n"
    "{% else %}### Bot:\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Bot:\n{% endif %}"
)
CANDIDATES = [{"source": "toy", "text": f"Question {i}: how do I {w}?"}
              for i, w in enumerate(["cook rice", "fix a bike", "learn chess", "write a poem", "plant a tree",
                                     "tie a knot", "bake bread", "swim faster", "sleep well", "save money",
                                     "paint a wall", "read more", "run longer", "sing better"])]


def _save_rm(path: Path, tokenizer, backbone: str, head: str, seed: int, template: str | None = None) -> str:
    model = build_reward_model(ModelSpec(backbone=backbone, head=head, mode="full"),
                               lm=make_tiny_lm(tokenizer, seed=seed), seed=seed)
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    save_reward_model(model, path, tok)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer, tiny_backbone):
    root = tmp_path_factory.mktemp("rloo_assets")
    return {
        "policy": tiny_backbone,
        "proxy": _save_rm(root / "proxy", tokenizer, tiny_backbone, "linear", seed=1),
        "gold": _save_rm(root / "gold", tokenizer, tiny_backbone, "mlp", seed=2, template=RM_TEMPLATE),
        "prompts": rloo_prompts.split_prompts(CANDIDATES, n_train=6, n_eval=3, seed=0),
        "root": root,
    }


def _config(assets, out, **kw) -> rloo_config.RLOORunConfig:
    base = dict(output_dir=str(out), policy=assets["policy"], proxy_rm=assets["proxy"], gold_rm=assets["gold"],
                mode="lora", lora_r=4, lora_alpha=8, learning_rate=5e-2, prompts_per_step=2, max_steps=3,
                max_completion_length=6, track_every=2, save_steps=1, eval_samples_per_prompt=2,
                eval_batch_size=4, rm_max_length=128, rm_batch_size=4, bf16=True, use_cpu=True, seed=0)
    base.update(kw)
    return rloo_config.RLOORunConfig(**base)


@pytest.fixture(scope="module")
def run_a(assets, tmp_path_factory):
    """An uninterrupted tiny run: 3 steps, a checkpoint after each, tracked at steps 0, 2 and 3 (the last)."""
    out = tmp_path_factory.mktemp("run_a")
    config = _config(assets, out)
    return config, rloo_trainer.train_rloo(config, assets["prompts"], progress=False)


# -- prompts ---------------------------------------------------------------------------------------
class TestPrompts:
    def test_split_is_deterministic_disjoint_and_eval_stable(self):
        cands = CANDIDATES + [{"source": "other", "text": CANDIDATES[0]["text"] + "  "}]  # a duplicate
        a = rloo_prompts.split_prompts(cands, n_train=5, n_eval=4, seed=3, exclude=[CANDIDATES[1]["text"]])
        b = rloo_prompts.split_prompts(list(reversed(cands)), n_train=5, n_eval=4, seed=3, exclude=[CANDIDATES[1]["text"]])
        assert [p["text"] for p in a.train] == [p["text"] for p in b.train]  # input order does not matter...
        assert [p["text"] for p in a.eval] == [p["text"] for p in b.eval]
        texts_train, texts_eval = {p["text"] for p in a.train}, {p["text"] for p in a.eval}
        assert not texts_train & texts_eval and len(texts_train) == 5 and len(texts_eval) == 4
        assert CANDIDATES[1]["text"] not in texts_train | texts_eval
        assert a.report["duplicates"] == 1 and a.report["excluded"] == 1 and a.report["usable"] == 13
        more = rloo_prompts.split_prompts(cands, n_train=8, n_eval=4, seed=3, exclude=[CANDIDATES[1]["text"]])
        assert [p["prompt_id"] for p in more.eval] == [p["prompt_id"] for p in a.eval]  # eval fixed
        assert [p["prompt_id"] for p in more.train[:5]] == [p["prompt_id"] for p in a.train]
        other = rloo_prompts.split_prompts(cands, n_train=5, n_eval=4, seed=4)
        assert [p["text"] for p in other.eval] != [p["text"] for p in a.eval]
        assert a.digest() != other.digest() and a.digest() == b.digest()
        assert a.train[0]["prompt"] == [{"role": "user", "content": a.train[0]["text"]}]

    def test_exclusion_reads_texts_conversations_and_prompt_keys(self):
        from rmlib.analysis.synthetic_gold import prompt_key

        convo = [{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "More?"}]
        got = rloo_prompts.exclusion_texts(["plain text ", convo, prompt_key([{"role": "user", "content": "keyed"}]),
                                    "[[not json"])
        assert got == {"plain text", "Hi there", "keyed", "[[not json"}

    def test_long_prompts_dropped_and_counted(self, tokenizer):
        long = [{"source": "toy", "text": "word " * 300}]
        sets = rloo_prompts.split_prompts(CANDIDATES + long, n_train=3, n_eval=2, tokenizer=tokenizer, max_prompt_tokens=64)
        assert sets.report["too_long"] == 1
        assert all(len(p["text"]) < 100 for p in sets.train + sets.eval)

    def test_too_few_prompts_and_bad_counts(self):
        with pytest.raises(ValueError, match=r"n_train=20 \+ n_eval=5 exceeds the 14"):
            rloo_prompts.split_prompts(CANDIDATES, n_train=20, n_eval=5)
        with pytest.raises(ValueError, match="n_eval must be an integer >= 1"):
            rloo_prompts.split_prompts(CANDIDATES, n_train=2, n_eval=0)
        with pytest.raises(ValueError, match="allowed: alpaca_eval, hh-rlhf"):
            rloo_prompts.prompt_candidates(["ultrafeedback"])

    def test_real_hh_prompts_exclude_rm_training_prompts(self, hh_pairs):
        rm_train = hh_pairs.select(range(200))
        excluded = rloo_prompts.rm_training_prompts(rm_train)
        sets = rloo_prompts.build_prompt_sets(n_train=300, n_eval=50, seed=0, sources=["hh-rlhf"], exclude=excluded)
        assert sets.report["excluded"] == len(excluded) > 100
        assert not {p["text"] for p in sets.train + sets.eval} & excluded
        assert all(p["source"] == "hh-rlhf" and p["prompt_id"].startswith("hh-rlhf:") for p in sets.train)

    def test_prompt_stream_is_seeded_passes(self):
        prompts = [{"prompt_id": str(i)} for i in range(5)]
        s = rloo_prompts.prompt_stream(prompts, 12, seed=0)
        ids = [p["prompt_id"] for p in s]
        assert len(ids) == 12 and sorted(ids[:5]) == sorted(ids[5:10]) == [str(i) for i in range(5)]
        assert ids[:5] != ids[5:10]  # each pass its own permutation (fixed for seed 0)
        assert ids == [p["prompt_id"] for p in rloo_prompts.prompt_stream(prompts, 12, seed=0)]
        assert ids[:7] == [p["prompt_id"] for p in rloo_prompts.prompt_stream(prompts, 7, seed=0)]  # prefix-stable


# -- the reward-function wrapper --------------------------------------------------------------------
def _direct_score(model, tokenizer, messages, reply) -> float:
    """The RM's score of the conversation rendered whole by its own chat template (fp32, one row)."""
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(ids, torch.ones_like(ids)).rewards[0])


class TestRewardFunction:
    PROMPTS = [[{"role": "user", "content": "How do I cook rice?"}],
               [{"role": "user", "content": "Name a prime number."}],
               [{"role": "user", "content": "How do I cook rice?"}]]
    REPLIES = ["Rinse it, then simmer 15 minutes.", "Seven.", "Boil it."]

    @pytest.mark.parametrize("rm", ["proxy", "gold"])
    def test_scores_equal_direct_scoring_with_the_rms_own_template(self, assets, tokenizer, rm):
        fn = reward_fn.RewardModelFunction.from_dir(assets[rm], name=rm, bf16=False, batch_size=2, max_length=None)
        model, rm_tok = load_reward_model(assets[rm]), fn.tokenizer
        completions = [[{"role": "assistant", "content": r}] for r in self.REPLIES]  # TRL's conversational form
        got = fn(prompts=self.PROMPTS, completions=completions, completion_ids=None, trainer_state=None)
        want = [_direct_score(model, rm_tok, p, r) for p, r in zip(self.PROMPTS, self.REPLIES)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert fn(self.PROMPTS, self.REPLIES) == got  # plain-string completions too
        assert fn.__name__ == rm
        if rm == "gold":  # its folder carries another chat template: the policy's would score differently
            assert rm_tok.chat_template == RM_TEMPLATE
            other = [_direct_score(model, tokenizer, p, r) for p, r in zip(self.PROMPTS, self.REPLIES)]
            assert not np.allclose(got, other, rtol=1e-4)

    def test_prompt_cut_from_the_left_at_max_length(self, assets):
        long_prompt = [[{"role": "user", "content": "blah " * 200 + "How do I cook rice?"}]]
        full = reward_fn.RewardModelFunction.from_dir(assets["proxy"], bf16=False, max_length=None)
        cut = reward_fn.RewardModelFunction.from_dir(assets["proxy"], bf16=False, max_length=64)
        assert full.score(long_prompt, ["Boil it."])[0] != pytest.approx(cut.score(long_prompt, ["Boil it."])[0])

    def test_missing_folder_names_it_and_the_hint(self, tmp_path):
        with pytest.raises(FileNotFoundError, match=r"proxy RM folder .*nope does not exist; run notebook 04"):
            reward_fn.RewardModelFunction.from_dir(tmp_path / "nope", name="proxy RM", hint="run notebook 04")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError, match="is not an rmlib reward model"):
            reward_fn.check_reward_model_dir(tmp_path / "empty", "gold RM")

    def test_rejects_non_chat_prompts(self, assets):
        fn = reward_fn.RewardModelFunction.from_dir(assets["proxy"])
        with pytest.raises(TypeError, match="chat messages"):
            fn(["a plain string prompt"], ["reply"])


# -- sampling and log-probs (the KL estimator's parts) ----------------------------------------------
class TestEvalSampling:
    def test_completion_logps_equal_a_full_forward(self, tokenizer):
        model, ref = make_tiny_lm(tokenizer, seed=5).eval(), make_tiny_lm(tokenizer, seed=8).eval()
        prompts, comps = [[5, 6, 7, 8], [9, 10]], [[11, 12, 2], [13]]
        got = logprobs.completion_kl(model, prompts, comps, reference=ref, temperature=0.7, batch_size=2,
                                     chunk_tokens=2)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                logp = (model(ids).logits[0].float() / 0.7).log_softmax(-1)
                ref_logp = (ref(ids).logits[0].float() / 0.7).log_softmax(-1)
            assert got["logp"][i] == pytest.approx(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)),
                                                   abs=1e-4)
            assert got["ref_logp"][i] == pytest.approx(
                sum(float(ref_logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)), abs=1e-4)

    def test_completion_kl_equals_brute_force(self, tokenizer):
        policy, ref = make_tiny_lm(tokenizer, seed=5).eval(), make_tiny_lm(tokenizer, seed=8).eval()
        prompts, comps = [[5, 6, 7, 8], [9, 10]], [[11, 12, 2], [13]]
        got = logprobs.completion_kl(policy, prompts, comps, reference=ref, temperature=0.7, chunk_tokens=2)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                lp = (policy(ids).logits[0].float() / 0.7).log_softmax(-1)[len(p) - 1 : len(p) - 1 + len(c)]
                lr = (ref(ids).logits[0].float() / 0.7).log_softmax(-1)[len(p) - 1 : len(p) - 1 + len(c)]
            tok = torch.tensor(c)[:, None]
            assert got["kl"][i] == pytest.approx(float((lp.exp() * (lp - lr)).sum()), abs=1e-4)
            assert got["kl_k1"][i] == pytest.approx(float((lp.gather(1, tok) - lr.gather(1, tok)).sum()), abs=1e-4)
        assert (got["kl"] > 0).all()
        np.testing.assert_allclose(got["kl_k1"], got["logp"] - got["ref_logp"], atol=1e-9)

    def test_completion_kl_of_fresh_lora_adapters_is_zero(self, tokenizer):
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(make_tiny_lm(tokenizer, seed=5), LoraConfig(r=2, target_modules=["q_proj"]))
        got = logprobs.completion_kl(policy, [[5, 6, 7]], [[8, 9]])  # adapters start with B = 0
        assert got["kl"][0] == 0.0 and got["kl_k1"][0] == 0.0
        with pytest.raises(ValueError, match="needs a reference model"):
            logprobs.completion_kl(make_tiny_lm(tokenizer), [[5]], [[6]])

    def test_float32_weights_restore_bf16_exactly(self, tokenizer):
        model = make_tiny_lm(tokenizer, seed=7).to(torch.bfloat16)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = list(model.parameters())
        with logprobs.float32_weights(model, None):
            assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(a is b for a, b in zip(params, model.parameters()))  # optimizer references stay valid
        assert all(p.dtype == torch.bfloat16 and torch.equal(p, before[n]) for n, p in model.named_parameters())

    def test_rows_draw_from_their_own_seed(self, tokenizer):
        model = make_tiny_lm(tokenizer, seed=6)
        prompt = tokenizer("hello there", add_special_tokens=False)["input_ids"]
        alone = generation.sample_completions(model, tokenizer, [prompt], [11], max_new_tokens=5, bf16=False)
        batch = generation.sample_completions(model, tokenizer, [prompt] * 3, [7, 11, 13], max_new_tokens=5, bf16=False)
        state = torch.random.get_rng_state()
        assert batch[1] == alone[0] and batch[0] != batch[1]
        assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
        assert all(len(ids) <= 5 for ids, _ in batch)


# -- training, tracking, resume -------------------------------------------------------------------
class TestTraining:
    def test_tracker_records_every_step_and_saves_them(self, run_a):
        config, result = run_a
        recs = result.records
        assert [r["step"] for r in recs] == [0, 2, 3]
        first = recs[0]
        assert first["kl"] == 0.0 and first["gold_delta"] == 0.0 and first["gold_win_rate"] == 0.5
        for r in recs:
            s = r["samples"]
            assert len(s) == r["n_samples"] == 3 * 2
            assert r["proxy"] == pytest.approx(np.mean([x["proxy"] for x in s]))
            assert r["gold"] == pytest.approx(np.mean([x["gold"] for x in s]))
            assert r["kl"] == pytest.approx(np.mean([x["kl"] for x in s]))
            assert r["kl_k1"] == pytest.approx(np.mean([x["kl_k1"] for x in s]))
            assert all(x["kl"] >= -1e-6 for x in s)  # a sum of per-prefix KLs
            assert r["length_tokens"] == pytest.approx(np.mean([x["n_tokens"] for x in s]))
            assert all(x["n_tokens"] <= config.max_completion_length for x in s)
        assert any(r["kl"] != 0.0 for r in recs[1:])  # the policy moved (lr 5e-2 on a tiny model)
        out = Path(config.output_dir)
        assert tracker.read_records(out) == recs
        assert [r["step"] for r in tracker.read_records(out / "checkpoint-2" / tracker.RECORDS_FILE)] == [0, 2]
        assert json.loads((out / "checkpoint-2" / rloo_config.CONFIG_FILE).read_text())["config"]["seed"] == 0
        curves = pd.read_csv(out / rloo_config.CURVES_FILE)
        assert list(curves.columns) == tracker.CURVE_COLUMNS and len(curves) == 3
        assert np.isfinite(curves.drop(columns=["epoch"]).to_numpy(float)).all()
        assert (out / "final" / "adapter_model.safetensors").exists()
        assert result.metrics["steps"] == 3
        log = pd.DataFrame([r for r in result.log_history if "loss" in r])  # TRL's per-step training log
        assert "rewards/proxy_rm/mean" in log.columns and len(log) == 3

    def test_reward_used_in_training_is_the_wrapper(self, run_a, assets):
        # a tracked sample re-scored by a fresh wrapper gives the recorded proxy score
        config, result = run_a
        s = result.records[-1]["samples"][0]
        prompt = next(p for p in assets["prompts"].eval if p["prompt_id"] == s["prompt_id"])["prompt"]
        fn = reward_fn.RewardModelFunction.from_dir(assets["proxy"], max_length=128, bf16=config.bf16)
        assert fn.score([prompt], [s["completion"]])[0] == pytest.approx(s["proxy"], abs=1e-5)

    def test_reuse_returns_the_finished_run_and_other_config_is_set_aside(self, run_a, assets):
        config, result = run_a
        again = rloo_trainer.train_rloo(config, assets["prompts"], reuse=True, progress=False)
        assert again.records == result.records and again.metrics == json.loads(json.dumps(result.metrics))
        assert rloo_trainer.finished_run(replace(config, beta=0.1), assets["prompts"]) is None

    def test_checkpoints_of_another_config_are_set_aside_not_resumed(self, run_a, assets, tmp_path):
        import shutil

        config, _ = run_a
        copy_dir = tmp_path / "run"
        shutil.copytree(config.output_dir, copy_dir)
        same = rloo_trainer._identity(config, assets["prompts"])
        rloo_trainer._set_aside_stale(copy_dir, same)
        assert rloo_trainer.last_checkpoint(copy_dir) is not None and not list(copy_dir.glob("stale-*"))
        rloo_trainer._set_aside_stale(copy_dir, rloo_trainer._identity(replace(config, beta=0.1), assets["prompts"]))
        assert rloo_trainer.last_checkpoint(copy_dir) is None and not (copy_dir / "final").exists()
        (stale,) = copy_dir.glob("stale-*")
        assert {"checkpoint-3", "final", rloo_config.RESULT_FILE, tracker.RECORDS_FILE} <= {p.name for p in stale.iterdir()}

    def test_retrained_rm_in_the_same_folder_is_a_new_run(self, assets, tmp_path):
        import shutil

        shutil.copytree(assets["proxy"], tmp_path / "proxy")
        before = reward_model.model_digest(tmp_path / "proxy")
        meta = json.loads((tmp_path / "proxy" / "rmlib_reward.json").read_text())
        meta["extra"] = {"metrics": {"train_seconds": 12.3}}  # what a retraining rewrites
        (tmp_path / "proxy" / "rmlib_reward.json").write_text(json.dumps(meta))
        assert reward_model.model_digest(tmp_path / "proxy") != before
        assert reward_model.model_digest(assets["proxy"]) == reward_model.model_digest(assets["proxy"])

    def test_figures_and_tables(self, run_a):
        _, result = run_a
        curves = pd.concat([tracker.curves_frame(result.records, run="bt"), tracker.curves_frame(result.records, run="bsr")])
        table = rloo_curves.summary_table(curves)
        assert list(table["run"]) == ["bt", "bsr"] and (table["steps"] == 3).all()
        text = rloo_curves.describe_runs(table)
        assert "**bt**" in text and "**bsr**" in text and "standard errors" in text  # the rule: test_claims.py
        fig = plots.rloo_curves_figure(curves)
        assert len(fig.axes) == 4 and len(fig.axes[1].lines) == 2
        long = tracker.curves_frame(result.records, run="bt", long=True)
        assert set(long.columns) == {"run", "step", "epoch", "metric", "value"}
        assert len(tracker.samples_frame(result.records)) == 3 * 6

    def test_same_seed_same_curves_other_seed_differs(self, assets, tmp_path):
        runs = {}
        for name, seed in (("one", 0), ("two", 0), ("other", 1)):
            config = _config(assets, tmp_path / name, seed=seed, max_steps=1, track_every=1)
            runs[name] = rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
        assert [r["step"] for r in runs["one"].records] == [0, 1]
        assert runs["one"].records == runs["two"].records
        weights = {n: load_file(str(tmp_path / n / "final" / "adapter_model.safetensors")) for n in runs}
        assert all(torch.equal(weights["one"][k], weights["two"][k]) for k in weights["one"])
        assert any(not torch.equal(weights["one"][k], weights["other"][k]) for k in weights["one"])
        assert runs["other"].records[1]["samples"] != runs["one"].records[1]["samples"]

    def test_full_fine_tuning_reference_from_the_saved_path(self, assets, tmp_path):
        config = _config(assets, tmp_path / "full", mode="full", max_steps=1, learning_rate=1e-3)
        result = rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
        assert result.records[0]["kl"] == 0.0 and [r["step"] for r in result.records] == [0, 1]
        assert math.isfinite(result.records[1]["kl"])
        assert (tmp_path / "full" / "final" / "model.safetensors").exists()


KILLED_RUN = r"""
import json, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch
torch.set_num_threads(1)  # as in conftest: same arithmetic as the test process
from transformers import TrainerCallback
from rmlib.rloo import config as rloo_config, prompts as rloo_prompts, trainer as rloo_trainer

spec = json.loads(sys.argv[1])
marker = spec.pop("marker")
park = spec.pop("park", "after_checkpoint")
prompts = rloo_prompts.split_prompts(spec.pop("candidates"), n_train=6, n_eval=3, seed=0)


class PauseAfterFirstCheckpoint(TrainerCallback):
    saved = None

    def on_save(self, args, state, control, **kwargs):
        self.saved = self.saved or state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.saved is not None and state.global_step > self.saved:  # past the checkpoint, records written
            open(marker, "w").write(str(state.global_step))
            time.sleep(600)  # killed here


if park == "mid_save":  # in the Trainer's (non-atomic) write of checkpoint-2's trainer_state.json
    from transformers import TrainerState

    save_to_json = TrainerState.save_to_json

    def cut_short(self, json_path):
        save_to_json(self, json_path)
        if self.global_step == 2:
            text = open(json_path).read()
            open(json_path, "w").write(text[: len(text) // 2])  # what a kill in the middle of the write leaves
            open(marker, "w").write(str(self.global_step))
            time.sleep(600)  # killed here

    TrainerState.save_to_json = cut_short
callbacks = [PauseAfterFirstCheckpoint()] if park == "after_checkpoint" else []
rloo_trainer.train_rloo(rloo_config.RLOORunConfig(**spec), prompts, callbacks=callbacks, progress=False)
"""


def _run_and_kill(config, tmp_path, park: str) -> None:
    """Run ``config`` in a child process parked at ``park`` (see ``KILLED_RUN``), then SIGKILL it."""
    marker = tmp_path / "paused"
    spec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.summary().items()}
    spec.update(marker=str(marker), candidates=CANDIDATES, park=park)
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, json.dumps(spec)], stdout=log, stderr=log,
                             cwd=tmp_path)
    deadline = time.time() + 180
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    alive = child.poll() is None
    child.send_signal(signal.SIGKILL)
    child.wait()
    log.close()
    assert alive and marker.exists(), (tmp_path / "child.log").read_text()[-3000:]
    assert child.returncode == -signal.SIGKILL


def _assert_same_as_uninterrupted(resumed, run_a) -> None:
    config_a, result_a = run_a
    pd.testing.assert_frame_equal(resumed.curves, result_a.curves, check_exact=True)
    assert resumed.records == result_a.records  # every tracked completion and score, too
    a = load_file(str(Path(config_a.output_dir) / "final" / "adapter_model.safetensors"))
    b = load_file(str(resumed.final_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(run_a, assets, tmp_path):
    config = replace(run_a[0], output_dir=str(tmp_path / "killed"))
    _run_and_kill(config, tmp_path, "after_checkpoint")
    out = Path(config.output_dir)
    assert rloo_trainer.last_checkpoint(out) == str(out / "checkpoint-1")
    assert [r["step"] for r in tracker.read_records(out)] == [0, 2]  # step 2 trained and tracked, then killed
    assert [r["step"] for r in tracker.read_records(out / "checkpoint-1")] == [0]
    assert not (out / "final").exists()

    resumed = rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-1")
    assert [r["step"] for r in resumed.records] == [0, 2, 3]
    _assert_same_as_uninterrupted(resumed, run_a)


def test_sigkill_mid_save_then_resume_skips_that_checkpoint(run_a, assets, tmp_path):
    """Killed while the Trainer writes checkpoint-2's trainer_state.json: checkpoint-2 holds the
    adapter weights and half a trainer_state.json, no records and no run identity."""
    config = replace(run_a[0], output_dir=str(tmp_path / "killed"))
    _run_and_kill(config, tmp_path, "mid_save")
    out = Path(config.output_dir)
    cut = out / "checkpoint-2"
    assert (cut / "adapter_model.safetensors").exists() and (cut / "trainer_state.json").exists()
    assert not (cut / tracker.RECORDS_FILE).exists() and not (cut / rloo_config.CONFIG_FILE).exists()
    with pytest.raises(ValueError):
        json.loads((cut / "trainer_state.json").read_text())
    assert rloo_trainer.last_checkpoint(out) == str(out / "checkpoint-1")

    resumed = rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-1")
    _assert_same_as_uninterrupted(resumed, run_a)
    (stale,) = out.glob("stale-*")  # set aside (it lacks the run identity), not deleted
    assert (stale / "checkpoint-2" / "adapter_model.safetensors").exists()


def test_resume_skips_a_checkpoint_without_its_weights(run_a, assets, tmp_path):
    """A newest checkpoint of this run (identity written) whose policy weights are gone: the resume
    falls back to the previous checkpoint and ends like the uninterrupted run."""
    import shutil

    config = replace(run_a[0], output_dir=str(tmp_path / "run"))
    out = Path(config.output_dir)
    shutil.copytree(run_a[0].output_dir, out)
    for name in ("final", rloo_config.RESULT_FILE, rloo_config.CURVES_FILE):  # as if killed before the end
        shutil.move(out / name, tmp_path / name)
    (out / "checkpoint-3" / "adapter_model.safetensors").unlink()
    assert rloo_trainer.last_checkpoint(out) == str(out / "checkpoint-2")

    resumed = rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
    assert resumed.metrics["resumed_from"] == str(out / "checkpoint-2")
    _assert_same_as_uninterrupted(resumed, run_a)
    assert not list(out.glob("stale-*"))  # same run: skipped, then saved over
    assert (out / "checkpoint-3" / "adapter_model.safetensors").exists()


# -- bad parameters -------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("mode", "qlora", "mode='qlora' is not allowed; allowed: lora, full"),
    ("num_generations", 1, r"num_generations must be an integer in \[2, inf\]"),
    ("beta", -0.1, r"beta must be a number in \[0, inf\]"),
    ("beta", float("nan"), "beta must be a number"),
    ("learning_rate", 0.0, r"learning_rate must be a number in \(0, inf\]"),
    ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
    ("temperature", 0, "temperature must be a number"),
    ("max_steps", 0, r"max_steps must be an integer in \[1, inf\]"),
    ("prompts_per_step", 2.5, "prompts_per_step must be an integer"),
    ("track_every", 0, "track_every must be an integer"),
    ("rm_max_length", 8, r"rm_max_length must be an integer in \[16, inf\]"),
    ("lora_targets", (), "lora_targets must name at least one module"),
    ("policy_dtype", "float16", "policy_dtype='float16' is not allowed; allowed: float32, bfloat16"),
    ("lr_scheduler_type", "wavy", "lr_scheduler_type='wavy' is not allowed; allowed: linear, cosine"),
])
def test_bad_config_fails_naming_the_parameter(field, value, message):
    with pytest.raises(ValueError, match=message):
        rloo_config.RLOORunConfig(**{field: value})


def test_bf16_policy_weights_need_lora():
    with pytest.raises(ValueError, match="policy_dtype='bfloat16' needs mode='lora'"):
        rloo_config.RLOORunConfig(mode="full", policy_dtype="bfloat16")


def test_missing_rm_folder_fails_before_training(assets, tmp_path):
    config = _config(assets, tmp_path / "run", gold_rm=str(tmp_path / "no_gold"))
    with pytest.raises(FileNotFoundError, match="gold RM folder .*no_gold does not exist"):
        rloo_trainer.train_rloo(config, assets["prompts"], progress=False)
    assert not (tmp_path / "run").exists()


def test_trl_config_carries_the_rloo_settings(assets, tmp_path):
    cfg = _config(assets, tmp_path, prompts_per_step=3, num_generations=4, beta=0.05,
                  gradient_accumulation_steps=2).trl_config()
    assert (cfg.num_generations, cfg.beta) == (4, 0.05)
    assert (cfg.per_device_train_batch_size, cfg.steps_per_generation) == (12, 2)
    assert cfg.num_iterations == 1 and not cfg.shuffle_dataset and not cfg.gradient_checkpointing
    assert cfg.use_cpu and cfg.bf16 and cfg.temperature == 1.0
