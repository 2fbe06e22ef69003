"""mnist_ddp.py: launch-environment parsing, and real trainings on MNIST digits under every launcher (CPU, gloo)."""
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import (EXIT_PROBE_LINE, PYTHON, REPO, TORCHRUN, check_profile, check_signal_stop, check_srun_style,
                      check_time_split, check_training, clean_env, copy_alone, done_record, epoch_lines,
                      hand_count_train_flops, run, run_srun_style, run_torchrun, start, tensorboard_scalars, timed)

sys.path.insert(0, str(REPO))
import cluster  # noqa: E402  (the plumbing mnist_ddp.py calls)
import mnist_ddp  # noqa: E402

SCRIPT = str(REPO / "mnist_ddp.py")


# ---------------------------------------------------------------------------- unit: who am I?

@pytest.mark.parametrize("nodelist, first", [
    ("n1", "n1"),
    ("n[1-2]", "n1"),
    ("n[1-3,5]", "n1"),
    ("gpu-[001-004,010]", "gpu-001"),
    ("node-[001-004]", "node-001"),
    ("gpu-[003,010-012],cpu1", "gpu-003"),
    ("a1,b[2-3]", "a1"),
    ("rack[7-8]-n[04-05]", "rack7-n04"),
    ("10.0.0.5", "10.0.0.5"),
])
def test_first_host_of_nodelist(nodelist, first):
    assert cluster.first_host(nodelist) == first


def test_launch_env_torchrun_wins_over_slurm():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    assert cluster.launch_env(env) == (3, 1, 8, None, None)


def test_launch_env_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "gpu-[001-004]", "SLURM_JOB_ID": "123456"}
    rank, local_rank, world, addr, port = cluster.launch_env(env)
    assert (rank, local_rank, world, addr) == (5, 1, 8, "gpu-001")
    assert port == str(10000 + 123456 % 20000)


def test_launch_env_slurm_step_size_and_overrides():
    # srun -n2 inside a bigger allocation: the step's task count is the world size
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
           "SLURM_STEP_ID": "3",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4242"}
    assert cluster.launch_env(env) == (1, 1, 2, "10.1.2.3", "4242")


def test_master_port_same_within_a_job_and_differs_across_jobs():
    def port(job_id, rank):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "n1",
               "SLURM_JOB_ID": str(job_id)}
        return int(cluster.launch_env(env)[4])
    assert len({port(4711, r) for r in range(4)}) == 1
    ports = {port(j, 0) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(10000 <= p < 30000 for p in ports)  # below Linux's ephemeral range


def test_launch_env_refuses_the_batch_script_of_a_multi_task_job(monkeypatch):
    monkeypatch.setattr(sys, "argv", [SCRIPT])  # the script that runs
    # `python mnist_ddp.py` written straight into an sbatch script with --ntasks=4: Slurm sets SLURM_PROCID=0 and
    # SLURM_NTASKS=4 there too, but no SLURM_STEP_ID; without srun it would wait forever for ranks 1-3
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "9"}
    with pytest.raises(SystemExit, match="not started by srun.*HINT: srun python mnist_ddp.py"):
        cluster.launch_env(env)
    assert cluster.launch_env({**env, "SLURM_NTASKS": "1"}) == (0, 0, 1, "n1", str(10000 + 9))


def test_launch_env_single_process():
    assert cluster.launch_env({}) == (0, 0, 1, None, None)


# ---------------------------------------------------------------------------- unit: the exit probe

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_exit_probe_names_a_process_group_left_running(tmp_path):
    """check_clean_exit relies on tests/exit_probe: it must load in a script's run and see gloo's threads when a
    process group is never destroyed (here a named copy of a script that forgets it), and see none when it is."""
    (tmp_path / "mnist_ddp.py").write_text(
        "import sys\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:' + sys.argv[2], rank=0, world_size=1)\n"
        "if sys.argv[1] == 'destroy':\n    dist.destroy_process_group()\n")
    _, out = run([PYTHON, "mnist_ddp.py", "leak", str(free_port())], env=clean_env(), cwd=tmp_path, timeout=60)
    # gloo's loop (torch >= 2.9 names it) or the store's (the TCPStore rank 0 serves)
    assert re.search(rf"^{re.escape(EXIT_PROBE_LINE)} .*(pt_gloo_runloop|pt_tcpstore)", out, re.M), out[-2000:]
    rc, out = run([PYTHON, "mnist_ddp.py", "destroy", str(free_port())], env=clean_env(), cwd=tmp_path, timeout=60)
    assert rc == 0 and EXIT_PROBE_LINE not in out, out[-2000:]


# ---------------------------------------------------------------------------- real trainings

# ---------------------------------------------------------------------------- unit: when to stop, and requeue

