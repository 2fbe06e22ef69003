"""bench/bench_gpu.py, the one-command GPU proof of every script, run at toy sizes so that it cannot rot: on CPU
(--device=cpu --smoke) here, and on a GPU where there is one."""
import json
import sys

import pytest

from conftest import PYTHON, REPO, clean_env, run

BENCH = str(REPO / "bench" / "bench_gpu.py")
TRAININGS = {"mnist_ddp fp32", "mnist_ddp --amp", "mnist_lightning_ddp --amp", "mnist_ddp_deepspeed bf16 ZeRO-2",
             "imagenet_ddp --synthetic", "imagenet_ddp real JPEGs"}


TOY = """
import warnings
import torch

w = torch.nn.Parameter(torch.zeros(2))
opt = torch.optim.SGD([w], lr=0.1)
for step in range(30):
    w.sum().backward()
    opt.step()
    warnings.warn("Foo called a synchronizing CUDA operation")  # what torch says, once per step
    if step % 10 == 0:
        warnings.warn("Bar called a synchronizing CUDA operation")  # a log step
warnings.warn("an ordinary warning")
"""


def test_the_sync_probe_counts_syncs_by_line_and_finds_the_per_step_ones(tmp_path):
    """On a GPU, torch.cuda.set_sync_debug_mode("warn") makes every host sync a warning; here a toy script raises the
    same warning itself, so the probe's counting and attribution are checked without a GPU."""
    (tmp_path / "toy.py").write_text(TOY)
    rc, out = run([PYTHON, BENCH, "--probe", str(tmp_path / "toy.py"), str(tmp_path / "report.json"), "--"],
                  env=clean_env(), cwd=tmp_path, timeout=120)
    assert rc == 0, out
    assert "an ordinary warning" in out, "other warnings still show"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 30
    lines = TOY.splitlines()
    key = {word: next(f"toy.py:{n}: {line.strip()[:80]}" for n, line in enumerate(lines, 1) if word in line)
           for word in ("Foo", "Bar")}
    assert report["syncs"] == {key["Foo"]: 30, key["Bar"]: 3}, "counted by the script line each came from"
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu
    summary = bench_gpu.sync_summary(report)
    assert summary["syncs_total"] == 33 and summary["per_step_sync_lines"] == [key["Foo"]]


def harness(mnist_dir, out, device):
    env = clean_env()
    if device == "cuda":  # clean_env hides GPUs from the CPU tests
        env.pop("CUDA_VISIBLE_DEVICES")
    rc, log = run([PYTHON, BENCH, f"--data-dir={mnist_dir}", f"--device={device}", "--smoke", f"--out={out}"],
                  env=env, timeout=900)
    assert rc == 0, log[-5000:]
    return json.loads((out / "results.json").read_text()), (out / "summary.txt").read_text(), log


def test_the_gpu_harness_runs_every_check_on_cpu(mnist_dir, tmp_path):
    """Every check at smoke sizes, but ImageNet's preemption: on a CPU it is the same harness code as mnist_ddp's, and
    tests/test_imagenet_ddp.py checks ImageNet's exact resume."""
    res, summary, log = harness(mnist_dir, tmp_path, "cpu")
    trainings = res["trainings"]
    assert set(trainings) == TRAININGS, sorted(trainings)
    for name, r in trainings.items():
        assert r["rc"] == 0 and r["done"], (name, r.get("tail"))
        assert r["steps"] > 0, f"{name}: the sync probe counted no optimizer step, so it did not run"
        assert r["syncs_total"] == 0, "CUDA sync warnings on CPU?"
    for name in ("mnist_ddp fp32", "mnist_lightning_ddp --amp", "mnist_ddp_deepspeed bf16 ZeRO-2"):
        assert trainings[name]["done"]["test_acc"] >= 0.88, name  # 1 epoch on the 5,000-digit sample
    assert trainings["imagenet_ddp real JPEGs"]["done"]["val_count"] > 0
    loss = trainings["imagenet_ddp --synthetic"]["epochs"][-1]["train_loss"]
    assert loss == loss and loss < 1e4, "a finite loss"

    checks = res["checks"]
    assert "preemption imagenet_ddp" not in checks
    for name in ("preemption mnist_ddp",):
        c = checks[name]
        assert c["stopped"]["signalled"] and c["stopped_with_75"] and c["resumed_mid_epoch"], name
        assert c["bit_identical"] and c["max_abs_diff"] == 0.0, f"{name}: on CPU a resumed run is bit-identical"
        assert c["resumed"]["steps"] > 0 and c["resumed"]["per_step_sync_lines"] == [], "the resumed run is probed"
    assert checks["P6"]["epochs_run"] == 1 and checks["P6"]["best_acc"] > 0.88
    assert all(v and v > 0 for v in checks["P7"].values()) and len(checks["P7"]) == 2
    assert checks["P8"]["dataloader_img_s"] > 0 and checks["P8"]["decode_jpeg_img_s"] > 0
    assert 0 < checks["P9"]["fraction"]
    for figure in ("P6", "P7", "P8", "P9", "preemption mnist_ddp"):
        assert figure in summary, summary
    assert "bench_gpu.py on CPU (--device=cpu) (smoke sizes)" in summary and "FAILED" not in summary


def test_the_gpu_harness_on_a_gpu_finds_no_per_step_host_sync(mnist_dir, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no GPU on this machine: run bench/bench_gpu.py on a GPU machine (bench/README.md says how)")
    res, summary, log = harness(mnist_dir, tmp_path, "cuda")
    probed = [(name, r) for name, r in res["trainings"].items()] + [
        (f"{name}, resumed", c["resumed"]) for name, c in res["checks"].items() if name.startswith("preemption")]
    for name, r in probed:
        assert r["rc"] == 0 and r["done"], name
        assert r["per_step_sync_lines"] == [], f"{name} syncs the host on every step: {r['per_step_sync_lines']}"
