"""The hybrid cache mode (format version 2): exact top-k head + importance-weighted tail draws.

Selection against an independent inverse-CDF draw, determinism, encode/decode round trip through
a real cache, verify-cache on clean and damaged hybrid caches, and the unbiasedness of the tail
estimate, with statistical bounds derived from the exact variance of the estimator (not fixed
numbers). Every random input has a fixed seed, so each test has one fixed outcome.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from logitcache.cache import (
    CacheMetadata,
    Encoding,
    HybridSelection,
    TeacherInfo,
    create_cache,
    decode_entries,
    encode_entries,
    ensemble_logprobs,
    open_cache,
    select_hybrid,
    verify_cache,
)
from logitcache.cache.encoding import weight_error_bound
from logitcache.cache.select import tail_uniforms
from logitcache.pipeline.errors import CacheError

SHA_A = hashlib.sha256(b"tokenizer").hexdigest()
SHA_B = hashlib.sha256(b"windows").hexdigest()
SHA_W = hashlib.sha256(b"weights").hexdigest()
VOCAB, SEQ, K, M = 300, 7, 8, 13  # odd sizes on purpose
NUM_WINDOWS, PER_CHUNK, PER_SHARD = 11, 2, 4  # 3 shards, the last one partial


def hybrid_metadata(**changes: object) -> CacheMetadata:
    base = CacheMetadata(
        vocab_size=VOCAB,
        tokenizer_sha256=SHA_A,
        dataset_sha256=SHA_B,
        teachers=(TeacherInfo("llama", "/runs/demo/teachers/llama", SHA_W, "float32"),),
        k=K,
        package_version="0.1.0",
        mode="hybrid",
        num_samples=M,
        seed=5,
        config={"cache": {"k": K}},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def teacher_logprobs(start: int, stop: int, vocab: int = VOCAB) -> torch.Tensor:
    """Per-window ensemble log-probabilities (B, T, V) float32: window w's from seed w only."""
    rows = [
        torch.randn(SEQ, vocab, generator=torch.Generator().manual_seed(2000 + w)) * 3
        for w in range(start, stop)
    ]
    return ensemble_logprobs(
        [torch.stack(rows)], teacher_names=["t"], window_indices=list(range(start, stop))
    )


def _write(path: Path, metadata: CacheMetadata, mutate=None):  # noqa: ANN001, ANN202
    writer = create_cache(
        path,
        metadata,
        num_windows=NUM_WINDOWS,
        seq_len=SEQ,
        windows_per_chunk=PER_CHUNK,
        windows_per_shard=PER_SHARD,
    )
    for shard in writer.pending_shards():
        start, stop = writer.shard_rows(shard)
        selection = select_hybrid(
            teacher_logprobs(start, stop),
            k=K,
            num_samples=M,
            seed=metadata.seed,
            window_indices=list(range(start, stop)),
        )
        writer.write_shard(shard, mutate(selection) if mutate else selection)
    writer.finalize()


# ------------------------------------------------------------------------------------------ metadata


def test_hybrid_metadata_round_trips_and_is_validated() -> None:
    md = hybrid_metadata()
    assert md.format_version == 2 and md.width == K + M and md.has_tail
    assert CacheMetadata.from_dict(json.loads(json.dumps(md.to_dict()))) == md
    bad = [
        ({"format_version": 1}, "format_version"),  # a v1 reader could not read it
        ({"num_samples": None}, "num_samples"),
        ({"num_samples": 70000}, "num_samples"),
        ({"num_samples": VOCAB - K}, "k \\+ num_samples < vocab_size"),
        ({"encoding": Encoding(value_code="ratio_q8")}, "value_code"),
        ({"encoding": Encoding(value_code="logp_fp16")}, "value_code"),
        ({"encoding": Encoding(id_code="rank")}, "id_code"),
    ]
    for change, message in bad:
        with pytest.raises(CacheError, match=message):
            hybrid_metadata(**change)


