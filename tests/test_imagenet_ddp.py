"""imagenet_ddp.py on a miniature ImageNet in its real download layout (real JPEG files in nested tars, a devkit with
meta.mat), CPU + gloo, resnet18 at 64 px: staging, training with exact validation, mid-epoch stop and exact resume."""
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import time

import pytest

from conftest import (PYTHON, REPO, STARTUP_LINE, check_signal_stop, check_time_split, clean_env, copy_alone,
                      done_record, make_imagenet_archives, run, run_srun_style, slurm_job_id_with_free_port, srun_env,
                      start, timed)

sys.path.insert(0, str(REPO))
import imagenet_ddp  # noqa: E402  (only its pure functions are used here)
import imagenet_staging  # noqa: E402

SCRIPT = str(REPO / "imagenet_ddp.py")
N_CLASSES, N_TRAIN, N_VAL = 4, 20, 3  # 80 training images: 20 steps per epoch for 2 ranks x 2 images
TOY = ["--arch=resnet18", "--image-size=64", "--batch-size=2", "--epochs=2", "--workers=1", "--device=cpu",
       "--log-interval=5"]


@pytest.fixture(scope="module", autouse=True)
def no_deprecated_decoder():
    """Every run here turns torchvision's deprecation of its image decoders into an error: the script decodes with
    TorchCodec."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONWARNINGS", "error::DeprecationWarning:torchvision.io.image")
        yield


def test_torchcodec_decodes_the_same_pixels_as_torchvision(archives, tmp_path):
    """The script's decoder is TorchCodec's, and its pixels are torchvision's (the same libjpeg-turbo): the same crops
    as before, on the miniature ImageNet's JPEGs."""
    import warnings

    import torch
    from torchvision.io import ImageReadMode, decode_image
    if importlib.util.find_spec("torchcodec") is None:  # as with requirements-oldest.txt (./dev.sh test-oldest)
        pytest.skip("torchcodec is not installed: the script decodes with torchvision's decoder, the other tests' path")
    assert imagenet_ddp.decode_image.__module__.startswith("torchcodec"), imagenet_ddp.decode_image.__module__
    rc, out = stage_only(archives, tmp_path)
    assert rc == 0, out
    files = sorted((tmp_path / "train").rglob("*.JPEG"))[:8]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's, here only to compare
        for path in files:
            data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            assert torch.equal(imagenet_ddp.decode_image(data, mode=imagenet_ddp.ImageReadMode.RGB),
                               decode_image(data, mode=ImageReadMode.RGB)), path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet")
    wnids, val_wnids = make_imagenet_archives(folder, N_CLASSES, N_TRAIN, N_VAL, size=(80, 60))
    return folder, wnids, val_wnids


def stage_only(archives, local_dir):
    return run([PYTHON, SCRIPT, f"--data-dir={archives[0]}", f"--local-dir={local_dir}", "--stage-only"],
               env=clean_env(), timeout=120)


def test_staging_extracts_once_and_labels_val_from_the_devkit(archives, tmp_path):
    folder, wnids, val_wnids = archives
    local = tmp_path / "local"
    rc, out = stage_only(archives, local)
    assert rc == 0 and f"staged {N_CLASSES} classes and {len(val_wnids)} validation images" in out, out
    assert sorted(p.name for p in (local / "train").iterdir()) == wnids
    assert all(len(list((local / "train" / w).glob("*.JPEG"))) == N_TRAIN for w in wnids)
    for i, wnid in enumerate(val_wnids):  # every val image in the folder of its devkit label
        assert (local / "val" / wnid / f"ILSVRC2012_val_{i + 1:08d}.JPEG").is_file()
    assert sum(1 for _ in (local / "val").glob("*/*.JPEG")) == len(val_wnids)

    rc, out = stage_only(archives, local)  # the marker says it is complete: nothing extracted again
    assert rc == 0 and "staged" not in out and f"data ready in {local}" in out, out


def test_half_finished_staging_is_redone(archives, tmp_path):
    local = tmp_path / "local"
    (local / "train" / "n01440764").mkdir(parents=True)  # a copy killed mid-way: some files, no marker
    (local / "train" / "n01440764" / "partial.JPEG").write_bytes(b"\xff\xd8 cut off")
    rc, out = stage_only(archives, local)
    assert rc == 0 and "staged 4 classes" in out, out
    assert not (local / "train" / "n01440764" / "partial.JPEG").exists()
    assert (local / "STAGED").is_file()


