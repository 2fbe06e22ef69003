"""
Train a torchvision ResNet on ImageNet with PyTorch DistributedDataParallel (DDP), on one process or many.

The same file runs under every launcher, unchanged:

    python imagenet_ddp.py --data-dir /datasets/imagenet                    # one process
    torchrun --standalone --nproc_per_node=4 imagenet_ddp.py --data-dir ...  # 4 GPUs on this machine
    srun python imagenet_ddp.py --data-dir ...                               # in a Slurm job, one task per GPU
    sbatch run-imagenet.sh imagenet_ddp.py --data-dir /datasets/imagenet     # the wrapper: staging, then training
    python imagenet_ddp.py --synthetic --steps-per-epoch=100                 # generated tensors: throughput only

Data: --data-dir holds either the three archives as downloaded (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar,
ILSVRC2012_devkit_t12.tar.gz; reading the devkit needs scipy) or an extracted train/<wnid>/*.JPEG, val/<wnid>/*.JPEG
tree. Archives are extracted once per node to node-local disk (--local-dir, default $SLURM_TMPDIR, else $TMPDIR,
else /tmp), in parallel, by one process while the others of that node wait; a marker written last makes later jobs
on that node skip it. run-imagenet.sh stages in a step of its own before training; launched any other way, the ranks
stage after they meet, and wait for the slowest node up to --stage-timeout (4 h), not --dist-timeout. Shared
filesystems are slow at millions of small files: never train from an extracted copy there.

Expected: ResNet-50, 90 epochs, cosine schedule, label smoothing 0.1, bf16: about 76-77% top-1 (the usual figure for
this recipe). On CPU this script is only a smoke test (see tests/): resnet18 at 64 px on a few generated classes.
docs/imagenet.md says more: staging, --from-tar, the input pipeline, bad images.

Make it yours: another folder-per-class dataset fits as it is (--data-dir with train/ and val/); other data needs
its own Dataset in place of JPEGs, keeping the seeded per-image crop so a resumed epoch sees the same images. Pick the
model with --arch or replace the torchvision.models.get_model call; replace evaluate()'s top-1/top-5 for other
metrics. Keep the staging, the samplers, the loop's set_epoch and stop_check calls, the checkpoint and resume blocks
and the teardown.
"""
import argparse
import concurrent.futures
import contextlib
import fcntl
import gc
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import traceback
import warnings
from datetime import datetime, timedelta

import numpy as np
import torch
import torch.distributed as dist
# imported before any process group exists: imported later (DDP does), its functions' default arguments keep
# the default group, and with it gloo's threads, alive into interpreter shutdown
import torch.distributed.nn  # noqa: F401
import torch.nn.functional as F
import torchvision
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

# -----------------------------------------------------------------------------
# config


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def default_workers():
    """DataLoader workers per process: the CPUs Slurm gave this task, shared by the processes torchrun starts in it."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)  # one core stays with the training process


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ImageNet with DistributedDataParallel")
    p.add_argument("--epochs", type=positive_int, default=90, help="number of epochs to train (default: 90)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="training and validation batch size per process (default: 256)")
    p.add_argument("--lr", type=float, default=0.1,
                   help="SGD learning rate per 256 images; scaled by the global batch size (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-5,
                   help="weight decay, not applied to biases and norms (default: 5e-5)")
    p.add_argument("--label-smoothing", type=float, default=0.1,
                   help="label smoothing of the training loss (default: 0.1)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear learning-rate warm-up from 0 (default: 5)")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="after warm-up: cosine to 0, or /10 every 30 epochs (default: cosine)")
    p.add_argument("--arch", default="resnet50", help="a torchvision classification model (default: resnet50)")
    p.add_argument("--image-size", type=positive_int, default=224,
                   help="training crop; validation resizes to size/0.875 and center-crops (default: 224)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                   help="the ImageNet archives or train/ val/ folders (default: $DATA_DIR, else ./data)")
    p.add_argument("--local-dir", default=None,
                   help="node-local disk for the extracted images (default: $SLURM_TMPDIR, else $TMPDIR, else /tmp)")
    p.add_argument("--from-tar", action="store_true",
                   help="stage by copying the two tars and indexing them, then read JPEGs straight out of the copies: "
                        "nothing extracted")
    p.add_argument("--stage-only", action="store_true",
                   help="extract the archives to --local-dir and exit (once per node, e.g. srun --ntasks-per-node=1)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader worker processes per process "
                        "(default: $SLURM_CPUS_PER_TASK / processes per task - 1)")
    p.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap the training steps per epoch, for smoke tests (default: the whole epoch)")
    p.add_argument("--synthetic", action="store_true",
                   help="train on generated tensors (no data, no validation): throughput only")
    p.add_argument("--output-dir", default="./out",
                   help="the metrics JSONL file and tensorboard/RUN go here (default: ./out)")
    p.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR"),
                   help="save every epoch and resume from the latest checkpoint here (default: $CHECKPOINT_DIR, else "
                        "no checkpoints)")
    p.add_argument("--log-interval", type=positive_int, default=50, help="steps between loss prints (default: 50)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU if there is one (default: auto)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on GPU: bfloat16, or float16 with loss scaling before Ampere (default: on; "
                        "CPU trains in float32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format on GPU (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--profile", action="store_true",
                   help="trace 5 training steps on rank 0 with torch.profiler (after 8 to warm up): a table of the "
                        "slowest operators and a trace file for Perfetto or TensorBoard (default: off)")
    p.add_argument("--dist-timeout", type=positive_int, default=600,
                   help="seconds the ranks wait for each other, at start and in every collective (default: 600)")
    p.add_argument("--stage-timeout", type=positive_int, default=4 * 3600,
                   help="seconds the ranks wait for the slowest node's staging, apart from --dist-timeout "
                        "(default: 14400)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# distributed setup


def first_host(nodelist):
    """First host of a Slurm nodelist: 'n[1-2]' -> 'n1', 'gpu-[001-004,010],cpu1' -> 'gpu-001'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first comma outside brackets ends the first group
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], nodelist[:end])


def launch_env(env=os.environ):
    """Who am I? torchrun's variables first, else srun's, else a single process.
    Returns rank, local_rank, world_size, and the MASTER_ADDR/PORT to use (None when already set)."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or set by hand): it also sets MASTER_ADDR/PORT
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), None, None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun: one task per GPU
        world_size = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if world_size > 1 and "SLURM_STEP_ID" not in env:  # the job's batch script itself: the other ranks never come
            raise SystemExit(f"ERROR: this job has {world_size} tasks, but this process was not started by srun, so it "
                             f"would wait for {world_size - 1} ranks that never start. HINT: srun python "
                             f"{os.path.basename(__file__)} ..., "
                             "or submit with one of the run-gpu*.sh wrappers")
        # every rank computes the same address and port: rank 0 runs on the first node of the job,
        # and the port comes from the job id so that two jobs sharing a node do not collide
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world_size, addr, port
    return 0, 0, 1, None, None


def print0(message, file=sys.stdout):
    if RANK == 0:
        print_line(message, file)


def print_line(message, file=sys.stdout):
    """One write per line, so that lines from several ranks sharing a log never interleave mid-line."""
    file.write(f"{message}\n")
    file.flush()


def fail(message, speak=None):
    """One clear line, from rank 0 unless `speak` says whether this rank prints it, then a non-zero exit on every
    rank (the finally block tears down). The other ranks exit a moment later: torchrun and srun --kill-on-bad-exit
    end every rank once one fails, and the rank that speaks may not have printed yet."""
    if RANK == 0 if speak is None else speak:
        print_line(f"ERROR: {message}", sys.stderr)
    if RANK != 0:
        time.sleep(3)
    raise SystemExit(1)


def all_ranks_ok(ok, device):
    """Agree on a flag across ranks; doubles as a barrier. False if any rank reported a failure."""
    if WORLD_SIZE == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_gather(obj):
    """Every rank's obj, in rank order."""
    if WORLD_SIZE == 1:
        return [obj]
    out = [None] * WORLD_SIZE
    dist.all_gather_object(out, obj)
    return out

