"""
Train a small CNN on MNIST with PyTorch Lightning's DDP strategy, on one process or many.
A sibling of mnist_ddp.py (same network, data, output lines and JSON); where each part of it went:
    the training loop                  -> LitMNIST.training_step, configure_optimizers
    evaluate()                         -> validation_step + on_validation_epoch_end (exact sums over ranks)
    checkpoints and resume             -> ModelCheckpoint(save_last=True) + trainer.fit(ckpt_path=last.ckpt)
    launch_env() + init_process_group  -> make_trainer(): Trainer(devices, num_nodes, DDPStrategy) and its cluster env
    the stop_check calls in the loop   -> StopOnSignal, a Callback (the stop-signal block itself is the same)

The same file runs under every launcher, unchanged:

    python mnist_lightning_ddp.py --epochs=1                 # one process (a GPU if there is one, else CPU)
    python mnist_lightning_ddp.py --gpus=2                   # Lightning starts the 2 processes itself
    torchrun --standalone --nproc_per_node=2 mnist_lightning_ddp.py --gpus=2
    srun python mnist_lightning_ddp.py --gpus=4 --nodes=2    # inside a Slurm job, one task per GPU
    sbatch run-gpu4.sh mnist_lightning_ddp.py --gpus=4 --epochs=100   # the wrapper does the above for you

--gpus is the number of devices (processes) per node and --nodes the number of nodes; without them both
come from the launcher. Without a GPU, --gpus=N runs N CPU processes with gloo.

Data: --data-dir (default $DATA_DIR, else ./data) must hold MNIST/raw/ in torchvision's layout; local rank 0
of each node downloads it if it is missing. Compute nodes are often offline: download on the login node with
    python mnist_lightning_ddp.py --download-only --data-dir /path/to/data

Expected (2 CPU processes, gloo, the 5,000-digit training sample; full MNIST reaches higher):
    python mnist_lightning_ddp.py --gpus=2 --batch-size=32 --epochs=2 --data-dir ../shared/data
    -> test accuracy about 96% on the 10,000 official test digits, in a few seconds per epoch.

Make it yours: replace MNIST in setup() and the dataloaders (real data: a Dataset with DataLoader workers, as in
imagenet_ddp.py), Net, and the metrics of validation_step. Keep our own DistributedSampler (exact, per-epoch
shuffle), the reduce of sums in on_validation_epoch_end, and main()'s Trainer, checkpoint and resume settings.
--batch-size is per process: the global batch is world size times larger.
"""
import argparse
import contextlib
import gc
import hashlib
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta

import pytorch_lightning as pl
import torch
import torch.distributed as dist
# imported before any process group exists: imported later (DDP does), its functions' default arguments keep
# the default group, and with it gloo's threads, alive into interpreter shutdown
import torch.distributed.nn  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

# -----------------------------------------------------------------------------
# config


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MNIST with PyTorch Lightning DDP")
    p.add_argument("--epochs", type=positive_int, default=2, help="number of epochs to train (default: 2)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch size per process (default: 64)")
    p.add_argument("--test-batch-size", type=positive_int, default=1000,
                   help="evaluation batch size per process (default: 1000)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    p.add_argument("--gamma", type=float, default=0.7, help="learning-rate decay per epoch (default: 0.7)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                   help="holds MNIST/raw (default: $DATA_DIR, else ./data)")
    p.add_argument("--download-only", action="store_true",
                   help="download MNIST into --data-dir and exit (run on a login node)")
    p.add_argument("--output-dir", default="./out",
                   help="the metrics JSONL file and tensorboard/RUN go here (default: ./out)")
    p.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR"),
                   help="save every epoch and resume from the latest checkpoint here (default: $CHECKPOINT_DIR, else "
                        "no checkpoints)")
    p.add_argument("--log-interval", type=positive_int, default=20, help="steps between loss prints (default: 20)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU if there is one (default: auto)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on GPU: bfloat16, or float16 with loss scaling before Ampere (CPU: float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--profile", action="store_true",
                   help="trace 5 training steps on rank 0 with torch.profiler (after 8 to warm up): a table of the "
                        "slowest operators and a trace file for Perfetto or TensorBoard (default: off)")
    p.add_argument("--dist-timeout", type=positive_int, default=600,
                   help="seconds the ranks wait for each other, at start and in every collective (default: 600)")
    # Lightning: how many processes. The CSC README spells them --gpus=4 --nodes=2
    p.add_argument("--gpus", type=positive_int, default=None,
                   help="devices (processes) per node (default: from torchrun or srun, else 1)")
    p.add_argument("--nodes", type=positive_int, default=None,
                   help="number of nodes (default: from torchrun or srun, else 1)")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# distributed setup
