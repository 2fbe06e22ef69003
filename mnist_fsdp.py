"""Train a small CNN on MNIST with PyTorch's fully sharded data parallel (FSDP2), on one process or many:

    python mnist_fsdp.py --epochs=1                          # one process (a GPU if there is one, else CPU)
    torchrun --standalone --nproc_per_node=2 mnist_fsdp.py   # 2 processes on this machine
    srun python mnist_fsdp.py                                # inside a Slurm job, one task per GPU
    sbatch run-gpu4-dist.sh mnist_fsdp.py --epochs=100       # the job script does the above for you

Copy three things: this script, the cluster/ folder (the plumbing it calls) and a job script.
--data-dir (default $DATA_DIR, else ./data) holds MNIST/raw/; local rank 0 of each node downloads it if missing. Compute
nodes are often offline: run this script with `--download-only --data-dir DIR` on the login node first.

Expected (2 CPU processes, gloo, the 5,000-digit training sample; full MNIST reaches higher):
    torchrun --standalone --nproc_per_node=2 mnist_fsdp.py --epochs=2 --data-dir ../shared/data
    -> test accuracy 95.9% on the 10,000 official test digits, about 2 s per epoch (2 vCPUs; DDP: 1 s).

Make it yours: the data section (MNIST sits on the device whole; a Dataset of your own with DataLoader workers is the
change that docs/your-data.md shows, line by line), Net and what fully_shard wraps, evaluate(), the optimizer, your
own options. Keep the cluster.* calls, set_epoch and the resume block: they make the launchers, preemption and exact
resume work, also with dropout, random augmentation and options of any type. --batch-size is per process. Each rank
holds 1/world_size of the weights, gradients and optimizer state.
"""
import argparse
import io
import os
import struct
import time
from contextlib import redirect_stderr, redirect_stdout

try:
    import cluster  # the plumbing every script here shares: each line that calls it is one to keep
except ModuleNotFoundError as e:  # first: copied without it, the script stops at once
    raise SystemExit(f"ERROR: {__file__} needs the cluster/ folder beside it: copy it from the same repository") \
        if e.name == "cluster" else e from None

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.data import DistributedSampler

# --- options -----------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MNIST with FSDP2 (fully_shard)")
    positive = cluster.positive_int  # sizes and counts
    p.add_argument("--epochs", type=positive, default=2, help="number of epochs to train (default: 2)")
    p.add_argument("--batch-size", type=positive, default=64, help="training batch size per process (default: 64)")
    p.add_argument("--test-batch-size", type=positive, default=1000, help="test batch size per process (default: 1000)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    p.add_argument("--gamma", type=float, default=0.7, help="learning-rate decay per epoch (default: 0.7)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                   help="holds MNIST/raw (default: $DATA_DIR, else ./data)")
    p.add_argument("--download-only", action="store_true", help="download MNIST into --data-dir and exit")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on GPU from Ampere on: bfloat16 compute, float32 weights, gradient reduction "
                        "and optimizer (FSDP2's MixedPrecisionPolicy; before Ampere and on CPU: float32)")
    # + --log-interval --output-dir --checkpoint-dir --device --profile --dist-timeout, and a job array's sweep line
    return cluster.parse_args(p, argv, log_interval=20)


# --- data --------------------------------------------------------------------
MEAN, STD = 0.1307, 0.3081  # MNIST training-set pixel statistics
MNIST_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def download_mnist(data_dir):
    """None once data_dir/MNIST/raw holds every file (fetching those missing), else why it does not."""
    if all(os.path.exists(os.path.join(data_dir, "MNIST", "raw", n)) for names in MNIST_FILES.values() for n in names):
        return None
    from torchvision import datasets  # imported only to download: it adds seconds to every process's start
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):  # a line per mirror tried: keep it short
            for train in (True, False):
                datasets.MNIST(data_dir, train=train, download=True)
    except Exception as e:  # offline compute node, read-only directory, proxy ...
        return " ".join(f"{type(e).__name__}: {e}".split())[:300]  # one line for the log


def load_mnist(data_dir, train, device):
    """The whole split as one normalized tensor (MNIST is tiny: no DataLoader, no per-sample transforms)."""
    # an idx file: 4 magic bytes (the last: the number of dimensions), each dimension's size as big-endian int32, data
    tensors = []
    for name in MNIST_FILES[train]:
        with open(os.path.join(data_dir, "MNIST", "raw", name), "rb") as f:
            data = f.read()
        shape = struct.unpack(f">{data[3]}i", data[4:4 + 4 * data[3]])
        tensors.append(torch.frombuffer(bytearray(data[4 + 4 * data[3]:]), dtype=torch.uint8).view(shape))
    x = tensors[0].to(device=device, dtype=torch.float32).div_(255).sub_(MEAN).div_(STD).unsqueeze_(1)
    return x, tensors[1].long().to(device)


