"""The sbatch wrappers, submitted with sbatch exactly as a user would, on a real 2-node Slurm cluster that
these tests start (tests/slurm_cluster.py). Every node has 4 fake GPUs: Slurm allocates them and sets
CUDA_VISIBLE_DEVICES, but torch cannot use them, as on a cluster whose driver is older than torch's CUDA build. So
the runs say --device=cpu, and one test checks that without it the job stops at once with one clear line.
Each seed command from the README runs verbatim, from a fresh directory whose path holds a space and which holds
only that wrapper and that script (and the config file the command names), as a user who copied the two files into
a project would have it; the tests only append --device=cpu, --epochs=1 and a smaller per-process batch (so that 4
or 8 processes still take enough steps in one epoch on 5,000 digits)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from conftest import (LAUNCH_VARS, REPO, STARTUP_LINE, clean_env, companions, copy_into, done_record, epoch_lines,
                      make_imagenet_archives)
from slurm_cluster import SlurmCluster, missing_requirements

FAST = ["--device=cpu", "--epochs=1", "--batch-size=16"]
MIN_ACC_1_EPOCH = 88.0  # 1 epoch, global batch 64 (4 processes) or 128 (8): measured 92-95% on this data


@pytest.fixture(scope="module")
def cluster():
    why = missing_requirements()
    if why:
        pytest.skip(f"no Slurm test cluster on this machine: {why}")
    c = SlurmCluster().start()
    try:
        yield c
    finally:
        c.stop()


def project(tmp_path_factory, *files):
    """A user's project directory, with a space in its path, holding copies of just these files of the repo, and of
    cluster/ (ImageNet's: and imagenet_staging.py) beside a training script: the copy unit is a training script,
    the cluster/ folder and a job script."""
    d = tmp_path_factory.mktemp("proj") / "my project"
    d.mkdir()
    for name in set(files) | {c for f in files if f.endswith(".py") for c in companions(f)}:
        copy_into(d, name)
    return d


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkout of this repository: every script, wrapper and config."""
    names = [f.name for f in list(REPO.glob("*.py")) + list(REPO.glob("run-*.sh"))]
    names += ["ds_config.json"]
    return project(tmp_path_factory, *names)


def node_devices(args):
    """DeepSpeed's runner counts a node's devices with its accelerator, on these GPU-less nodes its CPU one, which
    reads LOCAL_SIZE (else it counts NUMA nodes): 4, as it would count a GPU node's 4 GPUs."""
    return {"LOCAL_SIZE": "4"} if "run-gpu4-deepspeed.sh" in args else {}


def submit(cluster, workdir, mnist_dir, args, timeout=600, **env_extra):
    """sbatch ARGS from workdir; wait for the job to end. Returns (state, exit code, the job's log)."""
    env = clean_env(SLURM_CONF=cluster.conf, **({"DATA_DIR": mnist_dir} if mnist_dir else {}), **node_devices(args),
                    **env_extra)
    r = subprocess.run(["sbatch", "--parsable"] + args, cwd=workdir, env=env, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    return wait_for_job(cluster, r.stdout.strip().split(";")[0], workdir, timeout)


def wait_for_job(cluster, job_id, workdir, timeout=600):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state, exit_code = cluster.job_state(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                     "DEADLINE"):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], env={**clean_env(), "SLURM_CONF": str(cluster.conf)})
        pytest.fail(f"job {job_id} still {state} after {timeout} s")
    logs = list(workdir.glob(f"*-{job_id}.out"))
    assert len(logs) == 1, f"no log for job {job_id} in {workdir}"
    return state, exit_code, logs[0].read_text()


def hosts(out):
    return {m.group(4) for m in STARTUP_LINE.finditer(out)}


SEEDS = [  # (the README's command, world size, nodes the ranks must span)
    ("run-gpu4-dist.sh mnist_ddp.py --epochs=100", 4, {"n1"}),
    ("run-gpu8-dist.sh mnist_ddp.py --epochs=100", 8, {"n1", "n2"}),
    ("run-gpu4.sh mnist_lightning_ddp.py --gpus=4 --epochs=100", 4, {"n1"}),
    ("run-gpu8-dist.sh mnist_lightning_ddp.py --gpus=4 --nodes=2 --epochs=100", 8, {"n1", "n2"}),
    ("run-gpu4-deepspeed.sh mnist_ddp_deepspeed.py --epochs=100 --deepspeed --deepspeed_config ds_config.json", 4,
     {"n1"}),
    ("run-gpu8.sh mnist_ddp_deepspeed.py --epochs=100 --deepspeed --deepspeed_config ds_config.json", 8, {"n1", "n2"}),
    ("run-gpu4.sh mnist_fsdp.py --epochs=100", 4, {"n1"}),
]
# A container's python is a command with arguments (PYTHON="apptainer exec --nv image.sif python"). This one tells the
# job where the data is: without its arguments reaching the training processes, they would find no MNIST
MULTI_WORD_PYTHON = "run-gpu4.sh mnist_lightning_ddp.py --gpus=4 --epochs=100"

# python, whose torchrun is as an older torch's: it refuses --signals-to-handle and --shutdown-timeout, and its --help
# lists neither; everything else goes to the real python
OLDER_TORCHRUN = """#!/usr/bin/env bash
if [ "${1:-}" = -m ] && [ "${2:-}" = torch.distributed.run ]; then
  for arg in "$@"; do case $arg in --signals-to-handle*|--shutdown-timeout*)
    echo "torchrun: error: unrecognized arguments: $arg" >&2; exit 2;; esac; done
  case " $* " in *" --help "*) python "$@" | grep -v -e --signals-to-handle -e --shutdown-timeout; exit;; esac
fi
exec python "$@"
"""
OLD_TORCHRUN_SEED = "run-gpu8-dist.sh mnist_ddp.py --epochs=100"

RESULTS = {}  # seed command -> its done record, for the requeue tests to compare with
PROJECTS = {}  # seed command -> the project directory it ran in (its outputs: out/, checkpoints/)


def test_the_seed_commands_are_the_readmes():
    readme = (REPO / "README.md").read_text()
    assert [c for c, _, _ in SEEDS if f"sbatch {c}" not in readme] == []


def seed_project(tmp_path_factory, command):
    """A fresh project with only the files the command names: one wrapper, one script, maybe one config."""
    return project(tmp_path_factory, *[w for w in command.split() if (REPO / w).is_file()])