# the oldest NVIDIA driver each CUDA major version runs on (CUDA's minor-version compatibility)
CUDA_DRIVER_FLOOR = {"13": 580, "12": 525, "11": 450}


def unusable_gpus(env=os.environ):
    """None, or the error when the job was given GPUs (CUDA_VISIBLE_DEVICES, else Slurm's SLURM_JOB_GPUS or
    SLURM_GPUS_ON_NODE) that torch cannot use, e.g. behind a driver older than torch's CUDA build: without this check
    a 4-GPU job would train on the CPU and look fine."""
    if torch.cuda.is_available():
        return None
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        value = env.get(var, "").strip()
        if value in ("", "-1", "NoDevFiles") or (var == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue  # no GPU given this way
        cuda = torch.version.cuda
        if cuda is None:
            needs = "it is a CPU-only build"
        else:
            needs = (f"it is a build for CUDA {cuda}, which needs an NVIDIA driver >= "
                     f"{CUDA_DRIVER_FLOOR.get(cuda.split('.')[0])} (nvidia-smi shows yours)")
            if cuda.startswith("13"):  # CUDA 13 builds have no kernels for GPUs before Turing
                needs += " and a GPU of compute capability >= 7.5"
        return (f"this job was given GPUs ({var}={value}), but torch {torch.__version__} cannot use them: {needs}. "
                "HINT: install the torch build that matches the cluster's driver, or pass --device=cpu to train on "
                "CPU anyway")
    return None


def gpu_index(local_rank, env=os.environ):
    """Which of the GPUs this process sees (torch.cuda.device_count()) it trains on: one process per GPU. Raises
    ValueError when this node runs more processes than they see GPUs (two ranks on one GPU fail in NCCL).
    - Each process sees all of the node's GPUs (torchrun; srun with --gres=gpu:N or --gpus-per-node): GPU local_rank.
    - Each srun task sees only its own (--gpus-per-task=1, --gpu-bind, --ntasks-per-gpu, a site default): fewer than
      Slurm gave the step on this node (SLURM_GPUS_ON_NODE). It takes the first."""
    visible = torch.cuda.device_count()
    launcher = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE") if v in env), None)
    if launcher:  # torchrun, DeepSpeed's launcher or mpirun started this node's processes: they see the same GPUs
        local_size = int(env[launcher])
    elif "SLURM_STEP_ID" in env and "SLURM_STEP_TASKS_PER_NODE" in env:  # srun: "4", or "2(x3),1" (2 on 3 nodes, 1)
        if 0 < visible < int(env.get("SLURM_GPUS_ON_NODE") or 0):
            return 0  # this task was given its own GPU(s)
        per_node = [int(n) for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", env["SLURM_STEP_TASKS_PER_NODE"])
                    for _ in range(int(times or 1))]
        local_size = per_node[min(int(env.get("SLURM_NODEID", 0)), len(per_node) - 1)]
    else:
        local_size = 1
    local_size = max(local_size, local_rank + 1)  # a launcher that says nothing: at least this many
    if local_size > visible:
        raise ValueError(f"{local_size} processes on {socket.gethostname()} share {visible} "
                         f"visible GPU(s) (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); two ranks "
                         "on one GPU fail in NCCL. HINT: one process per GPU: as many tasks per node (srun) or "
                         "--nproc-per-node (torchrun) as GPUs per node, or --gpus-per-task=1")
    return local_rank


def autocast_dtype(device):
    """The GPU's mixed-precision type: bfloat16 where it computes it natively (compute capability 8.0 and later: A100,
    H100, L4, RTX 30xx and newer), else float16, which needs loss scaling (a GradScaler). torch.cuda.is_bf16_supported()
    also says yes on 7.5 (T4, RTX 20xx), where bfloat16 is emulated, slowly."""
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


def init_failed(error, timeout):
    """The ranks could not form their process group: each rank says why, from where it stands."""
    reason = str(error).splitlines()[0][:200]
    where = f"MASTER_ADDR:MASTER_PORT = {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if "EADDRINUSE" in reason:  # rank 0 cannot listen: another program, or another job, holds the port
        fail(f"rank 0 cannot listen on {where} ({reason}). HINT: the port is in use; unset MASTER_PORT to derive one "
             "from the job id, or pick a free one", speak=True)
    fail(f"rank {RANK} on {socket.gethostname()} did not meet the other ranks at {where} within {timeout:g} s "
         f"({reason}). HINT: a rank that could not start says why in this log; else check that MASTER_ADDR is the "
         "job's first node and reachable from here", speak=True)


# Preemption: Slurm sends SIGUSR1 before the time limit (the wrappers ask for it with --signal) and SIGTERM when it
# cancels or preempts. The handler only notes the signal; the training loop checks it at step boundaries, all ranks
# agree, rank 0 writes a mid-epoch checkpoint, and the job requeues itself (on SIGUSR1) and exits with EXIT_RESUMABLE.
# Without a signal (no --signal, a container that swallows it, a grace time too short), rank 0 stops the same way
# when the job's end is near (NEAR_END). MAX_REQUEUES (default 20) bounds the requeues.
STOP_SIGNALS = {signal.SIGUSR1: "SIGUSR1", signal.SIGTERM: "SIGTERM"}
NEAR_END = 1           # not a signal we handle: the ranks' agreed "stop" when rank 0 finds the end time near
STOP_CHECK_EVERY = 10  # steps between the (tiny) all-reduces that agree on stopping
EXIT_RESUMABLE = 75    # "try again": stopped on a signal with a checkpoint; run the same command to resume
received_signals = []
stop_clock = {}        # rank 0: the job's end time, the last check's time, the longest gap between two checks


def on_stop_signal(signum, frame):
    received_signals.append(signum)


def slurm_seconds(text):
    """Seconds in Slurm's [days-][hours:]minutes:seconds ('1-02:03:04', '59:30'); None for UNLIMITED and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    return None if m is None else ((int(m[1] or 0) * 24 + int(m[2] or 0)) * 60 + int(m[3])) * 60 + int(m[4])


def job_end_time(env=os.environ):
    """When Slurm ends this job (time.time() seconds), or None: SLURM_JOB_END_TIME where Slurm sets it (23.02 and
    later), else the time left that squeue reports. Rank 0 asks once: a thousand ranks asking would load slurmctld."""
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    if not env.get("SLURM_JOB_ID"):
        return None
    try:
        r = subprocess.run(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%L"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no Slurm client here, or slurmctld not answering
        return None
    left = slurm_seconds(r.stdout) if r.returncode == 0 else None
    return None if left is None else time.time() + left


def near_end():
    """Rank 0, at each stop check: is the job's end nearer than STOP_MARGIN seconds (default 60) plus the longest this
    run has taken from one check to the next (10 steps, or an epoch's end with its evaluation and checkpoint)? Then
    the next check might come too late to save."""
    now = time.time()
    if not stop_clock:  # the first check of this run
        stop_clock.update(end=job_end_time(), last=now, gap=0.0)
    stop_clock["gap"], stop_clock["last"] = max(stop_clock["gap"], now - stop_clock["last"]), now
    if stop_clock["end"] is None:
        return False
    stop_clock["left"] = stop_clock["end"] - now
    return stop_clock["left"] < float(os.environ.get("STOP_MARGIN") or 60) + stop_clock["gap"]


def stop_signal(device, watch_end=True):
    """The stop signal any rank received (NEAR_END: rank 0 found the end near, if `watch_end`; 0: none), the same on
    every rank at the same step."""
    near = watch_end and RANK == 0 and near_end()
    signum = torch.tensor([max(received_signals + [NEAR_END if near else 0])], device=device)
    if WORLD_SIZE > 1:
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
    return int(signum.item())


def stop_check(device, checkpoint, epoch, step):
    """Called at the same steps on every rank, and once before the first step (epoch 0: signals only; the end time is
    first read at the next check). If any rank received a stop signal or the end is near: write a checkpoint at
    `step` of `epoch` (step 0: the end of the epoch, already written; checkpoint None: no --checkpoint-dir), requeue
    the Slurm job unless it is being cancelled (SIGTERM), restarted MAX_REQUEUES times already, or stopped again before
    training a step, then exit EXIT_RESUMABLE on every rank."""
    signum = stop_signal(device, watch_end=epoch > 0)
    if not signum:
        return
    if checkpoint and step:
        checkpoint(epoch, step)
    where = f"epoch {epoch} step {step}" if step else f"the end of epoch {epoch}"
    message = ("nothing trained yet in this run" if not epoch else f"checkpoint at {where}" if checkpoint
               else "no --checkpoint-dir, nothing saved")
    job_id, restarts = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    cap = int(os.environ.get("MAX_REQUEUES") or 20)
    requeued = False
    if RANK == 0 and job_id and signum != signal.SIGTERM:
        if restarts >= cap:
            message += f"; not requeued: job {job_id} has restarted {restarts} times (MAX_REQUEUES={cap})"
        elif restarts and not epoch:  # a requeue would only repeat this: start-up alone outlasts the time left
            message += f"; not requeued: this restart of job {job_id} stopped before its first step, as the next would"
        else:
            try:
                r = subprocess.run(["scontrol", "requeue", job_id], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
                why = None if r.returncode == 0 else " ".join(r.stdout.split())[:300]  # one line for the log
            except OSError as e:  # no scontrol here, e.g. in a container without Slurm's client
                why = f"scontrol: {e.strerror}"
            requeued = why is None
            message += f"; requeued job {job_id}" if requeued else f"; could not requeue job {job_id}: {why}"
        if not requeued:
            message += ". Resubmit the same command to resume"
    cause = (f"on {STOP_SIGNALS[signum]}" if signum in STOP_SIGNALS
             else f"{stop_clock.get('left', 0):.0f} s before the time limit, with no signal")
    TIMES.lap("compute")
    print0(f"stopped {cause}: {message}")
    print0(TIMES.words())  # this run's, as the done line has it: each requeued run of a long job has its own
    all_ranks_ok(True, device)  # the others wait for the requeue: an early exit could make the launcher end rank 0
    for signum in STOP_SIGNALS:  # from here a SIGTERM (srun --kill-on-bad-exit ending the other tasks once one has
        signal.signal(signum, signal.SIG_IGN)  # exited 75) must not turn an exit 75 into a death by signal (143)
    raise SystemExit(EXIT_RESUMABLE)


# Where the time went: TIMES is a stopwatch whose laps name what the time since the previous lap was spent on, so the
# parts add up to the wall time from this process's start to its last lap. Host clocks only: on a GPU the host runs
# ahead of the kernels it queues, and the GPU's time shows where the host waits for it (a loss .item(), an all-reduce,
# a full launch queue), in "compute". No lap syncs the GPU.
TIME_PARTS = {"startup": "start-up", "staging": "staging", "data": "data wait", "compute": "compute",
              "eval": "evaluation", "checkpoint": "checkpoints"}
DATA_WAIT_HINT = 0.1  # a HINT when a rank waits for its batches longer than this share of its training steps' time


def process_start():
    """This process's start on time.perf_counter()'s clock, as Linux records it (/proc/self/stat: clock ticks after
    boot); elsewhere now, and the imports before go uncounted."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the name in parentheses (which may hold spaces)
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return time.perf_counter() - max(age, 0.0)


class TimeSplit:
    def __init__(self):
        self.seconds, self.last = dict.fromkeys(TIME_PARTS, 0.0), process_start()

    def lap(self, part):
        """The time since the previous lap went to `part`."""
        now = time.perf_counter()
        self.seconds[part] += now - self.last
        self.last = now

    def words(self):
        total = sum(self.seconds.values())
        return f"time on rank 0, {total:.1f} s: " + ", ".join(
            f"{TIME_PARTS[part]} {100 * s / total:.0f}%" for part, s in self.seconds.items() if s)

    def report(self, loader):
        """At the end: rank 0's split in one line of words, and in seconds for the done line. A HINT when a rank
        waited for data longer than DATA_WAIT_HINT of its training steps' time (`loader`: how its batches are made)."""
        print0(self.words())
        waits = all_gather(self.seconds["data"] / max(self.seconds["data"] + self.seconds["compute"], 1e-9))
        worst = max(range(len(waits)), key=waits.__getitem__)
        if waits[worst] > DATA_WAIT_HINT:
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            print0(f"HINT: rank {worst} waited for data {100 * waits[worst]:.0f}% of its training steps' time: the "
                   f"input, not the model, sets the pace. Make batches in more DataLoader worker processes (--workers; "
                   f"now {loader}), up to the CPUs per task (SLURM_CPUS_PER_TASK="
                   f"{os.environ.get('SLURM_CPUS_PER_TASK', 'unset')}, {usable} usable here; sbatch --cpus-per-task)")
        return {part: round(s, 4) for part, s in self.seconds.items()}


TIMES = TimeSplit()


# -----------------------------------------------------------------------------
# data: stage the archives to node-local disk once per node, then decode JPEGs in DataLoader workers

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet RGB statistics
NORMALIZE = {}  # device -> (mean, std) tensors, made once


def val_wnids(devkit):
    """The class (wnid) of validation image 1, 2, ... from the devkit: ground-truth ILSVRC ids mapped through
    meta.mat."""
    import scipy.io  # only the devkit's MATLAB file needs it
    with tarfile.open(devkit, "r:gz") as tar:
        files = {os.path.basename(m.name): m for m in tar if m.isfile()}
        meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(files["meta.mat"]).read()), squeeze_me=True)["synsets"]
        truth = tar.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read().split()
    # the 1000 leaves of the synset tree are the classes
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    return [wnid_of_id[int(i)] for i in truth]


