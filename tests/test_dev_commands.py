"""The README's first command, as a user runs it: ./dev.sh quickstart (2-process DDP on CPU, gloo)."""
import sys
from pathlib import Path

import pytest

from conftest import REPO, check_training, clean_env, run


def test_quickstart(mnist_dir, tmp_path):
    venv = Path(sys.executable).parent.parent
    marker = venv / ".installed-requirements.txt"
    wanted = "".join((REPO / f).read_text() for f in ("requirements.txt", "requirements-deepspeed.txt",
                                                       "requirements-mpi.txt", "requirements-dev.txt"))
    if not (marker.exists() and marker.read_text() == wanted):
        pytest.skip(f"{venv} was not set up by ./dev.sh from these requirements files; quickstart would reinstall it")
    env = clean_env(VENV=str(venv))  # no DATA_DIR: quickstart finds ../shared/data by itself
    rc, out = run(["bash", str(REPO / "dev.sh"), "quickstart", f"--output-dir={tmp_path}"], env=env, cwd=tmp_path)
    assert "2-process DDP on CPU, data from" in out
    check_training(rc, out, world_size=2, min_acc=94.0)  # global batch 128 for 2 epochs: 95.9% measured