# Lightning decides who we are: torchrun's variables (TorchElasticEnvironment) first, else srun's
# (SLURMEnvironment), else it starts the processes itself. We only read the answer (trainer.global_rank ...).


def launch_size(env=os.environ):
    """Devices per node and nodes, as the launcher set them up (Lightning checks they match --gpus/--nodes)."""
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return per_node, int(env["WORLD_SIZE"]) // per_node
    if "SLURM_NTASKS_PER_NODE" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), int(env.get("SLURM_NNODES", 1))
    return 1, 1


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
# data

MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics


MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def download_mnist(data_dir):
    """Returns None on success, else the reason it failed. Files already there are not fetched again."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    if all(os.path.exists(os.path.join(raw, name)) for names in MNIST_FILES.values() for name in names):
        return None
    from torchvision import datasets  # imported only to download: it adds seconds to every process's start
    quiet = io.StringIO()  # torchvision prints one line per mirror tried; keep the log short
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            for train in (True, False):
                datasets.MNIST(data_dir, train=train, download=True)
        return None
    except Exception as e:  # offline compute node, read-only directory, proxy ...
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line for the log


def read_idx(path):
    """An MNIST idx file as a uint8 tensor: 4 magic bytes (the last one: the number of dimensions), each dimension's
    size as a big-endian int32, then the data."""
    with open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(shape)


def load_mnist(data_dir, train, device):
    """The whole split as one normalized tensor: MNIST is tiny, so no per-sample transforms."""
    images, labels = (read_idx(os.path.join(data_dir, "MNIST", "raw", name)) for name in MNIST_FILES[train])
    x = images.to(device=device, dtype=torch.float32).div_(255).sub_(MEAN).div_(STD).unsqueeze_(1)
    return x, labels.long().to(device)


def ignore_stop_signals(*_):
    """DataLoader workers ignore the stop signals, which Slurm sends to every process of the job step: torch's worker
    would die of a SIGTERM that its parent did not send (or of SIGUSR1), and take the training process with it before
    the ranks agree to stop. The training process stops the workers itself."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class ResumedBatches(BatchSampler):
    """The sampler's batches; in the epoch that a mid-epoch checkpoint stopped in, only those after its step. len()
    stays the whole epoch's: Lightning's loop state, restored from the same checkpoint, counts the others as done."""

    def __init__(self, sampler, batch_size, resume_epoch=-1, resume_step=0):
        super().__init__(sampler, batch_size, drop_last=False)
        self.resume_epoch, self.resume_step = resume_epoch, resume_step

    def __iter__(self):  # a generator: it runs at the first batch, after Lightning's sampler.set_epoch()
        skip = self.resume_step if self.sampler.epoch == self.resume_epoch else 0
        for k, batch in enumerate(super().__iter__()):
            if k >= skip:
                yield batch


