"""
The plumbing every training script here shares: launch, devices, the process group, stopping and requeueing,
checkpoint files, outputs. Each script keeps its own story and calls this module by name (cluster.stop_check(...)),
so every line that calls it is one to keep. Copy it beside your script; it imports the standard library and torch
(tensorboard, Lightning and DeepSpeed only inside the functions that use them).

A script calls, in this order:
    parse_args(parser)                 its options, the shared ones (--checkpoint-dir, --device ...) and a sweep line
    process_group(args)                a with-block: who this process is, its device, the process group, teardown
    print0(message), fail(message)     rank 0 speaks; one ERROR line, then exit 1 on every rank
    all_ranks_ok(ok, device), all_sum(tensor), all_gather(obj)   agree on a flag; sums; every rank's object
    autocast_dtype(device, amp)        --amp: bfloat16 where the GPU computes it natively, else float16; else None
    load_checkpoint(dir, run, device)  the newest whole checkpoint of this run, or None: start afresh
    load_shards(ckpt, state_dicts)     FSDP2: this rank's shards of that checkpoint (DCP)
    replay_first_backward(model, loss) after a DDP resume: gradient buckets laid out as in the first run
    Outputs(args, device, resumed)     rank 0's metrics file, TensorBoard run, profiler and done line
    TIMES.lap(part)                    where the time went: start-up, staging, data wait, compute, evaluation, ...
    stop_check(device, checkpoint, epoch, step)   on a signal or near the end: checkpoint, requeue, exit 75
    save_checkpoint(dir, epoch, step, device, outputs, state)   atomic, with every rank's random state
    param_checksum(model)              a hash of the weights: equal on every rank iff the replicas are
Lightning's script also calls started(), check_same_run() and lightning_callbacks(); DeepSpeed's
deepspeed_accelerator() (before its import) and deepspeed_config(); ImageNet's ignore_stop_signals (in its workers).
A hang leaves evidence (process_group's watchdog thread): a rank without progress, or found stuck by a SIGTERM,
prints every thread's stack; a collective that timed out is named in one line; SIGURG asks every rank for its stacks.
"""
import argparse
import contextlib
import copy
import gc
import glob
import hashlib
import json
import os
import pathlib
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from datetime import datetime, timedelta

import torch
import torch.distributed as dist
# before any process group exists: imported later (DDP does), its functions' default arguments keep the default group,
# and gloo's threads with it, alive into interpreter shutdown, which now and then aborts a finished run
import torch.distributed.nn  # noqa: F401

RANK, LOCAL_RANK, WORLD_SIZE = 0, 0, 1  # who this process is: set by process_group()

# --- options -----------------------------------------------------------------
def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(parser, argv=None, log_interval=20, env=os.environ):
    """The command line, with the options every script shares and, in a job array with SWEEP=FILE, its task's line."""
    p = parser
    p.add_argument("--log-interval", type=positive_int, default=log_interval,
                   help=f"steps between loss prints (default: {log_interval})")
    p.add_argument("--output-dir", default="./out", help="metrics file and tensorboard/RUN go here (default: ./out)")
    p.add_argument("--checkpoint-dir", default=os.environ.get("CHECKPOINT_DIR"),
                   help="save every epoch and resume from the latest checkpoint here (default: $CHECKPOINT_DIR, else "
                        "no checkpoints)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU if there is one (default: auto)")
    p.add_argument("--profile", action="store_true",
                   help="trace 5 training steps on rank 0 with torch.profiler (after 8 to warm up): a table of the "
                        "slowest operators and a trace file for Perfetto or TensorBoard (default: off)")
    p.add_argument("--dist-timeout", type=positive_int, default=600,
                   help="seconds the ranks wait for each other, at start and in every collective; a rank without "
                        "progress for longer prints its stacks (default: 600)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv) + _sweep_line(env))
    if args.checkpoint_dir and env.get("SLURM_ARRAY_TASK_ID"):  # the tasks share their command line, but none may
        args.checkpoint_dir = os.path.join(args.checkpoint_dir, run_name(env))  # resume another's checkpoints
    return args


def _sweep_line(env):
    """Line SLURM_ARRAY_TASK_ID of $SWEEP (from 0, blank and # lines skipped) as words, quotes as in a shell."""
    sweep, task = env.get("SWEEP"), env.get("SLURM_ARRAY_TASK_ID")
    if not sweep:
        return []
    speak = int(env.get("RANK", env.get("SLURM_PROCID", 0))) == 0  # every rank reads it, rank 0 speaks
    try:
        if not task:
            raise ValueError(f"SWEEP={sweep} is set, but this job is not an array. HINT: sbatch --array=0-N ...")
        try:
            with open(sweep) as f:
                lines = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
        except OSError as e:
            raise ValueError(f"sweep file '{sweep}' ($SWEEP) cannot be read in {os.getcwd()} ({e.strerror})") from e
        if not lines or int(task) >= len(lines):
            raise ValueError(f"sweep file '{sweep}' has no lines of arguments" if not lines else
                             f"this is array task {task}, but {sweep} has {len(lines)} lines (tasks 0 to "
                             f"{len(lines) - 1}). HINT: sbatch --array=0-{len(lines) - 1} ...")
        try:
            words = shlex.split(lines[int(task)])
        except ValueError as e:
            raise ValueError(f"line {task} of {sweep}: {e} in: {lines[int(task)]}") from e
    except ValueError as e:  # every rank stops: exit 2, as argparse does for a bad option
        if speak:
            print_line(f"ERROR: {e}", sys.stderr)
        raise SystemExit(2) from None
    if speak:
        print_line(f"== sweep {sweep}, task {task} of {len(lines)} (array job {env.get('SLURM_ARRAY_JOB_ID')}): "
                   f"{' '.join(words)} ==")
    return words


# --- who this process is, and its device -------------------------------------
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
    """(rank, local rank, world size, MASTER_ADDR, MASTER_PORT): torchrun's, else srun's, else mpirun's, else one."""
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (or set by hand): it also sets MASTER_ADDR/PORT
        return int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), None, None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun: one task per GPU
        world_size = int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
        if world_size > 1 and "SLURM_STEP_ID" not in env:  # the job's batch script itself: the other ranks never come
            raise SystemExit(f"ERROR: this job has {world_size} tasks, but this process was not started by srun, so it "
                             f"would wait for {world_size - 1} ranks that never start. HINT: srun python "
                             f"{os.path.basename(sys.argv[0])} ..., or submit with one of the run-gpu*.sh wrappers")
        # every rank computes the same address and port: rank 0 runs on the first node of the job,
        # and the port comes from the job id so that two jobs sharing a node do not collide
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        port = env.get("MASTER_PORT") or str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world_size, addr, port
    if int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:  # mpirun (Open MPI)
        world_size = int(env["OMPI_COMM_WORLD_SIZE"])
        # all ranks on one node: rank 0 is on this one. Across nodes only MPI knows where rank 0 runs (None)
        one_node = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 0)) == world_size
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if one_node else None)
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), world_size, addr,
                env.get("MASTER_PORT") or "29500")
    return 0, 0, 1, None, None


