"""
Train a small CNN on MNIST with DeepSpeed (ZeRO data parallelism), on one process or many.
A sibling of mnist_ddp.py: `diff mnist_ddp.py mnist_ddp_deepspeed.py` shows what DeepSpeed changes (the config,
the engine in place of DDP and the optimizer, its sharded checkpoints, its launcher and mpirun).

The same file runs under every launcher, unchanged:

    python mnist_ddp_deepspeed.py --epochs=1                               # one process, built-in config
    deepspeed --num_gpus 2 mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json
    torchrun --standalone --nproc_per_node=2 mnist_ddp_deepspeed.py --deepspeed_config ds_config.json
    srun python mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json   # one Slurm task per GPU
    mpirun -n 2 python mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json
    sbatch run-gpu4-deepspeed.sh mnist_ddp_deepspeed.py --epochs=100 --deepspeed --deepspeed_config ds_config.json

Batch size, optimizer, scheduler, gradient clipping and the ZeRO stage come from ds_config.json (docs/deepspeed.md
documents every field). Without --deepspeed_config the script uses DEFAULT_CONFIG below, the same values,
so this file also runs alone. --batch-size and --zero-stage override the file. No GPU: DeepSpeed runs on the
CPU with DS_ACCELERATOR=cpu and gloo; the first run JIT-builds one small op (about 40 s, then cached).

Data: --data-dir (default $DATA_DIR, else ./data) must hold MNIST/raw/ in torchvision's layout; local rank 0
of each node downloads it if it is missing. Compute nodes are often offline: download on the login node with
    python mnist_ddp_deepspeed.py --download-only --data-dir /path/to/data

Expected (2 CPU processes, gloo, the 5,000-digit training sample; full MNIST reaches higher):
    torchrun --standalone --nproc_per_node=2 mnist_ddp_deepspeed.py --epochs=2 --batch-size=32 --data-dir ../shared/data
    -> test accuracy about 96% on the 10,000 official test digits, in a few seconds per epoch.

Make it yours: replace the data section (real data: a Dataset, DistributedSampler and DataLoader with workers, as in
imagenet_ddp.py), Net and evaluate()'s metrics; tune batch, optimizer, scheduler and ZeRO stage in ds_config.json.
Keep the distributed setup, deepspeed.initialize, engine.backward/engine.step, the loop's set_epoch and stop_check
calls, the checkpoint and resume blocks and the teardown. The batch in the config is per process (micro batch).
"""
import argparse
import contextlib
import copy
import gc
import glob
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
import warnings
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
# imported before any process group exists: imported later (DDP does), its functions' default arguments keep
# the default group, and with it gloo's threads, alive into interpreter shutdown
import torch.distributed.nn  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from torch.utils.data import DistributedSampler

# DeepSpeed picks its accelerator when it is imported: ask for the CPU one when there is no GPU or --device cpu
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--device", default="auto")
if _pre.parse_known_args()[0].device == "cpu" or not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402

# -----------------------------------------------------------------------------
# config


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def get_args(argv=None):
    p = argparse.ArgumentParser(description="MNIST with DeepSpeed")
    p.add_argument("--epochs", type=positive_int, default=2, help="number of epochs to train (default: 2)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="training batch size per process (default: the config's train_micro_batch_size_per_gpu)")
    p.add_argument("--test-batch-size", type=positive_int, default=1000,
                   help="evaluation batch size per process (default: 1000)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=None,
                   help="ZeRO stage (default: the config's, 2 in ds_config.json)")
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
                   help="mixed precision on GPU: the config's bf16 section, or fp16 (loss scaling) before Ampere (CPU: "
                        "float32)")
    p.add_argument("--profile", action="store_true",
                   help="trace 5 training steps on rank 0 with torch.profiler (after 8 to warm up): a table of the "
                        "slowest operators and a trace file for Perfetto or TensorBoard (default: off)")
    p.add_argument("--dist-timeout", type=positive_int, default=600,
                   help="seconds the ranks wait for each other, at start and in every collective (default: 600)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config (the spelling DeepSpeed's examples use)
    return p.parse_args(argv)


# used without --deepspeed_config; the same values as ds_config.json (docs/deepspeed.md explains each field)
DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 64,
    "gradient_accumulation_steps": 1,
    "optimizer": {
        "type": "Adam",
        "params": {"lr": 0.003, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "adam_w_mode": True,
                   "torch_adam": True},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.003, "warmup_num_steps": 20, "warmup_type": "linear"},
    },
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000000,
    "wall_clock_breakdown": False,
}


