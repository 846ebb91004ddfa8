"""Training batches whose position is saved in checkpoints, so a resumed run continues exactly.

`ResumableLoader` is what both data modules return from `train_dataloader()`. It has `state_dict()` /
`load_state_dict()`, which Lightning (>= 2.1) saves in every checkpoint and restores on
`--ckpt_path` (the fit loop's "combined_loader" state). For map-style datasets:

- the order of an epoch is a permutation drawn from (seed, epoch) alone, cut into *global* batches
  of `batch_size * world_size`; rank r of W processes takes items r, r+W, ... of each global batch, so
  W processes with `batch_size` each train on exactly the samples of one process with `batch_size * W`;
- every sample is loaded with the torch / numpy / random generators seeded from (seed, epoch, index),
  so its random augmentation does not depend on the worker that loads it or on where a run resumed;
- the saved state is (epoch, batches of that epoch already trained); on resume the sampler starts at
  the next batch. Exact with any number of DataLoader workers (batches arrive in sampler order).

For iterable datasets (webdataset shards) the state is the number of batches trained in the current
pass. A deterministic stream (shards read in order without a shuffle buffer: `resampled: false`,
`shuffle_buffer: 0`, same number of workers) resumes exactly: the loader reads and drops that many
batches of a fresh stream (decoding them again, so a resume late in a long pass takes that long), and
each sample's augmentation is seeded from (seed, pass, worker, position in the worker's stream). A
shuffled or resampled stream cannot be replayed (webdataset seeds its shuffle buffer and shard
resampling from the process id and the clock): it continues on a fresh stream with a warning. For a
resampled (endless) stream that is just another random draw; for a shuffled finite pass it means the
rest of the pass reads the whole pass again, so samples trained before the resume point can come again.

    loader = ResumableLoader(dataset, batch_size=32, seed=0, collate_fn=collate_images)
    state = loader.state_dict()          # {"epoch": 0, "position": 17, ...}
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The 63-bit seed of sample `index` in `epoch` (numpy SeedSequence of the three numbers)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with torch (CPU), numpy and python `random` seeded to `seed`; restore their states after."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    # the CPU generator only: torch.manual_seed would also queue a CUDA reseed (with a stack trace, ~1 ms per
    # sample on a CPU machine) and reseed the training GPU's generators without restoring them
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class SeededSamples(Dataset):
    """`dataset[(epoch, index)]` = `base[index]` loaded with every generator seeded from (seed, epoch, index)."""

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_rng(sample_seed(self.seed, epoch, index)):
            return self.base[index]


class SeededStream(IterableDataset):
    """Iterates `base` drawing each sample with every generator seeded from (seed, epoch, worker, position).

    `next()` on a webdataset pipeline decodes and augments the next sample, so its augmentation is
    fixed by where it sits in this worker's stream, not by the process state or the resume point.
    """

    def __init__(self, base: IterableDataset, seed: int) -> None:
        self.base, self.seed, self.epoch = base, seed, 0

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        stream = (self.seed, self.epoch, 0 if info is None else info.id)
        samples = iter(self.base)
        position = 0
        while True:
            with seeded_rng(sample_seed(stream[0], stream[1] * 4096 + stream[2], position)):
                try:
                    item = next(samples)
                except StopIteration:
                    return
            position += 1
            yield item


class GlobalBatchSampler:
    """Batches of (epoch, index) for one rank: rank r takes items r::world_size of each global batch.

    Args:
        length: number of samples in the dataset.
        batch_size: samples per batch on one rank (global batch = batch_size * world_size).
        seed: the permutation of epoch e is drawn from a generator seeded with seed + e.
        shuffle: False keeps the dataset order.
        drop_last: drop the last incomplete global batch (else it is split as evenly as it goes, and
            dropped only when it has fewer samples than processes).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, length: int, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler: rank {rank} is outside world_size {world_size}.")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.global_batch = batch_size * world_size
        if len(self) == 0:
            raise ValueError(f"{length} samples give no batch of {self.global_batch} (batch_size {batch_size} x "
                             f"{world_size} processes); lower data.batch_size or use more samples.")
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.global_batch)
        # a last partial global batch is kept only when every rank gets at least one sample of it
        return full + int(not self.drop_last and rest >= self.world_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch` (the same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.length)
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch))

    def batch(self, epoch: int, number: int, order: torch.Tensor | None = None) -> list[tuple[int, int]]:
        """Batch `number` of `epoch` on this rank, as (epoch, index) pairs."""
        order = self.order(epoch) if order is None else order
        chunk = order[number * self.global_batch:(number + 1) * self.global_batch]
        return [(epoch, int(i)) for i in chunk[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, order = self.epoch, self.order(self.epoch)
        for number in range(self.start, len(self)):
            yield self.batch(epoch, number, order)


class ResumableLoader:
    """Training batches with a saved position (see the module docstring).

    Args:
        dataset: a map-style dataset (sized) or an IterableDataset.
        batch_size: samples per batch on one process.
        seed: seed of the epoch permutations and of the per-sample augmentation generators.
        shuffle: shuffle map-style datasets each epoch.
        drop_last: drop the last incomplete global batch of map-style datasets.
        num_workers, collate_fn, pin_memory: as for torch's DataLoader (workers persist across epochs).
        rank, world_size: this process and the number of processes (data-parallel training).
        consumed: for iterable datasets, a function giving the batches the trainer has taken in this
            pass (Lightning fetches one batch ahead of training on unsized loaders).
        replay: for iterable datasets, resume by reading and dropping the batches already trained in
            the pass (right for deterministic streams); False starts a fresh stream and keeps counting
            (for shuffled or resampled streams, whose order a replay would not reproduce anyway).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 num_workers: int = 0, collate_fn: Callable | None = None, pin_memory: bool = False,
                 rank: int = 0, world_size: int = 1, consumed: Callable[[], int] | None = None,
                 replay: bool = True) -> None:
        self.iterable = isinstance(dataset, IterableDataset)
        self.consumed, self.replay = consumed, replay
        # worker base seeds come from a generator of their own, not from the global one: sample
        # randomness is seeded per sample anyway, and training randomness (dropout) stays independent
        # of when workers start (a resumed run starts them at another point than the original run)
        common = {"num_workers": num_workers, "collate_fn": collate_fn, "pin_memory": pin_memory,
                  "persistent_workers": num_workers > 0, "generator": torch.Generator().manual_seed(seed)}
        if self.iterable:
            # workers restart each pass so that they see the pass number (`epoch`) of the stream
            self.batch_sampler, self.stream = None, SeededStream(dataset, seed)
            self.loader = DataLoader(self.stream, batch_size=batch_size, **{**common, "persistent_workers": False})
        else:
            self.batch_sampler = GlobalBatchSampler(len(dataset), batch_size, seed, shuffle, drop_last, rank, world_size)
            self.loader = DataLoader(SeededSamples(dataset, seed), batch_sampler=self.batch_sampler, **common)
        self.epoch, self.position = 0, 0
        self.last_ids: list[tuple[int, int]] = []
        self._resumed = False
        self._pass_done, self._pass_yielded = False, 0

    @property
    def sampler(self) -> ResumableLoader:
        """Lightning calls `sampler.set_epoch(epoch)` on train loaders at each epoch start."""
        return self

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._resumed = epoch, 0, False

    def __len__(self) -> int:
        if self.batch_sampler is None:
            raise TypeError("a ResumableLoader over an IterableDataset has no length")
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        if not self._resumed:
            self.position = 0
        self._resumed = False
        start, epoch = self.position, self.epoch
        if self.batch_sampler is not None:
            self.batch_sampler.epoch, self.batch_sampler.start = epoch, start
            order = self.batch_sampler.order(epoch)
            for number, batch in enumerate(self.loader, start):
                self.last_ids = self.batch_sampler.batch(epoch, number, order)
                self.position = number + 1
                yield batch
        else:
            self.stream.epoch = epoch
            self._pass_done = False
            batches = iter(self.loader)
            if start and not self.replay:
                warnings.warn(f"Resuming a shuffled or resampled shard stream after {start} batches of this pass: "
                              "training continues on a fresh stream (the sample order is not reproduced; use "
                              "shards read in order without a shuffle buffer for an exact resume).", stacklevel=2)
            for _ in range(start if self.replay else 0):  # replay: drop the batches already trained in this pass
                next(batches)
            for batch in batches:
                self.position += 1
                self.last_ids = []
                yield batch
            self._pass_done, self._pass_yielded = True, self.position
        self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        if self.iterable and self.consumed is not None:
            # the trainer may hold a batch fetched ahead (and may have seen the pass end): count what it took
            taken = self.consumed()
            if self._pass_done:
                yielded, epoch = self._pass_yielded, self.epoch - 1
                if taken >= yielded:
                    return {"epoch": self.epoch, "position": 0, "iterable": True}
                return {"epoch": epoch, "position": taken, "iterable": True}
            return {"epoch": self.epoch, "position": taken, "iterable": True}
        return {"epoch": self.epoch, "position": self.position, "iterable": self.iterable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state.get("iterable")) != self.iterable:
            kinds = {True: "an iterable (shard) dataset", False: "a map-style dataset"}
            raise ValueError(f"The checkpoint's data position is for {kinds[bool(state.get('iterable'))]} but this run "
                             f"trains on {kinds[self.iterable]}; resume with the same data config.")
        self.epoch, self.position, self._resumed = int(state["epoch"]), int(state["position"]), True


def run_seed(seed: int | None) -> int:
    """`seed`, else the run's seed_everything value (Lightning's PL_GLOBAL_SEED), else 0."""
    if seed is not None:
        return seed
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def deterministic_stream(source: Any) -> bool:
    """Whether a shard source reads the same samples in the same order every pass (no resampling, no
    shuffle buffer): then a resume replays its stream to the saved position."""
    return not (getattr(source, "resampled", False) or getattr(source, "shuffle_buffer", 0))


def trainer_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """(global rank, world size) of the trainer a data module is attached to; (0, 1) without one."""
    if trainer is None:
        return 0, 1
    return int(trainer.global_rank), int(trainer.world_size)


def consumed_batches(trainer: L.Trainer | None) -> Callable[[], int] | None:
    """A function giving the batches the trainer has taken in the current epoch (for iterable datasets)."""
    if trainer is None:
        return None
    return lambda: int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)


def rng_state() -> dict[str, Any]:
    """The main process's torch / numpy / random states, as tensors and ints (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
            "random": [int(version), list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], has_gauss, gauss))
    version, internal, gauss_next = state["random"]
    random.setstate((version, tuple(internal), gauss_next))


class CountedResumableData(L.LightningDataModule):
    """What both packages' data modules share: the skip summary at the end of fit (`self.skips`, a
    distill.common.skips.DataSkips) and the main process's random generators in every checkpoint."""

    def teardown(self, stage: str) -> None:
        if stage == "fit" and (self.trainer is None or self.trainer.is_global_zero):
            print(self.skips.summary(), flush=True)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the main process's random generators (the data position is saved by Lightning)."""
        return {"rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "rng" in state:
            set_rng_state(state["rng"])


class RecordSampleIds(L.Callback):
    """Append, for every training batch, `global_step epoch:index ...` to a text file (one file per rank).

    An audit of what a run trained on (tests use it to check that a resumed run repeats and skips nothing).

    Args:
        path: the file; rank r > 0 writes to `path.rank<r>`.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        if not isinstance(loader, ResumableLoader):
            return
        path = Path(self.path if trainer.global_rank == 0 else f"{self.path}.rank{trainer.global_rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = " ".join(f"{e}:{i}" for e, i in loader.last_ids)
        with open(path, "a") as f:
            f.write(f"{trainer.global_step} {ids}\n")
