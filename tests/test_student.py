"""`pipe train-student`: data path, the three modes' losses, cache checks, training, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.cache import (
    CacheMetadata,
    Encoding,
    TeacherInfo,
    create_cache,
    open_cache,
    select_topk,
)
from logitcache.kernels import (
    dense_kd_loss,
    fused_linear_sparse_kd_loss,
    sparse_kd_loss,
    sparse_kd_loss_reference,
)
from logitcache.kernels._common import triton_available
from logitcache.pipeline.cache_logits import cache_logits
from logitcache.pipeline.config import load_config
from logitcache.pipeline.data_order import MicroBatchSampler, make_block_order, make_loader
from logitcache.pipeline.errors import CacheError, StageError, TeacherError
from logitcache.pipeline.models import build_model
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.student import (
    LossOptions,
    StudentObjective,
    make_dataset,
    student_dir,
    train_student,
)
from logitcache.pipeline.student_data import StudentDataset
from logitcache.pipeline.teacher_signal import TeacherEnsemble, open_student_cache
from logitcache.pipeline.teachers import train_teacher
from logitcache.pipeline.training import causal_lm_loss, make_plan

from .conftest import TINY_LLAMA, kill_when

PIPE = [sys.executable, "-m", "logitcache.pipeline.cli"]

STUDENT = f"""
[cache]
k = 16
batch_size = 64

[student.model]
{TINY_LLAMA}

[student.train]
lr = 3e-3
batch_size = 16
epochs = 1
warmup_steps = 2
checkpoint_every = 1000
log_every = 1
eval_batch_size = 64

