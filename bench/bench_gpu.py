"""Every script on one GPU, in one command: trains each one, preempts and resumes two of them, counts host syncs and
collectives per training step, and measures P6-P9. Writes results.json and summary.txt into --out after every run.

    python bench/bench_gpu.py --data-dir DATA --out gpu-results            # one GPU, at most --budget (480) seconds
    python bench/bench_gpu.py --data-dir DATA --device=cpu --smoke          # the same checks at toy sizes on CPU

DATA holds MNIST/raw (as for the scripts). mnist_ddp_deepspeed.py needs DeepSpeed: where it is not installed and
--wheels names a folder of wheels (DeepSpeed's and its dependencies), it is installed from there into --out.

Nothing measured is lost: results.json and summary.txt are rewritten whole after every run and every step. --budget:
a step whose estimate (ESTIMATES) does not fit in the time left is skipped with a note, a run still going at the end
is stopped, and the --compile variants come last.
Trainings, one process each (world size 1):
    mnist_ddp.py fp32, --amp | mnist_lightning_ddp.py --amp | mnist_ddp_deepspeed.py bf16 ZeRO-2 |
    imagenet_ddp.py --synthetic resnet50, and its real JPEG path (2 epochs) on generated ILSVRC-layout archives |
    last: mnist_ddp.py --compile
Preemption: SIGUSR1 mid-epoch, exit 75, rerun; final weights compared tensor by tensor with an uninterrupted run
    (mnist_ddp.py, imagenet_ddp.py), every run with deterministic kernels (cuDNN's autotuner kept off); on a GPU a
    second uninterrupted run gives the noise floor (kernels without a deterministic version).
Host syncs and collectives: every training above runs with torch.cuda.set_sync_debug_mode("warn"), and with
    torch.cuda.synchronize, Event/Stream synchronize and torch.distributed's collectives wrapped (they raise no
    warning); each is counted by the line of the script it came from, and per optimizer step. A line that syncs on
    most steps is a per-step sync (the log and stop-check steps sync every --log-interval and every 10 steps).
P6  mnist_ddp.py to 97% test accuracy on one GPU: training seconds (first step included) and epochs.
P7  imagenet_ddp.py --synthetic resnet50 img/s at batch 256: bf16 + channels_last, fp32 NCHW, and last the first
    with --compile (goal >= 3,100 img/s).
P8  JPEG decoding on the GPU (torchvision.io.decode_jpeg(device="cuda"), batched, then the same crops on the GPU) vs
    imagenet_ddp.py's DataLoader path with 15 workers, the same files, img/s (goal >= 3x); the DataLoader is timed
    over at least 5 x workers x prefetch batches, so the batches made before the clock starts count little.
P9  imagenet_ddp.py's real-JPEG training img/s in its second epoch as a fraction of its synthetic img/s.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench_imagenet, which puts the repository and tests/ on the path too
SYNC_WARNING = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"
LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*"
                         r"|SLURM_.*|OMPI_.*|PMI_.*|CHECKPOINT_DIR)$")


# -----------------------------------------------------------------------------
# the probe: runs a training script in this process and counts its host syncs


COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "broadcast_object_list", "barrier", "monitored_barrier")


def probe(script, argv, report):
    """Run SCRIPT ARGV as __main__, counting by the script line each came from: the host syncs (CUDA's sync warnings,
    and the explicit torch.cuda.synchronize and Event/Stream synchronize, which raise none) and torch.distributed's
    collectives. At exit, write {syncs by line, collectives by line, optimizer steps} to REPORT."""
    import atexit
    import collections
    import functools
    import traceback
    import warnings

    import torch
    import torch.distributed as dist

    target = str(Path(script).resolve())
    syncs, collectives, steps = collections.Counter(), collections.Counter(), [0]
    shown = warnings.showwarning

    def where():
        """The line of the script that led here, else the innermost frame outside torch (and this file)."""
        stack = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__]
        mine = [f for f in stack if f.filename == target]
        frame = mine[-1] if mine else next((f for f in reversed(stack) if "/torch/" not in f.filename), stack[-1])
        return f"{Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()[:80]}"

    def count(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return shown(message, category, filename, lineno, file, line)
        syncs[where()] += 1

    def counted(fn, counter, name):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            counter[f"{where()} [{name}]"] += 1
            return fn(*args, **kwargs)
        return call

    def dump():
        Path(report).write_text(json.dumps({"syncs": dict(syncs.most_common()),
                                            "collectives": dict(collectives.most_common()), "steps": steps[0]}))

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    warnings.showwarning = count
    warnings.simplefilter("always")  # every sync, not the first one per line
    # DeepSpeed's accelerator looks torch.cuda.synchronize up at each call, as the scripts do
    torch.cuda.synchronize = counted(torch.cuda.synchronize, syncs, "torch.cuda.synchronize")
    for cls in (torch.cuda.Event, torch.cuda.Stream):
        cls.synchronize = counted(cls.synchronize, syncs, f"{cls.__name__}.synchronize")
    for name in COLLECTIVES:  # the scripts and the frameworks call them through the module: dist.all_reduce(...)
        if hasattr(dist, name):
            setattr(dist, name, counted(getattr(dist, name), collectives, name))
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    atexit.register(dump)
    run_script(target, argv)


def run_script(script, argv):
    """Run SCRIPT ARGV as __main__ in this process, with deterministic kernels where BENCH_DETERMINISTIC=1."""
    import runpy

    import torch
    if os.environ.get("BENCH_DETERMINISTIC") == "1":
        deterministic(torch)
    sys.argv = [str(script)] + argv
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(str(script), run_name="__main__")


def deterministic(torch):
    """Bit-identical results between runs on a GPU: deterministic kernels, and cuDNN's autotuner kept off even where
    the script turns it on (imagenet_ddp.py does: with it, two runs may pick different convolution algorithms)."""
    # warn_only: a kernel without a deterministic version (ResNet's adaptive pooling, differentiated on a GPU) warns
    # and runs rather than raising; the second uninterrupted run measures what it leaves. CUBLAS_WORKSPACE_CONFIG: set
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    prop = type(torch.backends.cudnn).__dict__.get("benchmark")
    if prop is not None and hasattr(prop, "setter"):
        prop.setter = lambda value: torch._C._set_cudnn_benchmark(False)
    print("bench_gpu.py: deterministic kernels, cuDNN's autotuner off", flush=True)


# -----------------------------------------------------------------------------
# running the scripts


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(extra=None):
    """This environment without any launcher's variables, then those of a one-process launch (world size 1), so that
    no script looks for more ranks (DeepSpeed would spend half a minute asking MPI)."""
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    env.update(PYTHONUNBUFFERED="1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", **(extra or {}))
    return env


def done_record(out):
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"event": "done"' in line]
    return records[-1] if records else None


def epoch_records(output_dir):
    lines = [line for f in sorted(Path(output_dir).glob("metrics-*.jsonl")) for line in f.read_text().splitlines()]
    return [r for r in map(json.loads, lines) if r.get("event") == "epoch"]


class Runner:
    def __init__(self, args, work, bench):
        self.args, self.work, self.bench, self.n = args, Path(work), bench, 0

    def run(self, name, script, argv, sync_probe=True, stop_at=None, deterministic=False):
        """One training process (through the sync probe unless told otherwise), killed at --budget's end. stop_at: a
        line of output after which it gets SIGUSR1. Returns a dict with the exit code, seconds, done record, epochs,
        syncs, output tail; results.json has it at once."""
        self.n += 1
        run_dir = self.work / f"{self.n:02d}-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = list(argv)
        if not any(a.startswith("--output-dir") for a in argv):
            argv.append(f"--output-dir={run_dir / 'out'}")
        report = run_dir / "syncs.json"
        cmd = [sys.executable, "-u", __file__, "--probe" if sync_probe else "--run", str(REPO / script), str(report),
               "--"]
        t0 = time.perf_counter()
        extra = {"BENCH_DETERMINISTIC": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if deterministic else {}
        env = clean_env({**self.args.extra_env, **extra, "MASTER_PORT": str(free_port())})
        signalled, killed = False, False
        with open(run_dir / "log.txt", "w") as log:
            p = subprocess.Popen(cmd + argv, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            try:
                while p.poll() is None:
                    if self.bench.left() <= 0:
                        killed = True
                        p.kill()
                        break
                    if stop_at and not signalled and stop_at in (run_dir / "log.txt").read_text():
                        p.send_signal(signal.SIGUSR1)
                        signalled = True
                    time.sleep(0.05)
            finally:
                if p.poll() is None:
                    p.kill()
                rc = p.wait()
        out = (run_dir / "log.txt").read_text()
        result = {"name": name, "script": script, "args": argv, "rc": rc, "seconds": round(time.perf_counter() - t0, 1),
                  "done": done_record(out), "epochs": epoch_records(run_dir / "out"), "dir": str(run_dir)}
        if sync_probe and report.exists():
            result.update(sync_summary(json.loads(report.read_text())))
        if stop_at:
            result["signalled"] = signalled
        if killed:
            result["killed"] = "at the end of --budget"
        if rc not in (0, 75) or (rc == 0 and result["done"] is None):
            result["tail"] = out[-3000:]
        print(f"  {name}: exit {rc}, {result['seconds']} s{' (killed: --budget is spent)' * killed}", flush=True)
        self.bench.ran(result)
        return result


def sync_summary(report):
    """Host syncs and collectives per optimizer step, by script line; the lines that do either on at least half of the
    steps (a per-step collective is a data-parallel framework's gradient reduction, or a cost to find)."""
    steps = max(report["steps"], 1)
    by_line, collectives = report["syncs"], report.get("collectives", {})
    return {"steps": report["steps"], "syncs_total": sum(by_line.values()),
            "syncs_by_line": dict(list(by_line.items())[:12]),
            "per_step_sync_lines": [line for line, n in by_line.items() if n >= steps / 2],
            "collectives_total": sum(collectives.values()), "collectives_by_line": dict(list(collectives.items())[:12]),
            "per_step_collective_lines": [line for line, n in collectives.items() if n >= steps / 2]}


# -----------------------------------------------------------------------------
# the checks


def compare_checkpoints(a, b):
    """Bit-identity and the largest absolute difference between the model tensors of two checkpoints."""
    import torch
    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    worst, same = 0.0, True
    for k in sa:
        x, y = sa[k], sb[k]
        same = same and torch.equal(x, y)
        if x.is_floating_point():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return {"bit_identical": same, "max_abs_diff": worst}


def preempt_and_resume(runner, name, script, argv, stop_at, epochs, noise_floor):
    """An uninterrupted run and an interrupted + resumed one, each with its own --checkpoint-dir, with deterministic
    kernels; noise_floor: a second uninterrupted run too, to show what differs between two runs that were not
    interrupted at all (on a GPU, kernels without a deterministic version: ResNet's adaptive pooling)."""
    def ckpt(run):
        return [f"--checkpoint-dir={runner.work / name / run}"]

    ref = runner.run(f"{name}-uninterrupted", script, argv + ckpt("a"), sync_probe=False, deterministic=True)
    stopped = runner.run(f"{name}-stopped", script, argv + ckpt("b"), sync_probe=False, stop_at=stop_at,
                         deterministic=True)
    # probed: a resumed run must not sync per step either
    resumed = runner.run(f"{name}-resumed", script, argv + ckpt("b"), deterministic=True)
    last = f"epoch_{epochs:04d}.pt"
    result = {"uninterrupted": ref, "stopped": stopped, "resumed": resumed,
              "stopped_with_75": stopped["rc"] == 75, "resumed_mid_epoch": False}
    with contextlib.suppress(FileNotFoundError, IndexError):
        log = Path(resumed["dir"], "log.txt").read_text()
        result["resumed_mid_epoch"] = bool(re.search(r"resumed from .*_step_\d+\.pt", log))
        result.update(compare_checkpoints(runner.work / name / "a" / last, runner.work / name / "b" / last))
    if noise_floor:
        again = runner.run(f"{name}-uninterrupted-again", script, argv + ckpt("c"), sync_probe=False,
                           deterministic=True)
        result["again"] = again
        with contextlib.suppress(FileNotFoundError):
            floor = compare_checkpoints(runner.work / name / "a" / last, runner.work / name / "c" / last)
            result["noise_floor"] = {"bit_identical": floor["bit_identical"], "max_abs_diff": floor["max_abs_diff"]}
    return result


def versions():
    import torch
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version(), "host": platform.node()}
    for module in ("torchvision", "pytorch_lightning"):
        v[module] = __import__(module).__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                 nccl=".".join(map(str, torch.cuda.nccl.version())))
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    return v


