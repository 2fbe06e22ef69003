"""The command line: the options every script shares, beside its own, and a job array's line of a sweep file."""
import argparse
import os
import shlex
import sys

from . import launch, outputs, stopping

# The options that may differ between the runs of one training (a requeue, a resume by hand): where the outputs go, how
# often they come, how fast it runs. Every other option defines the run: checkpoints.run_record keeps it, and a
# checkpoint written with another value is refused. A script adds its own with run_record(args, may_change=...).
MAY_CHANGE = {"epochs", "output_dir", "checkpoint_dir", "checkpoint_every", "log_interval", "profile", "dist_timeout",
              "device", "data_dir", "download_only", "init_from", "allow_commit_change", "test_batch_size", "compile",
              "workers", "local_dir", "stage_only", "stage_timeout", "from_tar", "deepspeed", "deepspeed_config",
              "local_rank", "gpus", "nodes", "wandb"}
CHECKPOINT_EVERY = 30  # minutes between mid-epoch checkpoints where checkpoints are on: a crash loses at most this


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
    p.add_argument("--output-dir", default="./out",
                   help="metrics file, tensorboard/RUN and the final weights go here (default: ./out)")
    p.add_argument("--checkpoint-dir", default=env.get("CHECKPOINT_DIR"),
                   help="save and resume from the latest checkpoint here; 'none': no checkpoints (default: "
                        "$CHECKPOINT_DIR, else in a Slurm job checkpoints/JOBID, which its requeues find again, "
                        "else none)")
    p.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_EVERY, metavar="MINUTES",
                   help="also checkpoint mid-epoch every MINUTES, so that a crash loses at most that; 0: at epoch ends "
                        f"and stop signals only (default: {CHECKPOINT_EVERY})")
    p.add_argument("--init-from", metavar="PATH",
                   help="start a new run from the weights in PATH (a run's final model-RUN.pt, or a checkpoint): a "
                        "fresh optimizer, epoch 1, the options given now (default: random weights)")
    p.add_argument("--allow-commit-change", action="store_true",
                   help="resume a checkpoint that another git commit (GIT_COMMIT, set by safe-sbatch.sh) wrote, e.g. "
                        "after a bug fix (default: refused)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a GPU if there is one (default: auto)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU from Ampere on, float32 matmuls and convolutions on tensor cores in TF32 (10 bits of "
                        "mantissa, many times faster); --no-tf32: full float32 (default: on)")
    p.add_argument("--wandb", action="store_true",
                   help="log to Weights & Biases from rank 0 (pip install -r requirements-wandb.txt), offline where "
                        "its server does not answer; WANDB_PROJECT set turns it on too (default: off)")
    p.add_argument("--profile", action="store_true",
                   help="trace 5 training steps on rank 0 with torch.profiler (after 8 to warm up): a table of the "
                        "slowest operators and a trace file for Perfetto or TensorBoard (default: off)")
    p.add_argument("--dist-timeout", type=positive_int, default=600,
                   help="seconds the ranks wait for each other, at start and in every collective (default: 600)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv) + _sweep_line(env))
    if args.checkpoint_every < 0:
        p.error(f"argument --checkpoint-every: must be 0 or more minutes, got {args.checkpoint_every:g}")
    stopping.RESUME_HINT = ""
    if args.checkpoint_dir is not None and args.checkpoint_dir.lower() in ("", "none"):
        args.checkpoint_dir = None
    elif args.checkpoint_dir and env.get("SLURM_ARRAY_TASK_ID"):  # the tasks share their command line, but none may
        args.checkpoint_dir = os.path.join(args.checkpoint_dir, outputs.run_name(env))  # resume another's checkpoints
    elif args.checkpoint_dir is None and env.get("SLURM_JOB_ID"):  # a requeue would otherwise start from scratch
        args.checkpoint_dir = os.path.join("checkpoints", outputs.run_name(env))
        stopping.RESUME_HINT = f" with --checkpoint-dir={os.path.abspath(args.checkpoint_dir)}"  # a new job: a new id
    stopping.CHECKPOINT_EVERY = args.checkpoint_every * 60 if args.checkpoint_dir else 0
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
            launch.print_line(f"ERROR: {e}", sys.stderr)
        raise SystemExit(2) from None
    if speak:
        launch.print_line(f"== sweep {sweep}, task {task} of {len(lines)} (array job {env.get('SLURM_ARRAY_JOB_ID')}): "
                          f"{' '.join(words)} ==")
    return words
