"""The benchmark's arithmetic and its report: parameter and token counts, FLOPs, MFU, ratios,
and the Markdown table written to ``bench/results.md``. Pure functions (no model runs here),
tested in ``tests/test_bench.py`` on made-up numbers.

FLOPs (attention score/value products are left out, as in the usual 6ND count; at <= 256
tokens they are < 5% of SmolLM2-135M's matmul work):
- full fine-tuning: ``6 * N_nonemb * T_real`` (forward 2, backward 4 per parameter and token);
- top-k with the bottom store: the bottom's forward once per stored token,
  ``2 * N_bottom * T_store``, plus training the top, ``6 * N_top * T_top``;
- a plain forward (scoring): ``2 * N * T``.
``N_nonemb``: every decoder layer + final norm + reward head (token embeddings and a tied LM
head are lookups/unused, not matmuls). ``T_real``: non-pad tokens; a plain trainer runs the
prompt once per side (``2P + C + R`` per pair), the store runs it once (``P + C + R``).
MFU = FLOPs / seconds / (matmul peak of the run's precision, bf16 or fp32, measured in the same run).
"""

from __future__ import annotations

import math
from typing import Any

RATIO_LINE_PREFIX = "training speed vs TRL RewardTrainer: "
SAMPLING_LINE_PREFIX = "sampling speed vs HF generate: "
# issue 18's targets for the sampling engine, at every batch size
SAMPLING_TARGET_VS_HF = 2.5
SAMPLING_TARGET_OF_RAW = 0.8
RLOO_LINE_PREFIX = "RLOO step speed vs TRL RLOOTrainer: "
RLOO_TARGET = 2.0  # issue 18: rmlib's RLOO step >= 2x TRL's
BON_LINE_PREFIX = "Best-of-N cost per sample vs sampling alone: "
BON_TARGET = 1.3  # issue 18: sample + score by the gold RM and every proxy, per sample, vs sampling alone
ALL_PAIRS_LINE_PREFIX = "all-pairs training speed vs TRL RewardTrainer: "
# the six losses of issue 9, by their names in rmlib.reward.variants.VARIANTS (bench.run checks them first)
SWEEP_VARIANTS = ("bt", "bsr", "center", "grm", "grm_dpo_noref", "bsr_grm")

# measurement name -> one-line description (the order of the run and of the table)
MEASUREMENTS: dict[str, str] = {
    "peak": "bf16 / fp32 matmul peak",
    "trl": "TRL RewardTrainer, its defaults (gradient checkpointing off), TRL-kept pairs",
    "rmlib_full_kept": "rmlib trainer, mode full (plain path), TRL-kept pairs",
    "rmlib_topk_kept": "rmlib trainer, mode topk (bottom store, fresh), TRL-kept pairs",
    "rmlib_topk_all": "rmlib trainer, mode topk (bottom store, fresh), all pairs",
    "rmlib_lora_kept": "rmlib trainer, mode lora (issue 3's mode table), TRL-kept pairs",
    "rmlib_frozen_kept": "rmlib trainer, mode frozen (head only, bottom store, fresh), TRL-kept pairs",
    "scoring": "scoring: batched plain / per-example loop / store path",
    "generation": "generation: sample_responses batch 32 / batch-1 generate",
    "sampling": "sampling engine: rmlib DecodeLoop / HF generate / raw decode forward, several batch sizes",
    "rloo_step": "RLOO step: rmlib shared-bottom top-k RLOO vs TRL RLOOTrainer (plain), same policy and sizes",
    "bon_cost": "Best-of-N cost: sample + score by a gold and every proxy top-k RM (bottom captured while sampling) "
                "vs sampling alone",
    "sweep_one": "one BT run, mode topk, fresh store",
    "sweep": "6-loss sweep, mode topk, fresh store",
}


# -- counts ------------------------------------------------------------------------------------------
def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def param_counts(decoder, head, start_layer: int = 0) -> dict[str, int]:
    """Parameter counts of a decoder (``LlamaModel``-like: embed_tokens, layers, norm) + reward head.

    ``non_embedding`` = layers + final norm + head; ``bottom`` = layers [0, start_layer) (what the
    store runs); ``top`` = layers [start_layer, L) + final norm + head (what top-k trains)."""
    layers = list(decoder.layers)
    if not 0 <= start_layer <= len(layers):
        raise ValueError(f"start_layer={start_layer} must be in [0, {len(layers)}]")
    per_layer = [_numel(layer) for layer in layers]
    norm, head_n = _numel(getattr(decoder, "norm", None)), _numel(head)
    bottom = sum(per_layer[:start_layer])
    top = sum(per_layer[start_layer:]) + norm + head_n
    return {"embedding": _numel(decoder.embed_tokens), "non_embedding": bottom + top, "bottom": bottom, "top": top,
            "layers": len(layers), "start_layer": int(start_layer)}


def token_counts(prompts, chosen, rejected) -> dict[str, Any]:
    """Real (non-pad) tokens of a pair set, from token-id lists.

    ``plain``: what a trainer running whole sequences processes (prompt once per side, 2P + C + R);
    ``store``: what the bottom store computes (each distinct prompt once, then every reply);
    ``prompt_share``: the prompt's share of ``plain``; ``prompt_share_once``: its share of P + C + R."""
    p = sum(len(x) for x in prompts)
    c, r = sum(len(x) for x in chosen), sum(len(x) for x in rejected)
    unique_p = sum(len(x) for x in {tuple(x) for x in prompts})
    plain = 2 * p + c + r
    return {"pairs": len(prompts), "plain": plain, "store": unique_p + c + r,
            "prompt_share": (2 * p / plain) if plain else None,
            "prompt_share_once": (p / (p + c + r)) if plain else None}


