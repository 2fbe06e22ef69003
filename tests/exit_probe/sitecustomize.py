"""Loaded by every Python process the tests start (conftest puts this folder on PYTHONPATH). In a run of one of the
training scripts it names, at exit, after the script's own code and its atexit handlers, the native threads still
running that their library named (torch's pt_*, gloo's): Python's own threads and unnamed ones (which carry the
process's name, as MPI's progress thread does: MPI_Finalize ends it after Python's shutdown) and autograd's device
threads (pt_autograd_N, which live as long as the process) aside.

A process group that outlives the script (something still holds it after destroy_process_group) keeps gloo's and
the TCPStore's threads running into interpreter shutdown, where tearing them down now and then aborts a run that
finished ("terminate called without an active exception", exit code -6). A test that asserts this line is absent
finds that on every run, not once in a few dozen.

With COLLECTIVE_PROBE=1 it also counts the calls, from any library, of torch.distributed's broadcast, all_reduce and
barrier, and prints them at exit as a JSON line: a collective per training step shows as a count of at least the
steps.

With WANDB_PROBE=1 it says at exit whether the process imported wandb.

With HANG_AT_STEP=N (HANG_RANK, default 1; HANG_WHEN=FILE) one rank of a training script gets stuck: see hang_at."""
import atexit
import json
import os
import sys
import threading
from collections import Counter

PROBE_LINE = "EXIT PROBE: native threads alive at exit:"
COLLECTIVES_LINE = "COLLECTIVE PROBE:"
# the training scripts: the .py files beside tests/ (a test may run a copy of one from elsewhere)
SCRIPTS = {name for name in os.listdir(os.path.join(os.path.dirname(__file__), "..", "..")) if name.endswith(".py")}


def say(line):
    """One write per line: the ranks of a run may share one pipe, and print() writes the text and its newline apart."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def native_threads_left():
    python_threads = {str(t.native_id) for t in threading.enumerate()}  # the main thread among them
    with open("/proc/self/comm") as f:
        unnamed = f.read().strip()
    names = []
    for tid in os.listdir("/proc/self/task"):
        if tid in python_threads:
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # it ended meanwhile
            continue
        if name != unnamed and not name.startswith("pt_autograd_"):  # every GPU run has them; FSDP2's backward
            names.append(name)  # starts them on the CPU too
    if names:
        say(f"{PROBE_LINE} {', '.join(sorted(names))}")


def count_collectives():
    import torch.distributed as dist
    calls = Counter()

    def counted(name, collective):
        def call(*args, **kwargs):
            calls[name] += 1
            return collective(*args, **kwargs)
        return call

    for name in ("broadcast", "all_reduce", "barrier"):  # looked up by name at each call: Lightning's, ours
        setattr(dist, name, counted(name, getattr(dist, name)))
    atexit.register(lambda: say(f"{COLLECTIVES_LINE} {json.dumps({'rank': os.environ.get('RANK'), **calls})}"))


if os.path.isdir("/proc/self/task") and sys.argv and os.path.basename(sys.argv[0]) in SCRIPTS:
    atexit.register(native_threads_left)
    if os.environ.get("COLLECTIVE_PROBE"):
        count_collectives()
    if os.environ.get("WANDB_PROBE"):  # did this process import wandb (only rank 0 may)
        atexit.register(lambda: say(f"WANDB PROBE: wandb imported: {'yes' if 'wandb' in sys.modules else 'no'}"))


def hang_at(step, when=None):
    """A stuck rank, as one blocked in I/O or a deadlock would be: its optimizer's step `step` (with `when`, a file:
    its first step from `step` on once the file exists) never returns, and it stays alive in Python code."""
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    calls = [0]

    def stuck(*_):
        calls[0] += 1
        if calls[0] >= step and (when is None or os.path.exists(when)):
            while True:
                time.sleep(0.05)
    register_optimizer_step_pre_hook(stuck)


if os.environ.get("HANG_AT_STEP") and os.environ.get("RANK", os.environ.get("SLURM_PROCID")) == os.environ.get(
        "HANG_RANK", "1") and sys.argv and os.path.basename(sys.argv[0]) in SCRIPTS:
    hang_at(int(os.environ["HANG_AT_STEP"]), os.environ.get("HANG_WHEN"))
