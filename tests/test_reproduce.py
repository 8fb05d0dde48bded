"""The papermill runner: presets are checked before anything runs."""

from __future__ import annotations

import pytest
import torch

from rmlib.pipeline import reproduce


def test_unknown_preset_lists_the_available_ones(capsys):
    assert reproduce.main(["--preset", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "smoke" in err and "cpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_gpu_preset_fails_at_once_on_a_cpu_machine(capsys):
    assert reproduce.main(["--preset", "gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_unknown_notebook_is_named(capsys):
    assert reproduce.main(["--preset", "smoke", "--only", "99_nothing", "--prepare-only", "--out", "/tmp/x"]) == 2
    assert "99_nothing" in capsys.readouterr().err


def test_prepare_only_injects_the_preset(tmp_path):
    import json

    assert reproduce.main(["--preset", "smoke", "--prepare-only", "--out", str(tmp_path)]) == 0
    nb = json.loads((tmp_path / "02_train_rm.ipynb").read_text())
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "n_train = 16" in "".join(injected[0]["source"])


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal on a machine without several GPUs")
@pytest.mark.parametrize("preset", ["paper_bsr", "paper_grm"])
def test_paper_presets_fail_at_once_without_several_gpus(capsys, preset):
    assert reproduce.main(["--preset", preset]) == 2
    assert "needs several GPUs" in capsys.readouterr().err