def test_staging_that_would_not_fill_the_disk_stops_before_writing(archives, tmp_path, monkeypatch, capfd):
    """Free space is compared with the archives' sizes first: one ERROR line with both, the path and a HINT."""
    folder, _, _ = archives
    local = tmp_path / "local"
    need = sum((folder / n).stat().st_size for n in (imagenet_staging.TRAIN_TAR, imagenet_staging.VAL_TAR))
    too_little = shutil._ntuple_diskusage(10**12, 0, need - 1)  # total, used, free
    monkeypatch.setattr(imagenet_staging.shutil, "disk_usage", lambda path: too_little)
    args = imagenet_ddp.get_args([f"--data-dir={folder}", f"--local-dir={local}", "--stage-only"])
    with pytest.raises(SystemExit) as e:
        imagenet_staging.find_data(args)
    assert e.value.code == 1
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"ERROR: staging {folder} into {local} on ") and "HINT: --local-dir needs" in line, line
    assert f"{local} has {(need - 1) / 1e9:.1f} GB free, but the archives need {need / 1e9:.1f} GB" in line, line
    assert sorted(p.name for p in local.iterdir()) == [".lock"], "nothing written"


def test_missing_data_is_one_clear_error(tmp_path):
    rc, out = run([PYTHON, SCRIPT, f"--data-dir={tmp_path}", "--stage-only"], env=clean_env(), timeout=60)
    assert rc == 1 and "ERROR: no ImageNet in" in out, out
    assert "ILSVRC2012_img_train.tar" in out and "Traceback" not in out, out


@pytest.fixture(scope="module")
def reference(archives, tmp_path_factory):
    """Two srun-style ranks, 2 epochs of 20 steps, with checkpoints: the uninterrupted run."""
    d = tmp_path_factory.mktemp("reference")
    cmd = [PYTHON, SCRIPT, f"--data-dir={archives[0]}", f"--local-dir={d / 'local'}", f"--checkpoint-dir={d / 'ckpt'}",
           f"--output-dir={d / 'out'}"] + TOY
    (rcs, outs), wall = timed(run_srun_style, cmd, 2, cwd=d, timeout=300)
    return d, rcs, outs, wall