@pytest.mark.parametrize("command, world_size, nodes", SEEDS, ids=[s[0].split(" --")[0] for s in SEEDS])
def test_seed_command(command, world_size, nodes, cluster, tmp_path_factory, mnist_dir):
    """Every seed runs with SRUN_ARGS=-v (a site's srun options, as pyxis's --container-image would be): each srun of
    the job script says its options. The 2-node torchrun seed runs with an older torchrun (OLDER_TORCHRUN)."""
    proj = PROJECTS[command] = seed_project(tmp_path_factory, command)
    if command == MULTI_WORD_PYTHON:
        state, exit_code, out = submit(cluster, proj, None, command.split() + FAST, SRUN_ARGS="-v",
                                       PYTHON=f"env DATA_DIR={mnist_dir} python")
        assert f"; env DATA_DIR={mnist_dir} python mnist_lightning_ddp.py --gpus=4" in out, out[-3000:]
    elif command == OLD_TORCHRUN_SEED:
        (proj / "older-torchrun").write_text(OLDER_TORCHRUN)
        (proj / "older-torchrun").chmod(0o755)
        state, exit_code, out = submit(cluster, proj, mnist_dir, command.split() + FAST, SRUN_ARGS="-v",
                                       PYTHON="./older-torchrun")
        assert out.count("NOTE: this torchrun has no --signals-to-handle: SIGUSR1 may end it, and the ranks, before "
                         "they save") == 1 and "unrecognized arguments" not in out, out[-4000:]
    else:
        state, exit_code, out = submit(cluster, proj, mnist_dir, command.split() + FAST, SRUN_ARGS="-v")
    assert out.count("srun: defined options") == 1 and "srun: verbose             : 1" in out, out[-4000:]
    RESULTS[command] = done_record(out) if '"event": "done"' in out else None
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    done = done_record(out)
    assert done["world_size"] == world_size
    assert sorted(int(m.group(1)) for m in STARTUP_LINE.finditer(out)) == list(range(world_size))
    assert hosts(out) == nodes, "ranks must span exactly these nodes"
    assert done["test_count"] == 10000
    assert done["test_acc"] * 100 >= MIN_ACC_1_EPOCH, out[-3000:]
    assert len(set(done["param_checksums"])) == 1, "replicas diverged"
    assert [e for _, e, _ in epoch_lines(out)] == [1], "one epoch line, from rank 0 only"


@pytest.mark.parametrize("options, expected", [
    (["--gres=gpu:4"], "local rank"),        # every task sees the node's 4 GPUs
    (["--gpus-per-task=1"], "first"),        # each task sees only its own
    (["--gres=gpu:4", "--gpu-bind=single:1"], "first"),
    (["--gres=gpu:2"], "error"),             # 4 tasks, 2 GPUs
])
def test_each_task_of_a_real_srun_step_gets_a_gpu_of_its_own(options, expected, cluster, tmp_path, monkeypatch):
    """The environment real srun gives 4 tasks under each GPU option, fed to gpu_index() with torch's device count
    set to the GPUs the task sees: every task finds its own GPU, or every task knows there are too few."""
    sys.path.insert(0, str(REPO))
    import cluster as plumbing
    code = "import json, os; print(json.dumps(dict(os.environ)))"
    r = subprocess.run(["srun", "-N1", "-n4", "--output=env-%t.json", *options, sys.executable, "-c", code],
                       cwd=tmp_path, text=True, env=clean_env(SLURM_CONF=cluster.conf), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    assert r.returncode == 0, r.stdout
    envs = [json.loads((tmp_path / f"env-{task}.json").read_text()) for task in range(4)]
    assert [int(e["SLURM_LOCALID"]) for e in envs] == [0, 1, 2, 3]
    physical = []
    for env in envs:
        visible = env["CUDA_VISIBLE_DEVICES"].split(",")
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=len(visible): n)
        local_rank = int(env["SLURM_LOCALID"])
        if expected == "error":
            with pytest.raises(ValueError, match="4 processes on .* share 2 visible GPU"):
                plumbing.gpu_index(local_rank, env)
            continue
        index = plumbing.gpu_index(local_rank, env)
        assert index == (local_rank if expected == "local rank" else 0), (options, env["CUDA_VISIBLE_DEVICES"])
        physical.append(visible[index])
    assert expected == "error" or len(set(physical)) == 4, physical  # four different GPUs


@pytest.mark.skipif(torch.cuda.is_available(), reason="the test cluster's GPU numbers would be this machine's GPUs")
def test_gpus_that_torch_cannot_use_stop_the_job_at_once(cluster, tmp_path_factory, mnist_dir):
    """A seed command without --device=cpu on the fake GPUs: not a 4-GPU job quietly training on the CPU, but one
    ERROR line naming the allocation, torch's CUDA build and the driver it needs, and every rank out within seconds."""
    command = SEEDS[2][0]  # run-gpu4.sh: four srun tasks, each given CUDA_VISIBLE_DEVICES by Slurm
    t0 = time.monotonic()
    state, exit_code, out = submit(cluster, seed_project(tmp_path_factory, command), mnist_dir, command.split(),
                                   timeout=120)
    assert state == "FAILED", out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, out[-3000:]
    assert "this job was given GPUs (CUDA_VISIBLE_DEVICES=" in errors[0] and "NVIDIA driver >= " in errors[0]
    assert "HINT:" in errors[0] and "--device=cpu" in errors[0]
    assert "[rank" not in out, "nothing may train"
    assert time.monotonic() - t0 < 60


def test_python_without_srun_in_a_multi_task_job_fails_at_once(cluster, workdir, mnist_dir):
    # the classic mistake: srun forgotten in a hand-written batch script; it must fail, not wait for the time limit
    state, exit_code, out = submit(cluster, workdir, mnist_dir,
                                   ["--ntasks=2", "--wrap", "python mnist_ddp.py --epochs=1"], timeout=120)
    assert state == "FAILED" and exit_code == "1:0", out
    assert "not started by srun" in out and "HINT: srun python mnist_ddp.py" in out


