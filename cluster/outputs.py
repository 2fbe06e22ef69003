"""What a run leaves: where the time went (TIMES), rank 0's metrics file and TensorBoard run, the profiler's trace, and
at the end the done line and the final weights, a plain state_dict that torch.load(weights_only=True) reads."""
import hashlib
import json
import os
import sys
import time
from datetime import datetime

import torch

from . import checkpoints, efficiency, hangs, launch, tracking

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
        hangs.progress()

    def words(self):
        total = sum(self.seconds.values())
        return f"time on rank 0, {total:.1f} s: " + ", ".join(
            f"{TIME_PARTS[part]} {100 * s / total:.0f}%" for part, s in self.seconds.items() if s)

    def report(self, loader):
        """Rank 0's split in words (and a HINT naming `loader` when a rank waited for data); in seconds, returned."""
        launch.print0(self.words())
        waits = launch.all_gather(self.seconds["data"] / max(self.seconds["data"] + self.seconds["compute"], 1e-9))
        worst = max(range(len(waits)), key=waits.__getitem__)
        if waits[worst] > DATA_WAIT_HINT:
            usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            launch.print0(f"HINT: rank {worst} waited for data {100 * waits[worst]:.0f}% of its training steps' time: "
                          f"the input, not the model, sets the pace. Make batches in more DataLoader worker processes "
                          f"(--workers; now {loader}), up to the CPUs per task (SLURM_CPUS_PER_TASK="
                          f"{os.environ.get('SLURM_CPUS_PER_TASK', 'unset')}, {usable} usable here; sbatch "
                          "--cpus-per-task)")
        return {part: round(s, 4) for part, s in self.seconds.items()}


TIMES = TimeSplit()


# --- outputs: run names, the metrics file, TensorBoard, the profiler, the done line
def run_name(env=os.environ):
    """What names a run's outputs: ARRAYJOB_TASK in a job array, else the job id, else the start time."""
    if env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env.get('SLURM_ARRAY_JOB_ID')}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or _STARTED  # a requeued job keeps its name


_STARTED = datetime.now().strftime("%Y%m%d-%H%M%S")


class Outputs:
    """Rank 0's metrics-RUN.jsonl, TensorBoard run and --profile; a resumed training continues its TensorBoard run."""

    def __init__(self, args, device, resumed=None, purge_step=1, curves=True, *, run, flops, per="sample"):
        """`run`: the run record (run_record's); `flops`: one training step's FLOPs per sample (train_flops'), or per
        token with per="token"; curves=False: the framework's own loggers draw the curves (Lightning's TensorBoard and
        W&B loggers)."""
        self.run_id, self.t_start, self.metrics, self.tb, self.prof = run_name(), time.perf_counter(), None, None, None
        self.wandb = None
        self.output_dir, self.device, self.flops, self.per = args.output_dir, device, flops, per
        self.tb_name = resumed.get("tensorboard", self.run_id) if resumed else self.run_id
        self.config = settings(args, run)
        precision = str(self.config.get("precision", ""))
        self.precision = "16-bit" if "16" in precision else "tf32" if device.type == "cuda" and launch.TF32 else "fp32"
        self.gpu_use = efficiency.GpuUse(device).start()
        if launch.RANK == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            self.metrics = open(os.path.join(args.output_dir, f"metrics-{self.run_id}.jsonl"), "a")
            self.write({"event": "config", **self.config})  # each requeue and resume too: what it ran with
            # from purge_step on, TensorBoard drops what an interrupted run wrote: no point shows twice
            self.tb = curves and _summary_writer(os.path.join(args.output_dir, "tensorboard", self.tb_name),
                                                      purge_step)  # Lightning: its own logger
            if self.tb:
                write_hparams(self.tb, self.config)
            # W&B (--wandb or WANDB_PROJECT): the same run as the TensorBoard folder's, across requeues and resumes
            self.wandb = tracking.WandB(args, self.config, self.tb_name) if curves and tracking.wanted(args) else None
            self.prof = profiler(args, device, self.run_id)

    def step(self):
        """After each training step: the profiler's."""
        if self.prof:
            self.prof.step()

    def scalar(self, tag, value, step):
        """A point of a TensorBoard curve, and of W&B's (x: optimizer steps over the whole training)."""
        if self.tb:
            self.tb.add_scalar(tag, value, step)
        if self.wandb:
            self.wandb.log({tag: value}, step)

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
        """The run's end: rank 0 writes the final weights (FSDP2's gathered whole), a plain state_dict that
        torch.load(weights_only=True) reads, then where the time went and the done line, with every rank's hash of
        its weights, printed and written."""
        if self.prof:
            self.prof.stop()
        weights = full_state_dict(model)  # FSDP2: a collective, on every rank
        path = os.path.join(self.output_dir, f"model-{self.tb_name}.pt")
        if launch.RANK == 0:
            checkpoints.write_atomic(path, lambda tmp: torch.save(weights, tmp))
            launch.print_line(f"final weights: {path} (a state_dict of {type(model).__name__}: torch.load(path, "
                              "weights_only=True), or --init-from it)")
        checksums = launch.all_gather(_checksum(weights))  # each rank's own hash: the tests compare them
        time_split = TIMES.report(loader)
        figures, line, hints = efficiency.efficiency(
            self.device, self.precision, self.flops, result.get(f"{self.per}s_per_s") or result.get("images_per_s"),
            self.gpu_use.stop(), time_split, self.per)
        for text in [line, *hints]:
            launch.print0(text)
        done = {"event": "done", **result, "world_size": launch.WORLD_SIZE, "seconds": time.perf_counter() -
                self.t_start, "weights": path, "param_checksums": checksums, "time_split": time_split,
                "efficiency": figures}
        launch.print0(json.dumps(done))
        self.write(done)
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish({f"efficiency/{k}": v for k, v in figures.items() if v is not None})
        return done


