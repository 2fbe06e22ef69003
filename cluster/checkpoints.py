"""Checkpoint files. A run saves what defines it (run_record: its options and facts), and a checkpoint of another run is
refused, naming each difference and the ways out. Names sort in training order: epoch_0003.pt, then
epoch_0003_step_0000120.pt (3 epochs and 120 steps done). Every rank's random state (torch's, the GPU's, Python's and
numpy's) is saved and put back: a resumed run draws the numbers the uninterrupted one would have (dropout). What is
saved is plain data that torch.load(weights_only=True) reads (plain() converts Path, enum, dataclass and Namespace
values), and the first save proves it. Existing checkpoints of which none loads stop the run: never a fresh start over
them. --init-from starts a new run from another's weights."""
import argparse
import collections
import dataclasses
import enum
import glob
import inspect
import io
import os
import pathlib
import random
import re
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from . import launch, options
from . import outputs as run_outputs  # (save_checkpoint's argument `outputs` is a run's Outputs)

KEEP = 2                 # the newest checkpoints kept (and the newest epoch's end, always)
LOADED_OR_SAVED = False  # this run has a checkpoint to resume from: a requeue goes on from it
_proven = False          # the first save's state has been loaded back with weights_only=True


def run_record(args, may_change=(), **facts):
    """What defines this run, saved with each checkpoint and compared on resume: `facts` (script, model, data,
    precision ...), every option but those that may change between its runs (options.MAY_CHANGE, and `may_change`),
    the world size (unless `may_change` names it: a script whose data and global batch do not depend on it) and the git
    commit (GIT_COMMIT, which safe-sbatch.sh sets; not with --allow-commit-change)."""
    skip = options.MAY_CHANGE | set(may_change) | set(facts)  # a fact (the steps an epoch has) over its option
    record = {**facts, **{k: v for k, v in sorted(vars(args).items()) if k not in skip}}
    if "world_size" not in may_change:
        record["world_size"] = launch.WORLD_SIZE
    if not getattr(args, "allow_commit_change", False):
        record["git_commit"] = os.environ.get("GIT_COMMIT")
    return plain(record)


