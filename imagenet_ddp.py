"""Train a torchvision ResNet on ImageNet with PyTorch DistributedDataParallel (DDP), on one process or many:

    python imagenet_ddp.py --data-dir /datasets/imagenet                    # one process
    torchrun --standalone --nproc_per_node=4 imagenet_ddp.py --data-dir ...  # 4 GPUs on this machine
    srun python imagenet_ddp.py --data-dir ...                               # in a Slurm job, one task per GPU
    sbatch run-imagenet.sh imagenet_ddp.py --data-dir /datasets/imagenet     # the job script: staging, then training
    python imagenet_ddp.py --synthetic --steps-per-epoch=100                 # generated tensors: throughput only

Copy four things: this script, the cluster/ folder (the plumbing it calls), imagenet_staging.py (the copy to local
disk) and run-imagenet.sh. --data-dir holds either the three archives as downloaded (ILSVRC2012_img_train.tar,
ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz; the devkit needs scipy) or an extracted train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG tree, which is read where it is: keep such a tree on node-local disk, never on a shared filesystem,
slow at millions of small files. Archives are copied to node-local disk per node (--local-dir, default $SLURM_TMPDIR,
else $TMPDIR, else /tmp; imagenet_staging.py says how). run-imagenet.sh stages in a step of its own; launched any
other way, the ranks stage after they meet and wait for the slowest node up to --stage-timeout.

Expected: ResNet-50, 90 epochs, cosine schedule, label smoothing 0.1, bf16: about 76-77% top-1 (the usual figure for
this recipe). On CPU this script is only a smoke test (see tests/). docs/imagenet.md says more.

Make it yours: another folder-per-class dataset fits as it is; other data needs its own Dataset in place of JPEGs
(cluster.DataLoader seeds each sample's random draws, so a resumed epoch sees the same crops). Pick the model with
--arch; replace evaluate()'s top-1/top-5 for other metrics. Keep the cluster.* calls, the loader's set_epoch and the
resume block.
"""
import argparse
import math
import os
import random
import socket
import sys
import time

try:
    import cluster  # the plumbing every script here shares: each line that calls it is one to keep
    import imagenet_staging  # the copy of ImageNet to each node's local disk
except ModuleNotFoundError as e:  # first: copied without them, the script stops at once
    missing = {"cluster": "the cluster/ folder", "imagenet_staging": "imagenet_staging.py"}.get(e.name)
    raise SystemExit(f"ERROR: {__file__} needs {missing} beside it: copy it from the same repository") \
        if missing else e from None

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.transforms import v2

try:  # JPEG decoding by TorchCodec (libjpeg-turbo, as torchvision's own, whose decoders 0.29 deprecates)
    from torchcodec.decoders import ImageReadMode, decode_image
except (ImportError, OSError, RuntimeError):  # an older stack without it: torchvision's, the same pixels
    from torchvision.io import ImageReadMode, decode_image

# --- options -----------------------------------------------------------------
def default_workers():
    """DataLoader workers per process: the CPUs Slurm gave this task, shared by the processes torchrun starts in it."""
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or len(os.sched_getaffinity(0))
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)  # one core stays with the training process