@pytest.mark.parametrize("text, seconds", [
    ("59:30", 3570), ("2:03:04", 7384), ("1-02:03:04", 93784), ("0:00", 0), ("UNLIMITED", None), ("INVALID", None),
    ("", None),
])
def test_slurm_time_left_in_seconds(text, seconds):
    assert cluster.slurm_seconds(text) == seconds


def stop(monkeypatch, tmp_path, signals=(), epoch=1, step=10, squeue=None, loaded=False, saving=True, **env):
    """cluster.stop_check in this process, one rank on the CPU, with no scontrol on PATH (and a squeue printing
    `squeue`, if given); `loaded`: the run resumed a checkpoint; `saving`: checkpoints are on. Returns (exit code or
    None, rank 0's lines before its time split, the checkpoints it wrote)."""
    monkeypatch.setattr(cluster.stopping, "received_signals", list(signals))
    monkeypatch.setattr(cluster.stopping, "stop_clock", {})
    monkeypatch.setattr(cluster.checkpoints, "LOADED_OR_SAVED", loaded)
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_END_TIME", "SLURM_JOB_START_TIME", "MAX_REQUEUES",
                "STOP_MARGIN", "REQUEUE_REQUEST", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, str(value))
    if squeue is not None:
        (tmp_path / "squeue").write_text(f"#!/bin/sh\necho '{squeue}'\n")
        (tmp_path / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    saved, code, printed = [], None, []
    monkeypatch.setattr(cluster.launch, "print0", printed.append)
    try:
        cluster.stop_check(torch.device("cpu"), saving and (lambda e, s: saved.append((e, s))), epoch, step)
    except SystemExit as e:
        code = e.code
        assert printed[-1].startswith("time on rank 0, ") and len(printed) >= 2, printed  # this run's split
        printed = printed[:-1]
    return code, "\n".join(printed), saved


def test_requeues_are_bounded_and_a_restart_that_trained_nothing_is_not_requeued(monkeypatch, tmp_path):
    usr1 = [signal.SIGUSR1]
    code, out, saved = stop(monkeypatch, tmp_path, usr1, SLURM_JOB_ID=7, SLURM_RESTART_COUNT=2)
    assert code == 75 and saved == [(1, 10)]
    assert out == ("stopped on SIGUSR1: checkpoint at epoch 1 step 10; could not requeue job 7: scontrol: No such file "
                   "or directory. Resubmit the same command to resume"), "below the cap: it tries"
    code, out, saved = stop(monkeypatch, tmp_path, usr1, SLURM_JOB_ID=7, SLURM_RESTART_COUNT=20)
    assert code == 75 and saved == [(1, 10)]
    assert out.endswith("; not requeued: job 7 has restarted 20 times (MAX_REQUEUES=20). Resubmit the same command "
                        "to resume"), "the default cap"
    code, out, _ = stop(monkeypatch, tmp_path, usr1, SLURM_JOB_ID=7, SLURM_RESTART_COUNT=3, MAX_REQUEUES=3)
    assert "; not requeued: job 7 has restarted 3 times (MAX_REQUEUES=3)" in out
    # the check before the first step: a run that resumed a checkpoint requeues (the next one may have the time), a
    # restart does not, and a run with no checkpoint at all is not requeued into a fresh start
    code, out, saved = stop(monkeypatch, tmp_path, usr1, epoch=0, step=0, loaded=True, SLURM_JOB_ID=7)
    assert (code, saved) == (75, []) and out.startswith("stopped on SIGUSR1: nothing trained yet in this run; could "
                                                        "not requeue job 7: scontrol"), out
    code, out, saved = stop(monkeypatch, tmp_path, usr1, epoch=0, step=0, SLURM_JOB_ID=7)
    assert (code, saved) == (75, []) and out == (
        "stopped on SIGUSR1: nothing trained yet in this run; not requeued: there is no checkpoint to resume from, and "
        "a requeued job would start afresh"), out
    code, out, saved = stop(monkeypatch, tmp_path, usr1, saving=False, SLURM_JOB_ID=7)
    assert (code, saved) == (75, []) and out == (
        "stopped on SIGUSR1: no --checkpoint-dir, nothing saved; not requeued: there is no checkpoint to resume from, "
        "and a requeued job would start afresh"), "checkpoints off (--checkpoint-dir none)"
    code, out, saved = stop(monkeypatch, tmp_path, usr1, epoch=0, step=0, loaded=True, SLURM_JOB_ID=7,
                            SLURM_RESTART_COUNT=1)
    assert (code, saved) == (75, []) and out == (
        "stopped on SIGUSR1: nothing trained yet in this run; not requeued: this restart of job 7 stopped before its "
        "first step, as the next would. Resubmit the same command to resume")
    code, out, saved = stop(monkeypatch, tmp_path, [signal.SIGTERM], SLURM_JOB_ID=7)
    assert code == 75 and out == "stopped on SIGTERM: checkpoint at epoch 1 step 10", "cancelled: no requeue"


def test_the_end_time_near_stops_like_the_time_limit_signal(monkeypatch, tmp_path):
    """No signal: rank 0 reads the end time (SLURM_JOB_END_TIME, else squeue's time left) and stops when it is nearer
    than STOP_MARGIN (default 60 s) plus the longest gap between two checks."""
    code, out, saved = stop(monkeypatch, tmp_path, SLURM_JOB_ID=7, SLURM_JOB_END_TIME=int(time.time()) + 45)
    assert code == 75 and saved == [(1, 10)]
    assert re.fullmatch(r"stopped 4[45] s before the time limit, with no signal: checkpoint at epoch 1 step 10; could "
                        r"not requeue job 7: scontrol: No such file or directory\. Resubmit the same command to resume",
                        out), out
    assert stop(monkeypatch, tmp_path, SLURM_JOB_ID=7, SLURM_JOB_END_TIME=int(time.time()) + 90)[0] is None
    assert stop(monkeypatch, tmp_path, SLURM_JOB_ID=7, SLURM_JOB_END_TIME=int(time.time()) + 90,
                STOP_MARGIN=120)[0] == 75
    # Slurm before 23.02 sets no SLURM_JOB_END_TIME: squeue's time left, read once
    code, out, _ = stop(monkeypatch, tmp_path, squeue="0:50", SLURM_JOB_ID=7)
    assert code == 75 and re.match(r"stopped (49|50) s before the time limit", out), out
    assert stop(monkeypatch, tmp_path, squeue="1:50:00", SLURM_JOB_ID=7)[0] is None
    assert stop(monkeypatch, tmp_path, squeue="UNLIMITED", SLURM_JOB_ID=7)[0] is None
    assert stop(monkeypatch, tmp_path, SLURM_JOB_ID=7)[0] is None, "no squeue: no end time, no stop"


def test_checkpoint_every_saves_mid_epoch_on_rank_0s_clock_and_trains_on(monkeypatch, tmp_path):
    """--checkpoint-every: at a step check once that long has passed since the last checkpoint (or the start), every
    rank saves a mid-epoch checkpoint and training goes on; at an epoch's end (saved there anyway) the clock restarts;
    with checkpoints off, nothing."""
    monkeypatch.setattr(cluster.stopping, "CHECKPOINT_EVERY", 60)
    assert stop(monkeypatch, tmp_path) == (None, "", []), "the first check starts the clock"
    monkeypatch.setattr(cluster.stopping, "stop_clock", {"end": None, "margin": 60, "last": time.time(), "gap": 0.0,
                                                         "saved": time.time() - 61})
    saved, printed = [], []
    monkeypatch.setattr(cluster.launch, "print0", printed.append)
    cluster.stop_check(torch.device("cpu"), lambda e, s: saved.append((e, s)), 2, 40)
    assert saved == [(2, 40)] and printed == ["checkpoint at epoch 2 step 40 (every 1 min, --checkpoint-every)"]
    cluster.stop_check(torch.device("cpu"), lambda e, s: saved.append((e, s)), 2, 50)
    assert saved == [(2, 40)], "the clock restarted at that checkpoint"
    cluster.stopping.stop_clock["saved"] -= 61
    cluster.stop_check(torch.device("cpu"), lambda e, s: saved.append((e, s)), 3, 0)  # an epoch's end
    cluster.stop_check(torch.device("cpu"), lambda e, s: saved.append((e, s)), 3, 10)
    assert saved == [(2, 40)], "the epoch's end was a checkpoint: the clock restarted there"
    cluster.stopping.stop_clock["saved"] -= 61
    cluster.stop_check(torch.device("cpu"), None, 3, 20)
    assert saved == [(2, 40)], "checkpoints off: nothing to save"


def test_submitits_sigusr2_stops_and_requeues_like_sigusr1(monkeypatch, tmp_path):
    """submitit asks Slurm for SIGUSR2 before the time limit; Python's default action for it ends the process."""
    code, out, saved = stop(monkeypatch, tmp_path, [signal.SIGUSR2], SLURM_JOB_ID=7)
    assert code == 75 and saved == [(1, 10)]
    assert out.startswith("stopped on SIGUSR2: checkpoint at epoch 1 step 10; could not requeue job 7: scontrol"), out


def test_under_submitit_its_sigusr2_is_not_requeued_twice(monkeypatch, tmp_path):
    """submitit's own handler requeues the job on its SIGUSR2: the script checkpoints and leaves the requeue to it."""
    code, out, saved = stop(monkeypatch, tmp_path, [signal.SIGUSR2], SLURM_JOB_ID=7, SUBMITIT_EXECUTOR="slurm")
    assert (code, saved) == (75, [(1, 10)])
    assert out == "stopped on SIGUSR2: checkpoint at epoch 1 step 10; the requeue is submitit's"
    code, out, _ = stop(monkeypatch, tmp_path, [signal.SIGUSR1], SLURM_JOB_ID=7, SUBMITIT_EXECUTOR="slurm")
    assert "could not requeue job 7" in out, "another signal: the script requeues"


def test_without_scontrol_the_job_script_is_asked_to_requeue(monkeypatch, tmp_path):
    """A container without Slurm's client: rank 0 writes the job script's REQUEUE_REQUEST file (the job script
    requeues once the step has ended); not on SIGTERM, and not past the requeue cap."""
    request = tmp_path / "requeue request"
    code, out, _ = stop(monkeypatch, tmp_path, [signal.SIGUSR1], SLURM_JOB_ID=7, REQUEUE_REQUEST=request)
    assert code == 75 and out == ("stopped on SIGUSR1: checkpoint at epoch 1 step 10; asked the job script to requeue "
                                  "job 7 (scontrol: No such file or directory)")
    assert request.read_text() == "7\n"
    request.unlink()
    stop(monkeypatch, tmp_path, [signal.SIGTERM], SLURM_JOB_ID=7, REQUEUE_REQUEST=request)
    stop(monkeypatch, tmp_path, [signal.SIGUSR1], SLURM_JOB_ID=7, REQUEUE_REQUEST=request, SLURM_RESTART_COUNT=20)
    assert not request.exists()


def test_a_time_limit_shorter_than_the_default_margin_caps_it(monkeypatch, tmp_path):
    """A 1-minute job under the default STOP_MARGIN (60 s) would stop after 10 steps in every run: rank 0 says so
    once at the start, and the margin becomes a quarter of the limit. A STOP_MARGIN that was set is kept."""
    code, out, _ = stop(monkeypatch, tmp_path, squeue="0:50 1:00", SLURM_JOB_ID=7)
    assert code is None, "50 s left of 60: trains on"
    assert out.startswith("NOTE: this job's time limit, 60 s, leaves little room past the default STOP_MARGIN of "
                          "60 s: each run stops 15 s (a quarter of the limit) before its end instead. HINT:"), out
    assert stop(monkeypatch, tmp_path, squeue="0:12 1:00", SLURM_JOB_ID=7)[0] == 75, "12 s left: stop"
    code, out, _ = stop(monkeypatch, tmp_path, squeue="0:50 1:00", SLURM_JOB_ID=7, STOP_MARGIN=55)
    assert code == 75 and out.startswith("NOTE: STOP_MARGIN=55 s leaves little of this job's time limit (60 s)")
    assert stop(monkeypatch, tmp_path, squeue="50:00 2:00:00", SLURM_JOB_ID=7)[1] == "", "a long job: no NOTE"


def test_time_split_in_words_and_a_hint_when_a_rank_waits_for_data(monkeypatch):
    printed = []
    monkeypatch.setattr(cluster.launch, "print0", printed.append)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    split = cluster.TimeSplit()
    split.seconds.update(startup=2.0, data=3.0, compute=4.0, eval=1.0)
    assert split.report("--workers=2") == dict(startup=2.0, staging=0.0, data=3.0, compute=4.0, eval=1.0,
                                               checkpoint=0.0)
    assert printed[0] == "time on rank 0, 10.0 s: start-up 20%, data wait 30%, compute 40%, evaluation 10%"
    assert printed[1].startswith("HINT: rank 0 waited for data 43% of its training steps' time: the input, not the "
                                 "model, sets the pace. Make batches in more DataLoader worker processes (--workers; "
                                 "now --workers=2), up to the CPUs per task (SLURM_CPUS_PER_TASK=8, "), printed
    printed.clear()
    split.seconds.update(data=0.4, compute=3.6, checkpoint=0.5, staging=3.0)
    split.report("--workers=2")
    assert printed == ["time on rank 0, 10.5 s: start-up 19%, staging 29%, data wait 4%, compute 34%, evaluation 10%, "
                       "checkpoints 5%"], "10% of the steps' time is no HINT"


def test_the_time_split_starts_when_the_process_started_not_at_import():
    code = "import time; time.sleep(1.5); import mnist_ddp; print(time.perf_counter() - mnist_ddp.cluster.TIMES.last)"
    rc, out = run([PYTHON, "-c", code], env=clean_env(), cwd=REPO, timeout=120)
    assert rc == 0 and 1.5 <= float(out.split()[-1]) < 30, out


@pytest.fixture(scope="module")
def single(mnist_dir, tmp_path_factory):
    """One process, run as a user who copied the script and cluster/ into an empty directory (data from $DATA_DIR),
    in an environment without tensorboard (a package of that name that fails to import stands first on the path)."""
    alone = tmp_path_factory.mktemp("single")
    copy_alone(alone, "mnist_ddp.py")
    no_tensorboard = tmp_path_factory.mktemp("no-tensorboard")
    (no_tensorboard / "tensorboard").mkdir()
    (no_tensorboard / "tensorboard" / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    (rc, out), wall = timed(run, [PYTHON, "mnist_ddp.py", "--epochs=2", "--batch-size=64", "--amp", "--profile"],
                            env=clean_env(DATA_DIR=mnist_dir, PYTHONPATH=no_tensorboard), cwd=alone)
    return rc, out, alone, wall


@pytest.fixture(scope="module")
def torchrun2(mnist_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("torchrun")
    return run_torchrun([SCRIPT, "--epochs=2", "--batch-size=32", f"--data-dir={mnist_dir}", f"--output-dir={out_dir}"],
                        cwd=out_dir)


def test_single_process(single):
    rc, out, out_dir, wall = single
    done = check_training(rc, out, world_size=1)
    check_time_split(out, wall, checkpointed=False)
    assert "--amp is mixed precision on GPU only" in out and "| fp32 on cpu" in out
    assert sorted(p.name for p in out_dir.iterdir() if p.name != "__pycache__") == [
        "cluster", "mnist_ddp.py", "out"], "nothing else needed, outputs in ./out"
    assert out.count("NOTE: tensorboard is not installed") == 1 and not (out_dir / "out" / "tensorboard").exists()
    check_profile(out, out_dir / "out")
    metrics = list((out_dir / "out").glob("metrics-*.jsonl"))
    assert len(metrics) == 1
    events = [line for line in metrics[0].read_text().splitlines()]
    assert len(events) == 4 and '"event": "done"' in events[-1] and str(done["test_acc"]) in events[-1]
    assert json.loads(events[0])["event"] == "config", "the settings first"
    # the final weights: a plain state_dict, which torch alone loads (in a folder without cluster/)
    weights = out_dir / done["weights"]
    assert weights.parent == out_dir / "out" and f"final weights: {done['weights']}" in out
    code = ("import sys, torch; print({k: tuple(v.shape) for k, v in torch.load(sys.argv[1], weights_only=True)"
            ".items()})")
    rc, shapes = run([PYTHON, "-c", code, str(weights)], env=clean_env(), cwd=out_dir / "out")
    assert rc == 0 and "'fc1.weight': (128, 1568)" in shapes and "'fc2.bias': (10,)" in shapes, shapes[-2000:]


def test_torchrun_two_processes(torchrun2):
    rc, out, ranks = torchrun2
    check_training(rc, out, world_size=2)
    assert epoch_lines(ranks[1]) == [] and len(epoch_lines(ranks[0])) == 2  # only rank 0 printed epochs


def test_ddp_matches_single_process(single, torchrun2):
    # DistributedSampler interleaves one permutation, so 2 ranks x 32 digits see exactly the 64 digits one
    # process sees per step, and DDP averages the gradients: the runs agree up to float summation order.
    acc1 = done_record(single[1])["test_acc"]
    acc2 = done_record(torchrun2[1])["test_acc"]
    assert abs(acc1 - acc2) <= 0.003


def test_the_efficiency_line_and_the_settings_in_every_output(torchrun2, mnist_dir):
    """2 ranks under torchrun: rank 0 prints the efficiency line once, after the time split, and the done record holds
    its figures: throughput per process (the done record's over the world size), the MNIST CNN's FLOPs per digit (a
    hand count), MFU n/a on the CPU, a peak memory, the data-wait share of the steps' time. The metrics file starts
    with a config record (every option, the run record's facts, the versions, the commit), and TensorBoard's hparams
    hold the same options."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    rc, out, _ = torchrun2
    lines = [line for line in out.splitlines() if "efficiency: " in line]
    assert len(lines) == 1 and lines[0].startswith("efficiency: "), lines
    line = lines[0]
    assert out.index("time on rank 0") < out.index(line) < out.index('"event": "done"')
    done = done_record(out)
    figures, split = done["efficiency"], done["time_split"]
    assert figures["samples_per_s_per_gpu"] == pytest.approx(done["samples_per_s"] / 2)
    assert f"{figures['samples_per_s_per_gpu']:.0f} samples/s per process" in line
    assert figures["flops_per_sample"] == hand_count_train_flops(mnist_ddp.Net(), (1, 28, 28))
    assert figures["mfu"] is None and "MFU n/a (CPU)" in line and "GPU use n/a" in line
    assert figures["peak_memory_bytes"] > 100 * 2**20 and "GiB (resident, the most on any rank)" in line
    assert figures["data_wait"] == pytest.approx(split["data"] / (split["data"] + split["compute"]))

    out_dir = Path(torchrun2[1].split("final weights: ")[1].split()[0]).parent
    [metrics] = out_dir.glob("metrics-*.jsonl")
    config = json.loads(metrics.read_text().splitlines()[0])
    args = vars(mnist_ddp.get_args(["--epochs=2", "--batch-size=32", f"--data-dir={mnist_dir}",
                                    f"--output-dir={out_dir}"]))
    assert config["event"] == "config" and config["options"] == json.loads(json.dumps(args)), config
    assert config["world_size"] == 2 and config["script"] == "mnist_ddp.py" and config["precision"] == "fp32"
    assert config["versions"]["torch"] == torch.__version__ and config["run"] in metrics.name
    [run_dir] = (out_dir / "tensorboard").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    shown = start.session_start_info.hparams
    assert shown["batch_size"].number_value == 32 and shown["lr"].number_value == args["lr"]
    assert shown["data_dir"].string_value == mnist_dir and shown["world_size"].number_value == 2
    assert shown["version/torch"].string_value == torch.__version__


def test_signal_mid_epoch_then_resume_is_bit_identical(mnist_dir, tmp_path, torchrun2):
    """SIGTERM to rank 1 only: both ranks stop at the same step, rank 0 writes a mid-epoch checkpoint, both exit 75.
    The rerun, two processes that know only what srun tells them (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
    nodelist, job id), continues at that step, rank 1 quiet, and ends bit-identical to 2 uninterrupted epochs under
    torchrun; its TensorBoard curves continue the first run's, in its folder, with no point twice."""
    cmd = [PYTHON, SCRIPT, "--epochs=2", "--batch-size=32", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
           f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    check_signal_stop(cmd, tmp_path, expect_checkpoint="epoch_000[01]_step_*.pt", to=1, sig=signal.SIGTERM)
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path)
    check_srun_style(rcs, outs, reference_out=torchrun2[1])
    stop = re.search(r"resumed from .*_step_\d+\.pt: epoch ([01]) done and (\d+) steps of epoch [12]", outs[0])
    assert stop, outs[0][-3000:]
    done = done_record(outs[0])

    [run_dir] = (tmp_path / "tensorboard").iterdir()  # the first (srun-style) job's, continued
    curves = tensorboard_scalars(run_dir)
    steps = 79  # 2,500 digits per rank in batches of 32
    assert [s for s, _ in curves["train/loss"]] == [e * steps + s + 1 for e in range(2) for s in range(0, steps, 20)]
    assert [s for s, _ in curves["epoch/test_acc"]] == [steps, 2 * steps]
    assert curves["epoch/test_acc"][-1][1] == pytest.approx(done["test_acc"], rel=1e-6)
    assert {"epoch/lr", "epoch/train_loss", "epoch/test_loss", "epoch/samples_per_s"} <= set(curves)

    # asking again for 2 epochs (under torchrun: another job) trains nothing and still reports the model's accuracy
    rc, out, ranks = run_torchrun(cmd[1:], cwd=tmp_path)
    assert rc == 0 and epoch_lines(out) == [] and "nothing to train" in ranks[0], out[-3000:]
    assert done_record(ranks[0])["test_acc"] == done["test_acc"]

    # the same checkpoints under another run's settings (and a commit, which the checkpoint does not know): refused
    # in one line naming each difference, --epochs growing is not one, and nothing is written
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()}
    rc, out = run(cmd + ["--lr=0.01", "--epochs=3"], env=clean_env(GIT_COMMIT="0123abc"), cwd=tmp_path)
    [error] = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert rc == 1 and "was written by another run: lr 0.003 -> 0.01, world_size 2 -> 1 (each rank's shard" in error
    assert "epochs" not in error.split("HINT")[0] and "git_commit" not in error and "HINT" in error, error
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").iterdir()} == before


def test_time_limit_signal_without_scontrol_keeps_the_checkpoint(mnist_dir, tmp_path):
    """SIGUSR1 in a container without Slurm's client: the checkpoint is written and kept, one clear line says the job
    could not be requeued and what to do, and both ranks still exit 75 (no traceback after the save)."""
    cmd = [PYTHON, SCRIPT, "--epochs=2", "--batch-size=32", "--device=cpu", f"--data-dir={mnist_dir}",
           f"--output-dir={tmp_path}", f"--checkpoint-dir={tmp_path / 'ckpt'}"]
    outs = check_signal_stop(cmd, tmp_path, expect_checkpoint="epoch_000[01]_step_*.pt",
                             PATH=os.path.dirname(PYTHON))  # the venv's bin: python, no scontrol
    [line] = [line for line in outs[0].splitlines() if line.startswith("stopped on SIGUSR1")]
    assert "could not requeue job" in line and "scontrol: No such file or directory" in line, line
    assert "Resubmit the same command to resume" in line and "Traceback" not in outs[0] + outs[1], outs[0][-2000:]


def test_a_dead_rank_ends_torchrun_quickly_and_is_named(mnist_dir, tmp_path):
    p = start([TORCHRUN, "--standalone", "--nproc_per_node=2", SCRIPT, "--epochs=50", "--batch-size=8",
               f"--data-dir={mnist_dir}",
               f"--output-dir={tmp_path}"], env=clean_env(), cwd=tmp_path)
    lines = []
    for line in p.stdout:  # wait until both ranks train
        lines.append(line)
        if "epoch 1 step 20 " in line:
            break
    victim = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == p.pid][1:]  # the 2nd worker
    assert victim, "worker processes not found"
    t0 = time.monotonic()
    os.kill(victim[0], signal.SIGKILL)
    out = "".join(lines) + p.communicate(timeout=90)[0]
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", out) and "Signal 9 (SIGKILL)" in out, out[-3000:]


def _parent(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


@pytest.mark.parametrize("env, given", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "CUDA_VISIBLE_DEVICES=0,1,2,3"),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # one GPU per task: GPU 0 of this task
    ({"CUDA_VISIBLE_DEVICES": "", "SLURM_JOB_GPUS": "2,3"}, "SLURM_JOB_GPUS=2,3"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
])
def test_gpus_given_but_unusable_is_an_error(env, given, monkeypatch):
    """The cluster's driver older than torch's CUDA build: torch sees no GPU although the job was given some."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    error = cluster.unusable_gpus(env)
    if given is None:
        assert error is None
    else:
        assert f"this job was given GPUs ({given})" in error and "NVIDIA driver >= 580" in error, error
        assert "compute capability >= 7.5" in error and "HINT:" in error and "--device=cpu" in error
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # torch can use them: no error
    assert cluster.unusable_gpus(env) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert given is None or "CUDA 12.6, which needs an NVIDIA driver >= 525 " in cluster.unusable_gpus(env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch can use this machine's GPUs: they are usable")
def test_every_rank_stops_when_its_gpus_are_unusable(mnist_dir, tmp_path):
    """Two srun-style ranks given GPUs that torch cannot use (this machine has no driver at all): one ERROR line from
    rank 0, every rank exits 1 at once, nothing trains; --device=cpu is the way to train on CPU anyway."""
    t0 = time.monotonic()
    rcs, outs = run_srun_style([PYTHON, SCRIPT, f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}"], 2,
                               cwd=tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS_ON_NODE="2")
    assert rcs == [1, 1], outs
    assert time.monotonic() - t0 < 60
    errors = [line for out in outs for line in out.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "this job was given GPUs (CUDA_VISIBLE_DEVICES=0,1)" in errors[0], outs
    assert "[rank" not in outs[0] + outs[1], "nothing may start"


def test_offline_without_data_fails_fast_on_every_rank(tmp_path):
    # no data and no network: every proxy points at a closed local port, so downloads are refused at once
    dead = "http://127.0.0.1:9"
    env = clean_env(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
    t0 = time.monotonic()
    rc, out = run([TORCHRUN, "--standalone", "--nproc_per_node=2", SCRIPT, f"--data-dir={tmp_path / 'nodata'}",
                   f"--output-dir={tmp_path}"], env=env, cwd=tmp_path, timeout=120)
    assert rc != 0
    assert time.monotonic() - t0 < 60
    errors = [line for line in out.splitlines() if line.startswith("ERROR: MNIST is not in")]
    assert len(errors) == 1, out  # one line, from rank 0
    assert "--download-only" in errors[0] and str(tmp_path / "nodata") in errors[0]
    # torchrun's summary: our line is the root cause (its error file), not "To enable traceback see ..."
    root_cause = out[out.index("Root Cause (first observed failure):"):]
    assert re.search(r"^\s*traceback : ERROR: MNIST is not in ", root_cause, re.M), root_cause
    assert "To enable traceback" not in out


@pytest.mark.parametrize("bad", ["--batch-size=-3", "--device=tpu"])
def test_bad_arguments_are_argparse_errors(bad, tmp_path):
    rc, out = run([PYTHON, SCRIPT, bad], env=clean_env(), cwd=tmp_path, timeout=120)
    assert rc == 2
    assert "error: argument" in out


def test_cuda_requested_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here; this tests the error on machines without one")
    rc, out = run([PYTHON, SCRIPT, "--device=cuda"], env=clean_env(), cwd=tmp_path, timeout=120)
    assert rc == 1
    assert "--device cuda was given, but no CUDA device is visible" in out and "HINT" in out


# a save that never finishes: the real torch.save writes the temporary file, which is then cut short, and the
# process waits there for the test's kill -9 (the moment a node dies mid-save, made reproducible)
DIES_WHILE_SAVING = """
import sys, time, torch, mnist_ddp
real_save = torch.save
def save(obj, path):
    real_save(obj, path)
    if obj["epoch"] == 2:
        with open(path, "r+b") as f:
            f.truncate(1000)
        print("SAVING", flush=True)
        time.sleep(600)
torch.save = save
mnist_ddp.main(mnist_ddp.get_args(sys.argv[1:]))
"""


def test_kill_during_save_and_corrupt_newest_checkpoint_fall_back(mnist_dir, tmp_path, single):
    ckpt = tmp_path / "ckpt"
    args = ["--epochs=2", "--batch-size=64", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
            f"--checkpoint-dir={ckpt}"]
    reference = done_record(single[1])["param_checksums"]  # the same run without checkpoints (--amp is a no-op on CPU)

    p = start([PYTHON, "-c", DIES_WHILE_SAVING] + args, env=clean_env(PYTHONPATH=str(REPO)), cwd=tmp_path)
    for line in p.stdout:
        if line.startswith("SAVING"):
            p.kill()  # SIGKILL in the middle of writing epoch 2's checkpoint
            break
    p.wait()
    assert sorted(f.name for f in ckpt.iterdir())[0] == "epoch_0001.pt" and "epoch_0002.pt" not in os.listdir(ckpt)
    rc, out = run([PYTHON, SCRIPT] + args, env=clean_env(), cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert "continuing at epoch 2" in out and [e for _, e, _ in epoch_lines(out)] == [2]
    assert done_record(out)["param_checksums"] == reference, \
        "epoch 2 redone from epoch 1's checkpoint: the same weights"

    newest = ckpt / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # as if written in place by code without an atomic rename
    rc, out = run([PYTHON, SCRIPT] + args, env=clean_env(), cwd=tmp_path)
    assert rc == 0, out[-3000:]
    assert f"WARNING: cannot load {newest}" in out and "continuing at epoch 2" in out
    assert done_record(out)["param_checksums"] == reference

    # none loads (damaged, or a file weights_only refuses): one ERROR line, no training from scratch over them
    for path in ckpt.iterdir():
        path.write_bytes(path.read_bytes()[:1000])
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    rc, out = run([PYTHON, SCRIPT] + args, env=clean_env(), cwd=tmp_path)
    [error] = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert rc == 1 and error.startswith(f"ERROR: none of the 2 checkpoints in {ckpt} loads (the newest: "), out[-3000:]
    assert "will not start afresh over them. HINT:" in error and epoch_lines(out) == [], out[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before, "nothing written over them"


def test_bad_checkpoint_dirs_are_refused(tmp_path, mnist_dir):
    import torch
    (tmp_path / "a_file").write_text("")
    base = [PYTHON, SCRIPT, f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}"]
    rc, out = run(base + [f"--checkpoint-dir={tmp_path / 'a_file' / 'ckpt'}"], env=clean_env(), cwd=tmp_path,
                  timeout=120)
    assert rc == 1 and "ERROR: cannot write checkpoints to" in out, out
    assert "Not a directory" in out and "Traceback" not in out, out
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"script": "imagenet_ddp.py", "epoch": 1}, other / "epoch_0001.pt")
    rc, out = run(base + [f"--checkpoint-dir={other}"], env=clean_env(), cwd=tmp_path, timeout=120)
    assert rc == 1 and "was not written by mnist_ddp.py (it is from imagenet_ddp.py)" in out, out
    assert "Traceback" not in out, out
    assert os.listdir(other) == ["epoch_0001.pt"], "nothing overwritten"


def test_master_port_in_use_is_one_clear_error(tmp_path, mnist_dir):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        p = start([PYTHON, SCRIPT, f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}"], cwd=tmp_path, env=clean_env(
            SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NTASKS=2, SLURM_STEP_ID=0, SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
        out = p.communicate(timeout=120)[0]  # rank 1 would be ended by srun --kill-on-bad-exit, as the wrappers run it
    assert p.returncode == 1 and time.monotonic() - t0 < 60
    assert f"rank 0 cannot listen on MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port}" in out and "Traceback" not in out, out