def settings(args, run):
    """What a run ran with, for its outputs: every option, the facts of its run record (script, model, data, precision,
    world size), the versions of Python, torch and the framework, and the git commit where there is one (asked of
    git on rank 0 only, which writes the outputs)."""
    import platform
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for framework in ("pytorch_lightning", "deepspeed", "torchvision"):
        if framework in sys.modules:
            versions[framework] = getattr(sys.modules[framework], "__version__", None)
    options = checkpoints.plain(vars(args))
    return {"run": run_name(), "options": options, **{k: v for k, v in run.items() if k not in options},
            "versions": versions, "git_commit": run.get("git_commit") or (_git_commit() if launch.RANK == 0 else None)}


def _git_commit():
    """The commit of the checkout the script runs from, or None (not a git checkout, no git)."""
    import subprocess
    try:
        out = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(sys.argv[0])), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_hparams(writer, config):
    """The run's settings as TensorBoard's hparams (its HPARAMS tab), in the run's own folder: options flat, versions
    as version/NAME."""
    from torch.utils.tensorboard.summary import hparams
    flat = {**{k: v for k, v in config.items() if k not in ("options", "versions")}, **config["options"],
            **{f"version/{k}": v for k, v in config["versions"].items()}}
    # numbers stay numbers (sortable); the rest as text: True, None, a list (torch's would show a bool as 1)
    flat = {k: v if isinstance(v, int | float | str) and not isinstance(v, bool) else str(v) for k, v in flat.items()}
    for summary in hparams(flat, {}):
        writer.file_writer.add_summary(summary)


def full_state_dict(model):
    """The model's state_dict on the CPU, whole: FSDP2's shards (DTensors) gathered, on every rank."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in
            model.state_dict().items()}


def param_checksum(model):
    """A hash of every parameter's bytes: equal on all ranks iff the replicas are bit-identical."""
    return _checksum(full_state_dict(model))


def _checksum(state_dict):
    h = hashlib.sha256()
    for p in state_dict.values():
        h.update(p.reshape(-1).view(torch.uint8).numpy().tobytes())  # bytes: also for bfloat16
    return h.hexdigest()[:16]


def _summary_writer(folder, purge_step):
    try:
        from torch.utils.tensorboard import SummaryWriter  # imported here: the scripts run without tensorboard
    except ImportError:
        launch.print_line("NOTE: tensorboard is not installed (pip install tensorboard): no TensorBoard curves; the "
                          "metrics JSONL file has the same numbers")
        return None
    return SummaryWriter(folder, purge_step=purge_step)


PROFILE_STEPS = {"wait": 5, "warmup": 3, "active": 5}  # steps skipped, traced but dropped (warm-up), traced and kept


def profiler(args, device, name):
    """With --profile, on rank 0: torch.profiler over PROFILE_STEPS, a trace file and a table; else None."""
    if not args.profile or launch.RANK != 0:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule
    cuda = device.type == "cuda"
    path = os.path.join(args.output_dir, f"profile-{name}.json")  # Perfetto, chrome://tracing, TensorBoard open it

    def report(prof):
        prof.export_chrome_trace(path)
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=8, max_name_column_width=40)
        launch.print_line(f"profile of {PROFILE_STEPS['active']} steps on rank 0, slowest operators first (the trace: "
                          f"{path}, open it in https://ui.perfetto.dev):\n{table}")

    os.makedirs(args.output_dir, exist_ok=True)
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                   schedule=schedule(**PROFILE_STEPS, repeat=1), on_trace_ready=report)
    prof.start()
    return prof