def job_pids(job_id, rank):
    """PIDs of this machine's processes that belong to job_id's task `rank` and run python."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_text().split("\0")
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and "mnist_ddp.py" in cmd:
            pids.append(int(proc.name))
    return pids


def test_a_killed_rank_ends_the_whole_job_quickly(cluster, workdir, mnist_dir):
    env = clean_env(DATA_DIR=mnist_dir, SLURM_CONF=cluster.conf)
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=2", "run-gpu4.sh",
                        "mnist_ddp.py", "--device=cpu", "--epochs=100", "--batch-size=16"],
                       cwd=workdir, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    job_id = r.stdout.strip()
    log = workdir / f"srun-gpu4-{job_id}.out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and "epoch 1 step 20" in log.read_text()):
        time.sleep(0.5)  # wait until both ranks are training
    assert log.exists() and "epoch 1 step 20" in log.read_text(), log.read_text() if log.exists() else "no log"
    victims = job_pids(job_id, rank=1)
    assert victims, "rank 1's process not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    state, exit_code, out = wait_for_job(cluster, job_id, workdir, timeout=90)
    assert state == "FAILED", out[-3000:]
    assert time.monotonic() - t0 < 60, "the other ranks must not wait for the dead one"


@pytest.mark.parametrize("args, message", [
    (["run-gpu4.sh"], "ERROR: no training script given"),
    (["run-gpu4.sh", "no_such_script.py", "--epochs=1"], "ERROR: training script 'no_such_script.py' not found"),
    (["--nodes=2", "run-gpu4-deepspeed.sh", "mnist_ddp_deepspeed.py"], "ERROR: run-gpu4-deepspeed.sh runs on one node"),
])
def test_wrapper_without_a_valid_script_fails_fast(args, message, cluster, workdir, mnist_dir):
    t0 = time.monotonic()
    state, exit_code, out = submit(cluster, workdir, mnist_dir, args, timeout=60)
    wrapper = next(a for a in args if a.startswith("run-"))
    assert (state, exit_code) == ("FAILED", "2:0"), out
    assert message in out and f"usage: sbatch {wrapper} SCRIPT.py" in out
    assert "[rank" not in out and "srun:" not in out, "nothing may be launched"
    if "ERROR: no training script" in message or "not found" in message:
        assert "== job" not in out, "the usage check comes before anything else"
    assert time.monotonic() - t0 < 30


def test_safe_sbatch_runs_the_committed_code(cluster, workdir, mnist_dir, tmp_path):
    """safe-sbatch.sh refuses an uncommitted change to a tracked file, not the untracked outputs of earlier runs;
    sbatch options with their value as the next word (-p PART, --time VALUE) go to sbatch; the job runs the snapshot
    of the commit even when the working copy is broken right after submitting; a snapshot older than SNAPSHOT_DAYS
    is removed."""
    proj = tmp_path / "proj"
    shutil.copytree(workdir, proj, ignore=shutil.ignore_patterns("*.out", "out", "checkpoints"))
    shutil.copy(REPO / "safe-sbatch.sh", proj)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(proj)]
    subprocess.run(git + ["init", "-q"], check=True)
    (proj / ".gitignore").write_text(".snapshots/\n")  # a project's own: the run outputs are not ignored
    subprocess.run(git + ["add", "-A"], check=True)
    subprocess.run(git + ["commit", "-qm", "v1"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, text=True, stdout=subprocess.PIPE).stdout.strip()
    env = clean_env(DATA_DIR=mnist_dir, SLURM_CONF=cluster.conf)
    cmd = ["./safe-sbatch.sh", "-p", "debug", "--time", "10:00", "--ntasks-per-node=2", "--gpus-per-node=2",
           "run-gpu4.sh", "mnist_ddp.py"] + FAST

    original = (proj / "mnist_ddp.py").read_text()
    (proj / "mnist_ddp.py").write_text(original + "# not committed\n")
    r = subprocess.run(cmd, cwd=proj, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 1 and "tracked files have uncommitted changes" in r.stdout and "mnist_ddp.py" in r.stdout
    (proj / "mnist_ddp.py").write_text(original)

    for output in ("out/metrics-1.jsonl", "checkpoints/1/epoch_0001.pt", "srun-gpu4-1.out"):  # an earlier run's
        (proj / output).parent.mkdir(parents=True, exist_ok=True)
        (proj / output).write_text("")
    old = proj / ".snapshots" / ("0" * 40)
    old.mkdir(parents=True)
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    r = subprocess.run(cmd, cwd=proj, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    assert not old.exists(), "a snapshot 40 days old (SNAPSHOT_DAYS: 30)"
    job_id = r.stdout.split("Submitted batch job")[1].split()[0]
    (proj / "mnist_ddp.py").write_text("raise SystemExit(3)\n")  # edit the working copy right after submitting
    state, exit_code, out = wait_for_job(cluster, job_id, proj)
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    assert f".snapshots/{commit}/mnist_ddp.py" in out
    assert done_record(out)["world_size"] == 2
    assert list((proj / "out").glob("metrics-*.jsonl")), "outputs land in the submit directory, not the snapshot"
    show = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, text=True, stdout=subprocess.PIPE).stdout
    assert "Partition=debug " in show and "TimeLimit=00:10:00 " in show, show


@pytest.fixture(scope="module")
def imagenet_job(tmp_path_factory):
    """run-imagenet.sh and imagenet_ddp.py (and cluster/, imagenet_staging.py) alone in a project, a miniature
    ImageNet in its download layout (20 steps per epoch for 2 ranks x 2 images), and the job's arguments."""
    workdir = project(tmp_path_factory, "run-imagenet.sh", "imagenet_ddp.py")
    data = tmp_path_factory.mktemp("imagenet")
    make_imagenet_archives(data / "archives", n_classes=4, n_train=20, n_val=3, size=(80, 60))
    # the two test nodes share this machine's disk, as two real nodes would not
    args = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "run-imagenet.sh", "imagenet_ddp.py",
            f"--data-dir={data / 'archives'}", f"--local-dir={data / 'local'}", "--epochs=1", "--arch=resnet18",
            "--image-size=64", "--batch-size=2", "--log-interval=1", "--device=cpu"]
    return workdir, args


