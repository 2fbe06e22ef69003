"""torchrun that survives Slurm's time-limit warning and hands it to its workers.

The wrappers ask Slurm for SIGUSR1 before the time limit (#SBATCH --signal=USR1@120). Slurm sends it to every process
of the job step: torchrun's agent as well as the training processes it started. SIGUSR1's default action is to
terminate, and torchrun installs no handler for it, so the agent would die and take its workers down before they
could write a checkpoint. Here the agent passes SIGUSR1 on to its children instead (they may get it twice, which is
harmless: their handler only sets a flag), and otherwise runs torchrun unchanged:

    python slurm/torchrun.py --nnodes=2 --nproc_per_node=4 ... SCRIPT.py [ARGS...]
"""
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def forward_to_children(signum, frame):
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]  # field 4, after the "(command name)"
            if parent == me:
                os.kill(int(pid), signum)
        except (OSError, IndexError):
            continue  # the process ended meanwhile


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, forward_to_children)
    try:
        main()
    except SignalException as e:  # SIGTERM (scancel, requeue, time limit): torchrun has passed it on; no traceback
        print(f"torchrun: stopped by {e.sigval.name}; its workers were told to stop", file=sys.stderr)
        sys.exit(128 + e.sigval)