[student.loader]
workers = 0
shuffle_block = 16
shuffle_buffer_blocks = 4
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Config path of a run with prepared data, two briefly trained teachers and their cache (k=16)."""
    from .conftest import CORPUS, corpus_slice, write_config

    root = tmp_path_factory.mktemp("student")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(p.name for p in CORPUS.glob("*.txt.gz"))[:4]:
        (corpus / name.removesuffix(".gz")).write_text(corpus_slice(name, 30_000))
    path = write_config(root / "s.toml", corpus, root / "run", extra=STUDENT)
    teacher_steps = ["teachers.llama.train.max_steps=8", "teachers.gpt.train.max_steps=8"]
    config = load_config(path, teacher_steps)
    prepare_data(config)
    for name in config.teachers:
        train_teacher(config, name, progress=False)
    cache_logits(config, progress=False)
    return path


def _config(run: Path, *overrides: str, run_dir: Path | None = None):
    teacher_steps = ["teachers.llama.train.max_steps=8", "teachers.gpt.train.max_steps=8"]
    return load_config(run, [*teacher_steps, *overrides], run_dir)


def _losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


# ----------------------------------------------------------------------------------------------
# Data path


@pytest.mark.parametrize(("world_size", "rank", "weights"), [(1, 0, "renormalized"), (2, 1, "ghost")])
def test_loader_batches_equal_direct_reads_in_loop_order(run: Path, world_size: int, rank: int, weights: str):
    config = _config(run)
    data = PreparedData.open(config.run_dir / "data")
    windows = data.windows("train")
    store = config.run_dir / "cache" / "logits.zarr"
    reader = open_cache(store)
    train = replace(config.student.train, batch_size=8, grad_accum_steps=2, epochs=2)
    plan = make_plan(train, windows.shape[0], world_size)
    order_fn = make_block_order(block=16, buffer_blocks=4)
    sampler = MicroBatchSampler(
        windows.shape[0], batch_size=8, seed=3, order=order_fn, grad_accum_steps=2, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    loader = make_loader(
        StudentDataset(windows, store, weights), sampler, workers=1, prefetch_factor=2, pin_memory=False
    )
    # As the loop asks after a resume: the last two steps of epoch 0, then all of epoch 1.
    got = []
    for epoch, start in ((0, plan.steps_per_epoch - 2), (1, 0)):
        sampler.set_epoch(epoch, start_step=start)
        got += list(loader)
    # Independent replica of the loop's slicing.
    expected = []
    for epoch, steps in (
        (0, range(plan.steps_per_epoch - 2, plan.steps_per_epoch)),
        (1, range(plan.steps_per_epoch)),
    ):
        order = order_fn(windows.shape[0], 3, epoch)
        for step in steps:
            mine = order[step * 8 : (step + 1) * 8].reshape(world_size, -1)[rank]
            expected += [mine[: plan.micro_batch], mine[plan.micro_batch :]]
    assert len(got) == len(expected) == 2 * (plan.steps_per_epoch + 2)
    for batch, indices in zip(got, expected, strict=True):
        assert torch.equal(batch["input_ids"], torch.from_numpy(windows[indices.numpy()].astype(np.int64)))
        direct = reader.read_windows(indices.tolist(), weights=weights)
        assert batch["teacher_ids"].dtype == torch.int32
        assert torch.equal(batch["teacher_ids"].long(), direct.ids[:, :-1])
        assert torch.equal(batch["teacher_weights"], direct.weights[:, :-1])
        if weights == "ghost":
            assert torch.equal(batch["teacher_tail"], direct.tail[:, :-1])
        else:
            assert "teacher_tail" not in batch


@pytest.mark.parametrize("weights", ["renormalized", "ghost"])
def test_dataset_read_equals_cache_reader_rows(tmp_path: Path, weights: str, monkeypatch: pytest.MonkeyPatch):
    """One batch read (rows of several chunks and shards, any order) = ``CacheReader.read_windows``."""
    n, t, vocab, k = 37, 9, 50, 6  # 37 windows in chunks of 4 (the last one short), shards of 8
    generator = torch.Generator().manual_seed(4)
    windows = torch.randint(0, vocab, (n, t), generator=generator).numpy().astype(np.uint16)  # (N, T)
    metadata = CacheMetadata(
        vocab_size=vocab, tokenizer_sha256="0" * 64, dataset_sha256="0" * 64,
        teachers=(TeacherInfo(name="t", path="t", weights_sha256="0" * 64, dtype="float32"),),
        k=k, package_version="test",
    )  # fmt: skip
    store = tmp_path / "small.zarr"
    writer = create_cache(store, metadata, num_windows=n, seq_len=t, windows_per_chunk=4, windows_per_shard=8)
    for shard in range(writer.num_shards):
        start, stop = writer.shard_rows(shard)
        logits = 3 * torch.randn(stop - start, t, vocab, generator=generator)  # (R, T, V)
        writer.write_shard(shard, select_topk(torch.log_softmax(logits, -1), k=k))
    writer.finalize()
    reader = open_cache(store)
    rows = [36, 0, 13, 5, 17, 12, 35, 2, 9, 30]  # chunks 9, 0, 3, 1, 4, 3, 8, 0, 2, 7: three runs, unsorted
    dataset = StudentDataset(windows, store, weights)
    batch = dataset.read(rows)
    direct = reader.read_windows(rows, weights=weights)
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (10, t)
    assert torch.equal(batch["input_ids"], torch.from_numpy(windows[rows].astype(np.int64)))
    assert batch["teacher_ids"].dtype == torch.int32 and batch["teacher_ids"].shape == (10, t - 1, k)
    assert torch.equal(batch["teacher_ids"].long(), direct.ids[:, :-1])
    assert batch["teacher_weights"].dtype == torch.float32
    assert torch.equal(batch["teacher_weights"], direct.weights[:, :-1])
    if weights == "ghost":
        assert batch["teacher_tail"].dtype == torch.float32
        assert torch.equal(batch["teacher_tail"], direct.tail[:, :-1])
    else:
        assert set(batch) == {"input_ids", "teacher_ids", "teacher_weights"}
    assert len(dataset) == n
    item = dataset[rows[2]]  # one item: the same row without the batch dimension
    assert torch.equal(item["teacher_ids"], batch["teacher_ids"][2])
    assert torch.equal(item["input_ids"], batch["input_ids"][2])
    windows_only = StudentDataset(windows, None).read(rows)  # modes "online" and "ce"
    assert set(windows_only) == {"input_ids"} and torch.equal(windows_only["input_ids"], batch["input_ids"])

    # Chunks read for one micro-batch serve the next ones (the last `cached_chunks` of them).
    few = StudentDataset(windows, store, weights, cached_chunks=3)
    slices: list[slice] = []
    read_raw = few._cache().read_raw
    monkeypatch.setattr(few._cache(), "read_raw", lambda where: slices.append(where) or read_raw(where))
    for part in ([0, 5, 2], [6, 1, 3], [13, 36, 0]):  # chunks {0, 1}, then {0, 1}, then {3, 9, 0}
        got = few.read(part)
        want = reader.read_windows(part, weights=weights)
        assert torch.equal(got["teacher_ids"].long(), want.ids[:, :-1])
        assert torch.equal(got["teacher_weights"], want.weights[:, :-1])
    assert slices == [slice(0, 8), slice(12, 16), slice(36, 37)]  # runs of chunks not in memory


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_losses_take_int32_teacher_ids(backend: str, monkeypatch: pytest.MonkeyPatch):
    """The loader hands ids over as int32: both losses give the same value as with int64 ids."""
    if backend == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and backend == "triton" else "cpu")
    generator = torch.Generator().manual_seed(0)
    rows, hidden_size, vocab, k = 7, 8, 37, 5  # odd sizes: no block divides them
    hidden = torch.randn(rows, hidden_size, generator=generator).to(device)  # (N, H)
    weight = torch.randn(vocab, hidden_size, generator=generator).to(device)  # (V, H)
    targets = torch.randint(0, vocab, (rows,), generator=generator).to(device)  # (N,)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(rows)])  # (N, k)
    ids = ids.to(device)
    weights = torch.rand(rows, k, generator=generator).to(device) / k  # (N, k) sums < 1
    tail = 1 - weights.sum(-1)  # (N,)
    kwargs = dict(temperature=2.0, ce_weight=0.3, kl_weight=0.7, backend=backend)
    for loss in (
        lambda i: fused_linear_sparse_kd_loss(hidden, weight, targets, i, weights, tail, **kwargs),
        lambda i: sparse_kd_loss(hidden @ weight.T, targets, i, weights, tail, **kwargs),
    ):
        assert loss(ids.int()).item() == loss(ids.long()).item()


def test_cache_mismatch_is_refused_in_one_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = _config(run)
    data = PreparedData.open(config.run_dir / "data")
    open_student_cache(config, data)  # the matching cache opens
    for key, value, name in [
        ("tokenizer_sha256", "0" * 64, "tokenizer_sha256"),
        ("vocab_size", data.vocab_size + 1, "vocab_size"),
        ("windows_sha256", "0" * 64, "dataset_sha256"),
    ]:
        other = PreparedData(data.root, {**data.manifest, key: value})
        if key == "windows_sha256":
            splits = {**data.manifest["splits"], "train": {**data.manifest["splits"]["train"], key: value}}
            other = PreparedData(data.root, {**data.manifest, "splits": splits})
        with pytest.raises(CacheError, match=f"Expected the cache's {name}") as info:
            open_student_cache(config, other)
        assert "\n" not in str(info.value)
    # Re-split data (other tokenizer and windows) with the old cache in place: training refuses to start.
    moved = _config(run, "data.split_seed=1", run_dir=tmp_path / "other")
    prepare_data(moved)
    (tmp_path / "other" / "cache").symlink_to(config.run_dir / "cache")
    with pytest.raises(
        CacheError, match="Expected the cache's tokenizer_sha256 to match the tokenizer in use"
    ):
        train_student(moved, progress=False)
    # A sampled cache has no tail: with tail = ghost its weights are read as they are (no tail).
    reader = open_cache(config.run_dir / "cache" / "logits.zarr")
    object.__setattr__(reader.metadata, "mode", "sampled")
    object.__setattr__(reader.metadata, "num_samples", 16)
    monkeypatch.setattr("logitcache.pipeline.teacher_signal.open_cache", lambda store: reader)
    ghost_config = _config(run, "student.distill.tail=ghost", "cache.mode=sampled", "cache.samples=16")
    assert open_student_cache(ghost_config, data) is reader
    assert make_dataset(ghost_config, data, data.windows("train")).weights == "renormalized"
    empty = _config(run, run_dir=tmp_path / "empty")
    with pytest.raises(StageError, match="run `pipe cache-logits CONFIG` first"):
        open_student_cache(empty, data)


def test_cache_with_other_settings_is_refused_naming_the_fields(run: Path):
    """A student whose [cache] settings differ from those the cache was made with does not start."""
    data = PreparedData.open(_config(run).run_dir / "data")
    with pytest.raises(CacheError, match="settings") as info:
        open_student_cache(_config(run, "cache.k=8", "cache.temperature=2.0"), data)
    message = str(info.value)
    assert (
        "cache.k (config 8, cache 16)" in message and "cache.temperature (config 2.0, cache 1.0)" in message
    )
    assert "\n" not in message and "cache.ensemble" not in message
    with pytest.raises(CacheError, match=r"cache.mode \(config 'sampled', cache 'topk'\)"):
        open_student_cache(_config(run, "cache.mode=sampled"), data)
    # How the cache was computed or laid out does not change its entries: accepted.
    open_student_cache(_config(run, "cache.batch_size=7", "cache.windows_per_shard=4"), data)


def test_online_teachers_are_checked_like_the_caches(run: Path, tmp_path: Path):
    """The online student loads its teachers through the same checks as `pipe cache-logits`."""
    config = _config(run, "student.mode=online")
    data = PreparedData.open(config.run_dir / "data")
    teacher = config.run_dir / "teachers" / "gpt"
    alien = tmp_path / "alien"  # another tokenizer: two token ids swapped
    shutil.copytree(teacher, alien)
    vocab = json.loads((alien / "tokenizer.json").read_text())
    tokens = vocab["model"]["vocab"]
    a, b = sorted(tokens)[100:102]
    tokens[a], tokens[b] = tokens[b], tokens[a]
    (alien / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(TeacherError, match="different tokenizer"):
        TeacherEnsemble.load(
            _config(run, "student.mode=online", f"teachers.gpt.path={alien}"), data, torch.device("cpu")
        )
    # Pickle weights only (written by torch.save: transformers 5 saves safetensors whatever it is told).
    pickled = tmp_path / "pickled"
    shutil.copytree(teacher, pickled)
    torch.save(AutoModelForCausalLM.from_pretrained(teacher).state_dict(), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(TeacherError, match="Expected safetensors weights .* only pickle weights"):
        TeacherEnsemble.load(_config(run, f"teachers.gpt.path={pickled}"), data, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Losses of the three modes


def _student(config, vocab: int, seq_len: int):
    return build_model(config.student.model, vocab_size=vocab, seq_len=seq_len, seed=11)


def test_ce_mode_equals_teacher_style_cross_entropy(run: Path):
    config = _config(run, "student.mode=ce")
    data = PreparedData.open(config.run_dir / "data")
    model = _student(config, data.vocab_size, data.seq_len)
    batch = {"input_ids": torch.from_numpy(data.windows("train")[:6].astype(np.int64))}
    loss = StudentObjective(model, LossOptions.from_config(config))(batch)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = causal_lm_loss(model, batch)  # the teachers' loss, through the HF forward
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tail", ["renormalize", "ghost"])
@pytest.mark.parametrize("reduction", ["mean", "batchmean-compat"])
def test_cache_mode_loss_pairs_entries_of_t_with_token_t_plus_1(run: Path, tail: str, reduction: str):
    """Independent reference: HF logits of positions 0..T-2 against the cache rows read directly."""
    config = _config(run, f"student.distill.tail={tail}", f"student.distill.reduction={reduction}",
                     "student.distill.alpha=0.7", "student.distill.temperature=2.0")  # fmt: skip
    data = PreparedData.open(config.run_dir / "data")
    model = _student(config, data.vocab_size, data.seq_len)
    rows = [3, 40, 41, 7]
    windows = data.windows("train")
    store = config.run_dir / "cache" / "logits.zarr"
    weights = "ghost" if tail == "ghost" else "renormalized"
    batch = StudentDataset(windows, store, weights).read(rows)
    loss = StudentObjective(model, LossOptions.from_config(config))(batch)

    input_ids = torch.from_numpy(windows[rows].astype(np.int64))
    cache = open_cache(store).read_windows(rows, weights=weights)
    logits = model(input_ids=input_ids).logits  # (B, T, V)
    expected = sparse_kd_loss_reference(
        logits[:, :-1], input_ids[:, 1:], cache.ids[:, :-1], cache.weights[:, :-1],
        None if cache.tail is None else cache.tail[:, :-1],
        temperature=2.0, ce_weight=0.3, kl_weight=0.7, reduction=reduction,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_batch_entries_of_t_are_the_teachers_prediction_of_token_t_plus_1(run: Path):
    """Batch entries [b, t] = top-k of the live teachers' ensemble after reading tokens 0..t."""
    config = _config(run)
    data = PreparedData.open(config.run_dir / "data")
    rows = torch.tensor([9, 2, 30])
    store = config.run_dir / "cache" / "logits.zarr"
    batch = StudentDataset(data.windows("train"), store, "ghost").read(rows)
    logp = TeacherEnsemble.load(config, data, torch.device("cpu")).logprobs(batch["input_ids"])  # (B, T, V)
    top = torch.topk(logp, 16, dim=-1).indices.sort(-1).values  # (B, T, k)
    ids = batch["teacher_ids"].sort(-1).values  # (B, T-1, k)
    aligned = (top[:, :-1] == ids).all(-1).float().mean().item()
    shifted = (top[:, 1:] == ids).all(-1).float().mean().item()
    assert aligned > 0.97 and shifted < 0.5  # (ties at the k-th entry may swap an id)
    probs = logp[:, :-1].exp().gather(-1, batch["teacher_ids"])  # (B, T-1, k)
    step = probs.amax(-1, keepdim=True) / 1023  # ratio_q10: half a step of p_max each way
    assert bool(((batch["teacher_weights"] - probs).abs() <= step + 1e-6).all())