CUDA_DRIVER_FLOOR = {"13": 580, "12": 525, "11": 450}  # the oldest NVIDIA driver each CUDA major version runs on


def unusable_gpus(env=os.environ):
    """None, or the error when the job was given GPUs that torch cannot use (a driver older than its CUDA build)."""
    if torch.cuda.is_available():  # else a 4-GPU job would train on the CPU and look fine
        return None
    for var in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        value = env.get(var, "").strip()
        if value in ("", "-1", "NoDevFiles") or (var == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue  # no GPU given this way
        cuda = torch.version.cuda  # CUDA 13 builds have no kernels for GPUs before Turing (7.5)
        needs = "it is a CPU-only build" if cuda is None else (
            f"it is a build for CUDA {cuda}, which needs an NVIDIA driver >= "
            f"{CUDA_DRIVER_FLOOR.get(cuda.split('.')[0])} (nvidia-smi shows yours)"
            f"{' and a GPU of compute capability >= 7.5' * cuda.startswith('13')}")
        return (f"this job was given GPUs ({var}={value}), but torch {torch.__version__} cannot use them: {needs}. "
                "HINT: install the torch build that matches the cluster's driver, or pass --device=cpu to train on "
                "CPU anyway")
    return None


def gpu_index(local_rank, env=os.environ):
    """Which visible GPU this process takes; ValueError when its node runs more processes than they see GPUs."""
    visible = torch.cuda.device_count()
    launcher = next((v for v in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE") if v in env), None)
    if launcher:  # torchrun, DeepSpeed's launcher or mpirun started this node's processes: they see the same GPUs
        local_size = int(env[launcher])
    elif "SLURM_STEP_ID" in env and "SLURM_STEP_TASKS_PER_NODE" in env:  # srun: "4", or "2(x3),1" (2 on 3 nodes, 1)
        # --gpus-per-task, --gpu-bind, --ntasks-per-gpu, a site default: the task sees only its own GPU(s), fewer
        # than the step has on this node. Else (--gres=gpu:N, --gpus-per-node) every task sees all: GPU local_rank
        if 0 < visible < int(env.get("SLURM_GPUS_ON_NODE") or 0):
            return 0
        per_node = [int(n) for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", env["SLURM_STEP_TASKS_PER_NODE"])
                    for _ in range(int(times or 1))]
        local_size = per_node[min(int(env.get("SLURM_NODEID", 0)), len(per_node) - 1)]
    else:
        local_size = 1
    local_size = max(local_size, local_rank + 1)  # a launcher that says nothing: at least this many
    if local_size > visible:  # two ranks on one GPU fail in NCCL
        raise ValueError(f"{local_size} processes on {socket.gethostname()} share {visible} "
                         f"visible GPU(s) (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}); two ranks "
                         "on one GPU fail in NCCL. HINT: one process per GPU: as many tasks per node (srun) or "
                         "--nproc-per-node (torchrun) as GPUs per node, with --gpus-per-node=N (keeps NVLink)")
    return local_rank


def _pick_device(args, env=os.environ):
    if getattr(args, "local_rank", None) is not None:  # DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES even on a
        env = {k: v for k, v in env.items() if k != "CUDA_VISIBLE_DEVICES"}  # machine without GPUs: ask Slurm's
    if args.device != "cpu" and (error := unusable_gpus(env)):
        fail(error)
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given, but no CUDA device is visible here. HINT: request a GPU (e.g. --gres=gpu:1) or "
             "use --device cpu")
    if args.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        device = torch.device("cuda", gpu_index(LOCAL_RANK))
    except ValueError as e:  # every process of that node knows; its local rank 0 says it
        fail(str(e), speak=LOCAL_RANK == 0)
    torch.cuda.set_device(device)
    return device


def autocast_dtype(device, amp=True):
    """--amp on a GPU: bfloat16 from compute capability 8.0 (A100, H100, L4, RTX 30xx), before it float16 with loss
    scaling (7.5 only emulates bfloat16); without --amp or on the CPU None: float32."""
    if amp and device.type != "cuda":
        print0("NOTE: --amp is mixed precision on GPU only; training in float32 on CPU")
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16


# --- the process group -------------------------------------------------------
@contextlib.contextmanager
def process_group(args, deepspeed=False, group=True):
    """with cluster.process_group(args) as device: who this process is, its device (a GPU of its own, else the CPU) and
    the process group (NCCL, else gloo), torn down however the block ends. deepspeed=True: a group even for one
    process, wrapped by DeepSpeed; group="always": a group even for one process (FSDP2); group=False: the framework
    forms it (Lightning)."""
    global RANK, LOCAL_RANK, WORLD_SIZE
    RANK, LOCAL_RANK, WORLD_SIZE, addr, port = launch_env()
    if not group:  # what Lightning will find (its own launcher sets LOCAL_RANK), for print0 and the GPU's choice
        RANK = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        LOCAL_RANK = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    if RANK != 0:  # only rank 0 speaks: other ranks' warnings would repeat it WORLD_SIZE times
        warnings.filterwarnings("ignore")
    for signum in STOP_SIGNALS:  # installed first: Lightning then adds no SIGUSR1 requeue of its own
        signal.signal(signum, _on_stop_signal)
    unwatch = _watch(args.dist_timeout)
    try:
        device = _pick_device(args)
        if device.type == "cuda":
            _flight_recorder(args.output_dir)
        if group and (WORLD_SIZE > 1 or deepspeed or group == "always"):
            if WORLD_SIZE == 1 and not addr:
                addr, port = "127.0.0.1", str(_free_port())
            if addr:  # launched by srun or mpirun: tell init_process_group where rank 0 listens
                os.environ.update(RANK=str(RANK), LOCAL_RANK=str(LOCAL_RANK), WORLD_SIZE=str(WORLD_SIZE),
                                  MASTER_ADDR=addr, MASTER_PORT=port)
            _init_group(device, args.dist_timeout, deepspeed)
        if group:
            started(RANK, LOCAL_RANK, WORLD_SIZE, device)
        yield device
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)  # they hold the model, and the model its process group
        if isinstance(e, RuntimeError) and re.search(r"timed out|timeout", str(e), re.I) and dist.is_initialized() \
                and _timed_out(e, args.dist_timeout):  # one line naming the collective, and this rank's stacks
            raise SystemExit(1) from None  # its stacks are in the log: not the traceback a second time
        if isinstance(e, dist.DistNetworkError | dist.DistStoreError) and not group and not dist.is_initialized():
            _init_failed(e, args.dist_timeout)  # Lightning could not form its group
        if not isinstance(e, SystemExit | KeyboardInterrupt):
            _error_file(f"{type(e).__name__}: {e}", traceback.format_exc())  # torchrun's summary shows it
        raise
    finally:
        unwatch()
        if dist.is_initialized():  # nothing may hold the group past here: see the torch.distributed.nn import
            while CLOSE_FIRST:  # no name may hold them, not even a loop variable
                CLOSE_FIRST.pop()()  # DeepSpeed's engine.destroy(): its gradient hooks hold it, and it its groups
            for mesh in [m for m in gc.get_objects() if type(m).__name__ == "DeviceMesh"]:  # FSDP2's: torch's DTensor
                vars(mesh).get("_pg_registry", {}).clear()  # caches hold it past the model, and it its groups
            gc.collect()  # DDP's reducer and DeepSpeed's engine sit in reference cycles
            if "deepspeed" in sys.modules:  # also DeepSpeed's own references to its groups
                sys.modules["deepspeed"].comm.destroy_process_group()
            else:
                dist.destroy_process_group()


CLOSE_FIRST = []  # callables run before the process group is destroyed


def _init_group(device, seconds, use_deepspeed):
    timeout = timedelta(seconds=seconds)  # bounds every collective: a hung rank ends the job, not the time limit
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        if not use_deepspeed or os.environ.get("MASTER_ADDR"):  # not DeepSpeed's own: it would bind GPU LOCAL_RANK
            # device_id: NCCL connects now, so a network fault is the start-up's one-line error, not a traceback at
            # the first collective (and barriers know their GPU)
            dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
        if use_deepspeed:  # it wraps ours; without MASTER_ADDR (mpirun across nodes) it asks MPI where rank 0 is
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=True, verbose=False, timeout=timeout)
            if dist.get_rank() != 0:
                deepspeed.utils.logger.setLevel("ERROR")
    except (dist.DistNetworkError, dist.DistStoreError, dist.DistBackendError) as e:  # backend: NCCL's connect
        _init_failed(e, seconds)
    global RANK, WORLD_SIZE
    RANK, WORLD_SIZE = dist.get_rank(), dist.get_world_size()  # MPI discovery may have filled them in


