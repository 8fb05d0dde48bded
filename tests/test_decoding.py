"""rmlib.model.decoding: the sampling engine.

- ``top_p_pick`` samples exactly the top-p distribution of a plain reference (full sort + cumsum,
  then multinomial): exact interval lengths on a grid of uniforms, and a chi-square test of random
  draws, on a tiny vocabulary, in the shortlist branch, the full-sort fallback and a mix of both;
- the decode loop gives the same tokens as HF ``generate`` with ``RowSampler`` (the engine it
  replaced) for the same seeds in float32, with finished rows dropped or kept, prefill shared or not;
- a row's tokens never depend on its batch-mates; stop tokens end rows; the loop stops when all did;
- the sample file's meta names the engine, so a file of the old engine is not resumed.
"""

from __future__ import annotations

import json

import pytest
import scipy.stats
import torch
from conftest import make_tiny_lm

from rmlib.model import decoding
from rmlib.model.decoding import DecodeLoop, hf_generate_rows, top_p_pick


# -- the sampling maths against a reference ------------------------------------------------------------
def reference_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The top-p distribution, plainly: softmax, full descending sort, cumsum, the smallest prefix
    whose mass reaches top_p, renormalized. (V,) -> (V,) float64."""
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_probs, order = probs.sort(descending=True, stable=True)
    n_keep = min(int((sorted_probs.cumsum(-1) < top_p).sum()) + 1, probs.numel())
    # the set must not cut through tied tokens (then several sets are "the" top-p set)
    assert n_keep == probs.numel() or sorted_probs[n_keep - 1] > sorted_probs[n_keep], "ambiguous test case"
    out = torch.zeros_like(probs)
    out[order[:n_keep]] = sorted_probs[:n_keep] / sorted_probs[:n_keep].sum()
    return out


def reference_sample(logits: torch.Tensor, temperature: float, top_p: float, n: int, seed: int) -> torch.Tensor:
    """n draws from ``reference_probs`` by ``torch.multinomial``."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(reference_probs(logits, temperature, top_p), n, replacement=True, generator=g)


# fixed logits on a 12-token vocabulary: peaked (the top 4 tokens hold > 0.95 at T=0.7), flat, with ties
LOGITS = {
    "peaked": torch.tensor([6.0, 4.5, 4.0, 3.2, 0.5, 0.2, 0.0, -0.4, -1.0, -1.5, -2.0, -3.0]),
    "flat": torch.tensor([0.30, 0.25, 0.22, 0.20, 0.15, 0.12, 0.10, 0.05, 0.02, 0.0, -0.05, -0.1]),
    "ties": torch.tensor([1.1, 2.0, 2.0, 0.6, 2.0, -1.0, 0.3, -0.5, 3.0, 0.0, -2.5, -1.7]),
}
GRID = 20_000


def grid_frequencies(logits: torch.Tensor, temperature: float, top_p: float, candidates: int) -> torch.Tensor:
    """Token frequencies of ``top_p_pick`` over the uniforms (k + 0.5) / GRID: each token's share is
    the length of its inverse-CDF interval up to 1 / GRID, so this measures the exact distribution."""
    u = (torch.arange(GRID, dtype=torch.float64) + 0.5) / GRID
    picks = top_p_pick(logits.repeat(GRID, 1), u, temperature, top_p, candidates)
    return torch.bincount(picks, minlength=logits.numel()).double() / GRID


def shortlist_holds_top_p(logits, temperature, top_p, candidates) -> bool:
    probs = torch.softmax(logits.float() / temperature, -1)
    return bool(probs.topk(candidates).values.double().sum() >= top_p)


SETTINGS = [(0.7, 0.95), (1.0, 0.5), (0.7, 0.3), (1.3, 0.9), (0.7, 1.0), (1.0, 0.7)]
CASES = [(name, t, p) for name in LOGITS for t, p in SETTINGS
         if not (name == "ties" and (t, p) == (1.0, 0.5))]  # that top-p set would cut through a tie