def get_args(argv=None):
    p = argparse.ArgumentParser(description="ImageNet with DistributedDataParallel")
    positive = cluster.positive_int  # sizes and counts
    p.add_argument("--epochs", type=positive, default=90, help="number of epochs to train (default: 90)")
    p.add_argument("--batch-size", type=positive, default=256, help="batch size per process (default: 256)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate per 256 images of the global batch "
                                                         "(default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=5e-5, help="not on biases and norms (default: 5e-5)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="of the training loss (default: 0.1)")
    p.add_argument("--warmup-epochs", type=float, default=5, help="linear learning-rate warm-up from 0 (default: 5)")
    p.add_argument("--schedule", choices=["cosine", "step"], default="cosine",
                   help="after warm-up: cosine to 0, or /10 every 30 epochs (default: cosine)")
    p.add_argument("--arch", default="resnet50", help="a torchvision classification model (default: resnet50)")
    p.add_argument("--image-size", type=positive, default=224,
                   help="training crop; validation resizes to size/0.875 and center-crops (default: 224)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                   help="the ImageNet archives or train/ val/ folders (default: $DATA_DIR, else ./data)")
    p.add_argument("--local-dir", help="node-local disk for the images (default: $SLURM_TMPDIR, $TMPDIR or /tmp)")
    p.add_argument("--from-tar", action="store_true", help="stage by copying and indexing the two tars: nothing "
                                                           "extracted, JPEGs read out of the copies")
    p.add_argument("--stage-only", action="store_true", help="stage to --local-dir and exit (once per node)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers per process (default: $SLURM_CPUS_PER_TASK / processes per task - 1)")
    p.add_argument("--steps-per-epoch", type=positive, help="cap the steps per epoch (default: the whole epoch)")
    p.add_argument("--synthetic", action="store_true", help="generated tensors, no validation: throughput only")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision on GPU: bfloat16, or float16 with loss scaling before Ampere (default: on; "
                        "CPU trains in float32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format on GPU (default: on)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--stage-timeout", type=positive, default=4 * 3600,
                   help="seconds the ranks wait for the slowest node's staging (default: 14400; run-imagenet.sh "
                        "stages before the ranks start, and they do not wait)")
    # + --log-interval --output-dir --checkpoint-dir --device --profile --dist-timeout, and a job array's sweep line
    return cluster.parse_args(p, argv, log_interval=50)


# --- data: the JPEG dataset and its crop (the copy to node-local disk: imagenet_staging.py)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet RGB statistics
NORMALIZE = {}  # device -> (mean, std) tensors, made once


class JPEGs(torch.utils.data.Dataset):
    """The images of root/<split>/<class>/ (or, after --from-tar staging, byte ranges of root's tar copies), decoded
    with TorchCodec (libjpeg-turbo) into uint8 tensors, cropped and flipped as uint8: no PIL, no float images in
    the workers (normalization happens on the device, on the whole batch)."""

    def __init__(self, root, split, size):
        # numpy arrays, not 1.28 M Python tuples: forked DataLoader workers share them, where tuples would slowly be
        # copied into every worker (reading a Python object writes its reference count)
        self.tar, self.fd, self.folder = None, None, os.path.join(root, split)
        if os.path.exists(os.path.join(root, "index.pt")):  # rows of (offset, size, label)
            index = torch.load(os.path.join(root, "index.pt"), weights_only=True)
            self.classes, self.samples = index["classes"], index[split].numpy()
            self.tar = os.path.join(root, imagenet_staging.TRAIN_TAR if split == "train" else imagenet_staging.VAL_TAR)
        else:  # rows of (label,), and the file names as one fixed-width bytes array
            self.classes = sorted(e.name for e in os.scandir(self.folder) if e.is_dir())
            files = [(label, name) for label, c in enumerate(self.classes)
                     for name in sorted(os.listdir(os.path.join(self.folder, c)))]
            self.samples = np.array([[label] for label, _ in files], dtype=np.int64).reshape(-1, 1)
            self.names = np.array([name.encode() for _, name in files], dtype=np.bytes_)
        self.train, self.size = split == "train", size
        self.val_transform = v2.Compose([v2.Resize(round(size / 0.875), antialias=True), v2.CenterCrop(size)])

    def __len__(self):
        return len(self.samples)

    def path(self, i):
        """Image i's file, extracted-folder mode."""
        return os.path.join(self.folder, self.classes[self.samples[i][0]], self.names[i].decode())

    def read(self, i):
        """The image file's bytes as a uint8 tensor, and its label."""
        if self.tar is None:
            with open(self.path(i), "rb") as f:
                return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8), int(self.samples[i][0])
        if self.fd is None:
            # pread() keeps no file position: one descriptor serves every worker
            self.fd = os.open(self.tar, os.O_RDONLY)
        offset, size, label = (int(v) for v in self.samples[i])
        return torch.frombuffer(bytearray(os.pread(self.fd, size, offset)), dtype=torch.uint8), label

    def __getitem__(self, i):
        try:
            data, label = self.read(i)
            image = decode_image(data, mode=ImageReadMode.RGB)
        except Exception as e:  # a corrupt or unreadable file is skipped and counted, not fatal (label -100 is ignored)
            where = self.path(i) if self.tar is None else f"{self.tar} at byte {int(self.samples[i][0])}"
            why = " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line, however long the decoder's error
            cluster.print_line(f"WARNING: skipping unreadable image {where} ({why})", sys.stderr)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -100
        if not self.train:
            return self.val_transform(image), label
        # cluster.DataLoader seeds Python's random generator from (seed, epoch, i) before each image: its crop is the
        # same with any number of workers or ranks, and again after a resume from the middle of an epoch
        return random_resized_crop(image, self.size, random), label


