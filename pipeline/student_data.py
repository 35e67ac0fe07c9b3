"""The student's training batches: prepared windows joined with cache rows, in the loop's order.

Order (a function of the seed and the epoch only, see :func:`block_shuffled_order`): the training
windows are cut into blocks of ``block`` consecutive windows (by default one inner chunk of the
cache, so that a block is one decoded chunk); the blocks are permuted, and then the windows are
permuted inside each buffer of ``buffer_blocks`` consecutive blocks of that permutation. A global
batch therefore draws from about ``buffer_blocks`` chunks instead of ``batch_size`` scattered ones
(zarr decodes a whole chunk to read one window), and every window is still visited once per
epoch. ``block = 1`` and ``buffer_blocks >= N`` give a uniform permutation.

The shared loop (:func:`logitcache.pipeline.training.train_model`) slices this order into global
batches, ranks and micro-batches exactly as for the teachers, so resume and DDP semantics are
unchanged. :class:`StudentBatches` is the loop's batch source: when the loop starts (its
``on_start`` hook) it knows the whole remaining schedule of this rank, and a DataLoader with
worker processes reads it ahead: one work item is a group of consecutive micro-batches, read
with one cache call (each chunk the group touches is decoded once), pinned when training on CUDA.
Every batch handed to the loop is checked against the indices the loop asks for.

Batch dict (CPU, then moved to the device by the loop's ``get_batch`` call)::

    window_indices   (B,)           int64  rows of the train split (= rows of the cache)
    input_ids        (B, T)         int64
    teacher_ids      (B, T - 1, k)  int64  cache entries of positions 0..T-2: the teacher's
    teacher_weights  (B, T - 1, k)  float32  distribution of tokens 1..T-1 (the targets);
    teacher_tail     (B, T - 1)     float32  the last position's entries are not needed
                                             (tail only with tail = "ghost")
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from logitcache.cache import CacheReader, decode_entries, open_cache
from logitcache.cache.encoding import DecodedEntries
from logitcache.pipeline.errors import StageError
from logitcache.pipeline.training import TrainPlan, TrainState, step_micro_batches

OrderFn = Callable[[int, int, int], torch.Tensor]


def block_shuffled_order(
    num_windows: int, seed: int, epoch: int, *, block: int, buffer_blocks: int
) -> torch.Tensor:
    """A permutation of ``range(num_windows)``: blocks permuted, then windows within buffers of blocks.

    ``perm_blocks = randperm(ceil(N / block))``; ``order = concat(windows of each block in that
    order)``; then each run of ``block * buffer_blocks`` consecutive entries of ``order`` is permuted
    by its own ``randperm``. One generator seeded from ``(seed, epoch)`` draws everything, so the
    result depends on nothing else.
    """
    if block < 1 or buffer_blocks < 1:
        raise StageError(f"Expected block >= 1 and buffer_blocks >= 1. Got {block} and {buffer_blocks}.")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    num_blocks = -(-num_windows // block)
    block_perm = torch.randperm(num_blocks, generator=generator)  # (blocks,)
    starts = block_perm * block  # (blocks,)
    offsets = torch.arange(block)  # (block,)
    windows = (starts[:, None] + offsets[None, :]).flatten()  # (blocks * block,)
    windows = windows[windows < num_windows]  # the last block may be short
    sizes = (torch.clamp(num_windows - starts, max=block)).tolist()  # windows of each block, in order
    pieces = []
    position = 0
    for first in range(0, num_blocks, buffer_blocks):
        span = sum(sizes[first : first + buffer_blocks])
        piece = windows[position : position + span]  # whole blocks only
        pieces.append(piece[torch.randperm(span, generator=generator)])
        position += span
    return torch.cat(pieces)


def make_order_fn(*, block: int, buffer_blocks: int) -> OrderFn:
    def order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
        return block_shuffled_order(num_windows, seed, epoch, block=block, buffer_blocks=buffer_blocks)

    return order


def micro_batch_schedule(
    plan: TrainPlan, state: TrainState, *, order_fn: OrderFn, seed: int, rank: int, world_size: int
) -> Iterator[torch.Tensor]:
    """The window indices of every micro-batch this rank will ask for from ``state`` on, in order.

    Mirrors the loop of ``train_model``: epochs from ``state.epoch``, optimizer steps from
    ``state.step_in_epoch`` (then 0), until ``plan.total_steps``; each step split by
    :func:`~logitcache.pipeline.training.step_micro_batches`.
    """
    epoch, step_in_epoch, global_step = state.epoch, state.step_in_epoch, state.global_step
    while global_step < plan.total_steps:
        order = order_fn(plan.num_windows, seed, epoch)
        while step_in_epoch < plan.steps_per_epoch and global_step < plan.total_steps:
            yield from step_micro_batches(order, step_in_epoch, plan, rank=rank, world_size=world_size)
            step_in_epoch += 1
            global_step += 1
        if step_in_epoch >= plan.steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0


@dataclass(frozen=True)
class BatchReader:
    """Reads batches directly: tokens from the windows array, teacher entries from the cache.

    Picklable (DataLoader workers get a copy); each process opens its own cache reader.
    """

    windows: np.ndarray  # (N, T) the train split, in its stored integer dtype
    cache_store: Path | None  # None: no teacher entries (modes "online" and "ce")
    weights: str = "renormalized"  # or "ghost": raw top-k probabilities + tail

    def _reader(self) -> CacheReader:
        key = (os.getpid(), str(self.cache_store))
        reader = _READERS.get(key)
        if reader is None:
            reader = _READERS[key] = open_cache(self.cache_store)  # type: ignore[arg-type]
        return reader

    def read(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch for window ``indices`` (B,), as documented in the module docstring."""
        return self.read_many([indices])[0]

    def read_many(self, parts: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Batches for several index tensors, with one cache read for all of them."""
        every = torch.cat(parts)  # (sum B,)
        tokens = torch.from_numpy(self.windows[every.numpy()].astype(np.int64))  # (sum B, T)
        cache = None
        if self.cache_store is not None:
            cache = self._read_cache_rows(every.numpy())
        batches = []
        start = 0
        for part in parts:
            stop = start + part.numel()
            batch = {"window_indices": part.clone(), "input_ids": tokens[start:stop]}
            if cache is not None:
                batch["teacher_ids"] = torch.from_numpy(cache.ids[start:stop, :-1].copy())  # (B, T-1, k)
                batch["teacher_weights"] = torch.from_numpy(
                    cache.weights[start:stop, :-1].copy()
                )  # (B, T-1, k)
                if cache.tail is not None:
                    batch["teacher_tail"] = torch.from_numpy(cache.tail[start:stop, :-1].copy())  # (B, T-1)
            batches.append(batch)
            start = stop
        return batches

    def _read_cache_rows(self, rows: np.ndarray) -> DecodedEntries:
        """Decoded cache entries of ``rows`` (any order), read as contiguous runs of whole chunks.

        Same result as ``CacheReader.read_windows(rows)``, but zarr reads slices several times
        faster than integer (orthogonal) selections, and only the wanted rows are decoded.
        """
        reader = self._reader()
        chunk = reader.layout.windows_per_chunk
        blocks = np.unique(rows // chunk)  # chunks touched, ascending
        runs = np.split(blocks, np.flatnonzero(np.diff(blocks) != 1) + 1)  # consecutive chunks
        covered, raws = [], []
        for run in runs:
            start, stop = int(run[0]) * chunk, min((int(run[-1]) + 1) * chunk, reader.num_windows)
            covered.append(np.arange(start, stop))
            raws.append(reader.read_raw(slice(start, stop)))
        where = np.searchsorted(np.concatenate(covered), rows)  # (R,) row of each wanted window
        raw = {name: np.concatenate([r[name] for r in raws])[where] for name in raws[0]}
        return decode_entries(
            raw["ids"], raw["values"], raw.get("tail"), reader.metadata, weights=self.weights
        )


_READERS: dict[tuple[int, str], CacheReader] = {}


class _GroupDataset(Dataset):
    """Item ``g`` = the batches of micro-batch group ``g`` of the schedule (a list of dicts)."""

    def __init__(self, reader: BatchReader, groups: list[list[torch.Tensor]]):
        self.reader = reader
        self.groups = groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[dict[str, torch.Tensor]]:
        return self.reader.read_many(self.groups[index])


class StudentBatches:
    """The batch source of the student's loop (``get_batch`` and ``on_start`` of ``train_model``).

    ``group_windows``: windows per DataLoader work item on this rank (read with one cache call).
    ``workers = 0`` reads in the training process (no prefetch).
    """

    def __init__(
        self,
        reader: BatchReader,
        *,
        order_fn: OrderFn,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        prefetch_factor: int,
        group_windows: int,
        pin_memory: bool,
    ):
        self.reader = reader
        self.order_fn = order_fn
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.workers = workers
        self.prefetch_factor = prefetch_factor
        self.group_windows = group_windows
        self.pin_memory = pin_memory
        self._groups: Iterator[list[dict[str, torch.Tensor]]] | None = None
        self._pending: deque[dict[str, torch.Tensor]] = deque()
        self.direct_reads = 0  # batches read outside the schedule (should stay 0 in training)

    def start(self, plan: TrainPlan, state: TrainState) -> None:
        """Plan the reads of the rest of training from ``state`` on and start the workers."""
        self.close()
        schedule = list(
            micro_batch_schedule(
                plan,
                state,
                order_fn=self.order_fn,
                seed=self.seed,
                rank=self.rank,
                world_size=self.world_size,
            )
        )
        per_group = max(1, self.group_windows // max(plan.micro_batch, 1))
        groups = [schedule[i : i + per_group] for i in range(0, len(schedule), per_group)]
        if not groups:
            return
        loader = DataLoader(
            _GroupDataset(self.reader, groups),
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            prefetch_factor=self.prefetch_factor if self.workers > 0 else None,
            pin_memory=self.pin_memory,
        )
        self._groups = iter(loader)

    def __call__(self, indices: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        batch = self._next_planned()
        if batch is None or not torch.equal(batch["window_indices"], indices):
            # Not what was planned (used outside train_model, or a schedule bug): read it directly.
            self.direct_reads += 1
            self.close()
            batch = self.reader.read(indices)
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

    def _next_planned(self) -> dict[str, torch.Tensor] | None:
        if not self._pending and self._groups is not None:
            group = next(self._groups, None)
            if group is None:
                self._groups = None
            else:
                self._pending.extend(group)
        return self._pending.popleft() if self._pending else None

    def close(self) -> None:
        """Stop the workers (if any) and drop what was read ahead."""
        self._groups = None  # the DataLoader iterator shuts its workers down when collected
        self._pending.clear()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """The planned batches in order (CPU; for tests and benchmarks of the loader alone)."""
        while (batch := self._next_planned()) is not None:
            yield batch


def default_block(num_windows: int, seq_len: int, k: int) -> int:
    """Windows per shuffle block when not configured: the inner chunk size of a default cache layout."""
    from logitcache.cache import default_layout

    return default_layout(num_windows=num_windows, seq_len=seq_len, k=k).windows_per_chunk
