"""Stopping and requeueing. Slurm sends SIGUSR1 before the time limit (the job scripts ask for it with --signal;
submitit asks for SIGUSR2) and SIGTERM when it cancels or preempts. The handler only notes the signal; stop_check, at
step boundaries, makes all ranks agree, rank 0 checkpoints mid-epoch and requeues the job (not on SIGTERM), and every
rank exits 75. Without a signal, rank 0 stops the same way when the job's end is near (NEAR_END). MAX_REQUEUES
(default 20) bounds requeues, and a run with no checkpoint to resume from is not requeued (it would start afresh). The
same check writes a mid-epoch checkpoint every --checkpoint-every minutes, so that a crash loses at most that."""
import contextlib
import os
import re
import signal
import subprocess
import time

import torch
import torch.distributed as dist

from . import checkpoints, hangs, launch, outputs

STOP_SIGNALS = {signal.SIGUSR1: "SIGUSR1", signal.SIGUSR2: "SIGUSR2", signal.SIGTERM: "SIGTERM"}
NEAR_END = 1           # not a signal we handle: the ranks' agreed "stop" when rank 0 finds the end time near
STOP_CHECK_EVERY = 10  # steps between the (tiny) all-reduces that agree on stopping
EXIT_RESUMABLE = 75    # "try again": stopped with a checkpoint; run the same command to resume
STOP_MARGIN = 60       # default seconds before the time limit to stop at ($STOP_MARGIN)
CHECKPOINT_EVERY = 0   # seconds between mid-epoch checkpoints (0: none); options.parse_args sets it
RESUME_HINT = ""       # how to resume by hand, where the checkpoint folder is the job's own (options.parse_args)
received_signals = []
stop_clock = {}        # rank 0: the job's end time, the margin, the last check's time, the longest gap between checks


def _on_stop_signal(signum, frame):
    received_signals.append(signum)


def install_handlers():
    """Note the stop signals from now on (process_group installs them first; Lightning's callback once more)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def ignore_stop_signals(*_):
    """worker_init_fn: DataLoader workers ignore the stop signals, which Slurm sends to every process of the step."""
    for signum in [*STOP_SIGNALS, hangs.DUMP_SIGNAL]:  # torch's worker dies of a SIGTERM its parent did not send,
        signal.signal(signum, signal.SIG_IGN)            # and takes the rank with it


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
            launch.print0(f"NOTE: this job's time limit, {limit} s, leaves little room past the default STOP_MARGIN "
                          f"of {margin:g} s: each run stops {limit / 4:g} s (a quarter of the limit) before its end "
                          "instead. HINT: ask for a longer --time, or set STOP_MARGIN to the seconds a checkpoint "
                          "needs")
            margin = limit / 4
        else:
            launch.print0(f"NOTE: STOP_MARGIN={margin:g} s leaves little of this job's time limit ({limit} s): each "
                          "run stops that long before its end. HINT: ask for a longer --time, or lower STOP_MARGIN")
    now = time.time()
    stop_clock.update(end=end, margin=margin, last=now, gap=0.0, saved=now)


def _near_end():
    """Is the end nearer than the margin plus the longest gap yet between two checks (the next may come too late)?"""
    now = time.time()
    stop_clock["gap"], stop_clock["last"] = max(stop_clock["gap"], now - stop_clock["last"]), now
    if stop_clock["end"] is None:
        return False
    stop_clock["left"] = stop_clock["end"] - now
    return stop_clock["left"] < stop_clock["margin"] + stop_clock["gap"]


def saved():
    """A checkpoint was just written: the next time-based one is due --checkpoint-every minutes from now."""
    if stop_clock:  # rank 0's
        stop_clock["saved"] = time.time()


def stop_check(device, checkpoint, epoch, step):
    """At the same steps on every rank (epoch 0: before the first, signals only): on a stop signal, or near the end,
    checkpoint(epoch, step) (step 0: the epoch's end, already saved), requeue, and exit EXIT_RESUMABLE. Mid-epoch,
    also checkpoint(epoch, step) every --checkpoint-every minutes, and train on."""
    if launch.RANK == 0 and not stop_clock:
        _start_stop_clock()
    hangs.progress(armed=True)  # training has begun
    near = epoch > 0 and launch.RANK == 0 and _near_end()
    due = bool(checkpoint and step and CHECKPOINT_EVERY and launch.RANK == 0
               and time.time() - stop_clock["saved"] >= CHECKPOINT_EVERY)
    flags = torch.tensor([max(received_signals + [NEAR_END if near else 0]), int(due)], device=device)
    if launch.WORLD_SIZE > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # the same answer on every rank
    signum, due = flags.tolist()  # one host sync, every STOP_CHECK_EVERY steps
    if checkpoint and epoch and not step:  # the epoch's end, which the script has just saved
        saved()
    if not signum:
        if due:  # rank 0's clock decided, every rank saves
            checkpoint(epoch, step)
            saved()
            launch.print0(f"checkpoint at epoch {epoch} step {step} (every {CHECKPOINT_EVERY / 60:g} min, "
                          "--checkpoint-every)")
        return
    hangs.WATCH["stopping"] = True  # the stop is under way: no stall to report after a SIGTERM
    if checkpoint and step:
        checkpoint(epoch, step)
    resumable = checkpoints.LOADED_OR_SAVED or (checkpoint and epoch)  # epoch's end: the script has saved it
    where = f"epoch {epoch} step {step}" if step else f"the end of epoch {epoch}"
    message = ("nothing trained yet in this run" if not epoch else f"checkpoint at {where}" if checkpoint
               else "no --checkpoint-dir, nothing saved")
    if launch.RANK == 0 and signum != signal.SIGTERM:  # SIGTERM: cancelled or preempted, Slurm decides
        message += (_requeue(epoch, signum) if resumable or not os.environ.get("SLURM_JOB_ID") else
                    "; not requeued: there is no checkpoint to resume from, and a requeued job would start afresh")
    cause = (f"on {STOP_SIGNALS[signum]}" if signum in STOP_SIGNALS
             else f"{stop_clock.get('left', 0):.0f} s before the time limit, with no signal")
    outputs.TIMES.lap("compute")
    launch.print0(f"stopped {cause}: {message}")
    launch.print0(outputs.TIMES.words())  # this run's: each requeued run of a long job has its own
    launch.all_ranks_ok(True, device)  # the others wait for the requeue: an early exit could make the launcher end 0
    for signum in STOP_SIGNALS:  # from here a SIGTERM (srun --kill-on-bad-exit ending the other tasks once one has
        signal.signal(signum, signal.SIG_IGN)  # exited 75) must not turn an exit 75 into a death by signal (143)
    raise SystemExit(EXIT_RESUMABLE)


def _requeue(epoch, signum, env=os.environ):
    """Rank 0 puts the job back in the queue, or asks the job script to (REQUEUE_REQUEST); what it did, in words."""
    job_id, restarts = env.get("SLURM_JOB_ID"), int(env.get("SLURM_RESTART_COUNT") or 0)
    cap, resubmit = int(env.get("MAX_REQUEUES") or 20), f". Resubmit the same command{RESUME_HINT} to resume"
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