# -- FLOPs and MFU -----------------------------------------------------------------------------------
def matmul_flops(n: int) -> float:
    """FLOPs of one (n x n) @ (n x n) matmul."""
    return 2.0 * n ** 3


def full_ft_flops(n_nonemb: int, tokens: int) -> float:
    """Model FLOPs of fine-tuning every layer: 6 * N * T."""
    return 6.0 * n_nonemb * tokens


def forward_flops(n_params: int, tokens: int) -> float:
    return 2.0 * n_params * tokens


def topk_work_flops(n_bottom: int, store_tokens: int, n_top: int, top_tokens: int) -> float:
    """FLOPs top-k training with the store actually does: bottom forward once per stored token +
    6 * N_top per top-layer token."""
    return forward_flops(n_bottom, store_tokens) + full_ft_flops(n_top, top_tokens)


def mfu(flops: float | None, seconds: float | None, peak_flops_per_s: float | None) -> float | None:
    """FLOPs / seconds / peak, or None when a number is missing or not positive."""
    if not flops or not seconds or not peak_flops_per_s or seconds <= 0 or peak_flops_per_s <= 0:
        return None
    return flops / seconds / peak_flops_per_s


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def ratio_line(rmlib_pairs_per_s: float | None, trl_pairs_per_s: float | None, why_missing: str = "") -> str:
    """``training speed vs TRL RewardTrainer: N.NNx`` (the issue's exact form), or ``n/a (...)``."""
    r = ratio(rmlib_pairs_per_s, trl_pairs_per_s)
    return RATIO_LINE_PREFIX + (f"{r:.2f}x" if r is not None else f"n/a ({why_missing or 'not measured'})")


# -- summary of a results.json -----------------------------------------------------------------------
def _result(results: dict, name: str) -> dict | None:
    m = results.get("measurements", {}).get(name)
    return m["result"] if m and m.get("ok") and m.get("result") is not None else None


def _pps(pairs, seconds):
    return pairs / seconds if pairs is not None and seconds else None


def precision_of(results: dict) -> str:
    """'bf16' (bf16 autocast) or 'fp32': what every measurement of the run computed in."""
    return results.get("meta", {}).get("precision", "bf16")


def summarize(results: dict) -> dict[str, Any]:
    """Every derived number of the report (ratios, MFUs), None where its inputs are missing."""
    s: dict[str, Any] = {}
    peak = _result(results, "peak")
    s["peak_bf16"] = peak.get("peak_bf16_flops") if peak else None
    s["peak_fp32"] = peak.get("peak_fp32_flops") if peak else None
    s["precision"] = precision_of(results)
    s["peak"] = pk = s["peak_bf16"] if s["precision"] == "bf16" else s["peak_fp32"]  # MFU against the precision used

    trl = _result(results, "trl")
    if trl:
        s["trl_pps"] = _pps(trl["pairs_trained"], trl["train_seconds"])
        s["trl_mfu"] = mfu(full_ft_flops(trl["params"]["non_embedding"], trl["real_tokens"]), trl["train_seconds"], pk)
    trl_pps = s.get("trl_pps")

    for name in ("rmlib_full_kept", "rmlib_topk_kept", "rmlib_topk_all"):
        r = _result(results, name)
        if not r:
            continue
        d: dict[str, Any] = {}
        store_s = r.get("store_seconds") or 0.0
        d["pps_train"] = _pps(r["pairs"], r["train_seconds"])
        d["pps_incl_store"] = _pps(r["pairs"], r["train_seconds"] + store_s)
        d["ratio_incl_store"] = ratio(d["pps_incl_store"], trl_pps)
        d["ratio_train"] = ratio(d["pps_train"], trl_pps)
        p, t = r["params"], r["tokens"]
        if r["mode"] == "full":
            d["mfu"] = mfu(full_ft_flops(p["non_embedding"], t["plain"]), r["train_seconds"], pk)
        else:
            d["mfu_work_incl_store"] = mfu(topk_work_flops(p["bottom"], t["store"], p["top"], t["plain"]),
                                           r["train_seconds"] + store_s, pk)
            d["mfu_top_train"] = mfu(full_ft_flops(p["top"], t["plain"]), r["train_seconds"], pk)
            d["mfu_store"] = mfu(forward_flops(p["bottom"], t["store"]), store_s, pk)
        s[name] = d

    sc = _result(results, "scoring")
    if sc:
        base = sc["per_example"]["responses_per_second"]
        s["scoring_plain_ratio"] = ratio(sc["plain_batched"]["responses_per_second"], base)
        s["scoring_store_ratio"] = ratio(sc["store_topk"]["responses_per_second"], base)
    gen = _result(results, "generation")
    if gen:
        s["generation_ratio"] = ratio(gen["batched"]["tokens_per_second"], gen["batch1"]["tokens_per_second"])
    sp = _result(results, "sampling")
    if sp:
        s["sampling"] = [{"batch": r["batch"],
                          "vs_hf": ratio(r["rmlib"]["tokens_per_second"], r["hf_generate"]["tokens_per_second"]),
                          "of_raw": ratio(r["rmlib"]["tokens_per_second"], r["raw_decode"]["tokens_per_second"]),
                          "raw_vs_hf": ratio(r["raw_decode"]["tokens_per_second"],
                                             r["hf_generate"]["tokens_per_second"])}
                         for r in sp["batches"]]
    rl = _result(results, "rloo_step")
    if rl:
        s["rloo_ratio"] = ratio(rl["trl"]["median_step_seconds"], rl["rmlib"]["median_step_seconds"])
    bon = _result(results, "bon_cost")
    if bon:
        alone = bon["sampling_seconds"]
        s["bon_ratio"] = ratio(bon["capture"]["sample_seconds"] + bon["capture"]["score_seconds"], alone)
        s["bon_ratio_plain"] = ratio(alone + bon["plain"]["score_seconds"], alone)
    one, sweep = _result(results, "sweep_one"), _result(results, "sweep")
    if one and sweep:
        s["sweep_ratio"] = ratio(sweep["total_seconds"], one["total_seconds"])
    return s


