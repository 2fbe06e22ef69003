"""The MNIST siblings on the same work, side by side in one run: each framework's training step rate against
mnist_ddp.py's. Prints each ratio; the goal is at least 0.9 for Lightning and DeepSpeed. FSDP2's has no goal: it is
what sharding a 215,370-weight model costs (each layer's weights gathered before its forward and again before its
backward, each gradient reduce-scattered), which only a model too big for one GPU repays.

    .venv/bin/python bench/bench_siblings.py --data-dir ../shared/data

Each round runs, one after another, 2 processes under torchrun on CPU (gloo, one thread each), batch 64 per process,
--epochs (3) from scratch: mnist_ddp.py, mnist_lightning_ddp.py, mnist_ddp_deepspeed.py with ds_config.json (ZeRO
stage 2) and mnist_fsdp.py. The figure of a run is its done line's samples_per_s: training samples over the epochs'
training seconds (evaluation, start-up and checkpoints excluded, the same for all). Rounds alternate the scripts, so
that drift in the machine's speed falls on each; the best of --rounds is kept, and every round's numbers are printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DS = ["--deepspeed", f"--deepspeed_config={REPO / 'ds_config.json'}"]
SCRIPTS = {"mnist_ddp.py": [], "mnist_lightning_ddp.py": [], "mnist_ddp_deepspeed.py": DS, "mnist_fsdp.py": []}
# on request (--only), to find where DeepSpeed's time goes: ZeRO stage 0 leaves out the partitions' all-gather after
# each step, and the second also the gradient norm's all-reduce (ds_config.json clips at 1.0)
VARIANTS = {"mnist_ddp_deepspeed.py --zero-stage=0": DS + ["--zero-stage=0"]}
GOAL = {"mnist_lightning_ddp.py": 0.9, "mnist_ddp_deepspeed.py": 0.9}  # of mnist_ddp.py's samples/s


def samples_per_s(name, extra, args, out_dir):
    """One 2-process torchrun of the script `name` begins with: its done line's samples_per_s."""
    script = name.split()[0]
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
    p.add_argument("--only", nargs="+", choices=list(SCRIPTS)[1:] + list(VARIANTS),
                   help="compare only these with mnist_ddp.py")
    args = p.parse_args()
    scripts = {s: extra for s, extra in {**SCRIPTS, **VARIANTS}.items()
               if s == "mnist_ddp.py" or (s in args.only if args.only else s in SCRIPTS)}
    rates = {script: [] for script in scripts}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for script, extra in scripts.items():
                rates[script].append(samples_per_s(script, extra, args, tmp))
            print(f"round {k + 1}: " + ", ".join(f"{s} {r[-1]:.0f}" for s, r in rates.items()) + " samples/s",
                  flush=True)
    best = {script: max(r) for script, r in rates.items()}
    base = best["mnist_ddp.py"]
    print(f"mnist_ddp.py: {base:.0f} samples/s (best of {args.rounds} rounds, 2 processes, batch 64 each)")
    for script in list(scripts)[1:]:
        ratio = best[script] / base
        rounds = ", ".join(f"{r / b:.2f}" for r, b in zip(rates[script], rates["mnist_ddp.py"], strict=True))
        goal = f"goal >= {GOAL[script]}" if script in GOAL else "no goal: the cost of sharding" \
            if script == "mnist_fsdp.py" else "no goal: where the time goes"
        print(f"{script}: {best[script]:.0f} samples/s = {ratio:.2f} of mnist_ddp.py's (per round: {rounds}; {goal})"
              f"{' BELOW GOAL' if ratio < GOAL.get(script, 0) else ''}")


if __name__ == "__main__":
    main()
