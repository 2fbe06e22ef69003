"""Train a small CNN on MNIST with PyTorch Lightning's DDP strategy, on one process or many:

    python mnist_lightning_ddp.py --epochs=1                 # one process (a GPU if there is one, else CPU)
    python mnist_lightning_ddp.py --gpus=2                   # Lightning starts the 2 processes itself
    torchrun --standalone --nproc_per_node=2 mnist_lightning_ddp.py --gpus=2
    srun python mnist_lightning_ddp.py --gpus=4 --nodes=2    # inside a Slurm job, one task per GPU
    sbatch run-gpu4.sh mnist_lightning_ddp.py --gpus=4 --epochs=100   # the job script does the above for you

--gpus is the number of devices (processes) per node and --nodes the number of nodes; without them both come from the
launcher. Without a GPU, --gpus=N runs N CPU processes with gloo. Copy three things: this script, the cluster/ folder
(the plumbing it calls) and a job script. A sibling of mnist_ddp.py (same network, data, output lines and JSON):
    the training loop        -> LitMNIST.training_step, configure_optimizers
    evaluate()               -> validation_step + on_validation_epoch_end (exact sums over ranks)
    checkpoints and resume   -> ModelCheckpoint(save_last=True) + trainer.fit(ckpt_path=last.ckpt)
    process_group()          -> make_trainer(): Trainer(devices, num_nodes, DDPStrategy); Lightning forms the group
    stop_check in the loop   -> cluster.lightning_callbacks(): StopOnSignal, TimeLaps

Data: --data-dir (default $DATA_DIR, else ./data) holds MNIST/raw/; local rank 0 of each node downloads it if missing.
Compute nodes are often offline: download on the login node with
    python mnist_lightning_ddp.py --download-only --data-dir /path/to/data

Expected (2 CPU processes, gloo, the 5,000-digit training sample; full MNIST reaches higher):
    python mnist_lightning_ddp.py --gpus=2 --batch-size=32 --epochs=2 --data-dir ../shared/data
    -> test accuracy 97.0% on the 10,000 official test digits, about 1 s per epoch (2 vCPUs).

Make it yours: replace MNIST in setup() and the dataloaders (real data: a Dataset with DataLoader workers, as in
docs/your-data.md), Net, and the metrics of validation_step. Keep our own DistributedSampler (exact, per-epoch
shuffle), the DataLoader's own generator, the reduce of sums in on_validation_epoch_end, and main()'s Trainer,
checkpoint and resume settings. Dropout and options of any type resume exactly.
--batch-size is per process: the global batch is world size times larger.
"""
import argparse
import inspect
import io
import os
import struct
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from datetime import timedelta

try:
    import cluster  # the plumbing every script here shares: each line that calls it is one to keep
except ModuleNotFoundError as e:  # first: copied without it, the script stops at once
    raise SystemExit(f"ERROR: {__file__} needs the cluster/ folder beside it: copy it from the same repository") \
        if e.name == "cluster" else e from None

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

# --- options -----------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MNIST with PyTorch Lightning DDP")
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
                   help="mixed precision on GPU: bfloat16, or float16 with loss scaling before Ampere (CPU: float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    # Lightning: how many processes. The CSC README spells them --gpus=4 --nodes=2
    p.add_argument("--gpus", type=positive, help="processes (devices) per node (default: the launcher's, else 1)")
    p.add_argument("--nodes", type=positive, help="number of nodes (default: the launcher's, else 1)")
    # + --log-interval --output-dir --checkpoint-dir --device --profile --dist-timeout, and a job array's sweep line
    return cluster.parse_args(p, argv, log_interval=20)


def launch_size(env=os.environ):
    """Devices per node and nodes, as the launcher set them up (Lightning checks they match --gpus/--nodes)."""
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return per_node, int(env["WORLD_SIZE"]) // per_node
    if "SLURM_NTASKS_PER_NODE" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):  # srun
        return int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), int(env.get("SLURM_NNODES", 1))
    return 1, 1


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


class ResumedBatches(BatchSampler):
    """The sampler's batches; in the epoch that a mid-epoch checkpoint stopped in, only those after its step. len()
    stays the whole epoch's: Lightning's loop state, restored from the same checkpoint, counts the others as done."""

    def __init__(self, sampler, batch_size, resume_epoch=-1, resume_step=0):
        super().__init__(sampler, batch_size, drop_last=False)
        self.resume_epoch, self.resume_step = resume_epoch, resume_step

    def __iter__(self):  # a generator: it runs at the first batch, after Lightning's sampler.set_epoch()
        skip = self.resume_step if self.sampler.epoch == self.resume_epoch else 0
        for k, batch in enumerate(super().__iter__()):
            if k >= skip:
                yield batch

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



