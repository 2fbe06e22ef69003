"""mnist_lightning_ddp.py on CPU with gloo, on real MNIST digits: Lightning's own launcher, srun-style, torchrun."""
import json
import re
import signal

import pytest

from exit_probe.sitecustomize import COLLECTIVES_LINE
from conftest import (PYTHON, REPO, check_profile, check_signal_stop, check_srun_style, check_time_split,
                      check_training, clean_env, copy_alone, done_record, epoch_lines, run, run_srun_style,
                      run_torchrun, tensorboard_scalars, timed)

SCRIPT = str(REPO / "mnist_lightning_ddp.py")


@pytest.fixture(scope="module")
def lightning_spawned(mnist_dir, tmp_path_factory):
    """plain python --gpus=2 on CPU, of a copy with cluster/ alone: Lightning starts the second process itself."""
    out_dir = tmp_path_factory.mktemp("lightning")
    alone = copy_alone(out_dir / "project", "mnist_lightning_ddp.py")  # the script and cluster/, nothing else
    (rc, out), wall = timed(run, [PYTHON, alone, "--gpus=2", "--epochs=2", "--batch-size=32",
                                  f"--data-dir={mnist_dir}", f"--output-dir={out_dir}"], env=clean_env(), cwd=out_dir)
    return rc, out, wall


def test_plain_python_with_gpus_2_on_cpu(lightning_spawned):
    rc, out, wall = lightning_spawned
    check_training(rc, out, world_size=2)
    check_time_split(out, wall, checkpointed=False)  # rank 0 is the process we started
    assert "Starting with 2 processes" in out


