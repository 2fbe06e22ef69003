"""mnist_fsdp.py (FSDP2, fully_shard) on CPU with gloo, on real MNIST digits: every launcher ends bit-identical, a
signal mid-epoch resumes exactly from sharded DCP checkpoints, and a save killed halfway is never loaded."""
import re
import sys

import pytest
import torch

from conftest import (PYTHON, REPO, check_clean_exit, check_signal_stop, check_time_split,
                      check_training, clean_env, done_record, epoch_lines, run, run_srun_style, run_torchrun,
                      startup_ranks, timed)

sys.path.insert(0, str(REPO))
import cluster  # noqa: E402  (the plumbing mnist_fsdp.py calls)

SCRIPT = str(REPO / "mnist_fsdp.py")
ARGS = ["--epochs=2", "--batch-size=32"]


@pytest.fixture(scope="module")
def fsdp2(mnist_dir, tmp_path_factory):
    """2 srun-style processes: the reference the other runs compare to (torchrun's runs are the save-kill test's)."""
    out_dir = tmp_path_factory.mktemp("fsdp2")
    (rcs, outs), wall = timed(run_srun_style, [PYTHON, SCRIPT] + ARGS + [f"--data-dir={mnist_dir}",
                                                                          f"--output-dir={out_dir}"],
                              ntasks=2, cwd=out_dir)
    return rcs, outs, wall, out_dir


def test_srun_style_two_tasks(fsdp2):
    """In a Slurm job (SLURM_JOB_ID) without --checkpoint-dir: checkpoints all the same, in checkpoints/JOBID."""
    rcs, outs, wall, out_dir = fsdp2
    check_training(rcs[0], outs[0] + outs[1], world_size=2)
    assert rcs[1] == 0 and epoch_lines(outs[1]) == [] and startup_ranks(outs[1]) == [1], "rank 1 stays quiet"
    check_time_split(outs[0], wall, checkpointed=True)
    assert sorted(p.name for p in out_dir.glob("checkpoints/*/epoch_*")) == ["epoch_0001", "epoch_0002"]
    weights = torch.load(out_dir / done_record(outs[0])["weights"], weights_only=True)  # gathered from both ranks
    assert weights["fc1.weight"].shape == (128, 1568) and not hasattr(weights["fc1.weight"], "full_tensor")
    assert "Net, FSDP2 over 2 processes x 32 samples, 5000 training / 10000 test digits" in outs[0]
    assert "| fp32 on cpu" in outs[0]


def test_one_process_without_a_launcher_shards_over_a_group_of_one(mnist_dir, tmp_path):
    rc, out = run([PYTHON, SCRIPT, "--epochs=1", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}"],
                  env=clean_env(), cwd=tmp_path)
    check_training(rc, out, world_size=1, epochs=1, min_acc=90.0)
    assert "Net, FSDP2 over 1 processes x 64 samples" in out


def test_signal_mid_epoch_then_resume_is_bit_identical(mnist_dir, tmp_path, fsdp2):
    """SIGUSR1 to every process (outside Slurm: the requeue fails and says so): every rank writes its shards of a DCP
    checkpoint mid-epoch and exits 75; the rerun resumes at that step and ends bit-identical to 2 uninterrupted
    epochs. Each rank's file holds its half of the weights and optimizer state, not a copy of all of them."""
    ckpt = tmp_path / "ckpt"
    cmd = [PYTHON, SCRIPT] + ARGS + [f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}", f"--checkpoint-dir={ckpt}"]
    outs = check_signal_stop(cmd, tmp_path, expect_checkpoint="epoch_000[01]_step_*")
    assert "could not requeue job" in outs[0]
    [stopped] = ckpt.glob("epoch_000[01]_step_*")
    shards = sorted(stopped.glob("__*.distcp"))
    assert [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"] and (stopped / ".metadata").exists()
    sizes = [p.stat().st_size for p in shards]  # Net: 215,370 float32 weights, each with AdamW's two moments
    assert all(0.4 < size / (215_370 * 3 * 4) < 0.6 for size in sizes), sizes
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path)
    assert rcs == [0, 0], outs[0][-3000:]
    assert re.search(r"resumed from .*_step_\d+: epoch [01] done and \d+ steps of epoch [12]", outs[0]), outs[0][-3000:]
    assert done_record(outs[0])["param_checksums"] == done_record(fsdp2[1][0])["param_checksums"], \
        "interrupted + resumed != uninterrupted"

    # one process cannot take over the shards of two ranks' data and batches: refused in one line that says why
    rc, out = run(cmd, env=clean_env(), cwd=tmp_path, timeout=120)
    [error] = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert rc == 1 and "was written by another run: world_size 2 -> 1 (each rank's shard" in error, out[-3000:]

    # a damaged shard of the newest checkpoint: a clear error naming it, not a fresh start over it
    newest = sorted(p for p in ckpt.iterdir())[-1]
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path, timeout=120)
    assert rcs[0] == 1 and f"ERROR: could not load checkpoint {newest} (" in outs[0], outs[0][-3000:]
    assert "HINT" in outs[0], outs[0][-3000:]