def test_imagenet_wrapper_stages_once_per_node_then_trains_on_two_nodes(cluster, imagenet_job, tmp_path):
    workdir, args = imagenet_job
    state, exit_code, out = submit(cluster, workdir, None, args + ["--workers=1", f"--output-dir={tmp_path}"],
                                   SRUN_ARGS="-v")
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    assert out.count("srun: defined options") == 2, "SRUN_ARGS reached both steps: staging, then training"
    local = next(a for a in args if a.startswith("--local-dir=")).split("=", 1)[1]
    assert "== staging: imagenet_ddp.py --stage-only, once on each of the 2 node(s) ==" in out
    assert out.count("staged 4 classes and 12 validation images") == 1, "one node extracts; the other finds its marker"
    assert {f"data ready in {local} on {n}" for n in ("n1", "n2")} <= set(out.splitlines())
    assert out.index("data ready in") < out.index("[rank 0/2]"), "staging finishes before training starts"
    done = done_record(out)
    assert done["world_size"] == 2 and hosts(out) == {"n1", "n2"}
    assert done["val_count"] == 12 and len(set(done["param_checksums"])) == 1
    RESULTS["imagenet"] = done


def signal_once_logged(log, text, job, sig, env):
    """Wait until the job's log shows `text` (up to 3 minutes), then scancel --signal=SIG the job: Slurm signals every
    process of its steps (launchers, ranks, their workers)."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (log.exists() and text in log.read_text()):
        time.sleep(0.1)
    assert log.exists() and text in log.read_text(), log.read_text() if log.exists() else "no log"
    subprocess.run(["scancel", f"--signal={sig}", job], env=env, check=True)


def test_sigterm_to_every_process_of_an_imagenet_job_with_workers_checkpoints_and_resumes_exactly(
        cluster, imagenet_job, tmp_path):
    """scancel --signal=TERM reaches every process of the step: both ranks and their 2 DataLoader workers each. The
    workers ignore it, the ranks agree at step 10, rank 0 checkpoints, the job ends with exit code 75; the same job
    submitted again resumes there and ends with the parameters of the uninterrupted run."""
    if "imagenet" not in RESULTS:
        pytest.skip("needs the uninterrupted run of the test before (test_imagenet_wrapper_stages_once_per_node...)")
    workdir, args = imagenet_job
    args = args + ["--workers=2", f"--output-dir={tmp_path}", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    env = clean_env(SLURM_CONF=cluster.conf)
    r = subprocess.run(["sbatch", "--parsable"] + args, cwd=workdir, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    job_id = r.stdout.strip()
    log = workdir / f"imagenet-{job_id}.out"
    signal_once_logged(log, "epoch 1 step 0/", job_id, "TERM", env)  # the ranks train: their DataLoader workers are up
    state, exit_code, out = wait_for_job(cluster, job_id, workdir, timeout=120)
    assert (state, exit_code) == ("FAILED", "75:0"), out[-5000:]
    assert "stopped on SIGTERM: checkpoint at epoch 1 step 10" in out, out[-5000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-5000:]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch_0000_step_0000010.pt"]

    state, exit_code, out = submit(cluster, workdir, None, args)
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-5000:]
    assert "epoch 0 done and 10 steps of epoch 1, continuing at epoch 1" in out, out[-5000:]
    assert done_record(out)["param_checksums"] == RESULTS["imagenet"]["param_checksums"], \
        "interrupted + resubmitted != uninterrupted"


def preempt_and_requeue(cluster, proj, mnist_dir, args, log_prefix, tmp_path, **env_extra):
    """Submit ARGS (with a --checkpoint-dir where tmp_path is given; else as the README writes it, without one); once
    rank 0 logs step 20, send SIGUSR1 (what #SBATCH --signal sends before the time limit) to every process of the
    job's steps, as Slurm does: launchers, workers and all. The workers must checkpoint mid-epoch, requeue the job, and
    the rerun (SLURM_RESTART_COUNT=1) resume. Returns the job's log."""
    env = clean_env(DATA_DIR=mnist_dir, SLURM_CONF=cluster.conf, **node_devices(args), **env_extra)
    ckpt = [f"--checkpoint-dir={tmp_path / 'ckpt'}"] if tmp_path else []
    r = subprocess.run(["sbatch", "--parsable"] + args + ckpt, cwd=proj, env=env,
                       text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    job_id = r.stdout.strip()
    log = proj / f"{log_prefix}-{job_id}.out"
    signal_once_logged(log, "epoch 1 step 20 ", job_id, "USR1", env)
    state, exit_code, out = wait_for_job(cluster, job_id, proj, timeout=300)
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-5000:]
    assert f"== job {job_id} (restart 0)" in out and f"== job {job_id} (restart 1)" in out
    assert "stopped on SIGUSR1: checkpoint at epoch 1 step" in out and f"requeued job {job_id}" in out, out[-5000:]
    assert "resumed from" in out and "steps of epoch 1, continuing at epoch 1" in out
    if not tmp_path:  # the job's own folder, which its requeue found again
        assert f"resumed from checkpoints/{job_id}/" in out, out[-5000:]
    return out


def reference_run(cluster, tmp_path_factory, mnist_dir, command):
    """The uninterrupted seed run's done record (run again if its test did not run first)."""
    if not RESULTS.get(command):
        proj = PROJECTS[command] = seed_project(tmp_path_factory, command)
        RESULTS[command] = done_record(submit(cluster, proj, mnist_dir, command.split() + FAST)[2])
    return RESULTS[command]


def test_init_from_starts_a_changed_run_from_a_finished_one(cluster, tmp_path_factory, mnist_dir):
    """The finished seed run left its final weights in out/model-JOBID.pt, a plain state_dict. A new job with another
    learning rate starts from them (--init-from): a fresh optimizer at epoch 1, in a checkpoint folder of its own,
    whose first loss is a trained model's, not random weights' (about 2.3)."""
    command = SEEDS[0][0]
    finished = reference_run(cluster, tmp_path_factory, mnist_dir, command)
    proj, weights = PROJECTS[command], finished["weights"]
    state = torch.load(proj / weights, weights_only=True)  # no cluster/ needed: tensors by name
    assert sorted(state) == sorted(f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight",
                                                                                                       "bias"))
    state, exit_code, out = submit(cluster, proj, mnist_dir, command.split() + FAST + [
        "--lr=0.001", "--log-interval=1", f"--init-from={weights}"])
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    assert f"initialized from {weights}: its weights, for a new run" in out, out[-4000:]
    first = float(re.search(r"^  epoch 1 step 0 loss ([\d.]+)", out, re.M)[1])
    assert first < 0.7, f"the first loss, {first}, is not a trained model's"
    done = done_record(out)
    assert done["test_acc"] >= finished["test_acc"] - 0.01 and "resumed from" not in out, out[-3000:]
    job_id = re.search(r"== job (\d+) \(restart 0\)", out)[1]
    assert (proj / "checkpoints" / job_id / "epoch_0001.pt").is_file(), "its own folder: the job's id"