@pytest.mark.parametrize("name, temperature, top_p", CASES)
@pytest.mark.parametrize("candidates", [12, 4])
def test_top_p_pick_has_the_exact_top_p_distribution(name, temperature, top_p, candidates):
    logits = LOGITS[name]
    expected = reference_probs(logits, temperature, top_p)
    got = grid_frequencies(logits, temperature, top_p, candidates)
    assert (got[expected == 0] == 0).all()  # nothing outside the top-p set
    torch.testing.assert_close(got, expected, atol=2.0 / GRID, rtol=0)


def test_both_branches_are_exercised():
    """The cases above cover the shortlist (fast) branch and the full-sort fallback."""
    assert shortlist_holds_top_p(LOGITS["peaked"], 0.7, 0.95, 4)  # fast with 4 candidates
    assert not shortlist_holds_top_p(LOGITS["flat"], 0.7, 0.95, 4)  # falls back
    assert not shortlist_holds_top_p(LOGITS["ties"], 1.3, 0.9, 4)


def test_mixed_batch_matches_the_reference_row_by_row():
    """One call with rows of both branches (peaked rows use the shortlist, flat rows fall back):
    each row still samples its own top-p distribution."""
    rows = torch.stack([LOGITS["peaked"], LOGITS["flat"]] * (GRID // 2))
    u = ((torch.arange(GRID, dtype=torch.float64) // 2) + 0.5) / (GRID // 2)
    picks = top_p_pick(rows, u, 0.7, 0.95, candidates=4)
    for k, name in enumerate(("peaked", "flat")):
        freq = torch.bincount(picks[k::2], minlength=12).double() / (GRID // 2)
        torch.testing.assert_close(freq, reference_probs(LOGITS[name], 0.7, 0.95), atol=2.0 / (GRID // 2), rtol=0)


@pytest.mark.parametrize("top_p", [0.95, 1.0])
def test_work_buffers_give_the_same_picks(top_p):
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 12, generator=g) * torch.linspace(0.5, 8, 64)[:, None]  # flat to peaked rows
    u = torch.rand(64, generator=g, dtype=torch.float64)
    ref = top_p_pick(scores, u, 0.7, top_p, candidates=4)
    mine, work = scores.clone(), torch.empty_like(scores)
    assert torch.equal(top_p_pick(mine, u, 0.7, top_p, candidates=4, work=work), ref)
    assert torch.equal(mine, scores / 0.7)  # divided in place, as documented
    assert torch.equal(work, torch.softmax(scores / 0.7, -1))


@pytest.mark.parametrize("name, top_p, candidates", [("peaked", 0.95, 4), ("flat", 0.95, 4), ("ties", 0.8, 3)])
def test_random_draws_pass_a_chi_square_against_the_reference_multinomial(name, top_p, candidates):
    logits, n = LOGITS[name], 20_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picks = top_p_pick(logits.repeat(n, 1), u, 0.7, top_p, candidates)
    ref = reference_sample(logits, 0.7, top_p, n, seed=2)
    expected = reference_probs(logits, 0.7, top_p)
    keep = expected > 0
    observed = torch.bincount(picks, minlength=12)
    assert (observed[~keep] == 0).all()
    # goodness of fit to the exact probabilities, and the two samples against each other
    assert scipy.stats.chisquare(observed[keep].numpy(), (n * expected[keep]).numpy()).pvalue > 1e-3
    table = torch.stack([observed[keep], torch.bincount(ref, minlength=12)[keep]]).numpy()
    assert scipy.stats.chi2_contingency(table).pvalue > 1e-3


def test_tiny_top_p_is_the_argmax_and_ties_stay_in_the_set():
    u = torch.tensor([0.0, 0.5, 0.999999], dtype=torch.float64)
    picks = top_p_pick(LOGITS["peaked"].repeat(3, 1), u, 0.7, 1e-9)
    assert picks.tolist() == [0, 0, 0]
    # three tokens tie for second place (0.146 each after 0.396 at T=1): top_p 0.7 keeps all three
    logits = LOGITS["ties"]
    expected = reference_probs(logits, 1.0, 0.7)
    assert int((expected > 0).sum()) == 4
    got = grid_frequencies(logits, 1.0, 0.7, 12)
    torch.testing.assert_close(got, expected, atol=2.0 / GRID, rtol=0)


def test_uniforms_drawn_up_front_are_the_per_step_stream():
    """``row_uniforms`` (all steps at once) = ``RowSampler``'s one draw per step, row by row."""
    seeds = [3, 99, 2**62 + 5]
    up_front = decoding.row_uniforms(seeds, 70)
    gens = decoding.row_generators(seeds)
    stepwise = torch.stack([decoding.RowSampler(gens, 1.0, 1.0)._uniforms() for _ in range(70)], dim=1)
    assert torch.equal(up_front, stepwise)


# -- the KV cache ----------------------------------------------------------------------------------------
def test_prealloc_layer_appends_selects_and_repeats_rows():
    layer = decoding.PreallocLayer(max_len=5)
    k = torch.randn(2, 3, 2, 4)
    v = torch.randn(2, 3, 2, 4)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v) and layer.get_seq_length() == 2
    k1, v1 = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
    keys, _ = layer.update(k1, v1)
    assert torch.equal(keys, torch.cat([k, k1], dim=2))
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert torch.equal(layer.keys, torch.cat([k, k1], dim=2)[[1, 1, 0]])
    assert layer.keys.shape == (3, 3, 3, 4) and layer.get_seq_length() == 3
    layer.update(torch.randn(3, 3, 2, 4), torch.randn(3, 3, 2, 4))
    with pytest.raises(RuntimeError, match="exceed max_len"):
        layer.update(torch.randn(3, 3, 1, 4), torch.randn(3, 3, 1, 4))


# -- decode attention and packed linears -------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa_for_one_query(masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, dim = 3, 6, 2, 7, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    q = torch.randn(b, heads, 1, dim, generator=g)
    k, v = torch.randn(b, kv_heads, length, dim, generator=g), torch.randn(b, kv_heads, length, dim, generator=g)
    mask = None
    if masked:  # left padding: row 1 misses its first two positions, row 2 its first one
        mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
        mask[1, ..., :2] = False
        mask[2, ..., :1] = False
    got, _ = decoding.decode_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert got.shape == ref.shape == (b, 1, heads, dim)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    # a prefill (several queries) is sdpa's own
    q3 = torch.randn(b, heads, 3, dim, generator=g)
    torch.testing.assert_close(decoding.decode_attention(module, q3, k, v, None, scaling=0.3)[0],
                               sdpa_attention_forward(module, q3, k, v, None, scaling=0.3)[0])


def test_decode_attention_is_switched_on_for_sdpa_models_only(tokenizer):
    model = make_tiny_lm(tokenizer, layers=1)
    assert model.config._attn_implementation == "sdpa"
    with decoding.decode_attention_on(model):
        assert model.config._attn_implementation == decoding.DECODE_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    with decoding.decode_attention_on(model):
        assert model.config._attn_implementation == "eager"


needs_bf16 = pytest.mark.skipif(not decoding._packing_available(torch.device("cpu"), True),
                                reason="no native bf16 (oneDNN) on this CPU")


@needs_bf16
def test_packed_linears_equal_the_autocast_linear_and_follow_weight_updates(tokenizer):
    model = make_tiny_lm(tokenizer, layers=1).eval()
    x = torch.randint(0, 1000, (3, 5))
    packed = decoding.PackedLinears()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).logits
        with packed.patch(model, 3):
            got = model(x).logits
            assert all("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
        assert not any("forward" in m.__dict__ for m in model.modules())  # restored
        assert torch.equal(got, ref)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # an in-place update (as an optimizer step)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # a new region: autocast recasts too
        ref2 = model(x).logits
        with packed.patch(model, 3):
            assert torch.equal(model(x).logits, ref2) and not torch.equal(ref2, ref)  # repacked, not stale


# -- the loop on a tiny model ------------------------------------------------------------------------------
STOPS = [2, 0]


@pytest.fixture(scope="module")
def peaked_lm(tokenizer):
    """A tiny random Llama whose next-token distributions are peaked like a trained model's (the
    random one is near-uniform over 49k tokens) and that ends replies now and then (token 2 near the top)."""
    model = make_tiny_lm(tokenizer, layers=3).eval()
    bias = 3 * torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(0))

    def hook(module, inputs, out):
        out = out * 40 + bias
        out[..., 2] = out.max(-1).values - 1.5
        return out

    model.lm_head.register_forward_hook(hook)
    return model


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Prompts of different lengths (left padding), the first one repeated (a shared prefill)."""
    ids = [tokenizer(f"Question {i}: " + "word " * (i % 5), add_special_tokens=False)["input_ids"] for i in range(10)]
    return ids + [ids[0]] * 4


def _loop(model, tokenizer, n_new=20, temperature=0.7, top_p=0.95, **kw):
    return DecodeLoop(model, STOPS, tokenizer.pad_token_id, n_new, temperature, top_p, bf16=False, **kw)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.95), (1.0, 1.0), (0.7, 0.5)])
@pytest.mark.parametrize("compact, share", [(2.0, False), (decoding.COMPACT_FRACTION, True), (0.0, True)])
@pytest.mark.parametrize("padding", [True, False])
def test_same_tokens_as_hf_generate_in_float32(peaked_lm, tokenizer, prompts, temperature, top_p, compact, share,
                                               padding):
    if not padding:  # one prompt length: generate passes no attention mask at all
        prompts = [prompts[1]] * 6 + [prompts[6]] * 6
        assert len({len(p) for p in prompts}) == 1
    seeds = list(range(100, 100 + len(prompts)))
    ref = hf_generate_rows(peaked_lm, prompts, seeds, STOPS, tokenizer.pad_token_id, 20, temperature, top_p, False)
    loop = _loop(peaked_lm, tokenizer, temperature=temperature, top_p=top_p, compact=compact, share_prefill=share)
    assert loop(prompts, seeds) == ref
    if top_p > 0.5 and compact < 1:  # replies end at different steps: finished rows were dropped
        assert loop.compactions > 0


@needs_bf16
def test_bf16_agrees_with_hf_generate_on_most_rows(peaked_lm, tokenizer, prompts):
    """In bf16 the decode attention (float32 scores from the float32 keys) differs from sdpa's (bf16
    keys) in rounding, so a sample can take another token now and then; most rows agree whole."""
    seeds = list(range(100, 100 + len(prompts)))
    ref = hf_generate_rows(peaked_lm, prompts, seeds, STOPS, tokenizer.pad_token_id, 20, 0.7, 0.95, True)
    got = DecodeLoop(peaked_lm, STOPS, tokenizer.pad_token_id, 20, 0.7, 0.95, bf16=True)(prompts, seeds)
    assert sum(a == b for a, b in zip(got, ref)) >= 0.75 * len(ref)
    # with sdpa's attention the rest is bitwise the same: packed linears change no number
    exact = DecodeLoop(peaked_lm, STOPS, tokenizer.pad_token_id, 20, 0.7, 0.95, bf16=True, fast_attention=False)
    assert exact(prompts, seeds) == ref


def test_rows_do_not_depend_on_their_batch_mates(peaked_lm, tokenizer, prompts):
    loop = _loop(peaked_lm, tokenizer, compact=0.0)
    both = loop(prompts, list(range(len(prompts))))
    assert loop.compactions > 0  # mates finished and were dropped around the rows checked
    for i in (0, 3, 9, 12):
        assert loop([prompts[i]], [i]) == [both[i]]
    reordered = loop(prompts[::-1], list(range(len(prompts)))[::-1])
    assert reordered[::-1] == both
    assert loop(prompts[:1], [7]) != loop(prompts[:1], [0])


def test_stop_tokens_end_rows_and_the_loop_stops_when_all_finished(tokenizer, prompts):
    model = make_tiny_lm(tokenizer, layers=2).eval()
    n_new, stop_logit = 12, {}

    def hook(module, inputs, out):
        out = out * 40
        for token, below_max in stop_logit.items():  # a stop token that many logits below the best one
            out[..., token] = out.max(-1).values - below_max
        return out

    model.lm_head.register_forward_hook(hook)
    loop = _loop(model, tokenizer, n_new=n_new)
    stop_logit[0] = -100.0  # token 0 (a stop token) is certain after every prompt: every row ends at once
    rows = loop(prompts, list(range(len(prompts))))
    assert rows == [[0]] * len(prompts) and loop.steps_run == 0
    stop_logit.clear()
    stop_logit[2] = 1.0  # now the other stop token, sometimes
    rows = loop(prompts, list(range(len(prompts))))
    ended = [r for r in rows if r[-1] in STOPS]
    assert ended and len(ended) < len(rows)
    for r in rows:
        assert 1 <= len(r) <= n_new and not set(r[:-1]) & set(STOPS)
        assert r[-1] in STOPS or len(r) == n_new
    stop_logit[2] = 0.0  # likely: every row ends before max_new_tokens, so the loop stops early
    rows = loop(prompts, list(range(len(prompts))))
    assert all(r[-1] in STOPS for r in rows)
    assert loop.steps_run == max(len(r) for r in rows) - 1 < n_new - 1


def test_peft_adapters_apply(tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    base = make_tiny_lm(tokenizer, seed=3, layers=2)
    policy = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    bias = 3 * torch.randn(base.config.vocab_size, generator=torch.Generator().manual_seed(1))
    base.lm_head.register_forward_hook(lambda m, i, out: out * 40 + bias)
    seeds = list(range(len(prompts)))
    got = _loop(policy, tokenizer)(prompts, seeds)
    assert got == hf_generate_rows(policy, prompts, seeds, STOPS, tokenizer.pad_token_id, 20, 0.7, 0.95, False)
    with policy.disable_adapter():
        assert _loop(policy, tokenizer)(prompts, seeds) != got  # the adapters changed the samples


def test_bad_calls(peaked_lm, tokenizer):
    loop = _loop(peaked_lm, tokenizer)
    assert loop([], []) == []
    with pytest.raises(ValueError, match="seeds"):
        loop([[1, 2]], [1, 2])
    with pytest.raises(ValueError, match="at least one token"):
        loop([[]], [1])


# -- the sample file records the engine ------------------------------------------------------------------
def test_sample_file_meta_names_the_engine_and_old_files_are_not_resumed(tiny_backbone, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from rmlib.model.generation import sample_responses

    policy = AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32)
    prompts = [[{"role": "user", "content": "Hi."}]]
    kw = {"n": 2, "max_new_tokens": 3, "bf16": False, "progress": False}
    path = tmp_path / "s.jsonl"
    sample_responses(policy, tokenizer, prompts, ["p"], out_path=path, **kw)
    meta_path = path.with_name(path.name + ".meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["sampler"] == decoding.SAMPLER
    sample_responses(policy, tokenizer, prompts, ["p"], out_path=path, **kw)  # same engine: resumes
    del meta["sampler"]  # as written before the engine was recorded: HF generate
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sampler='hf-generate-rowsampler'"):
        sample_responses(policy, tokenizer, prompts, ["p"], out_path=path, **kw)
    meta_path.write_text(json.dumps({**meta, "sampler": "some-other-engine"}))
    with pytest.raises(ValueError, match="sampler"):
        sample_responses(policy, tokenizer, prompts, ["p"], out_path=path, **kw)
