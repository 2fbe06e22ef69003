"""Who this process is (its rank, from torchrun, srun or mpirun), its device, the process group, and how the ranks
speak (rank 0 prints, an error is one line) and agree (a flag, a sum, every rank's object)."""
import contextlib
import gc
import json
import os
import re
import socket
import sys
import time
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
# before any process group exists: imported later (DDP does), its functions' default arguments keep the default group,
# and gloo's threads with it, alive into interpreter shutdown, which now and then aborts a finished run
import torch.distributed.nn  # noqa: F401

from . import hangs, stopping

RANK, LOCAL_RANK, WORLD_SIZE = 0, 0, 1  # who this process is: set by process_group()
TF32 = None  # on a GPU: are float32 matmuls and convolutions computed in TF32 (tf32())

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
    tf32(getattr(args, "tf32", True))
    return device


def tf32(on):
    """float32 matmuls and convolutions in TF32 on GPUs that have it (Ampere and newer: tensor cores, 10 bits of
    mantissa), or in full float32; the start-up line says which."""
    global TF32
    torch.set_float32_matmul_precision("high" if on else "highest")  # torch's default for matmuls: "highest"
    torch.backends.cudnn.allow_tf32 = on  # cuDNN's default for convolutions: TF32
    TF32 = on


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
    stopping.install_handlers()  # first: Lightning then adds no SIGUSR1 requeue of its own
    unwatch = hangs.watch()
    try:
        device = _pick_device(args)
        if device.type == "cuda":
            hangs.flight_recorder(args.output_dir)
        if group and (WORLD_SIZE > 1 or deepspeed or group == "always"):
            if WORLD_SIZE == 1 and not addr and "RANK" not in os.environ:  # python alone (torchrun with one process
                addr, port = "127.0.0.1", str(_free_port())  # has set RANK and its own store's MASTER_PORT: keep them)
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
                and hangs.timed_out(e, args.dist_timeout):  # one line naming the collective, and this rank's stacks
            raise SystemExit(1) from None  # its stacks are in the log: not the traceback a second time
        if isinstance(e, dist.DistNetworkError | dist.DistStoreError) and not group and not dist.is_initialized():
            _init_failed(e, args.dist_timeout)  # Lightning could not form its group
        if not isinstance(e, SystemExit | KeyboardInterrupt):
            error_file(f"{type(e).__name__}: {e}", traceback.format_exc())  # torchrun's summary shows it
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
    except RuntimeError as e:  # torch < 2.7: the TCPStore's refusal to listen is a plain RuntimeError
        if "EADDRINUSE" not in str(e):
            raise
        _init_failed(e, seconds)
    global RANK, WORLD_SIZE
    RANK, WORLD_SIZE = dist.get_rank(), dist.get_world_size()  # MPI discovery may have filled them in


def started(rank, local_rank, world_size, device):
    """Who this process is, and exactly one start-up line per rank (Lightning's script calls it once in the group)."""
    global RANK, LOCAL_RANK, WORLD_SIZE
    RANK, LOCAL_RANK, WORLD_SIZE = rank, local_rank, world_size
    if RANK != 0:
        warnings.filterwarnings("ignore")
    fp32 = {True: ", float32 as TF32", False: ", float32 in full"}.get(TF32, "") if device.type == "cuda" else ""
    print_line(f"[rank {RANK}/{WORLD_SIZE}] local_rank {LOCAL_RANK} host {socket.gethostname()} device {device}{fp32}")


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
    hangs.WATCH["stopping"] = True  # a deliberate exit: no stacks when the launcher ends the ranks still waiting
    if RANK == 0 if speak is None else speak:
        print_line(f"ERROR: {message}", sys.stderr)
    error_file(f"ERROR: {message}")
    if RANK != 0:  # let the rank that speaks print first: torchrun and srun end every rank once one fails
        time.sleep(3)
    raise SystemExit(1)


def error_file(message, callstack=None):
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
