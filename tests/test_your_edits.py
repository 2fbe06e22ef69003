"""The guarantees after a researcher's own edits, made by the tests themselves on a copy of the script: the Dataset
change that docs/your-data.md documents (applied with git apply, so the page and the check cannot drift apart),
more dropout, options of their own types, a worker_init_fn of their own under the forkserver start method, no timing
calls, and an evaluation longer than --dist-timeout. Then: a signal to every process mid-epoch (DataLoader workers
and the forkserver included), and a resume that ends bit-identical to the uninterrupted run; no stacks, no
WARNING; what the checkpoint holds is plain data."""
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import (PYTHON, REPO, check_clean_exit, check_signal_stop, clean_env, copy_alone, done_record,
                      epoch_lines, run_srun_style)

sys.path.insert(0, str(REPO))
import cluster  # noqa: E402

DOC = REPO / "docs" / "your-data.md"


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """The in-process tests run as rank 0 of 1, whatever another test in this process set."""
    monkeypatch.setattr(cluster.launch, "RANK", 0)
    monkeypatch.setattr(cluster.launch, "WORLD_SIZE", 1)
    monkeypatch.setattr(cluster.checkpoints, "_proven", False)


def documented_diff():
    """The ```diff block of docs/your-data.md."""
    [diff] = re.findall(r"^```diff\n(.*?)^```$", DOC.read_text(), re.M | re.S)
    return diff


def edit(path, *changes):
    """Each (old, new) replaced once in the file at `path`; each must be there, as a sed that found nothing fails."""
    text = path.read_text()
    for old, new in changes:
        assert text.count(old) == 1, f"{old!r} is not once in {path.name}"
        text = text.replace(old, new)
    path.write_text(text)