def test_online_equals_cache_with_k_v_minus_1_exact_values(run: Path, tmp_path: Path):
    """A cache holding V-1 entries in float32 plus the tail is the full distribution: same loss."""
    config = _config(run, "student.distill.tail=ghost", "student.distill.alpha=0.5")
    data = PreparedData.open(config.run_dir / "data")
    windows = data.windows("train")[:6]  # (6, T)
    input_ids = torch.from_numpy(windows.astype(np.int64))
    teachers = TeacherEnsemble.load(config, data, torch.device("cpu"))
    logp = teachers.logprobs(input_ids)  # (6, T, V)
    vocab = data.vocab_size
    metadata = CacheMetadata(
        vocab_size=vocab, tokenizer_sha256="0" * 64, dataset_sha256="0" * 64,
        teachers=(TeacherInfo(name="t", path="t", weights_sha256="0" * 64, dtype="float32"),),
        k=vocab - 1, package_version="test", encoding=Encoding(value_code="logp_fp32"),
    )  # fmt: skip
    writer = create_cache(tmp_path / "full.zarr", metadata, num_windows=6, seq_len=windows.shape[1])
    for shard in range(writer.num_shards):
        start, stop = writer.shard_rows(shard)
        writer.write_shard(shard, select_topk(logp[start:stop], k=vocab - 1))
    writer.finalize()
    rows = torch.arange(6)
    model = _student(config, vocab, data.seq_len)
    options = LossOptions.from_config(config)
    ghost = StudentDataset(windows, tmp_path / "full.zarr", "ghost").read(rows)
    online = StudentObjective(model, replace(options, mode="online"), teachers)(
        {"input_ids": input_ids, "window_indices": rows}
    )
    cached = StudentObjective(model, options)(ghost)
    assert cached.item() == pytest.approx(online.item(), rel=1e-5)
    renorm = StudentDataset(windows, tmp_path / "full.zarr").read(rows)
    close = StudentObjective(model, options)(renorm)  # same loss; the weights come renormalised
    assert close.item() == pytest.approx(online.item(), rel=2e-3)  # one token of tiny mass dropped


DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "tv"]


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_loss_parts_equal_a_reference_on_a_fixed_batch(run: Path, divergence: str):
    """The logged parts (mean CE, mean divergence per predicted position), cache and online modes,
    against the HF logits and the reference; ce_weight * ce + kl_weight * T^2 * kd is the loss."""
    config = _config(run, f"student.distill.divergence={divergence}", "student.distill.jsd_beta=0.3",
                     "student.distill.alpha=0.7", "student.distill.temperature=2.0")  # fmt: skip
    data = PreparedData.open(config.run_dir / "data")
    model = _student(config, data.vocab_size, data.seq_len)
    rows = [3, 40, 41, 7]
    windows = data.windows("train")
    batch = StudentDataset(windows, config.run_dir / "cache" / "logits.zarr", "ghost").read(rows)
    options = LossOptions.from_config(config)
    input_ids = batch["input_ids"]
    teachers = TeacherEnsemble.load(config, data, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, :-1]  # (B, T-1, V)
        teacher_logp = teachers.logprobs(input_ids)[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]
    want_ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()
    kd_only = dict(ce_weight=0.0, kl_weight=1.0, temperature=2.0, divergence=divergence, jsd_beta=0.3)
    want_kd = {
        "cache": sparse_kd_loss_reference(
            logits, targets, batch["teacher_ids"], batch["teacher_weights"], batch["teacher_tail"], **kd_only
        ).item() / 4.0,
        "online": dense_kd_loss(logits, targets, teacher_logp, **kd_only).item() / 4.0,
    }  # fmt: skip
    for mode in ("cache", "online"):
        objective = StudentObjective(model, replace(options, mode=mode), teachers)
        out = objective(batch, with_parts=True)
        assert set(out) == {"loss", "ce", "kd"} and not out["kd"].requires_grad
        assert out["ce"].item() == pytest.approx(want_ce, rel=1e-5)
        # abs: fp32 rounding of the O(1) terms of a small divergence (an untrained student's JSD ~1e-3)
        assert out["kd"].item() == pytest.approx(want_kd[mode], rel=1e-5, abs=1e-7)
        assert 0.3 * out["ce"].item() + 0.7 * 4.0 * out["kd"].item() == pytest.approx(
            out["loss"].item(), rel=1e-5
        )
        assert objective(batch).item() == out["loss"].item()  # the plain call: the same loss


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_each_divergence_lowers_its_loss_from_the_cache(run: Path, divergence: str):
    """A few AdamW steps on one fixed batch of cache rows lower the loss and its divergence part."""
    config = _config(run, f"student.distill.divergence={divergence}", "student.distill.alpha=0.5")
    data = PreparedData.open(config.run_dir / "data")
    model = _student(config, data.vocab_size, data.seq_len)
    batch = StudentDataset(data.windows("train"), config.run_dir / "cache" / "logits.zarr", "ghost").read(
        list(range(8))
    )
    objective = StudentObjective(model, LossOptions.from_config(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(8):
        out = objective(batch, with_parts=True)
        history.append((out["loss"].item(), out["kd"].item()))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert all(math.isfinite(loss) for loss, _ in history)
    assert history[-1][0] < 0.9 * history[0][0] and history[-1][1] < history[0][1]


# ----------------------------------------------------------------------------------------------
# Training


def test_train_student_modes_output_hf_folders(run: Path):
    config = _config(run, "student.train.max_steps=12", "student.loader.workers=1")
    out = train_student(config, progress=False)
    assert out == config.run_dir / "students" / "cache" == student_dir(config)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Mr. Darcy")["input_ids"][0] == tokenizer.bos_token_id
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["mode"] == "cache" and summary["steps"] == 12
    dev = torch.from_numpy(PreparedData.open(config.run_dir / "data").windows("dev").astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=dev).logits
    dev_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), dev[:, 1:].flatten()).item()
    assert dev_loss == pytest.approx(summary["dev_loss"], rel=1e-4)
    losses = _losses(out / "metrics.jsonl")
    assert [s for s, _ in losses] == list(range(1, 13)) and losses[-1][1] < losses[0][1]
    for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        if "loss" in record:  # alpha 0.5, T = 1: loss = 0.5 ce + 0.5 kd (the same pass's parts)
            assert 0.5 * record["ce"] + 0.5 * record["kd"] == pytest.approx(record["loss"], rel=1e-5)
    assert any("dev_loss" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert train_student(config, progress=False) == out  # complete: skipped

    firsts = {"cache": losses[0][1]}
    for mode in ("ce", "online"):
        other = _config(run, "student.train.max_steps=3", f"student.mode={mode}")
        folder = train_student(other, progress=False)
        assert folder == config.run_dir / "students" / mode
        assert json.loads((folder / "train_summary.json").read_text())["mode"] == mode
        firsts[mode] = _losses(folder / "metrics.jsonl")[0][1]
        first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        if mode == "ce":  # no teacher: the loss is the CE
            assert "kd" not in first and first["ce"] == pytest.approx(first["loss"], rel=1e-6)
        else:
            assert 0.5 * first["ce"] + 0.5 * first["kd"] == pytest.approx(first["loss"], rel=1e-5)
    # Same initial student and first batch; only the teacher term differs.
    assert firsts["ce"] != firsts["cache"] and firsts["online"] != firsts["cache"]
    changed = _config(run, "student.train.max_steps=12", "student.train.lr=1e-4")
    with pytest.raises(StageError, match="different config"):
        train_student(changed, progress=False)


def _cli_args(config_path: Path, run_dir: Path, overrides: list[str]) -> list[str]:
    teacher_steps = ["teachers.llama.train.max_steps=8", "teachers.gpt.train.max_steps=8"]
    return [str(config_path), "--run-dir", str(run_dir)] + [
        a for o in [*teacher_steps, *overrides] for a in ("--set", o)
    ]


def _link_run(source: Path, target: Path) -> None:
    target.mkdir()
    for name in ("data", "teachers", "cache"):
        os.symlink(source / name, target / name)


def test_resume_after_kill_reproduces_trajectory(run: Path, tmp_path: Path):
    overrides = ["student.train.epochs=2", "student.train.checkpoint_every=8", "student.loader.workers=1",
                 "student.name=resume"]  # fmt: skip
    config = _config(run, *overrides)
    reference = train_student(config, progress=False)
    expected = _losses(reference / "metrics.jsonl")

    run_b = tmp_path / "run-b"
    _link_run(config.run_dir, run_b)
    args = [*PIPE, "train-student", *_cli_args(run, run_b, overrides)]
    checkpoints = run_b / "students" / "resume" / "checkpoints"
    kill_when(args, lambda: len(list(checkpoints.glob("step-*"))) >= 2)
    assert not (run_b / "students" / "resume" / "COMPLETE.json").exists()

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _losses(run_b / "students" / "resume" / "metrics.jsonl")
    assert [s for s, _ in resumed] == [s for s, _ in expected]
    assert resumed == expected  # bit-exact on CPU: same data order, optimizer and RNG state
    assert not checkpoints.exists()  # resumed from them, then removed once the model was complete


def test_ddp_two_ranks_match_one_rank(run: Path, tmp_path: Path):
    """2 gloo ranks on CPU give the same losses as 1 rank on the same global batch (cache mode)."""
    overrides = ["student.train.max_steps=10", "student.name=ddp"]
    config = _config(run, *overrides)
    expected = _losses(train_student(config, progress=False) / "metrics.jsonl")

    run_b = tmp_path / "run-ddp"
    _link_run(config.run_dir, run_b)
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
        "-m", "logitcache.pipeline.cli", "train-student", *_cli_args(run, run_b, overrides),
    ]  # fmt: skip
    done = subprocess.run(
        args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("student ddp:") == 1, done.stdout  # rank 0 prints the summary, once
    got = _losses(run_b / "students" / "ddp" / "metrics.jsonl")
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):  # two half-batches + all-reduce: fp32 rounding
        assert a == pytest.approx(b, rel=2e-4, abs=2e-4)
    assert math.isfinite(
        json.loads((run_b / "students" / "ddp" / "train_summary.json").read_text())["dev_loss"]
    )