def ignore_stop_signals(*_):
    """DataLoader workers ignore the stop signals, which Slurm sends to every process of the job step: torch's worker
    would die of a SIGTERM that its parent did not send (or of SIGUSR1), and take the training process with it before
    the ranks agree to stop. The training process stops the workers itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def extract_members(tar_path, members):
    """Copy (offset, size, dest) byte ranges of an uncompressed tar to files. Runs in a worker process."""
    with open(tar_path, "rb") as f:
        for offset, size, dest in members:
            f.seek(offset)
            with open(dest, "wb") as out:
                out.write(f.read(size))
    return len(members)


def extract_class_tar(tar_path, offset, size, dest):
    """Unpack one per-class tar nXXXXXXXX.tar, the bytes [offset, offset + size) of the big train tar, into dest/:
    its bytes are streamed to GNU tar (fast, and it refuses absolute or ../ member names). Runs in a worker process."""
    os.makedirs(dest, exist_ok=True)
    untar = subprocess.Popen(["tar", "-x", "-C", dest], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(tar_path, "rb") as f:
        f.seek(offset)
        while size > 0:
            chunk = f.read(min(size, 1 << 22))
            untar.stdin.write(chunk)
            size -= len(chunk)
    untar.stdin.close()
    if untar.wait():
        raise RuntimeError(f"tar could not unpack the class tar at byte {offset} of {tar_path}: "
                           f"{untar.stderr.read().decode().strip()}")
    return 1


def tar_files(f, offset=0):
    """(offset, size, name) of each file in the uncompressed tar that starts at `offset` of the open file f.
    Offsets count from the start of f, also for a tar inside a tar."""
    f.seek(offset)
    with tarfile.open(fileobj=f) as tar:
        return [(m.offset_data, m.size, os.path.basename(m.name)) for m in tar if m.isfile()]


def stage(data_dir, local_dir, workers, from_tar=False):
    """Extract the archives into local_dir/train/<wnid>/ and local_dir/val/<wnid>/, once per node; or, from_tar, copy
    the two tars there and write index.pt, the byte range and class of every JPEG in them (nothing extracted).
    An flock makes one process stage while the others wait; the marker, written last, makes later runs skip."""
    archives = [os.path.join(data_dir, name) for name in (TRAIN_TAR, VAL_TAR, DEVKIT)]
    stamp = json.dumps([from_tar] + [[os.path.abspath(a), os.path.getsize(a), int(os.path.getmtime(a))]
                                     for a in archives])
    marker = os.path.join(local_dir, "STAGED")
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits, even on a crash
        if os.path.exists(marker) and open(marker).read() == stamp:
            return False
        t0 = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
        # a half-finished copy (no marker) is redone from scratch
        for sub in ("train", "val", "index.pt", TRAIN_TAR, VAL_TAR):
            shutil.rmtree(os.path.join(local_dir, sub), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local_dir, sub))
        wnids = val_wnids(archives[2])
        if from_tar:  # one sequential read of each tar; from now on only the local copies are read
            for a in archives[:2]:
                shutil.copyfile(a, os.path.join(local_dir, os.path.basename(a)))
            archives = [os.path.join(local_dir, os.path.basename(a)) for a in archives[:2]] + archives[2:]
        # the tars' headers: 1000 class tars in the train tar, 50,000 images in the val tar
        with open(archives[0], "rb") as train, open(archives[1], "rb") as val:
            classes = [(offset, size, name[:-4]) for offset, size, name in tar_files(train) if name.endswith(".tar")]
            images = tar_files(val)
        if from_tar:  # an index: the DataLoader reads byte ranges of the copies
            label = {wnid: k for k, (_, _, wnid) in enumerate(sorted(classes, key=lambda c: c[2]))}
            # 1.28 M headers, read from the local copy (on a shared filesystem: as many small scattered reads)
            with open(archives[0], "rb") as f:  # in the order of the extracted folders: by class, then file name
                train = [(o, n, label[wnid]) for offset, _, wnid in classes
                         for o, n, _ in sorted(tar_files(f, offset), key=lambda m: m[2])]
            val = sorted(((label[wnids[int(re.findall(r"\d+", name)[-1]) - 1]], name, o, n) for o, n, name in images))
            train.sort(key=lambda row: row[2])
            val = [(o, n, k) for k, _, o, n in val]
            torch.save({"classes": sorted(label), "train": torch.tensor(train), "val": torch.tensor(val)},
                       os.path.join(local_dir, "index.pt"))
        else:
            extract_all(archives, local_dir, classes, images, wnids, workers)
        with open(marker + ".tmp", "w") as f:
            f.write(stamp)
        os.replace(marker + ".tmp", marker)
        print_line(f"staged {len(classes)} classes and {len(images)} validation images into {local_dir} "
                   f"({'copied + indexed' if from_tar else 'extracted'}) in {time.perf_counter() - t0:.1f} s on "
                   f"{socket.gethostname()}")
        return True


def extract_all(archives, local_dir, classes, images, wnids, workers):
    """Both archives are uncompressed tars: workers read disjoint byte ranges of them in parallel."""
    for wnid in set(wnids):
            os.makedirs(os.path.join(local_dir, "val", wnid))
    val_files = [(offset, size, os.path.join(local_dir, "val", wnids[int(re.findall(r"\d+", name)[-1]) - 1], name))
                 for offset, size, name in images]
    # its workers, and the tar each starts, finish the copy whatever signal the job step gets (the next run would redo
    # an unfinished copy): the training process handles the signal once it trains
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=ignore_stop_signals) as pool:
        jobs = [pool.submit(extract_class_tar, archives[0], offset, size,
                            os.path.join(local_dir, "train", wnid)) for offset, size, wnid in classes]
        jobs += [pool.submit(extract_members, archives[1], val_files[k::workers]) for k in range(workers)]
        for job in concurrent.futures.as_completed(jobs):
            job.result()  # re-raises a worker's error here


class JPEGs(torch.utils.data.Dataset):
    """The images of root/<split>/<class>/ (or, after --from-tar staging, byte ranges of root's tar copies), decoded
    with torchvision.io (libjpeg-turbo) into uint8 tensors, cropped and flipped as uint8: no PIL, no float images in
    the workers (normalization happens on the device, on the whole batch)."""

    def __init__(self, root, split, size, seed):
        # numpy arrays, not 1.28 M Python tuples: forked DataLoader workers share them, where tuples would slowly be
        # copied into every worker (reading a Python object writes its reference count)
        self.tar, self.fd, self.folder = None, None, os.path.join(root, split)
        if os.path.exists(os.path.join(root, "index.pt")):  # rows of (offset, size, label)
            index = torch.load(os.path.join(root, "index.pt"), weights_only=True)
            self.classes, self.samples = index["classes"], index[split].numpy()
            self.tar = os.path.join(root, TRAIN_TAR if split == "train" else VAL_TAR)
        else:  # rows of (label,), and the file names as one fixed-width bytes array
            self.classes = sorted(e.name for e in os.scandir(self.folder) if e.is_dir())
            files = [(label, name) for label, c in enumerate(self.classes)
                     for name in sorted(os.listdir(os.path.join(self.folder, c)))]
            self.samples = np.array([[label] for label, _ in files], dtype=np.int64).reshape(-1, 1)
            self.names = np.array([name.encode() for _, name in files], dtype=np.bytes_)
        self.train, self.size, self.seed = split == "train", size, seed
        self.val_transform = v2.Compose([v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)])

    def __len__(self):
        return len(self.samples)

    def path(self, i):
        """Image i's file, extracted-folder mode."""
        return os.path.join(self.folder, self.classes[self.samples[i][0]], self.names[i].decode())

    def read(self, i):
        """The image file's bytes as a uint8 tensor, and its label."""
        if self.tar is None:
            return read_file(self.path(i)), int(self.samples[i][0])
        if self.fd is None:
            # pread() keeps no file position: one descriptor serves every worker
            self.fd = os.open(self.tar, os.O_RDONLY)
        offset, size, label = (int(v) for v in self.samples[i])
        return torch.frombuffer(bytearray(os.pread(self.fd, size, offset)), dtype=torch.uint8), label

    def __getitem__(self, key):
        epoch, i = key if self.train else (0, key)
        try:
            data, label = self.read(i)
            image = decode_image(data, mode=ImageReadMode.RGB)
        except Exception as e:  # a corrupt or unreadable file is skipped and counted, not fatal (label -100 is ignored)
            where = self.path(i) if self.tar is None else f"{self.tar} at byte {int(self.samples[i][0])}"
            print_line(f"WARNING: skipping unreadable image {where} ({type(e).__name__}: {e})", sys.stderr)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -100
        if not self.train:
            return self.val_transform(image), label
        # the crop of image i in epoch e depends on (seed, e, i) only: the same with any number of workers or ranks,
        # and again after a resume from the middle of an epoch
        return random_resized_crop(image, self.size, random.Random(hash((self.seed, epoch, i)))), label


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception-style augmentation of a uint8 CHW image: a crop of 8-100% of the area with aspect ratio 3/4-4/3,
    resized to size x size (antialiased), flipped with probability 1/2. Draws from rng (a random.Random), so the
    caller decides the randomness; the same recipe as torchvision's RandomResizedCrop + RandomHorizontalFlip, without
    their per-call overhead (about 0.2 ms of a 2.3 ms image)."""
    _, height, width = image.shape
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # a very elongated image: the largest centered crop within the allowed aspect ratios
        w, h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
        top, left = (height - h) // 2, (width - w) // 2
    crop = image[None, :, top:top + h, left:left + w]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if rng.random() < 0.5 else out


class EpochSampler(torch.utils.data.Sampler):
    """This rank's shard of the epoch from DistributedSampler, as (epoch, index) keys, from step `skip` on (resume)."""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size, self.epoch, self.skip = sampler, batch_size, 0, 0

    def set_epoch(self, epoch, skip_steps=0):
        self.sampler.set_epoch(epoch)  # without this every epoch repeats the same shuffle
        self.epoch, self.skip = epoch, skip_steps * self.batch_size

    def __iter__(self):
        return ((self.epoch, i) for i in list(self.sampler)[self.skip:])

    def __len__(self):
        return len(self.sampler) - self.skip


def to_device(x, y, device, channels_last):
    """uint8 NCHW batch -> normalized float on the device (4x less to copy than float images)."""
    if device not in NORMALIZE:
        NORMALIZE[device] = [torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD)]
    mean, std = NORMALIZE[device]
    x = x.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x, y.to(device, non_blocking=True)


