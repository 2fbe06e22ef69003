"""The same plumbing for the frameworks: Lightning's callbacks (the stop check, the time split, every rank's random
state in its checkpoints) and its W&B logger, DeepSpeed's accelerator and its config."""
import argparse
import copy
import json
import os

import torch

from . import checkpoints, launch, stopping
from .outputs import TIMES

# --- Lightning: the same plumbing as callbacks -------------------------------
def lightning_callbacks(args):
    """[StopOnSignal, TimeLaps]: stop_check and TIMES's laps at Lightning's hooks."""
    import pytorch_lightning as pl

    class StopOnSignal(pl.Callback):
        """stop_check before the first batch, every STOP_CHECK_EVERY batches and at each later epoch's start (after
        ModelCheckpoint's last.ckpt). Lightning's own handlers would save inside the handler with a collective, or
        end on SIGTERM without saving: ours replace them once training starts."""

        def on_train_start(self, trainer, pl_module):
            stopping.install_handlers()  # Lightning installed its own just before this hook
            if trainer.ckpt_path:  # resumed from last.ckpt: a requeue goes on from there
                checkpoints.LOADED_OR_SAVED = True
            # Lightning 2.x broadcasts its SIGTERM flag before every batch (a collective and a host sync per step).
            # With our handlers that flag stays 0: the broadcast goes, where it is the one we read (2.x)
            loop = trainer.fit_loop.epoch_loop
            if pl.__version__.startswith("2.") and hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda: None
            self.check(trainer, pl_module, 0, 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % stopping.STOP_CHECK_EVERY == 0 and batch_idx + 1 < trainer.num_training_batches:
                self.check(trainer, pl_module, trainer.current_epoch + 1, batch_idx + 1)

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch > 0:
                self.check(trainer, pl_module, trainer.current_epoch, 0)

        def check(self, trainer, pl_module, epoch, step):
            def checkpoint(epoch, step):  # a mid-epoch last.ckpt: rank 0 writes, the others wait
                TIMES.lap("compute")
                pl_module.stop_step = step
                trainer.save_checkpoint(os.path.join(args.checkpoint_dir, "last.ckpt"))
                pl_module.stop_step = 0
                TIMES.lap("checkpoint")

            stopping.stop_check(pl_module.device, args.checkpoint_dir and checkpoint, epoch, step)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):  # on every rank: a resumed run draws the
            checkpoint["rng"] = launch.all_gather(checkpoints.rng_state(pl_module.device))  # same random numbers

        def on_load_checkpoint(self, trainer, pl_module, checkpoint):
            if len(checkpoint.get("rng", [])) == launch.WORLD_SIZE:
                checkpoints.set_rng_state(checkpoint["rng"][launch.RANK], pl_module.device)

    class TimeLaps(pl.Callback):
        """The gap before a batch is the wait for it, validation the evaluation, and what follows an epoch's end
        ModelCheckpoint's save. After StopOnSignal: its all-reduce after a batch counts with the step."""

    between = "checkpoint" if args.checkpoint_dir else "compute"  # between one epoch's end and the next
    for hook, part in {"on_train_start": "startup", "on_train_epoch_start": between, "on_train_batch_start": "data",
                       "on_train_batch_end": "compute", "on_validation_start": "compute", "on_validation_end": "eval",
                       "on_train_epoch_end": "compute", "on_train_end": between}.items():
        setattr(TimeLaps, hook, lambda self, *_, part=part, **__: TIMES.lap(part))
    return [StopOnSignal(), TimeLaps()]


def lightning_wandb(args, name, project="mnist_lightning_ddp"):
    """Lightning's WandbLogger where W&B is asked for (--wandb, WANDB_PROJECT), else None. Its id is the run's stored
    name (`name`, the TensorBoard folder's), so every requeue and resume continues the same W&B run; offline where
    WANDB_MODE says so or the server does not answer (tracking.mode, decided and said on rank 0). Lightning starts
    wandb on rank 0 only."""
    from . import tracking
    if not tracking.wanted(args):
        return None
    from pytorch_lightning.loggers import WandbLogger
    where, line = tracking.mode() if launch.RANK == 0 else ("offline", None)
    if line:
        launch.print_line(line)
    return WandbLogger(project=os.environ.get("WANDB_PROJECT") or project, id=name, resume="allow",
                       offline=where == "offline", save_dir=args.output_dir,
                       settings={"silent": True, "console": "off", "init_timeout": 90})


# --- DeepSpeed: its accelerator and its config -------------------------------
def deepspeed_accelerator(argv=None, env=os.environ):
    """Before `import deepspeed`, which picks its accelerator: the CPU's where there is no GPU or --device cpu."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--device")
    if p.parse_known_args(argv)[0].device == "cpu" or not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_config(args, default, amp_dtype):
    """--deepspeed_config's file (else `default`) with --batch-size, --zero-stage and --amp, checked by DeepSpeed."""
    import deepspeed
    config = copy.deepcopy(default)  # edited below
    if args.deepspeed_config:
        try:
            with open(args.deepspeed_config) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            launch.fail(f"cannot read the DeepSpeed config {args.deepspeed_config}: {e}. HINT: start from "
                        "ds_config.json")
    if args.batch_size:  # DeepSpeed derives the global batch: micro batch x accumulation x world size
        config["train_micro_batch_size_per_gpu"] = args.batch_size
        config.pop("train_batch_size", None)
    if args.zero_stage is not None:
        config.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if amp_dtype and not {"fp16", "bf16", "bfloat16"} & set(config):  # bf16 needs no overflow check (an all-reduce
        config["bf16" if amp_dtype == torch.bfloat16 else "fp16"] = {  # and a host sync per step)
            "enabled": True, **({"check_grad_overflow": False} if amp_dtype == torch.bfloat16 else {})}
    try:  # the batch sizes against the world size, and the rest
        deepspeed.DeepSpeedConfig(config)
    except (AssertionError, ValueError, KeyError) as e:
        hint = " HINT: set train_micro_batch_size_per_gpu, not train_batch_size: the global batch follows world size"
        launch.fail(f"DeepSpeed rejected the config {args.deepspeed_config or '(built-in)'}: {type(e).__name__}: "
             f"{' '.join(str(e).split())}.{hint * ('batch' in str(e))}")
    return config
