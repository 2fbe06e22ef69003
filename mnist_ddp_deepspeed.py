"""Train a small CNN on MNIST with DeepSpeed (ZeRO data parallelism), on one process or many:

    python mnist_ddp_deepspeed.py --epochs=1                 # one process (a GPU if there is one, else CPU)
    torchrun --standalone --nproc_per_node=2 mnist_ddp_deepspeed.py --deepspeed_config ds_config.json
    deepspeed --num_gpus 2 mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json
    srun python mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json   # one Slurm task per GPU
    mpirun -n 2 python mnist_ddp_deepspeed.py --deepspeed --deepspeed_config ds_config.json
    sbatch run-gpu4-deepspeed.sh mnist_ddp_deepspeed.py --epochs=100 --deepspeed --deepspeed_config ds_config.json

Copy three things (and ds_config.json if named): this script, the cluster/ folder (the plumbing it calls), a job script.
--data-dir (default $DATA_DIR, else ./data) holds MNIST/raw/; local rank 0 of each node downloads it if missing. Compute
nodes are often offline: run this script with `--download-only --data-dir DIR` on the login node first.

Expected (2 CPU processes, gloo, the 5,000-digit training sample; full MNIST reaches higher):
    torchrun --standalone --nproc_per_node=2 mnist_ddp_deepspeed.py --epochs=2 --batch-size=32 --data-dir ../shared/data
    -> test accuracy 95.8% on the 10,000 official test digits, about 1.5 s per epoch (2 vCPUs).

Make it yours: the data section (MNIST sits on the device whole; a Dataset of your own with DataLoader workers is the
change that docs/your-data.md shows, line by line), Net, evaluate(), ds_config.json, your own options. Keep the
cluster.* calls, set_epoch and the resume block: they make the launchers, preemption and exact resume work, also with
dropout, random augmentation and options of any type. --batch-size is per process.
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
from torch.utils.data import DistributedSampler

cluster.deepspeed_accelerator()  # before DeepSpeed's import picks one: the CPU's without a GPU or with --device cpu
import deepspeed  # noqa: E402

# --- options -----------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MNIST with DeepSpeed")
    positive = cluster.positive_int  # sizes and counts
    p.add_argument("--epochs", type=positive, default=2, help="number of epochs to train (default: 2)")
    p.add_argument("--batch-size", type=positive, help="training batch size per process (default: the config's)")
    p.add_argument("--test-batch-size", type=positive, default=1000, help="test batch size per process (default: 1000)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], help="ZeRO stage (default: the config's, 2)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    p.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "./data"),
                   help="holds MNIST/raw (default: $DATA_DIR, else ./data)")
    p.add_argument("--download-only", action="store_true", help="download MNIST into --data-dir and exit")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision on GPU: bfloat16, or float16 with loss scaling before Ampere (CPU: float32)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # from DeepSpeed's launcher
    deepspeed.add_config_arguments(p)  # --deepspeed, --deepspeed_config (the spelling DeepSpeed's examples use)
    # + --log-interval --output-dir --checkpoint-dir --device --profile --dist-timeout, and a job array's sweep line
    return cluster.parse_args(p, argv, log_interval=20)


# used without --deepspeed_config; the same values as ds_config.json (docs/deepspeed.md explains each field)
DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
    "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01,
                                             "adam_w_mode": True, "torch_adam": True}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.003, "warmup_num_steps": 20,
                                                 "warmup_type": "linear"}},
    "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "steps_per_print": 1000000,
    "wall_clock_breakdown": False, "timers": {"throughput": {"enabled": False}}}


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
    """Exact test metrics: rank r scores digits r, r+W, r+2W, ... (no padding, no digit twice), then sums."""
    model.eval()
    xs, ys = x[cluster.RANK::cluster.WORLD_SIZE], y[cluster.RANK::cluster.WORLD_SIZE]
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    for i in range(0, len(xs), batch_size):
        out = model(xs[i:i + batch_size]).float()
        stats[0] += F.cross_entropy(out, ys[i:i + batch_size], reduction="sum")
        stats[1] += (out.argmax(1) == ys[i:i + batch_size]).sum()
    stats[2] = len(xs)
    loss_sum, correct, count = cluster.all_sum(stats).tolist()
    return dict(test_loss=loss_sum / count, test_acc=correct / count, test_count=int(count))


# --- training ----------------------------------------------------------------
def train(args, device):
    rank, world_size = cluster.RANK, cluster.WORLD_SIZE
    torch.manual_seed(args.seed)  # same initial weights everywhere (the wrapper also broadcasts rank 0's)
    amp_dtype = cluster.autocast_dtype(device, args.amp)  # None: float32
    config = cluster.deepspeed_config(args, DEFAULT_CONFIG, amp_dtype)  # with --batch-size, --zero-stage, --amp

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

    # model and optimizer: an engine that averages (ZeRO: partitions) gradients and optimizer state across ranks
    raw_model = Net()  # DeepSpeed builds the optimizer and scheduler from the config
    cluster.init_weights(args, raw_model)  # --init-from: another run's weights, for a new run
    flops = cluster.train_flops(raw_model, (1, 28, 28))  # a training step's FLOPs per digit: the efficiency line
    # device_rank: our GPU (cluster's choice), not DeepSpeed's default, GPU LOCAL_RANK
    engine, optimizer, _, scheduler = deepspeed.initialize(args=argparse.Namespace(device_rank=device.index or 0),
                                                           model=raw_model, config=config)
    cluster.CLOSE_FIRST.append(engine.destroy)  # its gradient hooks hold it, and it its groups, past the teardown
    torch.manual_seed(args.seed + rank)  # the weights are made: from here on each rank draws its own random numbers
    # the engine keeps the model in the config's dtype (its fp16 or bf16 section, also spelled bfloat16): feed it that
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    x_test = x_test.to(dtype)  # cast the test set once, not every epoch
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16 (loss scaling)", torch.float32: "fp32"}[dtype]

    batch_size = engine.train_micro_batch_size_per_gpu()  # per process: the global batch is world_size times larger
    # whole optimizer steps of accumulation micro-steps, and checkpoints only between them (docs/deepspeed.md: why)
    accumulation = engine.gradient_accumulation_steps()
    steps_per_epoch = -(-len(sampler) // batch_size) // accumulation * accumulation

    # resume: every rank loads its own shards of the checkpoint "latest" names; mid-epoch checkpoints resume at
    # their step. Only a checkpoint of this run: what defines it (every option but --epochs and the like, the world
    # size) is saved with it and compared
    run = cluster.run_record(args, script=os.path.basename(__file__), model="Net",
                             data=f"MNIST, {len(x_train)} training digits", precision=precision, config=config)
    start_epoch, start_step = 1, 0
    ckpt = cluster.load_checkpoint(args.checkpoint_dir, run, device, engine=engine)  # weights, optimizer, scheduler
    if ckpt:
        start_epoch, start_step = ckpt["epoch"] + 1, ckpt["step"]
    # rank 0's metrics file, TensorBoard curves (x: optimizer steps over the whole training) and --profile
    outputs = cluster.Outputs(args, device, ckpt, purge_step=(start_epoch - 1) * steps_per_epoch + start_step + 1,
                              run=run, flops=flops)

    def checkpoint(epoch, step):
        cluster.save_checkpoint(args.checkpoint_dir, epoch, step, device, outputs, {"args": vars(args), "run": run},
                                engine=engine)  # every rank writes its shards

    cluster.print0(f"DeepSpeed ZeRO stage {engine.zero_optimization_stage()}, micro batch {batch_size} per process, "
                   f"global batch {engine.train_batch_size()} | {precision} on {device.type}")

    # training loop
    cluster.stop_check(device, None, 0, 0)  # a signal in start-up, or the end already near
    cluster.TIMES.lap("startup")
    trained, train_seconds, result = 0, 0.0, None
    for epoch in range(start_epoch, args.epochs + 1):
        engine.train()
        sampler.set_epoch(epoch)  # without this every epoch repeats the same shuffle
        order = torch.tensor(list(sampler), device=device)
        skip, start_step = start_step, 0  # a mid-epoch checkpoint: continue after the steps it already holds
        loss_sum = torch.zeros((), device=device)  # accumulated on the device: no host sync per step
        lr, t0 = optimizer.param_groups[0]["lr"], time.perf_counter()
        for step in range(skip, steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            cluster.TIMES.lap("data")  # with a DataLoader: right after next(), the wait for a batch
            loss = F.cross_entropy(engine(x_train[idx].to(dtype)).float(), y_train[idx])
            engine.backward(loss)  # instead of loss.backward(): the engine reduces gradients
            engine.step()  # instead of optimizer.step() + zero_grad(): also clips, and steps the scheduler
            loss_sum += loss.detach() * len(idx)
            outputs.step()  # the profiler's step, with --profile
            if rank == 0 and step % args.log_interval == 0:  # .item() syncs, so only now and then
                value = loss.item()
                cluster.print_line(f"  epoch {epoch} step {step} loss {value:.4f}")
                outputs.scalar("train/loss", value, (epoch - 1) * steps_per_epoch + step + 1)
            if (step + 1) % (cluster.STOP_CHECK_EVERY * accumulation) == 0 and step + 1 < steps_per_epoch:
                cluster.stop_check(device, args.checkpoint_dir and checkpoint, epoch, step + 1)
            cluster.TIMES.lap("compute")
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
    with cluster.process_group(args, deepspeed=True) as device:  # one process per GPU, else CPU; DeepSpeed's group
        train(args, device)


if __name__ == "__main__":
    main(get_args())
