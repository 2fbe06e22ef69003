"""gpt_fsdp.py's speed beside mnist_fsdp.py's, side by side in one run: tokens/s, optimizer steps/s and MFU.

    .venv/bin/python bench/bench_gpt.py --data-dir ../shared/data              # CPU: 2 processes, gloo
    .venv/bin/python bench/bench_gpt.py --device=cuda --model=small --data-dir DIR   # every GPU of the machine

Each round runs, one after the other, under torchrun: gpt_fsdp.py for --steps optimizer steps on byte tokens of
Python's standard library (prepare_tokens.py, into a temporary folder), and mnist_fsdp.py for one epoch. The figures
of a run are its done line's: tokens/s (training time only: start-up, evaluation and sampling excluded), its FLOPs per
token, and the MFU. On a GPU the MFU is the efficiency line's, against the GPU's dense bf16 peak. A CPU has no peak in
that table, so here the MFU is against this CPU's own rate on a large float32 matrix product, one thread, as each
process has (OMP_NUM_THREADS=1): measured in the same run. Rounds alternate the scripts; the best round is kept and
every round is printed. No goal: the figures say what a step costs, and how the GPT's compare with the smallest model.
"""
import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU = ["--model=tiny", "--seq-len=128", "--batch-size=8", "--batch-tokens=4096"]  # 2 micro-steps on 2 processes


def done_line(cmd, cwd, env):
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    done = [json.loads(line[line.index("{"):]) for line in r.stdout.splitlines() if '"event": "done"' in line]
    if r.returncode or not done:
        sys.exit(f"{cmd[3]} failed (exit {r.returncode}):\n{r.stdout[-3000:]}")
    return done[0]


def matmul_flops(size=1024, repeats=20):
    """This CPU's float32 matrix-product rate in FLOP/s, on one thread (as every benchmarked process runs)."""
    import torch
    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"), help="holds MNIST/raw")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="gpt_fsdp.py's --model (default: tiny on CPU, small on GPUs)")
    p.add_argument("--steps", type=int, default=60, help="gpt_fsdp.py's optimizer steps per round (default: 60)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import torch
    nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    gpt_args = CPU if args.device == "cpu" else ["--seq-len=1024", "--batch-size=8", f"--batch-tokens={8192 * nproc}"]
    gpt_args = gpt_args + ([f"--model={args.model}"] if args.model else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    rows = {"gpt": [], "mnist": []}
    with tempfile.TemporaryDirectory() as tmp:
        stdlib = sysconfig.get_paths()["stdlib"]
        subprocess.run([sys.executable, str(REPO / "prepare_tokens.py"), *(f"{stdlib}/{d}" for d in (
            "asyncio", "email", "json", "logging", "unittest")), "--pattern=*.py", f"--out-dir={tmp}/tokens",
            "--val-tokens=50000"], check=True, stdout=subprocess.DEVNULL)
        for k in range(args.rounds):
            gpt = done_line(torchrun + [str(REPO / "gpt_fsdp.py"), *gpt_args, f"--max-steps={args.steps}",
                                        f"--eval-every={args.steps}", "--val-tokens=16384", "--samples=0",
                                        f"--data-dir={tmp}/tokens", f"--output-dir={tmp}", f"--device={args.device}",
                                        "--checkpoint-dir=none"], tmp, env)
            mnist = done_line(torchrun + [str(REPO / "mnist_fsdp.py"), "--epochs=1", "--batch-size=64",
                                          f"--data-dir={args.data_dir}", f"--output-dir={tmp}",
                                          f"--device={args.device}", "--checkpoint-dir=none"], tmp, env)
            rows["gpt"].append(gpt)
            rows["mnist"].append(mnist)
            print(f"round {k + 1}: gpt_fsdp.py {gpt['tokens_per_s'] / nproc:,.0f} tokens/s per process, mnist_fsdp.py "
                  f"{mnist['samples_per_s'] / nproc:,.0f} samples/s per process", flush=True)
    peak = matmul_flops() if args.device == "cpu" else None
    gpt = max(rows["gpt"], key=lambda d: d["tokens_per_s"])
    mnist = max(rows["mnist"], key=lambda d: d["samples_per_s"])
    batch_tokens = int(gpt_args[3].split("=")[1]) if args.device == "cpu" else 8192 * nproc
    figures = gpt["efficiency"]
    mfu = figures["mfu"] if peak is None else figures["flops_per_token"] * figures["tokens_per_s_per_gpu"] / peak
    against = f"{peak / 1e9:.1f} GFLOP/s, this CPU's float32 matmul on one thread" if peak else \
        f"{figures['peak_flops'] / 1e12:g} TFLOP/s ({figures['precision']})" if figures["peak_flops"] else "no peak"
    unit = "GPU" if args.device == "cuda" else "process"
    print(f"gpt_fsdp.py {' '.join(gpt_args)}: {figures['tokens_per_s_per_gpu']:,.0f} tokens/s per {unit}, "
          f"{gpt['tokens_per_s'] / batch_tokens:.2f} optimizer steps/s, "
          f"{figures['flops_per_token'] / 1e9:.4f} GFLOP per token, MFU "
          f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} of {against}; peak memory "
          f"{figures['peak_memory_bytes'] / 2 ** 30:.2f} GiB (best of {args.rounds} rounds, {nproc} processes)")
    print(f"mnist_fsdp.py --batch-size=64: {mnist['samples_per_s'] / nproc:,.0f} samples/s per {unit}, "
          f"{mnist['samples_per_s'] / (64 * nproc):.2f} optimizer steps/s")


if __name__ == "__main__":
    main()
