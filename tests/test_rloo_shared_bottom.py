"""RLOO with one bottom forward (rmlib.rloo.shared_bottom) against TRL's plain RLOOTrainer on the
same top-k-frozen tiny policy and the same completions: log-probs, rewards, advantages, loss and
gradients agree; gradients reach only the top layers; train_rloo in mode topk trains, saves a
checkpoint plain transformers loads, and resumes. Tiny random models only, float32."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import RLOOConfig, RLOOTrainer

from rmlib.model.reward_model import ModelSpec, build_reward_model, save_reward_model
from rmlib.rloo import config as rloo_config
from rmlib.rloo import prompts as rloo_prompts
from rmlib.rloo import shared_bottom
from rmlib.rloo import trainer as rloo_trainer
from rmlib.rloo.reward_fn import RewardModelFunction

TOP_K = 2
BETA = 0.1
TEMPERATURE = 0.8
QUESTIONS = ["How do I cook rice?", "Why is the sky blue?", "Name a prime number."]
CANDIDATES = [{"source": "toy", "text": f"Question {i}: how do I {w}?"}
              for i, w in enumerate(["cook rice", "fix a bike", "learn chess", "write a poem", "plant a tree",
                                     "tie a knot", "bake bread", "swim faster", "sleep well", "save money"])]


def _save_topk_rm(path: Path, tokenizer, backbone: str, head: str, seed: int, top_k: int = TOP_K) -> str:
    model = build_reward_model(ModelSpec(backbone=backbone, head=head, mode="topk", top_k_layers=top_k), seed=seed)
    with torch.no_grad():  # move the trainable top away from the backbone so RM and policy tops differ
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_reward_model(model, path, tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory, tokenizer):
    """A tiny random Llama (4 layers) whose float32 weights are bf16 values, as SmolLM2's are: an RM
    saved in bf16 from it keeps the policy's bottom exactly (the shared bottom needs equal weights)."""
    from conftest import make_tiny_lm

    path = tmp_path_factory.mktemp("tiny_bf16_backbone")
    model = make_tiny_lm(tokenizer, layers=4)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def rms(tmp_path_factory, tokenizer, tiny_backbone):
    root = tmp_path_factory.mktemp("shared_rms")
    return {"proxy": _save_topk_rm(root / "proxy", tokenizer, tiny_backbone, "linear", seed=3),
            "proxy_k3": _save_topk_rm(root / "proxy_k3", tokenizer, tiny_backbone, "mlp", seed=4, top_k=3),
            "gold": _save_topk_rm(root / "gold", tokenizer, tiny_backbone, "mlp", seed=5)}


def _policy(backbone: str):
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    return shared_bottom.make_topk_policy(model, TOP_K)


def _args(out, **kw) -> RLOOConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=6, num_generations=2, beta=BETA,
                max_completion_length=8, temperature=TEMPERATURE, top_p=1.0, top_k=0, num_iterations=1,
                learning_rate=1e-3, max_steps=1, bf16=False, use_cpu=True, report_to="none", seed=0,
                remove_unused_columns=False, disable_dropout=True, activation_checkpointing=False,
                normalize_advantages=False, shuffle_dataset=False, logging_steps=1, save_strategy="no")
    base.update(kw)
    return RLOOConfig(**base)


