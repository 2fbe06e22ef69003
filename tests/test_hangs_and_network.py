"""When a multi-node job is slow or hangs: check_interconnect.py's all-reduce bandwidth on CPU with gloo (torchrun and
srun-style), the NCCL lines it reads, and a rank stuck mid-training, which leaves every rank's stack and a line naming
the collective in the log, and ends the run. The same on the Slurm cluster: tests/test_slurm_wrappers.py."""
import re
import subprocess
import time

import cluster
from conftest import (PYTHON, check_clean_exit, copy_alone, done_record, run_srun_style, run_torchrun,
                      slurm_job_id_with_free_port, srun_env)

CHECK = ["check_interconnect.py", "--device=cpu", "--max-bytes=256K", "--iters=5", "--warmup=2"]
TIMEOUT = 10  # --dist-timeout of the hang


def check_bandwidth(done, world_size, nodes=1):
    """One row per size from 1 KB to the largest, each with a positive bus bandwidth and a rank that was slowest."""
    assert done["world_size"] == world_size and done["nodes"] == nodes
    assert [r["bytes"] for r in done["rows"]] == [1024 << i for i in range(len(done["rows"]))]
    assert done["rows"][-1]["bytes"] == 256 << 10
    assert all(r["busbw"] > 0 and 0 <= r["slowest_rank"] < world_size for r in done["rows"]), done["rows"]
    assert done["peak_busbw"] == max(r["busbw"] for r in done["rows"])


def test_the_interconnect_check_under_torchrun(tmp_path):
    copy_alone(tmp_path, "check_interconnect.py")  # with cluster/: the copy unit
    rc, out, ranks = run_torchrun(CHECK, cwd=tmp_path, timeout=120)
    assert rc == 0, out[-3000:]
    check_bandwidth(done_record(ranks[0]), 2)
    assert re.search(r"^peak bus bandwidth within the node: [\d.]+ GB/s at \d+ KB$", ranks[0], re.M), ranks[0]
    assert '"event"' not in ranks[1], "rank 1 stays quiet"


def test_the_interconnect_check_srun_style(tmp_path):
    rcs, outs = run_srun_style([PYTHON, copy_alone(tmp_path, "check_interconnect.py")] + CHECK[1:], 2, cwd=tmp_path,
                               timeout=120)
    assert rcs == [0, 0], outs
    check_bandwidth(done_record(outs[0]), 2)
    check_clean_exit("".join(outs))


def test_the_transports_are_read_from_nccls_info_lines():
    from check_interconnect import transports
    # lines in the form NCCL 2.2x writes them with NCCL_DEBUG=INFO
    nvlink_and_ib = """
n1:123:456 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.1<0>
n1:123:456 [0] NCCL INFO Using network IB
n1:123:456 [0] NCCL INFO Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read
n1:123:456 [0] NCCL INFO Channel 01/0 : 4[0] -> 0[0] [receive] via NET/IB/0/GDRDMA
"""
    assert transports(nvlink_and_ib) == ["NET/IB", "P2P"]
    roce = "x NCCL INFO NET/IB : Using [0]mlx5_0:1/RoCE ; OOB eth0:10.0.0.1<0>\nx NCCL INFO Using network IB\n"
    assert transports(roce) == ["NET/IB (RoCE)"]
    sockets = ("x NCCL INFO NET/Socket : Using [0]eth0:10.0.0.1<0>\nx NCCL INFO Using network Socket\n"
               "x NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/Socket/0\n"
               "x NCCL INFO Channel 00/0 : 0[0] -> 1[1] via SHM/direct/direct\n")
    assert transports(sockets) == ["NET/Socket", "SHM"]
    efa = ("x NCCL INFO Using network AWS Libfabric\n"
           "x NCCL INFO Channel 00/0 : 1[1] -> 2[0] [send] via NET/AWS Libfabric/0\n")
    assert transports(efa) == ["NET/AWS Libfabric"]
    assert transports("") == []


def test_nccl_gets_the_flight_recorder_unless_the_user_set_it(tmp_path):
    import cluster
    env = {}
    cluster.hangs.flight_recorder(str(tmp_path), env)
    prefix = f"{tmp_path}/flight_recorder/rank_"
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == prefix
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0 and env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert (tmp_path / "flight_recorder").is_dir()
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "50"}  # the old name: the user's, kept
    cluster.hangs.flight_recorder(str(tmp_path), env)
    assert env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "50" and "TORCH_FR_BUFFER_SIZE" not in env


