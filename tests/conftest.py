"""Shared helpers: run the real scripts in subprocesses and read what they print."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exit_probe.sitecustomize import PROBE_LINE as EXIT_PROBE_LINE
from imagenet_archives import jpeg_bytes, make_imagenet_archives, make_imagenet_train_tar, tar_add  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# on PYTHONPATH of every run: its sitecustomize.py names the native threads a training script leaves running at exit
EXIT_PROBE = REPO / "tests" / "exit_probe"

# the longest files first: ./dev.sh test runs two pytest-xdist workers, each taking whole files (--dist loadfile), so
# the Slurm cluster's tests, the longest file, run beside the others rather than after them
LONGEST_FIRST = ["test_slurm_wrappers.py", "test_mnist_deepspeed.py", "test_mnist_ddp.py", "test_your_edits.py",
                 "test_mnist_fsdp.py", "test_gpt_fsdp.py", "test_imagenet_ddp.py", "test_tracking.py",
                 "test_mnist_lightning.py", "test_hangs_and_network.py", "test_compile.py", "test_bench_gpu.py",
                 "test_gpu_paths.py"]


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


# variables that would change how a script decides who it is; tests set them explicitly
LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|GROUP_RANK|MASTER_ADDR|MASTER_PORT"
                         r"|TORCHELASTIC_.*|SLURM_.*|OMPI_.*|PMI_.*|DATA_DIR|CHECKPOINT_DIR|PYTHON)$")


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    # the venv's tools first (torchrun, deepspeed, mpirun, and its ninja: DeepSpeed's JIT-built CPU op is rebuilt
    # whenever a different ninja version looks at it)
    # CUDA_VISIBLE_DEVICES empty: the runs are CPU runs on a machine with GPUs too (bit-identity and gloo are CPU
    # facts); a test that means GPUs sets it
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(EXIT_PROBE),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
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


def timed(fn, *args, **kwargs):
    """(what fn returns, the seconds it took)"""
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - t0


# what a training script needs beside it (the copy unit, but for the job script and ds_config.json)
COMPANIONS = {"imagenet_ddp.py": ["cluster", "imagenet_staging.py"], "gpt_fsdp.py": ["cluster", "prepare_tokens.py"]}


def companions(script):
    return COMPANIONS.get(script, ["cluster"])


def copy_into(folder, name):
    """A file of the repository, or a folder of it (the cluster/ package, without __pycache__), into `folder`."""
    import shutil
    if (REPO / name).is_dir():
        shutil.copytree(REPO / name, Path(folder) / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(REPO / name, Path(folder) / name)


def copy_alone(folder, script):
    """A user's copy: the training script and cluster/ (ImageNet's: and imagenet_staging.py) alone in `folder` (made
    if needed); the copy's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [script] + companions(script):
        copy_into(folder, name)
    return str(folder / script)


def start(cmd, **kwargs):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)



# measured on the 5,000-digit training sample, 2 epochs, global batch 64: 95.97% with mnist_ddp.py
# (one process with --batch-size=64, or two with --batch-size=32), 96.11% with mnist_lightning_ddp.py
MIN_ACC_2_EPOCHS = 95.0

EPOCH_LINE = re.compile(r"^(?:\[default(\d+)\]:)?epoch (\d+)/(\d+) \| .*test acc ([\d.]+)%", re.M)
STARTUP_LINE = re.compile(r"\[rank (\d+)/(\d+)\] local_rank (\d+) host (\S+) device (cpu|cuda:\d+|cuda)")


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


TIME_PARTS = ["startup", "staging", "data", "compute", "eval", "checkpoint"]
TIME_LINE = re.compile(r"^time on rank 0, ([\d.]+) s: start-up \d+%.*, data wait \d+%, compute \d+%, evaluation \d+%",
                       re.M)


