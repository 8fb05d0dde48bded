"""Run the experiment notebooks with papermill on a parameter preset (``make reproduce``).

    python -m rmlib.pipeline.reproduce --preset cpu            # every notebook, in dependency order
    python -m rmlib.pipeline.reproduce --preset smoke --only 02_train_rm
    python -m rmlib.pipeline.reproduce --preset smoke --prepare-only --out runs/nbval   # for nbval

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

import papermill as pm

from rmlib.core.paths import REPO_ROOT
from rmlib.pipeline import report
from rmlib.pipeline.presets import (
    NOTEBOOK_DIR,
    PresetError,
    check_machine,
    check_parameters,
    load_preset,
    notebook_parameters,
    selected_notebooks,
)


def run(name: str, only: list[str] | None = None, prepare_only: bool = False, out: str | None = None) -> int:
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