def test_two_ranks_train_and_validate_exactly(reference, archives):
    d, rcs, outs, wall = reference
    assert rcs == [0, 0], outs[0][-3000:] + outs[1][-2000:]
    done = done_record(outs[0])
    assert done["world_size"] == 2 and done["synthetic"] is False
    assert done["val_count"] == len(archives[2]) == N_CLASSES * N_VAL  # 12 images over 2 ranks: each counted once
    assert 0 <= done["top1"] <= done["top5"] <= 1 and done["images_per_s"] > 0
    assert len(set(done["param_checksums"])) == 1, "replicas diverged (BatchNorm statistics included)"
    epochs = [line for line in outs[0].splitlines() if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"] and "top-1" in epochs[0]
    assert not any(line.startswith("epoch ") for line in outs[1].splitlines()), "rank 1 must stay quiet"
    assert "20 steps/epoch" in outs[0] and "1 workers/process" in outs[0]
    assert sorted(p.name for p in (d / "ckpt").iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    metrics = [json.loads(line) for line in next((d / "out").glob("metrics-*.jsonl")).read_text().splitlines()]
    assert [m["event"] for m in metrics] == ["config", "epoch", "epoch", "done"]  # copied back from local disk
    config = metrics[0]
    assert config["script"] == "imagenet_ddp.py" and config["world_size"] == 2, config
    assert config["options"]["data_dir"] == str(archives[0]) and config["options"]["epochs"] == 2, config
    assert done["efficiency"]["samples_per_s_per_gpu"] == done["images_per_s"] / 2
    assert done["efficiency"]["flops_per_sample"] > 0, "counted for torchvision's model too"
    check_time_split(outs[0], wall, staged=True, checkpointed=True)


def test_signal_mid_epoch_then_resume_is_bit_identical(reference, archives, tmp_path):
    """SIGTERM to every process, DataLoader workers included (2 per rank), once training runs: both ranks stop at the
    same step, rank 0 checkpoints mid-epoch, both exit 75; the rerun (1 worker per rank, as the reference) resumes at
    that step and ends with exactly the parameters of the uninterrupted run."""
    cmd = [PYTHON, SCRIPT, f"--data-dir={archives[0]}", f"--local-dir={tmp_path / 'local'}",
           f"--checkpoint-dir={tmp_path / 'ckpt'}", f"--output-dir={tmp_path / 'out'}"] + TOY
    outs = check_signal_stop(cmd + ["--workers=2"], tmp_path, expect_checkpoint="epoch_0000_step_*.pt",
                             sig=signal.SIGTERM)
    assert "killed by signal" not in outs[0] + outs[1] and "Traceback" not in outs[0] + outs[1], outs[0][-3000:]
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path, timeout=300)
    assert rcs == [0, 0], outs[0][-3000:]
    assert re.search(r"resumed from .*epoch_0000_step_\d+\.pt: epoch 0 done and \d+ steps of epoch 1",
                     outs[0]), outs[0][-3000:]
    assert done_record(outs[0])["param_checksums"] == done_record(reference[2][0])["param_checksums"]
    # the same checkpoints under another run's settings: refused in one line naming each difference
    rc, out = run(cmd + ["--lr=0.2", "--epochs=3"], env=clean_env(), cwd=tmp_path, timeout=120)
    [error] = [line for line in out.splitlines() if line.startswith("ERROR:")]
    assert rc == 1 and "another run: steps_per_epoch 20 -> 40, lr 0.1 -> 0.2, world_size 2 -> 1 (each" in error, \
        out[-3000:]


def test_from_tar_trains_identically_without_extracting_anything(reference, archives, tmp_path):
    """--from-tar: the two tars are copied and indexed, the DataLoader reads byte ranges of them; the same images in the
    same order as the extracted folders, so the run ends bit-identical to the reference."""
    cmd = [PYTHON, SCRIPT, f"--data-dir={archives[0]}", f"--local-dir={tmp_path / 'local'}", "--from-tar"] + TOY
    rcs, outs = run_srun_style(cmd, 2, cwd=tmp_path, timeout=300)
    assert rcs == [0, 0], outs[0][-3000:]
    assert "(copied + indexed)" in outs[0] + outs[1]
    assert not list((tmp_path / "local").rglob("*.JPEG")), "nothing extracted"
    done, ref = done_record(outs[0]), done_record(reference[2][0])
    assert done["param_checksums"] == ref["param_checksums"]
    assert (done["val_count"], done["top1"], done["top5"]) == (ref["val_count"], ref["top1"], ref["top5"])
    assert done["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-6)  # the same images, summed in another order


def test_synthetic_mode_is_labelled(tmp_path):
    rc, out = run([PYTHON, SCRIPT, "--synthetic", "--steps-per-epoch=8", "--epochs=1", "--arch=resnet18",
                   "--image-size=32", "--batch-size=4", f"--output-dir={tmp_path}", f"--local-dir={tmp_path}"],
                  env=clean_env(), timeout=120)
    assert rc == 0, out[-3000:]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "SYNTHETIC DATA" in out and "[SYNTHETIC DATA]" in epochs[-1]
    done = done_record(out)
    assert done["synthetic"] is True and done["top1"] is None and done["images_per_s"] > 0


@pytest.mark.parametrize("args, message", [
    (["--arch=resnet51"], "unknown --arch resnet51"),
    (["--batch-size=0"], "--batch-size: must be a positive integer"),
    (["--device=cuda"], "--device cuda was given, but no CUDA device"),
])
def test_bad_inputs_fail_with_one_line(args, message, tmp_path):
    rc, out = run([PYTHON, SCRIPT, "--synthetic", "--steps-per-epoch=2", f"--output-dir={tmp_path}",
                   f"--local-dir={tmp_path}"] + args,
                  env=clean_env(), timeout=120)  # clean_env hides GPUs: --device=cuda finds none
    assert rc != 0 and message in out and "Traceback" not in out, out


def test_unreadable_images_are_skipped_and_counted(archives, tmp_path):
    tree = tmp_path / "tree"
    rc, out = stage_only(archives, tree)
    assert rc == 0, out
    (tree / "STAGED").unlink()  # from here on an extracted train/ val/ tree, used as it is
    victim = sorted((tree / "val" / archives[1][0]).iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    alone = copy_alone(tmp_path / "project", "imagenet_ddp.py")  # with cluster/, imagenet_staging.py
    rc, out = run([PYTHON, alone, f"--data-dir={tree}", "--epochs=1", "--steps-per-epoch=2", "--arch=resnet18",
                   "--image-size=32", "--batch-size=4", "--workers=0", f"--output-dir={tmp_path}",
                   f"--local-dir={tmp_path}"],
                  env=clean_env(), timeout=120)
    assert rc == 0, out[-3000:]
    assert f"skipping unreadable image {victim}" in out
    assert "skipped 0 training and 1 validation images" in out
    done = done_record(out)
    assert (done["val_count"], done["val_skipped"]) == (N_CLASSES * N_VAL - 1, 1)


def test_lr_schedule_warms_up_then_decays():
    class A:
        warmup_epochs, epochs, schedule = 2, 10, "cosine"
    f = [imagenet_ddp.lr_factor(s, 10, A) for s in range(100)]
    assert f[0] == pytest.approx(0.05) and f[19] == pytest.approx(1.0)  # linear warm-up over 20 steps
    assert f[20] == pytest.approx(1.0) and f[99] < 0.01 and all(a >= b for a, b in zip(f[20:], f[21:], strict=False))
    A.schedule = "step"
    assert imagenet_ddp.lr_factor(29 * 10, 10, A) == 1.0
    assert imagenet_ddp.lr_factor(30 * 10, 10, A) == pytest.approx(0.1)


def test_random_resized_crop_is_a_function_of_its_seed():
    import random

    import torch
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8)
    a = imagenet_ddp.random_resized_crop(image, 32, random.Random(7))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, imagenet_ddp.random_resized_crop(image, 32, random.Random(7)))
    assert not all(torch.equal(a, imagenet_ddp.random_resized_crop(image, 32, random.Random(s))) for s in range(8, 12))
    thin = torch.randint(0, 256, (3, 4, 200), dtype=torch.uint8)  # no crop within 3/4-4/3 fits: the centered fallback
    assert imagenet_ddp.random_resized_crop(thin, 16, random.Random(0)).shape == (3, 16, 16)


def test_a_node_that_stages_far_longer_than_the_collective_timeout_holds_no_rank_up(archives, tmp_path):
    """Two ranks as two nodes, each with its own local disk ($SLURM_TMPDIR) and local rank 0, and a collective
    timeout of 5 s. Node 0 already has its copy. First node 1 cannot stage at all: it says why, and both ranks stop
    at once. Then node 1's staging is held behind its lock for 8 s after both ranks have met, longer than the
    timeout: rank 0 waits for it on the store (--stage-timeout), and both then train with the 5 s timeout."""
    node = [tmp_path / "node0", tmp_path / "node1"]
    local = [n / f"imagenet-{os.getuid()}" for n in node]
    rc, out = stage_only(archives, local[0])
    assert rc == 0, out
    cmd = [PYTHON, SCRIPT, f"--data-dir={archives[0]}", f"--output-dir={tmp_path / 'out'}", "--dist-timeout=5"] + TOY \
        + ["--epochs=1"]
    job_id = slurm_job_id_with_free_port()

    def start_ranks():
        return [start(cmd, cwd=tmp_path, env={**srun_env(r, 2, job_id), "SLURM_LOCALID": "0", "SLURM_NODEID": str(r),
                                              "SLURM_TMPDIR": str(node[r])}) for r in range(2)]

    node[1].write_text("a file where node 1's local disk should be")
    outs = [p.communicate(timeout=120)[0] for p in start_ranks()]
    assert "ERROR: staging" in outs[1] and "HINT" in outs[1], outs[1][-2000:]
    assert "ERROR: staging failed on another node" in outs[0] and "Traceback" not in outs[0], outs[0][-2000:]
    assert '"event": "done"' not in outs[0]

    node[1].unlink()
    local[1].mkdir(parents=True)
    with open(local[1] / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # node 1's staging waits for this lock, as behind another job's staging
        procs = start_ranks()
        seen = ["", ""]
        for r, p in enumerate(procs):  # both have met (however long start-up took): rank 1 now waits for the lock,
            for line in p.stdout:  # and rank 0 for rank 1
                seen[r] += line
                if STARTUP_LINE.search(line):
                    break
        time.sleep(8)  # longer than the 5 s collective timeout
        assert [p.poll() for p in procs] == [None, None], "no rank may give up while node 1 stages"
    outs = [seen[r] + p.communicate(timeout=300)[0] for r, p in enumerate(procs)]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "staged 4 classes" in outs[1] and "staged" not in outs[0], "each node stages for itself"
    waited = re.search(r"^waited (\d+) s for the other nodes' staging$", outs[0], re.M)
    assert waited and int(waited[1]) >= 5, outs[0][-3000:]
    assert done_record(outs[0])["world_size"] == 2