def test_time_limit_signal_then_the_end_time_alone_through_torchrun_checkpoint_requeue_and_resume_exactly(
        cluster, tmp_path_factory, mnist_dir, tmp_path):
    """Through the torchrun wrapper, one job, three runs. The 2-node wrapper runs on one node here (--nodes=1: 1 x 4
    GPUs, the node count comes from the allocation), so the reference is the 1-node seed run.
    1. scancel --signal=USR1 mid-epoch, to every process of the step: torchrun passes it on, the workers checkpoint,
       the job requeues itself.
    2. No signal at all: the job script's --signal line is removed and the job has --time=1 (Slurm's shortest). Rank 0
       reads the end time (squeue: Slurm 22.05 sets no SLURM_JOB_END_TIME), finds it nearer than STOP_MARGIN at its
       first step check (the site set-up gives this run a margin longer than the job), and the ranks checkpoint and
       requeue.
    3. The last run (margin 5 s) finishes, with the uninterrupted run's parameters."""
    reference = reference_run(cluster, tmp_path_factory, mnist_dir, "run-gpu4-dist.sh mnist_ddp.py --epochs=100")
    proj = project(tmp_path_factory, "mnist_ddp.py")
    wrapper = (REPO / "run-gpu8-dist.sh").read_text()
    assert "#SBATCH --signal=" in wrapper
    (proj / "run-gpu8-dist.sh").write_text("\n".join(line for line in wrapper.splitlines()
                                                     if not line.startswith("#SBATCH --signal=")) + "\n")
    (proj / "slurm").mkdir()
    (proj / "slurm" / "site.sh").write_text(
        'if [ "${SLURM_RESTART_COUNT:-0}" -eq 1 ]; then export STOP_MARGIN=100; else export STOP_MARGIN=5; fi\n')
    # the sweep through torchrun: a one-task array whose line is the default seed (the result must not change)
    (proj / "seeds.txt").write_text("--seed=1\n")
    out = preempt_and_requeue(cluster, proj, mnist_dir, ["--time=1", "--nodes=1", "--array=0", "run-gpu8-dist.sh",
                                                         "mnist_ddp.py"] + FAST, "ddp-gpu8", tmp_path,
                              SWEEP="seeds.txt")
    assert out.count("== sweep seeds.txt, task 0 of 1 (array job ") == 3, "rank 0 of each run, none of the others"
    assert "NOTE: STOP_MARGIN=100 s leaves little of this job's time limit (60 s)" in out, out[-5000:]
    job_id = re.search(r"== job (\d+) \(restart 0\)", out)[1]
    signalled = re.search(r"^stopped on SIGUSR1: checkpoint at epoch 1 step (\d+); requeued", out, re.M)
    timed = re.search(r"^stopped (\d+) s before the time limit, with no signal: checkpoint at epoch 1 step (\d+); "
                      rf"requeued job {job_id}$", out, re.M)
    assert timed and int(timed[1]) >= 10 and int(timed[2]) == int(signalled[1]) + 10, out[-5000:]
    assert f"== job {job_id} (restart 2)" in out and out.count("resumed from") == 2, out[-5000:]
    done = done_record(out)
    assert done["world_size"] == 4 and hosts(out) == {"n1"}
    assert done["param_checksums"] == reference["param_checksums"], "interrupted twice + requeued != uninterrupted"


def test_time_limit_signal_through_deepspeeds_launcher_checkpoints_requeues_and_resumes_exactly(
        cluster, tmp_path_factory, mnist_dir):
    """Through run-gpu4-deepspeed.sh: one Slurm task runs DeepSpeed's launcher, which starts the 4 workers. The
    README's command as written, without --checkpoint-dir: the job checkpoints into checkpoints/JOBID, which its
    requeue finds again."""
    command = SEEDS[4][0]
    reference = reference_run(cluster, tmp_path_factory, mnist_dir, command)
    proj = seed_project(tmp_path_factory, command)
    out = preempt_and_requeue(cluster, proj, mnist_dir, command.split() + FAST, "deepspeed-gpu4", None)
    assert "deepspeed.launcher.launch" in out, "DeepSpeed's launcher started the workers"
    assert "Detected VISIBLE_DEVICES=0,1,2,3: setting --include=localhost:0,1,2,3" in out, \
        "the runner took the GPUs Slurm gave the job (CUDA_VISIBLE_DEVICES), not GPUs 0..N-1 of --num_gpus"
    done = done_record(out)
    assert done["world_size"] == 4 and hosts(out) == {"n1"}
    assert done["param_checksums"] == reference["param_checksums"], "interrupted + requeued != uninterrupted"


