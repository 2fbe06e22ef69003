"""
The plumbing every training script here shares: launch, devices, the process group, stopping and requeueing, data
that resumes exactly, checkpoint files, outputs, hang evidence. Each script keeps its own story and calls this package
by name (cluster.stop_check(...)), so every line that calls it is one to keep. Copy the cluster/ folder beside your
script; it imports the standard library and torch (tensorboard, Lightning and DeepSpeed only inside the functions
that use them). One file per concern: options.py, launch.py (who this process is, its device, the group, how ranks
speak), stopping.py, data.py, tokens.py (token shards: gpt_fsdp.py), checkpoints.py, outputs.py, efficiency.py,
tracking.py (W&B), hangs.py, adapters.py (Lightning, DeepSpeed).

A script calls, in this order:
    parse_args(parser)                 its options, the shared ones (--checkpoint-dir, --init-from ...), a sweep line
    process_group(args)                a with-block: who this process is, its device, the process group, teardown
    print0(message), fail(message)     rank 0 speaks; one ERROR line, then exit 1 on every rank
    all_ranks_ok(ok, device), all_sum(tensor), all_gather(obj)   agree on a flag; sums; every rank's object
    autocast_dtype(device, amp)        --amp: bfloat16 where the GPU computes it natively, else float16; else None
    DataLoader(dataset, batch_size, seed)   a Dataset of your own: this rank's share, exact on resume, signal-safe
    init_weights(args, model)          --init-from: another run's weights, for a new run
    run_record(args, **facts)          what defines this run: a checkpoint of another is refused
    load_checkpoint(dir, run, device)  the newest checkpoint of this run, or None: start afresh
    load_shards(ckpt, state_dicts)     FSDP2: this rank's shards of that checkpoint (DCP)
    replay_first_backward(model, loss) after a DDP resume: gradient buckets laid out as in the first run
    train_flops(model, sample_shape)   a training step's FLOPs per sample (torch's counter): for the efficiency line
    Outputs(args, device, resumed, run=, flops=)   rank 0's metrics file (its config record first), TensorBoard run
                                       and hparams, W&B (--wandb), profiler, final weights, the efficiency line and
                                       the done line
    TIMES.lap(part)                    where the time went (optional): start-up, data wait, compute, evaluation, ...
    stop_check(device, checkpoint, epoch, step)   on a signal or near the end: checkpoint, requeue, exit 75; and a
                                       mid-epoch checkpoint every --checkpoint-every minutes
    save_checkpoint(dir, epoch, step, device, outputs, state)   atomic, with every rank's random state
    param_checksum(model)              a hash of the weights: equal on every rank iff the replicas are
Lightning's script also calls started(), check_same_run(), lightning_callbacks() and lightning_wandb(); DeepSpeed's
deepspeed_accelerator() (before its import) and deepspeed_config().
A hang leaves evidence (process_group's watcher thread): a collective that timed out is named in one line and the
other ranks hear of it, a rank without progress then prints every thread's stack; SIGURG asks every rank for its stacks.
"""
from . import checkpoints, data, efficiency, hangs, launch, options, outputs, stopping, tokens, tracking
from .adapters import deepspeed_accelerator, deepspeed_config, lightning_callbacks, lightning_wandb
from .checkpoints import (check_same_run, init_weights, load_checkpoint, load_shards, plain, replay_first_backward,
                          run_record, save_checkpoint)
from .data import DataLoader
from .efficiency import train_flops
from .launch import (CLOSE_FIRST, all_gather, all_ranks_ok, all_sum, autocast_dtype, fail, first_host, gpu_index,
                     launch_env, print0, print_line, process_group, started, unusable_gpus)
from .options import MAY_CHANGE, parse_args, positive_int
from .outputs import TIMES, Outputs, TimeSplit, param_checksum, run_name
from .stopping import EXIT_RESUMABLE, STOP_CHECK_EVERY, ignore_stop_signals, job_end_time, slurm_seconds, stop_check

__all__ = ["checkpoints", "data", "efficiency", "hangs", "launch", "options", "outputs", "stopping", "tokens",
           "tracking", "deepspeed_accelerator", "deepspeed_config", "lightning_callbacks", "lightning_wandb",
           "check_same_run", "init_weights", "load_checkpoint", "load_shards", "plain", "replay_first_backward",
           "run_record", "save_checkpoint", "DataLoader", "train_flops", "CLOSE_FIRST", "all_gather", "all_ranks_ok",
           "all_sum", "autocast_dtype", "fail", "first_host", "gpu_index", "launch_env", "print0", "print_line",
           "process_group", "started", "unusable_gpus", "MAY_CHANGE", "parse_args", "positive_int", "TIMES", "Outputs",
           "TimeSplit", "param_checksum", "run_name", "EXIT_RESUMABLE", "STOP_CHECK_EVERY", "ignore_stop_signals",
           "job_end_time", "slurm_seconds", "stop_check", "RANK", "LOCAL_RANK", "WORLD_SIZE"]


def __getattr__(name):
    """cluster.RANK, cluster.LOCAL_RANK, cluster.WORLD_SIZE: who this process is, as process_group() found it."""
    if name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        return getattr(launch, name)
    raise AttributeError(f"module 'cluster' has no attribute '{name}'")
