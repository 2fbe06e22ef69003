"""Data from a Dataset of your own: a DataLoader over this rank's share of it, which resumes mid-epoch exactly and whose
workers outlive the stop signals. Three things make that so:
- the sampler hands out (epoch, index) keys, and before dataset[index] the worker seeds torch's, Python's and numpy's
  random generators from (seed, epoch, index): a random crop draws the same in a resumed epoch, with any number of
  workers, and whichever worker gets the sample;
- the loader draws nothing from the training process's own random generator (torch's DataLoader draws a seed from it
  at every epoch's start), which would shift dropout's numbers after a resume;
- Slurm signals every process of a job step, DataLoader workers too, and a worker that dies of SIGTERM (or of SIGUSR1,
  whose default action ends a process) takes its rank with it; under forkserver, so does the server the workers are
  forked from (a worker whose parent is gone exits). The workers, and the processes multiprocessing starts for them,
  start with the stop signals blocked (fork, forkserver and spawn each inherit the mask), and ignore them from their
  first line on, before your own worker_init_fn runs."""
import contextlib
import random
import signal
import multiprocessing
import sys
from multiprocessing import resource_tracker

import torch

from . import hangs, launch, stopping


class DataLoader(torch.utils.data.DataLoader):
    """torch's DataLoader over this rank's share of `dataset`. shuffle=True (training): a disjoint 1/world_size of the
    samples, reshuffled each epoch, whole batches only, so every rank takes as many steps; before each epoch call
    set_epoch(epoch, skip), skip being the batches a mid-epoch checkpoint already holds. shuffle=False (evaluation):
    samples rank, rank + world_size, ..., each once. Other arguments go to torch's DataLoader (num_workers,
    worker_init_fn, multiprocessing_context, pin_memory, ...)."""

    def __init__(self, dataset, batch_size, seed=0, shuffle=True, worker_init_fn=None, **kwargs):
        self.shard = ShardSampler(len(dataset), batch_size, seed, shuffle)
        super().__init__(_Seeded(dataset, seed), batch_size, sampler=self.shard, drop_last=shuffle,
                         worker_init_fn=_WorkerInit(worker_init_fn), generator=torch.Generator(), **kwargs)

    def set_epoch(self, epoch, skip=0):
        """Before each epoch: its shuffle, and the batches to skip (a resume from the middle of it)."""
        self.shard.set_epoch(epoch, skip)

    def __iter__(self):  # new workers (each epoch, or once with persistent_workers) start with the stop signals blocked
        signals = [*stopping.STOP_SIGNALS, hangs.DUMP_SIGNAL]
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:  # a signal that comes meanwhile waits, and reaches the training process once unblocked
            context = self.multiprocessing_context or multiprocessing.get_context()
            if self.num_workers and context.get_start_method() != "fork":  # forkserver and spawn start a resource
                resource_tracker.ensure_running()  # tracker first, which then unblocks SIGTERM: started now, with our
                signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # mask, and blocked again
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


class ShardSampler(torch.utils.data.Sampler):
    """This rank's (epoch, index) keys: shuffled, as torch's DistributedSampler shuffles (a permutation seeded by seed +
    epoch, dealt out rank by rank, cut to whole batches on every rank); or not, rank, rank + world_size, ..."""

    def __init__(self, size, batch_size, seed, shuffle):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch, self.skip = 0, 0
        self.rank, self.world_size = launch.RANK, launch.WORLD_SIZE  # process_group (or Lightning's started) set them

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip * self.batch_size

    def __len__(self):  # a whole epoch's, also when resumed in its middle: the loop counts its steps from it
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world_size))
        return self.size // self.world_size // self.batch_size * self.batch_size

    def __iter__(self):
        if not self.shuffle:
            return ((self.epoch, i) for i in range(self.rank, self.size, self.world_size))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        mine = order[self.rank:self.world_size * (self.size // self.world_size):self.world_size][:len(self)]
        return ((self.epoch, i) for i in mine[self.skip:])


class _Seeded(torch.utils.data.Dataset):
    """dataset[i] for key (epoch, i), its random draws seeded from (seed, epoch, i)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        if torch.utils.data.get_worker_info() is None:  # num_workers=0: in the training process, whose own random
            with _kept_random_states():  # state stays as it was
                return self._get(epoch, i)
        return self._get(epoch, i)

    def _get(self, epoch, i):
        seed = hash((self.seed, epoch, i)) % 2**32  # ints hash the same in every process and run
        torch.manual_seed(seed)
        random.seed(seed)
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed(seed)
        return self.dataset[i]


@contextlib.contextmanager
def _kept_random_states():
    """torch's, Python's and numpy's global random states, as they were before the block."""
    np = sys.modules.get("numpy")
    states = random.getstate(), np.random.get_state() if np else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(states[0])
        if np:
            np.random.set_state(states[1])


class _WorkerInit:
    """A worker's first call: ignore the stop signals, then the user's own worker_init_fn (a class, not a closure:
    forkserver and spawn pickle it)."""

    def __init__(self, user_fn):
        self.user_fn = user_fn

    def __call__(self, worker_id):
        stopping.ignore_stop_signals()
        if self.user_fn is not None:
            self.user_fn(worker_id)
