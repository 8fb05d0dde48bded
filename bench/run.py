"""`make bench`: rmlib vs TRL RewardTrainer and plain loops, measured in one run, one table.

    .venv/bin/python -m bench.run            # full sizes (~71 min on a quiet 2-core machine)
    .venv/bin/python -m bench.run --quick    # every measurement on tiny sizes (minutes): a smoke check

Each measurement (``bench.report.MEASUREMENTS``) runs in its own process (``python -m
bench.measure``) with a fresh ``RMLIB_CACHE_DIR`` (so a bottom store is built from scratch) and
the backbone passed as its resolved local folder; its peak RSS is that process's ``ru_maxrss``
(``os.wait4``). After each measurement the parent rewrites ``results.json`` and ``results.md``
atomically, so a stopped run keeps what it measured. ``--only a,b`` reruns some measurements and
keeps the others from the existing results.json (same sizes required; the report then warns that
its numbers come from several runs).

Timings are only meaningful on a quiet machine: check the load average printed in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"


@dataclass
class Sizes:
    """Workload sizes. Defaults: the full benchmark, sized from the facts in cpu-facts.md (TRL ~0.9
    pairs/s, full FT ~0.75, top-k training ~5, store build ~3 pairs/s) to take ~45 min in all."""

    n_train: int = 400  # training pairs drawn from HH harmless (TRL keeps ~80% at 256 tokens)
    n_eval: int = 300  # held-out pairs every model is scored on
    n_sweep: int = 200  # training pairs of the sweep and of its single-run baseline
    n_score_pairs: int = 100  # held-out pairs whose chosen + rejected replies are scored (2x responses)
    gen_prompts: int = 8  # held-out prompts (<= gen_max_prompt_tokens) for the generation rows
    gen_samples: int = 8  # samples per prompt in the batched run (8 prompts x 8 = two batches of 32)
    gen_batch: int = 32  # sample_responses batch size
    gen_max_new_tokens: int = 128
    gen_max_prompt_tokens: int = 160
    sampling_batches: list[int] = field(default_factory=lambda: [32, 128, 256])  # issue 18's batch sizes
    sampling_prompt_tokens: int = 40
    sampling_new_tokens: int = 64
    rloo_prompts: int = 8  # RLOO: prompts per optimizer step (x rloo_k completions), both trainers
    rloo_k: int = 2  # completions per prompt (BSR paper: k = 2)
    rloo_completion_tokens: int = 64
    rloo_steps: int = 5  # optimizer steps per trainer; the first warms up (median of 4)
    rloo_beta: float = 0.05
    rloo_policy_top_k: int = 2  # trainable top layers of the policy (Coste et al. 2024)
    rloo_max_prompt_tokens: int = 128
    bon_prompts: int = 12  # Best-of-N cost (issue 18): notebook 04's N, max_new_tokens and gold + 8 proxies (~4 min)
    bon_samples: int = 16
    bon_max_new_tokens: int = 80
    bon_proxies: int = 8
    matmul_sizes: list[int] = field(default_factory=lambda: [2048, 3072])  # peak = best median over sizes
    matmul_repeats: int = 5
    max_length: int = 256
    batch_pairs: int = 4  # pairs per training step (both trainers)
    eval_batch_pairs: int = 8
    score_batch: int = 16  # responses per scoring batch
    top_k_layers: int = 4  # rmlib's default fast path: the top 4 of 30 layers train
    learning_rate: float = 1e-5  # rmlib's default; TRL gets the same
    seed: int = 0


# --quick: a handful of pairs (2 training steps), one repeat: proves every measurement runs end to end
QUICK = dict(n_train=8, n_eval=4, n_sweep=4, n_score_pairs=4, gen_prompts=2, gen_samples=16, gen_max_new_tokens=8,
             matmul_sizes=[2048], matmul_repeats=1, sampling_batches=[4, 8], sampling_new_tokens=8,
             rloo_prompts=2, rloo_completion_tokens=8, rloo_steps=2,
             bon_prompts=2, bon_samples=4, bon_max_new_tokens=8, bon_proxies=2)


# the measurements that run on a GPU with --device cuda (issue 20); the others are CPU-only
CUDA_MEASUREMENTS = ("peak", "trl", "rmlib_full_kept", "sampling")


def plan() -> list[tuple[str, dict]]:
    """(measurement name, extra spec fields), in run order."""
    from bench.report import SWEEP_VARIANTS

    return [
        ("peak", {}),
        ("trl", {}),
        ("rmlib_full_kept", {"mode": "full", "subset": "kept"}),
        ("rmlib_topk_kept", {"mode": "topk", "subset": "kept"}),
        ("rmlib_topk_all", {"mode": "topk", "subset": "all"}),
        ("rmlib_lora_kept", {"mode": "lora", "subset": "kept"}),
        ("rmlib_frozen_kept", {"mode": "frozen", "subset": "kept"}),
        ("scoring", {}),
        ("generation", {}),
        ("sampling", {}),
        ("rloo_step", {}),
        ("bon_cost", {}),
        ("sweep_one", {"variants": ["bt"]}),
        ("sweep", {"variants": list(SWEEP_VARIANTS)}),
    ]


# tok/s of the sampling engines at issue 18's batch sizes, measured on a quiet 2-core avx512_bf16 machine
# (HF generate 128-149, raw decode 219-314, rmlib 280-480): the sampling measurement takes ~6 min
SAMPLING_RATES = {"hf": 140.0, "raw": 270.0, "rmlib": 380.0}


def estimate_seconds(z: Sizes) -> float:
    """Rough wall time on a quiet 2-core machine, from the cpu-facts rates (+20 s start-up per process)."""
    kept = 0.8 * z.n_train
    score = 0.2 * 2 * z.n_eval  # plain forward ~0.2 s per sequence, batched
    store_eval = z.n_eval / 3
    gen = z.gen_prompts * z.gen_samples * z.gen_max_new_tokens / 200 + z.gen_prompts * z.gen_max_new_tokens / 15
    sampling = sum(z.sampling_batches) * z.sampling_new_tokens * (1 / SAMPLING_RATES["hf"] + 1 / SAMPLING_RATES["raw"]
                                                                  + 1 / SAMPLING_RATES["rmlib"])
    # RLOO: ~30 s (TRL) + ~12 s (rmlib) per step of 16 completions x 64 tokens, + model loads and the RM build
    rloo = z.rloo_steps * 42 * z.rloo_prompts * z.rloo_k * z.rloo_completion_tokens / (16 * 64) + 60
    bon_samples = z.bon_prompts * z.bon_samples
    bon = (2 * bon_samples * z.bon_max_new_tokens * 0.75 / 280  # sampling twice (~3/4 of max_new_tokens, batch 32)
           + bon_samples / 6  # the store build of the path without capture (cpu-facts: ~3 pairs/s)
           + 2 * (1 + z.bon_proxies) * (3 + bon_samples / 150)  # two scorings: load + top layers per model
           + 6 * (1 + z.bon_proxies))  # building, saving, and looking up the models
    return (14 * 20 + 5 + rloo + bon
            + kept / 0.9 + score  # TRL
            + kept / 0.75 + score  # full
            + kept * (1 / 3 + 1 / 5) + store_eval  # top-k, kept
            + z.n_train * (1 / 3 + 1 / 5) + store_eval  # top-k, all
            + kept / 0.9 + score  # lora (backward through every layer, like full)
            + kept * (1 / 3 + 1 / 50) + store_eval  # frozen (head only on the stored final layer)
            + 2 * z.n_score_pairs * (0.2 + 0.3 + 0.15 + 0.03)  # scoring
            + gen + sampling
            + z.n_sweep * (1 / 3 + 1 / 5)  # one BT run
            + z.n_sweep * (1 / 3 + 3 / 5 + 3 * 2 / 5) + 6 * 5)  # sweep (GRM runs ~2x: LM head on replies)


def machine_info() -> dict:
    import torch
    import transformers
    import trl

    cpu_model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model == "?":
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        cpu_model = platform.processor() or "?"
    isa = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    mem = None
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    return {"cpu_model": cpu_model, "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_bytes": mem, "bf16_isa": ", ".join(isa) or "none found (bf16 emulated)",
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def run_child(name: str, spec: dict, run_id: str, keep_temp: bool = False) -> dict:
    """Run ``python -m bench.measure`` for one measurement in a fresh process and cache folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f"rmlib-bench-{name}-"))
    spec_file, result_file = tmp / "spec.json", tmp / "result.json"
    spec_file.write_text(json.dumps({**spec, "name": name}))
    env = dict(os.environ)
    env.pop("RMLIB_FASTPATH", None)  # measure the default path
    env["RMLIB_BF16"] = "1" if spec["bf16"] else "0"  # every "auto" in rmlib follows the run's precision
    env.update(RMLIB_CACHE_DIR=str(tmp / "cache"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(spec["threads"]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.measure", str(spec_file), str(result_file)], cwd=REPO, env=env)
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C: stop our child, then stop
        proc.terminate()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    record = {"ok": False, "result": None, "error": None, "returncode": proc.returncode, "run_id": run_id,
              "started": started, "wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024}
    if result_file.exists():
        child = json.loads(result_file.read_text())
        record.update(ok=child["ok"] and proc.returncode == 0, result=child["result"], error=child["error"],
                      torch_threads=child.get("torch_threads"), self_maxrss_bytes=child.get("self_maxrss_bytes"))
    else:
        sig = f" (signal {-proc.returncode}{': killed, out of memory?' if proc.returncode == -9 else ''})" \
            if proc.returncode < 0 else ""
        record["error"] = f"the measurement process ended with exit code {proc.returncode}{sig} and wrote no result"
    if not keep_temp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return record


def write_outputs(results: dict, md_path: Path, json_path: Path) -> None:
    from bench.report import render_markdown
    from rmlib.core.atomic_io import write_json_atomic, write_text_atomic

    write_json_atomic(json_path, results)
    write_text_atomic(md_path, render_markdown(results))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (a handful of pairs, 1-2 training steps, 1 repeat): checks that every measurement "
                         "runs end to end; writes runs/bench/results-quick.{md,json} unless --out is given")
    ap.add_argument("--out", type=Path, default=None,
                    help="Markdown output (default bench/results.md; results.json beside it)")
    ap.add_argument("--only", default="", help="comma-separated measurement names to (re)run; the others are "
                                               "kept from the existing results.json")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="compute precision of every measurement: bf16 autocast or float32; auto = bf16 where bf16 "
                         "matmuls are native (rmlib.core.precision), float32 elsewhere")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the measurements run (issue 20: cuda on one GPU; e.g. --device cuda --only "
                         "peak,trl,rmlib_full_kept,sampling, as rmlib.pipeline.gpu_check runs them)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default: usable CPUs)")
    ap.add_argument("--keep-temp", action="store_true", help="keep each measurement's temp folder (debugging)")
    for f in fields(Sizes):
        if f.type in ("int", "float", int, float):
            ap.add_argument("--" + f.name.replace("_", "-"), type=int if f.type in ("int", int) else float,
                            default=None, help=f"override Sizes.{f.name}")
        elif f.type in ("list[int]", list[int]):
            ap.add_argument("--" + f.name.replace("_", "-"), type=lambda v: [int(x) for x in v.split(",")],
                            default=None, help=f"override Sizes.{f.name} (comma-separated)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from bench.report import MEASUREMENTS, RATIO_LINE_PREFIX

    args = parse_args(argv)
    sizes = Sizes(**QUICK) if args.quick else Sizes()
    sizes = replace(sizes, **{f.name: getattr(args, f.name) for f in fields(Sizes)
                              if getattr(args, f.name, None) is not None})
    md_path = args.out or (REPO / "runs" / "bench" / "results-quick.md" if args.quick else BENCH_DIR / "results.md")
    json_path = md_path.with_suffix(".json")
    threads = args.threads or len(os.sched_getaffinity(0))
    steps = plan()
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(MEASUREMENTS))
    if unknown:
        print(f"unknown measurement(s) {unknown}; known: {', '.join(MEASUREMENTS)}", file=sys.stderr)
        return 2

    from rmlib.reward.variants import VARIANTS

    sweep = next(extra["variants"] for n, extra in steps if n == "sweep")
    if any(v not in VARIANTS for v in sweep):
        print(f"sweep variants {[v for v in sweep if v not in VARIANTS]} are not in rmlib.reward.variants.VARIANTS "
              f"({', '.join(VARIANTS)}); update bench.report.SWEEP_VARIANTS", file=sys.stderr)
        return 2
    from rmlib.model.assets import resolve_model

    backbone = resolve_model("smollm2-135m-instruct")  # the dequantized copy in the normal cache (children: fresh caches)
    from rmlib.core.precision import resolve_bf16

    bf16 = {"bf16": True, "fp32": False}.get(args.precision, None)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: this machine has no CUDA device", file=sys.stderr)
            return 2
        cpu_only = [n for n, _ in steps if (not only or n in only) and n not in CUDA_MEASUREMENTS]
        if cpu_only:
            print(f"--device cuda: {', '.join(cpu_only)} run on the CPU only; pass --only with some of "
                  f"{', '.join(CUDA_MEASUREMENTS)}", file=sys.stderr)
            return 2
    bf16 = resolve_bf16(bf16 if bf16 is not None else "auto", args.device)
    run_id = uuid.uuid4().hex[:12]
    results = {"meta": {}, "measurements": {}}
    if only and json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("meta", {}).get("sizes") != asdict(sizes) or \
                old.get("meta", {}).get("precision", "bf16") != ("bf16" if bf16 else "fp32"):
            print(f"{json_path} was measured with other sizes or precision; rerun everything (no --only) or pass the "
                  "same ones",
                  file=sys.stderr)
            return 2
        results["measurements"] = {k: v for k, v in old.get("measurements", {}).items() if k not in only}
    results["meta"] = {"quick": args.quick, "sizes": asdict(sizes), "threads": threads, "model": "SmolLM2-135M-Instruct",
                       "backbone_path": backbone, "machine": machine_info(), "device": args.device, "precision": "bf16" if bf16 else "fp32", "run_id": run_id,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": _loadavg()}
    todo = [(n, extra) for n, extra in steps if not only or n in only]
    est = estimate_seconds(sizes) * (1.0 if bf16 else 2.5) / 60  # the rates are bf16 ones; fp32 is ~2-3x slower
    print(f"rmlib benchmark{' (QUICK)' if args.quick else ''}: {len(todo)} measurements, one process each, "
          f"{threads} threads, {'bf16 autocast' if bf16 else 'float32'}; estimated ~{est:.0f} min on a quiet 2-core machine; load average now {_loadavg()}",
          flush=True)
    t_all = time.perf_counter()
    failed = []
    for i, (name, extra) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {name}: {MEASUREMENTS[name]} ...", flush=True)
        spec = {"backbone": backbone, "sizes": asdict(sizes), "threads": threads, "bf16": bf16, "device": args.device,
                **extra}
        rec = run_child(name, spec, run_id, keep_temp=args.keep_temp)
        results["measurements"][name] = rec
        state = "done" if rec["ok"] else "FAILED"
        print(f"[{i}/{len(todo)}] {name}: {state} in {rec['wall_seconds']:.0f} s, peak RSS "
              f"{rec['peak_rss_bytes'] / 2 ** 30:.2f} GiB", flush=True)
        if not rec["ok"]:
            failed.append(name)
        results["meta"].update(finished=time.strftime("%Y-%m-%d %H:%M:%S"), loadavg_after=_loadavg(),
                               wall_seconds=time.perf_counter() - t_all)
        write_outputs(results, md_path, json_path)
    line = next((l for l in md_path.read_text().splitlines() if l.startswith(RATIO_LINE_PREFIX)), "")
    print(f"{line}\nwrote {md_path} and {json_path} in {time.perf_counter() - t_all:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks above and in {json_path})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