# -----------------------------------------------------------------------------
# model


def param_checksum(model):
    """A hash of every parameter's bytes: equal on all ranks iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: also for bfloat16
    return h.hexdigest()[:16]


def average_buffers(model):
    """BatchNorm running statistics are per rank (DDP copies rank 0's at every forward): average them, so that
    validation and checkpoints see one model, estimated from every rank's batches."""
    if WORLD_SIZE > 1:
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(WORLD_SIZE)


def lr_factor(step, steps_per_epoch, args):
    """Linear warm-up from 0, then cosine to 0 or /10 every 30 epochs. Per optimizer step."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "step":
        return 0.1 ** (step // steps_per_epoch // 30)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)))


@torch.no_grad()
def evaluate(model, loader, device, args, amp_dtype):
    """Exact validation: rank r scores images r, r+W, r+2W, ... (no padding, no image twice), then sums."""
    model.eval()
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count, skipped
    for x, y in loader:
        x, y = to_device(x, y, device, args.channels_last and device.type == "cuda")
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(x).float()
        ok = y >= 0  # -100: an unreadable image
        hits = (out.topk(min(5, out.shape[1]), 1).indices == y[:, None]) & ok[:, None]
        stats += torch.stack([F.cross_entropy(out, y, reduction="sum", ignore_index=-100), hits[:, 0].sum(),
                              hits.any(1).sum(), ok.sum(), (~ok).sum()]).double()
    if WORLD_SIZE > 1:
        dist.all_reduce(stats)
    loss_sum, top1, top5, count, skipped = stats.tolist()
    return dict(val_loss=loss_sum / max(count, 1), top1=top1 / max(count, 1), top5=top5 / max(count, 1),
                val_count=int(count), val_skipped=int(skipped))


# -----------------------------------------------------------------------------
# checkpoints


def rng_state(device):
    """This rank's random state: the CPU generator's and, on a GPU, the GPU's (dropout and the like draw from it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    state = state if isinstance(state, dict) else {"cpu": state}  # a checkpoint from before the GPU's was saved
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_checkpoint(ckpt_dir, name, state, scratch, keep=2):
    """Atomic: write to node-local scratch, copy to a temporary file in ckpt_dir, fsync, rename. A crash mid-save
    leaves the previous checkpoint intact. Names sort in training order: epoch_0003.pt, epoch_0003_step_0000120.pt."""
    path = os.path.join(ckpt_dir, f"{name}.pt")
    local, tmp = os.path.join(scratch, f"{name}.pt"), f"{path}.tmp{os.getpid()}"
    torch.save(state, local)  # fast local write; then one sequential copy to the (shared) checkpoint dir
    shutil.copyfile(local, tmp)
    os.remove(local)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")))[:-keep]:
        os.remove(old)
    return path


def run_name(env=os.environ):
    """What names this run's outputs (metrics file, TensorBoard run, profile): ARRAYJOB_TASK in a task of a Slurm job
    array (a sweep, sbatch --array), else the job id, else the start time. A requeued job keeps its name."""
    if env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env.get('SLURM_ARRAY_JOB_ID')}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or datetime.now().strftime("%Y%m%d-%H%M%S")