# -----------------------------------------------------------------------------
# model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)   # 28x28 -> 28x28, pooled to 14x14
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)  # 14x14 -> 14x14, pooled to 7x7
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def param_checksum(model):
    """A hash of every parameter's bytes: equal on all ranks iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: also for bfloat16
    return h.hexdigest()[:16]


class LitMNIST(pl.LightningModule):
    """mnist_ddp.py's training loop, cut into the hooks Lightning calls."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.net = Net()
        self.result = None  # the last epoch's metrics; saved in checkpoints for the final report
        self.stop_step, self.resume_at = 0, (-1, 0)  # a mid-epoch checkpoint's step; (epoch, step) it resumes at
        self.run_id = run_name()  # names outputs
        self.tb_name = self.run_id  # the TensorBoard run, kept in checkpoints: requeues and resumes go on in it

    # data: local rank 0 of each node downloads if needed while the other ranks wait
    def setup(self, stage):
        global RANK, LOCAL_RANK, WORLD_SIZE
        RANK, LOCAL_RANK, WORLD_SIZE = self.global_rank, self.local_rank, self.trainer.world_size
        if RANK != 0:  # only rank 0 speaks: other ranks' warnings would repeat it WORLD_SIZE times
            warnings.filterwarnings("ignore")
        print_line(f"[rank {RANK}/{WORLD_SIZE}] local_rank {LOCAL_RANK} host {socket.gethostname()} device "
                   f"{self.device}")
        reason = download_mnist(self.args.data_dir) if LOCAL_RANK == 0 else None
        if not all_ranks_ok(reason is None, self.device):
            fail(f"MNIST is not in {os.path.abspath(self.args.data_dir)} and could not be downloaded "
                 f"({reason or 'on another node'}). "
                 f"HINT: compute nodes are often offline; on the login node run: python {os.path.basename(__file__)} "
                 f"--download-only --data-dir {self.args.data_dir}")
        self.train_set = TensorDataset(*load_mnist(self.args.data_dir, True, "cpu"))
        x_test, y_test = load_mnist(self.args.data_dir, False, "cpu")
        # what defines this run: a checkpoint of another run is refused (check_same_run in on_load_checkpoint)
        self.run = {"script": "mnist_lightning_ddp.py", "model": "Net",
                    "data": f"MNIST, {len(self.train_set)} training digits", "batch_size": self.args.batch_size,
                    "lr": self.args.lr, "gamma": self.args.gamma, "seed": self.args.seed,
                    "precision": self.trainer.precision, "world_size": WORLD_SIZE,
                    "git_commit": os.environ.get("GIT_COMMIT")}
        # exact evaluation: rank r scores digits r, r+W, r+2W, ... (no padding, no digit twice)
        self.test_shard = TensorDataset(x_test[RANK::WORLD_SIZE], y_test[RANK::WORLD_SIZE])

    def train_dataloader(self):
        # each rank sees a disjoint 1/WORLD_SIZE of the training set; Lightning calls sampler.set_epoch() for us
        sampler = DistributedSampler(self.train_set, num_replicas=WORLD_SIZE, rank=RANK, shuffle=True,
                                     seed=self.args.seed, drop_last=True)
        batches = ResumedBatches(sampler, self.args.batch_size, *self.resume_at)
        return DataLoader(self.train_set, batch_sampler=batches, worker_init_fn=ignore_stop_signals)

    def val_dataloader(self):
        return DataLoader(self.test_shard, batch_size=self.args.test_batch_size)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.args.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.args.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # training loop
    def on_train_epoch_start(self):
        self.train_stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, samples
        self.t0, self.lr = time.perf_counter(), self.trainer.optimizers[0].param_groups[0]["lr"]

    def forward(self, x):  # what the DDP wrapper runs outside the steps (Lightning calls training_step through it)
        return self.net(x)

    def on_train_start(self):
        self.on_train_epoch_start()  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
        if self.trainer.ckpt_path and WORLD_SIZE > 1:
            # DDP lays out its gradient buckets in the order the first backward pass fills them; with more than 2 ranks
            # that layout changes the float summation order. Replay that first pass (no update) through the DDP
            # wrapper, so that a resumed run sums exactly as the uninterrupted one did. A full batch, in the training
            # precision: no extra graph under --compile
            x, y = (t[:self.args.batch_size].to(self.device) for t in self.train_set.tensors)
            with self.trainer.precision_plugin.forward_context():
                F.cross_entropy(self.trainer.strategy.model(x), y).backward()
            self.net.zero_grad(set_to_none=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)  # Lightning runs backward() and step() after this returns
        self.train_stats[0] += loss.detach() * len(y)  # stays on the device: no host sync, no copy per step
        self.train_stats[1] += len(y)
        if RANK == 0 and batch_idx % self.args.log_interval == 0:  # .item() syncs, so only now and then
            value = loss.item()
            print_line(f"  epoch {self.current_epoch + 1} step {batch_idx} loss {value:.4f}")
            if self.logger:  # x: optimizer steps done, this one included
                self.logger.log_metrics({"train/loss": value}, step=self.global_step + 1)
        return loss

    def on_validation_epoch_start(self):
        self.seconds = time.perf_counter() - self.t0  # the training part of the epoch
        self.val_stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x).float()
        self.val_stats[0] += F.cross_entropy(out, y, reduction="sum")
        self.val_stats[1] += (out.argmax(1) == y).sum()
        self.val_stats[2] += len(y)

    def on_validation_epoch_end(self):
        # sums from every rank: the mean over all samples, not just rank 0's
        train_loss_sum, samples = self.trainer.strategy.reduce(self.train_stats, reduce_op="sum").tolist()
        loss_sum, correct, count = self.trainer.strategy.reduce(self.val_stats, reduce_op="sum").tolist()
        epoch, seconds = self.current_epoch + 1, self.seconds
        self.result = dict(epoch=epoch, train_loss=train_loss_sum / samples, test_loss=loss_sum / count,
                           test_acc=correct / count, test_count=int(count), seconds=seconds,
                           samples_per_s=samples / seconds)
        self.trained, self.train_seconds = self.trained + samples, self.train_seconds + seconds
        print0(f"epoch {epoch}/{self.args.epochs} | train loss {self.result['train_loss']:.4f} | "
               f"test loss {self.result['test_loss']:.4f} | test acc {100 * self.result['test_acc']:.2f}% | "
               f"{seconds:.1f} s | {samples / seconds:.0f} samples/s")
        if self.metrics:
            self.metrics.write(json.dumps({"event": "epoch", **self.result}) + "\n")
            self.metrics.flush()
        if self.logger:  # rank 0 writes (Lightning's loggers log from rank 0 only)
            self.logger.log_metrics({"epoch/lr": self.lr, **{f"epoch/{key}": self.result[key] for key in (
                "train_loss", "test_loss", "test_acc", "samples_per_s")}}, step=self.global_step)
            self.logger.save()

    # checkpoints: Lightning saves weights, optimizer, scheduler, loop state; we add the last metrics and, mid-epoch,
    # the step (Lightning's "epoch" is the epoch in progress then, else the last one done, counted from 0)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["result"], checkpoint["step"], checkpoint["run"] = self.result, self.stop_step, self.run
        checkpoint["tensorboard"] = self.tb_name

    def on_load_checkpoint(self, checkpoint):
        check_same_run(f"{self.args.checkpoint_dir}/last.ckpt", checkpoint.get("run"), self.run)
        self.result, step = checkpoint.get("result"), checkpoint.get("step", 0)
        done = checkpoint["epoch"] if step else checkpoint["epoch"] + 1
        self.resume_at = (checkpoint["epoch"], step)
        steps = f" and {step} steps of epoch {done + 1}" if step else ""
        print0(f"resumed from {self.args.checkpoint_dir}/last.ckpt: epoch {done} done{steps}, continuing at epoch "
               f"{done + 1}")

    def on_fit_start(self):
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.metrics = (open(os.path.join(self.args.output_dir, f"metrics-{self.run_id}.jsonl"), "a") if RANK == 0
                        else None)
        self.t_start, self.trained, self.train_seconds = time.perf_counter(), 0, 0.0

    # summary
    def on_fit_end(self):
        if not self.trained:  # nothing left to train (resumed a finished run): report the checkpoint's metrics
            print0(f"nothing to train: the checkpoint already has {self.current_epoch} epochs "
                   f"(--epochs={self.args.epochs})")
        TIMES.lap("compute")  # Lightning's teardown
        checksums = all_gather(param_checksum(self.net))  # each rank's own hash: the test compares them
        time_split = TIMES.report("num_workers=0 in train_dataloader()")  # prints its line (and a HINT)
        done = {"event": "done", "test_acc": self.result["test_acc"], "test_loss": self.result["test_loss"],
                "test_count": self.result["test_count"], "epoch": self.result["epoch"], "world_size": WORLD_SIZE,
                "seconds": time.perf_counter() - self.t_start,
                "samples_per_s": self.trained / self.train_seconds if self.train_seconds else None,
                "param_checksums": checksums, "time_split": time_split}
        print0(json.dumps(done))
        if self.metrics:
            self.metrics.write(json.dumps(done) + "\n")
            self.metrics.close()


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