def check_time_split(out, wall=None, staged=False, checkpointed=None):
    """Where rank 0's time went: the words line and the done line's time_split, every part in seconds, those this run
    had above 0 and the others exactly 0 (staging: ImageNet's; checkpoints: unless None, not known). With `wall`, the
    run's wall time from outside (from before its process started to after it exited), the parts add up to it but
    for the exit after the done line, which takes longer on a loaded machine (as beside the other test worker)."""
    split, total = done_record(out)["time_split"], float(TIME_LINE.search(out).group(1))
    assert list(split) == TIME_PARTS, split
    assert all(split[part] > 0 for part in ("startup", "data", "compute", "eval")), split
    assert (split["staging"] > 0) == staged and (checkpointed is None or (split["checkpoint"] > 0) == checkpointed)
    assert sum(split.values()) == pytest.approx(total, abs=0.1)
    if wall is not None:  # a short run's exit (freeing torch, the process group) is a second or two of it, alone
        assert total <= wall + 0.05 and wall - total <= 0.15 * wall + 5, (split, wall)
    return split


def check_training(rc, out, world_size, epochs=2, min_acc=MIN_ACC_2_EPOCHS):
    assert rc == 0, out[-3000:]
    done = done_record(out)
    assert done["world_size"] == world_size
    assert done["test_count"] == 10000  # exact evaluation: every test digit counted once
    assert done["test_acc"] * 100 >= min_acc, out[-2000:]
    assert len(done["param_checksums"]) == world_size
    assert len(set(done["param_checksums"])) == 1, "replicas diverged"
    assert startup_ranks(out) == list(range(world_size))  # exactly one start-up line per rank
    lines = epoch_lines(out)
    assert [e for _, e, _ in lines] == list(range(1, epochs + 1)), "one epoch line per epoch, from rank 0 only"
    assert lines[-1][2] == pytest.approx(done["test_acc"] * 100, abs=0.01)
    check_time_split(out)
    check_clean_exit(out)
    return done


def check_clean_exit(out):
    """No rank left a native thread running into interpreter shutdown (tests/exit_probe): every process group was
    destroyed for real. One that outlives the script aborts a finished run now and then (exit code -6)."""
    assert EXIT_PROBE_LINE not in out, [line for line in out.splitlines() if EXIT_PROBE_LINE in line]


def slurm_job_id_with_free_port():
    """A fake SLURM_JOB_ID whose derived ports (ours: 10000 + id % 20000, Lightning's: 15000 + last 4 digits) are
    free."""
    import socket
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])  # xdist's two workers try different ids
    for job_id in range(1000 + 48 * worker, 9999, 97):
        ports = {10000 + job_id % 20000, 15000 + int(str(job_id)[-4:])}
        try:
            for port in ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return job_id
        except OSError:
            continue
    pytest.skip("no free port in the job-id-derived ranges")


def srun_env(rank, ntasks, job_id, **extra):
    """What srun tells task `rank` of `ntasks` on one node (one task per 'GPU'), and nothing else."""
    return clean_env(
        SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NODEID=0, SLURM_STEP_ID=0, SLURM_NTASKS=ntasks,
        SLURM_NTASKS_PER_NODE=ntasks,
        SLURM_NNODES=1, SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_JOB_ID=job_id,
        SLURM_JOB_NAME="pytest", **extra)


def run_srun_style(cmd, ntasks, cwd, timeout=300, **extra):
    """Start `ntasks` processes on this machine that know only what srun would tell them (SLURM_* variables),
    one task per 'GPU' on one node. Returns ([returncode per rank], [output per rank])."""
    job_id = slurm_job_id_with_free_port()
    procs = [start(cmd, cwd=cwd, env=srun_env(r, ntasks, job_id, **extra)) for r in range(ntasks)]
    outs = []
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outs


def check_srun_style(rcs, outs, reference_out):
    """Two srun-style ranks trained correctly, rank 1 stayed quiet, and they ended bit-identical to the reference run
    (same shards, same seed, same averaged gradients: only the launcher differs)."""
    check_training(rcs[0], outs[0] + outs[1], world_size=2)
    assert rcs[1] == 0, outs[1]
    assert epoch_lines(outs[1]) == [] and '"event"' not in outs[1], "rank 1 must stay quiet"
    assert startup_ranks(outs[1]) == [1]
    assert done_record(outs[0])["param_checksums"] == done_record(reference_out)["param_checksums"]