# ------------------------------------------------------------------------------------------ selection


def _inverse_cdf_reference(logp: np.ndarray, head: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Independent NumPy draws: for each uniform u, the first non-head id whose cumulative tail
    probability (ids ascending) exceeds u times the tail mass."""
    out = np.empty(uniforms.shape, dtype=np.int64)
    for t in range(logp.shape[0]):
        p = np.exp(logp[t].astype(np.float64))
        p[head[t]] = 0.0
        cumulative = np.cumsum(p)
        for j, u in enumerate(uniforms[t]):
            out[t, j] = int(np.flatnonzero(cumulative > u * cumulative[-1])[0])
    return out


def test_select_hybrid_matches_its_definition() -> None:
    logp = teacher_logprobs(0, 3)  # (3, T, V)
    sel = select_hybrid(logp, k=K, num_samples=M, seed=5, window_indices=[0, 1, 2])
    probs = logp.double().exp()
    top = torch.topk(probs, K, dim=-1)
    assert torch.equal(sel.head_ids.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(sel.head_logprobs.exp().double().sort(-1).values, top.values.sort(-1).values)
    outside = probs.scatter(-1, top.indices, 0.0).sum(-1)  # masked sum, float64
    torch.testing.assert_close(sel.tail.double(), outside, rtol=1e-5, atol=0)
    assert bool((sel.tail_counts.sum(-1) == M).all())
    for b in range(3):
        uniforms = tail_uniforms(5, b, seq_len=SEQ, num_samples=M).numpy()
        draws = _inverse_cdf_reference(logp[b].numpy(), sel.head_ids[b].numpy(), uniforms)
        for t in range(SEQ):
            ids, counts = np.unique(draws[t], return_counts=True)
            n = len(ids)
            assert sel.tail_ids[b, t, :n].tolist() == ids.tolist()
            assert sel.tail_counts[b, t, :n].tolist() == counts.tolist()
            assert (sel.tail_ids[b, t, n:] == ids[-1]).all() and (sel.tail_counts[b, t, n:] == 0).all()
            assert not set(ids.tolist()) & set(sel.head_ids[b, t].tolist())


def test_select_hybrid_depends_on_seed_and_window_not_on_batching() -> None:
    logp = teacher_logprobs(3, 9)
    together = select_hybrid(logp, k=K, num_samples=M, seed=5, window_indices=list(range(3, 9)))
    for b, window in enumerate(range(3, 9)):
        alone = select_hybrid(logp[b : b + 1], k=K, num_samples=M, seed=5, window_indices=[window])
        for field in HybridSelection.__dataclass_fields__:
            assert torch.equal(getattr(alone, field)[0], getattr(together, field)[b]), field
    other_seed = select_hybrid(logp, k=K, num_samples=M, seed=6, window_indices=list(range(3, 9)))
    assert not torch.equal(other_seed.tail_ids, together.tail_ids)
    assert torch.equal(other_seed.head_ids, together.head_ids)


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("value_code", ["ratio_q10", "logp_q12"])
def test_round_trip_hybrid(tmp_path: Path, value_code: str) -> None:
    metadata = hybrid_metadata(encoding=Encoding(value_code=value_code))
    _write(tmp_path / "c", metadata)
    reader = open_cache(tmp_path / "c")
    assert reader.metadata == metadata and reader.k == K + M
    batch = reader.read_windows(slice(None))
    logp = teacher_logprobs(0, NUM_WINDOWS)
    probs = logp.double().exp()  # (N, T, V)
    sel = select_hybrid(logp, k=K, num_samples=M, seed=5, window_indices=list(range(NUM_WINDOWS)))
    head_ids = sel.head_ids.sort(-1).values
    assert torch.equal(batch.ids[..., :K], head_ids)
    assert torch.equal(batch.ids[..., K:], sel.tail_ids)
    assert batch.tail is None
    # head: the exact probabilities within the code's bound after scaling to 1 - tail
    exact_head = probs.gather(-1, head_ids)  # (N, T, K)
    tail = 1.0 - exact_head.sum(-1)  # (N, T)
    bound = weight_error_bound(
        exact_head.numpy(), (1.0 - tail).numpy(), dataclasses.replace(metadata, mode="topk", num_samples=None)
    )
    head_error = (batch.weights[..., :K].double() - exact_head).abs()
    assert bool((head_error <= torch.from_numpy(bound) + 1e-6).all())  # + float32 rounding of the weights
    # tail: tail * count / m (float32 tail and weights: relative rounding ~1e-7)
    torch.testing.assert_close(
        batch.weights[..., K:].double(), tail[..., None] * sel.tail_counts.double() / M, rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        batch.weights.double().sum(-1), torch.ones(NUM_WINDOWS, SEQ, dtype=torch.float64), rtol=0, atol=1e-5
    )
    with pytest.raises(CacheError, match="ghost"):
        reader.read_windows(slice(None), weights="ghost")
    # the summary's captured mass is the head's
    assert math.isclose(reader.summary["mean_captured_mass"], float((1.0 - tail).mean()), rel_tol=1e-5)
    for quick in (False, True):
        report = verify_cache(tmp_path / "c", quick=quick)
        assert report.ok, (report.problems, [s.problems for s in report.shards])


def test_encode_decode_without_zarr() -> None:
    metadata = hybrid_metadata()
    sel = select_hybrid(teacher_logprobs(0, 2), k=K, num_samples=M, seed=5, window_indices=[0, 1])
    encoded = encode_entries(sel, metadata)
    assert encoded.ids.shape == encoded.values.shape == (2, SEQ, K + M) and encoded.values.dtype == np.uint16
    # each segment is its own sorted gaps: absolute first id, then differences
    assert (encoded.ids[..., 0] == sel.head_ids.min(-1).values.numpy()).all()
    assert (encoded.ids[..., K] == sel.tail_ids[..., 0].numpy()).all()
    assert (encoded.values[..., K:] == sel.tail_counts.numpy()).all()
    decoded = decode_entries(encoded.ids, encoded.values, encoded.tail, metadata)
    assert (decoded.ids[..., K:] == sel.tail_ids.numpy()).all()
    with pytest.raises(CacheError, match="HybridSelection"):
        encode_entries(sel, dataclasses.replace(metadata, mode="topk", num_samples=None))


# ------------------------------------------------------------------------------------------ verify


def _tail_into_head(sel: HybridSelection) -> HybridSelection:
    ids = sel.tail_ids.clone()
    ids[0, 0, 0] = sel.head_ids[0, 0].min()  # the smallest head id: keeps the tail ascending
    ids[0, 0] = torch.cummax(ids[0, 0], dim=-1).values
    return dataclasses.replace(sel, tail_ids=ids)


def _counts_off(sel: HybridSelection) -> HybridSelection:
    counts = sel.tail_counts.clone()
    counts[0, 1, 0] += 1
    return dataclasses.replace(sel, tail_counts=counts)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(_tail_into_head, "tail draws of ids inside the head"), (_counts_off, "do not sum to num_samples")],
)
def test_verify_reports_inconsistent_hybrid_entries(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    _write(tmp_path / "c", hybrid_metadata(), mutate=mutate)
    report = verify_cache(tmp_path / "c")
    problems = [p for s in report.shards for p in s.problems]
    assert not report.ok and any(message in p for p in problems), problems
    assert verify_cache(tmp_path / "c", quick=True).ok  # the quick pass does not read the data


# ------------------------------------------------------------------------------------------ unbiasedness


def _tail_moments(
    values: np.ndarray, weights: np.ndarray, m: int, scale: float
) -> tuple[float, float, float]:
    """Mean, variance and 4th central moment of ``X = scale / m * sum_{i<m} Y_i`` for Y_i iid with
    ``P(Y = values_j) = weights_j`` (the estimator's exact distribution moments)."""
    mu = float((weights * values).sum())
    c2 = float((weights * (values - mu) ** 2).sum())
    c4 = float((weights * (values - mu) ** 4).sum())
    a = scale / m
    return a * m * mu, a**2 * m * c2, a**4 * (m * c4 + 3 * m * (m - 1) * c2**2)


def test_tail_estimate_is_unbiased() -> None:
    """Over many independent draws (one window each), the stored tail weights' estimate of the tail
    cross-entropy term sum_{i not in head} p_i log q_i and of each tail probability p_i is unbiased.

    Tolerances: the estimator's exact standard error (its variance follows from p and q: it is a
    mean of m iid draws). Sample mean within 4.5 standard errors (a false failure has probability
    ~7e-6 per statistic; 61 statistics here, so < 5e-4), sample variance within 4.5 of its own
    standard error (from the exact 4th moment). The estimator's power: the bias a wrong weight
    would add (e.g. counts / m without the tail-mass factor) is checked to exceed 10 standard errors.
    """
    vocab, head_k, m, draws = 60, 5, 7, 4000
    gen = torch.Generator().manual_seed(3)
    logp_row = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5, -1).float()
    log_q = torch.log_softmax(torch.randn(vocab, generator=gen, dtype=torch.float64), -1)  # a fixed student
    logp = logp_row.expand(draws, 1, vocab).contiguous()  # the same position in `draws` windows
    metadata = hybrid_metadata(vocab_size=vocab, k=head_k, num_samples=m)
    sel = select_hybrid(logp, k=head_k, num_samples=m, seed=9, window_indices=list(range(draws)))
    encoded = encode_entries(sel, metadata)
    decoded = decode_entries(encoded.ids, encoded.values, encoded.tail, metadata)  # what the loss gets
    ids = torch.from_numpy(decoded.ids[:, 0, head_k:])  # (draws, m)
    weights = torch.from_numpy(decoded.weights[:, 0, head_k:]).double()  # (draws, m)

    p = logp_row.double().exp()
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[sel.head_ids[0, 0]] = False
    tail_mass = float(p[outside].sum())
    pi = (p[outside] / tail_mass).numpy()  # the tail distribution

    def check(estimates: np.ndarray, exact: float, variance: float, fourth: float, what: str) -> None:
        se = math.sqrt(variance / draws)
        assert abs(estimates.mean() - exact) <= 4.5 * se, (what, estimates.mean(), exact, se)
        sample_var = estimates.var(ddof=1)
        var_se = math.sqrt((fourth - variance**2 * (draws - 3) / (draws - 1)) / draws)
        assert abs(sample_var - variance) <= 4.5 * var_se, (what, sample_var, variance, var_se)

    # the cross-entropy tail term
    estimates = (weights * log_q[ids]).sum(-1).numpy()  # (draws,)
    exact = float((p[outside] * log_q[outside]).sum())
    mean, variance, fourth = _tail_moments(log_q[outside].numpy(), pi, m, tail_mass)
    assert math.isclose(mean, exact, rel_tol=1e-12)
    check(estimates, exact, variance, fourth, "sum p log q over the tail")
    unweighted = (weights / tail_mass * log_q[ids]).sum(-1).numpy()  # counts / m: a biased estimator
    assert abs(unweighted.mean() - exact) > 10 * math.sqrt(variance / draws)

    # every tail id's weight (the gradient's teacher term on that id)
    dense = torch.zeros(draws, vocab, dtype=torch.float64).scatter_add_(1, ids, weights).numpy()  # (draws, V)
    for local, token in enumerate(torch.nonzero(outside).flatten().tolist()):
        indicator = (np.arange(len(pi)) == local).astype(np.float64)
        _, variance, fourth = _tail_moments(indicator, pi, m, tail_mass)
        check(dense[:, token], float(p[token]), variance, fourth, f"weight of id {token}")