def check_hang_evidence(out, timeout):
    """What a hang leaves: one line naming the collective and the timeout, rank 0's stack at it (in backward), and
    rank 1's own stack where it is stuck (the test's hook in its optimizer step), each once."""
    errors = re.findall(r"^ERROR: rank 0 on \S+: (.*)$", out, re.M)
    assert len(errors) == 1, out[-5000:]
    # the next step's backward, or the stop check every 10 steps, whichever rank 0 reached first
    assert re.match(r"(the gradients' all-reduce .* in backward\(\) \(mnist_ddp\.py line \d+, in train\)|all_reduce "
                    r"\(cluster/stopping\.py line \d+, in stop_check, from mnist_ddp\.py line \d+, in train\)) "
                    rf"timed out after {timeout} s \(--dist-timeout\)", errors[0]), errors[0]
    rank0 = [line[len("[rank 0] "):] for line in out.splitlines() if line.startswith("[rank 0] ")]
    rank1 = [line[len("[rank 1] "):] for line in out.splitlines() if line.startswith("[rank 1] ")]
    assert sum(line.startswith("the stacks at the timeout. Rank 0 on ") for line in rank0) == 1, out[-5000:]
    assert "Thread MainThread (where the error was raised):" in rank0
    assert any(".backward()" in line or "cluster.stop_check(" in line for line in rank0), rank0
    warned = [k for k, line in enumerate(rank1) if line.startswith("WARNING: ")]
    assert len(warned) == 1, out[-5000:]
    assert re.match(r"WARNING: (SIGTERM came while this rank had made no progress for \d+ s|rank 0's .+? timed out, "
                    r"and this rank has made no progress for \d+ s): it may be the rank the others wait for",
                    rank1[warned[0]]), rank1[warned[0]]
    rank1 = rank1[warned[0]:]
    stuck = "\n".join(rank1)
    assert "scaler.step(optimizer)" in stuck and ", in stuck\n" in stuck, stuck


def test_a_stuck_rank_leaves_its_stack_and_the_run_ends(tmp_path, mnist_dir):
    """Rank 1 gets stuck in its 5th optimizer step, alive, in Python. Rank 0 waits in the next backward's all-reduce
    until --dist-timeout; then the log names that collective and holds both ranks' stacks, and torchrun ends it all."""
    copy_alone(tmp_path, "mnist_ddp.py")
    t0 = time.monotonic()
    rc, out, ranks = run_torchrun(["mnist_ddp.py", "--device=cpu", "--epochs=1", f"--dist-timeout={TIMEOUT}",
                                   "--data-dir", mnist_dir], cwd=tmp_path, timeout=300, HANG_AT_STEP=5)
    assert rc != 0
    assert time.monotonic() - t0 < TIMEOUT + 90, "every process is gone within the timeout plus 90 s"
    check_hang_evidence(out, TIMEOUT)


def test_a_stuck_rank_that_no_launcher_ends_prints_its_stack_after_the_timeout(tmp_path, mnist_dir):
    """srun-style ranks and no srun to end the stuck one: rank 0's collective times out, rank 0 tells the others
    through the store the ranks met at, and rank 1, which has made no progress since, prints its stack, with no
    signal. Rank 0 waits for it to have heard before it exits (it holds the store)."""
    job_id = slurm_job_id_with_free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    script = copy_alone(tmp_path, "mnist_ddp.py")
    procs = [subprocess.Popen([PYTHON, script, "--device=cpu", "--epochs=1", f"--dist-timeout={TIMEOUT}",
                               "--data-dir", mnist_dir], cwd=tmp_path,
                              stdout=open(logs[r], "w"), stderr=subprocess.STDOUT,
                              env=srun_env(r, 2, job_id, HANG_AT_STEP=5)) for r in range(2)]
    try:
        assert procs[0].wait(timeout=120) == 1
        deadline = time.monotonic() + cluster.hangs.STALL_MARGIN + 30
        while "every thread's Python stack" not in logs[1].read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(1)
        assert procs[1].poll() is None, "alive, stuck"
    finally:
        for p in procs:
            p.kill()
    out = logs[0].read_text() + logs[1].read_text()
    check_hang_evidence(out, TIMEOUT)
    assert re.search(r"\[rank 1\] WARNING: rank 0's .+? timed out, and this rank has made no progress for \d+ s",
                     out), out[-3000:]