class LitMNIST(pl.LightningModule):
    """mnist_ddp.py's training loop, cut into the hooks Lightning calls."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.net = Net()
        self.flops = cluster.train_flops(self.net, (1, 28, 28))  # a training step's FLOPs per digit (efficiency line)
        self.result = None  # the last epoch's metrics; saved in checkpoints for the final report
        self.stop_step, self.resume_at = 0, (-1, 0)  # a mid-epoch checkpoint's step; (epoch, step) it resumes at
        self.resumed = None  # main()'s peek at last.ckpt: the TensorBoard run that requeues and resumes go on in

    # data: local rank 0 of each node downloads if needed while the other ranks wait
    def setup(self, stage):  # Lightning has formed the process group: one start-up line per rank
        cluster.started(self.global_rank, self.local_rank, self.trainer.world_size, self.device)
        rank, world_size = cluster.RANK, cluster.WORLD_SIZE
        reason = download_mnist(self.args.data_dir) if self.local_rank == 0 else None
        if not cluster.all_ranks_ok(reason is None, self.device):
            cluster.fail(f"MNIST is not in {os.path.abspath(self.args.data_dir)} and could not be downloaded "
                         f"({reason or 'on another node'}). HINT: compute nodes are often offline; on the login node "
                         f"run: python {os.path.basename(__file__)} --download-only --data-dir {self.args.data_dir}")
        self.train_set = TensorDataset(*load_mnist(self.args.data_dir, True, "cpu"))
        x_test, y_test = load_mnist(self.args.data_dir, False, "cpu")
        # what defines this run: a checkpoint of another run is refused (check_same_run in on_load_checkpoint)
        self.run = cluster.run_record(self.args, script=os.path.basename(__file__), model="Net",
                                      data=f"MNIST, {len(self.train_set)} training digits",
                                      precision=self.trainer.precision)
        # exact evaluation: rank r scores digits r, r+W, r+2W, ... (no padding, no digit twice)
        self.test_shard = TensorDataset(x_test[rank::world_size], y_test[rank::world_size])

    def train_dataloader(self):
        # each rank sees a disjoint 1/WORLD_SIZE of the training set; Lightning calls sampler.set_epoch() for us
        sampler = DistributedSampler(self.train_set, num_replicas=cluster.WORLD_SIZE, rank=cluster.RANK, shuffle=True,
                                     seed=self.args.seed, drop_last=True)
        batches = ResumedBatches(sampler, self.args.batch_size, *self.resume_at)
        # its own generator: torch's DataLoader would otherwise draw a seed from the process's random state at every
        # epoch's start, and a resumed run's dropout would draw other numbers than the uninterrupted run's
        return DataLoader(self.train_set, batch_sampler=batches, worker_init_fn=cluster.ignore_stop_signals,
                          generator=torch.Generator())

    def val_dataloader(self):
        return DataLoader(self.test_shard, batch_size=self.args.test_batch_size)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.args.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.args.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # training loop
    def on_train_epoch_start(self):
        self.train_stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, samples
        self.t0, self.lr = time.perf_counter(), self.trainer.optimizers[0].param_groups[0]["lr"]

    def forward(self, x):  # what the DDP wrapper runs outside the steps (Lightning calls training_step through it)
        return self.net(x)

    def on_train_start(self):
        self.on_train_epoch_start()  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
        if self.trainer.ckpt_path and cluster.WORLD_SIZE > 1:  # DDP's gradient buckets laid out as in the first run
            x, y = (t[:self.args.batch_size].to(self.device) for t in self.train_set.tensors)
            with self.trainer.precision_plugin.forward_context():  # through the DDP wrapper, in the training precision
                cluster.replay_first_backward(self.net, lambda: F.cross_entropy(self.trainer.strategy.model(x), y))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)  # Lightning runs backward() and step() after this returns
        self.train_stats[0] += loss.detach() * len(y)  # stays on the device: no host sync, no copy per step
        self.train_stats[1] += len(y)
        if cluster.RANK == 0 and batch_idx % self.args.log_interval == 0:  # .item() syncs, so only now and then
            value = loss.item()
            cluster.print_line(f"  epoch {self.current_epoch + 1} step {batch_idx} loss {value:.4f}")
            for logger in self.loggers:  # TensorBoard, W&B; x: optimizer steps done, this one included
                logger.log_metrics({"train/loss": value}, step=self.global_step + 1)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.step()  # the profiler's step, with --profile

    def on_validation_epoch_start(self):
        self.seconds = time.perf_counter() - self.t0  # the training part of the epoch
        self.val_stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x).float()
        self.val_stats[0] += F.cross_entropy(out, y, reduction="sum")
        self.val_stats[1] += (out.argmax(1) == y).sum()
        self.val_stats[2] += len(y)

    def on_validation_epoch_end(self):
        # sums from every rank: the mean over all samples, not just rank 0's
        train_loss_sum, samples = self.trainer.strategy.reduce(self.train_stats, reduce_op="sum").tolist()
        loss_sum, correct, count = self.trainer.strategy.reduce(self.val_stats, reduce_op="sum").tolist()
        epoch, seconds = self.current_epoch + 1, self.seconds
        self.result = dict(epoch=epoch, train_loss=train_loss_sum / samples, test_loss=loss_sum / count,
                           test_acc=correct / count, test_count=int(count), seconds=seconds,
                           samples_per_s=samples / seconds)
        self.trained, self.train_seconds = self.trained + samples, self.train_seconds + seconds
        cluster.print0(f"epoch {epoch}/{self.args.epochs} | train loss {self.result['train_loss']:.4f} | "
                       f"test loss {self.result['test_loss']:.4f} | test acc {100 * self.result['test_acc']:.2f}% | "
                       f"{seconds:.1f} s | {samples / seconds:.0f} samples/s")
        self.outputs.write({"event": "epoch", **self.result})
        for logger in self.loggers:  # rank 0 writes (Lightning's loggers log from rank 0 only)
            logger.log_metrics({"epoch/lr": self.lr, **{f"epoch/{key}": self.result[key] for key in (
                "train_loss", "test_loss", "test_acc", "samples_per_s")}}, step=self.global_step)
            logger.save()

    # checkpoints: Lightning saves weights, optimizer, scheduler, loop state; we add the last metrics and, mid-epoch,
    # the step (Lightning's "epoch" is the epoch in progress then, else the last one done, counted from 0)
    def on_save_checkpoint(self, checkpoint):
        checkpoint["result"], checkpoint["step"], checkpoint["run"] = self.result, self.stop_step, self.run
        checkpoint["tensorboard"] = self.outputs.tb_name

    def on_load_checkpoint(self, checkpoint):
        cluster.check_same_run(f"{self.args.checkpoint_dir}/last.ckpt", checkpoint.get("run"), self.run)
        self.result, step = checkpoint.get("result"), checkpoint.get("step", 0)
        done = checkpoint["epoch"] if step else checkpoint["epoch"] + 1
        self.resume_at = (checkpoint["epoch"], step)
        steps = f" and {step} steps of epoch {done + 1}" if step else ""
        cluster.print0(f"resumed from {self.args.checkpoint_dir}/last.ckpt: epoch {done} done{steps}, continuing at "
                       f"epoch {done + 1}")

    def on_fit_start(self):  # rank 0's metrics file (TensorBoard: Lightning's logger, made in main)
        self.outputs = cluster.Outputs(self.args, self.device, self.resumed, curves=False, run=self.run,
                                       flops=self.flops)
        for logger in self.loggers:  # the run's settings in TensorBoard's HPARAMS tab and W&B's config
            logger.log_hyperparams(self.outputs.config)
        self.trained, self.train_seconds = 0, 0.0

    # summary
    def on_fit_end(self):
        if not self.trained:  # nothing left to train (resumed a finished run): report the checkpoint's metrics
            cluster.print0(f"nothing to train: the checkpoint has {self.current_epoch} epochs "
                           f"(--epochs={self.args.epochs})")
        cluster.TIMES.lap("compute")  # Lightning's teardown
        self.outputs.done(self.net, "num_workers=0 in train_dataloader()", **{k: self.result[k] for k in (
            "test_acc", "test_loss", "test_count", "epoch")},
            samples_per_s=self.trained / self.train_seconds if self.train_seconds else None)


# --- main --------------------------------------------------------------------
def make_trainer(args, device, devices, num_nodes, precision, callbacks, logger):
    """Lightning's Trainer for `devices` processes on each of `num_nodes` nodes, this one on `device`. On GPUs, each
    process's strategy lists its own GPU for every local rank: Lightning takes parallel_devices[local_rank], which
    is then right also when srun gave each task only its own GPU (Lightning alone would take GPU local_rank)."""
    many = devices * num_nodes > 1
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index] if device.type == "cuda" else devices, num_nodes=num_nodes,
        strategy=DDPStrategy(parallel_devices=[device] * devices if device.type == "cuda" else None,
                             timeout=timedelta(seconds=args.dist_timeout)) if many else "auto",
        precision=precision, max_epochs=args.epochs, callbacks=callbacks,
        use_distributed_sampler=False,  # we shard ourselves, see train_dataloader
        num_sanity_val_steps=0, logger=logger, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(args.checkpoint_dir))


def main(args):
    if args.download_only:
        if reason := download_mnist(args.data_dir):
            cluster.fail(f"could not download MNIST into {os.path.abspath(args.data_dir)} ({reason})")
        cluster.print0(f"MNIST is ready in {os.path.abspath(args.data_dir)}")
        return
    # Lightning forms the process group (in fit): cluster picks the device, installs the stop signals' handlers (so
    # that Lightning adds no SIGUSR1 requeue of its own) and tears the group down however fit() ends
    with cluster.process_group(args, group=False) as device:
        amp_dtype = cluster.autocast_dtype(device, args.amp)  # None: float32
        precision = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", None: "32-true"}[amp_dtype]
        per_node, nodes = launch_size()
        devices, num_nodes = args.gpus or per_node, args.nodes or nodes
        torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
        model = LitMNIST(args)
        cluster.init_weights(args, model.net)  # --init-from: another run's weights, for a new run

        # resume: Lightning restores weights, optimizer, scheduler and its loop's place (epoch, step) from last.ckpt
        callbacks, ckpt_path = [], None
        # Lightning cannot see that ResumedBatches goes on at the step of a mid-epoch checkpoint, and would warn that
        # it starts the epoch over
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
        if args.checkpoint_dir:
            callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, filename="lightning-{epoch}",  # + last.ckpt
                                             save_last=True, save_top_k=1, every_n_epochs=1))
            last = os.path.join(args.checkpoint_dir, "last.ckpt")
            ckpt_path = last if os.path.exists(last) else None
        # TensorBoard: one run per training, continued by its requeues and resumes (last.ckpt names it)
        purge_step = 1
        if ckpt_path:  # mmap: only the two small entries are read, not the weights (Lightning loads those in fit)
            model.resumed = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            purge_step = model.resumed["global_step"] + 1
        name = (model.resumed or {}).get("tensorboard") or cluster.run_name()
        # and W&B (--wandb, WANDB_PROJECT): the same run id across requeues and resumes
        logger = [lg for lg in (tensorboard(args.output_dir, name, purge_step), cluster.lightning_wandb(args, name))
                  if lg] or False
        # stop_check and the time split, where Lightning's loop has room for them (its callbacks, in order)
        stop, laps = cluster.lightning_callbacks(args)  # StopOnSignal, TimeLaps
        callbacks = [stop] + callbacks + [laps]
        try:
            trainer = make_trainer(args, device, devices, num_nodes, precision, callbacks, logger)
            # fit() would check this too, with a traceback per rank
            if getattr(trainer.strategy, "cluster_environment", None):
                trainer.strategy.cluster_environment.validate_settings(num_devices=devices, num_nodes=num_nodes)
        except (ValueError, RuntimeError) as e:  # Lightning's launch checks, e.g. --gpus differs from srun's tasks
            cluster.fail(f"{e} (from --gpus={devices} --nodes={num_nodes})")
        cluster.print0(f"Net | {devices * num_nodes} processes x {args.batch_size} samples, lr {args.lr:g} | "
                       f"{precision}{', compiled' * args.compile} on {device.type}")
        if args.compile:  # the network, in place (its checkpoint keys stay): torch.compile(model) would also compile
            model.net.compile()  # the steps, whose Python logging recompiles at every batch index
        # Lightning >= 2.6 is told to load weights only; older ones load as torch does (weights only from torch 2.6)
        weights_only = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
        trainer.fit(model, ckpt_path=ckpt_path, **weights_only)


def tensorboard(output_dir, name, purge_step):
    """Lightning's TensorBoardLogger into output_dir/tensorboard/name, or False where tensorboard is not installed (the
    script trains all the same). A requeued or resumed run writes into its first run's folder from step `purge_step`
    on; TensorBoard drops what the interrupted run wrote from there, so no point shows twice."""
    try:
        import tensorboard  # noqa: F401  (what the logger writes with)
    except ImportError:
        cluster.print0("NOTE: tensorboard is not installed (pip install tensorboard): no TensorBoard curves; the "
                       "metrics JSONL file has the same numbers")
        return False
    return TensorBoardLogger(output_dir, name="tensorboard", version=name, default_hp_metric=False,
                             purge_step=purge_step)


if __name__ == "__main__":
    main(get_args())
