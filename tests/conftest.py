"""Shared helpers: run the real scripts in subprocesses and read what they print."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# variables that would change how a script decides who it is; tests set them explicitly
LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*|SLURM_.*|OMPI_.*|PMI_.*|DATA_DIR|CHECKPOINT_DIR)$")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def mnist_dir():
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST digits not found in {SHARED_DATA} (the project's shared data folder)")
    return str(SHARED_DATA)


def run(cmd, timeout=300, **kwargs):
    """Run a command; return (returncode, combined stdout+stderr)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kwargs)
    return p.returncode, p.stdout


def start(cmd, **kwargs):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EPOCH_LINE = re.compile(r"^(?:\[default(\d+)\]:)?epoch (\d+)/(\d+) \| .*test acc ([\d.]+)%", re.M)
STARTUP_LINE = re.compile(r"\[rank (\d+)/(\d+)\] local_rank (\d+) host (\S+) device (\S+)")


def epoch_lines(out):
    """[(torchrun local rank prefix or None, epoch, test acc in %)] for each per-epoch summary line."""
    return [(m.group(1), int(m.group(2)), float(m.group(4))) for m in EPOCH_LINE.finditer(out)]


def done_record(out):
    """The final {"event": "done", ...} JSON line; fails the test if there is not exactly one."""
    records = []
    for line in out.splitlines():
        line = re.sub(r"^\[default\d+\]:", "", line).strip()
        if line.startswith("{") and '"event": "done"' in line:
            records.append(json.loads(line))
    assert len(records) == 1, f"expected one done line, got {len(records)}:\n{out[-3000:]}"
    return records[0]


def startup_ranks(out):
    return sorted(int(m.group(1)) for m in STARTUP_LINE.finditer(out))