def random_resized_crop(image, size, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop + RandomHorizontalFlip of a uint8 CHW image, drawing from rng (the random module,
    or a random.Random), without their per-call overhead (0.2 ms of a 2.3 ms image)."""
    _, height, width = image.shape
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            break
    else:  # a very elongated image: the largest centered crop within the allowed aspect ratios
        w, h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
        top, left = (height - h) // 2, (width - w) // 2
    crop = image[None, :, top:top + h, left:left + w]
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.flip(-1) if rng.random() < 0.5 else out


def to_device(x, y, device, channels_last):
    """uint8 NCHW batch -> normalized float on the device (4x less to copy than float images)."""
    if device not in NORMALIZE:
        NORMALIZE[device] = [torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (MEAN, STD)]
    mean, std = NORMALIZE[device]
    x = x.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x, y.to(device, non_blocking=True)


# --- model -------------------------------------------------------------------
def average_buffers(model):
    """BatchNorm running statistics are per rank (DDP copies rank 0's at every forward): average them, so that
    validation and checkpoints see one model, estimated from every rank's batches."""
    if cluster.WORLD_SIZE > 1:
        for b in model.buffers():
            if b.is_floating_point():
                cluster.all_sum(b).div_(cluster.WORLD_SIZE)


def lr_factor(step, steps_per_epoch, args):
    """Linear warm-up from 0, then cosine to 0 or /10 every 30 epochs. Per optimizer step."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "step":
        return 0.1 ** (step // steps_per_epoch // 30)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.epochs * steps_per_epoch - warmup)))


@torch.no_grad()
def evaluate(model, loader, device, args, amp_dtype):
    """Exact validation: rank r scores images r, r+W, r+2W, ... (no padding, no image twice), then sums."""
    model.eval()
    stats = torch.zeros(5, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, count, skipped
    for x, y in loader:
        x, y = to_device(x, y, device, args.channels_last and device.type == "cuda")
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            out = model(x).float()
        ok = y >= 0  # -100: an unreadable image
        hits = (out.topk(min(5, out.shape[1]), 1).indices == y[:, None]) & ok[:, None]
        stats += torch.stack([F.cross_entropy(out, y, reduction="sum", ignore_index=-100), hits[:, 0].sum(),
                              hits.any(1).sum(), ok.sum(), (~ok).sum()]).double()
    loss_sum, top1, top5, count, skipped = cluster.all_sum(stats).tolist()
    return dict(val_loss=loss_sum / max(count, 1), top1=top1 / max(count, 1), top5=top5 / max(count, 1),
                val_count=int(count), val_skipped=int(skipped))


# --- training ----------------------------------------------------------------
def train(args, device, data_root):
    rank, world_size = cluster.RANK, cluster.WORLD_SIZE
    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    cuda = device.type == "cuda"
    amp_dtype = cluster.autocast_dtype(device, args.amp)  # None: float32
    precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + GradScaler", None: "fp32"}[amp_dtype]
    channels_last = args.channels_last and cuda

    # data: each rank reads a disjoint 1/world_size of the images, reshuffled every epoch
    if args.synthetic:  # one fixed random batch per rank, fed again and again: measures the model, not the data
        num_classes, n_train, n_val = 1000, None, 0
        g = torch.Generator().manual_seed(args.seed + rank)
        fake = (torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                              dtype=torch.uint8, generator=g),
                torch.randint(0, num_classes, (args.batch_size,), generator=g))
        fake = tuple(t.to(device) for t in fake)
        steps_per_epoch = args.steps_per_epoch or 100
    else:
        train_set = JPEGs(data_root, "train", args.image_size)
        val_set = JPEGs(data_root, "val", args.image_size)
        if len(train_set) == 0 or train_set.classes != val_set.classes:
            cluster.fail(f"{data_root}: train/ has {len(train_set.classes)} classes and {len(train_set)} images, val/ "
                         f"has {len(val_set.classes)} classes: they must be the same non-empty set of class folders")
        num_classes, n_train, n_val = len(train_set.classes), len(train_set), len(val_set)
        # whole batches on every rank, so every rank takes the same number of steps; each image's crop is seeded
        loader_args = dict(num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)
        train_loader = cluster.DataLoader(train_set, args.batch_size, seed=args.seed, **loader_args)
        val_loader = cluster.DataLoader(val_set, args.batch_size, shuffle=False, **loader_args)  # each image once
        steps_per_epoch = min(len(train_loader), args.steps_per_epoch or len(train_loader))
        if steps_per_epoch == 0:
            cluster.fail(f"{n_train} training images are fewer than one batch per rank ({world_size} x "
                         f"--batch-size={args.batch_size})")

    # model and optimizer
    raw_model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes).to(device)
    cluster.init_weights(args, raw_model)  # --init-from: another run's weights, for a new run
    flops = cluster.train_flops(raw_model, (3, args.image_size, args.image_size))  # per image: the efficiency line
    if channels_last:  # NHWC: what tensor cores and cuDNN's fastest convolutions want
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # evaluation bypasses DDP: the ranks' validation shards differ in size
    model = eval_model = torch.compile(raw_model) if args.compile else raw_model
    if world_size > 1:  # averages gradients across ranks during backward()
        model = DDP(model, device_ids=[device.index] if cuda else None)
    decay = [p for p in raw_model.parameters() if p.ndim > 1]  # no weight decay on biases and norm scales
    no_decay = [p for p in raw_model.parameters() if p.ndim <= 1]
    lr = args.lr * args.batch_size * world_size / 256  # the linear scaling rule, with warm-up
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0}],
                                lr=lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, args))
    # float16 gradients underflow without loss scaling; the scaler's overflow check syncs the host once per step
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    torch.manual_seed(args.seed + rank)  # the weights are made: from here on each rank draws its own random numbers

    # resume: every rank loads the same checkpoint, so the replicas start equal; mid-epoch checkpoints resume at
    # their step. Only a checkpoint of this run: what defines it (`run`) is saved with it and compared
    run = cluster.run_record(args, script=os.path.basename(__file__), data="synthetic" if args.synthetic else
                             f"{num_classes} classes, {n_train} training images", steps_per_epoch=steps_per_epoch,
                             precision=precision)
    start_epoch, start_step = 1, 0
    ckpt = cluster.load_checkpoint(args.checkpoint_dir, run, device)
    if ckpt:
        if ckpt["args"]["epochs"] != args.epochs and args.schedule == "cosine":
            cluster.print0(f"NOTE: --epochs changed from {ckpt['args']['epochs']} to {args.epochs}: the cosine "
                           "schedule is stretched from here on (a run started with the new value would have decayed "
                           "differently)")
        raw_model.load_state_dict(ckpt["model"])  # the raw module's keys: no "module." or "_orig_mod." prefix
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
        if world_size > 1 and start_epoch <= args.epochs:  # DDP's gradient buckets laid out as in the first run
            x, y = to_device(torch.zeros(args.batch_size, 3, args.image_size, args.image_size, dtype=torch.uint8),
                             torch.zeros(args.batch_size, dtype=torch.long), device, channels_last)
            cluster.replay_first_backward(raw_model, lambda: F.cross_entropy(model(x), y), amp_dtype)
    # rank 0's metrics file, TensorBoard curves (x: optimizer steps over the whole training) and --profile
    outputs = cluster.Outputs(args, device, ckpt, purge_step=(start_epoch - 1) * steps_per_epoch + start_step + 1,
                              run=run, flops=flops)

    def checkpoint(epoch, step):
        cluster.save_checkpoint(args.checkpoint_dir, epoch, step, device, outputs, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "args": vars(args), "run": run})

    data = ("SYNTHETIC DATA (random tensors, no validation)" if args.synthetic
            else f"{n_train} training / {n_val} validation images from {data_root}")
    cluster.print0(f"{args.arch}, {num_classes} classes, {data} | {world_size} processes x {args.batch_size} "
                   f"images, lr {lr:g}, {steps_per_epoch} steps/epoch, {args.workers} workers/process | {precision}"
                   f"{', channels_last' * channels_last}{', compiled' * args.compile} on {device.type}")

    # training loop
    cluster.stop_check(device, None, 0, 0)  # a signal in start-up (staging, loading), or the end already near
    cluster.TIMES.lap("startup")
    result, meter_images, meter_seconds = None, 0, 0.0
    tag = " [SYNTHETIC DATA]" if args.synthetic else ""
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        skip, start_step = start_step, 0
        if args.synthetic:
            batches = (fake for _ in range(steps_per_epoch - skip))
        else:
            train_loader.set_epoch(epoch, skip)  # without this every epoch repeats the same shuffle
            batches = iter(train_loader)
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, images, skipped: no host sync per step
        t0 = time.perf_counter()
        warm = min(5, (steps_per_epoch - skip) // 2)
        for step in range(skip, steps_per_epoch):
            # the throughput meter starts after warm-up steps (workers starting, cuDNN autotuning)
            if step - skip == warm:
                if cuda:
                    torch.cuda.synchronize()
                cluster.TIMES.lap("compute")  # the GPU finishing the steps queued before
                t_meter = time.perf_counter()
            batch = next(batches)
            cluster.TIMES.lap("data")  # the wait for the DataLoader's workers (on the host: no GPU sync)
            x, y = to_device(*batch, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing, ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # without float16: loss.backward(), optimizer.step()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ok = (y >= 0).sum()
            stats += torch.stack([loss.detach().double() * ok, ok.double(), (len(y) - ok).double()])
            outputs.step()  # the profiler's step, with --profile
            if rank == 0 and step % args.log_interval == 0:  # .item() syncs, so only now and then
                value, lr_now = loss.item(), scheduler.get_last_lr()[0]
                cluster.print_line(f"  epoch {epoch} step {step}/{steps_per_epoch} loss {value:.4f} lr {lr_now:.4g}"
                                   f"{tag}")
                outputs.scalar("train/loss", value, (epoch - 1) * steps_per_epoch + step + 1)
                outputs.scalar("train/lr", lr_now, (epoch - 1) * steps_per_epoch + step + 1)
            if (step + 1) % cluster.STOP_CHECK_EVERY == 0 and step + 1 < steps_per_epoch:
                cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, step + 1)
            cluster.TIMES.lap("compute")
        if cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        if steps_per_epoch - skip > warm:
            meter_images += (steps_per_epoch - skip - warm) * args.batch_size * world_size
            meter_seconds += t_end - t_meter
        cluster.all_sum(stats)  # the mean over all ranks' images, not just rank 0's
        train_loss = (stats[0] / stats[1].clamp(min=1)).item()
        images, skipped = int(stats[1].item()), int(stats[2].item())
        seconds = t_end - t0
        result = dict(epoch=epoch, train_loss=train_loss, train_images=images, train_skipped=skipped, seconds=seconds,
                      images_per_s=images / seconds, synthetic=args.synthetic)
        average_buffers(raw_model)
        cluster.TIMES.lap("compute")
        if not args.synthetic:
            result.update(evaluate(eval_model, val_loader, device, args, amp_dtype))
        val = "no validation" if args.synthetic else (
            f"val loss {result['val_loss']:.4f} | top-1 {100 * result['top1']:.2f}% | "
            f"top-5 {100 * result['top5']:.2f}%")
        cluster.print0(f"epoch {epoch}/{args.epochs} | train loss {train_loss:.4f} | {val} | {seconds:.1f} s | "
                       f"{images / seconds:.0f} img/s{tag}")
        if skipped or result.get("val_skipped"):
            cluster.print0(f"WARNING: skipped {skipped} training and {result.get('val_skipped', 0)} validation images "
                           "that could not be decoded (named above)")
        outputs.epoch(result, epoch * steps_per_epoch)
        cluster.TIMES.lap("eval")
        if args.checkpoint_dir:
            checkpoint(epoch, 0)
        cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, 0)

    if result is None:
        cluster.print0(f"nothing to train: the checkpoint has {start_epoch - 1} epochs (--epochs={args.epochs})")
        result = {"epoch": start_epoch - 1,
                  **({} if args.synthetic else evaluate(eval_model, val_loader, device, args, amp_dtype))}
    cluster.TIMES.lap("eval")
    outputs.done(raw_model, f"--workers={args.workers}", **{k: result.get(k) for k in (
        "epoch", "top1", "top5", "val_loss", "val_count", "val_skipped")}, synthetic=args.synthetic,
        images_per_s=meter_images / meter_seconds if meter_seconds else None)
# --- main --------------------------------------------------------------------
def main(args):
    if args.arch not in torchvision.models.list_models(module=torchvision.models):  # now, not after minutes of staging
        cluster.fail(f"unknown --arch {args.arch}. HINT: one of torchvision's classification models, e.g. resnet18, "
                     "resnet50, resnet101, wide_resnet50_2, convnext_tiny (python -c 'import torchvision; "
                     "print(torchvision.models.list_models())')")
    if args.stage_only:  # one process per node, no process group (run-imagenet.sh runs this as its own step)
        cluster.print_line(f"data ready in {imagenet_staging.find_data(args)} on {socket.gethostname()}")
        return
    with cluster.process_group(args) as device:  # one process per GPU, else CPU; the group ends with the block
        torch.backends.cudnn.benchmark = True  # fixed input sizes: cuDNN times its kernels once, keeps the fastest
        # staged after the ranks met: a node that stages for an hour while another already has its copy keeps no
        # rank waiting in a collective (find_data waits with its own timeout)
        data_root = None
        if not args.synthetic:
            cluster.TIMES.lap("startup")
            data_root = imagenet_staging.find_data(args)
            cluster.TIMES.lap("staging")  # this node's copy, then the wait for the slowest node's
        train(args, device, data_root)


if __name__ == "__main__":
    main(get_args())
