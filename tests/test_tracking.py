"""Weights & Biases (cluster/tracking.py), with the installed wandb, offline: a run stopped mid-epoch and resumed is
one W&B run with every global step once; a node without network logs offline within a bounded time; only rank 0
imports wandb. Skipped, saying so, where wandb is not installed (pip install wandb)."""
import http.server
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, check_signal_stop, done_record, run_srun_style, tensorboard_scalars

sys.path.insert(0, str(REPO))
from cluster import tracking  # noqa: E402

SCRIPT = str(REPO / "mnist_ddp.py")


def wandb_records(path):
    """The records of a W&B run file (run-ID.wandb), decoded with wandb's own protobuf classes: the file is a W&B
    header (':W&B', a magic number, a version) then a LevelDB log (32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2
    data, block, pos, whole, parts = Path(path).read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding to the block's end
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:  # FULL
            whole.append(chunk)
        elif kind == 2:  # FIRST
            parts = chunk
        elif kind == 3:  # MIDDLE
            parts += chunk
        else:  # LAST
            whole.append(parts + chunk)
    return [wandb_internal_pb2.Record.FromString(raw) for raw in whole]


class SilentServer:
    """A W&B base URL on this machine that accepts connections and never answers: a node whose network drops them."""

    def __enter__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)  # the kernel completes connections into the backlog; nobody reads them
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()


def test_where_wandb_logs(monkeypatch):
    """WANDB_MODE decides where it is set (no probe); where not, an answering server (any status) means online, and
    one that never answers means offline, decided within the probe's bound, with one line; WANDB_MODE=online and no
    answer: one WARNING line, offline, no hang."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answering = f"http://127.0.0.1:{server.server_port}"
    try:
        assert tracking.mode({"WANDB_MODE": "offline", "WANDB_BASE_URL": "http://192.0.2.1"}) == ("offline", None)
        assert tracking.mode({"WANDB_BASE_URL": answering}) == ("online", None)
        assert tracking.mode({"WANDB_MODE": "online", "WANDB_BASE_URL": answering}) == ("online", None)
    finally:
        server.shutdown()
    with SilentServer() as silent:
        for env, line in [({}, r"^W&B: the W&B server \S+ did not answer within 5 s .*: logging offline$"),
                          ({"WANDB_MODE": "online"}, r"^WARNING: WANDB_MODE=online, but the W&B server \S+ did not "
                                                     r"answer within 5 s: W&B logs offline instead")]:
            t0 = time.monotonic()
            where, said = tracking.mode({**env, "WANDB_BASE_URL": silent})
            assert time.monotonic() - t0 < tracking.PROBE_SECONDS + 2
            assert where == "offline" and re.match(line, said), said


def test_a_requeued_run_is_one_wandb_run_with_every_step_once(mnist_dir, tmp_path):
    """2 srun-style ranks with --wandb on a node whose W&B server never answers (WANDB_MODE unset): each segment says
    in one line that it logs offline. SIGUSR1 mid-epoch, then the resume: both offline runs carry the run's id (its
    TensorBoard folder's name); read back with wandb's own record classes, the history holds every global step the
    TensorBoard curves hold, exactly once and in order, and the config holds the options; rank 1 never imported
    wandb."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb): W&B is optional")
    cmd = [SCRIPT, "--epochs=2", "--batch-size=32", f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
           f"--checkpoint-dir={tmp_path / 'ckpt'}", "--wandb"]
    cmd = [sys.executable] + cmd
    with SilentServer() as silent:
        env = {"WANDB_BASE_URL": silent, "WANDB_PROBE": "1"}
        first = check_signal_stop(cmd, tmp_path, expect_checkpoint="epoch_000[01]_step_*.pt", **env)
        rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path, **env)
    assert rcs == [0, 0], outs[0][-3000:]
    done_record(outs[0])
    offline_line = re.compile(r"^W&B: the W&B server \S+ did not answer within 5 s .*: logging offline$", re.M)
    for out in (first[0], outs[0]):
        assert len(offline_line.findall(out)) == 1 and "W&B: offline run" in out, out[-3000:]
    for out in (first[1], outs[1]):
        assert "W&B" not in out and "WANDB PROBE: wandb imported: no" in out, out[-2000:]
    assert "WANDB PROBE: wandb imported: yes" in first[0] and "WANDB PROBE: wandb imported: yes" in outs[0]

    [run_dir] = (tmp_path / "tensorboard").iterdir()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_dir.name}") for r in runs), runs
    steps, config = [], None
    for r in runs:
        for record in wandb_records(r / f"run-{run_dir.name}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                steps.append(record.history.step.num)
            elif kind == "run":
                assert record.run.run_id == run_dir.name
                config = {item.key: item.value_json for item in record.run.config.update}
    curves = tensorboard_scalars(run_dir)
    expected = sorted({step for points in curves.values() for step, _ in points})
    assert steps == expected, (steps, expected)
    options = json.loads(config["options"])
    assert options["batch_size"] == 32 and options["wandb"] is True and json.loads(config["world_size"]) == 2, config
    assert json.loads(config["versions"])["torch"] == torch.__version__


def test_lightning_continues_its_wandb_run_on_resume(mnist_dir, tmp_path):
    """Lightning's script through its WandbLogger, with the same id rule: 1 epoch, then the same run resumed from
    last.ckpt for a second (WANDB_MODE=offline: no probe, no line about it); both offline runs carry the TensorBoard
    folder's name as their id, the history's global steps (Lightning's trainer/global_step) are each logged once, in
    order, over both epochs, and the config holds the options."""
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb): W&B is optional")
    from conftest import clean_env, run
    base = [sys.executable, str(REPO / "mnist_lightning_ddp.py"), f"--data-dir={mnist_dir}", f"--output-dir={tmp_path}",
            f"--checkpoint-dir={tmp_path / 'ckpt'}", "--device=cpu", "--wandb", "--log-interval=10"]
    for epochs in (1, 2):
        rc, out = run(base + [f"--epochs={epochs}"], env=clean_env(WANDB_MODE="offline"), cwd=tmp_path)
        assert rc == 0, out[-3000:]
        assert "did not answer" not in out and "W&B" not in out.replace("W&B: offline run", ""), out[-2000:]
    [run_dir] = (tmp_path / "tensorboard").iterdir()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_dir.name}") for r in runs), runs
    steps, configs = [], []
    for r in runs:
        for record in wandb_records(r / f"run-{run_dir.name}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "history":  # Lightning's x-axis: trainer/global_step (W&B's own _step counts its calls)
                steps += [json.loads(i.value_json) for i in record.history.item
                          if (i.key or "/".join(i.nested_key)) == "trainer/global_step"]
            elif kind == "config":
                configs.append({item.key: item.value_json for item in record.config.update})
    assert steps == sorted(set(steps)) and steps[-1] == 2 * 79, steps  # 79 steps of 64 digits per epoch
    options = [c for c in configs if "options" in c]
    assert options and json.loads(options[-1]["options"])["wandb"] is True, configs
