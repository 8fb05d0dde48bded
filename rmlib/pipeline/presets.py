"""Parameter presets: ``params/<name>.yaml`` -> the parameters of each notebook, checked.

A preset has ``requires`` (cpu | gpu | multi_gpu), a ``description``, ``common`` parameters given
to every notebook and one section per notebook stem. The one place that reads ``params/*.yaml``
(``rmlib.pipeline.reproduce``, ``rmlib.pipeline.report`` and ``rmlib.run`` call it).
"""

from __future__ import annotations

import papermill as pm
import torch
import yaml

from rmlib.core.paths import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


PARAMS_DIR = REPO_ROOT / "params"


# dependency order: 02 trains the sanity RM; 04 trains the shared zoo (gold + proxies) that 01 and 05 read
NOTEBOOK_ORDER = ["02_train_rm", "04_bon_curves", "01_norm_dispersion", "03_overopt_scenarios", "05_rloo"]


# what a preset's ``requires`` may say: the hardware ``check_machine`` asks for
REQUIREMENTS = ("cpu", "gpu", "multi_gpu")


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
    if preset.get("requires", "cpu") not in REQUIREMENTS:  # a typo such as 'cuda' would run anywhere
        raise PresetError(f"{path}: requires {preset['requires']!r}; allowed: {', '.join(REQUIREMENTS)}")
    return preset


def check_machine(name: str, preset: dict) -> None:
    """Fail at once, with the reason, when the preset needs hardware this machine lacks."""

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