def deepspeed_version(env):
    r = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__version__)"], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return r.stdout.strip().splitlines()[-1] if r.returncode == 0 else None


def ensure_deepspeed(args, work):
    """DeepSpeed importable by the child processes: installed already, or from --wheels into WORK/site."""
    installed = deepspeed_version(clean_env())
    if installed or not args.wheels:
        return installed
    site = Path(work) / "site"
    # every wheel of the folder, no resolver: with --target pip would not see this Python's own torch and numpy
    wheels = sorted(str(w) for w in Path(args.wheels).glob("*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        f"--target={site}", *wheels], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:])
        return None
    args.extra_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return deepspeed_version(clean_env(args.extra_env))


def p8_decode(train_dir, batch_size, workers, batches, device):
    """img/s of imagenet_ddp.py's DataLoader path vs batched decode_jpeg on `device` followed by the same crops."""
    import random

    import numpy as np
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from bench_imagenet import loader_rate  # first: it puts imagenet_ddp.py's folder on the path
    import imagenet_ddp

    dataset = imagenet_ddp.JPEGs(str(Path(train_dir).parent), "train", 224)
    order = np.random.default_rng(0).permutation(len(dataset)).tolist()
    cpu = loader_rate(dataset, batch_size, workers, batches, order)  # repeated as it needs

    files = [read_file(dataset.path(i)) for i in order[:batch_size]]  # bytes in memory: decoding only

    def gpu_batch():
        """Decode the batch on the device, then each image's crop and flip, drawn as imagenet_ddp.py draws them."""
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        out = torch.empty(len(images), 3, 224, 224, dtype=torch.uint8, device=device)
        for k, image in enumerate(images):
            crop = imagenet_ddp.random_resized_crop(image.float(), 224, random.Random(k))
            out[k] = crop.round_().clamp_(0, 255).to(torch.uint8)
        return out

    gpu_batch()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        gpu_batch()
    sync()
    return {"dataloader_img_s": cpu, "decode_jpeg_img_s": batches * batch_size / (time.perf_counter() - t0),
            "decode_device": device, "workers": workers, "batch_size": batch_size}


# -----------------------------------------------------------------------------
# main

# Seconds each step should take: (one H200 at full sizes, 2 vCPUs at --smoke sizes). bench/README.md says how they
# were estimated. A step that would not fit in what is left of --budget is skipped, with a note; the --compile
# variants come last, so they are what a short budget drops.
ESTIMATES = {"mnist_ddp fp32": (15, 15), "mnist_ddp --amp": (15, 0), "mnist_lightning_ddp --amp": (25, 20),
             "mnist_ddp_deepspeed bf16 ZeRO-2": (50, 25), "imagenet_ddp --synthetic": (30, 12),
             "generating ILSVRC-layout archives": (15, 3), "imagenet_ddp real JPEGs": (35, 15),
             "preemption mnist_ddp": (50, 25), "preemption imagenet_ddp": (90, 0), "P6": (15, 0), "P7": (60, 12),
             "P8": (30, 5), "P9": (0, 0), "mnist_ddp --compile": (90, 0), "P7 --compile": (120, 0)}


class Skip(Exception):
    """A step that cannot run: what it needs did not."""


class Bench:
    """results.json and summary.txt, rewritten after every run and every step (a run cut short keeps what was done);
    --budget: a step that would not fit is skipped, with a note."""

    def __init__(self, out, results, budget, column, t0):
        self.out, self.results, self.budget, self.column, self.t0 = out, results, budget, column, t0

    def left(self):
        return self.budget - (time.perf_counter() - self.t0)

    def ran(self, run):
        self.results["runs"].append({k: run.get(k) for k in ("name", "rc", "seconds", "dir", "killed")})
        self.save()

    def step(self, name, section, make):
        """results[section][name] = make(), unless it would not fit in --budget or cannot run."""
        estimate, left = ESTIMATES[name][self.column], self.left()
        if estimate > left:
            self.results["skipped"][name] = f"needs about {estimate} s, {max(left, 0):.0f} s of --budget left"
        else:
            print(f"== {name}", flush=True)
            try:
                value = make()
                if section:
                    self.results[section][name] = value
            except Skip as e:
                self.results["skipped"][name] = str(e)
            except Exception as e:  # one broken step costs its own figure, not the others'
                self.results["errors"][name] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        if name in self.results["skipped"]:
            print(f"== {name}: skipped: {self.results['skipped'][name]}", flush=True)
        self.save()

    def save(self):
        self.results["seconds"] = round(time.perf_counter() - self.t0, 1)
        for name, text in (("results.json", json.dumps(self.results, indent=1, default=str)),
                           ("summary.txt", summarize(self.results))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)  # whole or not at all, even if this process is killed mid-write


def main():
    t0 = time.perf_counter()  # --budget counts from here
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="holds MNIST/raw")
    p.add_argument("--out", default="gpu-results", help="results.json, summary.txt and every run's log go here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the harness itself, on CPU")
    p.add_argument("--smoke", action="store_true", help="toy sizes: a few seconds per training")
    p.add_argument("--budget", type=float, default=480,
                   help="seconds the whole run may take: steps that would not fit are skipped, with a note, and a "
                        "run still going at the end is stopped (default: 480)")
    p.add_argument("--wheels", default=None, help="a folder of wheels to install DeepSpeed from, if it is missing")
    p.add_argument("--images", type=int, default=500, help="generated training JPEGs per class, 10 classes")
    p.add_argument("--p6-epochs", type=int, default=10, help="epochs mnist_ddp.py may take to reach 97%%")
    args = p.parse_args()
    args.extra_env = {}
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("ERROR: no CUDA device visible. HINT: run on a GPU machine, or --device=cpu --smoke")
    out = Path(args.out).resolve()
    shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs"
    smoke, cpu_smoke = args.smoke, args.smoke and args.device == "cpu"
    results = {"versions": versions(), "device": args.device, "smoke": smoke, "budget_s": args.budget,
               "trainings": {}, "checks": {}, "skipped": {}, "errors": {}, "runs": []}
    bench = Bench(out, results, args.budget, column=1 if smoke else 0, t0=t0)
    runner = Runner(args, work, bench)
    T, C = results["trainings"], results["checks"]
    dev = [f"--device={args.device}"]
    data = [f"--data-dir={os.path.abspath(args.data_dir)}"]

    def needs(*names):
        """The trainings a step builds on, or Skip."""
        missing = [n for n in names if not (T.get(n) or {}).get("done")]
        if missing:
            raise Skip(f"needs {', '.join(missing)}, which did not run or did not finish")
        return [T[n] for n in names]

    # trainings, one process each, through the sync probe
    mnist = ["--epochs=1" if smoke else "--epochs=2", "--batch-size=64"] + data + dev
    bench.step("mnist_ddp fp32", "trainings", lambda: runner.run("mnist-fp32", "mnist_ddp.py", mnist))
    # on a CPU --amp trains in float32: at smoke sizes there, the run above is that run too (its time matters in CI)
    bench.step("mnist_ddp --amp", "trainings", lambda: needs("mnist_ddp fp32")[0] if cpu_smoke else
               runner.run("mnist-amp", "mnist_ddp.py", mnist + ["--amp"]))
    bench.step("mnist_lightning_ddp --amp", "trainings",
               lambda: runner.run("lightning-amp", "mnist_lightning_ddp.py", mnist + ["--amp"]))

    def deepspeed_run():
        deepspeed = ensure_deepspeed(args, work)
        results["versions"]["deepspeed"] = deepspeed or "not installed (give --wheels)"
        if not deepspeed:
            raise Skip("DeepSpeed is not installed here: give --wheels")
        return runner.run("deepspeed-bf16", "mnist_ddp_deepspeed.py", mnist + [
            "--amp", "--zero-stage=2", "--deepspeed", f"--deepspeed_config={REPO / 'ds_config.json'}"])
    bench.step("mnist_ddp_deepspeed bf16 ZeRO-2", "trainings", deepspeed_run)

    arch = ["--arch=resnet18", "--image-size=64", "--batch-size=8"] if smoke else ["--arch=resnet50",
                                                                                   "--batch-size=256"]
    steps = ["--steps-per-epoch=6"] if smoke else ["--steps-per-epoch=60"]
    synthetic = ["--synthetic", "--epochs=1", f"--local-dir={work}"] + arch + steps + dev
    bench.step("imagenet_ddp --synthetic", "trainings",
               lambda: runner.run("imagenet-synthetic", "imagenet_ddp.py", synthetic))

    jpegs = work / "imagenet"

    def generate():
        from bench_imagenet import make_dataset
        jpegs.mkdir(parents=True, exist_ok=True)
        n_classes, n_images = (4, 16) if smoke else (10, args.images)
        make_dataset(jpegs, n_classes, n_images, n_val=max(2, n_images // 6))
    bench.step("generating ILSVRC-layout archives", None, generate)

    # two epochs: P9 meters the second, when the workers have long been running
    real = [f"--data-dir={jpegs}", f"--local-dir={work / 'local'}", "--epochs=2"] + arch + dev + [
        f"--workers={1 if smoke else 15}"]

    def real_run():
        if not (jpegs / "ILSVRC2012_img_train.tar").exists():
            raise Skip("the generated archives are missing")
        return runner.run("imagenet-jpeg", "imagenet_ddp.py", real)
    bench.step("imagenet_ddp real JPEGs", "trainings", real_run)

    # preemption: SIGUSR1 mid-epoch, exit 75, rerun; on a GPU with a second uninterrupted run as the noise floor
    epochs = 1 if smoke else 2  # the stop comes in epoch 1: at smoke sizes, the resumed run ends with that epoch
    bench.step("preemption mnist_ddp", "checks", lambda: preempt_and_resume(
        runner, "preempt-mnist", "mnist_ddp.py", [f"--epochs={epochs}", "--batch-size=64"] + data + dev,
        "epoch 1 step 20 ", epochs=epochs, noise_floor=args.device == "cuda"))
    # a stop is agreed on every 10th step: an epoch needs more than 10 steps for a mid-epoch checkpoint
    small = ["--arch=resnet18", "--log-interval=1"] + (
        ["--image-size=64", "--batch-size=2", "--workers=2"] if smoke else
        ["--image-size=128", "--batch-size=64", "--workers=8", "--steps-per-epoch=30"])
    if not cpu_smoke:  # on a CPU, tests/test_imagenet_ddp.py checks this exact resume; the harness's code is mnist's
        def preempt_imagenet():
            if not (jpegs / "ILSVRC2012_img_train.tar").exists():
                raise Skip("the generated archives are missing")
            return preempt_and_resume(
                runner, "preempt-imagenet", "imagenet_ddp.py",
                [f"--data-dir={jpegs}", f"--local-dir={work / 'local'}", f"--epochs={epochs}"] + small + dev,
                "epoch 1 step 5/", epochs=epochs, noise_floor=args.device == "cuda")
        bench.step("preemption imagenet_ddp", "checks", preempt_imagenet)

    def p6():
        # smoke sizes time nothing: the probed run above serves
        run = needs("mnist_ddp fp32")[0] if smoke else runner.run(
            "p6-mnist", "mnist_ddp.py", [f"--epochs={args.p6_epochs}", "--batch-size=64"] + data + dev,
            sync_probe=False)
        seconds, reached = 0.0, None
        for r in run["epochs"]:
            seconds += r["seconds"]
            if r["test_acc"] >= 0.97:
                reached = {"epochs": r["epoch"], "train_seconds": round(seconds, 2), "test_acc": r["test_acc"]}
                break
        return {"reached_97": reached, "best_acc": max((r["test_acc"] for r in run["epochs"]), default=None),
                "epochs_run": len(run["epochs"]), "run": run}
    bench.step("P6", "checks", p6)

    def p7():
        p7_runs = {}
        for i, (k, v) in enumerate({"bf16 + channels_last": [], "fp32 NCHW": ["--no-amp", "--no-channels-last"]}
                                   .items()):  # on a CPU: fp32 NCHW either way; smoke sizes time nothing
            p7_runs[k] = needs("imagenet_ddp --synthetic")[0] if (smoke and not v) or cpu_smoke else runner.run(
                f"p7-{i}", "imagenet_ddp.py", synthetic + v, sync_probe=False)
        return {k: (r["done"] or {}).get("images_per_s") for k, r in p7_runs.items()}
    bench.step("P7", "checks", p7)

    def p8():
        staged = next((work / "local").rglob("train"), None)
        if staged is None:
            raise Skip("needs the real-JPEG training's staged copy")
        r = p8_decode(staged, 8 if smoke else 256, 1 if smoke else 15, 2 if smoke else 20, args.device)
        return {**r, "ratio": r["decode_jpeg_img_s"] / r["dataloader_img_s"]}
    bench.step("P8", "checks", p8)

    def p9():
        real_run, = needs("imagenet_ddp real JPEGs")
        epoch = real_run["epochs"][-1]  # the second: the first includes the workers' start and their prefetch
        synthetic_rate = (C.get("P7") or {}).get("bf16 + channels_last")
        if not synthetic_rate:
            raise Skip("needs P7's bf16 + channels_last rate")
        return {"real_img_s": epoch["images_per_s"], "real_epoch": epoch["epoch"], "synthetic_img_s": synthetic_rate,
                "fraction": epoch["images_per_s"] / synthetic_rate}
    bench.step("P9", "checks", p9)

    if not smoke:  # last: inductor compiles for a minute or more, and a short --budget drops these first
        bench.step("mnist_ddp --compile", "trainings",
                   lambda: runner.run("mnist-compile", "mnist_ddp.py", mnist + ["--compile"]))

        def p7_compile():
            r = runner.run("p7-compile", "imagenet_ddp.py", synthetic + ["--compile"], sync_probe=False)
            C["P7"] = {**C.get("P7", {}), "bf16 + channels_last + compile": (r["done"] or {}).get("images_per_s")}
        bench.step("P7 --compile", None, p7_compile)

    print(summarize(results))
    failed = [k for k, r in T.items() if r["rc"] != 0 or not r["done"]] + list(results["errors"])
    return 1 if failed else 0


def training_line(name, r):
    d = r["done"] or {}
    if r["rc"] != 0 or not d:
        return f"  {name:32s} FAILED (exit {r['rc']}), see {r['dir']}/log.txt"
    if "test_acc" in d:
        what = f"test acc {100 * d['test_acc']:.2f}%"
    elif d.get("top1") is not None:
        what = f"top-1 {100 * d['top1']:.1f}% of {d['val_count']} val images, {d['images_per_s'] or 0:.0f} img/s"
    else:
        loss = (r["epochs"] or [{}])[-1].get("train_loss")
        what = f"train loss {loss:.3f} ({'finite' if loss is not None and math.isfinite(loss) else 'NOT finite'})" \
            if loss is not None else "no loss recorded"
        what += f", {d.get('images_per_s') or 0:.0f} img/s"
    per_step = r.get("per_step_sync_lines")
    syncs = "" if per_step is None else (f" | syncs: {r['syncs_total']} in {r['steps']} steps, "
                                         f"{len(per_step)} per-step line(s)")
    return f"  {name:32s} {what}, {r['seconds']} s{syncs}"


def summarize(res):
    """The summary of what has been measured so far: every part may be missing (skipped, failed, or not reached)."""
    v = res["versions"]
    lines = [f"bench_gpu.py on {v.get('gpu', 'CPU (--device=cpu)')}{' (smoke sizes)' if res['smoke'] else ''}",
             f"  torch {v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v.get('nccl')}), driver "
             f"{v.get('driver')}, torchvision {v['torchvision']}, Lightning {v['pytorch_lightning']}, "
             f"DeepSpeed {v.get('deepspeed', 'not checked yet')}, Python {v['python']}",
             "trainings (one process):"]
    lines += [training_line(k, r) for k, r in res["trainings"].items()]
    C = res["checks"]
    probed = {**res["trainings"], **{f"{k}, resumed run": c["resumed"] for k, c in C.items()
                                     if k.startswith("preemption")}}
    for k, r in probed.items():
        for kind in ("sync", "collective"):
            for line in r.get(f"per_step_{kind}_lines") or []:
                lines.append(f"  per-step {kind} in {k}: {line} ({r[f'{kind}s_by_line'].get(line)} in {r['steps']} "
                             f"steps)")
    for k in [k for k in ("preemption mnist_ddp", "preemption imagenet_ddp") if k in C]:
        c = C[k]
        state = ("bit-identical to the uninterrupted run" if c.get("bit_identical") else
                 f"largest difference {c.get('max_abs_diff')}" if "max_abs_diff" in c else "not compared")
        floor = c.get("noise_floor")
        if floor:
            state += ("; two uninterrupted runs: bit-identical" if floor["bit_identical"] else
                      f"; two uninterrupted runs differ by up to {floor['max_abs_diff']} (the noise floor)")
        lines.append(f"{k}: stopped with 75: {c['stopped_with_75']}, resumed mid-epoch: {c['resumed_mid_epoch']}, "
                     f"{state}")
    if "P6" in C:
        p6 = C["P6"]
        reached = p6["reached_97"]
        lines.append("P6 mnist_ddp.py to 97%: " + (
            f"{reached['train_seconds']} s of training, {reached['epochs']} epoch(s) (goal < 1 s)" if reached else
            f"not reached in {p6['epochs_run']} epoch(s), best {p6['best_acc']}"))
    if "P7" in C:
        lines.append("P7 ResNet synthetic img/s: " + ", ".join(f"{k} {x or 0:.0f}" for k, x in C["P7"].items())
                     + " (goal >= 3,100)")
    if "P8" in C:
        p8 = C["P8"]
        lines.append(f"P8 decode_jpeg on {p8['decode_device']} {p8['decode_jpeg_img_s']:.0f} img/s vs DataLoader "
                     f"({p8['workers']} workers) {p8['dataloader_img_s']:.0f} img/s: {p8['ratio']:.2f}x (goal >= 3x)")
    if "P9" in C:
        p9 = C["P9"]
        lines.append(f"P9 real-JPEG (epoch {p9['real_epoch']}) / synthetic training img/s: {p9['fraction']:.2f}")
    for name, why in res.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    for name, why in res.get("errors", {}).items():
        lines.append(f"FAILED {name}: {why}")
    lines.append(f"{res.get('seconds')} s in all, of --budget {res.get('budget_s')} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--probe":  # bench_gpu.py --probe SCRIPT REPORT -- ARGS...
        probe(sys.argv[2], sys.argv[5:], sys.argv[3])
    elif len(sys.argv) > 3 and sys.argv[1] == "--run":  # the same, without counting: for timings, and preemption
        run_script(sys.argv[2], sys.argv[5:])
    else:
        sys.exit(main())
