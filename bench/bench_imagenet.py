"""Benchmarks for imagenet_ddp.py's data path, measured side by side in one run on this machine; prints each as a ratio.

    .venv/bin/python bench/bench_imagenet.py                 # generates its own ImageNet-like JPEGs in a temp dir
    .venv/bin/python bench/bench_imagenet.py --synthetic-gpu  # on a GPU machine: also the GPU figures below

P4  loader: images/s of imagenet_ddp.py's training pipeline (torchvision.io decode to uint8, its own Inception-style
    crop + flip on uint8 tensors, uint8 batches) vs the plain PIL ImageFolder + RandomResizedCrop + ToTensor baseline,
    the same JPEG files (about 500x375, quality 90, like ImageNet's), the same worker count and batch size
    (target >= 2x).
P5  staging: seconds to turn ILSVRC2012_img_train.tar + ILSVRC2012_img_val.tar into class folders, imagenet_staging.py's
    stage() (per-class tars and val images read straight out of the big tars by parallel workers) vs the usual serial
    `tar -xf` of the big tar, then `tar -xf` of each class tar (target >= 2x on 2 cores); and the read path that needs
    no extraction (--from-tar: copy the two tars to local disk and index every JPEG's byte range).
GPU (--synthetic-gpu): synthetic ResNet-50 images/s on one GPU with bf16 + channels_last vs fp32 NCHW.
"""
import argparse
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from imagenet_archives import imagenet_wnids, tar_add, val_labels_of, write_devkit  # noqa: E402


def natural_jpeg(rng, size=(500, 375), quality=90):
    """JPEG bytes with roughly a photo's entropy: smooth colour fields (a small random image scaled up) plus grain."""
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0, 6, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _jpegs(n_images, seed):
    """n_images natural JPEGs from their own random stream: made in parallel, the same every time."""
    rng = np.random.default_rng(seed)
    return [natural_jpeg(rng) for _ in range(n_images)]


def make_dataset(root, n_classes, n_images, n_val, seed=0):
    """ILSVRC-layout archives of natural-looking JPEGs (train tar of class tars, flat val tar, devkit); a pool of
    processes makes the JPEGs, each class's and each tenth of the validation images from a seed of its own."""
    from concurrent.futures import ProcessPoolExecutor
    root.mkdir(parents=True, exist_ok=True)
    wnids, labels = imagenet_wnids(n_classes), val_labels_of(n_val * n_classes, n_classes)
    with ProcessPoolExecutor(max_workers=min(os.cpu_count() or 1, 2 * n_classes)) as pool:
        train = pool.map(_jpegs, [n_images] * n_classes, [[seed, k] for k in range(n_classes)])
        val = pool.map(_jpegs, [n_val] * n_classes, [[seed, n_classes + k] for k in range(n_classes)])
        with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
            for wnid, jpegs in zip(wnids, train, strict=True):
                inner = io.BytesIO()
                with tarfile.open(fileobj=inner, mode="w") as t:
                    for i, data in enumerate(jpegs):
                        tar_add(t, f"{wnid}_{i + 1}.JPEG", data)
                tar_add(outer, f"{wnid}.tar", inner.getvalue())
        with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as t:
            for i, data in enumerate(jpeg for part in val for jpeg in part):
                tar_add(t, f"ILSVRC2012_val_{i + 1:08d}.JPEG", data)
    write_devkit(root, wnids, labels)
    return wnids


def read_all(path):
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def p5_staging(root, workers):
    import imagenet_staging
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        read_all(root / name)  # both methods read from the page cache
    times = {}
    for _ in range(2):  # alternate, keep each method's best
        d = root / "serial"
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run(["mkdir", "-p", f"{d}/train", f"{d}/val"], check=True)
        subprocess.run(["tar", "-xf", str(root / "ILSVRC2012_img_train.tar"), "-C", f"{d}/train"], check=True)
        subprocess.run(["sh", "-c",
                        'cd "$1" && for f in *.tar; do mkdir "${f%.tar}" && tar -xf "$f" -C "${f%.tar}" && rm "$f"; '
                        'done', "sh", f"{d}/train"], check=True)
        subprocess.run(["tar", "-xf", str(root / "ILSVRC2012_img_val.tar"), "-C", f"{d}/val"], check=True)
        subprocess.run(["sync"], check=True)
        times["serial"] = min(times.get("serial", 1e9), time.perf_counter() - t0)

        for name, from_tar in (("ours", False), ("from_tar", True)):
            d = root / name
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            imagenet_staging.stage(str(root), str(d), workers, from_tar)
            subprocess.run(["sync"], check=True)
            times[name] = min(times.get(name, 1e9), time.perf_counter() - t0)
    n_serial = sum(1 for _ in (root / "serial").rglob("*.JPEG"))
    n_ours = sum(1 for _ in (root / "ours").rglob("*.JPEG"))
    assert n_serial == n_ours, (n_serial, n_ours)
    return times, n_ours


