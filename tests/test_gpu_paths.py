"""The code paths that only run on GPUs, exercised on CPU: which GPU each rank takes (simulated allocations, the
environments measured on the test cluster's real srun), the mixed-precision type per GPU generation, Lightning's
Trainer on simulated GPUs, the GPU's random state in checkpoints, DeepSpeed's dtype taken from the engine, errors
from every rank that cannot meet the others, and the ImageNet dataset's compact sample tables."""
import os
import sys
import time

import pytest
import torch

from conftest import (PYTHON, REPO, clean_env, copy_alone, done_record, epoch_lines, make_imagenet_archives, run, start)

sys.path.insert(0, str(REPO))
import cluster  # noqa: E402
import imagenet_ddp  # noqa: E402
import imagenet_staging  # noqa: E402
import mnist_lightning_ddp  # noqa: E402

SRUN = {"SLURM_STEP_ID": "0", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("visible, local_rank, env, expected", [
    # torchrun: all of the node's GPUs visible to every process
    (4, 3, {"LOCAL_WORLD_SIZE": "4"}, 3),
    # srun, --gres=gpu:4 --ntasks-per-node=4: every task sees all four (as measured on the test cluster)
    (4, 2, {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4"}, 2),
    # srun, --gpus-per-task=1 / --gpu-bind=single:1 / --ntasks-per-gpu=1: each task sees only its own GPU
    (1, 3, {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4"}, 0),
    # srun, 8 GPUs and 4 tasks with --gpus-per-task=2: its first
    (2, 1, {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "8"}, 0),
    # the second node of "2(x2),1": two tasks there
    (2, 1, {**SRUN, "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_GPUS_ON_NODE": "2"}, 1),
    # DeepSpeed's launcher and mpirun say how many processes they started on this node
    (2, 1, {"LOCAL_SIZE": "2"}, 1),
    (4, 3, {"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 3),
    # one process, one GPU
    (1, 0, {}, 0),
])
def test_each_rank_takes_a_gpu_of_its_own(visible, local_rank, env, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert cluster.gpu_index(local_rank, env) == expected


@pytest.mark.parametrize("visible, local_rank, env, processes", [
    (2, 0, {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "2"}, 4),  # --gres=gpu:2, 4 tasks
    (1, 0, {**SRUN, "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "1"}, 2),  # --gres=gpu:1, 2 tasks
    (1, 1, {"LOCAL_WORLD_SIZE": "4", "SLURM_GPUS_ON_NODE": "4"}, 4),  # torchrun --nproc-per-node=4 in a 1-GPU task
    (2, 2, {}, 3),  # a launcher that says nothing: at least local rank + 1 processes
])
def test_more_processes_than_gpus_is_one_clear_error(visible, local_rank, env, processes, monkeypatch):
    """Today's LOCAL_RANK % device_count would put two ranks on one GPU, and NCCL fails with "Duplicate GPU"."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    with pytest.raises(ValueError) as e:
        cluster.gpu_index(local_rank, env)
    assert f"{processes} processes on " in str(e.value) and f"share {visible} visible GPU" in str(e.value)
    assert "HINT: one process per GPU" in str(e.value) and "--gpus-per-node=N" in str(e.value)


@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_bfloat16_only_where_the_gpu_has_it(capability, dtype, monkeypatch):
    """torch.cuda.is_bf16_supported() says yes on a T4 (7.5) too, where bfloat16 is emulated: fp16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cluster.autocast_dtype(torch.device("cuda", 0)) == dtype
    assert cluster.autocast_dtype(torch.device("cuda", 0), amp=False) is None


@pytest.mark.parametrize("argv, matmul, line", [([], "high", "float32 as TF32"),
                                                 (["--no-tf32"], "highest", "float32 in full")])
def test_tf32_on_gpus_unless_turned_off_and_said_in_the_start_up_line(argv, matmul, line, monkeypatch, capfd):
    """On a GPU (simulated), float32 matmuls and convolutions run in TF32 unless --no-tf32, and each rank's start-up
    line says which; on the CPU nothing changes and the line says nothing of it."""
    import argparse
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # put back after
    monkeypatch.setattr(cluster.launch, "TF32", None)
    before = torch.get_float32_matmul_precision()
    args = cluster.parse_args(argparse.ArgumentParser(), argv, env={})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    try:
        device = cluster.launch._pick_device(args, env={})
        assert device == torch.device("cuda", 0) and torch.get_float32_matmul_precision() == matmul
        assert torch.backends.cudnn.allow_tf32 == (argv == [])
        cluster.started(0, 0, 1, device)
        assert capfd.readouterr().out.strip().endswith(f"device cuda:0, {line}")
        cluster.started(0, 0, 1, torch.device("cpu"))
        assert capfd.readouterr().out.strip().endswith("device cpu")
    finally:
        torch.set_float32_matmul_precision(before)


def test_nccl_starts_with_the_group_on_its_gpu(monkeypatch, capfd):
    """init_process_group(device_id=...) on a GPU: NCCL connects at once, and a fault there is the start-up's one
    ERROR line (here NCCL's error, as init_process_group raises it), not a traceback at the first collective."""
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    cluster.launch._init_group(torch.device("cuda", 1), 60, False)
    assert calls[0][0] == "nccl" and calls[0][1]["device_id"] == torch.device("cuda", 1)
    cluster.launch._init_group(torch.device("cpu"), 60, False)
    assert calls[1][0] == "gloo" and calls[1][1]["device_id"] is None

    def fault(backend, **kw):
        raise torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, remote process exited")
    monkeypatch.setattr(torch.distributed, "init_process_group", fault)
    with pytest.raises(SystemExit) as e:
        cluster.launch._init_group(torch.device("cuda", 0), 60, False)
    assert e.value.code == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith("ERROR: rank 0 on ") and "did not meet the other ranks" in line and "NCCL error" in line


def fake_gpus(monkeypatch, count):
    """torch and Lightning believe `count` GPUs are there (enough to build a Trainer; nothing runs on them)."""
    import lightning_fabric.accelerators.cuda as fabric_cuda
    from pytorch_lightning.accelerators import CUDAAccelerator
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: count)
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_lightning_with_one_gpu_per_task_uses_that_gpu(precision, monkeypatch, tmp_path):
    """srun --gpus-per-task=1, task 3 of 4: it sees one GPU, cuda:0. Lightning alone would take cuda:3 (its
    local rank) and fail with 'invalid device ordinal'."""
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7",
           "SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_NODELIST": "n1", "CUDA_VISIBLE_DEVICES": "3"}
    for key in [k for k in os.environ if k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_SIZE"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake_gpus(monkeypatch, 1)
    index = cluster.gpu_index(3)
    assert index == 0
    args = mnist_lightning_ddp.get_args([f"--checkpoint-dir={tmp_path}"])
    trainer = mnist_lightning_ddp.make_trainer(args, torch.device("cuda", index), 4, 1, precision, [], False)
    assert trainer.strategy.root_device == torch.device("cuda", 0)
    assert (trainer.local_rank, trainer.global_rank, trainer.world_size) == (3, 3, 4)
    assert trainer.precision == precision


@pytest.mark.parametrize("devices, local_rank", [(4, 2), (2, 1)])
def test_lightning_with_every_gpu_visible_uses_its_local_rank(devices, local_rank, monkeypatch, tmp_path):
    """torchrun (or srun --gres=gpu:4): every process sees all GPUs and takes GPU local_rank."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "RANK", "LOCAL_", "WORLD_SIZE", "GROUP_"))]:
        monkeypatch.delenv(key)
    for key, value in {"RANK": local_rank, "LOCAL_RANK": local_rank, "WORLD_SIZE": devices, "GROUP_RANK": 0,
                       "LOCAL_WORLD_SIZE": devices, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                       "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(key, str(value))
    fake_gpus(monkeypatch, devices)
    index = cluster.gpu_index(local_rank)
    trainer = mnist_lightning_ddp.make_trainer(mnist_lightning_ddp.get_args([]), torch.device("cuda", index), devices,
                                               1, "bf16-mixed", [], False)
    assert trainer.strategy.root_device == torch.device("cuda", local_rank) and trainer.world_size == devices


def test_the_gpus_random_state_is_saved_and_restored(monkeypatch):
    """cluster's rng_state() holds the GPU generator's state next to the CPU's (and Python's, and numpy's where it is
    imported); set_rng_state() puts them back. Checkpoints from before (a bare CPU state) still load."""
    saved, restored = torch.full((16,), 7, dtype=torch.uint8), {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.update(state=state, device=device))
    gpu = torch.device("cuda", 1)
    state = cluster.checkpoints.rng_state(gpu)
    assert torch.equal(state["cuda"], saved) and torch.equal(state["cpu"], torch.get_rng_state())
    expected = torch.rand(3)
    torch.manual_seed(123)
    cluster.checkpoints.set_rng_state(state, gpu)
    assert torch.equal(torch.rand(3), expected), "the CPU generator is back where it was"
    assert torch.equal(restored["state"], saved) and restored["device"] == gpu
    assert set(cluster.checkpoints.rng_state(torch.device("cpu"))) == {"cpu", "python"} | (
        {"numpy"} if "numpy" in sys.modules else set())
    cluster.checkpoints.set_rng_state(state["cpu"], torch.device("cpu"))  # an older checkpoint's bare tensor


def test_a_rank_that_cannot_meet_the_others_says_so_itself(mnist_dir, tmp_path):
    """Rank 1 is pointed at a port where nobody listens: rank 1 says it cannot reach rank 0, rank 0 says not everybody
    came; both name themselves and their host, neither blames a busy port, and both end within the timeout."""
    import socket
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    t0 = time.monotonic()
    procs = [start([PYTHON, str(REPO / "mnist_ddp.py"), f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
                    "--dist-timeout=5", "--device=cpu"], cwd=tmp_path,
                   env=clean_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=ports[r]))
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    assert time.monotonic() - t0 < 60
    host = socket.gethostname()
    for r, out in enumerate(outs):
        errors = [line for line in out.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1, out
        assert f"rank {r} on {host} did not meet the other ranks at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{ports[r]} " \
               "within 5 s" in errors[0], errors
        assert "port is in use" not in errors[0] and "Traceback" not in out, out
    assert "waiting for clients" in outs[0] and "trying to connect" in outs[1], outs


def test_deepspeed_takes_its_input_dtype_from_the_engine(mnist_dir, tmp_path):
    """A ds_config with the older "bfloat16" spelling: DeepSpeed keeps the model in bfloat16, the script feeds it
    bfloat16 (it used to look for "bf16" only and fail with 'Input type (float) and bias type (c10::BFloat16)')."""
    config = tmp_path / "ds_bfloat16.json"
    config.write_text('{"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 1}, '
                      '"optimizer": {"type": "Adam", "params": {"lr": 0.003, "torch_adam": true}}, '
                      '"bfloat16": {"enabled": true}}')
    alone = copy_alone(tmp_path / "project", "mnist_ddp_deepspeed.py")  # the script and cluster/, nothing else
    rc, out = run([PYTHON, alone,
                   f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}", "--epochs=1", "--device=cpu",
                   f"--deepspeed_config={config}"], env=clean_env(), cwd=tmp_path, timeout=300)
    assert rc == 0, out[-3000:]
    assert "global batch 32 | bf16 on cpu" in out, out[-3000:]
    [(_, epoch, acc)] = [line for line in epoch_lines(out)]
    assert epoch == 1 and acc > 88.0, out[-2000:]
    assert len(set(done_record(out)["param_checksums"])) == 1


def test_the_extracted_folders_are_two_numpy_arrays(tmp_path):
    """1.28 M (path, label) tuples would be copied page by page into every forked DataLoader worker; the names and
    labels are numpy arrays instead, and still name every file in class order."""
    folder = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("n02", "n01"):
            (folder / split / c).mkdir(parents=True)
            for k in range(3):
                (folder / split / c / f"{c}_{k}.JPEG").write_bytes(b"x")
    ds = imagenet_ddp.JPEGs(str(folder), "train", 32)
    assert type(ds.samples).__name__ == type(ds.names).__name__ == "ndarray" and len(ds) == 6
    assert ds.classes == ["n01", "n02"]
    assert [ds.path(i) for i in range(6)] == [str(folder / "train" / c / f"{c}_{k}.JPEG")
                                              for c in ("n01", "n02") for k in range(3)]
    assert [int(ds.samples[i][0]) for i in range(6)] == [0, 0, 0, 1, 1, 1]


def test_from_tar_staging_reads_only_the_local_copies(tmp_path, monkeypatch):
    """--from-tar indexes the copies on local disk: on the shared filesystem, reading 1.28 M tar headers is as many
    small scattered reads. The archives on --data-dir are only read whole, by the copy."""
    data = tmp_path / "shared"
    data.mkdir()
    make_imagenet_archives(data, 3, 4, 2, size=(40, 30))
    opened = []
    real_open = open

    def recording_open(path, *args, **kwargs):
        opened.append(os.path.abspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(imagenet_staging, "open", recording_open, raising=False)
    assert imagenet_staging.stage(str(data), str(tmp_path / "local"), 1, from_tar=True)
    tars = [n for n in (imagenet_staging.TRAIN_TAR, imagenet_staging.VAL_TAR)]
    assert not [p for p in opened if p.startswith(str(data))], opened
    assert sum(p.endswith(tuple(tars)) for p in opened) >= 2, opened  # the copies were read
    index = torch.load(tmp_path / "local" / "index.pt", weights_only=True)
    assert len(index["train"]) == 12 and len(index["val"]) == 6
