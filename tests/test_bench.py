"""The benchmark's logic, not its speeds: FLOP/MFU arithmetic on made-up numbers, the report
writer (every row, the exact ratio line), and the TRL dataset conversion on real HH pairs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `bench` lives at the repo root

from conftest import make_tiny_lm  # noqa: E402

from bench import report  # noqa: E402
from bench.report import (  # noqa: E402
    ALL_PAIRS_LINE_PREFIX,
    RATIO_LINE_PREFIX,
    forward_flops,
    full_ft_flops,
    matmul_flops,
    mfu,
    param_counts,
    ratio_line,
    render_markdown,
    summarize,
    token_counts,
    topk_work_flops,
)

RATIO_RE = re.compile(r"training speed vs TRL RewardTrainer: \d+\.\d\dx")
SAMPLING_RE = re.compile(r"sampling speed vs HF generate: \d+\.\d\dx")


# -- arithmetic ---------------------------------------------------------------------------------------
def test_flops_and_mfu_on_made_up_numbers():
    assert matmul_flops(2048) == 2 * 2048 ** 3
    assert full_ft_flops(100e6, 1000) == 6e11
    assert forward_flops(100e6, 1000) == 2e11
    # bottom 80M params over 600 stored tokens (forward), top 20M params over 1000 tokens (train)
    assert topk_work_flops(80e6, 600, 20e6, 1000) == 2 * 80e6 * 600 + 6 * 20e6 * 1000
    # 6 * 106M * 10,000 tokens in 20 s on a 365 GFLOP/s peak: 6.36e12 / 20 / 3.65e11 = 87.1%
    assert mfu(full_ft_flops(106e6, 10_000), 20.0, 365e9) == pytest.approx(6.36e12 / 20 / 365e9)
    assert mfu(1e12, 0, 365e9) is None and mfu(1e12, 1.0, None) is None and mfu(None, 1.0, 1e9) is None


def test_ratio_line_format():
    line = ratio_line(2.0, 0.8)
    assert line == "training speed vs TRL RewardTrainer: 2.50x" and RATIO_RE.fullmatch(line)
    assert ratio_line(0.9, 0.9) == "training speed vs TRL RewardTrainer: 1.00x"
    assert ratio_line(None, 0.8, "trl failed") == "training speed vs TRL RewardTrainer: n/a (trl failed)"
    assert ratio_line(1.0, 0.0).endswith("n/a (not measured)")


def test_token_counts_count_the_prompt_once_per_side_or_once_in_the_store():
    prompts = [[1, 2, 3], [1, 2, 3], [4, 5]]  # the first two pairs share a prompt
    chosen, rejected = [[7], [8, 9], [7]], [[6, 6], [9], [6]]
    t = token_counts(prompts, chosen, rejected)
    assert t["pairs"] == 3
    assert t["plain"] == 2 * (3 + 3 + 2) + (1 + 2 + 1) + (2 + 1 + 1)  # 16 + 4 + 4
    assert t["store"] == (3 + 2) + (1 + 2 + 1) + (2 + 1 + 1)  # each distinct prompt once
    assert t["prompt_share"] == pytest.approx(16 / 24)
    assert t["prompt_share_once"] == pytest.approx(8 / 16)


def test_param_counts_split_bottom_and_top(tokenizer):
    from rmlib.model.reward_model import RewardModel

    model = RewardModel(make_tiny_lm(tokenizer, layers=4, hidden=32))
    dec = model.decoder
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    c = param_counts(dec, model.head, start_layer=3)
    assert c["embedding"] == len(tokenizer) * 32
    assert c["bottom"] == sum(n(layer) for layer in dec.layers[:3])
    assert c["top"] == n(dec.layers[3]) + n(dec.norm) + n(model.head)
    assert c["non_embedding"] == c["bottom"] + c["top"] == sum(n(layer) for layer in dec.layers) + n(dec.norm) + 32
    assert param_counts(dec, model.head, 0)["bottom"] == 0
    with pytest.raises(ValueError, match="start_layer"):
        param_counts(dec, model.head, 5)


# -- the report ---------------------------------------------------------------------------------------
PARAMS = {"embedding": 28_311_552, "non_embedding": 106_000_000, "bottom": 92_000_000, "top": 14_000_000,
          "layers": 30, "start_layer": 26}
EVAL = {"accuracy_all": 0.60, "accuracy_kept": 0.62, "n_all": 300, "n_kept": 240, "seconds": 50.0}


def _m(result, rss_gib=2.0):
    return {"ok": True, "result": result, "error": None, "returncode": 0, "run_id": "r1", "wall_seconds": 10.0,
            "peak_rss_bytes": int(rss_gib * 2 ** 30)}


def made_up_results() -> dict:
    """Every measurement, with round numbers: TRL 320 pairs in 400 s (0.8 pairs/s); rmlib top-k 320
    pairs in 100 s store + 60 s train (2.0 pairs/s incl. store: 2.50x)."""
    toks = {"pairs": 320, "plain": 100_000, "store": 66_000, "prompt_share": 0.34}
    train = lambda mode, subset, pairs, tr, st, acc: {  # noqa: E731
        "mode": mode, "subset": subset, "pairs": pairs, "steps": pairs // 4, "train_seconds": tr, "store_seconds": st,
        "params": {**PARAMS, "start_layer": 26 if mode == "topk" else 0}, "tokens": toks,
        "eval": {**EVAL, "accuracy_all": acc}}
    m = {
        "peak": _m({"best_size": 2048, "best_size_fp32": 2048, "peak_bf16_flops": 365e9, "peak_fp32_flops": 153e9,
                    "bf16_gflops": {"2048": 365.0}, "fp32_gflops": {"2048": 153.0}}, 0.3),
        "trl": _m({"pairs_in": 400, "pairs_kept": 320, "pairs_dropped": 80, "pairs_trained": 320,
                   "train_seconds": 400.0, "real_tokens": 100_000, "padded_tokens": 156_250, "pad_fraction": 0.36,
                   "max_length": 256, "params": PARAMS, "eval": EVAL}, 6.0),
        "rmlib_full_kept": _m(train("full", "kept", 320, 427.0, None, 0.605), 5.5),
        "rmlib_topk_kept": _m(train("topk", "kept", 320, 60.0, 100.0, 0.595), 2.3),
        "rmlib_topk_all": _m(train("topk", "all", 400, 80.0, 133.0, 0.60), 2.4),
        "scoring": _m({"responses": 200, "batch_size": 16, "top_k_layers": 4,
                       "plain_batched": {"seconds": 40.0, "responses_per_second": 5.0},
                       "per_example": {"seconds": 100.0, "responses_per_second": 2.0},
                       "store_topk": {"seconds": 8.0, "responses_per_second": 25.0, "build_seconds": 30.0},
                       "max_abs_diff_plain_vs_loop": 0.01, "max_abs_diff_store_vs_plain": 0.02}),
        "generation": _m({"prompts": 8, "samples_per_prompt": 8, "max_new_tokens": 128,
                          "batched": {"batch_size": 32, "rows": 64, "tokens": 8000, "seconds": 40.0,
                                      "tokens_per_second": 200.0},
                          "batch1": {"rows": 8, "tokens": 1000, "seconds": 66.7, "tokens_per_second": 15.0}}),
        "sampling": _m({"prompt_tokens": 40, "new_tokens": 64, "temperature": 0.7, "top_p": 0.95,
                        "sampler": "rmlib-decode-v1", "batches": [
                            {"batch": b, "hf_generate": {"seconds": 10.0, "tokens": 10 * hf, "tokens_per_second": hf,
                                                         "finished": 3},
                             "raw_decode": {"seconds": 10.0, "tokens": 10 * raw, "tokens_per_second": raw,
                                            "finished": 0},
                             "rmlib": {"seconds": 10.0, "tokens": 10 * rm, "tokens_per_second": rm, "finished": 4,
                                       "steps": 64, "compactions": 1}}
                            for b, hf, raw, rm in ((32, 100.0, 150.0, 140.0), (256, 100.0, 300.0, 260.0))]}, 1.5),
        "rloo_step": _m({"prompts_per_step": 8, "k": 2, "completion_tokens": 64, "beta": 0.05, "steps": 4,
                         "policy_top_k": 2, "rm_top_k": 4,
                         **{kind: {"kind": kind, "step_seconds": [s * 1.2, s, s, s * 0.9], "median_step_seconds": s,
                                   "mean_completion_tokens": 50.0, "reward_mean": 0.1, "reference": "LlamaForCausalLM",
                                   "shared_bottom_rewards": ["proxy_rm"] if kind == "rmlib" else [],
                                   "reward_rows_shared_plain": [[60, 4]] if kind == "rmlib" else [],
                                   "peak_rss_bytes": rss * 2 ** 30}
                            for kind, s, rss in (("trl", 30.0, 2.5), ("rmlib", 12.0, 1.75))}}, 2.6),
        "bon_cost": _m({"prompts": 12, "samples_per_prompt": 16, "samples": 192, "max_new_tokens": 80,
                        "batch_size": 32, "reward_models": 9, "top_k_layers": 4, "tokens": 12000, "rm_load_seconds": 2.0,
                        "sampling_seconds": 60.0, "plain": {"score_seconds": 45.0},
                        "capture": {"sample_seconds": 62.0, "score_seconds": 16.0, "store_lookup_seconds": 20.0,
                                    "captured": 190, "present": 0, "fallback": {"a reason": 2}},
                        "same_samples": True, "max_abs_score_diff_capture_vs_plain": 0.03}, 2.5),
        "sweep_one": _m({"variants": ["bt"], "pairs": 200, "total_seconds": 100.0,
                         "runs": [{"variant": "bt", "seconds": 100.0, "store_seconds": 60.0, "train_seconds": 35.0}]}),
        "sweep": _m({"variants": list(report.SWEEP_VARIANTS), "pairs": 200, "total_seconds": 400.0,
                     "runs": [{"variant": v, "seconds": 400 / 6, "store_seconds": 1.0, "train_seconds": 50.0}
                              for v in report.SWEEP_VARIANTS]}),
    }
    meta = {"quick": False, "threads": 2, "model": "SmolLM2-135M-Instruct", "started": "s", "finished": "f",
            "wall_seconds": 2400.0, "loadavg_before": "0.1", "loadavg_after": "2.0",
            "sizes": {"n_train": 400, "n_eval": 300, "seed": 0, "max_length": 256, "batch_pairs": 4,
                      "learning_rate": 1e-5},
            "machine": {"cpu_model": "AMD EPYC test", "cpus": 2, "cpus_usable": 2, "torch": "2.13.0",
                        "transformers": "5.23.0", "trl": "1.16.0", "python": "3.11", "bf16_isa": "avx512_bf16"}}
    return {"meta": meta, "measurements": m}


def test_summary_numbers():
    s = summarize(made_up_results())
    assert s["trl_pps"] == pytest.approx(0.8)
    assert s["trl_mfu"] == pytest.approx(6 * 106e6 * 100_000 / 400 / 365e9)
    k = s["rmlib_topk_kept"]
    assert k["pps_incl_store"] == pytest.approx(2.0) and k["ratio_incl_store"] == pytest.approx(2.5)
    assert k["pps_train"] == pytest.approx(320 / 60) and k["ratio_train"] == pytest.approx(320 / 60 / 0.8)
    assert k["mfu_work_incl_store"] == pytest.approx((2 * 92e6 * 66_000 + 6 * 14e6 * 100_000) / 160 / 365e9)
    assert k["mfu_top_train"] == pytest.approx(6 * 14e6 * 100_000 / 60 / 365e9)
    assert k["mfu_store"] == pytest.approx(2 * 92e6 * 66_000 / 100 / 365e9)
    assert s["rmlib_full_kept"]["mfu"] == pytest.approx(6 * 106e6 * 100_000 / 427 / 365e9)
    assert s["rmlib_topk_all"]["ratio_incl_store"] == pytest.approx(400 / 213 / 0.8)
    assert s["scoring_plain_ratio"] == pytest.approx(2.5) and s["scoring_store_ratio"] == pytest.approx(12.5)
    assert s["generation_ratio"] == pytest.approx(200 / 15)
    assert s["sweep_ratio"] == pytest.approx(4.0)
    assert [r["batch"] for r in s["sampling"]] == [32, 256]
    assert s["sampling"][-1]["vs_hf"] == pytest.approx(2.6) and s["sampling"][-1]["of_raw"] == pytest.approx(260 / 300)
    assert s["sampling"][0]["raw_vs_hf"] == pytest.approx(1.5)
    assert s["bon_ratio"] == pytest.approx(78 / 60) and s["bon_ratio_plain"] == pytest.approx(105 / 60)


def test_report_has_every_row_and_one_exact_ratio_line():
    md = render_markdown(made_up_results())
    lines = md.splitlines()
    ratio_lines = [l for l in lines if l.startswith(RATIO_LINE_PREFIX)]
    assert ratio_lines == ["training speed vs TRL RewardTrainer: 2.50x"]
    assert RATIO_RE.fullmatch(ratio_lines[0])
    assert any(l.startswith(ALL_PAIRS_LINE_PREFIX + f"{400 / 213 / 0.8:.2f}x") for l in lines)
    for text in ["bf16 matmul peak, 2048³", "365 GFLOP/s", "fp32 matmul peak", "2.39x (bf16 vs fp32)",
                 "TRL RewardTrainer (defaults, grad. ckpt off), 320 kept pairs (80 of 400 dropped)", "0.800 pairs/s",
                 "mode full (plain path), same 320 kept pairs", "mode topk (top 4 layers), same 320 kept pairs, incl. "
                 "one-time store build", "2.000 pairs/s", "2.50x vs TRL", "training only (store built)",
                 "mode topk (top 4 layers), all 400 pairs", "per-example forward loop", "2.50x vs per-example",
                 "12.50x vs per-example", "batch-1 model.generate", "13.33x vs batch 1", "one BT run",
                 f"6-loss sweep ({', '.join(report.SWEEP_VARIANTS)})", "4.00x vs one run",
                 "(model FLOPs)", "(work done)", "(top layers)", "6.00 GiB", "60.0% / 62.0%", "59.5% / 62.0%",
                 "AMD EPYC test", "torch 2.13.0 (2 threads)", "36.0% of the tokens", "num_train_epochs=1",
                 "activation_checkpointing=False", "## Targets", "## Definitions", "## Sampling engine (issue 18)",
                 "2.60x vs HF generate", "86.7% of raw decode", "rmlib (rmlib-decode-v1)", "1.50 GiB",
                 "| 32 | 100.0 | 150.0 | 140.0 | 1.40x | 93.3% | 1.50x | 4 / 3 | 1 |"]:
        assert text in md, text
    # every main-table row has the same number of cells as its header
    table = [l for l in lines if l.startswith("| ")]
    header = table[0].count(" | ")
    main_rows = table[1 : 1 + len(report.main_rows(made_up_results(), summarize(made_up_results())))]
    assert all(r.count(" | ") == header for r in main_rows)
    assert len(main_rows) == 2 + 1 + 1 + 4 + 3 + 2 + 1 + 2 + 1 + 2  # ..., sampling 1, RLOO 2, Best-of-N 1, sweep 2
    rloo = [l for l in lines if l.startswith(report.RLOO_LINE_PREFIX)]
    assert rloo == ["RLOO step speed vs TRL RLOOTrainer: 2.50x (target >= 2x)"]
    for text in ["RLOO step, TRL RLOOTrainer (plain), 8 prompts x k=2, 64 new tokens | 30.0 s/step",
                 "RLOO step, rmlib shared bottom (mode topk), same sizes | 12.0 s/step | 2.50x vs TRL",
                 "| TRL RLOOTrainer (plain) | 30.00 | 36.0, 30.0, 30.0, 27.0 | 50.0 | LlamaForCausalLM | none | 2.50 GiB |",
                 "| rmlib SharedBottomRLOOTrainer | 12.00 | 14.4, 12.0, 12.0, 10.8 | 50.0 | LlamaForCausalLM | proxy_rm (60 rows "
                 "shared, 4 plain) | 1.75 GiB |", "## RLOO step (issue 18)"]:
        assert text in md, text
    sampling = [l for l in lines if l.startswith(report.SAMPLING_LINE_PREFIX)]
    assert sampling == ["sampling speed vs HF generate: 2.60x at batch 256 (86.7% of the raw decode throughput); "
                        "batch 32: 1.40x, 93.3% of raw"]
    assert SAMPLING_RE.match(sampling[0])
    bon = [l for l in lines if l.startswith(report.BON_LINE_PREFIX)]
    assert bon == ["Best-of-N cost per sample vs sampling alone: 1.30x (target <= 1.3x); without capture (the store "
                   "built when scoring): 1.75x; peak RSS 2.50 GiB"]
    for text in ["## Best-of-N cost (issue 18)", "Captured 190 samples, 2 left to the plain build",
                 "Sampling alone 60.0 s; with capture 62.0 s + scoring 16.0 s", "2.46 samples/s", "2.0 s each",
                 "1.30x cost vs sampling alone"]:
        assert text in md, text
    assert "QUICK" not in md and "Warning" not in md


def test_fp32_run_divides_by_the_fp32_peak_and_says_so():
    res = made_up_results()
    res["meta"]["precision"] = "fp32"
    res["measurements"]["peak"]["result"].update(bf16_native=False, peak_bf16_flops=1.4e9, bf16_gflops={"512": 1.4})
    s = summarize(res)
    assert s["precision"] == "fp32" and s["peak"] == 153e9
    assert s["trl_mfu"] == pytest.approx(6 * 106e6 * 100_000 / 400 / 153e9)
    md = render_markdown(res)
    assert "4 pairs per batch, float32, AdamW" in md
    assert "fp32 matmul peak, 2048³ (same run; the MFU peak)" in md and "(emulated: no native bf16" in md
    assert "1.4 GFLOP/s" in md
    assert summarize(made_up_results())["peak"] == 365e9  # results without a precision: bf16 (older runs)


def test_targets_rows():
    rows = report.target_rows(made_up_results(), summarize(made_up_results()))
    speed = rows[0]
    assert "2.50x" in speed[1] and "Δ -0.5 pt" in speed[1]
    assert speed[2] == "speed: yes, accuracy within ±1 pt: yes"
    n = made_up_results()["measurements"]["trl"]["result"]["eval"]["n_all"]
    assert f"on {n} pairs ±{100 * 1.96 * (0.5 / n) ** 0.5:.1f} pt" in speed[1]
    res = made_up_results()  # rmlib 3 points above TRL: fast enough, but not "the same accuracy"
    res["measurements"]["rmlib_topk_kept"]["result"]["eval"]["accuracy_all"] = (
        res["measurements"]["trl"]["result"]["eval"]["accuracy_all"] + 0.03)
    assert report.target_rows(res, summarize(res))[0][2] == \
        "speed: yes, accuracy within ±1 pt: **no** (rmlib higher)"
    assert rows[3][1] == "4.00x" and rows[3][2] == "**no**"  # sweep 4x > 1.5x
    assert "plain: **no**, store: yes" == rows[2][2]
    samp = next(r for r in rows if r[0].startswith("sampling >= 2.5x"))
    assert "B=256: 2.60x vs HF, 86.7% of raw (raw/HF 3.00x)" in samp[1]
    assert samp[2] == "vs HF: **no** (1 of 2 batches), of raw: yes (2 of 2)"
    assert next(r for r in rows if r[0].startswith("RLOO step >= 2x"))[1:] == ["2.50x", "yes"]
    bon = next(r for r in rows if r[0].startswith("Best-of-N cost per sample"))
    assert bon[1] == "1.30x (without capture 1.75x); peak RSS 2.50 GiB" and bon[2] == "yes"


def test_report_with_a_failed_and_a_missing_measurement():
    res = made_up_results()
    res["meta"]["quick"] = True
    res["measurements"]["trl"] = {"ok": False, "result": None, "error": "Traceback ...\nRuntimeError: boom",
                                  "returncode": 1, "run_id": "r2", "peak_rss_bytes": 2 ** 30}
    del res["measurements"]["sweep"]
    md = render_markdown(res)
    line = next(l for l in md.splitlines() if l.startswith(RATIO_LINE_PREFIX))
    assert line.startswith("training speed vs TRL RewardTrainer: n/a (trl FAILED: RuntimeError: boom")
    assert "QUICK MODE" in md and "2 separate runs" in md
    assert "| 6-loss sweep | not run |" in md
    res["measurements"]["sampling"] = {"ok": False, "result": None, "error": "Traceback\nValueError: no", "returncode": 1}
    del res["measurements"]["bon_cost"]
    md = render_markdown(res)
    assert "sampling speed vs HF generate: n/a (FAILED: ValueError: no)" in md
    assert "| sampling engine | FAILED: ValueError: no |" in md
    assert "– vs TRL" in md  # ratios against a failed baseline are shown as missing
    del res["measurements"]["rloo_step"]
    md = render_markdown(res)
    assert "RLOO step speed vs TRL RLOOTrainer: n/a (not run) (target >= 2x)" in md
    assert "| RLOO step | not run |" in md
    assert "Best-of-N cost per sample vs sampling alone: n/a (not run)" in md


def test_outputs_are_written_atomically(tmp_path):
    from bench.run import write_outputs

    res = made_up_results()
    write_outputs(res, tmp_path / "results.md", tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert (tmp_path / "results.md").read_text() == render_markdown(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temp files left


def test_default_sizes_fit_the_budget_and_quick_is_tiny():
    from bench.run import QUICK, Sizes, estimate_seconds, plan

    # issue 9's ~55 min + issue 18's sampling (~6 min) and RLOO step (~4 min) measurements
    # issue 9's ~55 min + issue 18's sampling measurement (~6 min) and Best-of-N cost (~4.5 min)
    assert estimate_seconds(Sizes()) <= 75 * 60
    quick = Sizes(**QUICK)
    assert quick.n_train <= 16 and quick.n_eval <= 16 and quick.n_sweep <= 16 and quick.matmul_repeats <= 3
    assert quick.rloo_steps <= 2 and quick.rloo_prompts * quick.rloo_k * quick.rloo_completion_tokens <= 64
    assert [n for n, _ in plan()] == list(report.MEASUREMENTS)
    from rmlib.reward.variants import VARIANTS

    assert set(report.SWEEP_VARIANTS) <= set(VARIANTS) and len(report.SWEEP_VARIANTS) == 6


# -- the sampling measurement, run at --quick sizes -----------------------------------------------------
def test_sampling_measurement_runs_at_quick_sizes(tiny_backbone):
    """``bench.measure.measure_sampling`` end to end at the --quick sizes (tiny random backbone, real
    HH prompts): every engine at every batch size, a report table from it."""
    from dataclasses import asdict

    from bench.measure import measure_sampling, sampling_prompts
    from bench.run import QUICK, Sizes
    from rmlib.model.assets import load_tokenizer

    sizes = asdict(Sizes(**QUICK))
    prompts = sampling_prompts(load_tokenizer(tiny_backbone), 8, 40, 0)
    assert len({tuple(p) for p in prompts}) == 8 and {len(p) for p in prompts} == {40}
    res = measure_sampling({"backbone": tiny_backbone, "sizes": sizes, "bf16": False, "threads": 1})
    assert [r["batch"] for r in res["batches"]] == sizes["sampling_batches"]
    for r in res["batches"]:
        assert r["raw_decode"]["tokens"] == r["batch"] * sizes["sampling_new_tokens"]
        for name in ("hf_generate", "raw_decode", "rmlib"):
            assert 0 < r[name]["tokens"] <= r["batch"] * sizes["sampling_new_tokens"]
            assert r[name]["tokens_per_second"] > 0
    results = made_up_results()
    results["measurements"]["sampling"] = _m(res)
    md = render_markdown(results)
    assert SAMPLING_RE.search(md) and f"batch {sizes['sampling_batches'][-1]} (" in md


# -- TRL's dataset format -----------------------------------------------------------------------------
def test_trl_conversion_on_two_real_hh_pairs(hh_pairs, tokenizer):
    from trl.data_utils import is_conversational

    from bench.trl_format import to_trl_dataset, trl_kept_mask, trl_token_ids
    from rmlib.model.encoding import encode_pairs

    pairs = hh_pairs.select(range(2))
    ds = to_trl_dataset(pairs)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 2
    row = ds[0]
    assert is_conversational(row)
    assert row["prompt"] == list(pairs[0]["prompt"])
    assert row["chosen"] == [{"role": "assistant", "content": pairs[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": pairs[0]["rejected"]}]
    # TRL's tokens are rmlib's prompt + reply tokens when nothing needs cutting
    enc, _ = encode_pairs(pairs, tokenizer, max_length=4096)
    for i in range(2):
        for side in ("chosen", "rejected"):
            trl_ids = trl_token_ids(tokenizer, pairs[i]["prompt"], pairs[i][side])
            assert trl_ids == list(enc[i]["prompt_ids"]) + list(enc[i][f"{side}_ids"])
    # the keep rule: both sequences within max_length
    longest = [max(len(trl_token_ids(tokenizer, p["prompt"], p["chosen"])),
                   len(trl_token_ids(tokenizer, p["prompt"], p["rejected"]))) for p in pairs]
    assert trl_kept_mask(pairs, tokenizer, 4096) == [True, True]
    assert trl_kept_mask(pairs, tokenizer, min(longest)) == [n <= min(longest) for n in longest]
    assert trl_kept_mask(pairs, tokenizer, min(longest) - 1) == [False, False]