PREFETCH = 2  # the DataLoader's prefetch_factor: batches each worker makes ahead


def loader_rate(dataset, batch_size, workers, batches, keys):
    """img/s over at least 5 x workers x PREFETCH batches: those the workers made ahead, while the clock had not
    started, flatter the rate by at most a fifth (20 batches with 15 workers would time the queue, not the decoding)."""
    import torch
    batches = max(batches, 5 * workers * PREFETCH)
    keys = (list(keys) * (1 + (batches + 1) * batch_size // max(len(keys), 1)))[:(batches + 1) * batch_size]
    loader = torch.utils.data.DataLoader(dataset, batch_size, sampler=keys, num_workers=workers, drop_last=True,
                                         prefetch_factor=PREFETCH if workers else None)
    it = iter(loader)
    next(it)  # workers started, first batch out
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def p4_loader(train_dir, batch_size, workers, batches):
    import torchvision
    from torchvision import transforms
    import imagenet_ddp
    ours = imagenet_ddp.JPEGs(str(Path(train_dir).parent), "train", 224)
    base = torchvision.datasets.ImageFolder(train_dir,
                                            transforms.Compose([transforms.RandomResizedCrop(224),
                                                                transforms.ToTensor()]))
    n = len(ours)
    order = np.random.default_rng(0).permutation(n).tolist() * 4
    rates = {}
    for _ in range(2):  # alternate, keep each pipeline's best
        rates["baseline"] = max(rates.get("baseline", 0), loader_rate(base, batch_size, workers, batches, order))
        rates["ours"] = max(rates.get("ours", 0),
                            loader_rate(ours, batch_size, workers, batches, order))
    return rates


def gpu_synthetic(batch_size=256, steps=50):
    import torch
    import torchvision
    results = {}
    for name, amp, cl in (("bf16 + channels_last", True, True), ("fp32 NCHW", False, False)):
        model = torchvision.models.resnet50().cuda()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(batch_size, 3, 224, 224, device="cuda")
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        y = torch.randint(0, 1000, (batch_size,), device="cuda")
        for i in range(steps + 10):
            if i == 10:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        results[name] = steps * batch_size / (time.perf_counter() - t0)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=100, help="training images per class")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--synthetic-gpu", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, args.classes, args.images, n_val=args.images // 2)
        size = sum(f.stat().st_size for f in root.glob("*.tar")) / 1e6
        times, n = p5_staging(root, args.workers)
        print(f"P5 staging : stage() {times['ours']:.2f} s | serial tar -x + per-class untar {times['serial']:.2f} s "
              f"-> {times['serial'] / times['ours']:.2f}x (target 2x); {n} JPEGs, {size:.0f} MB of tars, "
              f"{args.workers} workers")
        print(f"P5 no-extraction read path: --from-tar staging (copy both tars + index) {times['from_tar']:.2f} s "
              f"-> {times['serial'] / times['from_tar']:.2f}x faster than serial extraction")
        rates = p4_loader(str(root / "ours" / "train"), args.batch_size, args.workers, args.batches)
        print(f"P4 loader  : ours {rates['ours']:.0f} img/s | PIL ImageFolder+RandomResizedCrop+ToTensor "
              f"{rates['baseline']:.0f} img/s "
              f"-> {rates['ours'] / rates['baseline']:.2f}x (target 2x); {args.workers} workers, batch "
              f"{args.batch_size}")
    if args.synthetic_gpu:
        r = gpu_synthetic()
        a, b = r["bf16 + channels_last"], r["fp32 NCHW"]
        print(f"GPU        : ResNet-50 synthetic, bf16 + channels_last {a:.0f} img/s | fp32 NCHW {b:.0f} img/s -> "
              f"{a / b:.2f}x")


if __name__ == "__main__":
    main()
