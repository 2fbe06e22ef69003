"""Weights & Biases, optional: on with --wandb or WANDB_PROJECT set, and then only on rank 0 (docs/outputs.md).

The W&B run's id is the run's stored name (the one its TensorBoard folder has, kept in its checkpoints), so every
requeue and every resume by hand continues the same W&B run. Steps are the global optimizer step. A resumed run
replays, bit-exactly, the steps after its checkpoint that the interrupted run may have logged already: the last step
logged is kept beside the offline runs (wandb/ID.last-step), and the resumed run logs only after it.

Where it logs: WANDB_MODE decides where it is set. Where it is not, rank 0 asks the W&B server (WANDB_BASE_URL, by
default https://api.wandb.ai) for an answer within PROBE_SECONDS and logs offline when none comes, saying so in one
line: compute nodes are often offline, and wandb.init would wait there. `wandb sync DIR` on the login node uploads.
"""
import os
import urllib.error
import urllib.request

from . import launch

PROBE_SECONDS = 5.0
DEFAULT_URL = "https://api.wandb.ai"


def wanted(args, env=os.environ):
    """Is W&B asked for: --wandb, or WANDB_PROJECT set."""
    return bool(getattr(args, "wandb", False) or env.get("WANDB_PROJECT"))


def server_answers(url, seconds=PROBE_SECONDS):
    """Does the W&B server at `url` answer an HTTP request within `seconds` (any status counts)?"""
    try:
        urllib.request.urlopen(url, timeout=seconds).close()
    except urllib.error.HTTPError:  # it answered, with an error status: it is there
        return True
    except (OSError, ValueError):  # refused, unreachable, no name, timed out
        return False
    return True


def mode(env=os.environ):
    """"online" or "offline", and the line that says why where it is not what WANDB_MODE asked for (else None)."""
    asked, url = env.get("WANDB_MODE"), env.get("WANDB_BASE_URL", DEFAULT_URL)
    if asked and asked != "online":
        return "offline" if asked in ("offline", "dryrun") else asked, None
    if server_answers(url):
        return "online", None
    why = f"the W&B server {url} did not answer within {PROBE_SECONDS:g} s"
    if asked == "online":
        return "offline", f"WARNING: WANDB_MODE=online, but {why}: W&B logs offline instead (nothing is lost)"
    return "offline", f"W&B: {why} (a compute node without network?): logging offline"


class WandB:
    """Rank 0's W&B run (None elsewhere): wandb imported and started only here."""

    def __init__(self, args, config, run_id):
        self.run, self.dir = None, os.path.join(args.output_dir, "wandb")
        self.last_file = os.path.join(self.dir, f"{run_id}.last-step")
        self.seen = _read_step(self.last_file)  # the last step a previous segment of this run logged
        where, line = mode()
        import wandb  # only now: nothing is imported where W&B is off
        os.makedirs(self.dir, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT") or os.path.splitext(config.get("script", "training"))[0]
        self.run = wandb.init(project=project, id=run_id, resume="allow", mode=where, dir=args.output_dir,
                              config=config, settings=wandb.Settings(init_timeout=90, silent=True, console="off"))
        if line:
            launch.print_line(line)
        if where == "offline":
            launch.print_line(f"W&B: offline run {run_id} in {self.dir}; to upload it, on the login node: wandb sync "
                              f"{os.path.join(self.dir, 'offline-run-*-' + run_id)}")
        self.last = self.seen

    def log(self, values, step):
        """`values` at global step `step`, unless a previous segment of this run logged that step already."""
        if step <= self.seen:
            return
        self.run.log(values, step=step)
        if step > self.last:
            self.last = step
            with open(self.last_file + ".tmp", "w") as f:
                f.write(f"{step}\n")
            os.replace(self.last_file + ".tmp", self.last_file)

    def finish(self, summary):
        """The run's end: `summary` (the efficiency figures) in its summary."""
        self.run.summary.update(summary)
        self.run.finish()


def _read_step(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0
