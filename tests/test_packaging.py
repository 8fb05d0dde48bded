"""pyproject.toml and environment.yml install the same pinned packages; presets fit the notebooks."""

from __future__ import annotations

import tomllib

import papermill as pm
import pytest
import yaml

from rmlib.core.paths import REPO_ROOT
from rmlib.pipeline.presets import (
    NOTEBOOK_DIR,
    PARAMS_DIR,
    load_preset,
    notebook_parameters,
)


def test_environment_yml_lists_the_same_packages_as_pyproject():
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "python=3.11" in env["dependencies"]
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(deps)
    assert "torch==2.13.0" in deps  # pinned: an unpinned torch pulls a multi-GB CUDA build


@pytest.mark.parametrize("preset", sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
def test_every_preset_names_only_parameters_the_notebooks_accept(preset):
    data = load_preset(preset)
    for stem in data["notebooks"]:
        path = NOTEBOOK_DIR / f"{stem}.ipynb"
        assert path.exists(), f"{preset}: no notebook {stem}"
        accepted = set(pm.inspect_notebook(str(path)))
        unknown = set(notebook_parameters(preset, data, stem)) - accepted
        assert not unknown, f"{preset}.yaml gives {stem} unknown parameters {sorted(unknown)}"
