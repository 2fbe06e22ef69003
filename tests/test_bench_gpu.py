"""bench/bench_gpu.py, the one-command GPU proof of every script, run at toy sizes so that it cannot rot: on CPU
(--device=cpu --smoke) here, and on a GPU where there is one."""
import contextlib
import json
import sys
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, clean_env, run

BENCH = str(REPO / "bench" / "bench_gpu.py")
TRAININGS = {"mnist_ddp fp32", "mnist_ddp --amp", "mnist_lightning_ddp --amp", "mnist_ddp_deepspeed bf16 ZeRO-2",
             "imagenet_ddp --synthetic", "imagenet_ddp real JPEGs"}


TOY = """
import warnings
import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="file://STORE", rank=0, world_size=1)
w = torch.nn.Parameter(torch.zeros(2))
opt = torch.optim.SGD([w], lr=0.1)
for step in range(30):
    w.sum().backward()
    opt.step()
    warnings.warn("Foo called a synchronizing CUDA operation")  # what torch says, once per step
    dist.all_reduce(w.detach().clone())  # a collective on every step
    if step % 10 == 0:
        warnings.warn("Bar called a synchronizing CUDA operation")  # a log step
        try:
            torch.cuda.synchronize()  # raises no warning on a GPU, and raises here: counted either way
        except (RuntimeError, AssertionError):
            pass
warnings.warn("an ordinary warning")
dist.destroy_process_group()
"""


def test_the_sync_probe_counts_syncs_and_collectives_by_line_and_finds_the_per_step_ones(tmp_path):
    """On a GPU, torch.cuda.set_sync_debug_mode("warn") makes every host sync a warning; here a toy script raises the
    same warning itself, so the probe's counting and attribution are checked without a GPU. torch.cuda.synchronize
    and the collectives raise no warning: the probe wraps them."""
    toy = TOY.replace("STORE", str(tmp_path / "store"))
    (tmp_path / "toy.py").write_text(toy)
    rc, out = run([PYTHON, BENCH, "--probe", str(tmp_path / "toy.py"), str(tmp_path / "report.json"), "--"],
                  env=clean_env(), cwd=tmp_path, timeout=120)
    assert rc == 0, out
    assert "an ordinary warning" in out, "other warnings still show"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"] == 30
    lines = toy.splitlines()
    key = {word: next(f"toy.py:{n}: {line.strip()[:80]}" for n, line in enumerate(lines, 1) if word in line)
           for word in ("Foo", "Bar", "torch.cuda.synchronize()", "dist.all_reduce")}
    assert report["syncs"] == {key["Foo"]: 30, key["Bar"]: 3,
                               key["torch.cuda.synchronize()"] + " [torch.cuda.synchronize]": 3}, report["syncs"]
    assert report["collectives"] == {key["dist.all_reduce"] + " [all_reduce]": 30}, report["collectives"]
    sys.path.insert(0, str(REPO / "bench"))
    import bench_gpu
    summary = bench_gpu.sync_summary(report)
    assert summary["syncs_total"] == 36 and summary["per_step_sync_lines"] == [key["Foo"]]
    assert summary["per_step_collective_lines"] == [key["dist.all_reduce"] + " [all_reduce]"]


