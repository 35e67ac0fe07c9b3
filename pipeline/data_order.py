"""The order of the training data, for teachers and students alike: orders, sampler, loader.

The training loop (:func:`logitcache.pipeline.training.train_model`) owns the order. Epoch ``e``
visits the ``N`` training windows in ``order(N, seed, e)``, a permutation: :func:`epoch_order`
(uniform, the teachers') or :func:`block_shuffled_order` (chunk-local, the student's, so that its
cache reads stay cheap). :class:`MicroBatchSampler` slices that order exactly as the loop's
docstring says: optimizer step ``s`` takes the global batch ``order[s*B:(s+1)*B]``, rank ``r`` of
``W`` takes the ``r``-th contiguous slice of it, split into ``grad_accum_steps`` micro-batches.
Like torch's ``DistributedSampler`` it is keyed by (seed, epoch, rank) and moved on with
:meth:`MicroBatchSampler.set_epoch`, which also takes the step to start from: a resumed run asks
for the rest of the same sequence by position, nothing is predicted or replayed.

:func:`make_loader` is the one DataLoader over such a sampler: every item it yields is one
micro-batch, read by the dataset's ``__getitems__`` in one call (a dict of batched CPU tensors;
:class:`WindowsDataset` for the teachers, ``StudentDataset`` in pipeline/student_data.py for the
student), by ``workers`` processes when > 0, pinned when training on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from logitcache.pipeline.errors import ConfigError, StageError

# The visiting order of epoch `epoch`: a permutation of range(num_windows) from (num_windows, seed, epoch).
OrderFn = Callable[[int, int, int], torch.Tensor]
# One micro-batch as the loop's datasets return it: name -> batched CPU tensor (B, ...).
Batch = dict[str, torch.Tensor]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """A uniform permutation of ``range(num_windows)``, a function of ``(seed, epoch)`` only."""
    return torch.randperm(num_windows, generator=_epoch_generator(seed, epoch))  # (N,)


def block_shuffled_order(
    num_windows: int, seed: int, epoch: int, *, block: int, buffer_blocks: int
) -> torch.Tensor:
    """A permutation of ``range(num_windows)``: blocks permuted, then windows within buffers of blocks.

    ``perm_blocks = randperm(ceil(N / block))``; ``order = concat(windows of each block in that
    order)``; then each run of ``block * buffer_blocks`` consecutive entries of ``order`` is permuted
    by its own ``randperm``. One generator seeded from ``(seed, epoch)`` draws everything, so the
    result depends on nothing else. With ``block`` = one inner chunk of the cache, a global batch
    draws from about ``buffer_blocks`` chunks instead of ``batch_size`` scattered ones (zarr
    decompresses a whole chunk to read one window), and every window is still visited once per
    epoch. ``block = 1`` and ``buffer_blocks >= N`` give a uniform permutation.
    """
    if block < 1 or buffer_blocks < 1:
        raise StageError(f"Expected block >= 1 and buffer_blocks >= 1. Got {block} and {buffer_blocks}.")
    generator = _epoch_generator(seed, epoch)
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


def make_block_order(*, block: int, buffer_blocks: int) -> OrderFn:
    """:func:`block_shuffled_order` with its block settings bound, as an :data:`OrderFn`."""

    def order(num_windows: int, seed: int, epoch: int) -> torch.Tensor:
        return block_shuffled_order(num_windows, seed, epoch, block=block, buffer_blocks=buffer_blocks)

    return order


@dataclass(frozen=True)
class BatchGeometry:
    """How ``num_windows`` training windows split into optimizer steps and per-rank micro-batches."""

    steps_per_epoch: int  # whole global batches per epoch (the windows past the last are not visited)
    micro_batch: int  # windows per rank per micro-step

    @classmethod
    def of(
        cls, num_windows: int, batch_size: int, *, world_size: int = 1, grad_accum_steps: int = 1
    ) -> BatchGeometry:
        if batch_size < 1 or grad_accum_steps < 1 or batch_size % (world_size * grad_accum_steps):
            raise ConfigError(
                f"Expected batch_size ({batch_size}) divisible by world size ({world_size}) x "
                f"grad_accum_steps ({grad_accum_steps})."
            )
        return cls(
            steps_per_epoch=num_windows // batch_size,
            micro_batch=batch_size // (world_size * grad_accum_steps),
        )


class MicroBatchSampler(Sampler[list[int]]):
    """The micro-batches of one rank, in the loop's order, for one epoch from a given step on.

    Yields lists of window indices of ``batch_size / (world_size * grad_accum_steps)`` windows:
    for each optimizer step ``s`` in ``[start_step, stop_step)`` of epoch ``epoch``, the
    ``grad_accum_steps`` micro-batches of this rank's slice of ``order[s*B:(s+1)*B]``. Windows
    past the last whole global batch of an epoch are not visited in that epoch.
    """

    def __init__(
        self,
        num_windows: int,
        *,
        batch_size: int,
        seed: int,
        order: OrderFn = epoch_order,
        grad_accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        geometry = BatchGeometry.of(
            num_windows, batch_size, world_size=world_size, grad_accum_steps=grad_accum_steps
        )
        if not 0 <= rank < world_size:
            raise ConfigError(f"Expected 0 <= rank < world_size. Got rank {rank}, world_size {world_size}.")
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.seed = seed
        self.order = order
        self.grad_accum_steps = grad_accum_steps
        self.rank = rank
        self.world_size = world_size
        self.steps_per_epoch = geometry.steps_per_epoch
        self.micro_batch = geometry.micro_batch
        self.epoch = 0
        self.start_step = 0
        self.stop_step = self.steps_per_epoch

    def set_epoch(self, epoch: int, *, start_step: int = 0, stop_step: int | None = None) -> None:
        """Visit epoch ``epoch`` from optimizer step ``start_step`` to ``stop_step`` (default: its end)."""
        stop = self.steps_per_epoch if stop_step is None else stop_step
        if not 0 <= start_step <= stop <= self.steps_per_epoch:
            raise StageError(
                f"Expected 0 <= start_step <= stop_step <= {self.steps_per_epoch} (steps per epoch). "
                f"Got {start_step} and {stop}."
            )
        self.epoch, self.start_step, self.stop_step = epoch, start_step, stop

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.num_windows, self.seed, self.epoch)  # (N,)
        for step in range(self.start_step, self.stop_step):
            global_batch = order[step * self.batch_size : (step + 1) * self.batch_size]  # (B,)
            local = global_batch.view(self.world_size, -1)[self.rank]  # (B / W,)
            for micro in local.split(self.micro_batch):  # (B / (W * accum),) each
                yield micro.tolist()

    def __len__(self) -> int:
        return (self.stop_step - self.start_step) * self.grad_accum_steps


class WindowsDataset(Dataset[Batch]):
    """Training windows as the loop's dataset (the teachers'): item ``i`` = ``{"input_ids": (T,)}``.

    ``__getitems__`` reads a whole micro-batch: ``{"input_ids": (B, T) int64}``.
    """

    def __init__(self, windows: np.ndarray):
        self.windows = windows  # (N, T) the train split, in its stored integer dtype

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, index: int) -> Batch:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        rows = np.asarray(indices, dtype=np.int64)  # (B,)
        return {"input_ids": torch.from_numpy(self.windows[rows].astype(np.int64))}  # (B, T)


def _whole_batch(batch: Batch) -> Batch:
    """The loader's collate function: ``__getitems__`` already returns the batched dict."""
    return batch


