"""
ImageNet's copy to node-local disk, for imagenet_ddp.py, which imports it: copy it beside the script with cluster/.

Shared filesystems are slow at millions of small files, so each node gets its own copy of the archives, once, on
node-local disk (--local-dir, default $SLURM_TMPDIR, else $TMPDIR, else /tmp): one process per node extracts them
(or, with --from-tar, copies the two tars and indexes every JPEG's byte range) while the others of that node wait on
a lock, and a marker written last makes later runs on that node skip it (where the disk keeps it: a per-job
$SLURM_TMPDIR is wiped at the job's end). run-imagenet.sh stages in a step of its own first; launched any other way,
the ranks stage once they have met, and wait for the slowest node.

    find_data(args)                               the folder holding train/ and val/: as given, or this node's copy
    stage(data_dir, local_dir, workers, from_tar)  the copy itself
"""
import concurrent.futures
import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import cluster

TRAIN_TAR, VAL_TAR, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"


def local_base(args):
    """Node-local disk: fast, private to the node, usually wiped when the job ends."""
    base = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return args.local_dir or os.path.join(base, f"imagenet-{os.getuid()}")


def find_data(args):
    """The folder holding train/ and val/: the extracted tree as given, or a node-local copy of the archives. In a
    process group, every rank then waits until every node has staged (wait_for_nodes); if one node's staging failed,
    all ranks stop."""
    if all(os.path.isdir(os.path.join(args.data_dir, s)) for s in ("train", "val")):
        return args.data_dir
    missing = [n for n in (TRAIN_TAR, VAL_TAR, DEVKIT) if not os.path.isfile(os.path.join(args.data_dir, n))]
    if missing:
        cluster.fail(f"no ImageNet in {os.path.abspath(args.data_dir)}: it needs train/ and val/ folders, or "
                     f"{', '.join(missing)}. HINT: --data-dir (or $DATA_DIR) must point at the folder holding the "
                     "archives as downloaded from image-net.org")
    local_dir = local_base(args)
    try:
        stage(args.data_dir, local_dir, max(1, len(os.sched_getaffinity(0))), args.from_tar)
        ok = True
    except Exception as e:  # each node stages for itself: local rank 0 of the node that failed says so
        ok = False
        if cluster.LOCAL_RANK == 0:
            cluster.print_line(f"ERROR: staging {args.data_dir} into {local_dir} on {socket.gethostname()} failed "
                               f"({type(e).__name__}: {e}). HINT: --local-dir needs ~160 GB free for ImageNet, on a "
                               "node-local disk ($SLURM_TMPDIR, /scratch); a half-finished copy is redone on the next "
                               "run", sys.stderr)
    if dist.is_initialized() and not os.environ.get("IMAGENET_STAGED"):  # run-imagenet.sh: every node has its copy
        ok = wait_for_nodes(ok, args.stage_timeout)
    if not ok:
        raise SystemExit(1)
    return local_dir


def wait_for_nodes(ok, timeout):
    """Wait up to `timeout` s for every rank's staging, through the process group's store (rank 0's, at MASTER_ADDR,
    which every rank reached): two counters, polled. No collective: --dist-timeout stays the training's, and gloo
    would connect every pair of nodes on whatever address the hostname gives. True if every node staged."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=60))
    key = f"imagenet_staging/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"  # a restarted torchrun's store lives on
    store.add(f"{key}/failed", 0 if ok else 1)  # before the count: once all have counted, it is final
    store.add(f"{key}/ranks", 1)
    t0 = time.perf_counter()
    while (arrived := store.add(f"{key}/ranks", 0)) < cluster.WORLD_SIZE:
        if time.perf_counter() - t0 > timeout:
            cluster.fail(f"{cluster.WORLD_SIZE - arrived} of {cluster.WORLD_SIZE} ranks had not staged within "
                         f"--stage-timeout={timeout} s. HINT: their node's log lines say how far they got; a larger "
                         "--stage-timeout, or run-imagenet.sh, which stages in a step of its own")
        time.sleep(1)
    failed = store.add(f"{key}/failed", 0)
    if ok and failed:
        cluster.print0("ERROR: staging failed on another node (its ERROR line says why)", sys.stderr)
    elif ok and time.perf_counter() - t0 >= 1:
        cluster.print0(f"waited {time.perf_counter() - t0:.0f} s for the other nodes' staging")
    return not failed


def val_wnids(devkit):
    """The class (wnid) of validation image 1, 2, ...: the devkit's ground-truth ILSVRC ids mapped through meta.mat."""
    import scipy.io  # only the devkit's MATLAB file needs it
    with tarfile.open(devkit, "r:gz") as tar:
        files = {os.path.basename(m.name): m for m in tar if m.isfile()}
        meta = scipy.io.loadmat(io.BytesIO(tar.extractfile(files["meta.mat"]).read()), squeeze_me=True)["synsets"]
        truth = tar.extractfile(files["ILSVRC2012_validation_ground_truth.txt"]).read().split()
    # the 1000 leaves of the synset tree are the classes
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta if int(s["num_children"]) == 0}
    return [wnid_of_id[int(i)] for i in truth]


def extract_members(tar_path, members):
    """Copy (offset, size, dest) byte ranges of an uncompressed tar to files. Runs in a worker process."""
    with open(tar_path, "rb") as f:
        for offset, size, dest in members:
            f.seek(offset)
            with open(dest, "wb") as out:
                out.write(f.read(size))
    return len(members)