def _run_with_cache_copy(config, tmp_path: Path) -> Path:
    """A run dir sharing the data and teachers of ``config``'s run, with its own copy of the cache."""
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("data", "teachers"):
        (other / name).symlink_to(config.run_dir / name)
    shutil.copytree(config.run_dir / "cache", other / "cache")
    return other


def test_damaged_cache_is_refused_before_training(run: Path, tmp_path: Path):
    """An ids shard emptied to 0 bytes (what a crash can leave) used to train on the fill value."""
    copy = _run_with_cache_copy(_config(run), tmp_path)
    shard = sorted(p for p in (copy / "cache" / "logits.zarr" / "ids" / "c").rglob("*") if p.is_file())[0]
    shard.write_bytes(b"")
    config = _config(run, run_dir=copy)
    with pytest.raises(CacheError, match=r"Expected an intact cache at .*ids.*damaged shards \[0\]") as info:
        train_student(config, progress=False)
    assert "\n" not in str(info.value)
    assert not (copy / "students").exists()  # refused before anything was created


def test_chunk_failing_its_checksum_mid_epoch_is_one_line_naming_the_windows(run: Path, tmp_path: Path):
    """A flipped byte inside a chunk (the index and metadata intact, so the quick check passes):
    the read that reaches it stops with a one-line error naming the windows and what to do."""
    base = _config(run)
    copy = _run_with_cache_copy(base, tmp_path)
    shard = sorted(p for p in (copy / "cache" / "logits.zarr" / "values" / "c").rglob("*") if p.is_file())[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 4] ^= 0x10  # inside the first chunks' compressed data, far from the index
    shard.write_bytes(bytes(raw))
    config = _config(run, run_dir=copy)
    data = PreparedData.open(copy / "data")
    open_student_cache(config, data)  # the quick check does not read chunk data
    dataset = make_dataset(config, data, data.windows("train"))
    with pytest.raises(
        CacheError, match=r"Cache windows \d+-\d+ \(shard \d+(-\d+)?\) of .* could not be read"
    ) as info:
        for start in range(0, len(dataset), 64):
            dataset.read(list(range(start, min(start + 64, len(dataset)))))
    assert "\n" not in str(info.value) and "pipe verify-cache" in str(info.value)