# --- model -------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, padding=2)   # 28x28 -> 28x28, pooled to 14x14
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)  # 14x14 -> 14x14, pooled to 7x7
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.dropout = nn.Dropout(0.25)  # training only: random numbers every step, which a resume puts back
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(self.dropout(F.relu(self.fc1(x.flatten(1)))))


@torch.no_grad()
def evaluate(model, x, y, batch_size, device):
    """Exact test metrics: rank r scores digits r, r+W, r+2W, ... (no padding, no digit twice), then sums. Every
    rank runs as many forwards (each gathers the weights): rank 0's share is the longest, a shorter one ends empty."""
    model.eval()
    xs, ys = x[cluster.RANK::cluster.WORLD_SIZE], y[cluster.RANK::cluster.WORLD_SIZE]
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(0, len(x[::cluster.WORLD_SIZE]), batch_size):
        out = model(xs[i:i + batch_size]).float()
        stats[0] += F.cross_entropy(out, ys[i:i + batch_size], reduction="sum")
        stats[1] += (out.argmax(1) == ys[i:i + batch_size]).sum()
    stats[2] = len(xs)
    loss_sum, correct, count = cluster.all_sum(stats).tolist()
    return dict(test_loss=loss_sum / count, test_acc=correct / count, test_count=int(count))