def harness(mnist_dir, out, device):
    env = clean_env()
    if device == "cuda":  # clean_env hides GPUs from the CPU tests
        env.pop("CUDA_VISIBLE_DEVICES")
    rc, log = run([PYTHON, BENCH, f"--data-dir={mnist_dir}", f"--device={device}", "--smoke", f"--out={out}",
                   "--budget=3000"], env=env, timeout=900)
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
        for run_ in ("uninterrupted", "stopped", "resumed"):
            assert "deterministic kernels" in (Path(c[run_]["dir"]) / "log.txt").read_text(), run_
    assert checks["P6"]["epochs_run"] == 1 and checks["P6"]["best_acc"] > 0.88
    assert all(v and v > 0 for v in checks["P7"].values()) and len(checks["P7"]) == 2
    assert checks["P8"]["dataloader_img_s"] > 0 and checks["P8"]["decode_jpeg_img_s"] > 0
    assert 0 < checks["P9"]["fraction"] and checks["P9"]["real_epoch"] == 2, "P9 meters the second epoch"
    assert res["skipped"] == {} and res["errors"] == {}, (res["skipped"], res["errors"])
    assert [r["name"] for r in res["runs"]][:2] == ["mnist-fp32", "lightning-amp"] and len(res["runs"]) == 8, \
        "every run, in results.json as it ended"
    ds = trainings["mnist_ddp_deepspeed bf16 ZeRO-2"]
    assert ds["collectives_total"] >= ds["steps"] > 0, "the probe sees DeepSpeed's collectives (gradients, clipping)"
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


def test_the_gpu_harness_keeps_what_it_measured_when_it_is_killed(mnist_dir, tmp_path):
    """results.json and summary.txt are whole after every run: killed during its second training (as a 10-minute
    limit would), the harness has left the first one's results."""
    import os
    import signal
    import subprocess
    import time
    p = subprocess.Popen([PYTHON, BENCH, f"--data-dir={mnist_dir}", "--device=cpu", "--smoke", f"--out={tmp_path}"],
                         env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        second = tmp_path / "runs" / "02-lightning-amp"
        while time.monotonic() < deadline and p.poll() is None and not second.exists():
            time.sleep(0.1)
        assert p.poll() is None, "the harness ended before its second training began"
        os.killpg(p.pid, signal.SIGKILL)  # the harness and its training, at once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["trainings"]["mnist_ddp fp32"]["done"]["test_acc"] > 0.88, res["trainings"]
    assert "mnist_lightning_ddp --amp" not in res["trainings"], "the killed training has no result"
    summary = (tmp_path / "summary.txt").read_text()
    assert "mnist_ddp fp32" in summary and "test acc" in summary, summary


def test_the_gpu_harness_skips_what_would_not_fit_its_budget_compile_variants_last(mnist_dir, tmp_path):
    """--budget 1 at full sizes: no step fits, so each is skipped with a note (nothing runs), in the order the harness
    takes them, the --compile variants last; results.json and summary.txt say so."""
    rc, log = run([PYTHON, BENCH, f"--data-dir={mnist_dir}", "--device=cpu", f"--out={tmp_path}", "--budget=1"],
                  env=clean_env(), timeout=300)
    assert rc == 0, log[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["trainings"] == {} and res["runs"] == [] and res["errors"] == {}
    skipped = list(res["skipped"])
    assert skipped[0] == "mnist_ddp fp32" and skipped[-2:] == ["mnist_ddp --compile", "P7 --compile"], skipped
    notes = res.pop("skipped")
    p9 = notes.pop("P9")  # it takes no time of its own: skipped for the budget, or for the training it builds on
    assert "s of --budget left" in p9 or p9 == "needs imagenet_ddp real JPEGs, which did not run or did not finish", p9
    assert len(notes) == 14 and all("s of --budget left" in why for why in notes.values()), notes
    summary = (tmp_path / "summary.txt").read_text()
    assert "skipped P7 --compile: needs about 120 s" in summary, summary


def test_deterministic_mode_keeps_cudnns_autotuner_off_even_when_a_script_turns_it_on():
    """imagenet_ddp.py sets torch.backends.cudnn.benchmark = True; under the harness's preemption runs it stays off,
    so the interrupted and uninterrupted runs pick the same convolution algorithms."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import bench_gpu; bench_gpu.deterministic(torch); "
            "torch.backends.cudnn.benchmark = True; "
            "print(torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(), "
            "torch.is_deterministic_algorithms_warn_only_enabled())")
    rc, out = run([PYTHON, "-c", code, str(REPO / "bench")], env=clean_env(), timeout=120)
    assert rc == 0 and out.strip().splitlines()[-1] == "False True True", out
