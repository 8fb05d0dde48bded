"""``python -m rmlib.run``: overrides are checked before anything runs; a custom run gets its own
folder. No test here executes a notebook (``execute`` / papermill are replaced where it would)."""

from __future__ import annotations

import json

import pytest

from rmlib import run
from rmlib.pipeline.presets import NOTEBOOK_DIR


@pytest.fixture
def no_execution(monkeypatch):
    """Fails the test if a notebook would be executed."""
    def refuse(*args, **kwargs):
        raise AssertionError("a notebook would have been executed")

    monkeypatch.setattr(run, "execute", refuse)


def test_unknown_name_is_refused_with_the_closest_match(capsys, no_execution):
    assert run.main(["03_overopt_scenarios", "-p", "n_train_pair", "5"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'n_train_pair' for 03_overopt_scenarios; did you mean 'n_train_pairs'?" in err
    assert "accepted: backbone, batch_size, bf16, epochs" in err  # the accepted names, listed


def test_unknown_name_without_a_close_match_lists_the_accepted_ones(capsys, no_execution):
    assert run.main(["02_train_rm", "-p", "zzzz", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter 'zzzz' for 02_train_rm" in err and "did you mean" not in err
    assert "loss_params" in err


@pytest.mark.parametrize("name, value, message", [
    ("n_train_pairs", "2.5", "parameter 'n_train_pairs' for 03_overopt_scenarios takes an int; got '2.5', read as a float"),
    ("n_train_pairs", "true", "takes an int; got 'true', read as a bool"),  # a bool is not a number here
    ("variants", "bt", "takes a list; got 'bt', read as a string"),
    ("epochs", "two", "takes a float; got 'two', read as a string"),
    ("backbone", "2024", "takes a string; got '2024', read as an int (quote it"),
    ("seeds", "{a: 1}", "takes a list; got '{a: 1}', read as a mapping"),
    ("max_pairs_per_prompt", "null", "takes an int; got 'null', read as a null"),
])
def test_a_value_of_the_wrong_type_is_refused(capsys, no_execution, name, value, message):
    assert run.main(["03_overopt_scenarios", "-p", name, value]) == 2
    assert message in capsys.readouterr().err


def test_values_are_read_as_yaml_and_an_int_is_taken_for_a_float():
    plan = run.build_parameters("02_train_rm", [("epochs", "2"), ("learning_rate", "1e-4"), ("bf16", "false"),
                                                ("loss_params", "{lam: 0.004}"), ("loss", "bsr")])
    p = plan["params"]
    assert p["epochs"] == 2.0 and type(p["epochs"]) is float
    assert p["learning_rate"] == pytest.approx(1e-4) and p["bf16"] is False
    assert p["loss_params"] == {"lam": 0.004} and p["loss"] == "bsr"
    # max_prompts_per_split takes null (every prompt), as the paper_bsr preset does
    assert run.build_parameters("03_overopt_scenarios", [("max_prompts_per_split", "null")])["params"][
        "max_prompts_per_split"] is None


def test_the_preset_is_the_starting_point():
    cpu = run.build_parameters("03_overopt_scenarios", [])
    assert cpu["params"]["n_train_pairs"] == 300 and cpu["params"]["run_dir"] == "runs/cpu"
    assert cpu["params"]["figures_dir"] == "figures" and not cpu["changed"]
    assert cpu["params"]["batch_size"] == 4  # not in the preset: the notebook's default
    smoke = run.build_parameters("03_overopt_scenarios", [], "smoke")
    assert smoke["params"]["n_train_pairs"] == 16 and smoke["params"]["run_dir"] == "runs/smoke"


def test_overrides_that_change_a_value_get_their_own_run_dir():
    plan = run.build_parameters("02_train_rm", [("loss", "bsr"), ("run_name", "bsr")])
    run_dir = plan["params"]["run_dir"]
    assert run_dir.startswith("runs/cpu-") and len(run_dir) == len("runs/cpu-") + 8
    assert plan["params"]["figures_dir"] == run_dir + "/figures"
    # the same overrides, in any order, give the same folder; other ones another
    again = run.build_parameters("notebooks/02_train_rm.ipynb", [("run_name", "bsr"), ("loss", "bsr")])
    assert again["params"]["run_dir"] == run_dir
    assert run.build_parameters("02_train_rm", [("loss", "bsr")])["params"]["run_dir"] != run_dir
    # an override equal to the preset's value changes nothing: the preset's own folders
    same = run.build_parameters("02_train_rm", [("n_train", "1800"), ("loss", "bt")])
    assert same["params"]["run_dir"] == "runs/cpu" and same["params"]["figures_dir"] == "figures"


def test_run_dir_and_figures_dir_given_by_the_user_are_kept():
    plan = run.build_parameters("02_train_rm", [("loss", "bsr"), ("run_dir", "runs/mine")])
    assert plan["params"]["run_dir"] == "runs/mine" and plan["params"]["figures_dir"] == "runs/mine/figures"
    plan = run.build_parameters("02_train_rm", [("loss", "bsr"), ("run_dir", "runs/a"), ("figures_dir", "runs/b")])
    assert plan["params"]["run_dir"] == "runs/a" and plan["params"]["figures_dir"] == "runs/b"


def test_dry_run_prints_the_final_parameters(capsys, no_execution):
    assert run.main(["03_overopt_scenarios", "-p", "n_train_pairs", "600", "-p", "variants", "[bt, grm]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "n_train_pairs: 600" in out and "variants: [bt, grm]" in out and "max_prompts_per_split: 50" in out
    run_dir = run.build_parameters("03_overopt_scenarios", [("n_train_pairs", "600"), ("variants", "[bt, grm]")])[
        "params"]["run_dir"]
    assert f"run_dir: {run_dir}" in out and f"figures_dir: {run_dir}/figures" in out


def test_a_notebook_path_and_an_unknown_notebook(capsys):
    path = str(NOTEBOOK_DIR / "04_bon_curves.ipynb")
    assert run.main([path, "--dry-run"]) == 0
    assert "n_samples: 96" in capsys.readouterr().out
    assert run.main(["04_bon", "--dry-run"]) == 2
    assert "did you mean '04_bon_curves'?" in capsys.readouterr().err


def test_execution_goes_through_papermill_into_the_run_dir(tmp_path, monkeypatch):
    import papermill as pm

    calls = []
    monkeypatch.setattr(pm, "execute_notebook", lambda src, dst, **kw: calls.append((src, dst, kw)))
    assert run.main(["02_train_rm", "-p", "n_train", "8", "-p", "run_dir", str(tmp_path)]) == 0
    (src, dst, kw), = calls
    assert src.endswith("notebooks/02_train_rm.ipynb") and dst == str(tmp_path / "notebooks" / "02_train_rm.ipynb")
    assert kw["parameters"]["n_train"] == 8 and kw["parameters"]["figures_dir"] == f"{tmp_path}/figures"
    record = json.loads((tmp_path / "overrides_02_train_rm.json").read_text())
    assert record == {"notebook": "02_train_rm", "preset": "cpu", "overrides": {"n_train": 8}}