def load_config(args, world_size, device):
    """The DeepSpeed config as a dict, with the command-line overrides applied, checked before any rank uses it."""
    config = DEFAULT_CONFIG
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"cannot read the DeepSpeed config {args.deepspeed_config}: {e}. HINT: start from ds_config.json in "
                 "this repository")
    config = copy.deepcopy(config)  # overrides below must not touch DEFAULT_CONFIG
    if args.batch_size:
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config.pop("train_batch_size", None)  # DeepSpeed derives it: micro batch x accumulation x world size
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.amp and device.type == "cuda" and not {"fp16", "bf16", "bfloat16"} & set(config):
        config["bf16" if autocast_dtype(device) == torch.bfloat16 else "fp16"] = {"enabled": True}
    micro, accum = config.get("train_micro_batch_size_per_gpu"), config.get("gradient_accumulation_steps", 1)
    total = config.get("train_batch_size")
    if micro is None and total is None:
        fail(f"{args.deepspeed_config}: set train_micro_batch_size_per_gpu (per process) or train_batch_size (global)")
    if micro is None:  # only the global batch given: it must split evenly over the processes
        micro = total // (accum * world_size)
        if micro * accum * world_size != total:
            fail(f"{args.deepspeed_config}: train_batch_size {total} does not divide over {world_size} processes x "
                 f"gradient_accumulation_steps {accum}. HINT: set train_micro_batch_size_per_gpu instead, so the "
                 "global batch follows the world size")
        config["train_micro_batch_size_per_gpu"] = micro
    elif total is not None and total != micro * accum * world_size:
        fail(f"{args.deepspeed_config}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
             f"gradient_accumulation_steps {accum} x {world_size} processes. "
             "HINT: remove train_batch_size, so the global batch follows the world size")
    return config


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


def mpi_launch_env(env=os.environ):
    """launch_env(), and when it finds no launcher, mpirun's (Open MPI) variables."""
    found = launch_env(env)
    if found[2] > 1 or "OMPI_COMM_WORLD_RANK" not in env:
        return found
    world_size = int(env["OMPI_COMM_WORLD_SIZE"])
    # all ranks on one node: rank 0 is on this one. Across nodes only MPI knows where rank 0 runs:
    # leave MASTER_ADDR unset and DeepSpeed asks MPI (mpi4py) for it
    one_node = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 0)) == world_size
    addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else None)
    port = env.get("MASTER_PORT") or "29500"
    return int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), world_size, addr, port


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
    """The whole split as one normalized tensor: MNIST is tiny, so no DataLoader, no per-sample transforms."""
    images, labels = (read_idx(os.path.join(data_dir, "MNIST", "raw", name)) for name in MNIST_FILES[train])
    x = images.to(device=device, dtype=torch.float32).div_(255).sub_(MEAN).div_(STD).unsqueeze_(1)
    return x, labels.long().to(device)


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


@torch.no_grad()
def evaluate(model, x, y, batch_size, device):
    """Exact test metrics: rank r scores digits r, r+W, r+2W, ... (no padding, no digit twice), then sums."""
    model.eval()
    xs, ys = x[RANK::WORLD_SIZE], y[RANK::WORLD_SIZE]
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(0, len(xs), batch_size):
        out = model(xs[i:i + batch_size]).float()
        stats[0] += F.cross_entropy(out, ys[i:i + batch_size], reduction="sum")
        stats[1] += (out.argmax(1) == ys[i:i + batch_size]).sum()
    stats[2] = len(xs)
    if WORLD_SIZE > 1:
        dist.all_reduce(stats)
    loss_sum, correct, count = stats.tolist()
    return loss_sum / count, correct / count, int(count)