def task_checkpoint_dir(checkpoint_dir, env=os.environ):
    """The tasks of a job array share their command line, but none may resume another's checkpoints: each keeps its
    own in --checkpoint-dir/ARRAYJOB_TASK, where its requeues find them."""
    if checkpoint_dir and env.get("SLURM_ARRAY_TASK_ID"):
        return os.path.join(checkpoint_dir, run_name(env))
    return checkpoint_dir


PROFILE_STEPS = {"wait": 5, "warmup": 3, "active": 5}  # steps skipped, traced but dropped (warm-up), traced and kept


def profiler(args, device, name):
    """With --profile, torch.profiler on rank 0 over a few steps (PROFILE_STEPS; the loop calls .step() after each),
    CUDA kernels included on a GPU. The trace goes to --output-dir/profile-NAME.json (Perfetto, chrome://tracing and
    TensorBoard's profile plugin open it) and the operators that took longest are printed as one short table. None
    without --profile, or on other ranks: it then costs nothing."""
    if not args.profile or RANK != 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule
    cuda = device.type == "cuda"
    path = os.path.join(args.output_dir, f"profile-{name}.json")

    def report(prof):
        prof.export_chrome_trace(path)
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=8, max_name_column_width=40)
        print_line(f"profile of {PROFILE_STEPS['active']} steps on rank 0, slowest operators first (the trace: {path}, "
                   f"open it in https://ui.perfetto.dev):\n{table}")

    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(**PROFILE_STEPS, repeat=1), on_trace_ready=report)
    prof.start()
    return prof