def extract_class_tar(tar_path, offset, size, dest):
    """Unpack one per-class tar nXXXXXXXX.tar, the bytes [offset, offset + size) of the big train tar, into dest/:
    its bytes are streamed to GNU tar (fast, and it refuses absolute or ../ member names). Runs in a worker process."""
    os.makedirs(dest, exist_ok=True)
    untar = subprocess.Popen(["tar", "-x", "-C", dest], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    with open(tar_path, "rb") as f:
        f.seek(offset)
        while size > 0:
            chunk = f.read(min(size, 1 << 22))
            untar.stdin.write(chunk)
            size -= len(chunk)
    untar.stdin.close()
    if untar.wait():
        raise RuntimeError(f"tar could not unpack the class tar at byte {offset} of {tar_path}: "
                           f"{untar.stderr.read().decode().strip()}")
    return 1


def tar_files(f, offset=0):
    """(offset in f, size, name) of each file in the uncompressed tar that starts at `offset` of the open file f."""
    f.seek(offset)
    with tarfile.open(fileobj=f) as tar:
        return [(m.offset_data, m.size, os.path.basename(m.name)) for m in tar if m.isfile()]


def stage(data_dir, local_dir, workers, from_tar=False):
    """Extract the archives into local_dir/train/<wnid>/ and local_dir/val/<wnid>/, once per node; or, from_tar, copy
    the two tars there and write index.pt, the byte range and class of every JPEG in them (nothing extracted).
    An flock makes one process stage while the others wait; the marker, written last, makes later runs skip."""
    archives = [os.path.join(data_dir, name) for name in (TRAIN_TAR, VAL_TAR, DEVKIT)]
    stamp = json.dumps([from_tar] + [[os.path.abspath(a), os.path.getsize(a), int(os.path.getmtime(a))]
                                     for a in archives])
    marker = os.path.join(local_dir, "STAGED")
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when this process exits, even on a crash
        if os.path.exists(marker) and open(marker).read() == stamp:
            return False
        t0 = time.perf_counter()
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)
        # a half-finished copy (no marker) is redone from scratch
        for sub in ("train", "val", "index.pt", TRAIN_TAR, VAL_TAR):
            shutil.rmtree(os.path.join(local_dir, sub), ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(local_dir, sub))
        need, free = sum(os.path.getsize(a) for a in archives[:2]), shutil.disk_usage(local_dir).free
        if need > free:  # before anything is written: a copy that fills the disk fails hours later, half done
            raise OSError(f"{local_dir} has {free / 1e9:.1f} GB free, but the archives need {need / 1e9:.1f} GB "
                          f"({' + '.join(os.path.basename(a) for a in archives[:2])}); nothing was written")
        wnids = val_wnids(archives[2])
        if from_tar:  # one sequential read of each tar; from now on only the local copies are read
            for a in archives[:2]:
                shutil.copyfile(a, os.path.join(local_dir, os.path.basename(a)))
            archives = [os.path.join(local_dir, os.path.basename(a)) for a in archives[:2]] + archives[2:]
        # the tars' headers: 1000 class tars in the train tar, 50,000 images in the val tar
        with open(archives[0], "rb") as train, open(archives[1], "rb") as val:
            classes = [(offset, size, name[:-4]) for offset, size, name in tar_files(train) if name.endswith(".tar")]
            images = tar_files(val)
        if from_tar:  # an index: the DataLoader reads byte ranges of the copies
            label = {wnid: k for k, (_, _, wnid) in enumerate(sorted(classes, key=lambda c: c[2]))}
            # 1.28 M headers, read from the local copy (on a shared filesystem: as many small scattered reads)
            with open(archives[0], "rb") as f:  # in the order of the extracted folders: by class, then file name
                train = [(o, n, label[wnid]) for offset, _, wnid in classes
                         for o, n, _ in sorted(tar_files(f, offset), key=lambda m: m[2])]
            val = sorted(((label[wnids[int(re.findall(r"\d+", name)[-1]) - 1]], name, o, n) for o, n, name in images))
            train.sort(key=lambda row: row[2])
            val = [(o, n, k) for k, _, o, n in val]
            torch.save({"classes": sorted(label), "train": torch.tensor(train), "val": torch.tensor(val)},
                       os.path.join(local_dir, "index.pt"))
        else:
            extract_all(archives, local_dir, classes, images, wnids, workers)
        with open(marker + ".tmp", "w") as f:
            f.write(stamp)
        os.replace(marker + ".tmp", marker)
        cluster.print_line(f"staged {len(classes)} classes and {len(images)} validation images into {local_dir} "
                           f"({'copied + indexed' if from_tar else 'extracted'}) in {time.perf_counter() - t0:.1f} s "
                           f"on {socket.gethostname()}")
        return True


def extract_all(archives, local_dir, classes, images, wnids, workers):
    """Both archives are uncompressed tars: workers read disjoint byte ranges of them in parallel."""
    for wnid in set(wnids):
        os.makedirs(os.path.join(local_dir, "val", wnid))
    val_files = [(offset, size, os.path.join(local_dir, "val", wnids[int(re.findall(r"\d+", name)[-1]) - 1], name))
                 for offset, size, name in images]
    # its workers, and the tar each starts, finish the copy whatever signal the job step gets (the next run would redo
    # an unfinished copy): the training process handles the signal once it trains
    with concurrent.futures.ProcessPoolExecutor(workers, initializer=cluster.ignore_stop_signals) as pool:
        jobs = [pool.submit(extract_class_tar, archives[0], offset, size,
                            os.path.join(local_dir, "train", wnid)) for offset, size, wnid in classes]
        jobs += [pool.submit(extract_members, archives[1], val_files[k::workers]) for k in range(workers)]
        for job in concurrent.futures.as_completed(jobs):
            job.result()  # re-raises a worker's error here