class StopOnSignal(pl.Callback):
    """The stop-signal block's checks, where Lightning's loop has room for them: before the first batch, every
    STOP_CHECK_EVERY batches, and at the start of each epoch after the first (ModelCheckpoint wrote the last one's
    last.ckpt, as its very last hook).
    Lightning's own handlers would save inside the handler, with a collective (its SIGUSR1 requeue under srun), or end
    on SIGTERM without saving: ours replace them once training starts."""

    def __init__(self, args):
        self.args = args

    def on_train_start(self, trainer, pl_module):
        for signum in STOP_SIGNALS:  # Lightning installed its handlers just before this hook
            signal.signal(signum, on_stop_signal)
        self.check(trainer, pl_module, 0, 0)  # a signal in start-up, or the end already near

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % STOP_CHECK_EVERY == 0 and batch_idx + 1 < trainer.num_training_batches:
            self.check(trainer, pl_module, trainer.current_epoch + 1, batch_idx + 1)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch > 0:
            self.check(trainer, pl_module, trainer.current_epoch, 0)

    def check(self, trainer, pl_module, epoch, step):
        def checkpoint(epoch, step):
            """A mid-epoch last.ckpt, from every rank: rank 0 writes, the others wait (Trainer.save_checkpoint)."""
            TIMES.lap("compute")
            pl_module.stop_step = step
            trainer.save_checkpoint(os.path.join(self.args.checkpoint_dir, "last.ckpt"))
            pl_module.stop_step = 0
            TIMES.lap("checkpoint")

        stop_check(pl_module.device, self.args.checkpoint_dir and checkpoint, epoch, step)


