"""A notebook opened in JupyterLab and run as is gives exactly the cpu preset: the defaults of its
``parameters`` cell equal ``params/cpu.yaml`` (common + the notebook's section)."""

from __future__ import annotations

import json

import pytest

from rmlib.model.assets import MODELS
from rmlib.pipeline.presets import (
    NOTEBOOK_DIR,
    PARAMS_DIR,
    load_preset,
    notebook_parameters,
)

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


# Every other preset (gpu_local, gpu, paper_*, smoke): its keys must be names the notebooks' parameters
# cells define today, so that a renamed or removed notebook parameter fails here, not on a GPU machine.
PRESETS = sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parameter_is_defined_in_its_notebook(preset):
    spec = load_preset(preset)
    unknown = {stem: sorted(set(notebook_parameters(preset, spec, stem)) - set(parameters_cell_defaults(stem)))
               for stem in spec["notebooks"]}
    unknown = {stem: names for stem, names in unknown.items() if names}
    assert not unknown, f"params/{preset}.yaml sets parameters its notebooks do not define: {unknown}"


def test_gpu_local_values_have_the_types_of_the_notebook_defaults():
    """gpu_local runs unattended on a borrowed GPU: 2 where the notebook has 2.0 (or a string where it
    has a list) must fail here, before the run."""
    spec = load_preset("gpu_local")
    wrong = []
    for stem in spec["notebooks"]:
        defaults = parameters_cell_defaults(stem)
        for name, value in notebook_parameters("gpu_local", spec, stem).items():
            if name in defaults and defaults[name] is not None and type(value) is not type(defaults[name]):
                wrong.append(f"{stem}.{name}: {value!r} ({type(value).__name__}), notebook default "
                             f"{defaults[name]!r} ({type(defaults[name]).__name__})")
    assert not wrong, "params/gpu_local.yaml:\n" + "\n".join(wrong)


def test_gpu_local_needs_a_gpu_uses_local_models_only_and_writes_under_its_own_run_dir():
    spec = load_preset("gpu_local")
    assert spec["requires"] == "gpu"
    run_dir = spec["common"]["run_dir"]
    assert run_dir == "runs/gpu_local" and spec["common"]["figures_dir"].startswith(run_dir + "/")
    for stem in spec["notebooks"]:
        params = notebook_parameters("gpu_local", spec, stem)
        defaults = parameters_cell_defaults(stem)
        for key in ("backbone", "policy"):  # no hub id: the GPU machine has no network
            model = params.get(key, defaults.get(key))
            if model is not None:
                assert model in MODELS, f"{stem}.{key} = {model!r} is not a local model ({', '.join(MODELS)})"
        for key, value in params.items():  # every path a notebook reads or writes is this preset's own
            for path in (value.values() if isinstance(value, dict) else [value]):
                if isinstance(path, str) and path.startswith("runs/"):
                    assert path == run_dir or path.startswith(run_dir + "/"), f"{stem}.{key}: {path} is outside {run_dir}"


def test_a_preset_requiring_unknown_hardware_is_refused(tmp_path, monkeypatch):
    from rmlib.pipeline import presets

    (tmp_path / "typo.yaml").write_text("requires: cuda\nnotebooks: {}\n")
    monkeypatch.setattr(presets, "PARAMS_DIR", tmp_path)
    with pytest.raises(presets.PresetError, match="requires 'cuda'; allowed: cpu, gpu, multi_gpu"):
        presets.load_preset("typo")


def test_gpu_local_asks_for_no_more_data_than_the_local_copy_holds(hh_pairs, tokenizer):
    """The counts of notebooks 03, 04 and 05 fit the local data, with the notebooks' own selection
    code (a count above what a side holds raises there, after minutes on the GPU)."""
    from rmlib.analysis import scenarios, synthetic_gold
    from rmlib.data import load_alpaca_eval_responses
    from rmlib.rloo import prompts as rloo_prompts

    spec = load_preset("gpu_local")
    nb = {stem: {**parameters_cell_defaults(stem), **notebook_parameters("gpu_local", spec, stem)}
          for stem in ("03_overopt_scenarios", "04_bon_curves", "05_rloo")}
    responses = load_alpaca_eval_responses()
    p = nb["03_overopt_scenarios"]
    split3 = scenarios.make_scenarios(responses, n_train_pairs=p["n_train_pairs"],
                                      max_pairs_per_prompt=p["max_pairs_per_prompt"], seed=p["seed"])
    assert len(split3.train_pairs) == p["n_train_pairs"]
    p = nb["04_bon_curves"]
    split4 = synthetic_gold.make_gold_split(
        responses, hh_pairs, bon_source=p["bon_source"], n_bon_prompts=p["n_bon_prompts"],
        n_gold_alpaca=p["n_gold_alpaca"], n_gold_hh=p["n_gold_hh"], n_proxy_alpaca=p["n_proxy_alpaca"],
        n_proxy_hh=p["n_proxy_hh"], prompt_frac_gold=p["prompt_frac_gold"],
        max_pairs_per_prompt=p["max_pairs_per_prompt"], seed=p["seed"])
    p = nb["05_rloo"]
    sets = rloo_prompts.build_prompt_sets(p["n_train_prompts"], p["n_eval_prompts"], seed=p["seed"],
                                          sources=p["prompt_sources"],
                                          exclude=sorted(split4.prompts["gold"] | split4.prompts["proxy"]),
                                          tokenizer=tokenizer, max_prompt_tokens=p["max_prompt_tokens"])
    assert len(sets.train) == p["n_train_prompts"] and len(sets.eval) == p["n_eval_prompts"]
