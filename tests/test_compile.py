"""--compile on CPU (inductor, which builds C++ with g++): each script that has the flag trains to its usual accuracy,
and torch.compile does not recompile per step. TORCH_LOGS=recompiles makes dynamo log each recompile with its
reason; the bounds below allow the ones a run needs: the last, shorter batch of an epoch, and evaluation mode."""
import re
import shutil

import pytest

from conftest import PYTHON, REPO, TORCHRUN, clean_env, done_record, epoch_lines, make_imagenet_archives, run

pytestmark = pytest.mark.skipif(not shutil.which("g++"), reason="inductor needs a C++ compiler (g++) on CPU")
RECOMPILE = re.compile(r"^(?:\[rank(\d+)\]:)?.*Recompiling function (\S+)", re.M)


def recompiles(out):
    """{rank: [function recompiled, ...]} from the dynamo log (rank 0 when the run has no process group)."""
    found = {}
    for rank, function in RECOMPILE.findall(out):
        found.setdefault(int(rank or 0), []).append(function)
    return found


def compiled(cmd, cwd, timeout=600):
    return run(cmd, env=clean_env(TORCH_LOGS="recompiles"), cwd=cwd, timeout=timeout)


def test_mnist_ddp_compiled_trains_and_resumes_with_bounded_recompiles(mnist_dir, tmp_path):
    """Two ranks, 1 epoch: one recompile at most per rank (the short last batch). Then a run to 2 epochs resumes the
    checkpoint through DDP's bucket-order replay, a full batch: again one recompile at most, not a graph per run."""
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "mnist_ddp.py"), f"--data-dir={mnist_dir}",
           f"--output-dir={tmp_path}", f"--checkpoint-dir={tmp_path / 'ckpt'}", "--device=cpu", "--compile"]
    rc, out = compiled(cmd + ["--epochs=1"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "fp32, compiled on cpu" in out
    [(_, epoch, acc)] = epoch_lines(out)
    assert epoch == 1 and acc > 92.0, out[-2000:]  # 94.3% uncompiled
    counts = recompiles(out)
    assert all(len(counts.get(r, [])) <= 1 for r in (0, 1)), counts

    rc, out = compiled(cmd + ["--epochs=2"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and [e for _, e, _ in epoch_lines(out)] == [2], out[-3000:]
    assert epoch_lines(out)[0][2] > 94.5  # 95.9% uncompiled; compiled, dropout draws from inductor's own generator
    counts = recompiles(out)
    assert all(len(counts.get(r, [])) <= 1 for r in (0, 1)), counts
    assert len(set(done_record(out)["param_checksums"])) == 1


def test_lightning_compiled_trains_with_bounded_recompiles(mnist_dir, tmp_path):
    """The network is compiled, not the steps around it (their Python logging would recompile at every batch index,
    and made dynamo fail): at most the short last batch and evaluation (no_grad) recompile."""
    rc, out = compiled([PYTHON, str(REPO / "mnist_lightning_ddp.py"), f"--data-dir={mnist_dir}", "--epochs=1",
                        f"--output-dir={tmp_path}", f"--checkpoint-dir={tmp_path / 'ckpt'}", "--device=cpu",
                        "--compile"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "32-true, compiled on cpu" in out
    [(_, epoch, acc)] = epoch_lines(out)
    assert epoch == 1 and acc > 93.0, out[-2000:]  # 95.5% measured
    assert len(recompiles(out).get(0, [])) <= 2, recompiles(out)
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_imagenet_compiled_trains_like_uncompiled_with_bounded_recompiles(tmp_path):
    """resnet18 at 64 px on generated JPEGs, one process: the compiled run ends where the eager one does (float32 on
    CPU: the same losses to a small tolerance); recompiles at most for evaluation mode."""
    make_imagenet_archives(tmp_path, 4, 8, 2, size=(80, 60))
    cmd = [PYTHON, str(REPO / "imagenet_ddp.py"), f"--data-dir={tmp_path}", f"--local-dir={tmp_path / 'local'}",
           "--arch=resnet18", "--image-size=64", "--batch-size=4", "--epochs=1", "--workers=1", "--device=cpu"]
    rc, eager = run(cmd + [f"--output-dir={tmp_path / 'eager'}"], env=clean_env(), cwd=tmp_path, timeout=300)
    assert rc == 0, eager[-3000:]
    rc, out = compiled(cmd + [f"--output-dir={tmp_path / 'compiled'}", "--compile"], tmp_path)
    assert rc == 0, out[-3000:]
    assert "fp32, compiled on cpu" in out
    done, reference = done_record(out), done_record(eager)
    assert done["val_count"] == reference["val_count"] == 8
    assert done["val_loss"] == pytest.approx(reference["val_loss"], rel=0.05), (done, reference)
    assert len(recompiles(out).get(0, [])) <= 2, recompiles(out)