class TimeLaps(pl.Callback):
    """TIMES's laps at the hooks around what mnist_ddp.py's loop times: the gap before a batch starts is the wait for
    it (the DataLoader's next()), a batch's hooks enclose its step, validation is the evaluation; ModelCheckpoint
    saves as the last hook of an epoch, so what follows the epoch's end is checkpointing (with --checkpoint-dir). After
    StopOnSignal in the callbacks: its stop check after a batch (an all-reduce; on a GPU also the wait for the queued
    steps) counts with the step, not as the wait for the next batch."""

    def __init__(self, args):
        self.after_epoch = "checkpoint" if args.checkpoint_dir else "compute"  # between one epoch's end and the next

    def on_train_start(self, trainer, pl_module):
        TIMES.lap("startup")

    def on_train_epoch_start(self, trainer, pl_module):
        TIMES.lap(self.after_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        TIMES.lap("data")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        TIMES.lap("compute")

    def on_validation_start(self, trainer, pl_module):
        TIMES.lap("compute")

    def on_validation_end(self, trainer, pl_module):
        TIMES.lap("eval")

    def on_train_epoch_end(self, trainer, pl_module):
        TIMES.lap("compute")

    def on_train_end(self, trainer, pl_module):
        TIMES.lap(self.after_epoch)


class ProfileSteps(pl.Callback):
    """--profile: profiler() around the training steps, as mnist_ddp.py's loop does it."""

    def __init__(self, args, name):
        self.args, self.name, self.prof = args, name, None

    def on_train_start(self, trainer, pl_module):
        self.prof = profiler(self.args, pl_module.device, self.name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prof:
            self.prof.step()

    def on_train_end(self, trainer, pl_module):
        if self.prof:
            self.prof.stop()


# -----------------------------------------------------------------------------
# main

def tensorboard(output_dir, name, purge_step):
    """Lightning's TensorBoardLogger into output_dir/tensorboard/name, or False where tensorboard is not installed (the
    script trains all the same). A requeued or resumed run writes into its first run's folder from step `purge_step`
    on; TensorBoard drops what the interrupted run wrote from there, so no point shows twice."""
    try:
        import tensorboard  # noqa: F401  (what the logger writes with)
    except ImportError:
        print0("NOTE: tensorboard is not installed (pip install tensorboard): no TensorBoard curves; the metrics "
               "JSONL file has the same numbers")
        return False
    return TensorBoardLogger(output_dir, name="tensorboard", version=name, default_hp_metric=False,
                             purge_step=purge_step)


def make_trainer(args, device, devices, num_nodes, precision, callbacks, logger):
    """Lightning's Trainer for `devices` processes on each of `num_nodes` nodes, this one on `device`. On GPUs, each
    process's strategy lists its own GPU for every local rank: Lightning takes parallel_devices[local_rank], which
    is then right also when srun gave each task only its own GPU (Lightning alone would take GPU local_rank)."""
    many = devices * num_nodes > 1
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" else devices, num_nodes=num_nodes,
        strategy=DDPStrategy(parallel_devices=[device] * devices if device.type == "cuda" else None,
                             timeout=timedelta(seconds=args.dist_timeout)) if many else "auto",
        precision=precision, max_epochs=args.epochs, callbacks=callbacks,
        use_distributed_sampler=False,  # we shard ourselves, see train_dataloader
        num_sanity_val_steps=0, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.checkpoint_dir))