def check_signal_stop(cmd, workdir, expect_checkpoint, to="all", sig=signal.SIGUSR1, wait_for=r"epoch 1 step 0\b",
                      timeout=300, laps=True, **extra):
    """Start 2 srun-style ranks (`extra`: more environment) in one process group, and once both are up and rank 0's
    log matches `wait_for` (by default: it trains) send `sig` to every process of it, as Slurm signals every process
    of a job step: both ranks, their DataLoader workers and whatever else they started (to=0 or 1: that rank's
    process only). Then check the agreed stop: both ranks exit 75 (EXIT_RESUMABLE), rank 0 names the signal, and a
    mid-epoch checkpoint matching `expect_checkpoint` exists. laps=False: a script without TIMES's laps, whose time
    split has no start-up part."""
    job_id = slurm_job_id_with_free_port()
    logs = [open(workdir / f"rank{r}.log", "w+") for r in range(2)]
    procs = []
    for r in range(2):  # rank 0 leads a new process group, rank 1 joins it
        procs.append(subprocess.Popen(cmd, cwd=workdir, stdout=logs[r], stderr=subprocess.STDOUT, text=True,
                                      env=srun_env(r, 2, job_id, **extra), process_group=procs[0].pid if r else 0))
    try:
        deadline = time.monotonic() + timeout
        while True:
            outs = [(workdir / f"rank{r}.log").read_text() for r in range(2)]
            if all(STARTUP_LINE.search(out) for out in outs) and re.search(wait_for, outs[0]):
                break
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), outs
            time.sleep(0.05)
        if to == "all":
            os.killpg(procs[0].pid, sig)
        else:
            procs[to].send_signal(sig)
        rcs = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outs = [(workdir / f"rank{r}.log").read_text() for r in range(2)]
    assert rcs == [75, 75], outs[0][-3000:] + outs[1][-3000:]
    assert f"stopped on {sig.name}" in outs[0] and "stopped on" not in outs[1], outs[0][-2000:]
    split = r"start-up \d+%(, staging \d+%)?, data wait" if laps else "compute"
    assert re.search(rf"^stopped on {sig.name}: [^\n]*\ntime on rank 0, [\d.]+ s: {split}", outs[0], re.M), \
        "one stop line, then the stopped run's time split"
    assert list(workdir.glob(f"ckpt/{expect_checkpoint}")), sorted(p.name for p in (workdir / "ckpt").iterdir())
    assert '"event": "done"' not in outs[0]
    check_clean_exit(outs[0] + outs[1])
    return outs


def check_profile(out, out_dir):
    """--profile ran: one trace that parses as JSON with the traced steps' events, and the table of operators."""
    [trace] = out_dir.glob("profile-*.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 5, "the 5 active steps"
    assert any(e.get("name") == "aten::convolution" for e in events)
    assert "profile of 5 steps on rank 0, slowest operators first" in out and "Self CPU" in out, out[-3000:]


def tensorboard_scalars(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows a run (its own reader, which drops purged points)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_torchrun(args, cwd, nproc=2, timeout=300, **env_extra):
    """torchrun --standalone with each worker's output in its own file (--redirects=3 --log-dir), so we know who printed
    what (torchrun's --tee can split a line that is being written while it reads). Returns (returncode, each rank's
    output followed by torchrun's, [each rank's output])."""
    log_dir = Path(cwd) / "torchrun-logs"
    rc, agent = run([TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--redirects=3",
                     f"--log-dir={log_dir}"] + args,
                    env=clean_env(**env_extra), cwd=cwd, timeout=timeout)
    ranks = ["".join(f.read_text() for kind in ("stdout", "stderr")
                     for f in sorted(log_dir.glob(f"*/attempt_*/{r}/{kind}.log"))) for r in range(nproc)]
    return rc, "".join(ranks) + agent, ranks


def hand_count_train_flops(model, sample_shape):
    """One training step's FLOPs per sample, counted by hand from the shapes a real forward pass gives: 2 per
    multiply-add of every convolution and linear layer forward, twice that backward (the gradients of the input and
    of the weights), but for the first layer, whose input needs no gradient."""
    import torch
    layers = []

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            layers.append(2 * k * output.numel())
        elif isinstance(module, torch.nn.Linear):
            layers.append(2 * module.in_features * output.numel())

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *sample_shape))
    for hook in hooks:
        hook.remove()
    return 3 * sum(layers) - layers[0]