# -----------------------------------------------------------------------------
# checkpoints
# engine.save_checkpoint() writes one directory per tag (every rank its ZeRO shard), then the file "latest"
# naming it: a crash mid-save leaves "latest" on the previous complete checkpoint.


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


def save_checkpoint(engine, ckpt_dir, tag, client_state, keep=2):
    """Tags sort in training order: epoch_0003, then epoch_0003_step_0000120 (3 epochs and 120 steps done)."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)  # called on every rank
    if RANK == 0:
        for old in sorted(d for d in os.listdir(ckpt_dir) if d.startswith("epoch_"))[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)


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


# -----------------------------------------------------------------------------
# main

RANK, LOCAL_RANK, WORLD_SIZE = 0, 0, 1
ENGINES = contextlib.ExitStack()  # main() destroys the DeepSpeed engines before their process group


@record  # under torchrun, a crash is written to its error file and the summary names the failing rank
def main(args):
    global RANK, LOCAL_RANK, WORLD_SIZE
    args.checkpoint_dir = task_checkpoint_dir(args.checkpoint_dir)  # in a job array: a folder per task
    RANK, LOCAL_RANK, WORLD_SIZE, addr, port = mpi_launch_env()
    if RANK != 0:  # only rank 0 speaks: other ranks' warnings would repeat it WORLD_SIZE times
        warnings.filterwarnings("ignore")
    for signum in STOP_SIGNALS:
        signal.signal(signum, on_stop_signal)
    if args.download_only:
        reason = download_mnist(args.data_dir)
        if reason:
            fail(f"could not download MNIST into {os.path.abspath(args.data_dir)} ({reason})")
        print0(f"MNIST is ready in {os.path.abspath(args.data_dir)}")
        return

    # one process per device: a GPU of its own with NCCL (gpu_index), else CPU with gloo
    # DeepSpeed's launcher (it passes --local_rank) sets CUDA_VISIBLE_DEVICES even on a machine without GPUs: there
    # only Slurm's variables say what the job was given
    launched = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES" or args.local_rank is None}
    if args.device != "cpu" and (error := unusable_gpus(launched)):
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
    config = load_config(args, WORLD_SIZE, device)  # before any process group: a bad config fails in a second
    # DeepSpeed always wants a process group, even for one process: give it all five variables, so that it
    # never falls back to guessing through MPI (which needs mpirun)
    if WORLD_SIZE == 1 and not addr:
        addr, port = "127.0.0.1", str(free_port())
    if addr:
        os.environ.update(RANK=str(RANK), LOCAL_RANK=str(LOCAL_RANK), WORLD_SIZE=str(WORLD_SIZE))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port  # launch_env already honours the user's
    backend, timeout = "nccl" if use_cuda else "gloo", timedelta(seconds=args.dist_timeout)
    try:  # the timeout bounds every collective: a hung rank ends the job instead of holding it until the time limit
        if addr:  # as in mnist_ddp.py. DeepSpeed's own init would bind GPU LOCAL_RANK, absent when srun gave each
            # task its own GPU; it then only wraps this process group
            dist.init_process_group(backend, rank=RANK, world_size=WORLD_SIZE, timeout=timeout)
        # without MASTER_ADDR (mpirun across nodes), DeepSpeed asks MPI where rank 0 is
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False, timeout=timeout)
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        init_failed(e, args.dist_timeout)
    RANK, WORLD_SIZE = dist.get_rank(), dist.get_world_size()  # MPI discovery may have filled them in
    if RANK != 0:  # likewise DeepSpeed's own log lines
        warnings.filterwarnings("ignore")
        deepspeed.utils.logger.setLevel("ERROR")
    print_line(f"[rank {RANK}/{WORLD_SIZE}] local_rank {LOCAL_RANK} host {socket.gethostname()} device {device}")
    try:
        train(args, config, device)
    except BaseException as e:  # a stop or an error: the frames it left hold the engine, and the engine its groups
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if dist.is_initialized():
            # nothing may hold the process group past its destroy_process_group: one that outlives it keeps gloo's
            # and the store's threads running into interpreter shutdown, which now and then aborts a finished run
            ENGINES.close()  # engine.destroy(): the engine's gradient hooks hold it, and it its process groups
            gc.collect()  # the engine sits in reference cycles
            deepspeed.comm.destroy_process_group()  # also DeepSpeed's own references to its groups


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(args, config, device):
    torch.manual_seed(args.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
    if args.amp and device.type != "cuda":
        print0("NOTE: --amp is mixed precision on GPU only; training in float32 on CPU")

    # -----------------------------------------------------------------------------
    # data: local rank 0 of each node downloads if needed while the other ranks wait
    reason = download_mnist(args.data_dir) if LOCAL_RANK == 0 else None
    if not all_ranks_ok(reason is None, device):
        fail(f"MNIST is not in {os.path.abspath(args.data_dir)} and could not be downloaded "
             f"({reason or 'on another node'}). "
             f"HINT: compute nodes are often offline; on the login node run: python {os.path.basename(__file__)} "
             f"--download-only --data-dir {args.data_dir}")
    x_train, y_train = load_mnist(args.data_dir, True, device)
    x_test, y_test = load_mnist(args.data_dir, False, device)
    # each rank sees a disjoint 1/WORLD_SIZE of the training set, reshuffled every epoch by set_epoch();
    # drop_last keeps the shards equal, so every rank takes the same number of steps
    sampler = DistributedSampler(range(len(x_train)), num_replicas=WORLD_SIZE, rank=RANK, shuffle=True, seed=args.seed,
                                 drop_last=True)
    batch_size = config["train_micro_batch_size_per_gpu"]

    # -----------------------------------------------------------------------------
    # model and optimizer: DeepSpeed builds the optimizer and scheduler from the config and wraps the model
    # in an engine that averages (and with ZeRO, partitions) gradients and optimizer state across ranks
    raw_model = Net()
    try:
        # device_rank: our GPU (gpu_index), not DeepSpeed's default, GPU LOCAL_RANK
        engine, optimizer, _, scheduler = deepspeed.initialize(
            args=argparse.Namespace(device_rank=LOCAL_RANK if device.index is None else device.index), model=raw_model,
            model_parameters=raw_model.parameters(), config=config)
    except (AssertionError, ValueError, KeyError) as e:  # DeepSpeed's config checks
        fail(f"DeepSpeed rejected the config {args.deepspeed_config or '(built-in)'}: {type(e).__name__}: {e}")
    ENGINES.callback(engine.destroy)  # at the end, however train() ends (main)
    torch.manual_seed(args.seed + RANK)  # the weights are made: from here on each rank draws its own random numbers
    # the engine keeps the model in the config's dtype (its fp16 or bf16 section, also spelled bfloat16): feed it that
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    x_test = x_test.to(dtype)  # cast the test set once, not every epoch
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16 (loss scaling)", torch.float32: "fp32"}[dtype]
    print0(f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()}, micro batch {batch_size} per process, "
           f"global batch {engine.train_batch_size()} | {precision} on {device.type}")

    # -----------------------------------------------------------------------------
    # resume: every rank loads its own shard of the newest checkpoint named by "latest"; mid-epoch ones resume at
    # their step. Only a checkpoint of this run: what defines it is saved with it and compared (check_same_run)
    run = {"script": "mnist_ddp_deepspeed.py", "model": "Net", "data": f"MNIST, {len(x_train)} training digits",
           "batch_size": batch_size, "zero_stage": engine.zero_optimization_stage(),
           "optimizer": json.dumps(config.get("optimizer"), sort_keys=True),
           "scheduler": json.dumps(config.get("scheduler"), sort_keys=True),
           "gradient_clipping": config.get("gradient_clipping", 0), "seed": args.seed, "precision": precision,
           "world_size": WORLD_SIZE, "git_commit": os.environ.get("GIT_COMMIT")}
    start_epoch, start_step = 1, 0
    run_id = run_name()
    tb_name = run_id  # the TensorBoard run: this job's, or the first job's of the training it resumes
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir)
        if os.path.exists(os.path.join(args.checkpoint_dir, "latest")):
            tag = open(os.path.join(args.checkpoint_dir, "latest")).read().strip()
            # ZeRO keeps one optimizer shard per rank: count them first, DeepSpeed's own error is long
            shards = len(glob.glob(os.path.join(args.checkpoint_dir, tag, "*zero_pp_rank_*_optim_states.pt")))
            if shards:
                check_same_run(os.path.join(args.checkpoint_dir, tag), {"world_size": shards}, run)
            try:
                path, client_state = engine.load_checkpoint(args.checkpoint_dir)
                error = "DeepSpeed found nothing to load"
            except Exception as e:  # a damaged shard: say which, never start afresh over it
                path, error = None, " ".join(f"{type(e).__name__}: {e}".split())[:200]
            if path is None:
                fail(f"could not load checkpoint {os.path.join(args.checkpoint_dir, tag)}, named by 'latest' "
                     f"({error}). HINT: to go back to the previous one, write its name (ls {args.checkpoint_dir}) into "
                     f"{os.path.join(args.checkpoint_dir, 'latest')}")
            if client_state.get("script") != "mnist_ddp_deepspeed.py":
                fail(f"{path} was not written by mnist_ddp_deepspeed.py (it is from "
                     f"{client_state.get('script', 'another script')}). "
                     "HINT: use a new --checkpoint-dir for a different script or model")
            check_same_run(path, client_state.get("run"), run)
            if len(client_state["rng"]) == WORLD_SIZE:
                set_rng_state(client_state["rng"][RANK], device)
            start_epoch, start_step = client_state["epoch"] + 1, client_state["step"]
            tb_name = client_state.get("tensorboard", tb_name)
            steps = f" and {start_step} steps of epoch {start_epoch}" if start_step else ""
            print0(f"resumed from {path}: epoch {client_state['epoch']} done{steps}, continuing at epoch {start_epoch}")
        elif glob.glob(os.path.join(args.checkpoint_dir, "epoch_*")):  # never a silent fresh start over them
            fail(f"{args.checkpoint_dir} holds checkpoints but no DeepSpeed 'latest' file: they are not from "
                 "mnist_ddp_deepspeed.py. HINT: use a new --checkpoint-dir for a different script or model")
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = open(os.path.join(args.output_dir, f"metrics-{run_id}.jsonl"), "a") if RANK == 0 else None
    # curves: x is the optimizer step, counted over the whole training
    steps_per_epoch = -(-len(sampler) // batch_size)
    tb = tensorboard(args.output_dir, tb_name, purge_step=(start_epoch - 1) * steps_per_epoch + start_step + 1)
    prof = profiler(args, device, run_id)

    def checkpoint(epoch, step):
        """Every rank writes its shard; RNG states come from every rank."""
        TIMES.lap("compute")
        rng = all_gather(rng_state(device))
        name = f"epoch_{epoch - 1:04d}_step_{step:07d}" if step else f"epoch_{epoch:04d}"
        save_checkpoint(engine, args.checkpoint_dir, name, {
            "epoch": epoch - 1 if step else epoch, "step": step, "rng": rng, "args": vars(args), "run": run,
            "tensorboard": tb_name, "script": "mnist_ddp_deepspeed.py"})
        if tb:
            tb.flush()  # the curves up to the checkpoint: what a resumed run goes on from
        TIMES.lap("checkpoint")

    # -----------------------------------------------------------------------------
    # training loop
    stop_check(device, None, 0, 0)  # a signal in start-up (staging, loading), or the end already near
    TIMES.lap("startup")
    t_start, trained, train_seconds, result = time.perf_counter(), 0, 0.0, None
    for epoch in range(start_epoch, args.epochs + 1):
        engine.train()
        sampler.set_epoch(epoch)  # without this every epoch repeats the same shuffle
        order = torch.tensor(list(sampler), device=device)
        skip, start_step = start_step, 0  # a mid-epoch checkpoint: continue after the steps it already holds
        loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
        lr, t0 = optimizer.param_groups[0]["lr"], time.perf_counter()
        for step in range(skip, steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            TIMES.lap("data")  # with a DataLoader: right after next(), the wait for a batch
            loss = F.cross_entropy(engine(x_train[idx].to(dtype)).float(), y_train[idx])
            engine.backward(loss)  # instead of loss.backward(): the engine reduces gradients
            engine.step()  # instead of optimizer.step() + zero_grad(): also clips, and steps the scheduler
            loss_sum += loss.detach() * len(idx)
            if prof:
                prof.step()
            if RANK == 0 and step % args.log_interval == 0:  # .item() syncs, so only now and then
                value = loss.item()
                print_line(f"  epoch {epoch} step {step} loss {value:.4f}")
                if tb:
                    tb.add_scalar("train/loss", value, (epoch - 1) * steps_per_epoch + step + 1)
            if (step + 1) % STOP_CHECK_EVERY == 0 and step + 1 < steps_per_epoch:
                stop_check(device, args.checkpoint_dir and checkpoint, epoch, step + 1)
            TIMES.lap("compute")
        stats = torch.stack([loss_sum, torch.tensor(float(len(order) - skip * batch_size), device=device)]).double()
        if WORLD_SIZE > 1:
            dist.all_reduce(stats)  # the mean over all ranks' samples, not just rank 0's
        seconds = time.perf_counter() - t0
        train_loss, samples = (stats[0] / stats[1]).item(), int(stats[1].item())
        TIMES.lap("compute")
        test_loss, test_acc, n_test = evaluate(engine.module, x_test, y_test, args.test_batch_size, device)
        trained, train_seconds = trained + samples, train_seconds + seconds
        result = dict(epoch=epoch, train_loss=train_loss, test_loss=test_loss, test_acc=test_acc,
                      test_count=n_test, seconds=seconds, samples_per_s=samples / seconds)
        print0(f"epoch {epoch}/{args.epochs} | train loss {train_loss:.4f} | test loss {test_loss:.4f} | "
               f"test acc {100 * test_acc:.2f}% | {seconds:.1f} s | {samples / seconds:.0f} samples/s")
        if metrics:
            metrics.write(json.dumps({"event": "epoch", **result}) + "\n")
            metrics.flush()
        if tb:
            tb.add_scalar("epoch/lr", lr, epoch * steps_per_epoch)
            for key in ("train_loss", "test_loss", "test_acc", "samples_per_s"):
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
    if result is None:  # nothing left to train (resumed a finished run): still report the model's accuracy
        test_loss, test_acc, n_test = evaluate(engine.module, x_test, y_test, args.test_batch_size, device)
        result = dict(epoch=start_epoch - 1, test_loss=test_loss, test_acc=test_acc, test_count=n_test)
        print0(f"nothing to train: the checkpoint already has {start_epoch - 1} epochs (--epochs={args.epochs})")
    TIMES.lap("eval")
    checksums = all_gather(param_checksum(engine.module))  # each rank's own hash: the test compares them
    time_split = TIMES.report("no DataLoader: MNIST sits on the device")  # prints its line (and a HINT)
    done = {"event": "done", "test_acc": result["test_acc"], "test_loss": result["test_loss"],
            "test_count": result["test_count"], "epoch": result["epoch"], "world_size": WORLD_SIZE,
            "seconds": time.perf_counter() - t_start,
            "samples_per_s": trained / train_seconds if train_seconds else None, "param_checksums": checksums,
            "time_split": time_split}
    print0(json.dumps(done))
    if metrics:
        metrics.write(json.dumps(done) + "\n")
        metrics.close()
    if tb:
        tb.close()


if __name__ == "__main__":
    main(get_args())
