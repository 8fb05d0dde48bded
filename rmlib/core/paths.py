"""Where things live. Every location can be overridden by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """Local copies of the preference data: ``$RMLIB_DATA_DIR`` or ``../shared/data`` beside the repo."""
    return Path(os.environ.get("RMLIB_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).expanduser()


def cache_dir() -> Path:
    """Dequantized model copies and other reusable artifacts: ``$RMLIB_CACHE_DIR`` or ``~/.cache/rmlib``."""
    return Path(os.environ.get("RMLIB_CACHE_DIR", Path.home() / ".cache" / "rmlib")).expanduser()


def runs_dir() -> Path:
    """Executed notebooks, checkpoints and result tables: ``$RMLIB_RUNS_DIR`` or ``runs/`` in the repo."""
    return Path(os.environ.get("RMLIB_RUNS_DIR", REPO_ROOT / "runs")).expanduser()


def figures_dir() -> Path:
    """Figures rendered by the notebooks (committed): ``$RMLIB_FIGURES_DIR`` or ``figures/``."""
    return Path(os.environ.get("RMLIB_FIGURES_DIR", REPO_ROOT / "figures")).expanduser()


def in_repo(path: str | os.PathLike) -> Path:
    """A path relative to the repo root (notebooks run with cwd=notebooks/), or absolute as given."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path