RANK, LOCAL_RANK, WORLD_SIZE = 0, 0, 1


def main(args):
    global RANK, LOCAL_RANK
    args.checkpoint_dir = task_checkpoint_dir(args.checkpoint_dir)  # in a job array: a folder per task
    # what Lightning will find (torchrun's variables, or srun's), so that print0 and gpu_index work before it knows
    RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    LOCAL_RANK = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if args.download_only:
        reason = download_mnist(args.data_dir)
        if reason:
            fail(f"could not download MNIST into {os.path.abspath(args.data_dir)} ({reason})")
        print0(f"MNIST is ready in {os.path.abspath(args.data_dir)}")
        return

    # one process per device: a GPU of its own with NCCL (gpu_index), else CPU with gloo
    if args.device != "cpu" and (error := unusable_gpus()):
        fail(error)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given, but no CUDA device is visible here. HINT: request a GPU (e.g. --gres=gpu:1) or "
             "use --device cpu")
    use_cuda = args.device != "cpu" and torch.cuda.is_available()
    per_node, nodes = launch_size()
    devices, num_nodes = args.gpus or per_node, args.nodes or nodes
    device = torch.device("cpu")
    if use_cuda:
        try:
            device = torch.device("cuda", gpu_index(LOCAL_RANK))
        except ValueError as e:  # every process of that node knows; its local rank 0 says it
            fail(str(e), speak=LOCAL_RANK == 0)
    if args.amp and not use_cuda:
        print0("NOTE: --amp is mixed precision on GPU only; training in float32 on CPU")
    amp_dtype = autocast_dtype(device) if args.amp and use_cuda else None
    precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", None: "32-true"}[amp_dtype]
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = LitMNIST(args)

    # resume: Lightning restores weights, optimizer, scheduler and its loop's place (epoch, step) from last.ckpt
    callbacks, ckpt_path = [StopOnSignal(args)], None
    # Lightning cannot see that ResumedBatches goes on at the step of a mid-epoch checkpoint, and would warn that it
    # starts the epoch over
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
    if args.checkpoint_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, filename="lightning-{epoch}",  # and last.ckpt
                                         save_last=True, save_top_k=1, every_n_epochs=1))
        last = os.path.join(args.checkpoint_dir, "last.ckpt")
        ckpt_path = last if os.path.exists(last) else None
    # TensorBoard: one run per training, continued by its requeues and resumes (last.ckpt names it)
    purge_step = 1
    if ckpt_path:  # mmap: only the two small entries are read, not the weights (Lightning loads those in fit)
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        model.tb_name, purge_step = saved.get("tensorboard") or model.tb_name, saved["global_step"] + 1
    logger = tensorboard(args.output_dir, model.tb_name, purge_step)
    callbacks += [ProfileSteps(args, model.run_id), TimeLaps(args)]
    try:
        trainer = make_trainer(args, device, devices, num_nodes, precision, callbacks, logger)
        # fit() would check this too, with a traceback per rank
        if getattr(trainer.strategy, "cluster_environment", None):
            trainer.strategy.cluster_environment.validate_settings(num_devices=devices, num_nodes=num_nodes)
    except (ValueError, RuntimeError) as e:  # Lightning's launch checks, e.g. --gpus differs from srun's tasks per node
        fail(f"{e} (from --gpus={devices} --nodes={num_nodes})")
    print0(f"Net | {devices * num_nodes} processes x {args.batch_size} samples, lr {args.lr:g} | {precision}"
           f"{', compiled' if args.compile else ''} on {device.type}")
    for signum in STOP_SIGNALS:  # now already: with a SIGUSR1 handler in place, Lightning adds no requeue of its own
        signal.signal(signum, on_stop_signal)
    if args.compile:  # the network, in place (its checkpoint keys stay): torch.compile(model) would also compile
        model.net.compile()  # the steps, whose Python logging recompiles at every batch index
    try:
        trainer.fit(model, ckpt_path=ckpt_path, weights_only=True)
    except (dist.DistNetworkError, dist.DistStoreError) as e:  # Lightning forms the process group in fit()
        init_failed(e, args.dist_timeout)
    finally:
        if dist.is_initialized():
            # nothing may hold the process group past its destroy_process_group: one that outlives it keeps gloo's
            # and the store's threads running into interpreter shutdown, which now and then aborts a finished run
            gc.collect()  # DDP's reducer sits in reference cycles
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
