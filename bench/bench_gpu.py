"""Every script on one GPU, in one command: trains each one, preempts and resumes two of them, counts host syncs per
training step, and measures P6-P9. Writes results.json and summary.txt into --out.

    python bench/bench_gpu.py --data-dir DATA --out gpu-results            # one GPU, about 8 minutes
    python bench/bench_gpu.py --data-dir DATA --device=cpu --smoke          # the same checks at toy sizes on CPU

DATA holds MNIST/raw (as for the scripts). mnist_ddp_deepspeed.py needs DeepSpeed: where it is not installed and
--wheels names a folder of wheels (DeepSpeed's and its dependencies), it is installed from there into --out.

Trainings, one process each (world size 1):
    mnist_ddp.py fp32, --amp, --compile | mnist_lightning_ddp.py --amp | mnist_ddp_deepspeed.py bf16 ZeRO-2 |
    imagenet_ddp.py --synthetic resnet50, and its real JPEG path on generated ILSVRC-layout archives
Preemption: SIGUSR1 mid-epoch, exit 75, rerun; final weights compared tensor by tensor with an uninterrupted run
    (mnist_ddp.py, imagenet_ddp.py).
Host syncs: every training above runs with torch.cuda.set_sync_debug_mode("warn"); each synchronizing call is
    counted by the line of the script it came from, and per optimizer step. A line that syncs on most steps is a
    per-step sync (the log and stop-check steps sync every --log-interval and every 10 steps).
P6  mnist_ddp.py to 97% test accuracy on one GPU: training seconds (first step included) and epochs.
P7  imagenet_ddp.py --synthetic resnet50 img/s at batch 256: bf16 + channels_last, the same with --compile, and fp32
    NCHW (goal >= 3,100 img/s).
P8  JPEG decoding on the GPU (torchvision.io.decode_jpeg(device="cuda"), batched, then the same crops on the GPU) vs
    imagenet_ddp.py's DataLoader path with 15 workers, the same files, img/s (goal >= 3x).
P9  imagenet_ddp.py's real-JPEG training img/s as a fraction of its synthetic img/s (same model and batch).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench_imagenet, which puts the repository and tests/ on the path too
SYNC_WARNING = "synchroniz"  # torch's warning: "called a synchronizing CUDA operation"
LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|TORCHELASTIC_.*"
                         r"|SLURM_.*|OMPI_.*|PMI_.*|CHECKPOINT_DIR)$")


# -----------------------------------------------------------------------------
# the probe: runs a training script in this process and counts its host syncs


def probe(script, argv, report):
    """Run SCRIPT ARGV as __main__ with CUDA sync warnings on; at exit write {syncs by line, optimizer steps}."""
    import atexit
    import collections
    import runpy
    import traceback
    import warnings

    import torch

    target = str(Path(script).resolve())
    syncs, steps = collections.Counter(), [0]
    shown = warnings.showwarning

    def count(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return shown(message, category, filename, lineno, file, line)
        stack = traceback.extract_stack()[:-1]
        mine = [f for f in stack if f.filename == target]
        frame = mine[-1] if mine else next((f for f in reversed(stack) if "/torch/" not in f.filename), stack[-1])
        syncs[f"{Path(frame.filename).name}:{frame.lineno}: {(frame.line or '').strip()[:80]}"] += 1

    def dump():
        Path(report).write_text(json.dumps({"syncs": dict(syncs.most_common()), "steps": steps[0]}))

    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *a, **k: steps.__setitem__(0, steps[0] + 1))
    warnings.showwarning = count
    warnings.simplefilter("always")  # every sync, not the first one per line
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("warn")
    atexit.register(dump)
    sys.argv = [target] + argv
    sys.path.insert(0, str(Path(target).parent))
    runpy.run_path(target, run_name="__main__")


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
    def __init__(self, args, work):
        self.args, self.work, self.n = args, Path(work), 0

    def run(self, name, script, argv, sync_probe=True, stop_at=None, timeout=900):
        """One training process (through the sync probe unless told otherwise). stop_at: a line of output after
        which it gets SIGUSR1. Returns a dict with the exit code, seconds, done record, epochs, syncs, output tail."""
        self.n += 1
        run_dir = self.work / f"{self.n:02d}-{name}"
        run_dir.mkdir(parents=True, exist_ok=True)
        argv = list(argv)
        if not any(a.startswith("--output-dir") for a in argv):
            argv.append(f"--output-dir={run_dir / 'out'}")
        report = run_dir / "syncs.json"
        cmd = [sys.executable, "-u"]
        cmd += [__file__, "--probe", str(REPO / script), str(report), "--"] if sync_probe else [str(REPO / script)]
        t0 = time.perf_counter()
        env = clean_env({**self.args.extra_env, "MASTER_PORT": str(free_port())})
        signalled = False
        with open(run_dir / "log.txt", "w") as log:
            p = subprocess.Popen(cmd + argv, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + timeout
                while p.poll() is None:
                    if time.monotonic() > deadline:
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
        if rc not in (0, 75) or (rc == 0 and result["done"] is None):
            result["tail"] = out[-3000:]
        print(f"  {name}: exit {rc}, {result['seconds']} s", flush=True)
        return result


def sync_summary(report):
    """Syncs per optimizer step, by script line; the lines that sync on at least half of the steps."""
    steps = max(report["steps"], 1)
    by_line = report["syncs"]
    return {"steps": report["steps"], "syncs_total": sum(by_line.values()),
            "syncs_by_line": dict(list(by_line.items())[:12]),
            "per_step_sync_lines": [line for line, n in by_line.items() if n >= steps / 2]}


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


def preempt_and_resume(runner, name, script, argv, stop_at, epochs):
    """An uninterrupted run and an interrupted + resumed one, each with its own --checkpoint-dir."""
    ref = runner.run(f"{name}-uninterrupted", script, argv + [f"--checkpoint-dir={runner.work / name / 'a'}"],
                     sync_probe=False)
    argv_b = argv + [f"--checkpoint-dir={runner.work / name / 'b'}"]
    stopped = runner.run(f"{name}-stopped", script, argv_b, sync_probe=False, stop_at=stop_at)
    resumed = runner.run(f"{name}-resumed", script, argv_b)  # probed: a resumed run must not sync per step either
    last = f"epoch_{epochs:04d}.pt"
    result = {"uninterrupted": ref, "stopped": stopped, "resumed": resumed,
              "stopped_with_75": stopped["rc"] == 75, "resumed_mid_epoch": False}
    with contextlib.suppress(FileNotFoundError, IndexError):
        log = Path(resumed["dir"], "log.txt").read_text()
        result["resumed_mid_epoch"] = bool(re.search(r"resumed from .*_step_\d+\.pt", log))
        result.update(compare_checkpoints(runner.work / name / "a" / last, runner.work / name / "b" / last))
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

    dataset = imagenet_ddp.JPEGs(str(Path(train_dir).parent), "train", 224, seed=0)
    order = np.random.default_rng(0).permutation(len(dataset)).tolist()
    keys = [(0, i) for i in (order * (1 + (batches + 1) * batch_size // len(order)))]
    cpu = loader_rate(dataset, batch_size, workers, batches, keys)

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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="holds MNIST/raw")
    p.add_argument("--out", default="gpu-results", help="results.json, summary.txt and every run's log go here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the harness itself, on CPU")
    p.add_argument("--smoke", action="store_true", help="toy sizes: a few seconds per training")
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
    runner = Runner(args, work)
    dev = [f"--device={args.device}"]
    data = [f"--data-dir={os.path.abspath(args.data_dir)}"]
    smoke = args.smoke
    results = {"versions": versions(), "device": args.device, "smoke": smoke, "trainings": {}, "checks": {}}
    t_start = time.perf_counter()

    print("== trainings, one process each", flush=True)
    T = results["trainings"]
    mnist = ["--epochs=1" if smoke else "--epochs=2", "--batch-size=64"] + data + dev
    T["mnist_ddp fp32"] = runner.run("mnist-fp32", "mnist_ddp.py", mnist)
    # on a CPU --amp trains in float32: at smoke sizes there, the run above is that run too (its time matters in CI)
    cpu_smoke = smoke and args.device == "cpu"
    T["mnist_ddp --amp"] = T["mnist_ddp fp32"] if cpu_smoke else runner.run("mnist-amp", "mnist_ddp.py",
                                                                             mnist + ["--amp"])
    if not smoke:  # inductor compiles for minutes on a CPU
        T["mnist_ddp --compile"] = runner.run("mnist-compile", "mnist_ddp.py", mnist + ["--compile"])
    T["mnist_lightning_ddp --amp"] = runner.run("lightning-amp", "mnist_lightning_ddp.py", mnist + ["--amp"])
    deepspeed = ensure_deepspeed(args, work)
    results["versions"]["deepspeed"] = deepspeed or "not installed (give --wheels)"
    if deepspeed:
        T["mnist_ddp_deepspeed bf16 ZeRO-2"] = runner.run(
            "deepspeed-bf16", "mnist_ddp_deepspeed.py",
            mnist + ["--amp", "--zero-stage=2", "--deepspeed", f"--deepspeed_config={REPO / 'ds_config.json'}"])

    arch = ["--arch=resnet18", "--image-size=64", "--batch-size=8"] if smoke else ["--arch=resnet50",
                                                                                   "--batch-size=256"]
    steps = ["--steps-per-epoch=6"] if smoke else ["--steps-per-epoch=60"]
    synthetic = ["--synthetic", "--epochs=1", f"--local-dir={work}"] + arch + steps + dev
    T["imagenet_ddp --synthetic"] = runner.run("imagenet-synthetic", "imagenet_ddp.py", synthetic)

    print("== generating ILSVRC-layout archives", flush=True)
    from bench_imagenet import make_dataset
    jpegs = work / "imagenet"
    jpegs.mkdir(parents=True, exist_ok=True)
    n_classes, n_images = (4, 16) if smoke else (10, args.images)
    make_dataset(jpegs, n_classes, n_images, n_val=max(2, n_images // 6))
    workers = [f"--workers={1 if smoke else 15}"]
    real = [f"--data-dir={jpegs}", f"--local-dir={work / 'local'}", "--epochs=1"] + arch + workers + dev
    T["imagenet_ddp real JPEGs"] = runner.run("imagenet-jpeg", "imagenet_ddp.py", real)

    print("== preemption: SIGUSR1 mid-epoch, exit 75, rerun", flush=True)
    C = results["checks"]
    epochs = 1 if smoke else 2  # the stop comes in epoch 1: at smoke sizes, the resumed run ends with that epoch
    C["preemption mnist_ddp"] = preempt_and_resume(runner, "preempt-mnist", "mnist_ddp.py",
                                                   [f"--epochs={epochs}", "--batch-size=64"] + data + dev,
                                                   "epoch 1 step 20 ", epochs=epochs)
    # a stop is agreed on every 10th step: an epoch needs more than 10 steps for a mid-epoch checkpoint
    small = ["--arch=resnet18", "--log-interval=1", "--workers=2"] + (
        ["--image-size=64", "--batch-size=2"] if smoke else ["--image-size=128", "--batch-size=64"])
    if not cpu_smoke:  # on a CPU, tests/test_imagenet_ddp.py checks this exact resume; the harness's code is mnist's
        C["preemption imagenet_ddp"] = preempt_and_resume(
            runner, "preempt-imagenet", "imagenet_ddp.py",
            [f"--data-dir={jpegs}", f"--local-dir={work / 'local'}", f"--epochs={epochs}"] + small + dev,
            "epoch 1 step 5/", epochs=epochs)

    print("== P6: mnist_ddp.py to 97% test accuracy", flush=True)
    if smoke:  # smoke sizes time nothing: the probed run above serves (and for P7's first variant, its own)
        p6 = T["mnist_ddp fp32"]
    else:
        p6 = runner.run("p6-mnist", "mnist_ddp.py", [f"--epochs={args.p6_epochs}", "--batch-size=64"] + data + dev,
                        sync_probe=False)
    seconds, reached = 0.0, None
    for r in p6["epochs"]:
        seconds += r["seconds"]
        if r["test_acc"] >= 0.97:
            reached = {"epochs": r["epoch"], "train_seconds": round(seconds, 2), "test_acc": r["test_acc"]}
            break
    C["P6"] = {"reached_97": reached, "best_acc": max((r["test_acc"] for r in p6["epochs"]), default=None),
               "epochs_run": len(p6["epochs"]), "run": p6}

    print("== P7: ResNet-50 synthetic img/s", flush=True)
    variants = {"bf16 + channels_last": [], "fp32 NCHW": ["--no-amp", "--no-channels-last"]}
    if not smoke:
        variants["bf16 + channels_last + compile"] = ["--compile"]
    p7 = {k: T["imagenet_ddp --synthetic"] if (smoke and not v) or cpu_smoke else  # on a CPU: fp32 NCHW either way
          runner.run(f"p7-{i}", "imagenet_ddp.py", synthetic + v, sync_probe=False)
          for i, (k, v) in enumerate(variants.items())}
    C["P7"] = {k: (r["done"] or {}).get("images_per_s") for k, r in p7.items()}

    print("== P8: JPEG decoding on the GPU vs the DataLoader path", flush=True)
    staged = next((work / "local").rglob("train"), None)
    C["P8"] = p8_decode(staged, 8 if smoke else 256, 1 if smoke else 15, 2 if smoke else 20, args.device)
    C["P8"]["ratio"] = C["P8"]["decode_jpeg_img_s"] / C["P8"]["dataloader_img_s"]

    # timings from runs without the sync probe (on a GPU it turns every sync into a warning); smoke sizes time nothing
    real_run = T["imagenet_ddp real JPEGs"] if smoke else runner.run("p9-jpeg", "imagenet_ddp.py", real,
                                                                       sync_probe=False)
    jpeg_rate = (real_run["done"] or {}).get("images_per_s")
    synthetic_rate = (p7["bf16 + channels_last"]["done"] or {}).get("images_per_s")
    C["P9"] = {"real_img_s": jpeg_rate, "synthetic_img_s": synthetic_rate,
               "fraction": jpeg_rate / synthetic_rate if jpeg_rate and synthetic_rate else None}
    results["seconds"] = round(time.perf_counter() - t_start, 1)

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    summary = summarize(results)
    (out / "summary.txt").write_text(summary)
    print(summary)
    failed = [k for k, r in T.items() if r["rc"] != 0 or not r["done"]]
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
    v = res["versions"]
    lines = [f"bench_gpu.py on {v.get('gpu', 'CPU (--device=cpu)')}{' (smoke sizes)' if res['smoke'] else ''}",
             f"  torch {v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}, NCCL {v.get('nccl')}), driver "
             f"{v.get('driver')}, torchvision {v['torchvision']}, Lightning {v['pytorch_lightning']}, "
             f"DeepSpeed {v['deepspeed']}, Python {v['python']}",
             "trainings (one process):"]
    lines += [training_line(k, r) for k, r in res["trainings"].items()]
    probed = {**res["trainings"], **{f"{k}, resumed run": c["resumed"] for k, c in res["checks"].items()
                                     if k.startswith("preemption")}}
    for k, r in probed.items():
        for line in r.get("per_step_sync_lines") or []:
            lines.append(f"  per-step sync in {k}: {line} ({r['syncs_by_line'].get(line)} in {r['steps']} steps)")
    C = res["checks"]
    for k in [k for k in ("preemption mnist_ddp", "preemption imagenet_ddp") if k in C]:
        c = C[k]
        state = ("bit-identical to the uninterrupted run" if c.get("bit_identical") else
                 f"largest difference {c.get('max_abs_diff')}" if "max_abs_diff" in c else "not compared")
        lines.append(f"{k}: stopped with 75: {c['stopped_with_75']}, resumed mid-epoch: {c['resumed_mid_epoch']}, "
                     f"{state}")
    p6 = C["P6"]
    lines.append("P6 mnist_ddp.py to 97%: " + (f"{p6['reached_97']['train_seconds']} s of training, "
                                               f"{p6['reached_97']['epochs']} epoch(s) (goal < 1 s)"
                                               if p6["reached_97"] else
                                               f"not reached in {p6['epochs_run']} epoch(s), best {p6['best_acc']}"))
    lines.append("P7 ResNet synthetic img/s: " + ", ".join(f"{k} {x or 0:.0f}" for k, x in C["P7"].items())
                 + " (goal >= 3,100)")
    p8 = C["P8"]
    lines.append(f"P8 decode_jpeg on {p8['decode_device']} {p8['decode_jpeg_img_s']:.0f} img/s vs DataLoader "
                 f"({p8['workers']} workers) {p8['dataloader_img_s']:.0f} img/s: {p8['ratio']:.2f}x (goal >= 3x)")
    p9 = C["P9"]
    lines.append(f"P9 real-JPEG / synthetic training img/s: {p9['fraction']:.2f}" if p9["fraction"] else
                 "P9 real-JPEG / synthetic: not measured")
    lines.append(f"{res['seconds']} s in all")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--probe":  # bench_gpu.py --probe SCRIPT REPORT -- ARGS...
        probe(sys.argv[2], sys.argv[5:], sys.argv[3])
    else:
        sys.exit(main())
