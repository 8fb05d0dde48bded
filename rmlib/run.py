"""Rerun one notebook with checked parameters (papermill underneath).

    python -m rmlib.run 01_norm_dispersion -p n_train 600 -p variants '[bt, bsr]'
    python -m rmlib.run notebooks/02_train_rm.ipynb -p loss bsr -p loss_params '{lam: 0.004}' -p run_name bsr
    python -m rmlib.run 03_overopt_scenarios --preset smoke --dry-run     # print the parameters, run nothing

It starts from the preset's parameters for the notebook (``params/<preset>.yaml``: common + the
notebook's section; the notebook's own defaults for the rest) and applies the ``-p NAME VALUE``
overrides. VALUE is read as YAML (``5``, ``1e-3``, ``[bt, bsr]``, ``{lam: 0.004}``, ``true``,
``null``; ``yaml.safe_load``, which also takes ``1e-3`` as a number). Refused before anything runs (exit code 2): a name
the notebook's ``parameters`` cell does not define (with the closest accepted name), and a
value whose type differs from the preset's or the default's (an int where a float is expected
is taken as that float).

A run whose overrides change any value writes into its own folder, ``runs/<preset>-<hash of the
overrides>`` (figures under ``<run_dir>/figures``), unless ``run_dir`` / ``figures_dir`` are given
with ``-p``: it never mixes with, nor sets aside as stale, the preset's own checkpoints and
committed figures. The executed copy goes to ``<run_dir>/notebooks/<stem>.ipynb`` (``--out``).
Paths to other notebooks' outputs stay as the preset gives them (05_rloo's ``proxy_rm_dirs``,
``gold_rm_dir``, ``exclude_prompts_file`` point at 04_bon_curves' run): override them to chain
custom runs.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import papermill as pm
import yaml

from rmlib.core.paths import REPO_ROOT, in_repo
from rmlib.pipeline.presets import (
    NOTEBOOK_DIR,
    PresetError,
    check_machine,
    check_parameters,
    load_preset,
    notebook_parameters,
)

# where the run folder goes; set by the run itself when an override changes a value
LOCATION_PARAMS = ("run_dir", "figures_dir")
# types a parameter takes besides the type of its default / preset value
ALSO_ACCEPTS: dict[str, tuple[type, ...]] = {
    "bf16": (bool,),                        # "auto" | True | False (rmlib.core.precision)
    "max_prompts_per_split": (type(None),),  # None: every prompt (rmlib.analysis.scenarios)
}


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that also reads ``1e-3`` / ``5E4`` as floats (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_value(raw: str):
    return yaml.load(raw, Loader=_Loader)  # a SafeLoader subclass


class ParameterError(ValueError):
    """An override the notebook does not accept: unknown name or wrong type."""


def resolve_notebook(arg: str) -> tuple[str, Path]:
    """``01_norm_dispersion`` or a path to a notebook -> (stem, path)."""
    path = Path(arg).expanduser()
    if path.suffix == ".ipynb" or path.exists():
        if not path.is_file():
            raise PresetError(f"no notebook {path}")
        return path.stem, path.resolve()
    path = NOTEBOOK_DIR / f"{arg}.ipynb"
    if not path.is_file():
        known = sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))
        close = [k for k in known if k.startswith(arg)] or difflib.get_close_matches(arg, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise PresetError(f"no notebook {arg!r}; {hint}available: {', '.join(known)}")
    return arg, path


def notebook_defaults(path: Path) -> dict:
    """The literal defaults of the notebook's ``parameters`` cell (a name whose value is not a
    Python literal maps to ``...``: any type is accepted for it)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise PresetError(f"{path} has no cell tagged 'parameters'")
    source = cells[0]["source"]
    defaults = {}
    for node in ast.parse(source if isinstance(source, str) else "".join(source)).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        defaults[target.id] = ast.literal_eval(node.value)
                    except (ValueError, SyntaxError, TypeError):
                        defaults[target.id] = ...
    return defaults


def accepted_names(path: Path) -> list[str]:
    """The names the ``parameters`` cell defines, in its order (papermill's reading of the cell)."""
    return list(pm.inspect_notebook(str(path)))


def _type_name(t: type) -> str:
    return {type(None): "null", dict: "mapping", list: "list", str: "string", int: "int", float: "float",
            bool: "bool"}.get(t, t.__name__)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def coerce(stem: str, name: str, raw: str, references: list) -> object:
    """``raw`` read as YAML, checked against the types of ``references`` (default, preset value)."""
    try:
        value = read_value(raw)
    except yaml.YAMLError as err:
        raise ParameterError(f"parameter {name!r} for {stem}: {raw!r} is not valid YAML ({err})") from None
    if any(r is ... for r in references):  # a default we could not read: take the value as given
        return value
    allowed = {type(r) for r in references} | set(ALSO_ACCEPTS.get(name, ()))
    if type(value) in allowed:
        return value
    if float in allowed and type(value) is int:  # bool is not taken for a number
        return float(value)
    expected = " or ".join(_a(n) for n in sorted(_type_name(t) for t in allowed))
    hint = (f" (quote it to pass text: -p {name} '\"{raw}\"')"
            if str in allowed and value is not None and not isinstance(value, (list, dict)) else "")
    raise ParameterError(f"parameter {name!r} for {stem} takes {expected}; got {raw!r}, "
                         f"read as {_a(_type_name(type(value)))}{hint}")


