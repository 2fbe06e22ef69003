"""The MNIST siblings on the same work, side by side in one run: each framework's training step rate against
mnist_ddp.py's. Prints each ratio; the goal is at least 0.9 for each.

    .venv/bin/python bench/bench_siblings.py --data-dir ../shared/data

Each round runs, one after another, 2 processes under torchrun on CPU (gloo, one thread each), batch 64 per process,
--epochs (3) from scratch: mnist_ddp.py, mnist_lightning_ddp.py and mnist_ddp_deepspeed.py with ds_config.json (ZeRO
stage 2). The figure of a run is its done line's samples_per_s: training samples over the epochs' training seconds
(evaluation, start-up and checkpoints excluded, the same for the three). Rounds alternate the three, so that drift in
the machine's speed falls on each; the best of --rounds is kept, and every round's numbers are printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"mnist_ddp.py": [], "mnist_lightning_ddp.py": [],
           "mnist_ddp_deepspeed.py": ["--deepspeed", f"--deepspeed_config={REPO / 'ds_config.json'}"]}


def samples_per_s(script, extra, args, out_dir):
    """One 2-process torchrun of `script`: its done line's samples_per_s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(REPO / script),
           f"--epochs={args.epochs}", "--batch-size=64", f"--data-dir={args.data_dir}", f"--output-dir={out_dir}",
           "--device=cpu", *extra]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out_dir)
    done = [json.loads(line[line.index("{"):]) for line in r.stdout.splitlines() if '"event": "done"' in line]
    if r.returncode or not done:
        sys.exit(f"{script} failed (exit {r.returncode}):\n{r.stdout[-3000:]}")
    return done[0]["samples_per_s"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="holds MNIST/raw")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    rates = {script: [] for script in SCRIPTS}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for script, extra in SCRIPTS.items():
                rates[script].append(samples_per_s(script, extra, args, tmp))
            print(f"round {k + 1}: " + ", ".join(f"{s} {r[-1]:.0f}" for s, r in rates.items()) + " samples/s",
                  flush=True)
    best = {script: max(r) for script, r in rates.items()}
    base = best["mnist_ddp.py"]
    print(f"mnist_ddp.py: {base:.0f} samples/s (best of {args.rounds} rounds, 2 processes, batch 64 each)")
    for script in list(SCRIPTS)[1:]:
        ratio = best[script] / base
        rounds = ", ".join(f"{r / b:.2f}" for r, b in zip(rates[script], rates["mnist_ddp.py"], strict=True))
        print(f"{script}: {best[script]:.0f} samples/s = {ratio:.2f} of mnist_ddp.py's (per round: {rounds}; goal "
              f">= 0.9){'' if ratio >= 0.9 else ' BELOW GOAL'}")


if __name__ == "__main__":
    main()