# -- formatting --------------------------------------------------------------------------------------
def _f(x, fmt: str, suffix: str = "") -> str:
    return "–" if x is None else f"{x:{fmt}}{suffix}"


def _pct(x) -> str:
    return _f(None if x is None else 100 * x, ".1f", "%")


def _x(x) -> str:
    return _f(x, ".2f", "x")


def _gib(nbytes) -> str:
    return _f(None if nbytes is None else nbytes / 2 ** 30, ".2f", " GiB")


def _acc(ev: dict | None) -> str:
    if not ev:
        return "–"
    return f"{_pct(ev.get('accuracy_all'))} / {_pct(ev.get('accuracy_kept'))}"


def _rss(results: dict, name: str) -> str:
    m = results.get("measurements", {}).get(name)
    return _gib(m.get("peak_rss_bytes")) if m else "–"


def _status(results: dict, name: str) -> str | None:
    """None when the measurement has a result; else 'not run' or 'FAILED (...)'."""
    m = results.get("measurements", {}).get(name)
    if m is None:
        return "not run"
    if not m.get("ok"):
        err = (m.get("error") or "").strip().splitlines()
        return "FAILED: " + (err[-1][:120] if err else f"exit code {m.get('returncode')}")
    return None


def _table(header: list[str], rows: list[list[str]]) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _yes_no(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def main_rows(results: dict, s: dict) -> list[list[str]]:
    """The rows of the main table: measurement, throughput, vs baseline, accuracy, MFU, RSS."""
    rows: list[list[str]] = []

    def missing(name: str, label: str) -> bool:
        st = _status(results, name)
        if st is not None:
            rows.append([label, st, "", "", "", _rss(results, name)])
        return st is not None

    if not missing("peak", "bf16 matmul peak (same run)"):
        p = _result(results, "peak")
        used = " (same run; the MFU peak)"
        native = "" if p.get("bf16_native", True) else " (emulated: no native bf16 on this CPU)"
        rows.append([f"bf16 matmul peak, {p['best_size']}³{used if s['precision'] == 'bf16' else native}",
                     _f(s["peak_bf16"] / 1e9, ".1f" if s["peak_bf16"] < 10e9 else ".0f", " GFLOP/s"),
                     "–", "–", "–", _rss(results, "peak")])
        rows.append([f"fp32 matmul peak, {p['best_size_fp32']}³{used if s['precision'] == 'fp32' else ''}",
                     _f(s["peak_fp32"] / 1e9, ".0f", " GFLOP/s"),
                     _x(ratio(s["peak_bf16"], s["peak_fp32"])) + " (bf16 vs fp32)", "–", "–", ""])
    if not missing("trl", "TRL RewardTrainer"):
        t = _result(results, "trl")
        rows.append([f"TRL RewardTrainer (defaults, grad. ckpt off), {t['pairs_kept']} kept pairs "
                     f"({t['pairs_dropped']} of {t['pairs_in']} dropped)", _f(s["trl_pps"], ".3f", " pairs/s"),
                     "1.00x (baseline)", _acc(t.get("eval")), _pct(s["trl_mfu"]) + " (model FLOPs)",
                     _rss(results, "trl")])
    if not missing("rmlib_full_kept", "rmlib full fine-tune"):
        r, d = _result(results, "rmlib_full_kept"), s["rmlib_full_kept"]
        rows.append([f"rmlib, mode full (plain path), same {r['pairs']} kept pairs", _f(d["pps_train"], ".3f", " pairs/s"),
                     _x(d["ratio_train"]) + " vs TRL", _acc(r.get("eval")), _pct(d["mfu"]) + " (model FLOPs)",
                     _rss(results, "rmlib_full_kept")])
    for name, what in (("rmlib_topk_kept", "same {n} kept pairs"), ("rmlib_topk_all", "all {n} pairs")):
        if missing(name, f"rmlib, mode topk ({name})"):
            continue
        r, d = _result(results, name), s[name]
        k = r["params"]["layers"] - r["params"]["start_layer"]
        label = f"rmlib, mode topk (top {k} layers), {what.format(n=r['pairs'])}"
        rows.append([label + ", incl. one-time store build", _f(d["pps_incl_store"], ".3f", " pairs/s"),
                     _x(d["ratio_incl_store"]) + " vs TRL", _acc(r.get("eval")),
                     _pct(d["mfu_work_incl_store"]) + " (work done)", _rss(results, name)])
        rows.append([label + ", training only (store built)", _f(d["pps_train"], ".3f", " pairs/s"),
                     _x(d["ratio_train"]) + " vs TRL", "(same model)", _pct(d["mfu_top_train"]) + " (top layers)", ""])
    if not missing("scoring", "scoring"):
        sc = _result(results, "scoring")
        n = sc["responses"]
        rows.append([f"scoring, per-example forward loop (batch 1), {n} responses",
                     _f(sc["per_example"]["responses_per_second"], ".2f", " resp/s"), "1.00x (baseline)", "–", "–",
                     _rss(results, "scoring")])
        rows.append([f"scoring, score_replies batched plain (use_store=False, batch {sc['batch_size']})",
                     _f(sc["plain_batched"]["responses_per_second"], ".2f", " resp/s"),
                     _x(s["scoring_plain_ratio"]) + " vs per-example", "–", "–", "(same process)"])
        rows.append([f"scoring, score_replies store path (top-{sc['top_k_layers']} model, store built)",
                     _f(sc["store_topk"]["responses_per_second"], ".2f", " resp/s"),
                     _x(s["scoring_store_ratio"]) + " vs per-example", "–", "–", "(same process)"])
    if not missing("generation", "generation"):
        g = _result(results, "generation")
        rows.append([f"generation, batch-1 model.generate, {g['prompts']} prompts x {g['max_new_tokens']} new tokens max",
                     _f(g["batch1"]["tokens_per_second"], ".1f", " tok/s"), "1.00x (baseline)", "–", "–",
                     _rss(results, "generation")])
        rows.append([f"generation, sample_responses batch {g['batched']['batch_size']} "
                     f"({g['prompts']} prompts x {g['samples_per_prompt']} samples)",
                     _f(g["batched"]["tokens_per_second"], ".1f", " tok/s"), _x(s["generation_ratio"]) + " vs batch 1",
                     "–", "–", "(same process)"])
    if not missing("sampling", "sampling engine"):
        sp, big = _result(results, "sampling"), s["sampling"][-1]
        r = sp["batches"][-1]
        rows.append([f"sampling, rmlib DecodeLoop, batch {r['batch']}, {sp['prompt_tokens']}-token prompts, "
                     f"{sp['new_tokens']} new tokens (HF generate: {r['hf_generate']['tokens_per_second']:.1f} tok/s)",
                     _f(r["rmlib"]["tokens_per_second"], ".1f", " tok/s"), _x(big["vs_hf"]) + " vs HF generate", "–",
                     _pct(big["of_raw"]) + " of raw decode", _rss(results, "sampling")])
    if not missing("rloo_step", "RLOO step"):
        rl = _result(results, "rloo_step")
        rows.append([f"RLOO step, TRL RLOOTrainer (plain), {rl['prompts_per_step']} prompts x k={rl['k']}, "
                     f"{rl['completion_tokens']} new tokens", _f(rl["trl"]["median_step_seconds"], ".1f", " s/step"),
                     "1.00x (baseline)", "–", "–", _gib(rl["trl"]["peak_rss_bytes"])])
        rows.append(["RLOO step, rmlib shared bottom (mode topk), same sizes",
                     _f(rl["rmlib"]["median_step_seconds"], ".1f", " s/step"), _x(s["rloo_ratio"]) + " vs TRL", "–",
                     "–", _gib(rl["rmlib"]["peak_rss_bytes"])])
    if not missing("bon_cost", "Best-of-N cost"):
        b = _result(results, "bon_cost")
        total = b["capture"]["sample_seconds"] + b["capture"]["score_seconds"]
        rows.append([f"Best-of-N: sample {b['samples']} ({b['prompts']} prompts x {b['samples_per_prompt']}) + score by "
                     f"{b['reward_models']} top-{b['top_k_layers']} RMs, bottom captured while sampling",
                     _f(b["samples"] / total if total else None, ".2f", " samples/s"),
                     _x(s.get("bon_ratio")) + " cost vs sampling alone", "–", "–", _rss(results, "bon_cost")])
    if not missing("sweep_one", "one BT run"):
        o = _result(results, "sweep_one")
        rows.append([f"one BT run, mode topk, {o['pairs']} pairs, fresh store (load + store + train)",
                     _f(o["total_seconds"], ".0f", " s"), "1.00x (baseline)", "–", "–", _rss(results, "sweep_one")])
    if not missing("sweep", "6-loss sweep"):
        w = _result(results, "sweep")
        rows.append([f"6-loss sweep ({', '.join(w['variants'])}), mode topk, {w['pairs']} pairs, fresh store",
                     _f(w["total_seconds"], ".0f", " s"), _x(s.get("sweep_ratio")) + " vs one run (cost)", "–", "–",
                     _rss(results, "sweep")])
    return rows


def mode_rows(results: dict) -> list[list[str]]:
    """One row per fine-tuning mode trained in this run (same pairs, lr, batch, one epoch)."""
    rows = []
    for name in ("rmlib_full_kept", "rmlib_lora_kept", "rmlib_topk_kept", "rmlib_frozen_kept"):
        st = _status(results, name)
        if st is not None:
            rows.append([name.removeprefix("rmlib_").removesuffix("_kept"), st, "", "", "", _rss(results, name)])
            continue
        r = _result(results, name)
        store = r.get("store_seconds")
        rows.append([r["mode"], f"{r['trainable'] / 1e6:.1f}M params" if r.get("trainable") else "?",
                     _f(_pps(r["pairs"], r["train_seconds"]), ".3f", " pairs/s"),
                     _f(store, ".0f", " s") if store else "–", _acc(r.get("eval")), _rss(results, name)])
    return rows


def target_rows(results: dict, s: dict) -> list[list[str]]:
    """The issue's targets against this run's numbers."""
    trl, topk = _result(results, "trl"), _result(results, "rmlib_topk_kept")
    r_main = s.get("rmlib_topk_kept", {}).get("ratio_incl_store")
    acc_trl = (trl or {}).get("eval", {}).get("accuracy_all") if trl else None
    acc_rm = (topk or {}).get("eval", {}).get("accuracy_all") if topk else None
    d_acc = None if acc_trl is None or acc_rm is None else 100 * (acc_rm - acc_trl)
    speed_ok = None if r_main is None else r_main >= 2.0
    acc_ok = None if d_acc is None else abs(d_acc) <= 1.0
    n_eval = ((trl or {}).get("eval") or {}).get("n_all")
    # 95% half-width of a difference of two accuracies near 50% on the same n pairs (independent
    # binomials; an upper bound for paired scoring): what "±1 point" has to be read against.
    noise = None if not n_eval else 100 * 1.96 * (2 * 0.25 / n_eval) ** 0.5
    side = "" if d_acc is None or acc_ok else (" (rmlib higher)" if d_acc > 0 else " (rmlib lower)")
    rows = [["training >= 2.0x TRL pairs/s at the same held-out accuracy (±1 point)",
             f"{_x(r_main)}; accuracy {_pct(acc_rm)} vs TRL {_pct(acc_trl)} "
             f"(Δ {_f(d_acc, '+.1f', ' pt')}; 95% noise of a difference on {n_eval} pairs "
             f"±{_f(noise, '.1f', ' pt')})",
             f"speed: {_yes_no(speed_ok)}, accuracy within ±1 pt: {_yes_no(acc_ok)}{side}"]]
    full_mfu = s.get("rmlib_full_kept", {}).get("mfu")
    topk_mfu = s.get("rmlib_topk_kept", {}).get("mfu_work_incl_store")
    rows.append(["training MFU >= 50%", f"full FT {_pct(full_mfu)} (model FLOPs); top-k {_pct(topk_mfu)} "
                 f"(work done, incl. store)",
                 f"full: {_yes_no(None if full_mfu is None else full_mfu >= 0.5)}, "
                 f"top-k: {_yes_no(None if topk_mfu is None else topk_mfu >= 0.5)}"])
    sp, ss = s.get("scoring_plain_ratio"), s.get("scoring_store_ratio")
    rows.append(["scoring >= 5x per-example", f"batched plain {_x(sp)}; store path {_x(ss)}",
                 f"plain: {_yes_no(None if sp is None else sp >= 5)}, store: {_yes_no(None if ss is None else ss >= 5)}"])
    sw = s.get("sweep_ratio")
    rows.append(["6-loss sweep <= 1.5x one run", _x(sw), _yes_no(None if sw is None else sw <= 1.5)])
    rows.append(sampling_target_row(s))
    rr = s.get("rloo_ratio")
    rows.append([f"RLOO step >= {RLOO_TARGET:.0f}x TRL RLOOTrainer (issue 18)", _x(rr),
                 _yes_no(None if rr is None else rr >= RLOO_TARGET)])
    rows.append(bon_target_row(results, s))
    rss = [m.get("peak_rss_bytes") for m in results.get("measurements", {}).values() if m.get("peak_rss_bytes")]
    rows.append(["`make reproduce` (cpu) < 60 min, peak RSS < 8 GiB",
                 f"not measured by `make bench`; largest peak RSS of a measurement here: {_gib(max(rss) if rss else None)}",
                 "–"])
    return rows


def sampling_line(s: dict, why_missing: str = "") -> str:
    """``sampling speed vs HF generate: N.NNx`` at the largest batch, then the fraction of the raw decode
    throughput and the other batches; or ``n/a (...)``."""
    sp = s.get("sampling")
    if not sp or sp[-1]["vs_hf"] is None:
        return SAMPLING_LINE_PREFIX + f"n/a ({why_missing or 'not measured'})"
    big = sp[-1]
    others = "; ".join(f"batch {r['batch']}: {_x(r['vs_hf'])}, {_pct(r['of_raw'])} of raw" for r in sp[:-1])
    return (SAMPLING_LINE_PREFIX + f"{big['vs_hf']:.2f}x at batch {big['batch']} ({_pct(big['of_raw'])} of the raw "
            f"decode throughput)" + (f"; {others}" if others else ""))


def bon_line(results: dict, s: dict, why_missing: str = "") -> str:
    """``Best-of-N cost per sample vs sampling alone: N.NNx (target <= 1.3x)``, then the path without
    capture and the peak RSS; or ``n/a (...)``."""
    r = s.get("bon_ratio")
    if r is None:
        return BON_LINE_PREFIX + f"n/a ({why_missing or 'not measured'})"
    return (BON_LINE_PREFIX + f"{r:.2f}x (target <= {BON_TARGET}x); without capture (the store built when scoring): "
            f"{_x(s.get('bon_ratio_plain'))}; peak RSS {_rss(results, 'bon_cost')}")


def bon_target_row(results: dict, s: dict) -> list[str]:
    r = s.get("bon_ratio")
    return [f"Best-of-N cost per sample (sample + score by the gold RM and every proxy) <= {BON_TARGET}x sampling "
            "alone (issue 18)", f"{_x(r)} (without capture {_x(s.get('bon_ratio_plain'))}); peak RSS "
            f"{_rss(results, 'bon_cost')}", _yes_no(None if r is None else r <= BON_TARGET)]


def sampling_target_row(s: dict) -> list[str]:
    """Issue 18: >= 2.5x HF generate AND >= 80% of the raw decode forward, at every batch size."""
    sp = s.get("sampling") or []
    got = "; ".join(f"B={r['batch']}: {_x(r['vs_hf'])} vs HF, {_pct(r['of_raw'])} of raw (raw/HF {_x(r['raw_vs_hf'])})"
                    for r in sp) or "not measured"
    ok_hf = [r["vs_hf"] >= SAMPLING_TARGET_VS_HF for r in sp if r["vs_hf"] is not None]
    ok_raw = [r["of_raw"] >= SAMPLING_TARGET_OF_RAW for r in sp if r["of_raw"] is not None]
    met = "–" if not ok_hf else (f"vs HF: {_yes_no(all(ok_hf))} ({sum(ok_hf)} of {len(ok_hf)} batches), "
                                 f"of raw: {_yes_no(all(ok_raw))} ({sum(ok_raw)} of {len(ok_raw)})")
    return [f"sampling >= {SAMPLING_TARGET_VS_HF}x HF generate and >= {SAMPLING_TARGET_OF_RAW:.0%} of the raw decode "
            "forward (issue 18)", got, met]


def sampling_rows(results: dict, s: dict) -> list[list[str]]:
    """One row per batch size of the sampling measurement."""
    sp = _result(results, "sampling")
    if not sp:
        return []
    rows = []
    for r, d in zip(sp["batches"], s["sampling"]):
        m = r["rmlib"]
        rows.append([str(r["batch"]), _f(r["hf_generate"]["tokens_per_second"], ".1f"),
                     _f(r["raw_decode"]["tokens_per_second"], ".1f"), _f(m["tokens_per_second"], ".1f"),
                     _x(d["vs_hf"]), _pct(d["of_raw"]), _x(d["raw_vs_hf"]),
                     f"{m['finished']} / {r['hf_generate']['finished']}", str(m.get("compactions", "–"))])
    return rows


def rloo_line(s: dict, why_missing: str = "") -> str:
    """``RLOO step speed vs TRL RLOOTrainer: N.NNx (target >= 2x)``: TRL's median step time / rmlib's."""
    r = s.get("rloo_ratio")
    got = f"{r:.2f}x" if r is not None else f"n/a ({why_missing or 'not measured'})"
    return RLOO_LINE_PREFIX + got + f" (target >= {RLOO_TARGET:.0f}x)"


def rloo_rows(rl: dict) -> list[list[str]]:
    rows = []
    for kind, label in (("trl", "TRL RLOOTrainer (plain)"), ("rmlib", "rmlib SharedBottomRLOOTrainer")):
        r = rl[kind]
        rows.append([label, _f(r["median_step_seconds"], ".2f"), ", ".join(f"{x:.1f}" for x in r["step_seconds"]),
                     _f(r["mean_completion_tokens"], ".1f"), r.get("reference", "?"),
                     ", ".join(f"{name} ({a} rows shared, {b} plain)" for name, (a, b) in
                               zip(r.get("shared_bottom_rewards") or [], r.get("reward_rows_shared_plain") or []))
                     or "none", _gib(r["peak_rss_bytes"])])
    return rows


GPU_LINE_PREFIX = "GPU training speed, full fine-tuning vs TRL RewardTrainer: "


def render_markdown(results: dict) -> str:
    """The whole ``bench/results.md`` from a ``results.json`` dict."""
    meta = results.get("meta", {})
    s = summarize(results)
    sizes, mach = meta.get("sizes", {}), meta.get("machine", {})
    out = ["# rmlib benchmark (issue 9)", ""]
    if meta.get("quick"):
        out += ["**QUICK MODE: tiny sizes, a check that every measurement runs; these numbers are not a "
                "benchmark.**", ""]
    run_ids = {m.get("run_id") for m in results.get("measurements", {}).values() if m.get("run_id")}
    if len(run_ids) > 1:
        out += [f"**Warning: the measurements come from {len(run_ids)} separate runs (`--only`); ratios between "
                "runs are less reliable than within one.**", ""]
    why = next((f"{n} {st}" for n in ("trl", "rmlib_topk_kept") if (st := _status(results, n))), "")
    main = s.get("rmlib_topk_kept", {}).get("pps_incl_store")
    out.append(ratio_line(main, s.get("trl_pps"), why))
    all_r = s.get("rmlib_topk_all", {}).get("ratio_incl_store")
    out += ["", ALL_PAIRS_LINE_PREFIX + (f"{all_r:.2f}x" if all_r is not None else "n/a")
            + " (rmlib trains every pair, long ones prompt-cut from the left; TRL trains only the pairs it keeps)", ""]
    if meta.get("device") == "cuda":  # issue 20: on a GPU the comparison is full fine-tuning, same data
        full = s.get("rmlib_full_kept", {}).get("ratio_train")
        out += [GPU_LINE_PREFIX + (f"{full:.2f}x" if full is not None else "n/a")
                + f" (rmlib mode full / TRL RewardTrainer, pairs/s on the pairs TRL keeps; GPU: {mach.get('gpu', '?')})", ""]
    out += [f"Machine: {mach.get('cpu_model', '?')}; {mach.get('cpus', '?')} CPUs ({mach.get('cpus_usable', '?')} usable), "
            f"torch {mach.get('torch', '?')} ({meta.get('threads', '?')} threads), transformers "
            f"{mach.get('transformers', '?')}, trl {mach.get('trl', '?')}, Python {mach.get('python', '?')}; "
            f"bf16 matmul in hardware: {mach.get('bf16_isa', '?')}. Load average before / after: "
            f"{meta.get('loadavg_before', '?')} / {meta.get('loadavg_after', '?')}. "
            f"Run {meta.get('started', '?')} – {meta.get('finished', '?')} ({_f(meta.get('wall_seconds'), '.0f', ' s')}).", ""]
    out += [f"Setup: {meta.get('model', '?')}, HH-RLHF harmless-base, {sizes.get('n_train', '?')} training / "
            f"{sizes.get('n_eval', '?')} held-out pairs (seed {sizes.get('seed', '?')}), max length "
            f"{sizes.get('max_length', '?')}, {sizes.get('batch_pairs', '?')} pairs per batch, "
            f"{'bf16 autocast' if s['precision'] == 'bf16' else 'float32'}, AdamW, "
            f"lr {sizes.get('learning_rate', '?')}, 1 epoch, one process per measurement.", ""]
    out.append(_table(["measurement", "throughput", "vs baseline", "held-out acc: all / TRL-kept", "MFU", "peak RSS"],
                      main_rows(results, s)))
    out += ["## Fine-tuning modes (issue 3): what each reaches and costs", ""]
    out.append(_table(["mode", "trainable", "pairs/s (train only)", "store build", "held-out acc: all / TRL-kept",
                       "peak RSS"], mode_rows(results)))
    st = _status(results, "sampling")
    out += ["## Sampling engine (issue 18)", "", sampling_line(s, st or ""), ""]
    sp = _result(results, "sampling")
    if sp:
        out += [f"{sp['prompt_tokens']}-token prompts (distinct), {sp['new_tokens']} new tokens, T={sp['temperature']}, "
                f"top-p {sp['top_p']}, {'bf16 autocast' if s['precision'] == 'bf16' else 'float32'}; tok/s; peak RSS "
                f"of the measurement {_rss(results, 'sampling')}.", ""]
        out.append(_table(["batch", "HF generate", "raw decode (limit)", f"rmlib ({sp.get('sampler', '?')})",
                           "rmlib vs HF", "rmlib of raw", "raw vs HF", "rows finished: rmlib / HF",
                           "compactions"], sampling_rows(results, s)))
    out += ["## RLOO step (issue 18)", "", rloo_line(s, _status(results, "rloo_step") or ""), ""]
    rl = _result(results, "rloo_step")
    if rl:
        out += [f"SmolLM2-135M-Instruct policy, top {rl['policy_top_k']} layers + final norm trainable; proxy: a top-"
                f"{rl['rm_top_k']} reward model of the same backbone; {rl['prompts_per_step']} prompts x k={rl['k']} "
                f"per step, up to {rl['completion_tokens']} new tokens at T=1, beta {rl['beta']}, {rl['steps']} steps per "
                f"trainer (the first warms up), each trainer in its own process.", ""]
        out.append(_table(["trainer", "median s/step", "steps (s)", "mean completion tokens", "reference",
                           "shared-bottom rewards", "peak RSS"], rloo_rows(rl)))
    out += ["## Best-of-N cost (issue 18)", "", bon_line(results, s, _status(results, "bon_cost") or ""), ""]
    bon = _result(results, "bon_cost")
    if bon:
        c = bon["capture"]
        fell = sum(c["fallback"].values())
        out += [f"{bon['prompts']} HH prompts x {bon['samples_per_prompt']} samples ({bon['samples']}; {bon['tokens']} "
                f"tokens), at most {bon['max_new_tokens']} new tokens, batch {bon['batch_size']}; scored by "
                f"{bon['reward_models']} top-{bon['top_k_layers']} reward models (gold + proxies, saved folders, "
                f"untrained weights: the cost is the same; each scoring loads every model from disk, "
                f"{_f(bon.get('rm_load_seconds'), '.1f', ' s')} each, a cost per run that more samples amortize). "
                f"Sampling alone {bon['sampling_seconds']:.1f} s; with "
                f"capture {c['sample_seconds']:.1f} s + scoring {c['score_seconds']:.1f} s (store lookup "
                f"{c['store_lookup_seconds']:.1f} s, once per run, not included); without capture scoring (its store "
                f"build included) {bon['plain']['score_seconds']:.1f} s. Captured {c['captured']} samples, "
                f"{fell} left to the plain build; the same samples with and without capture: "
                f"{_yes_no(bon.get('same_samples'))}; largest score difference of the two paths: "
                f"{_f(bon.get('max_abs_score_diff_capture_vs_plain'), '.2g')}.", ""]
    out += ["## Targets (issue 9)", ""]
    out.append(_table(["target", "this run", "met"], target_rows(results, s)))
    out += ["## Definitions and notes", ""]
    out += notes(results, s)
    return "\n".join(out).rstrip() + "\n"


def notes(results: dict, s: dict) -> list[str]:
    trl = _result(results, "trl")
    full = _result(results, "rmlib_full_kept")
    topk = _result(results, "rmlib_topk_kept")
    lines = [
        "- **Ratio line**: pairs/s of rmlib's default fast path (mode topk, top 4 layers trainable, bottom "
        "store built from scratch in a fresh cache folder, its build time INCLUDED) / TRL RewardTrainer's "
        "pairs/s, both on the same pairs (those TRL keeps at max length 256), measured in this run. Pairs/s "
        "= pairs trained / seconds of `train()` (model loading and tokenization excluded for both).",
        "- **TRL settings**: `RewardConfig` defaults except learning_rate (= rmlib's), num_train_epochs=1 "
        "(its default is 3; rmlib trains 1, and both must see the data equally often for the accuracy "
        "comparison), per_device_train_batch_size=4, max_length=256, bf16 = the run's precision, use_cpu=True, report_to=none, "
        "save_strategy=no, disable_tqdm=True, and **gradient checkpointing off** (`activation_checkpointing=False`, "
        "the new name of `gradient_checkpointing`; its default is on, which recomputes every forward: we "
        "measure it without, the faster and fairer figure). TRL drops "
        "pairs longer than max_length (no truncation) and pads each batch to its longest sequence.",
        "- **Held-out accuracy**: every model scores the same held-out pairs, tokenized by rmlib "
        "(prompt cut from the left to fit 256 tokens); 'all' = every held-out pair, 'TRL-kept' = those TRL "
        "would keep. TRL's model scores with its own forward (`AutoModelForSequenceClassification`: it pools "
        "the rightmost token that is not the pad id; pad = `<|im_end|>` here, and every sequence ends in "
        "`<|im_end|>\\n`, so it pools the final newline, the same token rmlib pools by attention mask).",
        "- **MFU (model FLOPs)**, full fine-tuning and TRL: 6 · N_nonemb · T_real / seconds / matmul peak of the run's precision. "
        "N_nonemb = decoder layers + final norm + reward head (embeddings and the tied LM head excluded); "
        "T_real = non-pad tokens processed (prompt counted once per side). Attention score FLOPs excluded.",
        "- **MFU (work done)**, top-k with the store: (2 · N_bottom · T_store + 6 · N_top · T_top) / (store build "
        "+ training seconds) / the same peak: the FLOPs this path really executes (bottom layers forward once "
        "per distinct prompt and reply token; top layers trained on whole sequences). It is NOT comparable to "
        "the model-FLOPs MFU of full fine-tuning, which counts 6 · N for every layer. '(top layers)': "
        "6 · N_top · T_top / training seconds.",
        "- **Scoring**: the same responses (held-out prompt + chosen / rejected, <= 256 tokens) through "
        "`rmlib.model.scoring.score_replies` with `use_store=False` (length-grouped batches), a per-example "
        "forward loop (batch 1), and `score_replies` on a top-k model whose bottom store holds these "
        "responses already (only the top layers run). One untrained top-k reward model serves all three.",
        "- **Generation**: `rmlib.model.generation.sample_responses` (T=0.7, top-p 0.95, batch 32, n samples per prompt) vs "
        "`model.generate` at batch 1 with the same sampling settings, prompts and max_new_tokens; both warmed "
        "up first. Tokens = generated tokens including the end-of-turn token.",
        "- **Sampling engine**: B distinct HH prompts (chat-formatted, their last 40 tokens), continued by 64 tokens "
        "at T=0.7, top-p 0.95 by three engines in one process, each warmed up: HF `generate` (do_sample, top_k=0, "
        "the prompts' own stop tokens), the raw decode forward (prefill + one forward per token with HF's "
        "DynamicCache, no sampling: the limit a sampler can reach with this forward), and rmlib's `DecodeLoop` "
        "(what `sample_responses` runs: per-row generators, exact top-p, finished rows dropped). Tokens = "
        "generated tokens up to and including the stop token (raw: every row runs all 64). "
        "`sampling speed vs HF generate` = rmlib tok/s / HF generate tok/s at the largest batch.",
        "- **RLOO step**: wall time of one optimizer step (sampling, log-probs, rewards, loss, backward, "
        "optimizer; TrainerCallback on_step_begin to on_step_end), median over the steps after the first. TRL: "
        "`RLOOTrainer` in its plain configuration (HF `generate`, a second full reference model built from the "
        "policy's path, the proxy a `RewardModelFunction` scoring whole re-tokenized sequences), with the settings "
        "rmlib runs it with (`RLOORunConfig.trl_config`: activation checkpointing off, dropout off, one update per "
        "generation, bf16 = the run's precision); rmlib: `SharedBottomRLOOTrainer` (DecodeLoop sampling, one frozen-"
        "bottom forward per completion for policy, reference and proxy). Same policy weights, prompts, k, lengths, "
        "beta and lr. Sampled completions differ (TRL draws from the global RNG, rmlib per row): compare the mean "
        "completion tokens. Peak RSS: each trainer's own spawned process.",
        "- **Sweep**: the six variants of `rmlib.reward.variants.VARIANTS` trained one after another in one process "
        "through `train_reward_model` (mode topk, fresh store: the first run builds it, the others reuse it) "
        "vs one BT run in its own process with its own fresh store; wall seconds include model loading.",
        "- **Peak RSS**: `ru_maxrss` of the measurement's own process (`os.wait4`).",
    ]
    if trl:
        lines.append(
            f"- TRL in this run: {trl['pairs_dropped']} of {trl['pairs_in']} pairs dropped (longer than "
            f"{trl['max_length']} tokens); {_pct(trl.get('pad_fraction'))} of the tokens in its batches were "
            f"padding; {trl['real_tokens']} real tokens trained"
            + (f" (rmlib's encoding of the same pairs: {full['tokens']['plain']})" if full else "") + ".")
    if topk:
        lines.append(f"- Prompt share of the real tokens (TRL-kept pairs): {_pct(topk['tokens'].get('prompt_share'))} "
                     f"of what a plain trainer processes (prompt once per side), "
                     f"{_pct(topk['tokens'].get('prompt_share_once'))} counted once per pair; store build {_f(topk.get('store_seconds'), '.1f', ' s')}, "
                     f"training {_f(topk.get('train_seconds'), '.1f', ' s')}, store-build MFU (forward) "
                     f"{_pct(s.get('rmlib_topk_kept', {}).get('mfu_store'))}.")
    sc = _result(results, "scoring")
    if sc:
        lines.append(f"- Scoring agreement: max |batched − per-example| = {_f(sc.get('max_abs_diff_plain_vs_loop'), '.3g')}, "
                     f"max |store − plain| = {_f(sc.get('max_abs_diff_store_vs_plain'), '.3g')} (bf16 storage rounding); "
                     f"store build for these responses {_f(sc['store_topk'].get('build_seconds'), '.1f', ' s')} (not in the row).")
    w = _result(results, "sweep")
    if w:
        per = ", ".join(f"{r['variant']} {r['seconds']:.0f} s" for r in w["runs"])
        lines.append(f"- Sweep runs: {per}.")
    return lines