def _completions(tokenizer) -> list[list[int]]:
    """Fixed 'sampled' completions, 2 per prompt: ended by <|im_end|>, cut at the length limit, and
    one whose decoded text re-tokenizes differently (its RM ids are not the policy's: plain path)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    split = enc("hel") + enc("lo") + enc(" world")  # "hello world": canonical ids differ
    assert enc("hello world") != split
    return [enc("Boil it.") + [eos], enc("Use water and a pot and wait")[:8],
            enc("Light scatters.") + [eos], split + [eos],
            enc("Two") + [eos], enc("Seven, I think, or maybe eleven")[:8]]


def _trainer(kind: str, backbone: str, rm_dir, tokenizer, out, completions, **kw):
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    rm = RewardModelFunction.from_dir(rm_dir, name="proxy_rm", max_length=kw.pop("rm_max_length", 128), bf16=False)
    ds = [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS]
    from datasets import Dataset

    cls = shared_bottom.SharedBottomRLOOTrainer if kind == "shared" else RLOOTrainer
    trainer = cls(model=_policy(backbone), reward_funcs=rm, args=_args(out, **kw), train_dataset=Dataset.from_list(ds),
                  processing_class=tok)
    if completions is not None:
        trainer._generate_single_turn = lambda prompt_ids, images, fields: [list(c) for c in completions]
    trainer.model.train()
    return trainer


def _inputs():
    return [{"prompt": [{"role": "user", "content": q}]} for q in QUESTIONS for _ in range(2)]


def _score(trainer):
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(_inputs())
    rewards = list(trainer._logs["rewards"]["proxy_rm"])
    loss = trainer._compute_loss(trainer.model, out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return out, rewards, loss, grads


@pytest.fixture(scope="module")
def both(tmp_path_factory, tokenizer, tiny_backbone, rms):
    comps = _completions(tokenizer)
    root = tmp_path_factory.mktemp("both")
    plain = _trainer("plain", tiny_backbone, rms["proxy"], tokenizer, root / "plain", comps)
    shared = _trainer("shared", tiny_backbone, rms["proxy"], tokenizer, root / "shared", comps)
    return plain, _score(plain), shared, _score(shared)


class TestEqualsPlainTRL:
    def test_rewards_advantages_and_old_logps(self, both):
        plain, (p_out, p_rewards, _, _), shared, (s_out, s_rewards, _, _) = both
        assert s_rewards == pytest.approx(p_rewards, abs=1e-5)
        assert len(set(round(r, 4) for r in p_rewards)) == 6  # six different rewards: a real comparison
        torch.testing.assert_close(s_out["advantages"], p_out["advantages"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s_out["old_logps"], p_out["old_logps"], atol=1e-5, rtol=1e-5)
        assert p_out["advantages"].abs().max() > 1e-3
        # every row through the shared bottom, the non-canonical completion (row 3) too: its re-tokenized
        # reply runs on the stored keys/values of the prompt and the completion's first (shared) token
        wrapped = shared.reward_funcs[0]
        assert isinstance(wrapped, shared_bottom.SharedBottomReward)
        assert (wrapped.rows_shared, wrapped.rows_plain) == (6, 0)
        assert plain._metrics["train"]["kl"] == pytest.approx(shared._metrics["train"]["kl"], abs=1e-6)

    def test_per_token_logps_policy_and_reference(self, both, tokenizer):
        plain, (p_out, *_), shared, (s_out, *_) = both
        ids = torch.cat([p_out["prompt_ids"], p_out["completion_ids"]], 1)
        mask = torch.cat([p_out["prompt_mask"], p_out["completion_mask"]], 1)
        keep = p_out["completion_ids"].shape[1]
        cm = p_out["completion_mask"].bool()
        top = shared.policy_start
        with torch.no_grad():  # move both policies' top away from the initial (= reference) weights alike
            for t in (plain, shared):
                t.model.model.layers[top].mlp.down_proj.weight.add_(0.5)
        try:
            self._compare(plain, shared, ids, mask, keep, cm)
        finally:
            with torch.no_grad():
                for t in (plain, shared):
                    t.model.model.layers[top].mlp.down_proj.weight.sub_(0.5)

    @staticmethod
    def _compare(plain, shared, ids, mask, keep, cm):
        with torch.no_grad():
            logps = {}
            for entropy, (p_model, s_model) in ((True, (plain.model, shared.model)),
                                                (False, (plain.ref_model, shared.ref_model))):  # TRL: no ref entropy
                p_lp, p_ent, _ = plain._get_per_token_logps_and_entropies(p_model, ids, mask, keep,
                                                                         compute_entropy=entropy)
                s_lp, s_ent, _ = shared._get_per_token_logps_and_entropies(s_model, ids, mask, keep,
                                                                          compute_entropy=entropy)
                torch.testing.assert_close(s_lp[cm], p_lp[cm], atol=1e-5, rtol=1e-5)
                if entropy:
                    torch.testing.assert_close(s_ent[cm], p_ent[cm], atol=1e-5, rtol=1e-5)
                assert (s_lp[~cm] == 0).all()
                logps[entropy] = s_lp
        assert (logps[True] - logps[False]).abs().max() > 1e-4  # policy != reference

    def test_loss_and_gradients(self, both):
        _, (_, _, p_loss, p_grads), shared, (_, _, s_loss, s_grads) = both
        torch.testing.assert_close(s_loss, p_loss, atol=1e-6, rtol=1e-5)
        # on-policy the ratio is 1 and RLOO advantages sum to 0 per group: the loss is 0, its gradient is not
        assert max(float(g.abs().max()) for g in p_grads.values()) > 1e-4
        assert s_grads.keys() == p_grads.keys()
        for name in p_grads:
            torch.testing.assert_close(s_grads[name], p_grads[name], atol=1e-6, rtol=1e-4, msg=name)
        n_layers = len(shared.model.model.layers)
        top = {f"model.layers.{i}." for i in range(n_layers - TOP_K, n_layers)}
        assert all(any(n.startswith(t) for t in top) or n == "model.norm.weight" for n in s_grads)
        assert any(n.startswith(f"model.layers.{n_layers - 1}.") for n in s_grads)

    def test_reference_shares_the_bottom_and_stays_initial(self, both):
        _, _, shared, _ = both
        policy, ref = shared.model, shared.ref_model
        assert ref.model.embed_tokens is policy.model.embed_tokens
        assert all(ref.model.layers[i] is policy.model.layers[i] for i in range(shared.policy_start))
        top = shared.policy_start
        assert ref.model.layers[top] is not policy.model.layers[top]
        assert not any(p.requires_grad for p in ref.parameters())
        with torch.no_grad():
            policy.model.layers[top].mlp.down_proj.weight.add_(1.0)
        try:
            assert not torch.equal(ref.model.layers[top].mlp.down_proj.weight, policy.model.layers[top].mlp.down_proj.weight)
        finally:
            with torch.no_grad():
                policy.model.layers[top].mlp.down_proj.weight.sub_(1.0)


def test_rm_with_a_deeper_top_and_a_cut_prompt(tmp_path, tokenizer, tiny_backbone, rms):
    """An RM training its top 3 layers shares the bottom up to layer 1 (below the policy's 2); rows
    whose prompt the RM cuts at max_length are scored the plain way. Rewards equal plain TRL's."""
    comps = _completions(tokenizer)
    got = {}
    for kind in ("plain", "shared"):
        t = _trainer(kind, tiny_backbone, rms["proxy_k3"], tokenizer, tmp_path / kind, comps, rm_max_length=40)
        t._generate_and_score_completions(_inputs())
        got[kind] = list(t._logs["rewards"]["proxy_rm"])
    assert got["shared"] == pytest.approx(got["plain"], abs=1e-5)
    wrapped = t.reward_funcs[0]
    assert wrapped.start_layer == 1 and t.bottom_layer == 1
    assert wrapped.rows_plain >= 2 and wrapped.rows_shared >= 1  # the long system prompt is cut in some rows


def test_rm_of_another_backbone_is_scored_plainly(tmp_path, tokenizer, tiny_backbone):
    from conftest import make_tiny_lm

    other = tmp_path / "other_backbone"
    make_tiny_lm(tokenizer, seed=9, layers=4).save_pretrained(other)
    tokenizer.save_pretrained(other)
    rm = _save_topk_rm(tmp_path / "rm", tokenizer, str(other), "linear", seed=1)
    t = _trainer("shared", tiny_backbone, rm, tokenizer, tmp_path / "out", _completions(tokenizer))
    assert t.shared_rewards == [] and isinstance(t.reward_funcs[0], RewardModelFunction)


def test_handed_in_bottom_states_are_used(tokenizer, tiny_backbone):
    policy = _policy(tiny_backbone)
    decoder = policy.model
    prompts, comps = [[5, 6, 7], [8, 9]], [[10, 2], [11, 12, 13]]
    batch = shared_bottom.BottomBatch.build(decoder, prompts, comps, 0, [1, 2], contextlib.nullcontext)
    assert batch.ids.tolist() == [[5, 6, 7, 10, 2, 0], [0, 8, 9, 11, 12, 13]]
    assert sorted(batch.states) == [1, 2] and batch.cache.get_seq_length() == 6
    rm_seqs = [[5, 6, 7, 10, 2, 198], [8, 9, 11, 14]]  # a tail after the completion; a different last token
    full = batch.rm_input(rm_seqs, 2)
    given = shared_bottom.BottomBatch.build(decoder, prompts, comps, 0, [1, 2], contextlib.nullcontext,
                                            states={2: batch.states[2] + 1.0})
    torch.testing.assert_close(given.states_at(2), batch.states_at(2) + 1.0)
    assert not torch.allclose(given.states_at(3), batch.states_at(3))  # layer 3 is computed from them
    assert given.rm_input(rm_seqs, 2) is None  # own tokens after the prefix need the keys/values: plain path
    rows, ids, mask, hidden = full
    assert rows.tolist() == [0, 1] and ids.tolist() == [[5, 6, 7, 10, 2, 198], [0, 8, 9, 11, 14, 0]]
    assert mask.tolist() == [[1] * 6, [0, 1, 1, 1, 1, 0]]
    # the continued rows equal a fresh bottom forward of the RM's own sequences
    for k, seq in enumerate(rm_seqs):
        with torch.no_grad():
            ref = shared_bottom.run_layers(decoder, decoder.embed_tokens(torch.tensor([seq])), torch.ones(1, len(seq)),
                                           0, 2)
        got = hidden[k][mask[k].bool()]
        torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        shared_bottom.BottomBatch.build(decoder, prompts, comps, 0, [2], contextlib.nullcontext,
                                        states={2: batch.states[2][:, :3]})


def test_sampling_is_seeded_per_step_and_row(tmp_path, tokenizer, tiny_backbone, rms):
    t = _trainer("shared", tiny_backbone, rms["proxy"], tokenizer, tmp_path / "s", None)
    prompt_ids = [tokenizer("hello there", add_special_tokens=False)["input_ids"]] * 2 + [[5, 6, 7]]
    state = torch.random.get_rng_state()
    first = t._generate_single_turn(prompt_ids, None, {})
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert t._generate_single_turn(prompt_ids, None, {}) == first  # same step: same samples
    assert first[0] != first[1]  # each row its own stream, also for the same prompt
    assert all(1 <= len(c) <= 8 for c in first)
    t.state.global_step = 1
    assert t._generate_single_turn(prompt_ids, None, {}) != first


def test_make_topk_policy_checks_k(tiny_backbone):
    model = AutoModelForCausalLM.from_pretrained(tiny_backbone)
    with pytest.raises(ValueError, match=r"policy_top_k_layers=5 must be in \[1, 4\]"):
        shared_bottom.make_topk_policy(model, 5)
    shared_bottom.make_topk_policy(model, 1)
    assert shared_bottom.trainable_start(model) == 3
    assert not model.get_output_embeddings().weight.requires_grad


# -- train_rloo in mode topk --------------------------------------------------------------------------
def _config(rms, backbone, out, **kw) -> rloo_config.RLOORunConfig:
    base = dict(output_dir=str(out), policy=backbone, proxy_rm=rms["proxy"], gold_rm=rms["gold"], mode="topk",
                policy_top_k_layers=TOP_K, learning_rate=5e-2, prompts_per_step=2, max_steps=3,
                max_completion_length=6, track_every=2, save_steps=1, eval_samples_per_prompt=2, eval_batch_size=4,
                rm_max_length=128, rm_batch_size=4, bf16=False, use_cpu=True, seed=0)
    base.update(kw)
    return rloo_config.RLOORunConfig(**base)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("stopped for the resume test")


def test_train_rloo_topk_trains_saves_loads_and_resumes(tmp_path, tokenizer, tiny_backbone, rms):
    prompts = rloo_prompts.split_prompts(CANDIDATES, n_train=6, n_eval=3, seed=0)
    config = _config(rms, tiny_backbone, tmp_path / "a")
    result = rloo_trainer.train_rloo(config, prompts, progress=False)
    assert result.metrics["steps"] == 3 and [r["step"] for r in result.records] == [0, 2, 3]
    assert any(r["kl"] > 1e-6 for r in result.records[1:])  # the policy moved
    # the saved policy is a plain causal LM: only the top layers and the norm changed
    init = AutoModelForCausalLM.from_pretrained(tiny_backbone)
    final = AutoModelForCausalLM.from_pretrained(result.final_dir)
    changed = {n for n, p in final.state_dict().items() if not torch.equal(p, init.state_dict()[n])}
    assert changed and all(n.startswith(("model.layers.2.", "model.layers.3.", "model.norm.")) for n in changed)
    ckpt = AutoModelForCausalLM.from_pretrained(Path(config.output_dir) / "checkpoint-3")
    assert all(torch.equal(p, final.state_dict()[n]) for n, p in ckpt.state_dict().items())
    log = [r for r in result.log_history if "loss" in r]
    assert len(log) == 3 and all("rewards/proxy_rm/mean" in r for r in log)

    # killed after checkpoint 2, resumed: the same final weights and curves as the uninterrupted run
    resumed_cfg = _config(rms, tiny_backbone, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        rloo_trainer.train_rloo(resumed_cfg, prompts, progress=False, callbacks=[_StopAt(2)])
    again = rloo_trainer.train_rloo(resumed_cfg, prompts, progress=False)
    assert again.metrics["resumed_from"].endswith("checkpoint-2")
    final_b = AutoModelForCausalLM.from_pretrained(again.final_dir)
    for n, p in final.state_dict().items():
        torch.testing.assert_close(final_b.state_dict()[n], p, atol=1e-5, rtol=1e-5, msg=n)
    assert [r["step"] for r in again.records] == [0, 2, 3]
    assert again.records[-1]["proxy"] == pytest.approx(result.records[-1]["proxy"], abs=1e-4)
    saved = json.loads((Path(resumed_cfg.output_dir) / rloo_config.RESULT_FILE).read_text())
    assert saved["identity"]["config"]["mode"] == "topk"


def test_topk_config_checks():
    with pytest.raises(ValueError, match="policy_top_k_layers must be an integer"):
        rloo_config.RLOORunConfig(mode="topk", policy_top_k_layers=0)
    with pytest.raises(ValueError, match="policy_dtype='bfloat16' needs mode='lora'"):
        rloo_config.RLOORunConfig(mode="topk", policy_dtype="bfloat16")
    assert rloo_config.RLOORunConfig(mode="topk").policy_top_k_layers == 2


# -- the bottom captured while sampling (issue 18: one bottom forward per completion) --------------------
def _peaked(trainer):
    """Next-token distributions peaked like a trained model's, the end-of-turn near the top (as in
    tests/test_bottom_capture.py): replies of real words that end at different steps or run to the limit.
    The hook is on the sampler's LM head call only; the log-probs use the head's weight, in both runs alike."""
    lm = trainer.model
    bias = 3 * torch.randn(lm.config.vocab_size, generator=torch.Generator().manual_seed(0))
    eos = trainer.eos_token_ids[0]

    def hook(module, inputs, out):
        out = out * 40 + bias
        out[..., eos] = out.max(-1).values - 2.0
        return out

    lm.lm_head.register_forward_hook(hook)


def _step_with_sampling(capture: bool, backbone, rm_dir, tokenizer, out, **kw):
    """One generation + loss with DecodeLoop sampling, capture on or off; counts the calls of the policy's
    bottom layer 0 (and the RM's) while sampling and in total, and of every policy bottom layer in total."""
    t = _trainer("shared", backbone, rm_dir, tokenizer, out, None, **kw)
    t.capture_bottom = capture
    _peaked(t)
    calls = {"policy": 0, "rm": 0, **{f"layer{k}": 0 for k in range(t.policy_start)}}
    t.model.model.layers[0].register_forward_hook(lambda *a: calls.__setitem__("policy", calls["policy"] + 1))
    for k in range(t.policy_start):
        t.model.model.layers[k].register_forward_hook(lambda *a, k=k: calls.__setitem__(f"layer{k}", calls[f"layer{k}"] + 1))
    rm_model = getattr(t.reward_funcs[0], "fn", t.reward_funcs[0]).model
    shared_bottom.decoder_of(rm_model).layers[0].register_forward_hook(lambda *a: calls.__setitem__("rm", calls["rm"] + 1))
    sampled, sample = {}, t._generate_single_turn

    def counted(*args):
        before = calls["policy"]
        got = sample(*args)
        sampled["calls_sampling"], sampled["completions"] = calls["policy"] - before, got
        return got

    t._generate_single_turn = counted
    output, rewards, loss, grads = _score(t)
    return dict(trainer=t, out=output, rewards=rewards, loss=loss, grads=grads, calls=dict(calls), **sampled)


@pytest.fixture(scope="module")
def sampled_both(tmp_path_factory, tokenizer, tiny_backbone, rms):
    root = tmp_path_factory.mktemp("sampled")
    return {c: _step_with_sampling(c, tiny_backbone, rms["proxy"], tokenizer, root / str(c)) for c in (False, True)}


class TestCaptureWhileSampling:
    def test_same_samples_and_one_bottom_pass(self, sampled_both):
        off, on = sampled_both[False], sampled_both[True]
        assert on["completions"] == off["completions"]  # capture never changes the sampled tokens
        lengths = {len(c) for c in on["completions"]}
        assert len(lengths) > 1  # replies end at different steps: a real layout
        assert on["trainer"].bottom_source == {"sampler": 1, "forward": 0}
        assert off["trainer"].bottom_source == {"sampler": 0, "forward": 1}
        # the policy's bottom layer runs only in the sampler with capture; without, twice more after it: the
        # full prompt + completion forward and the RM's own tokens (end-of-turn newline) on its keys/values
        assert on["calls"]["policy"] == on["calls_sampling"] > 0
        assert off["calls"]["policy"] == off["calls_sampling"] + 2
        wrapped = on["trainer"].reward_funcs[0]
        assert wrapped.rows_shared >= 4 and on["calls"]["rm"] == (wrapped.rows_plain > 0)
        assert off["calls"]["rm"] == 0  # without capture the RM rows continue on the stored keys/values

    def test_rewards_advantages_logps_and_loss_equal_the_separate_bottom_forward(self, sampled_both):
        off, on = sampled_both[False], sampled_both[True]
        assert on["rewards"] == pytest.approx(off["rewards"], abs=1e-5)
        assert len({round(r, 4) for r in off["rewards"]}) > 1
        for key in ("advantages", "old_logps"):
            torch.testing.assert_close(on["out"][key], off["out"][key], atol=1e-5, rtol=1e-5)
        # the captured bottom equals the separate forward's at every real token the policy reads (all but
        # each completion's last, which predicts the token after the completion)
        read = torch.cat([off["out"]["prompt_mask"], off["out"]["completion_mask"]], 1).bool()
        read[torch.arange(read.shape[0]), read.shape[1] - 1 - read.flip(1).int().argmax(1)] = False
        torch.testing.assert_close(on["out"]["bottom_hidden"][read], off["out"]["bottom_hidden"][read],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(on["loss"], off["loss"], atol=1e-6, rtol=1e-5)
        assert on["grads"].keys() == off["grads"].keys() and on["grads"]
        for name in off["grads"]:
            torch.testing.assert_close(on["grads"][name], off["grads"][name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("which", ["proxy_k3", "other"])
def test_capture_fallbacks_equal_the_separate_forward(which, tmp_path, tokenizer, tiny_backbone, rms):
    """An RM that shares the bottom only up to layer 1 and cuts some prompts (capture at layer 1, cut rows
    by the plain path); an RM of other weights (plain path, the policy's bottom still captured)."""
    if which == "other":
        from conftest import make_tiny_lm

        other = tmp_path / "other_backbone"
        make_tiny_lm(tokenizer, seed=9, layers=4).save_pretrained(other)
        tokenizer.save_pretrained(other)
        rm_dir, kw = _save_topk_rm(tmp_path / "rm", tokenizer, str(other), "linear", seed=1), {}
    else:
        rm_dir, kw = rms["proxy_k3"], {"rm_max_length": 40}
    got = {c: _step_with_sampling(c, tiny_backbone, rm_dir, tokenizer, tmp_path / str(c), **kw) for c in (False, True)}
    off, on = got[False], got[True]
    assert on["completions"] == off["completions"]
    assert on["rewards"] == pytest.approx(off["rewards"], abs=1e-5)
    torch.testing.assert_close(on["out"]["advantages"], off["out"]["advantages"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(on["loss"], off["loss"], atol=1e-6, rtol=1e-5)
    assert on["trainer"].bottom_source == {"sampler": 1, "forward": 0}
    assert on["calls"]["policy"] == on["calls_sampling"]
    # each bottom layer runs as often as in sampling: the RM's start (1) and the policy's (2) both captured
    assert all(on["calls"][f"layer{k}"] == on["calls_sampling"] for k in range(on["trainer"].policy_start))
    if which == "other":
        assert on["trainer"].shared_rewards == []
    else:
        wrapped = on["trainer"].reward_funcs[0]
        assert on["trainer"].bottom_layer == 1 and wrapped.rows_plain >= 2 and wrapped.rows_shared >= 1


@pytest.mark.parametrize("layers", [[1], [1, 2]])
def test_sampled_bottom_rows_and_rm_ids(layers, tokenizer, tiny_backbone):
    """SampledBottom on DecodeLoop directly: a row whose RM ids extend the sampled ones is completed and
    its RM input at layer 2 (captured, or lifted from the captured layer 1) equals a fresh bottom forward of
    those ids; a row whose RM ids differ from a fed token keeps only the policy's states and is left to
    the plain path."""
    from rmlib.model.decoding import DecodeLoop

    policy = _policy(tiny_backbone)
    decoder = policy.model
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [[5, 6, 7, 8], [9, 10]]
    rm_seqs = {}

    def rm_ids(row, generated):
        if row == 0:
            rm_seqs[0] = prompts[0] + generated + [198]
        else:
            rm_seqs[1] = prompts[1] + [generated[0] + 1] + generated[1:]  # differs at the first sampled token
        return rm_seqs[row]

    capture = shared_bottom.SampledBottom(layers, prompts, rm_ids)
    loop = DecodeLoop(policy, [eos], 0, 6, 1.0, 1.0, False)
    comps = loop(prompts, [1, 2], capture=capture)
    assert comps == loop(prompts, [1, 2])  # the same tokens without capture
    assert sorted(capture.rm) == [0] and 1 in capture.skipped
    states, captured = capture.bottom(prompts, comps)
    assert capture.bottom(prompts, [comps[0], comps[1] + [3]]) is None  # not the sampled rows: no states
    ref = shared_bottom.BottomBatch.build(decoder, prompts, comps, 0, [1, 2], contextlib.nullcontext)
    read = ref.mask.bool().clone()
    for i, c in enumerate(comps):  # all but each completion's last token (fed only for row 0, by its RM ids)
        read[i, ref.first[i] + ref.lengths[i] - 1] = i == 0
    assert sorted(states) == layers and sorted(captured) == [0] and sorted(captured[0][1]) == layers
    for layer in layers:
        torch.testing.assert_close(states[layer][read], ref.states[layer][read], atol=1e-5, rtol=1e-5)
    batch = shared_bottom.BottomBatch.build(decoder, prompts, comps, 0, [1, 2], contextlib.nullcontext,
                                            states=states, captured=captured)
    rows, ids, mask, hidden = batch.rm_input([rm_seqs[0], rm_seqs[1]], 2)
    assert rows.tolist() == [0] and ids[0][mask[0].bool()].tolist() == rm_seqs[0]
    with torch.no_grad():
        fresh = shared_bottom.run_layers(decoder, decoder.embed_tokens(torch.tensor([rm_seqs[0]])),
                                         torch.ones(1, len(rm_seqs[0])), 0, 2)
    torch.testing.assert_close(hidden[0][mask[0].bool()], fresh[0], atol=1e-5, rtol=1e-5)
