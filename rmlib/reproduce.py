"""Run the experiment notebooks with papermill on a parameter preset (``make reproduce``).

    python -m rmlib.reproduce --preset cpu            # every notebook, in dependency order
    python -m rmlib.reproduce --preset smoke --only 02_train_rm
    python -m rmlib.reproduce --preset smoke --prepare-only --out runs/nbval   # for nbval

A preset is ``params/<name>.yaml``: ``requires`` (cpu | gpu | multi_gpu), a ``description``,
``common`` parameters given to every notebook, and one section per notebook stem. Executed
notebooks go to ``runs/<preset>/notebooks/``; a failing notebook stops the run with its name
and failing cell, leaving earlier outputs untouched.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from rmlib.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
PARAMS_DIR = REPO_ROOT / "params"
# dependency order: 02 trains the reward models the others reuse
NOTEBOOK_ORDER = ["02_train_rm", "01_norm_dispersion", "03_overopt_scenarios", "04_bon_curves", "05_rloo"]


class PresetError(ValueError):
    """A preset that is malformed or cannot run on this machine."""


def load_preset(name: str) -> dict:
    path = PARAMS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(known)}")
    preset = yaml.safe_load(path.read_text()) or {}
    if not isinstance(preset, dict) or "notebooks" not in preset:
        raise PresetError(f"{path}: expected a mapping with a 'notebooks' section")
    return preset


def check_machine(name: str, preset: dict) -> None:
    """Fail at once, with the reason, when the preset needs hardware this machine lacks."""
    import torch

    needs = preset.get("requires", "cpu")
    gpus = torch.cuda.device_count()
    if needs == "gpu" and gpus < 1:
        raise PresetError(f"preset {name!r} needs a CUDA GPU; this machine has none (use --preset cpu)")
    if needs == "multi_gpu" and gpus < 2:
        raise PresetError(f"preset {name!r} needs several GPUs launched with accelerate; this machine has {gpus}")


def notebook_parameters(name: str, preset: dict, stem: str) -> dict:
    params = {"preset": name}
    params.update(preset.get("common") or {})
    params.update((preset["notebooks"] or {}).get(stem) or {})
    return params


def check_parameters(name: str, preset: dict, stems: list[str]) -> None:
    """Fail before anything runs when the preset gives a notebook a parameter its ``parameters``
    cell does not define (papermill itself would only warn and inject it anyway)."""
    import papermill as pm

    for stem in stems:
        accepted = set(pm.inspect_notebook(str(NOTEBOOK_DIR / f"{stem}.ipynb")))
        unknown = sorted(set(notebook_parameters(name, preset, stem)) - accepted)
        if unknown:
            raise PresetError(f"preset {name!r} ({PARAMS_DIR / (name + '.yaml')}) gives notebook {stem} unknown "
                              f"parameter(s) {unknown}; it accepts: {', '.join(sorted(accepted))}")


def selected_notebooks(preset: dict, only: list[str] | None) -> list[str]:
    stems = [s for s in NOTEBOOK_ORDER if s in (preset["notebooks"] or {}) and (NOTEBOOK_DIR / f"{s}.ipynb").exists()]
    if only:
        unknown = [s for s in only if s not in stems]
        if unknown:
            raise PresetError(f"notebook(s) {unknown} not in this preset; available: {', '.join(stems)}")
        stems = [s for s in stems if s in only]
    return stems


def run(name: str, only: list[str] | None = None, prepare_only: bool = False, out: str | None = None) -> int:
    import papermill as pm

    preset = load_preset(name)
    if not prepare_only:
        check_machine(name, preset)
    stems = selected_notebooks(preset, only)
    check_parameters(name, preset, stems)
    out_dir = Path(out) if out else REPO_ROOT / "runs" / name / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    summary = []
    for i, stem in enumerate(stems, 1):
        params = notebook_parameters(name, preset, stem)
        src, dst = NOTEBOOK_DIR / f"{stem}.ipynb", out_dir / f"{stem}.ipynb"
        print(f"[{i}/{len(stems)}] {stem} (preset {name}) -> {dst.relative_to(REPO_ROOT) if dst.is_relative_to(REPO_ROOT) else dst}",
              flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(src), str(dst), parameters=params, prepare_only=prepare_only,
                                cwd=str(NOTEBOOK_DIR), kernel_name="python3", progress_bar=False,
                                log_output=False)
        except pm.PapermillExecutionError as err:
            print(f"FAILED: {stem}, cell {err.cell_index} (exec count {err.exec_count}): {err.ename}: {err.evalue}\n"
                  f"executed copy with the traceback: {dst}", file=sys.stderr, flush=True)
            return 1
        dt = time.perf_counter() - t0
        summary.append((stem, dt))
        print(f"      done in {dt:.0f} s", flush=True)
    verb = "prepared" if prepare_only else "ran"
    print(f"{verb} {len(summary)} notebook(s) on preset {name} in {time.perf_counter() - t_all:.0f} s: "
          + ", ".join(f"{s} {t:.0f}s" for s, t in summary), flush=True)
    if not prepare_only:  # the results section, from whatever result tables the run has so far
        from rmlib import report

        report.main(["--preset", name])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--only", nargs="*", help="notebook stems to run (default: all of the preset)")
    ap.add_argument("--prepare-only", action="store_true", help="inject parameters, do not execute")
    ap.add_argument("--out", help="folder for the executed notebooks (default runs/<preset>/notebooks)")
    args = ap.parse_args(argv)
    try:
        return run(args.preset, args.only, args.prepare_only, args.out)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
