"""A notebook opened in JupyterLab and run as is gives exactly the cpu preset: the defaults of its
``parameters`` cell equal ``params/cpu.yaml`` (common + the notebook's section)."""

from __future__ import annotations

import json

import pytest

from rmlib.pipeline.presets import NOTEBOOK_DIR, load_preset, notebook_parameters

CPU = load_preset("cpu")
STEMS = sorted(CPU["notebooks"])


def parameters_cell_defaults(stem: str) -> dict:
    """The names the notebook's ``parameters`` cell defines, with their values (the cell is run alone)."""
    nb = json.loads((NOTEBOOK_DIR / f"{stem}.ipynb").read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{stem}: expected one cell tagged 'parameters', found {len(cells)}"
    namespace: dict = {}
    exec("".join(cells[0]["source"]), namespace)  # plain assignments of literals
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def same(a, b) -> bool:
    """Equal and of the same type (1 is not 1.0 here, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_the_cpu_preset_covers_every_notebook():
    assert STEMS == sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.mark.parametrize("stem", STEMS)
def test_every_cpu_preset_parameter_is_defined_in_the_notebook(stem):
    defaults = parameters_cell_defaults(stem)
    missing = sorted(set(notebook_parameters("cpu", CPU, stem)) - set(defaults))
    assert not missing, f"{stem}: params/cpu.yaml sets {missing}, which its parameters cell does not define"


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_defaults_equal_the_cpu_preset(stem):
    defaults = parameters_cell_defaults(stem)
    wrong = [f"  {name}: notebook default {defaults[name]!r}, params/cpu.yaml {want!r}"
             for name, want in notebook_parameters("cpu", CPU, stem).items()
             if name in defaults and not same(defaults[name], want)]
    assert not wrong, (f"notebooks/{stem}.ipynb parameters cell differs from the cpu preset:\n" + "\n".join(wrong))