AUTO_WORKERS_MAX = 4


def loader_workers(setting: int | Literal["auto"], device: torch.device) -> int:
    """The DataLoader worker count for ``setting`` (``student.loader.workers``) when training on ``device``.

    An integer is used as given. ``"auto"``: 0 on the CPU, where the reads cost ~2 % of a step and
    workers would compete with the training threads for the cores (docs/benchmarks.md); on a GPU
    ``min(4, cores - 1)`` with ``cores`` the CPU cores available to each process of this node
    (``LOCAL_WORLD_SIZE`` processes under torchrun): there a step takes milliseconds and a read in
    the training process would leave the GPU idle while it decodes (on an H200 it halved the
    cache student's tokens/s against its CE twin, docs/benchmarks.md, GPU).
    """
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(AUTO_WORKERS_MAX, per_process - 1))


def make_loader(
    dataset: Dataset[Batch],
    sampler: MicroBatchSampler,
    *,
    workers: int,
    prefetch_factor: int,
    pin_memory: bool,
) -> DataLoader[Batch]:
    """The DataLoader of the training loop: one micro-batch per item, in ``sampler``'s order.

    Workers stay alive across epochs (``set_epoch`` between epochs takes effect at the next
    ``iter``). The loader gets its own generator, so that creating iterators never draws from
    torch's global RNG, which the checkpoints save and restore (exact resume).
    """
    if workers < 0 or prefetch_factor < 1:
        raise ConfigError(
            f"Expected workers >= 0 and prefetch_factor >= 1. Got {workers} and {prefetch_factor}."
        )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_whole_batch,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(sampler.seed),
    )