def researchers_copy(folder):
    """mnist_ddp.py and cluster/ in `folder`, made theirs: the documented Dataset change with 2 workers, then channel
    dropout on the convolutions' features (beside the Net's own dropout), a Path option and an enum option, their own
    worker_init_fn (it leaves a file per worker) under forkserver, a first evaluation that SLOW_EVAL slows down, and
    every cluster.TIMES.lap line deleted."""
    script = folder / "mnist_ddp.py"
    copy_alone(folder, "mnist_ddp.py")
    (folder / "your-data.diff").write_text(documented_diff())
    r = subprocess.run(["git", "apply", "--verbose", "your-data.diff"], cwd=folder, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    assert r.returncode == 0, f"docs/your-data.md's diff no longer applies to mnist_ddp.py:\n{r.stdout}"
    edit(script,
         ("import torch.nn.functional as F\n", "import torch.nn.functional as F\n"
                                              "import enum\nfrom pathlib import Path\n"),
         ("# --- options -----", 'class Mode(enum.Enum):\n    FAST, SLOW = "fast", "slow"\n\n\n'
                                 "def mark_worker(worker_id):\n"
                                 '    open(f"worker-{os.getpid()}.started", "w").close()\n\n\n# --- options -----'),
         ('    p.add_argument("--workers"', '    p.add_argument("--notes", type=Path, default=Path("notes.txt"))\n'
                                           '    p.add_argument("--mode", type=Mode, default=Mode.FAST)\n'
                                           '    p.add_argument("--workers"'),
         ("num_workers=args.workers,", 'num_workers=args.workers, worker_init_fn=mark_worker, '
                                       'multiprocessing_context="forkserver",'),
         ("        self.fc2 = nn.Linear(128, 10)\n", "        self.fc2 = nn.Linear(128, 10)\n"
                                                   "        self.drop_channels = nn.Dropout2d(0.1)\n"),
         ("        x = F.max_pool2d(F.relu(self.conv2(x)), 2)\n",
          "        x = self.drop_channels(F.max_pool2d(F.relu(self.conv2(x)), 2))\n"),
         ("    model.eval()\n", "    model.eval()\n"
                                '    time.sleep(float(os.environ.pop("SLOW_EVAL", 0)))  # the first evaluation\n'))
    lines = script.read_text().splitlines(keepends=True)
    script.write_text("".join(line for line in lines if "cluster.TIMES.lap(" not in line))
    assert "TIMES" not in script.read_text()
    return script


TIMEOUT = 10  # --dist-timeout: the first evaluation takes longer than it and the watchdog's margin together


def test_the_documented_dataset_change_and_a_researchers_edits_keep_the_guarantees(tmp_path, mnist_dir):
    script = researchers_copy(tmp_path)
    cmd = [PYTHON, str(script), "--epochs=2", "--batch-size=32", "--workers=2", f"--dist-timeout={TIMEOUT}",
           f"--data-dir={mnist_dir}", "--notes=my notes/today.txt", "--mode=slow"]

    # the uninterrupted run, whose first evaluation outlasts --dist-timeout and the watchdog's margin on both ranks
    slow = TIMEOUT + cluster.hangs.STALL_MARGIN + 2
    rcs, outs = run_srun_style(cmd + ["--output-dir=whole", "--checkpoint-dir=whole-ckpt"], 2, cwd=tmp_path,
                               SLOW_EVAL=slow)
    out = outs[0] + outs[1]
    assert rcs == [0, 0], out[-5000:]
    assert "Python stack" not in out and "WARNING" not in out and "Traceback" not in out, out[-5000:]
    reference = done_record(outs[0])
    assert reference["test_count"] == 10000 and reference["test_acc"] > 0.9, reference
    assert len(set(reference["param_checksums"])) == 1 and [e for _, e, _ in epoch_lines(outs[0])] == [1, 2]
    assert reference["time_split"]["eval"] == 0 and reference["seconds"] > slow, "no laps: evaluation is not timed"
    assert len(list(tmp_path.glob("worker-*.started"))) == 8, "their worker_init_fn: 2 workers x 2 ranks x 2 epochs"
    check_clean_exit(out)

    # SIGUSR1 to every process of the "step": both ranks, their workers, the forkserver; then the resume
    stop = [f"--output-dir={tmp_path / 'out'}", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    check_signal_stop(cmd + stop, tmp_path, expect_checkpoint="epoch_000[01]_step_*.pt", laps=False)
    [saved] = (tmp_path / "ckpt").glob("epoch_*_step_*.pt")
    args = torch.load(saved, weights_only=True)["args"]  # plain data: a str for the Path, the value for the enum
    assert (args["notes"], args["mode"]) == ("my notes/today.txt", "slow"), args
    rcs, outs = run_srun_style(cmd + stop, 2, cwd=tmp_path)
    out = outs[0] + outs[1]
    assert rcs == [0, 0], out[-5000:]
    assert re.search(r"^resumed from \S+_step_\d+\.pt: epoch [01] done and \d+ steps of epoch [12]", outs[0], re.M)
    assert "WARNING" not in out and "Python stack" not in out, out[-5000:]
    assert done_record(outs[0])["param_checksums"] == reference["param_checksums"], \
        "interrupted + resumed != uninterrupted (dropout, random shifts in the workers, forkserver)"


def test_rotation_keeps_the_newest_and_the_last_epochs_end(tmp_path):
    """Time-based checkpoints come every --checkpoint-every minutes mid-epoch; the rotation keeps the newest two by
    the epoch and step they hold, compared as numbers, and the newest epoch's end whatever came after it."""
    names = ["epoch_0009.pt", "epoch_0009_step_0000100.pt", "epoch_0009_step_0000020.pt", "epoch_0010_step_0000001.pt",
             "epoch_0008.pt", "epoch_0008_step_0000500.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    cluster.checkpoints._rotate(str(tmp_path), folders=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_0009.pt", "epoch_0009_step_0000100.pt", "epoch_0010_step_0000001.pt"]
    assert cluster.checkpoints._order("ckpt/epoch_0012_step_0000005.pt") > cluster.checkpoints._order("epoch_0012.pt")


def test_what_a_checkpoint_holds_is_plain_and_the_first_save_proves_it(capsys, monkeypatch):
    """Path, enum, dataclass, Namespace, set and tuple values become data that weights_only loads; a type it cannot
    convert stops the run at its first save, in one ERROR line naming the type, not at the resume days later."""
    import argparse
    import dataclasses
    import enum
    import fractions
    import io
    import pathlib

    class Mode(enum.Enum):
        A = "a"

    @dataclasses.dataclass
    class Config:
        width: int = 3
        where: pathlib.Path = pathlib.Path("x")

    value = {"p": pathlib.Path("a/b"), "m": Mode.A, "c": Config(), "n": argparse.Namespace(k=1), "s": {2},
             "t": (1, "x"), "w": torch.ones(2)}
    buffer = io.BytesIO()
    torch.save(cluster.plain(value), buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=True)
    assert {k: v for k, v in back.items() if k != "w"} == {"p": "a/b", "m": "a", "c": {"width": 3, "where": "x"},
                                                           "n": {"k": 1}, "s": [2], "t": (1, "x")}
    cluster.checkpoints._prove_it_loads(cluster.plain(value), torch.device("cpu"))  # loads: no error
    monkeypatch.setattr(cluster.checkpoints, "_proven", False)  # a new run's first save
    with pytest.raises(SystemExit) as stop:
        cluster.checkpoints._prove_it_loads(cluster.plain({"ratio": fractions.Fraction(1, 3)}), torch.device("cpu"))
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("ERROR: this run's checkpoint would not load again: torch.load(weights_only=True) refuses "
                          "it (UnpicklingError: Unsupported global: GLOBAL fractions.Fraction)") and "HINT" in err, err


def test_the_same_run_guard_covers_every_option_and_names_the_ways_out(capsys, monkeypatch):
    """An option the script never listed (a researcher's --dropout) is part of the run; --epochs and the other
    MAY_CHANGE options are not; a commit change is refused unless --allow-commit-change; the ERROR names
    --init-from."""
    import argparse
    monkeypatch.setenv("GIT_COMMIT", "abc")
    args = argparse.Namespace(lr=0.1, dropout=0.2, epochs=3, output_dir="o", checkpoint_dir="c",
                              allow_commit_change=False)
    saved = cluster.run_record(args, script="s.py")
    assert saved == {"script": "s.py", "dropout": 0.2, "lr": 0.1, "world_size": 1, "git_commit": "abc"}
    cluster.check_same_run("p", saved, cluster.run_record(argparse.Namespace(**{**vars(args), "epochs": 9}),
                                                          script="s.py"))  # --epochs may grow: accepted
    for change, named in [({"dropout": 0.5}, "dropout 0.2 -> 0.5"), ({}, "git_commit abc -> def")]:
        monkeypatch.setenv("GIT_COMMIT", "def" if not change else "abc")
        with pytest.raises(SystemExit):
            cluster.check_same_run("ckpt/epoch_0002.pt", saved, cluster.run_record(
                argparse.Namespace(**{**vars(args), **change}), script="s.py"))
        [err] = capsys.readouterr().err.splitlines()
        assert f"ERROR: ckpt/epoch_0002.pt was written by another run: {named}. HINT:" in err, err
        assert "--init-from ckpt/epoch_0002.pt" in err and ("--allow-commit-change" in err) == (not change), err
    cluster.check_same_run("p", saved, cluster.run_record(argparse.Namespace(**{**vars(args), "allow_commit_change":
                                                                             True}), script="s.py"))


def test_a_job_checkpoints_by_default_in_a_folder_its_requeue_finds(tmp_path, monkeypatch):
    """In a Slurm job --checkpoint-dir defaults to checkpoints/JOBID (an array task's: ARRAYJOB_TASK); 'none' turns
    checkpoints off; outside Slurm there are none unless asked for; --checkpoint-every applies where they are on."""
    import argparse
    monkeypatch.chdir(tmp_path)
    for name, value in (("CHECKPOINT_EVERY", 0), ("RESUME_HINT", "")):  # what parse_args sets: put back after
        monkeypatch.setattr(cluster.stopping, name, value)

    def parse(argv=(), **env):
        return cluster.parse_args(argparse.ArgumentParser(), list(argv), env={k: str(v) for k, v in env.items()})

    assert parse(SLURM_JOB_ID=42).checkpoint_dir == "checkpoints/42"
    assert "checkpoints/42" in cluster.stopping.RESUME_HINT and cluster.stopping.CHECKPOINT_EVERY == 30 * 60
    assert parse(SLURM_JOB_ID=43, SLURM_ARRAY_JOB_ID=40, SLURM_ARRAY_TASK_ID=3).checkpoint_dir == "checkpoints/40_3"
    assert parse(["--checkpoint-dir=none"], SLURM_JOB_ID=42).checkpoint_dir is None
    assert cluster.stopping.CHECKPOINT_EVERY == 0 and cluster.stopping.RESUME_HINT == ""
    assert parse(["--checkpoint-dir=mine", "--checkpoint-every=0.5"], SLURM_JOB_ID=42).checkpoint_dir == "mine"
    assert cluster.stopping.CHECKPOINT_EVERY == 30
    assert parse().checkpoint_dir is None and parse(CHECKPOINT_DIR="env").checkpoint_dir == "env"


# a tiny training process of the researcher's: their Dataset, their worker_init_fn, cluster.DataLoader with 2 workers
# under a start method, cluster's stop handlers noting the signals; it prints what it got and what it noted
WORKERS_UNDER_SIGNALS = """
import os, sys, time, torch
import cluster

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 64
    def __getitem__(self, i):
        time.sleep(0.05)
        return torch.tensor([i])

def theirs(worker_id):
    open(f"theirs-{os.getpid()}", "w").close()

if __name__ == "__main__":
    cluster.stopping.install_handlers()
    loader = cluster.DataLoader(Slow(), 4, seed=0, num_workers=2, worker_init_fn=theirs,
                                multiprocessing_context=sys.argv[1])
    loader.set_epoch(1)
    seen = []
    for batch in loader:
        seen += batch.flatten().tolist()
        if len(seen) == 8:
            print("READY", flush=True)
    print("SEEN", sorted(seen) == list(range(64)), "NOTED", sorted(cluster.stopping.received_signals), flush=True)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_the_loaders_workers_outlive_the_stop_signals_under_every_start_method(method, tmp_path):
    """SIGUSR1 and SIGTERM to every process of the group mid-epoch, as Slurm signals a job step: the workers (and,
    under forkserver, its server) carry on, the training process notes both signals, the epoch ends whole, and the
    researcher's own worker_init_fn ran in each worker."""
    import signal
    import time
    copy_alone(tmp_path, "mnist_ddp.py")  # for cluster/ beside the script
    (tmp_path / "train.py").write_text(WORKERS_UNDER_SIGNALS)
    p = subprocess.Popen([PYTHON, "train.py", method], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, process_group=0, env=clean_env())
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("READY"):
            break
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        os.killpg(p.pid, sig)
        time.sleep(0.2)
    out = "".join(lines) + p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert f"SEEN True NOTED [{int(signal.SIGUSR1)}, {int(signal.SIGTERM)}]" in out, out[-3000:]
    assert len(list(tmp_path.glob("theirs-*"))) == 2, "their own worker_init_fn, in each of the 2 workers"


def test_init_from_reads_every_kind_of_weights_and_checkpoint(tmp_path, capsys):
    """--init-from takes a run's final weights, our .pt checkpoint, FSDP2's DCP folder, DeepSpeed's folder (through
    `latest`), Lightning's .ckpt (keys under "net."), or a checkpoint folder: each loads the same weights into a fresh
    model; a model of other layers is one ERROR line; a checkpoint folder that already holds checkpoints skips it
    (the run resumes those)."""
    import argparse

    from torch.distributed import checkpoint as dcp
    sys.path.insert(0, str(REPO))
    from mnist_ddp import Net
    torch.manual_seed(0)
    weights = Net().state_dict()
    torch.save(weights, tmp_path / "model-1.pt")
    (tmp_path / "pt").mkdir()
    torch.save({"model": weights, "epoch": 2}, tmp_path / "pt" / "epoch_0002.pt")
    dcp.save({"model": weights}, checkpoint_id=tmp_path / "dcp" / "epoch_0002")  # no group: DCP saves as one process
    (tmp_path / "ds" / "epoch_0002").mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("epoch_0002")
    torch.save({"module": weights, "global_steps": 3}, tmp_path / "ds" / "epoch_0002" / "mp_rank_00_model_states.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in weights.items()}}, tmp_path / "last.ckpt")
    sources = ["model-1.pt", "pt/epoch_0002.pt", "pt", "dcp/epoch_0002", "dcp", "ds", "last.ckpt"]
    for source in sources:
        model = Net()
        cluster.init_weights(argparse.Namespace(init_from=str(tmp_path / source), checkpoint_dir=None), model)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items()), source
    assert capsys.readouterr().out.count("its weights, for a new run (a fresh optimizer, epoch 1") == len(sources)

    model = Net()
    cluster.init_weights(argparse.Namespace(init_from=str(tmp_path / "model-1.pt"), checkpoint_dir=tmp_path / "pt"),
                         model)
    assert not torch.equal(model.fc1.weight, weights["fc1.weight"]), "a requeue resumes its own checkpoints instead"
    with pytest.raises(SystemExit):
        cluster.init_weights(argparse.Namespace(init_from=str(tmp_path / "model-1.pt"), checkpoint_dir=None),
                             torch.nn.Linear(3, 2))
    [error] = capsys.readouterr().err.splitlines()
    assert error.startswith(f"ERROR: --init-from {tmp_path / 'model-1.pt'}: RuntimeError: ") and "HINT" in error, error