def test_srun_tasks_per_node_differs_from_gpus_fails_fast_with_hint(mnist_dir, tmp_path):
    rcs, outs = run_srun_style([PYTHON, SCRIPT, "--gpus=4", "--epochs=1", f"--data-dir={mnist_dir}"],
                               ntasks=2, cwd=tmp_path, timeout=120)
    assert all(rc != 0 for rc in rcs)
    errors = [line for line in "".join(outs).splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, outs  # one line, from rank 0
    assert "--ntasks-per-node=2" in errors[0] and "HINT" in errors[0] and "--gpus=4" in errors[0]


def test_torchrun_two_processes(mnist_dir, tmp_path, lightning_spawned):
    rc, out, ranks = run_torchrun([SCRIPT, "--epochs=1", "--batch-size=32", f"--data-dir={mnist_dir}",
                                   f"--output-dir={tmp_path}", "--profile"], cwd=tmp_path, COLLECTIVE_PROBE=1)
    check_training(rc, out, world_size=2, epochs=1, min_acc=90.0)  # --gpus comes from torchrun's LOCAL_WORLD_SIZE
    # no collective per step: Lightning's broadcast of its SIGTERM flag is off, our stop check runs every
    # STOP_CHECK_EVERY steps (78 steps per rank here; before, 78 broadcasts)
    steps = 2500 // 32
    for rank in (0, 1):
        [line] = [line for line in ranks[rank].splitlines() if line.startswith(COLLECTIVES_LINE)]
        calls = json.loads(line[len(COLLECTIVES_LINE):])
        assert calls["rank"] == str(rank) and calls.get("all_reduce", 0) >= steps // 10, calls
        assert calls.get("broadcast", 0) + calls.get("all_reduce", 0) < steps // 2, calls
    assert epoch_lines(ranks[1]) == [], "only rank 0 prints epochs"
    # the same first epoch as Lightning's own 2 processes (1 epoch here, to keep CI under 20 minutes)
    assert epoch_lines(out)[0][2] == epoch_lines(lightning_spawned[1])[0][2]
    check_profile(ranks[0], tmp_path)
    assert "profile of" not in ranks[1], "rank 0 profiles"


def test_resume_from_last_checkpoint(mnist_dir, tmp_path, lightning_spawned):
    ckpt = tmp_path / "ckpt"
    base = [PYTHON, SCRIPT, "--gpus=2", "--batch-size=32", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
            f"--checkpoint-dir={ckpt}"]
    rcs, outs = run_srun_style(base + ["--epochs=1"], ntasks=2, cwd=tmp_path)
    assert rcs == [0, 0], outs[0][-3000:]
    assert (ckpt / "last.ckpt").exists()
    rcs, outs = run_srun_style(base + ["--epochs=2"], ntasks=2, cwd=tmp_path)
    rc, out = rcs[0], outs[0]
    assert rc == 0, out[-3000:]
    assert re.search(r"resumed from .*last\.ckpt: epoch 1 done, continuing at epoch 2$", out, re.M), out[-3000:]
    assert [e for _, e, _ in epoch_lines(out)] == [2], "epoch 1 must not be trained again"
    assert done_record(out)["param_checksums"] == done_record(lightning_spawned[1])["param_checksums"], \
        "1 epoch + resumed 1 epoch must equal 2 uninterrupted epochs"
    # another run's settings: refused in one line, before anything is trained or written
    rcs, outs = run_srun_style(base + ["--epochs=3", "--batch-size=16", "--amp"], ntasks=2, cwd=tmp_path)
    [error] = [line for line in outs[0].splitlines() if line.startswith("ERROR:")]
    assert rcs[0] == 1 and "was written by another run: amp False -> True, batch_size 32 -> 16. HINT" in error, \
        outs[0][-3000:]
    assert epoch_lines(outs[0]) == []


def test_signal_mid_epoch_then_resume_is_bit_identical(mnist_dir, tmp_path, lightning_spawned):
    """SIGTERM to every process of two srun-style ranks: our handlers, not Lightning's (which would end the run without
    a checkpoint), note it; the ranks agree at a batch boundary, a mid-epoch last.ckpt goes into --checkpoint-dir and
    both exit 75. The rerun, srun-style as well, resumes at that step, rank 1 quiet, and ends bit-identical to 2
    uninterrupted epochs that Lightning's own launcher started."""
    ckpt = tmp_path / "ckpt"
    cmd = [PYTHON, SCRIPT, "--gpus=2", "--epochs=2", "--batch-size=32", f"--data-dir={mnist_dir}",
           f"--output-dir={tmp_path}", f"--checkpoint-dir={ckpt}"]
    outs = check_signal_stop(cmd, tmp_path, expect_checkpoint="last.ckpt", sig=signal.SIGTERM)
    assert re.search(r"stopped on SIGTERM: checkpoint at epoch 1 step \d+$", outs[0], re.M), outs[0][-2000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt"], "no epoch ended: only the mid-epoch checkpoint"
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path)
    check_srun_style(rcs, outs, reference_out=lightning_spawned[1])
    assert re.search(r"resumed from .*last\.ckpt: epoch 0 done and \d+ steps of epoch 1, continuing at epoch 1",
                     outs[0]), outs[0][-3000:]
    assert "not resumable" not in outs[0], "ResumedBatches goes on at the step: no warning that it starts over"
    done = done_record(outs[0])
    assert done["param_checksums"] == done_record(lightning_spawned[1])["param_checksums"], \
        "interrupted + resumed != uninterrupted"

    # Lightning's TensorBoardLogger: one run, continued by the rerun, each point once
    [run_dir] = (tmp_path / "tensorboard").iterdir()
    curves = tensorboard_scalars(run_dir)
    steps = 79  # 2,500 digits per rank in batches of 32
    assert [s for s, _ in curves["train/loss"]] == [e * steps + s + 1 for e in range(2) for s in range(0, steps, 20)]
    assert [s for s, _ in curves["epoch/test_acc"]] == [steps, 2 * steps]
    assert curves["epoch/test_acc"][-1][1] == pytest.approx(done["test_acc"], rel=1e-6)
