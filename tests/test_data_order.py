"""The loop's data order: orders, the micro-batch sampler and the loader (no models, no cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from logitcache.pipeline.data_order import (
    MicroBatchSampler,
    WindowsDataset,
    block_shuffled_order,
    epoch_order,
    loader_workers,
    make_block_order,
    make_loader,
)
from logitcache.pipeline.errors import ConfigError, StageError

N = 203  # odd: not a multiple of any batch or block size, so the last windows are left over


def _sampler(order=epoch_order, **kwargs) -> MicroBatchSampler:
    settings = {"batch_size": 12, "seed": 7, "grad_accum_steps": 3, **kwargs}
    return MicroBatchSampler(N, order=order, **settings)


def _epoch(sampler: MicroBatchSampler, epoch: int, **kwargs) -> list[list[int]]:
    sampler.set_epoch(epoch, **kwargs)
    return list(sampler)


@pytest.mark.parametrize("order", [epoch_order, make_block_order(block=8, buffer_blocks=3)])
def test_one_epoch_visits_its_order_once_by_global_batches(order):
    sampler = _sampler(order)
    micro = _epoch(sampler, 2)
    assert sampler.steps_per_epoch == N // 12 == 16 and sampler.micro_batch == 4
    assert len(micro) == len(sampler) == 16 * 3 and all(len(m) == 4 for m in micro)
    visited = [i for m in micro for i in m]
    assert visited == order(N, 7, 2)[: 16 * 12].tolist()  # order[s*B:(s+1)*B], step by step
    assert len(set(visited)) == len(visited)  # a permutation: no window twice in an epoch
    # Same (seed, epoch): same micro-batches; another epoch or seed: another order.
    assert _epoch(_sampler(order), 2) == micro
    assert _epoch(_sampler(order), 3) != micro
    assert _epoch(_sampler(order, seed=8), 2) != micro


def test_epoch_order_is_the_seeded_randperm():
    generator = torch.Generator().manual_seed(7 * 1_000_003 + 2)
    assert torch.equal(epoch_order(N, 7, 2), torch.randperm(N, generator=generator))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_each_global_batch_in_contiguous_slices(world_size: int):
    batch = 12 * world_size
    ranks = [
        _epoch(_sampler(batch_size=batch, grad_accum_steps=2, rank=r, world_size=world_size), 1)
        for r in range(world_size)
    ]
    order = epoch_order(N, 7, 1)
    steps = N // batch
    for step in range(steps):
        global_batch = order[step * batch : (step + 1) * batch].tolist()
        mine = [ranks[r][2 * step] + ranks[r][2 * step + 1] for r in range(world_size)]  # 2 micro-batches
        assert [i for m in mine for i in m] == global_batch  # rank r: the r-th contiguous slice
    assert all(len(r) == 2 * steps for r in ranks)


def test_resume_from_a_position_yields_the_rest_of_the_same_sequence():
    full = _epoch(_sampler(), 4)
    for start in (0, 1, 9, 16):
        assert _epoch(_sampler(), 4, start_step=start) == full[start * 3 :]
    assert _epoch(_sampler(), 4, start_step=5, stop_step=7) == full[15:21]  # max_steps inside an epoch
    with pytest.raises(StageError, match="Expected 0 <= start_step <= stop_step <= 16"):
        _sampler().set_epoch(0, start_step=17)


def test_sampler_refuses_a_batch_that_does_not_split():
    with pytest.raises(ConfigError, match=r"divisible by world size \(2\) x grad_accum_steps \(4\)"):
        MicroBatchSampler(N, batch_size=12, seed=0, grad_accum_steps=4, world_size=2)
    with pytest.raises(ConfigError, match="Expected 0 <= rank < world_size"):
        MicroBatchSampler(N, batch_size=12, seed=0, rank=2, world_size=2)


def test_block_shuffled_order_is_a_local_permutation():
    n, block, buffer = N, 8, 3
    order = block_shuffled_order(n, 5, 2, block=block, buffer_blocks=buffer)
    assert sorted(order.tolist()) == list(range(n))  # every window once per epoch
    assert torch.equal(order, block_shuffled_order(n, 5, 2, block=block, buffer_blocks=buffer))
    assert not torch.equal(order, block_shuffled_order(n, 5, 3, block=block, buffer_blocks=buffer))
    # the order is a sequence of buffers, each the union of `buffer` whole blocks (the short last
    # block included): consecutive entries come from at most `buffer` blocks until a buffer ends
    position, seen = 0, 0
    while position < n:
        blocks: set[int] = set()
        while position < n and (len(blocks) < buffer or int(order[position]) // block in blocks):
            blocks.add(int(order[position]) // block)
            position += 1
        covered = sum(min(block, n - b * block) for b in blocks)
        assert covered == position - seen  # whole blocks
        seen = position
    # block 1 with one buffer over everything: a plain permutation of all windows
    assert sorted(block_shuffled_order(10, 1, 0, block=1, buffer_blocks=10).tolist()) == list(range(10))


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_reads_one_micro_batch_per_item_across_epochs(workers: int):
    windows = (np.arange(N * 5, dtype=np.uint16).reshape(N, 5) * 3) % 4096  # (N, T) stored dtype
    dataset = WindowsDataset(windows)
    sampler = _sampler(rank=1, world_size=2, batch_size=12, grad_accum_steps=2)
    loader = make_loader(dataset, sampler, workers=workers, prefetch_factor=2, pin_memory=False)
    rng_before = torch.get_rng_state()
    for epoch, start in ((0, 14), (1, 0)):  # a resumed epoch, then a whole one (persistent workers)
        sampler.set_epoch(epoch, start_step=start)
        expected = list(sampler)
        got = list(loader)
        assert len(got) == len(expected) == 2 * (16 - start)
        for batch, indices in zip(got, expected, strict=True):
            assert set(batch) == {"input_ids"}
            assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (3, 5)
            assert torch.equal(batch["input_ids"], torch.from_numpy(windows[indices].astype(np.int64)))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the loader leaves the global RNG alone
    assert torch.equal(dataset[4]["input_ids"], torch.from_numpy(windows[4].astype(np.int64)))


def test_loader_workers_auto_is_0_on_cpu_and_leaves_a_core_per_gpu_process(monkeypatch):
    assert loader_workers(3, torch.device("cuda")) == 3  # an integer is used as given
    assert loader_workers(0, torch.device("cuda")) == 0
    assert loader_workers("auto", torch.device("cpu")) == 0
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto", gpu) == 4  # 16 cores, one process: capped at 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers("auto", gpu) == 1  # 2 cores per process: one for training, one reading
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers("auto", gpu) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert loader_workers("auto", gpu) == 1  # never 0 on a GPU