# --- training ----------------------------------------------------------------
def train(args, device):
    rank, world_size = cluster.RANK, cluster.WORLD_SIZE
    torch.manual_seed(args.seed)  # same initial weights everywhere: each rank keeps its shard of them
    amp_dtype = cluster.autocast_dtype(device, args.amp)  # None: float32
    if amp_dtype == torch.float16:  # float16 would need a sharded gradient scaler: bfloat16 or nothing
        cluster.print0("NOTE: --amp here is bfloat16, which GPUs before Ampere do not compute natively: float32")
        amp_dtype = None
    precision = "bf16 compute, fp32 weights and reduction" if amp_dtype else "fp32"

    # data: local rank 0 of each node downloads if needed while the other ranks wait
    reason = download_mnist(args.data_dir) if cluster.LOCAL_RANK == 0 else None
    if not cluster.all_ranks_ok(reason is None, device):
        cluster.fail(f"MNIST is not in {os.path.abspath(args.data_dir)} and could not be downloaded "
                     f"({reason or 'on another node'}). HINT: compute nodes are often offline; on the login node run: "
                     f"python {os.path.basename(__file__)} --download-only --data-dir {args.data_dir}")
    (x_train, y_train), (x_test, y_test) = (load_mnist(args.data_dir, train, device) for train in (True, False))
    # each rank sees a disjoint 1/world_size of the training set, reshuffled every epoch by set_epoch();
    # drop_last keeps the shards equal, so every rank takes the same number of steps
    sampler = DistributedSampler(range(len(x_train)), num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)

    # model and optimizer: fully_shard splits each layer's weights across the ranks (DTensors). In forward and backward
    # a layer's whole weights are gathered just before it runs and freed after; backward reduce-scatters gradients, so
    # each rank keeps the averaged gradient of its own shard, and the optimizer updates (and keeps state for) that
    raw_model = Net().to(device)
    cluster.init_weights(args, raw_model)  # --init-from: another run's weights, for a new run
    flops = cluster.train_flops(raw_model, (1, 28, 28))  # a training step's FLOPs per digit: the efficiency line
    mixed = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    for layer in (raw_model.conv1, raw_model.conv2, raw_model.fc1, raw_model.fc2):  # a unit each, then the rest
        fully_shard(layer, mp_policy=mixed)
    fully_shard(raw_model, mp_policy=mixed)
    model = raw_model  # torch.compile over FSDP2 is not part of this template: untested here
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=args.lr)  # over this rank's shards
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)
    torch.manual_seed(args.seed + rank)  # the weights are made: from here on each rank draws its own random numbers

    batch_size = args.batch_size  # per process: the global batch is world_size times larger
    steps_per_epoch = -(-len(sampler) // batch_size)

    # resume: every rank loads its own shards of the newest whole checkpoint; mid-epoch checkpoints resume at
    # their step. Only a checkpoint of this run: what defines it (every option but --epochs and the like, the world
    # size) is saved with it and compared. Another world size is refused: DCP could reshard the weights, but each
    # rank's share of the data and the global batch change
    run = cluster.run_record(args, script=os.path.basename(__file__), model="Net",
                             data=f"MNIST, {len(x_train)} training digits", precision=precision)
    start_epoch, start_step = 1, 0
    ckpt = cluster.load_checkpoint(args.checkpoint_dir, run, device, sharded=True)  # a DCP folder's
    if ckpt:
        model_state, optimizer_state = get_state_dict(raw_model, optimizer)  # this rank's shards, to be filled in
        cluster.load_shards(ckpt, {"model": model_state, "optimizer": optimizer_state})
        set_state_dict(raw_model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
    # rank 0's metrics file, TensorBoard curves (x: optimizer steps over the whole training) and --profile
    outputs = cluster.Outputs(args, device, ckpt, purge_step=(start_epoch - 1) * steps_per_epoch + start_step + 1,
                              run=run, flops=flops)

    def checkpoint(epoch, step):
        model_state, optimizer_state = get_state_dict(raw_model, optimizer)  # this rank's shards
        cluster.save_checkpoint(args.checkpoint_dir, epoch, step, device, outputs, {
            "scheduler": scheduler.state_dict(), "args": vars(args), "run": run},
            shards={"model": model_state, "optimizer": optimizer_state})  # every rank writes its own (DCP)

    cluster.print0(f"Net, FSDP2 over {world_size} processes x {batch_size} samples, {len(x_train)} training / "
                   f"{len(x_test)} test digits, lr {args.lr:g} | {precision} on {device.type}")

    # training loop
    cluster.stop_check(device, None, 0, 0)  # a signal in start-up, or the end already near
    cluster.TIMES.lap("startup")
    trained, train_seconds, result = 0, 0.0, None
    for epoch in range(start_epoch, args.epochs + 1):
        model.train()
        sampler.set_epoch(epoch)  # without this every epoch repeats the same shuffle
        order = torch.tensor(list(sampler), device=device)
        skip, start_step = start_step, 0  # a mid-epoch checkpoint: continue after the steps it already holds
        loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
        lr, t0 = optimizer.param_groups[0]["lr"], time.perf_counter()
        for step in range(skip, steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            cluster.TIMES.lap("data")  # with a DataLoader: right after next(), the wait for a batch
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])  # the policy casts: no autocast
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # reduce-scatters the gradients: each rank gets its shard's
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            outputs.step()  # the profiler's step, with --profile
            if rank == 0 and step % args.log_interval == 0:  # .item() syncs, so only now and then
                value = loss.item()
                cluster.print_line(f"  epoch {epoch} step {step} loss {value:.4f}")
                outputs.scalar("train/loss", value, (epoch - 1) * steps_per_epoch + step + 1)
            if (step + 1) % cluster.STOP_CHECK_EVERY == 0 and step + 1 < steps_per_epoch:
                cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, step + 1)
            cluster.TIMES.lap("compute")
        scheduler.step()
        # the mean over all ranks' samples, not just rank 0's
        trained_now = len(order[skip * batch_size:steps_per_epoch * batch_size])  # this rank's, in this run
        stats = cluster.all_sum(torch.stack([loss_sum, loss_sum.new_tensor(trained_now)]).double())
        (loss_total, samples), seconds = stats.tolist(), time.perf_counter() - t0  # one host sync
        cluster.TIMES.lap("compute")
        result = dict(epoch=epoch, lr=lr, train_loss=loss_total / samples,
                      **evaluate(raw_model, x_test, y_test, args.test_batch_size, device),
                      seconds=seconds, samples_per_s=samples / seconds)
        trained, train_seconds = trained + int(samples), train_seconds + seconds
        cluster.print0("epoch {epoch}/{epochs} | train loss {train_loss:.4f} | test loss {test_loss:.4f} | test acc "
                       "{test_acc:.2%} | {seconds:.1f} s | {samples_per_s:.0f} samples/s".format(
                           epochs=args.epochs, **result))
        outputs.epoch(result, epoch * steps_per_epoch)  # a JSON line, and epoch/ curves
        cluster.TIMES.lap("eval")
        if args.checkpoint_dir:
            checkpoint(epoch, 0)
        cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, 0)

    if result is None:  # nothing left to train (resumed a finished run): still report the model's accuracy
        cluster.print0(f"nothing to train: the checkpoint has {start_epoch - 1} epochs (--epochs={args.epochs})")
        result = dict(epoch=start_epoch - 1, **evaluate(raw_model, x_test, y_test, args.test_batch_size, device))
    cluster.TIMES.lap("eval")
    outputs.done(raw_model, "no DataLoader: MNIST sits on the device", **{k: result[k] for k in (
        "test_acc", "test_loss", "test_count", "epoch")}, samples_per_s=trained / train_seconds if trained else None)


# --- main --------------------------------------------------------------------
def main(args):
    if args.download_only:
        if reason := download_mnist(args.data_dir):
            cluster.fail(f"could not download MNIST into {os.path.abspath(args.data_dir)} ({reason})")
        cluster.print0(f"MNIST is ready in {os.path.abspath(args.data_dir)}")
        return
    with cluster.process_group(args, group="always") as device:  # as mnist_ddp.py's, but a group even for one process
        train(args, device)


if __name__ == "__main__":
    main(get_args())