def tensorboard(output_dir, name, purge_step):
    """Rank 0's TensorBoard writer into output_dir/tensorboard/name (None on other ranks). A requeued or resumed run
    writes into its first run's folder from step `purge_step` on; TensorBoard drops what the interrupted run wrote from
    there, so no point shows twice. Without tensorboard installed the script trains all the same."""
    if RANK != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported here: the script runs without tensorboard
    except ImportError:
        print_line("NOTE: tensorboard is not installed (pip install tensorboard): no TensorBoard curves; the metrics "
                   "JSONL file has the same numbers")
        return None
    return SummaryWriter(os.path.join(output_dir, "tensorboard", name), purge_step=purge_step)


def check_same_run(path, saved, run):
    """Refuse to resume a checkpoint that another run wrote: going on from it with other settings (`run`: what changes
    the result, and the world size) would give a mix that neither run describes. --epochs may grow. A checkpoint from
    before runs were recorded (saved None) is taken as it is; a commit counts where both runs know theirs."""
    if saved is None:
        return
    changed = [f"{key} {saved[key]} -> {value}" for key, value in run.items() if key in saved and saved[key] != value
               and not (key == "git_commit" and None in (saved[key], value))]
    if changed:
        why = (" (each rank's shard of the data, and the global batch, depend on the number of processes)"
               if "world_size" in saved and saved["world_size"] != run.get("world_size") else "")
        fail(f"{path} was written by another run: {', '.join(changed)}{why}. HINT: rerun with the settings it was "
             "written with (--epochs may grow), or use a new --checkpoint-dir")


def check_writable(ckpt_dir):
    """Fail now, with the reason, rather than after the first epoch."""
    probe = os.path.join(ckpt_dir, f".write-test-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write checkpoints to {os.path.abspath(ckpt_dir)} ({e.strerror}). HINT: choose a --checkpoint-dir "
             "you can write to")


def load_latest_checkpoint(ckpt_dir):
    """Newest loadable checkpoint, or (None, None). A corrupt newest file is reported, never silently skipped to a
    fresh start. Loaded to the CPU: load_state_dict puts each tensor where it belongs, and keeps the optimizer's step
    counts on the CPU (on the GPU, AdamW would sync the host for each parameter on every step)."""
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")), reverse=True):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            print0(f"WARNING: cannot load {path} ({type(e).__name__}: {e}); trying the previous checkpoint")
    return None, None


# -----------------------------------------------------------------------------
# main

RANK, LOCAL_RANK, WORLD_SIZE = 0, 0, 1


@record  # under torchrun, a crash is written to its error file and the summary names the failing rank
def main(args):
    global RANK, LOCAL_RANK, WORLD_SIZE
    args.checkpoint_dir = task_checkpoint_dir(args.checkpoint_dir)  # in a job array: a folder per task
    RANK, LOCAL_RANK, WORLD_SIZE, addr, port = launch_env()
    if RANK != 0:  # only rank 0 speaks: other ranks' warnings would repeat it WORLD_SIZE times
        warnings.filterwarnings("ignore")
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    if args.arch not in torchvision.models.list_models(module=torchvision.models):  # now, not after minutes of staging
        fail(f"unknown --arch {args.arch}. HINT: one of torchvision's classification models, e.g. resnet18, resnet50, "
             "resnet101, wide_resnet50_2, convnext_tiny (python -c 'import torchvision; "
             "print(torchvision.models.list_models())')")
    if args.stage_only:  # one process per node, no process group (run-imagenet.sh runs this as its own step)
        print_line(f"data ready in {find_data(args)} on {socket.gethostname()}")
        return

    # one process per device: a GPU of its own with NCCL (gpu_index), else CPU with gloo
    if args.device != "cpu" and (error := unusable_gpus()):
        fail(error)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given, but no CUDA device is visible here. HINT: request a GPU (e.g. --gres=gpu:1) or "
             "use --device cpu")
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cpu")
    if use_cuda:
        try:
            device = torch.device("cuda", gpu_index(LOCAL_RANK))
        except ValueError as e:  # every process of that node knows; its local rank 0 says it
            fail(str(e), speak=LOCAL_RANK == 0)
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once and keeps the fastest
    if WORLD_SIZE > 1:
        if addr:  # launched by srun: tell init_process_group where rank 0 listens
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port
        try:  # the timeout bounds every collective: a hung rank ends the job instead of holding it until the time limit
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=RANK, world_size=WORLD_SIZE,
                                    timeout=timedelta(seconds=args.dist_timeout))
        except (dist.DistNetworkError, dist.DistStoreError) as e:
            init_failed(e, args.dist_timeout)
    print_line(f"[rank {RANK}/{WORLD_SIZE}] local_rank {LOCAL_RANK} host {socket.gethostname()} device {device}")
    try:
        # staged after the ranks met: a node that stages for an hour while another already has its copy keeps no rank
        # waiting in init_process_group or a training collective (find_data waits with its own timeout)
        data_root = None
        if not args.synthetic:
            TIMES.lap("startup")
            data_root = find_data(args)
            TIMES.lap("staging")  # this node's copy, then the wait for the slowest node's
        train(args, device, data_root)
    except BaseException as e:  # a stop or an error: the frames it left hold the model, and the model its group
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if dist.is_initialized():
            # nothing may hold the process group past its destroy_process_group: one that outlives it keeps gloo's
            # and the store's threads running into interpreter shutdown, which now and then aborts a finished run
            gc.collect()  # DDP's reducer sits in reference cycles
            dist.destroy_process_group()


def local_base(args):
    """Node-local disk: fast, private to the node, usually wiped when the job ends."""
    base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return args.local_dir or os.path.join(base, f"imagenet-{os.getuid()}")