def plain(value):
    """`value` as data that torch.load(weights_only=True) reads: a Path becomes a str, an enum its value, a dataclass or
    Namespace a dict, a set a list, numpy's numbers and arrays Python's; tensors, numbers, strings stay as they are."""
    if isinstance(value, torch.Tensor | str | bytes | int | float | bool | type(None) | torch.Size | torch.dtype):
        return value
    if isinstance(value, dict):  # a state_dict is an OrderedDict, which weights_only loads; other kinds become dicts
        items = ((k, plain(v)) for k, v in value.items())
        return collections.OrderedDict(items) if isinstance(value, collections.OrderedDict) else dict(items)
    if isinstance(value, list | tuple):
        return type(value)(plain(v) for v in value) if type(value) in (list, tuple) else [plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, argparse.Namespace):
        return plain(vars(value))
    if isinstance(value, set | frozenset):
        return [plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    return value  # anything else: the first save says whether it loads


def load_checkpoint(ckpt_dir, run, device, engine=None, sharded=False):
    """The newest loadable checkpoint of this run in ckpt_dir (into a DeepSpeed `engine`: its shards; sharded: the
    state of a DCP folder, whose shards load_shards loads), else None."""
    if not ckpt_dir:
        return None
    _check_writable(ckpt_dir)
    if engine is not None:
        return _load_shards(engine, ckpt_dir, run, device)
    if sharded:
        return _load_dcp_state(ckpt_dir, run, device)
    found = sorted(glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")), key=_order)
    return _newest_that_loads(found, lambda path: path, run, device)


def _order(path):
    """(epochs done, steps of the next) that a checkpoint's name records, as numbers: the newest sorts last."""
    m = re.search(r"epoch_(\d+)(?:_step_(\d+))?(?:\.pt)?$", path)
    return (int(m[1]), int(m[2] or 0)) if m else (-1, -1)


def _newest_that_loads(found, state_file, run, device):
    """The newest of `found` whose state file loads; a WARNING for each that does not; one ERROR if none does."""
    failures = []
    for path in reversed(found):
        try:  # to the CPU: load_state_dict puts each tensor in place, and AdamW's step counts stay on the CPU (on
            state = torch.load(state_file(path), map_location="cpu", weights_only=True)  # GPU: a sync per parameter)
        except Exception as e:  # a damaged newest file: say so and take the previous one, never a silent fresh start
            why = " ".join(f"{type(e).__name__}: {_unpickling_error(e)}".split())[:300]
            launch.print0(f"WARNING: cannot load {path} ({why}); trying the previous checkpoint")
            failures.append(why)
            continue
        return {**_accept(path, state, run, device), "path": path}
    if failures:
        launch.fail(f"none of the {len(found)} checkpoints in {os.path.abspath(os.path.dirname(found[0]))} loads (the "
                    f"newest: {failures[0]}): this run will not start afresh over them. HINT: move them out of the "
                    "folder to start a new run, or use another --checkpoint-dir")
    return None


def _unpickling_error(error):
    """torch.load's weights_only refusal, cut to the line that names what it refused."""
    m = re.search(r"Unsupported global: GLOBAL \S+", str(error))
    return m[0] if m else str(error)


def _load_shards(engine, ckpt_dir, run, device):
    """Every rank loads its own shards of the checkpoint that the file `latest` names."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        if glob.glob(os.path.join(ckpt_dir, "epoch_*")):  # never a silent fresh start over them
            launch.fail(f"{ckpt_dir} holds checkpoints but no DeepSpeed 'latest' file: they are not from "
                        f"{run['script']}. HINT: use a new --checkpoint-dir for a different script or model")
        return None
    tag = os.path.join(ckpt_dir, open(latest).read().strip())
    shards = len(glob.glob(os.path.join(tag, "*zero_pp_rank_*_optim_states.pt")))  # one per rank (ZeRO): checked
    if shards:  # first, DeepSpeed's own error is long
        check_same_run(tag, {"world_size": shards}, run)
    try:
        path, state = engine.load_checkpoint(ckpt_dir)
        error = "DeepSpeed found nothing to load"
    except Exception as e:  # a damaged shard: say which, never start afresh over it
        path, error = None, " ".join(f"{type(e).__name__}: {e}".split())[:200]
    if path is None:
        launch.fail(f"could not load checkpoint {tag}, named by 'latest' ({error}). HINT: to go back to the previous "
                    f"one, write its name (ls {ckpt_dir}) into {latest}")
    return _accept(path, state, run, device)


def _load_dcp_state(ckpt_dir, run, device):
    """FSDP2: the newest whole DCP folder's state.pt (a folder is renamed to its name only once whole)."""
    found = sorted((p for p in glob.glob(os.path.join(ckpt_dir, "epoch_*")) if ".partial" not in p), key=_order)
    if [p for p in found if not os.path.exists(os.path.join(p, "state.pt"))]:  # never a silent fresh start over them
        launch.fail(f"{ckpt_dir} holds checkpoints that are not DCP folders of {run['script']}. HINT: use a new "
                    "--checkpoint-dir for a different script or model")
    return _newest_that_loads(found, lambda path: os.path.join(path, "state.pt"), run, device)


def load_shards(ckpt, state_dicts):
    """FSDP2: this rank's shards of checkpoint `ckpt` (load_checkpoint's) into state_dicts (get_state_dict's)."""
    from torch.distributed import checkpoint as dcp
    try:
        dcp.load(state_dicts, checkpoint_id=ckpt["path"])
    except (Exception, dcp.CheckpointException) as e:  # a damaged shard: never a fresh start over it. DCP's
        why = [f"rank {r}: {type(x).__name__}: {x}" for r, (x, _) in getattr(e, "failures", {}).items()]  # (a
        error = " ".join("; ".join(why or [f"{type(e).__name__}: {e}"]).split())[:300]  # BaseException): each rank's
        launch.fail(f"could not load checkpoint {ckpt['path']} ({error}). HINT: to go back to the previous one, move "
                    "this one out of the checkpoint folder")


def _accept(path, state, run, device):
    """Refuse another script's or another run's checkpoint; else put this rank's random state back."""
    global LOADED_OR_SAVED
    if state.get("script") != run["script"]:
        launch.fail(f"{path} was not written by {run['script']} (it is from {state.get('script', 'another script')})."
                    " HINT: use a new --checkpoint-dir for a different script or model")
    check_same_run(path, state.get("run"), run)
    if len(state.get("rng", [])) == launch.WORLD_SIZE:
        set_rng_state(state["rng"][launch.RANK], device)
    elif "rng" in state:  # another number of processes (a script whose run record allows it): they start afresh
        launch.print0(f"NOTE: {path} was saved by {len(state.get('rng', []))} processes, resumed by "
                      f"{launch.WORLD_SIZE}: the weights and optimizer state reshard, random numbers (dropout) start "
                      "afresh")
    if "global_step" in state:  # a run counted in steps (gpt_fsdp.py)
        launch.print0(f"resumed from {path}: {state['global_step']} steps done, continuing at step "
                      f"{state['global_step'] + 1}")
    else:
        steps = f" and {state['step']} steps of epoch {state['epoch'] + 1}" if state["step"] else ""
        launch.print0(f"resumed from {path}: epoch {state['epoch']} done{steps}, continuing at epoch "
                      f"{state['epoch'] + 1}")
    LOADED_OR_SAVED = True
    return state


def check_same_run(path, saved, run):
    """Refuse, in one line naming each difference and the ways out, a checkpoint that a run with other settings
    wrote."""
    if saved is None:  # a checkpoint from before runs were recorded
        return
    run = plain(run)
    changed = [key for key, value in run.items() if key in saved and saved[key] != value
               and not (key == "git_commit" and None in (saved[key], value))]
    if changed:
        why = (" (each rank's shard of the data, and the global batch, depend on the number of processes)"
               if "world_size" in changed else "")
        commit = ", or resume it with this code: --allow-commit-change" * ("git_commit" in changed)
        launch.fail(f"{path} was written by another run: {', '.join(f'{k} {saved[k]} -> {run[k]}' for k in changed)}"
                    f"{why}. HINT: rerun with the settings it was written with (these may change: --epochs, the "
                    f"output and checkpoint folders, --log-interval, ...: docs/preemption.md), or start a new run from "
                    f"its weights with --init-from {path} and a new --checkpoint-dir (a fresh optimizer, your new "
                    f"settings){commit}")


def replay_first_backward(model, loss, amp_dtype=None):
    """After a resume under DDP: one backward of loss() (a full batch) without an update, buffers and random state
    kept."""
    # DDP lays out its gradient buckets in the order the first backward pass fills them, and with more than 2 ranks
    # that changes the float summation order: the replay makes a resumed run sum exactly as the uninterrupted one.
    # Its forward runs in training mode: dropout draws random numbers, which must not shift the resumed run's
    saved = [b.clone() for b in model.buffers()]  # BatchNorm statistics
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            value = loss()
        value.backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, old in zip(model.buffers(), saved, strict=True):
            b.copy_(old)


def save_checkpoint(ckpt_dir, epoch, step, device, outputs, state, engine=None, shards=None):
    """From every rank, at `step` of `epoch` (0: its end): `state` with every rank's random state, atomically (with a
    DeepSpeed `engine`: its shards too; with `shards`, get_state_dict's of FSDP2: them too, by DCP, in a folder)."""
    global LOADED_OR_SAVED
    run_outputs.TIMES.lap("compute")
    name = f"epoch_{epoch - 1:04d}_step_{step:07d}" if step else f"epoch_{epoch:04d}"
    partial = os.path.join(ckpt_dir, f"{name}.partial")  # FSDP2's folder until it is whole
    if shards is not None and launch.RANK == 0:  # what a save killed halfway left (all_gather: no rank writes yet)
        for old in glob.glob(os.path.join(ckpt_dir, "epoch_*.partial")):
            shutil.rmtree(old, ignore_errors=True)
    state = plain({**state, "epoch": epoch - 1 if step else epoch, "step": step,
                   "rng": launch.all_gather(rng_state(device)), "tensorboard": outputs.tb_name,
                   "script": state["run"]["script"]})
    _prove_it_loads(state, device)
    if engine is not None:  # DeepSpeed: every rank its shards, in a folder. DeepSpeed's own `latest` would name it
        engine.save_checkpoint(ckpt_dir, tag=name, client_state=state, save_latest=False)  # before all are written
        for path in glob.glob(os.path.join(ckpt_dir, name, "*")):
            _fsync(path)
        dist.barrier()  # every rank's shards are on disk: only now does `latest` name them
        if launch.RANK == 0:
            write_atomic(os.path.join(ckpt_dir, "latest"), lambda tmp: pathlib.Path(tmp).write_text(name))
    elif shards is not None:  # FSDP2: every rank writes (and fsyncs) its shards, then rank 0 DCP's .metadata
        from torch.distributed import checkpoint as dcp
        dcp.save(shards, checkpoint_id=partial)  # returns once .metadata is written: every rank's files are whole
        if launch.RANK == 0:
            write_atomic(os.path.join(partial, "state.pt"), lambda tmp: torch.save(state, tmp))
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)  # saved before, by a stopped run
            os.replace(partial, os.path.join(ckpt_dir, name))  # only now does it count
    elif launch.RANK == 0:  # a crash mid-save leaves the previous checkpoint whole
        write_atomic(os.path.join(ckpt_dir, f"{name}.pt"), lambda tmp: torch.save(state, tmp))
    if launch.RANK == 0:
        _rotate(ckpt_dir, folders=engine is not None or shards is not None)
        outputs.flush()  # the curves up to the checkpoint: what a resumed run goes on from
    if launch.WORLD_SIZE > 1:
        dist.barrier()
    LOADED_OR_SAVED = True
    run_outputs.TIMES.lap("checkpoint")


def _rotate(ckpt_dir, folders):
    """Keep the KEEP newest checkpoints by the epoch and step they hold, and the newest epoch's end: a time-based
    checkpoint never pushes out the last whole epoch."""
    found = sorted((p for p in glob.glob(os.path.join(ckpt_dir, "epoch_*" if folders else "epoch_*.pt"))
                    if ".partial" not in p), key=_order)
    epoch_end = max((p for p in found if "_step_" not in os.path.basename(p)), key=_order, default=None)
    for old in found[:-KEEP]:
        if old != epoch_end:
            shutil.rmtree(old, ignore_errors=True) if folders else os.remove(old)


def _prove_it_loads(state, device):
    """At the first save: does torch.load(weights_only=True) read `state` back? If not, one ERROR now, not at the
    resume three days later."""
    global _proven
    if _proven:
        return
    why = None
    if launch.RANK == 0:  # the same structure on every rank; rank 0 tries it
        buffer = io.BytesIO()
        torch.save(_skeleton(state), buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
        except Exception as e:
            why = " ".join(f"{type(e).__name__}: {_unpickling_error(e)}".split())[:300]
    if not launch.all_ranks_ok(why is None, device):
        launch.fail(f"this run's checkpoint would not load again: torch.load(weights_only=True) refuses it ({why}). "
                    "HINT: keep what a checkpoint holds plain (numbers, strings, lists, dicts, tensors); Path, enum, "
                    "dataclass and Namespace values are converted, this type is not: convert it where the script "
                    "builds the checkpoint (e.g. an option's type=str)")
    _proven = True


def _skeleton(value):
    """`value` with every tensor emptied: what torch.load's weights_only checks, without the bytes."""
    if isinstance(value, torch.Tensor):
        return torch.empty(0, dtype=value.dtype)
    if isinstance(value, dict):
        return {k: _skeleton(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_skeleton(v) for v in value)
    return value


def write_atomic(path, write):
    """write(tmp), a temporary file's path, then fsync and rename: `path` is the old file or the new one, whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state(device):
    """This rank's random generators: torch's (on a GPU also its own: dropout there draws from it), Python's, and
    numpy's where the script uses numpy."""
    state = {"cpu": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if "numpy" in sys.modules:
        name, keys, *rest = sys.modules["numpy"].random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), *rest]
    return state


def set_rng_state(state, device):
    """Put back what rng_state saved (a checkpoint's random state of this rank)."""
    state = state if isinstance(state, dict) else {"cpu": state}  # a checkpoint from before the GPU's was saved
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def _check_writable(ckpt_dir):
    try:  # fail now, with the reason, rather than after the first epoch
        os.makedirs(ckpt_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=ckpt_dir):
            pass
    except OSError as e:
        launch.fail(f"cannot write checkpoints to {os.path.abspath(ckpt_dir)} ({e.strerror}). HINT: choose a "
                    "--checkpoint-dir you can write to")


def _has_checkpoints(ckpt_dir):
    return bool(ckpt_dir) and any(glob.glob(os.path.join(ckpt_dir, pattern)) for pattern in (
        "epoch_*", "latest", "last.ckpt"))


def init_weights(args, model):
    """--init-from PATH: its weights into `model` (before DDP, DeepSpeed or fully_shard wrap it), for a new run: a
    fresh optimizer, epoch 1, the options given now. Skipped where the checkpoint folder already holds checkpoints:
    the run resumes those (a requeue of the same command)."""
    if not args.init_from or _has_checkpoints(args.checkpoint_dir):
        return
    path = args.init_from
    try:
        weights = _weights_in(path, model)
        model.load_state_dict(weights)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        launch.fail(f"--init-from {path}: {' '.join(f'{type(e).__name__}: {_unpickling_error(e)}'.split())[:400]}. "
                    "HINT: give a run's final weights (OUTPUT_DIR/model-RUN.pt) or a checkpoint of a model with the "
                    "same layers")
    launch.print0(f"initialized from {path}: its weights, for a new run (a fresh optimizer, epoch 1, the options "
                  "given now)")


def _weights_in(path, model):
    """A state_dict for `model` from `path`: a weights file, one of our checkpoints (a file, FSDP2's DCP folder,
    DeepSpeed's folder, Lightning's .ckpt), or a checkpoint folder (its newest)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, ".metadata")):  # FSDP2: DCP reshards to the whole weights
            from torch.distributed import checkpoint as dcp
            weights = model.state_dict()
            alone = {"no_dist": True} if "no_dist" in inspect.signature(dcp.load).parameters else {}  # torch >= 2.7
            dcp.load({"model": weights}, checkpoint_id=path, **alone)  # (older: on every rank of the group)
            return weights
        if os.path.exists(os.path.join(path, "latest")):  # DeepSpeed's folder: the checkpoint `latest` names
            path = os.path.join(path, open(os.path.join(path, "latest")).read().strip())
        models = glob.glob(os.path.join(path, "mp_rank_00_model_states.pt"))  # a DeepSpeed checkpoint
        found = models or sorted(glob.glob(os.path.join(path, "epoch_*")), key=_order) or glob.glob(
            os.path.join(path, "last.ckpt"))
        if not found:
            raise FileNotFoundError(f"no weights or checkpoint found in {path}")
        return _weights_in(found[-1], model)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for key in ("model", "state_dict", "module"):  # ours, Lightning's, DeepSpeed's
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    names = set(model.state_dict())
    for prefix in sorted({k.split(".", 1)[0] + "." for k in state} if set(state) != names else []):
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}  # Lightning's "net.",
        if set(stripped) == names:  # DDP's "module.", torch.compile's "_orig_mod."
            return stripped
    return state