def override_hash(changed: dict) -> str:
    blob = json.dumps(changed, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def build_parameters(notebook: str, overrides: list[tuple[str, str]], preset_name: str = "cpu") -> dict:
    """The final parameters of one run of ``notebook`` (stem or path) on ``preset_name`` with the
    ``(name, raw value)`` overrides: a dict with the stem, the path, the preset name, ``params``
    (every parameter the notebook accepts), ``given`` (the overrides, read), ``changed`` (those
    that change a value) and ``custom_dir`` (the run folder chosen here, or None).
    Raises ParameterError (unknown name, wrong type) or PresetError, before anything runs."""
    stem, path = resolve_notebook(notebook)
    preset = load_preset(preset_name)
    base = notebook_parameters(preset_name, preset, stem)
    accepted = accepted_names(path)
    if path == (NOTEBOOK_DIR / f"{stem}.ipynb").resolve():
        check_parameters(preset_name, preset, [stem])
    elif set(base) - set(accepted):  # a copy elsewhere: the same check against that file
        raise PresetError(f"preset {preset_name!r} gives notebook {path} unknown parameter(s) "
                          f"{sorted(set(base) - set(accepted))}; it accepts: {', '.join(sorted(accepted))}")
    defaults = notebook_defaults(path)
    params = {name: defaults.get(name, ...) for name in accepted} | base
    given: dict = {}
    for name, raw in overrides:
        if name not in accepted:
            close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"unknown parameter {name!r} for {stem}{hint}\n"
                                 f"accepted: {', '.join(sorted(accepted))}")
        refs = [v for v in (defaults.get(name, ...), base.get(name, ...)) if v is not ...] or [...]
        given[name] = coerce(stem, name, raw, refs)
    changed = {k: v for k, v in given.items()
               if k not in LOCATION_PARAMS and (v != params.get(k) or type(v) is not type(params.get(k)))}
    params.update(given)
    custom_dir = None
    if changed:
        if "run_dir" not in given:
            params["run_dir"] = custom_dir = f"runs/{preset_name}-{override_hash(changed)}"
        if "figures_dir" not in given:
            params["figures_dir"] = f"{params['run_dir']}/figures"
    params = {k: v for k, v in params.items() if v is not ...}
    return {"stem": stem, "path": path, "preset": preset_name, "params": params, "changed": changed,
            "given": given, "custom_dir": custom_dir}


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def execute(plan: dict, out: str | None = None) -> int:
    params, stem = plan["params"], plan["stem"]
    run_dir = in_repo(params.get("run_dir", f"runs/{plan['preset']}"))
    out_dir = Path(out).expanduser() if out else run_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / f"{stem}.ipynb"
    if plan["changed"]:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"notebook": stem, "preset": plan["preset"], "overrides": plan["changed"]}
        (run_dir / f"overrides_{stem}.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"{stem} (preset {plan['preset']}) -> {_shown(dst)}", flush=True)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(plan["path"]), str(dst), parameters=params, cwd=str(NOTEBOOK_DIR),
                            kernel_name="python3", progress_bar=False, log_output=False)
    except pm.PapermillExecutionError as err:
        print(f"FAILED: {stem}, cell {err.cell_index} (exec count {err.exec_count}): {err.ename}: {err.evalue}\n"
              f"executed copy with the traceback: {dst}", file=sys.stderr, flush=True)
        return 1
    print(f"done in {time.perf_counter() - t0:.0f} s; results under {params.get('run_dir')}, "
          f"figures under {params.get('figures_dir')}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rmlib.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook", help="a stem (01_norm_dispersion) or a path to a notebook")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override one parameter (VALUE read as YAML); repeatable")
    ap.add_argument("--preset", default="cpu", help="params/<preset>.yaml to start from (default cpu)")
    ap.add_argument("--out", help="folder for the executed notebook (default <run_dir>/notebooks)")
    ap.add_argument("--dry-run", action="store_true", help="print the final parameters and exit")
    args = ap.parse_args(argv)
    try:
        plan = build_parameters(args.notebook, [tuple(p) for p in args.parameter], args.preset)
        if not args.dry_run:
            check_machine(args.preset, load_preset(args.preset))
    except (ParameterError, PresetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = plan["params"]
    if plan["changed"]:
        why = "overrides " + ", ".join(f"{k}={v!r}" for k, v in plan["changed"].items())
        print(f"{why}: run_dir {params.get('run_dir')}, figures_dir {params.get('figures_dir')}"
              + ("" if plan["custom_dir"] else " (given)"), flush=True)
    else:
        print(f"the {args.preset} preset's own parameters: run_dir {params.get('run_dir')}, "
              f"figures_dir {params.get('figures_dir')}", flush=True)
    if args.dry_run:
        print(f"parameters for {plan['stem']} ({_shown(plan['path'])}):")
        print(yaml.safe_dump(params, sort_keys=False, default_flow_style=None, width=120).rstrip())
        return 0
    return execute(plan, args.out)


if __name__ == "__main__":
    sys.exit(main())