def find_data(args):
    """The folder holding train/ and val/: the extracted tree as given, or a node-local copy of the archives. In a
    process group, every rank then waits until every node has staged, on a group of its own whose timeout is
    --stage-timeout (the training collectives keep --dist-timeout); if one node's staging failed, all ranks stop."""
    if all(os.path.isdir(os.path.join(args.data_dir, s)) for s in ("train", "val")):
        return args.data_dir
    missing = [n for n in (TRAIN_TAR, VAL_TAR, DEVKIT) if not os.path.isfile(os.path.join(args.data_dir, n))]
    if missing:
        fail(f"no ImageNet in {os.path.abspath(args.data_dir)}: it needs train/ and val/ folders, or "
             f"{', '.join(missing)}. "
             "HINT: --data-dir (or $DATA_DIR) must point at the folder holding the archives as downloaded from "
             "image-net.org")
    local_dir = local_base(args)
    waiting = None  # the ranks wait for the slowest node on a group of their own (gloo: CPU tensors, on any node)
    if dist.is_initialized():
        waiting = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.stage_timeout))
    try:
        stage(args.data_dir, local_dir, max(1, len(os.sched_getaffinity(0))), args.from_tar)
        ok = True
    except Exception as e:  # each node stages for itself: local rank 0 of the node that failed says so
        ok = False
        if LOCAL_RANK == 0:
            print_line(f"ERROR: staging {args.data_dir} into {local_dir} on {socket.gethostname()} failed "
                       f"({type(e).__name__}: {e}). "
                       "HINT: --local-dir needs ~160 GB free for ImageNet; a half-finished copy is redone on the next "
                       "run", sys.stderr)
    if waiting is not None:
        t0 = time.perf_counter()
        flag = torch.tensor([1 if ok else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=waiting)  # returns once the slowest node has staged
        if ok and not flag.item():
            print0("ERROR: staging failed on another node (its ERROR line says why)", sys.stderr)
        elif ok and time.perf_counter() - t0 >= 1:
            print0(f"waited {time.perf_counter() - t0:.0f} s for the other nodes' staging")
        ok = bool(flag.item())
        dist.destroy_process_group(waiting)
    if not ok:
        raise SystemExit(1)
    return local_dir


def train(args, device, data_root):
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    cuda = device.type == "cuda"
    amp_dtype = autocast_dtype(device) if args.amp and cuda else None
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler", None: "fp32"}[amp_dtype]
    channels_last = args.channels_last and cuda

    # -----------------------------------------------------------------------------
    # data: each rank reads a disjoint 1/WORLD_SIZE of the images, reshuffled every epoch
    if args.synthetic:  # one fixed random batch per rank, fed again and again: measures the model, not the data
        num_classes, n_train, n_val = 1000, None, 0
        g = torch.Generator().manual_seed(args.seed + RANK)
        fake = (torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                              dtype=torch.uint8, generator=g),
                torch.randint(0, num_classes, (args.batch_size,), generator=g))
        fake = tuple(t.to(device) for t in fake)
        steps_per_epoch = args.steps_per_epoch or 100
    else:
        train_set = JPEGs(data_root, "train", args.image_size, args.seed)
        val_set = JPEGs(data_root, "val", args.image_size, args.seed)
        if len(train_set) == 0 or train_set.classes != val_set.classes:
            fail(f"{data_root}: train/ has {len(train_set.classes)} classes and {len(train_set)} images, val/ has "
                 f"{len(val_set.classes)} classes: they must be the same non-empty set of class folders")
        num_classes, n_train, n_val = len(train_set.classes), len(train_set), len(val_set)
        # drop_last keeps the shards equal, so every rank takes the same number of steps
        sampler = EpochSampler(DistributedSampler(train_set, WORLD_SIZE, RANK, shuffle=True, seed=args.seed,
                                                  drop_last=True), args.batch_size)
        loader_args = dict(num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0,
                           worker_init_fn=ignore_stop_signals)
        train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, drop_last=True, **loader_args)
        val_loader = DataLoader(val_set, args.batch_size, sampler=range(RANK, n_val, WORLD_SIZE), **loader_args)
        steps_per_epoch = min(len(train_loader), args.steps_per_epoch or len(train_loader))
        if steps_per_epoch == 0:
            fail(f"{n_train} training images are fewer than one batch per rank ({WORLD_SIZE} x "
                 f"--batch-size={args.batch_size})")

    # -----------------------------------------------------------------------------
    # model and optimizer
    raw_model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes).to(device)
    if channels_last:  # NHWC: what tensor cores and cuDNN's fastest convolutions want
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # evaluation bypasses DDP: the ranks' validation shards differ in size
    model = eval_model = torch.compile(raw_model) if args.compile else raw_model
    if WORLD_SIZE > 1:  # averages gradients across ranks during backward()
        model = DDP(model, device_ids=[device.index] if cuda else None)
    decay = [p for p in raw_model.parameters() if p.ndim > 1]  # no weight decay on biases and norm scales
    no_decay = [p for p in raw_model.parameters() if p.ndim <= 1]
    lr = args.lr * args.batch_size * WORLD_SIZE / 256  # the linear scaling rule, with warm-up
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0}],
                                lr=lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))
    # float16 gradients underflow without loss scaling; the scaler's overflow check syncs the host once per step
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    torch.manual_seed(args.seed + RANK)  # the weights are made: from here on each rank draws its own random numbers

    # -----------------------------------------------------------------------------
    # resume: every rank loads the same checkpoint, so the replicas start equal; mid-epoch checkpoints resume at
    # their step. Only a checkpoint of this run: what defines it is saved with it and compared (check_same_run)
    run = {"script": "imagenet_ddp.py", "arch": args.arch,
           "data": "synthetic" if args.synthetic else f"{num_classes} classes, {n_train} training images",
           "image_size": args.image_size, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
           "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing,
           "warmup_epochs": args.warmup_epochs, "schedule": args.schedule, "steps_per_epoch": steps_per_epoch,
           "seed": args.seed, "precision": precision, "world_size": WORLD_SIZE,
           "git_commit": os.environ.get("GIT_COMMIT")}
    start_epoch, start_step = 1, 0
    run_id = run_name()
    tb_name = run_id  # the TensorBoard run: this job's, or the first job's of the training it resumes
    scratch = os.path.join(local_base(args), f"run-{run_id}-{os.getpid()}")  # rank 0's outputs, on local disk first
    os.makedirs(args.output_dir, exist_ok=True)
    if RANK == 0:
        os.makedirs(scratch, exist_ok=True)
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir)
        path, ckpt = load_latest_checkpoint(args.checkpoint_dir)
        if ckpt is not None:
            if (ckpt.get("script"), ckpt.get("arch"), ckpt.get("num_classes")) != (
                    "imagenet_ddp.py", args.arch, num_classes):
                fail(f"{path} is from {ckpt.get('script', 'another script')} with arch {ckpt.get('arch')} and "
                     f"{ckpt.get('num_classes')} classes; this run is {args.arch} with {num_classes}. "
                     "HINT: use a new --checkpoint-dir for a different model or data")
            check_same_run(path, ckpt.get("run"), run)
            if ckpt["args"]["epochs"] != args.epochs and args.schedule == "cosine":
                print0(f"NOTE: --epochs changed from {ckpt['args']['epochs']} to {args.epochs}: the cosine schedule is "
                       "stretched from here on (a run started with the new value would have decayed differently)")
            raw_model.load_state_dict(ckpt["model"])  # the raw module's keys: no "module." or "_orig_mod." prefix
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            if len(ckpt["rng"]) == WORLD_SIZE:
                set_rng_state(ckpt["rng"][RANK], device)
            start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
            tb_name = ckpt.get("tensorboard", tb_name)
            steps = f" and {start_step} steps of epoch {start_epoch}" if start_step else ""
            print0(f"resumed from {path}: epoch {ckpt['epoch']} done{steps}, continuing at epoch {start_epoch}")
            if WORLD_SIZE > 1 and start_epoch <= args.epochs:
                # DDP lays out its gradient buckets in the order the first backward pass fills them; with more than
                # 2 ranks that layout changes the float summation order. Replay that first pass (no update, BatchNorm
                # statistics put back), so that a resumed run sums exactly as the uninterrupted one did. A full batch:
                # no extra graph under --compile
                saved = [b.clone() for b in raw_model.buffers()]
                x, y = to_device(torch.zeros(args.batch_size, 3, args.image_size, args.image_size, dtype=torch.uint8),
                                 torch.zeros(args.batch_size, dtype=torch.long), device, channels_last)
                with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                    F.cross_entropy(model(x), y).backward()
                optimizer.zero_grad(set_to_none=True)
                for b, value in zip(raw_model.buffers(), saved, strict=True):
                    b.copy_(value)
    metrics_name = f"metrics-{run_id}.jsonl"
    # a requeued job appends to its own file
    if RANK == 0 and os.path.exists(os.path.join(args.output_dir, metrics_name)):
        shutil.copyfile(os.path.join(args.output_dir, metrics_name), os.path.join(scratch, metrics_name))
    metrics = open(os.path.join(scratch, metrics_name), "a") if RANK == 0 else None
    # curves: x is the optimizer step, counted over the whole training
    tb = tensorboard(args.output_dir, tb_name, purge_step=(start_epoch - 1) * steps_per_epoch + start_step + 1)
    prof = profiler(args, device, run_id)

    def copy_back():
        """Local outputs to --output-dir, atomically (at each checkpoint and at the end)."""
        tmp = os.path.join(args.output_dir, f".{metrics_name}.tmp")
        shutil.copyfile(os.path.join(scratch, metrics_name), tmp)
        os.replace(tmp, os.path.join(args.output_dir, metrics_name))

    def checkpoint(epoch, step):
        """Rank 0 writes while the others wait; RNG states come from every rank."""
        TIMES.lap("compute")
        rng = all_gather(rng_state(device))
        if RANK == 0:
            name = f"epoch_{epoch - 1:04d}_step_{step:07d}" if step else f"epoch_{epoch:04d}"
            save_checkpoint(args.checkpoint_dir, name, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch - 1 if step else epoch, "step": step, "rng": rng, "args": vars(args), "run": run,
                "tensorboard": tb_name, "script": "imagenet_ddp.py", "arch": args.arch, "num_classes": num_classes},
                scratch)
            copy_back()
            if tb:
                tb.flush()  # the curves up to the checkpoint: what a resumed run goes on from
        if WORLD_SIZE > 1:
            dist.barrier()
        TIMES.lap("checkpoint")

    data = ("SYNTHETIC DATA (random tensors, no validation)" if args.synthetic
            else f"{n_train} training / {n_val} validation images from {data_root}")
    print0(f"{args.arch}, {num_classes} classes, {data} | {WORLD_SIZE} processes x {args.batch_size} "
           f"images, lr {lr:g}, {steps_per_epoch} steps/epoch, {args.workers} workers/process | "
           f"{precision}"
           f"{', channels_last' if channels_last else ''}{', compiled' if args.compile else ''} on {device.type}")

    # -----------------------------------------------------------------------------
    # training loop
    stop_check(device, None, 0, 0)  # a signal in start-up (staging, loading), or the end already near
    TIMES.lap("startup")
    t_start, result, meter_images, meter_seconds = time.perf_counter(), None, 0, 0.0
    tag = " [SYNTHETIC DATA]" if args.synthetic else ""
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        skip, start_step = start_step, 0
        if args.synthetic:
            batches = (fake for _ in range(steps_per_epoch - skip))
        else:
            sampler.set_epoch(epoch, skip)
            batches = iter(train_loader)
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, images, skipped: no host sync per step
        t0 = time.perf_counter()
        warm = min(5, (steps_per_epoch - skip) // 2)
        for step in range(skip, steps_per_epoch):
            # the throughput meter starts after warm-up steps (workers starting, cuDNN autotuning)
            if step - skip == warm:
                if cuda:
                    torch.cuda.synchronize()
                TIMES.lap("compute")  # the GPU finishing the steps queued before
                t_meter = time.perf_counter()
            batch = next(batches)
            TIMES.lap("data")  # the wait for the DataLoader's workers (on the host: no GPU sync)
            x, y = to_device(*batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing, ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # without float16: loss.backward(), optimizer.step()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ok = (y >= 0).sum()
            stats += torch.stack([loss.detach().double() * ok, ok.double(), (len(y) - ok).double()])
            if prof:
                prof.step()
            if RANK == 0 and step % args.log_interval == 0:  # .item() syncs, so only now and then
                value, lr_now = loss.item(), scheduler.get_last_lr()[0]
                print_line(f"  epoch {epoch} step {step}/{steps_per_epoch} loss {value:.4f} lr {lr_now:.4g}{tag}")
                if tb:
                    tb.add_scalar("train/loss", value, (epoch - 1) * steps_per_epoch + step + 1)
                    tb.add_scalar("train/lr", lr_now, (epoch - 1) * steps_per_epoch + step + 1)
            if (step + 1) % STOP_CHECK_EVERY == 0 and step + 1 < steps_per_epoch:
                stop_check(device, args.checkpoint_dir and checkpoint, epoch, step + 1)
            TIMES.lap("compute")
        if cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        if steps_per_epoch - skip > warm:
            meter_images += (steps_per_epoch - skip - warm) * args.batch_size * WORLD_SIZE
            meter_seconds += t_end - t_meter
        if WORLD_SIZE > 1:
            dist.all_reduce(stats)  # the mean over all ranks' images, not just rank 0's
        train_loss = (stats[0] / stats[1].clamp(min=1)).item()
        images, skipped = int(stats[1].item()), int(stats[2].item())
        seconds = t_end - t0
        result = dict(epoch=epoch, train_loss=train_loss, train_images=images, train_skipped=skipped, seconds=seconds,
                      images_per_s=images / seconds, synthetic=args.synthetic)
        average_buffers(raw_model)
        TIMES.lap("compute")
        if not args.synthetic:
            result.update(evaluate(eval_model, val_loader, device, args, amp_dtype))
        val = "no validation" if args.synthetic else (
            f"val loss {result['val_loss']:.4f} | top-1 {100 * result['top1']:.2f}% | "
            f"top-5 {100 * result['top5']:.2f}%")
        print0(f"epoch {epoch}/{args.epochs} | train loss {train_loss:.4f} | {val} | {seconds:.1f} s | "
               f"{images / seconds:.0f} img/s{tag}")
        if skipped or result.get("val_skipped"):
            print0(f"WARNING: skipped {skipped} training and {result.get('val_skipped', 0)} validation images that "
                   "could not be decoded (named above)")
        if metrics:
            metrics.write(json.dumps({"event": "epoch", **result}) + "\n")
            metrics.flush()
            copy_back()
        if tb:
            for key in ("train_loss", "val_loss", "top1", "top5", "images_per_s"):
                if key in result:  # no validation on synthetic data
                    tb.add_scalar(f"epoch/{key}", result[key], epoch * steps_per_epoch)
            tb.flush()
        TIMES.lap("eval")
        if args.checkpoint_dir:
            checkpoint(epoch, 0)
        stop_check(device, args.checkpoint_dir and checkpoint, epoch, 0)

    if prof:
        prof.stop()

    # -----------------------------------------------------------------------------
    # summary
    if result is None:
        print0(f"nothing to train: the checkpoint already has {start_epoch - 1} epochs (--epochs={args.epochs})")
        result = {"epoch": start_epoch - 1,
                  **({} if args.synthetic else evaluate(eval_model, val_loader, device, args, amp_dtype))}
    TIMES.lap("eval")
    checksums = all_gather(param_checksum(raw_model))  # each rank's own hash: the test compares them
    time_split = TIMES.report(f"--workers={args.workers}")  # prints its line (and a HINT)
    done = {"event": "done",
            **{k: result.get(k) for k in ("epoch", "top1", "top5", "val_loss", "val_count", "val_skipped")},
            "world_size": WORLD_SIZE, "synthetic": args.synthetic, "seconds": time.perf_counter() - t_start,
            "images_per_s": meter_images / meter_seconds if meter_seconds else None, "param_checksums": checksums,
            "time_split": time_split}
    print0(json.dumps(done))
    if metrics:
        metrics.write(json.dumps(done) + "\n")
        metrics.close()
        copy_back()
        shutil.rmtree(scratch, ignore_errors=True)
    if tb:
        tb.close()


if __name__ == "__main__":
    main(get_args())