def test_time_limit_signal_to_every_fsdp2_rank_checkpoints_requeues_and_resumes_exactly(
        cluster, tmp_path_factory, mnist_dir):
    """Through run-gpu4-dist.sh: torchrun starts 4 FSDP2 ranks, and scancel signals every process. Every rank writes
    its shards of a DCP checkpoint mid-epoch (into the job's own checkpoints/JOBID: no --checkpoint-dir), the job
    requeues itself, and the rerun loads them and ends with the weights of the uninterrupted seed run, which srun
    started (run-gpu4.sh): the same 4 ranks, another launcher. The job script runs as in a container without Slurm's
    client: no scontrol on its PATH (it finds rank 0's node from the node list); the training processes have it.
    With --wandb and WANDB_MODE=offline, the first run and its requeue log into one W&B run, the job's id."""
    reference = reference_run(cluster, tmp_path_factory, mnist_dir, SEEDS[6][0])
    proj = project(tmp_path_factory, "run-gpu4-dist.sh", "mnist_fsdp.py")
    path = os.environ["PATH"]
    without = proj.parent / "bin-without-scontrol"  # every command of this machine's PATH but scontrol
    without.mkdir()
    for folder in reversed(path.split(":")):
        for tool in Path(folder).glob("*") if Path(folder).is_dir() else []:
            if tool.name != "scontrol" and os.access(tool, os.X_OK):
                (without / tool.name).unlink(missing_ok=True)
                (without / tool.name).symlink_to(tool)
    # and W&B, offline (requirements-dev.txt installs wandb): one W&B run across the requeue
    out = preempt_and_requeue(cluster, proj, mnist_dir, ["run-gpu4-dist.sh", "mnist_fsdp.py"] + FAST + ["--wandb"],
                              "ddp-gpu4", None, PATH=f"{Path(sys.executable).parent}:{without}",
                              PYTHON=f"env PATH={Path(sys.executable).parent}:{path} python", WANDB_MODE="offline")
    assert re.search(r"^== rank 0 at n1:\d+;", out, re.M) and "== requeueing ==" not in out, out[-3000:]
    job_id = re.search(r"== job (\d+) \(restart 0\)", out)[1]
    runs = sorted(p.name for p in (proj / "out" / "wandb").glob("offline-run-*"))  # the first run's, the requeue's
    assert len(runs) == 2 and all(name.endswith(f"-{job_id}") for name in runs), runs
    assert out.count(f"W&B: offline run {job_id} in ") == 2, out[-3000:]
    [stopped] = proj.glob("checkpoints/*/epoch_0000_step_*")
    assert sorted(p.name for p in stopped.glob("__*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    done = done_record(out)
    assert done["world_size"] == 4 and hosts(out) == {"n1"}
    assert done["param_checksums"] == reference["param_checksums"], "interrupted + requeued != uninterrupted"


def test_a_gpt_trains_on_two_nodes_through_a_job_script(cluster, tmp_path_factory):
    """gpt_fsdp.py through run-gpu8-dist.sh, unchanged: a torchrun on each of the 2 nodes starts 4 FSDP2 ranks, which
    read the token shards that prepare_tokens.py made on the 'login node' (Python's json package, as bytes), train the
    tiny model (8 ranks x 4 sequences of 64 tokens: 2,048 tokens a step, no accumulation), validate exactly, and
    write every rank's shard of the final DCP checkpoint into the job's checkpoints/JOBID."""
    proj = project(tmp_path_factory, "run-gpu8-dist.sh", "gpt_fsdp.py")
    stdlib = sysconfig.get_paths()["stdlib"]
    r = subprocess.run([sys.executable, "prepare_tokens.py", f"{stdlib}/json", "--pattern=*.py", "--out-dir=tokens",
                        "--val-tokens=8192"], cwd=proj, env=clean_env(), text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    state, exit_code, out = submit(cluster, proj, None, [
        "run-gpu8-dist.sh", "gpt_fsdp.py", "--device=cpu", "--model=tiny", "--seq-len=64", "--batch-size=4",
        "--batch-tokens=2048", "--max-steps=20", "--eval-every=10", "--samples=1", "--data-dir=tokens"])
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    done = done_record(out)
    assert done["world_size"] == 8 and hosts(out) == {"n1", "n2"} and len(set(done["param_checksums"])) == 1
    # the val shard's 8,192 tokens in windows of 64 and their next token: 127 windows, each scored once
    assert done["step"] == 20 and done["val_tokens"] == 127 * 64 and done["val_bpb"] < 8, done
    assert "FSDP2 over 8 processes x 4 x 64 tokens x 1 micro-steps = 2,048 tokens per step" in out, out[-4000:]
    assert len(re.findall(r"^(?:\[default\d\]:)?step (?:10|20)/20 \| val loss", out, re.M)) == 2, out[-4000:]
    [final] = proj.glob("checkpoints/*/epoch_0001")
    assert sorted(p.name for p in final.glob("__*.distcp")) == [f"__{r}_0.distcp" for r in range(8)]


def documented_train_class():
    """docs/preemption.md's submitit example's class: the command submitit checkpoints (its code, run here)."""
    doc = (REPO / "docs" / "preemption.md").read_text()
    [code] = re.findall(r"^```python\n(import submitit\n.*?)^executor = ", doc, re.M | re.S)
    namespace = {"__name__": "docs_preemption"}  # not a module one can import: submitit's cloudpickle sends the code
    exec(code, namespace)  # the docs' own example
    return namespace["Train"]


def test_submitits_sigusr2_checkpoints_and_the_job_is_requeued_once(cluster, tmp_path_factory, mnist_dir, tmp_path,
                                                                     monkeypatch):
    """submitit 1.5.4 runs mnist_ddp.py as a command in each of 4 tasks (docs/preemption.md's Train, a CommandFunction
    with a checkpoint method) and asks Slurm for SIGUSR2
    before the time limit. scancel --signal=USR2 mid-epoch reaches every process of the step, submitit's and the
    script's: submitit judges the early signal a preemption and requeues the job itself, the ranks checkpoint and
    leave the requeue to it, and the rerun resumes and ends with the uninterrupted run's parameters. Once: one
    restart. (Without a SIGUSR2 handler the ranks died of the signal and lost everything since the last epoch.)"""
    import submitit
    reference = reference_run(cluster, tmp_path_factory, mnist_dir, SEEDS[0][0])  # 4 ranks, the same shards
    proj = project(tmp_path_factory, "mnist_ddp.py")
    for var in [v for v in os.environ if LAUNCH_VARS.match(v)]:
        monkeypatch.delenv(var)
    for var, value in clean_env(SLURM_CONF=cluster.conf, DATA_DIR=mnist_dir).items():
        monkeypatch.setenv(var, value)  # what sbatch, which submitit calls, passes on to the job
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    # 20 minutes: a signal in the first 10 is a preemption to submitit (one later would be its time-out)
    executor.update_parameters(nodes=1, tasks_per_node=4, cpus_per_task=1, timeout_min=20)
    job = executor.submit(documented_train_class()(
        ["python", "mnist_ddp.py"] + FAST + [f"--checkpoint-dir={tmp_path / 'ckpt'}"], cwd=proj))
    log = tmp_path / "logs" / f"{job.job_id}_0_log.out"
    signal_once_logged(log, "epoch 1 step 20 ", job.job_id, "USR2", clean_env(SLURM_CONF=cluster.conf))
    deadline, state = time.monotonic() + 300, None
    while time.monotonic() < deadline and state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        time.sleep(0.5)
        state, exit_code = cluster.job_state(job.job_id)
    out = log.read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-5000:]
    show = subprocess.run(["scontrol", "show", "job", "-o", job.job_id], env=clean_env(SLURM_CONF=cluster.conf),
                          text=True, stdout=subprocess.PIPE).stdout
    assert "Restarts=1 " in show, show
    # the stop line itself is not in the log: submitit stops copying the command's output once its handler exits
    assert "this job is preempted" in out and out.count("Requeued job") == 1, out[-5000:]
    assert "could not requeue" not in out and "Traceback" not in out, out[-5000:]
    assert re.search(r"^resumed from \S+_step_\d+\.pt: epoch 0 done and \d+ steps of epoch 1", out, re.M), out[-5000:]
    assert done_record(out)["param_checksums"] == reference["param_checksums"], "interrupted + requeued != whole"


def test_time_limit_signal_to_every_lightning_rank_checkpoints_requeues_and_resumes_exactly(
        cluster, tmp_path_factory, mnist_dir):
    """Through run-gpu4.sh: srun starts the 4 Lightning ranks, and scancel signals each. The script's callback, not
    Lightning's own SLURM requeue (which would save inside the handler, into the working directory), agrees on a
    batch, writes last.ckpt into the job's checkpoints/JOBID (the README's command has no --checkpoint-dir) and
    requeues; the rerun resumes at that batch, its dropout drawing what the uninterrupted run's drew."""
    command = SEEDS[2][0]
    reference = reference_run(cluster, tmp_path_factory, mnist_dir, command)
    proj = seed_project(tmp_path_factory, command)
    out = preempt_and_requeue(cluster, proj, mnist_dir, command.split() + FAST, "srun-gpu4", None)
    assert list(proj.glob("checkpoints/*/last.ckpt")) and not list(proj.rglob("hpc_ckpt_*.ckpt"))
    done = done_record(out)
    assert done["world_size"] == 4 and hosts(out) == {"n1"}
    assert done["param_checksums"] == reference["param_checksums"], "interrupted + requeued != uninterrupted"


def test_a_sweep_file_gives_each_array_task_its_line_and_bad_sweeps_fail_fast(tmp_path, monkeypatch, capfd):
    """cluster.parse_args, as every script calls it: array task K appends line K of $SWEEP to the arguments (comments
    and blank lines skipped, quotes as in a shell), and only an array task's checkpoints go in a folder of its own; a
    task past the file's end, a line with an unmatched quote, SWEEP without an array, a missing file or one without
    arguments is one ERROR line (rank 0's) and exit 2, before anything starts."""
    import argparse
    sys.path.insert(0, str(REPO))
    import cluster as plumbing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "lrs.txt").write_text("# learning rates\n--lr=0.1\n\n  --lr=0.01 --note='a b'\n--note='cut off\n")

    def parse(**env):
        p = argparse.ArgumentParser()
        p.add_argument("--epochs", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--note")
        return plumbing.parse_args(p, ["--epochs=3", "--checkpoint-dir=ck"], env={k: str(v) for k, v in env.items()})

    args = parse(SWEEP="lrs.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=1)
    assert (args.epochs, args.lr, args.note, args.checkpoint_dir) == (3, 0.01, "a b", os.path.join("ck", "8_1"))
    assert capfd.readouterr().out == "== sweep lrs.txt, task 1 of 3 (array job 8): --lr=0.01 --note=a b ==\n"
    assert parse().checkpoint_dir == "ck" and parse(SLURM_JOB_ID=5).checkpoint_dir == "ck", "not an array: as given"
    parse(SWEEP="lrs.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=0, RANK=1)
    assert capfd.readouterr().out == "", "rank 0 speaks"
    for env, message in [
            (dict(SWEEP="lrs.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=3),
             "ERROR: this is array task 3, but lrs.txt has 3 lines (tasks 0 to 2). HINT: sbatch --array=0-2 ..."),
            (dict(SWEEP="lrs.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=2),
             "ERROR: line 2 of lrs.txt: No closing quotation in: --note='cut off"),
            (dict(SWEEP="lrs.txt"), "ERROR: SWEEP=lrs.txt is set, but this job is not an array. HINT: sbatch --array"),
            (dict(SWEEP="nope.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=0), "ERROR: sweep file 'nope.txt'"),
            (dict(SWEEP="empty.txt", SLURM_ARRAY_JOB_ID=8, SLURM_ARRAY_TASK_ID=0),
             "ERROR: sweep file 'empty.txt' has no lines of arguments")]:
        with pytest.raises(SystemExit) as e:
            parse(**env)
        err = capfd.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(message), err
        with pytest.raises(SystemExit):
            parse(**env, SLURM_PROCID=1)
        assert capfd.readouterr().err == "", "other ranks exit 2 without a word"


def test_a_sweep_as_a_job_array_gives_each_task_its_own_outputs_and_requeues_resume_their_own(
        cluster, tmp_path_factory, mnist_dir, tmp_path):
    """SWEEP=lrs.txt sbatch --array=0-2 --output=%x-%A_%a.out run-gpu4.sh mnist_ddp.py ... --checkpoint-dir=ckpt: each
    of the 3 tasks trains with its line of the file, into its own log, metrics file, TensorBoard run and checkpoint
    folder (ARRAYJOB_TASK), though all share the command line. Task 1 gets SIGUSR1 mid-epoch (scancel to every
    process of its step): it resumes from its own checkpoints, and the other tasks never see them. The training runs
    as in a container without Slurm's client (no scontrol on its PATH): the job script requeues task 1, once."""
    proj = project(tmp_path_factory, "run-gpu4.sh", "mnist_ddp.py")
    lines = ["--lr=0.003", "--lr=0.002", "--lr=0.001 --seed=2"]
    (proj / "lrs.txt").write_text("# one line per array task\n" + "\n".join(lines) + "\n")
    # as in a container without Slurm's client: the training processes find no scontrol on their PATH
    env = clean_env(DATA_DIR=mnist_dir, SLURM_CONF=cluster.conf, SWEEP="lrs.txt",
                    PYTHON=f"env PATH={Path(sys.executable).parent} python")
    ckpt, out_dir = tmp_path / "ckpt", tmp_path / "out"
    r = subprocess.run(["sbatch", "--parsable", "--array=0-2", "--output=%x-%A_%a.out", "--ntasks-per-node=2",
                        "--gpus-per-node=2", "run-gpu4.sh", "mnist_ddp.py", "--device=cpu", "--epochs=1",
                        "--batch-size=16", f"--checkpoint-dir={ckpt}", f"--output-dir={out_dir}"],
                       cwd=proj, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    array = r.stdout.strip()
    log = proj / f"srun-gpu4-{array}_1.out"
    signal_once_logged(log, "epoch 1 step 20 ", f"{array}_1", "USR1", env)
    for task, line in enumerate(lines):
        name = f"{array}_{task}"
        state, exit_code, out = wait_for_job(cluster, name, proj, timeout=300)
        assert (state, exit_code) == ("COMPLETED", "0:0"), out[-5000:]
        assert f"== sweep lrs.txt, task {task} of 3 (array job {array}): {line} ==" in out, out[-3000:]
        assert f"lr {float(line.split()[0].split('=')[1]):g} |" in out, "the task trained with its line"
        done = done_record(out)
        assert done["world_size"] == 2 and done["test_acc"] * 100 >= MIN_ACC_1_EPOCH - 10, out[-3000:]
        assert (ckpt / name / "epoch_0001.pt").is_file() and (out_dir / "tensorboard" / name).is_dir()
        metrics = (out_dir / f"metrics-{name}.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["param_checksums"] == done["param_checksums"]
        resumed = re.findall(r"^resumed from (\S+)", out, re.M)
        if task == 1:  # the training process could not requeue; the job script did, once
            assert re.search(r"^stopped on SIGUSR1: checkpoint at epoch 1 step \d+; asked the job script to requeue "
                             r"job \d+ \(scontrol: No such file or directory\)$", out, re.M), out[-5000:]
            assert out.count("== requeueing ==") == 1 and out.count("(restart 1)") == 1, out[-5000:]
            assert len(resumed) == 1 and resumed[0].startswith(f"{ckpt / name}/epoch_"), resumed
        else:
            assert resumed == [] and "stopped on" not in out, out[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == [f"{array}_{task}" for task in range(3)]


def test_the_interconnect_check_runs_on_two_nodes_and_warns_when_the_network_is_the_bottleneck(
        cluster, tmp_path_factory):
    """check_interconnect.py through the torchrun job script, 2 nodes x 2 ranks: each size's bus bandwidth within
    each node and across both, and (with --warn-below above 1, which no network meets) the WARNING."""
    proj = project(tmp_path_factory, "run-gpu8-dist.sh", "check_interconnect.py")
    state, exit_code, out = submit(cluster, proj, None, [
        "--ntasks-per-node=1", "--gpus-per-node=2", "run-gpu8-dist.sh", "check_interconnect.py", "--device=cpu",
        "--max-bytes=256K", "--iters=5", "--warmup=2", "--warn-below=1000"])
    assert (state, exit_code) == ("COMPLETED", "0:0"), out[-4000:]
    done = done_record(out)
    assert (done["world_size"], done["nodes"], done["ranks_per_node"]) == (4, 2, [2, 2]) and hosts(out) == {"n1", "n2"}
    assert [r["bytes"] for r in done["rows"]] == [1024 << i for i in range(9)]
    assert all(r["busbw"] > 0 and r["node_busbw"] > 0 and 0 <= r["slowest_rank"] < 4 for r in done["rows"])
    assert re.search(r"^peak bus bandwidth across 2 nodes: [\d.]+ GB/s at \d+ KB; within a node: [\d.]+ GB/s", out,
                     re.M), out[-3000:]
    assert re.search(r"^WARNING: across nodes the all-reduce reaches [\d.]+ GB/s, \d+% of the [\d.]+ GB/s within a "
                     r"node \(--warn-below 1000\)", out, re.M), out[-3000:]


def test_a_stuck_rank_on_the_cluster_leaves_every_ranks_stack_and_the_job_ends(cluster, tmp_path_factory, mnist_dir,
                                                                                  tmp_path):
    """Through run-gpu4.sh (srun), 2 ranks. First scancel --signal=URG: every rank prints its stacks and trains on.
    Then rank 1 gets stuck in an optimizer step (the test's hook, once a file exists): rank 0's all-reduce times out
    after --dist-timeout, the log names it, srun ends rank 1, which prints where it was stuck, and the job ends."""
    from test_hangs_and_network import TIMEOUT, check_hang_evidence
    proj = seed_project(tmp_path_factory, SEEDS[0][0].replace("run-gpu4-dist.sh", "run-gpu4.sh"))
    env = clean_env(SLURM_CONF=cluster.conf, DATA_DIR=mnist_dir, HANG_AT_STEP=1, HANG_WHEN=tmp_path / "hang-now")
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=2", "run-gpu4.sh",
                        "mnist_ddp.py", "--device=cpu", "--epochs=100", "--batch-size=16", "--log-interval=5",
                        f"--dist-timeout={TIMEOUT}"], cwd=proj, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    job_id = r.stdout.strip()
    log = proj / f"srun-gpu4-{job_id}.out"
    signal_once_logged(log, "epoch 1 step 20 ", job_id, "URG", env)
    asked = re.compile(r"^\[rank (\d)\] stacks on SIGURG, as asked; training goes on\. Rank \1 on n1", re.M)
    deadline = time.monotonic() + 60
    while len({m[1] for m in asked.finditer(log.read_text())}) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    before = log.read_text()
    assert {m[1] for m in asked.finditer(before)} == {"0", "1"}, before[-3000:]
    steps = len(re.findall(r"^  epoch \d+ step \d+ loss", before, re.M))
    while len(re.findall(r"^  epoch \d+ step \d+ loss", log.read_text(), re.M)) < steps + 2:
        assert time.monotonic() < deadline, "training goes on after the stacks"
        time.sleep(0.2)
    (tmp_path / "hang-now").touch()
    t0 = time.monotonic()
    state, exit_code, out = wait_for_job(cluster, job_id, proj, timeout=TIMEOUT + 90)
    assert state == "FAILED" and time.monotonic() - t0 < TIMEOUT + 90, out[-3000:]
    assert len(asked.findall(out)) == 2, "one dump per rank for one signal"
    check_hang_evidence(out[len(before):], TIMEOUT)