# rank 1 dies while writing its shard of epoch 2's checkpoint: its file cut short, rank 0's whole
RANK_1_DIES_WHILE_SAVING = """
import os, sys, time
from torch.distributed.checkpoint import filesystem
real_write = filesystem.FileSystemWriter.write_data
def write_data(self, plan, planner):
    result = real_write(self, plan, planner)
    result.wait()
    if os.environ["RANK"] == "1" and "epoch_0002" in str(self.path):
        for name in os.listdir(self.path):
            if name.startswith("__1_"):
                with open(os.path.join(self.path, name), "r+b") as f:
                    f.truncate(1000)
        print("SAVING", flush=True)
        time.sleep(8)
        os._exit(9)
    return result
filesystem.FileSystemWriter.write_data = write_data
import mnist_fsdp
mnist_fsdp.main(mnist_fsdp.get_args(sys.argv[1:]))
"""


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_to_resume_from(mnist_dir, tmp_path, fsdp2):
    """A checkpoint folder takes its name only once every rank's shards, DCP's metadata and the script's state are on
    disk: the rerun resumes from epoch 1's, clears the half-written one, and ends bit-identical to the uninterrupted
    run."""
    wrapper = tmp_path / "dies_while_saving.py"
    wrapper.write_text(RANK_1_DIES_WHILE_SAVING)
    ckpt = tmp_path / "ckpt"
    args = ARGS + [f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}", f"--checkpoint-dir={ckpt}"]
    rc, out = run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)] + args,
                  env=clean_env(PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert rc != 0 and "SAVING" in out, out[-3000:]
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0001", "epoch_0002.partial"]
    rc, out, ranks = run_torchrun([SCRIPT] + args, cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert f"resumed from {ckpt / 'epoch_0001'}: epoch 1 done, continuing at epoch 2" in out, out[-3000:]
    assert [e for _, e, _ in epoch_lines(out)] == [2] and epoch_lines(ranks[1]) == [], out[-3000:]
    assert startup_ranks(out) == [0, 1] and done_record(out)["test_count"] == 10000
    assert done_record(out)["param_checksums"] == done_record(fsdp2[1][0])["param_checksums"]
    check_clean_exit(out)
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0001", "epoch_0002"]


@pytest.mark.parametrize("foreign", ["epoch_0001.pt", "epoch_0001/mp_rank_00_model_states.pt"])
def test_foreign_checkpoints_are_refused(foreign, tmp_path, capsys):
    """mnist_ddp.py's file, DeepSpeed's folder: never a silent fresh start over them (in-process: what the script's
    load_checkpoint(..., sharded=True) does before it loads a shard)."""
    path = tmp_path / "ckpt" / foreign
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not from mnist_fsdp.py")
    with pytest.raises(SystemExit) as stop:
        cluster.load_checkpoint(str(tmp_path / "ckpt"), {"script": "mnist_fsdp.py"}, torch.device("cpu"),
                                sharded=True)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "holds checkpoints that are not DCP folders of mnist_fsdp.py" in err, err


def test_the_diff_from_mnist_ddp_is_what_fsdp2_changes():
    """Siblings stay diff-able: what differs from mnist_ddp.py is FSDP2's (sharding, its mixed precision, the sharded
    state dicts), in fewer lines than the DeepSpeed sibling's diff."""
    import difflib
    ddp, fsdp = ((REPO / name).read_text().splitlines() for name in ("mnist_ddp.py", "mnist_fsdp.py"))
    changed = [line for line in difflib.unified_diff(ddp, fsdp, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) <= 100, len(changed)
    added = "\n".join(line for line in changed if line.startswith("+"))
    for needed in ("fully_shard(layer, mp_policy=mixed)", "fully_shard(raw_model, mp_policy=mixed)",
                   "MixedPrecisionPolicy(param_dtype=amp_dtype", "get_state_dict(raw_model, optimizer)",
                   "set_state_dict(raw_model, optimizer", "shards={",
                   "cluster.load_checkpoint(args.checkpoint_dir, run, device, sharded=True)"):
        assert needed in added, needed
    assert "DDP(" not in "\n".join(fsdp) and "GradScaler" not in "\n".join(fsdp)
