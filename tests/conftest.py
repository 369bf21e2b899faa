"""Session-wide settings: every test writes under a temporary folder, never the home folder.

Built-in datasets are generated once per session into a shared data folder; tests that
need their own folders set the variables again with monkeypatch.
"""

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="finetune-tests-"))
os.environ.setdefault("FINETUNE_DATA_DIR", str(_SESSION_DIR / "data"))
os.environ.setdefault("TORCH_HOME", str(_SESSION_DIR / "torch"))
os.environ["FINETUNE_RUNS_DIR"] = str(_SESSION_DIR / "runs")
os.environ.setdefault("FINETUNE_BUILTIN_EPOCHS", "1")  # builtin weights: a cheap recipe
os.environ.setdefault("FINETUNE_BUILTIN_MAX_STEPS", "3")
os.environ.setdefault("PYTHONHASHSEED", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as workers run (runner.child_env)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME of the test's own: torchvision's cache and the builtin weights start empty."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home