def started(rank, local_rank, world_size, device):
    """Who this process is, and exactly one start-up line per rank (Lightning's script calls it once in the group)."""
    global RANK, LOCAL_RANK, WORLD_SIZE
    RANK, LOCAL_RANK, WORLD_SIZE = rank, local_rank, world_size
    if RANK != 0:
        warnings.filterwarnings("ignore")
    print_line(f"[rank {RANK}/{WORLD_SIZE}] local_rank {LOCAL_RANK} host {socket.gethostname()} device {device}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_failed(error, timeout):
    """The ranks could not form their process group: each rank says why, from where it stands."""
    reason = str(error).splitlines()[0][:200]
    where = f"MASTER_ADDR:MASTER_PORT = {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if "EADDRINUSE" in reason:  # rank 0 cannot listen: another program, or another job, holds the port
        fail(f"rank 0 cannot listen on {where} ({reason}). HINT: the port is in use; unset MASTER_PORT to derive one "
             "from the job id, or pick a free one", speak=True)
    fail(f"rank {RANK} on {socket.gethostname()} did not meet the other ranks at {where} within {timeout:g} s "
         f"({reason}). HINT: a rank that could not start says why in this log; else check that MASTER_ADDR is the "
         "job's first node and reachable from here", speak=True)


# --- rank 0 speaks -----------------------------------------------------------
def print0(message, file=None):
    """Print on rank 0 only."""
    if RANK == 0:
        print_line(message, file)


def print_line(message, file=None):
    """One write per line (to stdout by default), so that lines from several ranks sharing a log never interleave."""
    file = file or sys.stdout
    file.write(f"{message}\n")
    file.flush()


def fail(message, speak=None):
    """One ERROR line, from rank 0 unless `speak` says whether this rank prints it, then exit 1 on every rank."""
    WATCH["stopping"] = True  # a deliberate exit: no stacks when the launcher ends the ranks still waiting
    if RANK == 0 if speak is None else speak:
        print_line(f"ERROR: {message}", sys.stderr)
    _error_file(f"ERROR: {message}")
    if RANK != 0:  # let the rank that speaks print first: torchrun and srun end every rank once one fails
        time.sleep(3)
    raise SystemExit(1)


def _error_file(message, callstack=None):
    """Under torchrun: the error in its error file, which its summary shows as the failure's root cause."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not os.path.exists(path):  # the first error is the root cause
        with contextlib.suppress(OSError), open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {
                "py_callstack": callstack or message, "timestamp": str(int(time.time()))}}}, f)


def all_ranks_ok(ok, device):
    """Agree on a flag across ranks; doubles as a barrier. False if any rank reported a failure."""
    if WORLD_SIZE == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_sum(tensor):
    """The tensor summed over all ranks, in place."""
    if WORLD_SIZE > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj):
    """Every rank's obj, in rank order."""
    if WORLD_SIZE == 1:
        return [obj]
    out = [None] * WORLD_SIZE
    dist.all_gather_object(out, obj)
    return out


def param_checksum(model):
    """A hash of every parameter's bytes: equal on all ranks iff the replicas are bit-identical."""
    h = hashlib.sha256()
    for p in model.state_dict().values():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's shard (a DTensor): the whole weights
        h.update(p.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: also for bfloat16
    return h.hexdigest()[:16]


# --- stopping and requeueing -------------------------------------------------
# Slurm sends SIGUSR1 before the time limit (the job scripts ask for it with --signal; submitit asks for SIGUSR2) and
# SIGTERM when it cancels or preempts. The handler only notes the signal; stop_check, at step boundaries, makes all
# ranks agree, rank 0 checkpoints mid-epoch and requeues the job (not on SIGTERM), and every rank exits 75. Without a
# signal, rank 0 stops the same way when the job's end is near (NEAR_END). MAX_REQUEUES (default 20) bounds requeues.
STOP_SIGNALS = {signal.SIGUSR1: "SIGUSR1", signal.SIGUSR2: "SIGUSR2", signal.SIGTERM: "SIGTERM"}
NEAR_END = 1           # not a signal we handle: the ranks' agreed "stop" when rank 0 finds the end time near
STOP_CHECK_EVERY = 10  # steps between the (tiny) all-reduces that agree on stopping
EXIT_RESUMABLE = 75    # "try again": stopped with a checkpoint; run the same command to resume
STOP_MARGIN = 60       # default seconds before the time limit to stop at ($STOP_MARGIN)
received_signals = []
stop_clock = {}        # rank 0: the job's end time, the margin, the last check's time, the longest gap between checks


def _on_stop_signal(signum, frame):
    received_signals.append(signum)


def ignore_stop_signals(*_):
    """worker_init_fn: DataLoader workers ignore the stop signals, which Slurm sends to every process of the step."""
    for signum in [*STOP_SIGNALS, DUMP_SIGNAL]:  # torch's worker dies of a SIGTERM its parent did not send, and
        signal.signal(signum, signal.SIG_IGN)      # takes the rank with it


def slurm_seconds(text):
    """Seconds in Slurm's [days-][hours:]minutes:seconds ('1-02:03:04', '59:30'); None for UNLIMITED and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    return None if m is None else ((int(m[1] or 0) * 24 + int(m[2] or 0)) * 60 + int(m[3])) * 60 + int(m[4])


def job_end_time(env=os.environ):
    """(the job's end in time.time() seconds, its time limit in seconds), None where unknown; asked once, by rank 0."""
    if env.get("SLURM_JOB_END_TIME", "").isdigit():  # Slurm 23.02 and later
        end, begin = float(env["SLURM_JOB_END_TIME"]), env.get("SLURM_JOB_START_TIME", "")
        return end, end - float(begin) if begin.isdigit() else None
    if not env.get("SLURM_JOB_ID"):
        return None, None
    try:
        r = subprocess.run(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%L %l"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no Slurm client here, or slurmctld not answering
        return None, None
    left, limit = ((r.stdout.split() if r.returncode == 0 else []) + ["", ""])[:2]
    left, limit = slurm_seconds(left), slurm_seconds(limit)
    return None if left is None else time.time() + left, limit


def _start_stop_clock():
    """Rank 0's first check: the end time, and the margin, capped at a quarter of a short job's time limit."""
    end, limit = job_end_time()
    margin = float(os.environ.get("STOP_MARGIN") or STOP_MARGIN)
    if limit is not None and margin * 2 > limit:  # else every run of the job stops after its first 10 steps
        if not os.environ.get("STOP_MARGIN"):
            print0(f"NOTE: this job's time limit, {limit} s, leaves little room past the default STOP_MARGIN of "
                   f"{margin:g} s: each run stops {limit / 4:g} s (a quarter of the limit) before its end instead. "
                   "HINT: ask for a longer --time, or set STOP_MARGIN to the seconds a checkpoint needs")
            margin = limit / 4
        else:
            print0(f"NOTE: STOP_MARGIN={margin:g} s leaves little of this job's time limit ({limit} s): each run stops "
                   f"that long before its end. HINT: ask for a longer --time, or lower STOP_MARGIN")
    stop_clock.update(end=end, margin=margin, last=time.time(), gap=0.0)


def _near_end():
    """Is the end nearer than the margin plus the longest gap yet between two checks (the next may come too late)?"""
    now = time.time()
    stop_clock["gap"], stop_clock["last"] = max(stop_clock["gap"], now - stop_clock["last"]), now
    if stop_clock["end"] is None:
        return False
    stop_clock["left"] = stop_clock["end"] - now
    return stop_clock["left"] < stop_clock["margin"] + stop_clock["gap"]


def stop_check(device, checkpoint, epoch, step):
    """At the same steps on every rank (epoch 0: before the first, signals only): on a stop signal, or near the end,
    checkpoint(epoch, step) (step 0: the epoch's end, already saved), requeue, and exit EXIT_RESUMABLE."""
    if RANK == 0 and not stop_clock:
        _start_stop_clock()
    WATCH["armed"] = True  # training has begun: a rank without progress for --dist-timeout is stuck
    near = epoch > 0 and RANK == 0 and _near_end()
    signum = torch.tensor([max(received_signals + [NEAR_END if near else 0])], device=device)
    if WORLD_SIZE > 1:
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)  # the same answer on every rank
    signum = int(signum.item())
    if not signum:
        return
    WATCH["stopping"] = True  # the stop is under way: no stall to report after a SIGTERM
    if checkpoint and step:
        checkpoint(epoch, step)
    where = f"epoch {epoch} step {step}" if step else f"the end of epoch {epoch}"
    message = ("nothing trained yet in this run" if not epoch else f"checkpoint at {where}" if checkpoint
               else "no --checkpoint-dir, nothing saved")
    if RANK == 0 and signum != signal.SIGTERM:  # SIGTERM: cancelled or preempted, Slurm decides
        message += _requeue(epoch, signum)
    cause = (f"on {STOP_SIGNALS[signum]}" if signum in STOP_SIGNALS
             else f"{stop_clock.get('left', 0):.0f} s before the time limit, with no signal")
    TIMES.lap("compute")
    print0(f"stopped {cause}: {message}")
    print0(TIMES.words())  # this run's: each requeued run of a long job has its own
    all_ranks_ok(True, device)  # the others wait for the requeue: an early exit could make the launcher end rank 0
    for signum in STOP_SIGNALS:  # from here a SIGTERM (srun --kill-on-bad-exit ending the other tasks once one has
        signal.signal(signum, signal.SIG_IGN)  # exited 75) must not turn an exit 75 into a death by signal (143)
    raise SystemExit(EXIT_RESUMABLE)


def _requeue(epoch, signum, env=os.environ):
    """Rank 0 puts the job back in the queue, or asks the job script to (REQUEUE_REQUEST); what it did, in words."""
    job_id, restarts = env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT") or 0)
    cap, resubmit = int(env.get("MAX_REQUEUES") or 20), ". Resubmit the same command to resume"
    if not job_id:
        return ""
    if signum == signal.SIGUSR2 and env.get("SUBMITIT_EXECUTOR"):  # submitit's signal: its handler requeues the job
        return "; the requeue is submitit's"  # (a second requeue would only fail, or rerun the job twice)
    if restarts >= cap:
        return f"; not requeued: job {job_id} has restarted {restarts} times (MAX_REQUEUES={cap}){resubmit}"
    if restarts and not epoch:  # a requeue would only repeat this: start-up alone outlasts the time left
        return (f"; not requeued: this restart of job {job_id} stopped before its first step, as the next would"
                + resubmit)
    try:
        r = subprocess.run(["scontrol", "requeue", job_id], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        why = None if r.returncode == 0 else " ".join(r.stdout.split())[:300]  # one line for the log
    except OSError as e:  # no scontrol here: a container without Slurm's client. The job script, outside it, requeues
        why = f"scontrol: {e.strerror}"  # the job when this file exists, once the step has ended
        if env.get("REQUEUE_REQUEST"):
            with contextlib.suppress(OSError), open(env["REQUEUE_REQUEST"], "w") as f:
                f.write(f"{job_id}\n")
                return f"; asked the job script to requeue job {job_id} ({why})"
    return f"; requeued job {job_id}" if why is None else f"; could not requeue job {job_id}: {why}{resubmit}"


# --- a hang leaves evidence --------------------------------------------------
# Every thread's Python stack, printed once per stall with this rank and host, when this rank makes no progress (no
# TIMES.lap) for --dist-timeout + STALL_MARGIN s once training has begun, or when a SIGTERM (scancel, a launcher
# ending the job) finds it STALL_MARGIN s without progress; when its collective times out (with one ERROR line naming
# it); and on DUMP_SIGNAL, training going on. A watcher thread prints them: the signals reach it through a pipe
# (signal.set_wakeup_fd), so it hears them while the main thread waits inside a collective or is stuck elsewhere.
DUMP_SIGNAL = signal.SIGURG  # scancel --signal=URG JOBID: bash, srun, torchrun and the DataLoader workers ignore it
STALL_MARGIN = 10
WATCH = {"armed": False, "stopping": False, "dumped": None}  # the last lap whose stall has been reported


def _watch(dist_timeout):
    """Start the watcher thread; returns the function that stops it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set signal handlers
        return lambda: None
    read, write = os.pipe()
    os.set_blocking(write, False)
    WATCH.update(armed=False, stopping=False, dumped=None)
    previous = signal.signal(DUMP_SIGNAL, lambda *_: None), signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    thread = threading.Thread(target=_watcher, args=(read, dist_timeout + STALL_MARGIN), name="cluster-watch",
                              daemon=True)
    thread.start()

    def unwatch():
        signal.signal(DUMP_SIGNAL, previous[0])
        signal.set_wakeup_fd(previous[1])
        os.write(write, b"\0")  # 0 is no signal: the watcher's cue to end
        thread.join()
        os.close(read), os.close(write)
    return unwatch


def _watcher(read, limit):
    term = None  # when a SIGTERM came
    while True:
        data = os.read(read, 512) if select.select([read], [], [], 1.0)[0] else b""
        if 0 in data:
            return
        stalled = time.perf_counter() - TIMES.last
        if DUMP_SIGNAL in data:
            _print_stacks(f"stacks on {DUMP_SIGNAL.name}, as asked; training goes on")
        term = time.perf_counter() if signal.SIGTERM in data else term
        if WATCH["dumped"] == TIMES.last or WATCH["stopping"]:
            continue
        if WATCH["armed"] and stalled > limit:
            why = f"no training progress for {stalled:.0f} s, longer than --dist-timeout ({limit - STALL_MARGIN} s)"
        elif term is not None and stalled > STALL_MARGIN:
            why = f"SIGTERM came while this rank had made no progress for {stalled:.0f} s"
        else:
            continue
        WATCH["dumped"] = TIMES.last
        _print_stacks(f"WARNING: {why}: it may be the rank the others wait for")


def _print_stacks(why, error=None):
    """Every thread's Python stack (the main thread's: where `error` was raised), with rank and host, in one write."""
    names, me = {t.ident: t.name for t in threading.enumerate()}, threading.get_ident()
    lines = [f"{why}. Rank {RANK} on {socket.gethostname()} (pid {os.getpid()}), every thread's Python stack, most "
             "recent call last:"]
    for ident, frame in sys._current_frames().items():
        if (ident != me or error) and names.get(ident) != "cluster-watch":
            main = error and ident == threading.main_thread().ident
            lines.append(f"Thread {names.get(ident, ident)}{' (where the error was raised)' * bool(main)}:")
            lines += "".join(traceback.format_tb(error.__traceback__) if main else traceback.format_stack(frame)
                             ).rstrip("\n").split("\n")
    sys.stderr.write("".join(f"[rank {RANK}] {line}\n" for line in lines))
    sys.stderr.flush()


def _timed_out(error, timeout):
    """If a collective timed out here (not a store's wait, a DataLoader's timeout): one ERROR line naming it, where it
    was called and the timeout, then the stacks; True. Else False."""
    frames, torch_dir = traceback.extract_tb(error.__traceback__), os.path.dirname(torch.__file__)
    c10d = [f.name for f in frames if f.filename.endswith("distributed_c10d.py")]
    backward = any(f.name == "backward" for f in frames)
    if not c10d and not backward:
        return False
    what = c10d[-1] if c10d else "the gradients' all-reduce (or FSDP2's reduce-scatter) in backward()"
    ours = [f"{os.path.basename(f.filename)} line {f.lineno}, in {f.name}" for f in frames
            if not f.filename.startswith(torch_dir)]  # the script's frames, and cluster.py's
    script = [w for w in ours if not w.startswith("cluster.py ")]
    where = ", from ".join(dict.fromkeys(ours[-1:] + script[-1:])) or "?"
    WATCH["dumped"] = TIMES.last  # this stall is reported here
    message = (f"rank {RANK} on {socket.gethostname()}: {what} ({where}) timed out after {timeout} s "
               f"(--dist-timeout): a rank never joined it. A rank that is stuck prints its own stack in this log "
               f"(\"WARNING: no training progress\"); on NCCL, --output-dir's flight_recorder/ has every rank's last "
               f"collectives. HINT: if a rank is only slow (rank 0 alone saving or evaluating), raise --dist-timeout")
    print_line(f"ERROR: {message}", sys.stderr)
    _print_stacks("the stacks at the timeout", error)
    _error_file(f"ERROR: {message}")
    return True


def _flight_recorder(output_dir, env=os.environ):
    """NCCL: torch's flight recorder keeps each rank's last collectives and, on a timeout, writes them to
    OUTPUT_DIR/flight_recorder/rank_N; read them with: torchfrtrace OUTPUT_DIR/flight_recorder --prefix rank_"""
    folder = os.path.join(os.path.abspath(output_dir), "flight_recorder")
    os.makedirs(folder, exist_ok=True)
    for names, value in [(("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"), "2000"),
                         (("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"), f"{folder}/rank_"),
                         (("TORCH_NCCL_DUMP_ON_TIMEOUT",), "1")]:
        if not any(env.get(name) for name in names):  # the user's own setting wins, under either name
            env.update(dict.fromkeys(names, value))  # both names: torch 2.5 reads the old, later ones the new


# --- where the time went -----------------------------------------------------
# TIMES is a stopwatch whose laps name what the time since the previous lap was spent on, so the parts add up to the
# wall time from this process's start. Host clocks only: no lap syncs the GPU, whose time shows where the host waits
# for it (a loss .item(), an all-reduce), in "compute".
TIME_PARTS = {"startup": "start-up", "staging": "staging", "data": "data wait", "compute": "compute",
              "eval": "evaluation", "checkpoint": "checkpoints"}
DATA_WAIT_HINT = 0.1  # a HINT when a rank waits for its batches longer than this share of its training steps' time


def _process_start():
    """This process's start on time.perf_counter()'s clock (Linux: /proc/self/stat); elsewhere now."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the name in parentheses (which may hold spaces)
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        age = 0.0
    return time.perf_counter() - max(age, 0.0)


class TimeSplit:
    def __init__(self):
        self.seconds, self.last = dict.fromkeys(TIME_PARTS, 0.0), _process_start()

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
        """Rank 0's split in words (and a HINT naming `loader` when a rank waited for data); in seconds, returned."""
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


# --- checkpoint files --------------------------------------------------------
# Only a checkpoint of this run is resumed: the script saves `run`, what defines its result (settings, world size),
# and one whose run differs is refused (--epochs may grow). Every rank's random state is saved and put back. Names
# sort in training order: epoch_0003.pt, then epoch_0003_step_0000120.pt (3 epochs and 120 steps done).


def load_checkpoint(ckpt_dir, run, device, engine=None, sharded=False):
    """The newest loadable checkpoint of this run in ckpt_dir (into a DeepSpeed `engine`: its shards; sharded: the
    state of a DCP folder, whose shards load_shards loads), else None."""
    if not ckpt_dir:
        return None
    _check_writable(ckpt_dir)
    if engine is not None:
        return _load_shards(engine, ckpt_dir, run, device)
    if sharded:
        return _load_dcp_state(ckpt_dir, run, device)
    for path in sorted(glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")), reverse=True):
        try:  # to the CPU: load_state_dict puts each tensor in place, and AdamW's step counts stay on the CPU (on
            state = torch.load(path, map_location="cpu", weights_only=True)  # the GPU: a host sync per parameter)
        except Exception as e:  # a damaged newest file: say so and take the previous one, never a silent fresh start
            print0(f"WARNING: cannot load {path} ({type(e).__name__}: {e}); trying the previous checkpoint")
            continue
        return _accept(path, state, run, device)
    return None


def _load_shards(engine, ckpt_dir, run, device):
    """Every rank loads its own shards of the checkpoint that the file `latest` names."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        if glob.glob(os.path.join(ckpt_dir, "epoch_*")):  # never a silent fresh start over them
            fail(f"{ckpt_dir} holds checkpoints but no DeepSpeed 'latest' file: they are not from {run['script']}. "
                 "HINT: use a new --checkpoint-dir for a different script or model")
        return None
    tag = os.path.join(ckpt_dir, open(latest).read().strip())
    shards = len(glob.glob(os.path.join(tag, "*zero_pp_rank_*_optim_states.pt")))  # one per rank (ZeRO): checked
    if shards:  # first, DeepSpeed's own error is long
        check_same_run(tag, {"world_size": shards}, run)
    try:
        path, state = engine.load_checkpoint(ckpt_dir)
        error = "DeepSpeed found nothing to load"
    except Exception as e:  # a damaged shard: say which, never start afresh over it
        path, error = None, " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if path is None:
        fail(f"could not load checkpoint {tag}, named by 'latest' ({error}). HINT: to go back to the previous one, "
             f"write its name (ls {ckpt_dir}) into {latest}")
    return _accept(path, state, run, device)


def _load_dcp_state(ckpt_dir, run, device):
    """FSDP2: the newest whole DCP folder's state.pt (a folder is renamed to its name only once whole)."""
    found = sorted(p for p in glob.glob(os.path.join(ckpt_dir, "epoch_*")) if ".partial" not in p)
    if [p for p in found if not os.path.exists(os.path.join(p, "state.pt"))]:  # never a silent fresh start over them
        fail(f"{ckpt_dir} holds checkpoints that are not DCP folders of {run['script']}. HINT: use a new "
             "--checkpoint-dir for a different script or model")
    for path in reversed(found):
        try:
            state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged newest file: say so and take the previous one, never a silent fresh start
            print0(f"WARNING: cannot load {path} ({type(e).__name__}: {e}); trying the previous checkpoint")
            continue
        return {**_accept(path, state, run, device), "path": path}
    return None


def load_shards(ckpt, state_dicts):
    """FSDP2: this rank's shards of checkpoint `ckpt` (load_checkpoint's) into state_dicts (get_state_dict's)."""
    from torch.distributed import checkpoint as dcp
    try:
        dcp.load(state_dicts, checkpoint_id=ckpt["path"])
    except (Exception, dcp.CheckpointException) as e:  # a damaged shard: never a fresh start over it. DCP's
        why = [f"rank {r}: {type(x).__name__}: {x}" for r, (x, _) in getattr(e, "failures", {}).items()]  # (a
        error = " ".join("; ".join(why or [f"{type(e).__name__}: {e}"]).split())[:300]  # BaseException): each rank's
        fail(f"could not load checkpoint {ckpt['path']} ({error}). HINT: to go back to the previous one, move this one "
             "out of the checkpoint folder")


def _accept(path, state, run, device):
    """Refuse another script's or another run's checkpoint; else put this rank's random state back."""
    if state.get("script") != run["script"]:
        fail(f"{path} was not written by {run['script']} (it is from {state.get('script', 'another script')}). "
             "HINT: use a new --checkpoint-dir for a different script or model")
    check_same_run(path, state.get("run"), run)
    if len(state.get("rng", [])) == WORLD_SIZE:
        _set_rng_state(state["rng"][RANK], device)
    steps = f" and {state['step']} steps of epoch {state['epoch'] + 1}" if state["step"] else ""
    print0(f"resumed from {path}: epoch {state['epoch']} done{steps}, continuing at epoch {state['epoch'] + 1}")
    return state


def check_same_run(path, saved, run):
    """Refuse, in one line naming each difference, a checkpoint that a run with other settings wrote."""
    if saved is None:  # a checkpoint from before runs were recorded
        return
    changed = [f"{key} {saved[key]} -> {value}" for key, value in run.items() if key in saved and saved[key] != value
               and not (key == "git_commit" and None in (saved[key], value))]
    if changed:
        why = (" (each rank's shard of the data, and the global batch, depend on the number of processes)"
               if "world_size" in saved and saved["world_size"] != run.get("world_size") else "")
        fail(f"{path} was written by another run: {', '.join(changed)}{why}. HINT: rerun with the settings it was "
             "written with (--epochs may grow), or use a new --checkpoint-dir")


def replay_first_backward(model, loss, amp_dtype=None):
    """After a resume under DDP: one backward of loss() (a full batch) without an update, buffers kept."""
    # DDP lays out its gradient buckets in the order the first backward pass fills them, and with more than 2 ranks
    # that changes the float summation order: the replay makes a resumed run sum exactly as the uninterrupted one
    saved = [b.clone() for b in model.buffers()]  # BatchNorm statistics
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        value = loss()
    value.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, old in zip(model.buffers(), saved, strict=True):
            b.copy_(old)


def save_checkpoint(ckpt_dir, epoch, step, device, outputs, state, engine=None, shards=None, keep=2):
    """From every rank, at `step` of `epoch` (0: its end): `state` with every rank's random state, atomically (with a
    DeepSpeed `engine`: its shards too; with `shards`, get_state_dict's of FSDP2: them too, by DCP, in a folder)."""
    TIMES.lap("compute")
    name = f"epoch_{epoch - 1:04d}_step_{step:07d}" if step else f"epoch_{epoch:04d}"
    partial = os.path.join(ckpt_dir, f"{name}.partial")  # FSDP2's folder until it is whole
    if shards is not None and RANK == 0:  # what a save killed halfway left (all_gather below: no rank writes yet)
        for old in glob.glob(os.path.join(ckpt_dir, "epoch_*.partial")):
            shutil.rmtree(old, ignore_errors=True)
    state = {**state, "epoch": epoch - 1 if step else epoch, "step": step, "rng": all_gather(_rng_state(device)),
             "tensorboard": outputs.tb_name, "script": state["run"]["script"]}
    if engine is not None:  # DeepSpeed: every rank its shards, in a folder. DeepSpeed's own `latest` would name it
        engine.save_checkpoint(ckpt_dir, tag=name, client_state=state, save_latest=False)  # before all are written
        for path in glob.glob(os.path.join(ckpt_dir, name, "*")):
            _fsync(path)
        dist.barrier()  # every rank's shards are on disk: only now does `latest` name them
        if RANK == 0:
            _write_atomic(os.path.join(ckpt_dir, "latest"), lambda tmp: pathlib.Path(tmp).write_text(name))
    elif shards is not None:  # FSDP2: every rank writes (and fsyncs) its shards, then rank 0 DCP's .metadata
        from torch.distributed import checkpoint as dcp
        dcp.save(shards, checkpoint_id=partial)  # returns once .metadata is written: every rank's files are whole
        if RANK == 0:
            _write_atomic(os.path.join(partial, "state.pt"), lambda tmp: torch.save(state, tmp))
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)  # saved before, by a stopped run
            os.replace(partial, os.path.join(ckpt_dir, name))  # only now does it count
    elif RANK == 0:  # a crash mid-save leaves the previous checkpoint whole
        _write_atomic(os.path.join(ckpt_dir, f"{name}.pt"), lambda tmp: torch.save(state, tmp))
    if RANK == 0:
        folders = engine is not None or shards is not None
        saved = glob.glob(os.path.join(ckpt_dir, "epoch_*" if folders else "epoch_*.pt"))
        for old in sorted(p for p in saved if ".partial" not in p)[:-keep]:
            shutil.rmtree(old, ignore_errors=True) if folders else os.remove(old)
        outputs.flush()  # the curves up to the checkpoint: what a resumed run goes on from
    if WORLD_SIZE > 1:
        dist.barrier()
    TIMES.lap("checkpoint")


def _write_atomic(path, write):
    """write(tmp), a temporary file's path, then fsync and rename: `path` is the old file or the new one, whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _rng_state(device):  # dropout and the like on a GPU draw from its own generator
    cuda = {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
    return {"cpu": torch.get_rng_state(), **cuda}


def _set_rng_state(state, device):
    state = state if isinstance(state, dict) else {"cpu": state}  # a checkpoint from before the GPU's was saved
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _check_writable(ckpt_dir):
    try:  # fail now, with the reason, rather than after the first epoch
        os.makedirs(ckpt_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=ckpt_dir):
            pass
    except OSError as e:
        fail(f"cannot write checkpoints to {os.path.abspath(ckpt_dir)} ({e.strerror}). HINT: choose a --checkpoint-dir "
             "you can write to")


# --- outputs: run names, the metrics file, TensorBoard, the profiler, the done line
def run_name(env=os.environ):
    """What names a run's outputs: ARRAYJOB_TASK in a job array, else the job id, else the start time."""
    if env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env.get('SLURM_ARRAY_JOB_ID')}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or _STARTED  # a requeued job keeps its name


_STARTED = datetime.now().strftime("%Y%m%d-%H%M%S")


class Outputs:
    """Rank 0's metrics-RUN.jsonl, TensorBoard run and --profile; a resumed training continues its TensorBoard run."""

    def __init__(self, args, device, resumed=None, purge_step=1, tensorboard=True):
        self.run_id, self.t_start, self.metrics, self.tb, self.prof = run_name(), time.perf_counter(), None, None, None
        self.tb_name = resumed.get("tensorboard", self.run_id) if resumed else self.run_id
        if RANK == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            self.metrics = open(os.path.join(args.output_dir, f"metrics-{self.run_id}.jsonl"), "a")
            # from purge_step on, TensorBoard drops what an interrupted run wrote: no point shows twice
            self.tb = tensorboard and _summary_writer(os.path.join(args.output_dir, "tensorboard", self.tb_name),
                                                      purge_step)  # Lightning: its own logger
            self.prof = profiler(args, device, self.run_id)

    def step(self):
        """After each training step: the profiler's."""
        if self.prof:
            self.prof.step()

    def scalar(self, tag, value, step):
        """A point of a TensorBoard curve (x: optimizer steps over the whole training)."""
        if self.tb:
            self.tb.add_scalar(tag, value, step)

    def epoch(self, result, step):
        """An epoch's metrics: a JSON line, and its numbers as epoch/ curves at optimizer step `step`."""
        self.write({"event": "epoch", **result})
        for key, value in result.items():
            if key != "epoch" and isinstance(value, float):
                self.scalar(f"epoch/{key}", value, step)
        self.flush()

    def write(self, record):
        """A JSON line of the metrics file."""
        if self.metrics:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def flush(self):
        """The curves so far, to disk."""
        if self.tb:
            self.tb.flush()

    def done(self, model, loader, **result):
        """The run's end: where the time went and the done line, with every rank's weights hash, printed and written."""
        if self.prof:
            self.prof.stop()
        checksums = all_gather(param_checksum(model))  # each rank's own hash: the tests compare them
        time_split = TIMES.report(loader)
        done = {"event": "done", **result, "world_size": WORLD_SIZE, "seconds": time.perf_counter() - self.t_start,
                "param_checksums": checksums, "time_split": time_split}
        print0(json.dumps(done))
        self.write(done)
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()
        return done


def _summary_writer(folder, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported here: the scripts run without tensorboard
    except ImportError:
        print_line("NOTE: tensorboard is not installed (pip install tensorboard): no TensorBoard curves; the metrics "
                   "JSONL file has the same numbers")
        return None
    return SummaryWriter(folder, purge_step=purge_step)


PROFILE_STEPS = {"wait": 5, "warmup": 3, "active": 5}  # steps skipped, traced but dropped (warm-up), traced and kept


def profiler(args, device, name):
    """With --profile, on rank 0: torch.profiler over PROFILE_STEPS, a trace file and a table; else None."""
    if not args.profile or RANK != 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule
    cuda = device.type == "cuda"
    path = os.path.join(args.output_dir, f"profile-{name}.json")  # Perfetto, chrome://tracing, TensorBoard open it

    def report(prof):
        prof.export_chrome_trace(path)
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=8, max_name_column_width=40)
        print_line(f"profile of {PROFILE_STEPS['active']} steps on rank 0, slowest operators first (the trace: {path}, "
                   f"open it in https://ui.perfetto.dev):\n{table}")

    os.makedirs(args.output_dir, exist_ok=True)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(**PROFILE_STEPS, repeat=1), on_trace_ready=report)
    prof.start()
    return prof


# --- Lightning: the same plumbing as callbacks -------------------------------
def lightning_callbacks(args):
    """[StopOnSignal, TimeLaps]: stop_check and TIMES's laps at Lightning's hooks."""
    import pytorch_lightning as pl

    class StopOnSignal(pl.Callback):
        """stop_check before the first batch, every STOP_CHECK_EVERY batches and at each later epoch's start (after
        ModelCheckpoint's last.ckpt). Lightning's own handlers would save inside the handler with a collective, or
        end on SIGTERM without saving: ours replace them once training starts."""

        def on_train_start(self, trainer, pl_module):
            for signum in STOP_SIGNALS:  # Lightning installed its handlers just before this hook
                signal.signal(signum, _on_stop_signal)
            # Lightning 2.x broadcasts its SIGTERM flag before every batch (a collective and a host sync per step).
            # With our handlers that flag stays 0: the broadcast goes, where it is the one we read (2.x)
            loop = trainer.fit_loop.epoch_loop
            if pl.__version__.startswith("2.") and hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda: None
            self.check(trainer, pl_module, 0, 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % STOP_CHECK_EVERY == 0 and batch_idx + 1 < trainer.num_training_batches:
                self.check(trainer, pl_module, trainer.current_epoch + 1, batch_idx + 1)

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch > 0:
                self.check(trainer, pl_module, trainer.current_epoch, 0)

        def check(self, trainer, pl_module, epoch, step):
            def checkpoint(epoch, step):  # a mid-epoch last.ckpt: rank 0 writes, the others wait
                TIMES.lap("compute")
                pl_module.stop_step = step
                trainer.save_checkpoint(os.path.join(args.checkpoint_dir, "last.ckpt"))
                pl_module.stop_step = 0
                TIMES.lap("checkpoint")

            stop_check(pl_module.device, args.checkpoint_dir and checkpoint, epoch, step)

    class TimeLaps(pl.Callback):
        """The gap before a batch is the wait for it, validation the evaluation, and what follows an epoch's end
        ModelCheckpoint's save. After StopOnSignal: its all-reduce after a batch counts with the step."""

    between = "checkpoint" if args.checkpoint_dir else "compute"  # between one epoch's end and the next
    for hook, part in {"on_train_start": "startup", "on_train_epoch_start": between, "on_train_batch_start": "data",
                       "on_train_batch_end": "compute", "on_validation_start": "compute", "on_validation_end": "eval",
                       "on_train_epoch_end": "compute", "on_train_end": between}.items():
        setattr(TimeLaps, hook, lambda self, *_, part=part, **__: TIMES.lap(part))
    return [StopOnSignal(), TimeLaps()]


# --- DeepSpeed: its accelerator and its config -------------------------------
def deepspeed_accelerator(argv=None, env=os.environ):
    """Before `import deepspeed`, which picks its accelerator: the CPU's where there is no GPU or --device cpu."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device")
    if p.parse_known_args(argv)[0].device == "cpu" or not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_config(args, default, amp_dtype):
    """--deepspeed_config's file (else `default`) with --batch-size, --zero-stage and --amp, checked by DeepSpeed."""
    import deepspeed
    config = copy.deepcopy(default)  # edited below
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            fail(f"cannot read the DeepSpeed config {args.deepspeed_config}: {e}. HINT: start from ds_config.json")
    if args.batch_size:  # DeepSpeed derives the global batch: micro batch x accumulation x world size
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config.pop("train_batch_size", None)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if amp_dtype and not {"fp16", "bf16", "bfloat16"} & set(config):  # bf16 needs no overflow check (an all-reduce
        config["bf16" if amp_dtype == torch.bfloat16 else "fp16"] = {  # and a host sync per step)
            "enabled": True, **({"check_grad_overflow": False} if amp_dtype == torch.bfloat16 else {})}
    try:  # the batch sizes against the world size, and the rest
        deepspeed.DeepSpeedConfig(config)
    except (AssertionError, ValueError, KeyError) as e:
        hint = " HINT: set train_micro_batch_size_per_gpu, not train_batch_size: the global batch follows world size"
        fail(f"DeepSpeed rejected the config {args.deepspeed_config or '(built-in)'}: {type(e).__name__}: "
             f"{' '.join(str(e).split())}.{hint * ('batch' in str(e))}")
    return config
