"""Ensemble several teachers' logits and select what the cache stores per position.

Math (all in float32, whatever dtype the teachers ran in; float64 inputs stay float64):

* ``mean_logits`` (default): ``z = sum_i w_i z_i / sum_i w_i``; ``log p = log_softmax(z / T)``.
* ``mean_probs``: ``p = sum_i w_i softmax(z_i / T) / sum_i w_i``, computed in log space as
  ``log p = logsumexp_i(log w_i + log_softmax(z_i / T)) - log sum_i w_i``.
* ``topk``: the k most probable ids, their ``log p`` and the tail mass
  ``tail = exp(logsumexp(log p[not top-k]) - logsumexp(log p))``: a direct sum over the
  non-selected entries, accurate even when the tail is tiny (``1 - sum(top-k)`` would lose it to
  rounding below ~1e-7 in float32).
* ``sampled`` (Sparse Logit Sampling, Anshumann et al., ACL 2025): ``n`` draws with replacement
  from ``p``; stored are the unique ids and their counts (weight = count / n, an unbiased
  estimate of ``p``). The draws of window ``w`` use a ``torch.Generator`` seeded with
  :func:`window_seed` ``(seed, w)``, so the result does not depend on how windows are batched or
  split across ranks (for one device type: CPU and CUDA generators differ).
* ``hybrid`` (head + sampled tail): the top-k head as in ``topk`` (ids, log p, tail mass), and
  ``m`` draws with replacement from the tail distribution ``p_i / tail`` over the ids not in the
  head; stored are the unique drawn ids and their counts, and the loss weight of a drawn id is
  ``tail * count / m``, so ``E[sum_j w_j f(j)] = sum_{i not in head} p_i f(i)`` for any ``f``.
  Draws are by inverse CDF: window ``w`` takes ``(T, m)`` float64 uniforms ``u`` from a CPU
  ``torch.Generator`` seeded with :func:`window_seed` ``(seed, w)`` (:func:`tail_uniforms`; the
  same on every device and for any batching), and the draw of ``u`` is the first id ``v`` whose
  cumulative tail mass ``C(v) = sum_{i <= v, i not in head} p_i`` exceeds ``u * C(V - 1)``
  (float64, :func:`tail_cdf`, :func:`draws_from_cdf`). So ``verify-cache --recompute`` can redraw
  and check every draw from recomputed probabilities.

:func:`ensemble_topk` is the fast path of ``pipe cache-logits`` for ``topk``: the same numbers as
``select_topk(ensemble_logprobs(...))`` (the plain reference, kept for tests, the sampled mode and
``verify-cache --recompute``), computed block by block over positions so that on a CPU each block's
few passes stay in cache, with no full (B, T, V) float32 temporaries, and the finiteness check
folded into the entropy (a NaN/inf logit makes it non-finite; only then are the teachers searched
for the culprit). Per block of ``n`` positions, with ``z`` the tempered ensemble logits:
``m = max z``, ``e = exp(z - m)``, top-k of ``z``; ``log p[top] = z[top] - m - log s`` with
``s = sum(e[top]) + sum(e[rest])`` (the tail's sum taken directly over the rest, so a tiny tail
stays accurate) and ``H = log s - sum(e (z - m)) / s``.

The ``hybrid`` mode of ``pipe cache-logits`` (:func:`ensemble_hybrid`) runs the same fused pass
and draws the tail from its ``e`` with the head zeroed (summed in float64): the head is
:func:`ensemble_topk`'s, the draws :func:`select_hybrid`'s up to float32 rounding at a CDF step.
The ``sampled`` mode (:func:`ensemble_sampled`) runs ``select_sampled(ensemble_logprobs(...))`` a
block of windows at a time. Every step is per position or per window, so each result is the
whole batch's bit for bit, without its (B, T, V) temporaries. Every top-k here is
:func:`sorted_topk`, torch.topk's exact answer found from a few candidates per row. So what a
cache stores does not depend on the block size or the batch size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from logitcache.cache.errors import CacheError, TeacherError


@dataclass(frozen=True)
class TopkSelection:
    """Top-k entries of ``B`` windows of ``T`` positions, ids in rank order (most probable first)."""

    ids: torch.Tensor  # (B, T, k) int64
    logprobs: torch.Tensor  # (B, T, k) float32, log p of each id at the cache temperature
    tail: torch.Tensor  # (B, T) float32, 1 - sum(p[top-k]), computed directly
    entropy: torch.Tensor  # (B, T) float32, entropy of the full distribution (nats)


@dataclass(frozen=True)
class SampledSelection:
    """Unique sampled ids per position, ascending, padded to width ``n`` with count 0.

    A padding slot repeats the last real id (so it is a valid index) and has count 0.
    """

    ids: torch.Tensor  # (B, T, n) int64
    counts: torch.Tensor  # (B, T, n) int32, sum over the last axis == n
    entropy: torch.Tensor  # (B, T) float32


@dataclass(frozen=True)
class HybridSelection:
    """Top-k head (rank order, as :class:`TopkSelection`) and the unique ids drawn from the tail.

    ``tail_ids`` ascend per position and are padded to width ``m`` with count 0 (a padding slot
    repeats the last real id). Every tail id is outside the head.
    """

    head_ids: torch.Tensor  # (B, T, k) int64
    head_logprobs: torch.Tensor  # (B, T, k) float32, log p of each head id
    tail: torch.Tensor  # (B, T) float32, 1 - sum(p[head]), computed directly
    tail_ids: torch.Tensor  # (B, T, m) int64, ascending, padded
    tail_counts: torch.Tensor  # (B, T, m) int32, sum over the last axis == m
    entropy: torch.Tensor  # (B, T) float32


def window_seed(seed: int, window_index: int) -> int:
    """A 63-bit generator seed derived from (cache seed, window index) by SHA-256."""
    digest = hashlib.sha256(f"logitcache-sample:{int(seed)}:{int(window_index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_finite(
    logits: torch.Tensor, *, teacher_name: str, window_indices: Sequence[int] | torch.Tensor
) -> None:
    """Raise :class:`TeacherError` naming the teacher, window and position of a NaN/inf logit."""
    bad = ~torch.isfinite(logits)  # (B, T, V)
    if bool(bad.any()):
        b, t, v = (int(x) for x in bad.nonzero()[0])
        window = int(window_indices[b])
        value = float(logits[b, t, v])
        raise TeacherError(
            f"Expected finite logits from teacher '{teacher_name}'. Got {value} at window {window}, "
            f"position {t}, token {v}. Check the teacher's weights, or run it in float32."
        )


def _validate_teachers(
    teacher_logits: Sequence[torch.Tensor],
    teacher_names: Sequence[str],
    weights: Sequence[float] | None,
    temperature: float,
) -> Sequence[float]:
    """Refuse an unusable set of teachers; return the teacher weights (1 each when not given)."""
    if len(teacher_logits) == 0:
        raise TeacherError("Expected at least one teacher. Got none.")
    if len(teacher_names) != len(teacher_logits):
        raise TeacherError(
            f"Expected one name per teacher. Got {len(teacher_names)} names for {len(teacher_logits)} teachers."
        )
    shapes = {tuple(z.shape) for z in teacher_logits}
    if len(shapes) != 1:
        described = ", ".join(
            f"'{n}': {tuple(z.shape)}" for n, z in zip(teacher_names, teacher_logits, strict=True)
        )
        raise TeacherError(
            f"Expected all teachers to share one vocabulary and batch shape (B, T, V). Got {described}. "
            "Teachers must use the same tokenizer."
        )
    if weights is None:
        weights = [1.0] * len(teacher_logits)
    if len(weights) != len(teacher_logits) or any(not (w > 0) for w in weights):
        raise CacheError(f"Expected {len(teacher_logits)} positive teacher weights. Got {list(weights)}.")
    if not temperature > 0:
        raise CacheError(f"Expected temperature > 0. Got {temperature}.")
    return weights


def ensemble_logprobs(
    teacher_logits: Sequence[torch.Tensor],
    *,
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    rule: str = "mean_logits",
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities of the ensemble distribution at ``temperature``. Returns (B, T, V) float32.

    ``teacher_logits``: one (B, T, V) tensor per teacher (any float dtype, cast to float32 here
    because bf16 sums and softmaxes lose ~3 digits). Refuses teachers of different vocab sizes and
    non-finite logits (:class:`TeacherError`).
    """
    weights = _validate_teachers(teacher_logits, teacher_names, weights, temperature)
    _check_rule(rule)
    for name, logits in zip(teacher_names, teacher_logits, strict=True):
        check_finite(logits, teacher_name=name, window_indices=window_indices)
    return _mixture_logprobs(teacher_logits, weights, rule, temperature)


def _check_rule(rule: str) -> None:
    if rule not in ("mean_logits", "mean_probs"):
        raise CacheError(f"Expected ensemble rule 'mean_logits' or 'mean_probs'. Got {rule!r}.")


def _mixture_logprobs(
    teacher_logits: Sequence[torch.Tensor], weights: Sequence[float], rule: str, temperature: float
) -> torch.Tensor:
    """The ensemble rule of the module docstring (no checks): (..., V) per teacher -> (..., V) log p.

    Every step is per position, so a slice of windows gives exactly the rows of the whole batch.
    """
    compute_dtype = torch.float64 if teacher_logits[0].dtype == torch.float64 else torch.float32
    total = float(sum(weights))
    if rule == "mean_logits":
        mixed = None
        for logits, weight in zip(teacher_logits, weights, strict=True):
            term = logits.to(compute_dtype) * (weight / total)  # (..., V)
            mixed = term if mixed is None else mixed + term
        assert mixed is not None
        return torch.log_softmax(mixed / temperature, dim=-1)
    parts = []
    for logits, weight in zip(teacher_logits, weights, strict=True):
        logp = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)  # (..., V)
        parts.append(logp + torch.log(torch.tensor(weight / total, dtype=compute_dtype)))
    return torch.logsumexp(torch.stack(parts, dim=0), dim=0)  # (..., V)


def _logprob_blocks(
    teacher_logits: Sequence[torch.Tensor],
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    weights: Sequence[float],
    rule: str,
    temperature: float,
    block_elements: int | None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, ensemble_logprobs of windows [start, stop))`` for consecutive blocks of windows.

    The same numbers as :func:`ensemble_logprobs` of the whole batch, without its (B, T, V)
    temporaries and finiteness passes: a non-finite logit makes its block's sum non-finite, and
    only then are the teachers searched (:func:`check_finite`, the same error as the whole batch
    gives; a sum that merely overflowed finds nothing and the block goes on).
    """
    batch, seq_len, vocab = teacher_logits[0].shape
    window_elements = max(1, seq_len * vocab)
    windows = max(1, (block_elements or default_block_elements(teacher_logits[0].device)) // window_elements)
    searched = False
    for start in range(0, batch, windows):
        stop = min(start + windows, batch)
        parts = [logits[start:stop] for logits in teacher_logits]  # (w, T, V) each
        if not searched and not all(bool(torch.isfinite(part.sum())) for part in parts):
            for name, logits in zip(teacher_names, teacher_logits, strict=True):
                check_finite(logits, teacher_name=name, window_indices=window_indices)
            searched = True
        yield start, stop, _mixture_logprobs(parts, weights, rule, temperature)


def entropy_of(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum p log p`` over the last axis (0 log 0 = 0). (B, T, V) -> (B, T)."""
    probs = logprobs.exp()
    return -(probs * torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)


def select_topk(logprobs: torch.Tensor, *, k: int) -> TopkSelection:
    """The k most probable ids of (B, T, V) log-probabilities, their log p and the tail mass."""
    vocab = logprobs.shape[-1]
    if not 0 < k < vocab:
        raise CacheError(f"Expected 0 < k < vocab size. Got k={k}, vocab size={vocab}. Choose a smaller k.")
    top_logp, top_ids = sorted_topk(logprobs.reshape(-1, vocab), k)  # (B T, k), as torch.topk
    top_logp, top_ids = top_logp.view(*logprobs.shape[:-1], k), top_ids.view(*logprobs.shape[:-1], k)
    rest = logprobs.scatter(-1, top_ids, float("-inf"))  # (B, T, V), top-k removed
    log_tail = torch.logsumexp(rest, dim=-1) - torch.logsumexp(logprobs, dim=-1)  # (B, T)
    return TopkSelection(
        ids=top_ids.to(torch.int64),
        logprobs=top_logp.to(torch.float32),
        tail=log_tail.exp().clamp(0.0, 1.0).to(torch.float32),
        entropy=entropy_of(logprobs).to(torch.float32),
    )


def default_block_elements(device: torch.device) -> int:
    """Elements (positions x vocab) per block of :func:`ensemble_topk`.

    CPU: 2^20 float32 (4 MiB), so a block's passes hit the cache (smaller blocks measured no
    faster with one thread, and slower with two: every op is a parallel region, whose cost grows
    when another job shares the cores); GPU: 2^26 (256 MiB per temporary), large enough to fill
    the device and small enough to bound the memory.
    """
    return 1 << 26 if device.type == "cuda" else 1 << 20


# sorted_topk: strided groups of the row; a multiple of 64 so that a row of V >= 4 * 256 splits evenly
# often, and large enough that the (k + 1)-th largest group maximum is a tight bound for k <= 64
_TOPK_GROUPS = 256


def sorted_topk(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(values, k, dim=-1, largest=True, sorted=True)`` of a 2-D tensor: the same values
    and ids, bit for bit, found faster on a CPU (float32, wide rows; elsewhere it calls torch.topk).

    torch's CPU top-k copies each row into (value, id) pairs and runs a scalar partial sort
    (~4 ns per entry). Here, per row of ``V`` entries: ``g`` = the maxima of ``G`` strided groups
    ``{j, j + G, j + 2G, ...}`` (one vectorised reduction); ``b`` = the (k+1)-th largest of them,
    so at least k + 1 entries are ``>= b`` and every one of the k + 1 largest entries is; the
    entries ``>= b`` (about 70 for G = 256, k = 64) are the candidates, sorted as int64 keys
    (an order-preserving integer image of the float in the high 32 bits, the id in the low ones).
    Where the k + 1 largest candidates are strictly decreasing, the top k is unique and this is
    exactly torch's answer; a row with a tie there, or any NaN/inf (seen in ``g``), is recomputed
    with torch.topk, so ties are broken exactly as torch breaks them.
    """
    rows, width = values.shape
    groups = _TOPK_GROUPS
    if (
        values.device.type != "cpu"
        or values.dtype != torch.float32
        or not values.is_contiguous()
        or width < 4 * groups
        or not 0 < k < groups // 2
        or rows == 0
    ):
        return torch.topk(values, k, dim=-1, largest=True, sorted=True)
    per_group = width // groups
    group_max = values[:, : per_group * groups].view(rows, per_group, groups).amax(1)  # (n, G)
    extra = width - per_group * groups
    if extra:  # the last, partial run of groups
        torch.maximum(group_max[:, :extra], values[:, per_group * groups :], out=group_max[:, :extra])
    logits, maxima = values.numpy(), group_max.numpy()
    bound = np.partition(maxima, groups - k - 1, axis=1)[:, groups - k - 1]  # (n,) (k+1)-th largest
    flat = np.flatnonzero(logits >= bound[:, None])  # candidates, row-major
    row, col = np.divmod(flat, width)
    counts = np.bincount(row, minlength=rows)  # (n,) >= k + 1 where the row is finite
    candidates = max(int(counts.max()), k + 1)
    slot = np.arange(flat.size) - (np.cumsum(counts) - counts)[row]
    bits = logits.reshape(-1)[flat].view(np.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64)  # int32 image, same order as the floats
    keys = np.full((rows, candidates), np.iinfo(np.int64).min, dtype=np.int64)  # (n, C) padding sorts first
    keys.reshape(-1)[row * candidates + slot] = (ordered << 32) | col
    keys.sort(axis=1)
    ids = keys[:, candidates - k - 1 :][:, ::-1] & 0xFFFFFFFF  # (n, k + 1) most probable first
    top = np.take_along_axis(logits, ids, 1)  # (n, k + 1) their values
    exact = (top[:, :-1] > top[:, 1:]).all(1) & np.isfinite(maxima).all(1)  # (n,)
    top_values = torch.from_numpy(np.ascontiguousarray(top[:, :k]))
    top_ids = torch.from_numpy(np.ascontiguousarray(ids[:, :k]))
    if not exact.all():
        redo = torch.from_numpy(np.flatnonzero(~exact))
        again = torch.topk(values[redo], k, dim=-1, largest=True, sorted=True)
        top_values[redo], top_ids[redo] = again.values, again.indices
    return top_values, top_ids


def ensemble_topk(
    teacher_logits: Sequence[torch.Tensor],
    *,
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    k: int,
    rule: str = "mean_logits",
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    block_elements: int | None = None,
) -> TopkSelection:
    """``select_topk(ensemble_logprobs(...), k=k)`` in one fused pass per block (see module doc).

    Same arguments, checks and errors as the two functions it replaces; same result up to float
    rounding (ids equal except where two probabilities at the k-th place tie to rounding).
    """
    weights = _validate_teachers(teacher_logits, teacher_names, weights, temperature)
    _check_rule(rule)
    batch, seq_len, vocab = teacher_logits[0].shape
    if not 0 < k < vocab:
        raise CacheError(f"Expected 0 < k < vocab size. Got k={k}, vocab size={vocab}. Choose a smaller k.")
    head = _Head.empty(batch * seq_len, k, teacher_logits[0].device)
    for start, stop, block in _head_blocks(
        teacher_logits, teacher_names, window_indices, k, rule, weights, temperature, block_elements
    ):
        head.put(start, stop, block)
    return head.selection(batch, seq_len)


class _Block(NamedTuple):
    """One block of positions of the fused pass."""

    ids: torch.Tensor  # (n, k) the top-k ids, most probable first
    logprobs: torch.Tensor  # (n, k) float32 their log p
    tail: torch.Tensor  # (n,) float32 the mass outside them
    entropy: torch.Tensor  # (n,) float32
    rest: torch.Tensor  # (n, V) unnormalised probabilities, top-k zeroed: scratch, reused by the next block


@dataclass(frozen=True)
class _Head:
    """The per-position outputs of :func:`_head_blocks`, filled block by block: (P, k) ids and log p,
    (P,) tail mass and entropy."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    entropy: torch.Tensor

    @classmethod
    def empty(cls, positions: int, k: int, device: torch.device) -> _Head:
        return cls(
            torch.empty(positions, k, dtype=torch.int64, device=device),
            torch.empty(positions, k, dtype=torch.float32, device=device),
            torch.empty(positions, dtype=torch.float32, device=device),
            torch.empty(positions, dtype=torch.float32, device=device),
        )

    def put(self, start: int, stop: int, block: _Block) -> None:
        self.ids[start:stop] = block.ids
        self.logprobs[start:stop] = block.logprobs
        self.tail[start:stop] = block.tail
        self.entropy[start:stop] = block.entropy

    def selection(self, batch: int, seq_len: int) -> TopkSelection:
        k = self.ids.shape[-1]
        return TopkSelection(
            ids=self.ids.view(batch, seq_len, k),
            logprobs=self.logprobs.view(batch, seq_len, k),
            tail=self.tail.view(batch, seq_len),
            entropy=self.entropy.view(batch, seq_len),
        )


def _head_blocks(
    teacher_logits: Sequence[torch.Tensor],
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    k: int,
    rule: str,
    weights: Sequence[float],
    temperature: float,
    block_elements: int | None,
) -> Iterator[tuple[int, int, _Block]]:
    """The fused pass of :func:`ensemble_topk` (module docstring): ``(start, stop, block)`` for
    consecutive blocks of positions (``block.rest`` is valid until the next block). A non-finite
    logit raises :class:`TeacherError` naming the teacher and window."""
    batch, seq_len, vocab = teacher_logits[0].shape
    dtype = torch.float64 if teacher_logits[0].dtype == torch.float64 else torch.float32
    device = teacher_logits[0].device
    flat = [z.reshape(batch * seq_len, vocab) for z in teacher_logits]  # views when contiguous
    total = float(sum(weights))
    scales = [w / total for w in weights]
    positions = batch * seq_len
    rows = min(positions, max(1, (block_elements or default_block_elements(device)) // vocab))
    work = torch.empty(2, rows, vocab, dtype=dtype, device=device)  # a block's z and exp(z - m), reused
    compute = _mean_logits_block if rule == "mean_logits" else _mean_probs_block
    for start in range(0, positions, rows):
        stop = min(start + rows, positions)
        parts = [z[start:stop] for z in flat]  # (n, V) each
        block = compute(parts, scales, temperature, k, work[:, : stop - start])
        ent = block.entropy
        if not bool(torch.isfinite(ent).all()):  # any NaN/inf logit in the block lands here
            for name, logits in zip(teacher_names, teacher_logits, strict=True):
                check_finite(logits, teacher_name=name, window_indices=window_indices)
            row = start + int((~torch.isfinite(ent)).nonzero()[0])
            raise TeacherError(
                f"Expected a finite ensemble distribution. Got a non-finite entropy at window "
                f"{int(window_indices[row // seq_len])}, position {row % seq_len} although every "
                "teacher's logits are finite; check the teachers' logit scale or run them in float32."
            )
        yield start, stop, block


def _mean_logits_block(
    parts: list[torch.Tensor], scales: list[float], temperature: float, k: int, work: torch.Tensor
) -> _Block:
    """Top-k of ``softmax(sum_i scale_i z_i / T)`` for one block of (n, V) teacher logits.

    ``work`` (2, n, V) in the compute dtype: scratch for z and exp(z - m), so that no block
    allocates (fresh pages cost more than the arithmetic here).
    """
    z_buf, e_buf = work[0], work[1]  # (n, V) each
    dtype = work.dtype
    if len(parts) == 1 and parts[0].dtype == dtype and temperature == 1.0:
        z = parts[0]  # nothing to combine: read the teacher's logits in place
    else:
        z = z_buf
        if parts[0].dtype == dtype:
            torch.mul(parts[0], scales[0] / temperature, out=z)  # (n, V)
        else:  # bf16/fp16 logits: exact in float32, then scaled there
            z.copy_(parts[0]).mul_(scales[0] / temperature)
        for part, scale in zip(parts[1:], scales[1:], strict=True):
            z.add_(part, alpha=scale / temperature)
    top_z, top_ids = sorted_topk(z, k)  # (n, k)
    m = top_z[:, :1]  # (n, 1) max z (the first of the sorted top-k)
    shifted = torch.sub(z, m, out=z_buf)  # (n, V) z - m, <= 0; NaN if any z is NaN or +inf
    e = torch.exp(shifted, out=e_buf)  # (n, V)
    # sum(e (z - m)) for the entropy; a -inf logit gives 0 * -inf = NaN, so any bad logit shows
    ez = torch.linalg.vecdot(e, shifted)  # (n,)
    e_top = e.gather(-1, top_ids)  # (n, k)
    rest = e.scatter_(-1, top_ids, 0.0).sum(-1)  # (n,) sum over the non-selected entries only
    s = rest + e_top.sum(-1)  # (n,) sum(exp(z - m))
    log_s = s.log()
    top_logp = (top_z - m) - log_s[:, None]  # (n, k) log p of the top-k ids
    return _Block(top_ids, top_logp.float(), (rest / s).float(), (log_s - ez / s).float(), e)


def _mean_probs_block(
    parts: list[torch.Tensor], scales: list[float], temperature: float, k: int, work: torch.Tensor
) -> _Block:
    """Top-k of ``sum_i scale_i softmax(z_i / T)`` for one block of (n, V) teacher logits."""
    dtype = work.dtype
    probs = None
    for part, scale in zip(parts, scales, strict=True):
        zt = part.to(dtype) / temperature  # (n, V)
        e = (zt - zt.amax(-1, keepdim=True)).exp_()  # (n, V); NaN if any z is NaN or +inf
        if not bool(torch.isfinite(zt).all()):
            e.fill_(float("nan"))  # -inf would vanish in exp: make the caller find and name it
        e.mul_(scale / e.sum(-1, keepdim=True))
        probs = e if probs is None else probs.add_(e)
    assert probs is not None
    top_p, top_ids = sorted_topk(probs, k)  # (n, k)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # (n,) 0 log 0 = 0
    rest = probs.scatter_(-1, top_ids, 0.0).sum(-1)  # (n,)
    s = rest + top_p.sum(-1)  # (n,) 1 up to rounding
    return _Block(top_ids, (top_p / s[:, None]).log().float(), (rest / s).float(), entropy.float(), probs)


def select_sampled(
    logprobs: torch.Tensor,
    *,
    num_samples: int,
    seed: int,
    window_indices: Sequence[int] | torch.Tensor,
) -> SampledSelection:
    """Draw ``num_samples`` ids per position from ``exp(logprobs)`` (B, T, V); keep unique ids + counts."""
    batch, seq_len, vocab = logprobs.shape
    _check_sampled_args(num_samples, logprobs.shape, window_indices)
    probs = logprobs.to(torch.float32).exp()  # (B, T, V); multinomial normalises each row itself
    draws = torch.empty(batch, seq_len, num_samples, dtype=torch.int64, device=logprobs.device)
    for b in range(batch):
        generator = torch.Generator(device=logprobs.device)
        generator.manual_seed(window_seed(seed, int(window_indices[b])))
        draws[b] = torch.multinomial(probs[b], num_samples, replacement=True, generator=generator)  # (T, n)
    ids, counts = unique_counts(draws)
    return SampledSelection(ids=ids, counts=counts, entropy=entropy_of(logprobs).to(torch.float32))


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids (ascending) and their counts per row of ``draws`` (..., n), padded to width n.

    Padding slots repeat the last real id and have count 0. Returns (ids int64, counts int32).
    """
    ordered, _ = torch.sort(draws, dim=-1)  # (..., n)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = torch.cumsum(is_new.to(torch.int64), dim=-1) - 1  # (..., n) slot of each draw's unique id
    ids = torch.full_like(ordered, -1).scatter(-1, slot, ordered)  # unfilled slots stay -1
    ids = torch.cummax(ids, dim=-1).values  # padding repeats the last real id (ids ascend)
    counts = torch.zeros_like(ordered, dtype=torch.int32).scatter_add(
        -1, slot, torch.ones_like(ordered, dtype=torch.int32)
    )
    return ids, counts


def tail_uniforms(seed: int, window_index: int, *, seq_len: int, num_samples: int) -> torch.Tensor:
    """(T, m) float64 uniforms in [0, 1) of window ``window_index``'s tail draws (CPU, any device's cache)."""
    generator = torch.Generator()  # always the CPU generator: the same numbers on every device
    generator.manual_seed(window_seed(seed, int(window_index)))
    return torch.rand(seq_len, num_samples, generator=generator, dtype=torch.float64)


def tail_cdf(logprobs: torch.Tensor, head_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative tail mass ``C(v) = sum_{i <= v, i not in head} p_i`` (..., V) float64.

    Rows whose tail mass is 0 in float64 (every non-head log-probability below ~-745) count every
    non-head id as 1 instead, i.e. a uniform tail: their draws are valid ids, and their weights
    ``tail * count / m`` are 0 anyway.
    """
    probs = logprobs.to(torch.float64).exp().scatter_(-1, head_ids, 0.0)  # (..., V) head removed
    return _uniform_where_empty(torch.cumsum(probs, dim=-1), head_ids)  # (..., V)


def _uniform_where_empty(cdf: torch.Tensor, head_ids: torch.Tensor) -> torch.Tensor:
    """``cdf`` (..., V), with each row whose total is 0 replaced in place by the CDF of a uniform
    distribution over the ids not in ``head_ids`` (..., k)."""
    empty = cdf[..., -1] <= 0  # (...)
    if bool(empty.any()):
        outside = torch.ones_like(cdf[empty]).scatter_(-1, head_ids[empty], 0.0)  # (e, V)
        cdf[empty] = torch.cumsum(outside, dim=-1)
    return cdf


def draws_from_cdf(cdf: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws (..., m) int64: the first id ``v`` with ``cdf[v] > u * cdf[V - 1]``.

    ``cdf`` (..., V) non-decreasing with a positive last entry, ``uniforms`` (..., m) in [0, 1).
    An id with zero mass never has ``cdf[v] > cdf[v - 1]``, so it is never drawn.
    """
    total = cdf[..., -1:]  # (..., 1)
    # u * total < total for u < 1 up to rounding: keep the target strictly below the last entry
    target = torch.minimum(uniforms.to(cdf.dtype) * total, total * (1.0 - 2.0**-52))  # (..., m)
    return torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True)


def select_hybrid(
    logprobs: torch.Tensor,
    *,
    k: int,
    num_samples: int,
    seed: int,
    window_indices: Sequence[int] | torch.Tensor,
) -> HybridSelection:
    """Top-k head of (B, T, V) log-probabilities and ``num_samples`` draws per position from the tail.

    See the module docstring (mode ``hybrid``). The draws of window ``w`` depend only on ``seed``,
    ``w`` and its log-probabilities, not on the batch, the rank or the device.
    """
    batch, seq_len, vocab = logprobs.shape
    _check_hybrid_args(k, num_samples, logprobs.shape, window_indices)
    head = select_topk(logprobs, k=k)
    draws = torch.empty(batch, seq_len, num_samples, dtype=torch.int64, device=logprobs.device)
    for b in range(batch):  # one window at a time: a (T, V) float64 CDF, not (B, T, V)
        cdf = tail_cdf(logprobs[b], head.ids[b])  # (T, V)
        uniforms = tail_uniforms(seed, int(window_indices[b]), seq_len=seq_len, num_samples=num_samples)
        draws[b] = draws_from_cdf(cdf, uniforms.to(logprobs.device))  # (T, m)
    return _hybrid(head, draws)


def _hybrid(head: TopkSelection, draws: torch.Tensor) -> HybridSelection:
    """The stored hybrid entries: the head, and the tail draws (B, T, m) as unique ids + counts."""
    tail_ids, tail_counts = unique_counts(draws)
    return HybridSelection(
        head_ids=head.ids,
        head_logprobs=head.logprobs,
        tail=head.tail,
        tail_ids=tail_ids,
        tail_counts=tail_counts,
        entropy=head.entropy,
    )


def _check_sampled_args(
    num_samples: int, shape: tuple[int, ...] | torch.Size, window_indices: Sequence[int] | torch.Tensor
) -> None:
    batch, _, vocab = shape
    if num_samples < 1:
        raise CacheError(f"Expected num_samples >= 1. Got {num_samples}.")
    if num_samples >= vocab:
        raise CacheError(
            f"Expected num_samples (the stored width k) < vocab size. Got {num_samples} >= {vocab}."
        )
    if len(window_indices) != batch:
        raise CacheError(f"Expected {batch} window indices. Got {len(window_indices)}.")


def _check_hybrid_args(
    k: int,
    num_samples: int,
    shape: tuple[int, ...] | torch.Size,
    window_indices: Sequence[int] | torch.Tensor,
) -> None:
    batch, _, vocab = shape
    if num_samples < 1:
        raise CacheError(f"Expected num_samples >= 1. Got {num_samples}.")
    if k + num_samples >= vocab:
        raise CacheError(
            f"Expected k + num_samples (the stored width) < vocab size. Got {k} + {num_samples} >= {vocab}."
        )
    if len(window_indices) != batch:
        raise CacheError(f"Expected {batch} window indices. Got {len(window_indices)}.")
    if not 0 < k:
        raise CacheError(f"Expected 0 < k < vocab size. Got k={k}, vocab size={vocab}. Choose a smaller k.")


def ensemble_sampled(
    teacher_logits: Sequence[torch.Tensor],
    *,
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    num_samples: int,
    seed: int,
    rule: str = "mean_logits",
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    block_elements: int | None = None,
) -> SampledSelection:
    """``select_sampled(ensemble_logprobs(...), ...)`` a block of windows at a time (:func:`_logprob_blocks`).

    Bit for bit the same result: the ensemble is per position and the draws per window.
    """
    weights = _validate_teachers(teacher_logits, teacher_names, weights, temperature)
    _check_rule(rule)
    _check_sampled_args(num_samples, teacher_logits[0].shape, window_indices)
    blocks = _logprob_blocks(
        teacher_logits, teacher_names, window_indices, weights, rule, temperature, block_elements
    )
    pieces = [
        select_sampled(logp, num_samples=num_samples, seed=seed, window_indices=window_indices[start:stop])
        for start, stop, logp in blocks
    ]
    return SampledSelection(
        **{f: torch.cat([getattr(p, f) for p in pieces]) for f in SampledSelection.__dataclass_fields__}
    )


def ensemble_hybrid(
    teacher_logits: Sequence[torch.Tensor],
    *,
    teacher_names: Sequence[str],
    window_indices: Sequence[int] | torch.Tensor,
    k: int,
    num_samples: int,
    seed: int,
    rule: str = "mean_logits",
    weights: Sequence[float] | None = None,
    temperature: float = 1.0,
    block_elements: int | None = None,
) -> HybridSelection:
    """``select_hybrid(ensemble_logprobs(...), ...)`` in the fused pass of :func:`ensemble_topk`.

    The head (ids, log p, tail mass, entropy) is :func:`ensemble_topk`'s, bit for bit. The tail
    draws use the same uniforms and inverse-CDF rule as :func:`select_hybrid`, on the block's
    unnormalised probabilities (``exp(z - m)``, head zeroed, summed in float64) instead of
    ``exp(log p)``: the same distribution up to float32 rounding, so a draw can differ from
    :func:`select_hybrid`'s only where its uniform lies within rounding of a CDF step (about one
    draw in 10^5; ``verify-cache --recompute`` allows for it). Independent of the batching, as
    every step is per position. A row whose tail underflows to 0 in float32 draws uniformly among
    the non-head ids, as :func:`tail_cdf` does; its stored tail mass, hence every draw's weight, is 0.
    """
    weights = _validate_teachers(teacher_logits, teacher_names, weights, temperature)
    _check_rule(rule)
    _check_hybrid_args(k, num_samples, teacher_logits[0].shape, window_indices)
    batch, seq_len, vocab = teacher_logits[0].shape
    device = teacher_logits[0].device
    positions = batch * seq_len
    uniforms = torch.cat(
        [tail_uniforms(seed, int(w), seq_len=seq_len, num_samples=num_samples) for w in window_indices]
    ).to(device)  # (P, m) float64
    draws = torch.empty(positions, num_samples, dtype=torch.int64, device=device)
    head = _Head.empty(positions, k, device)
    cdf_rows = max(1, (1 << 23) // vocab)  # float64 CDF scratch, reused: 64 MiB at most
    cdf_buffer = torch.empty(min(positions, cdf_rows), vocab, dtype=torch.float64, device=device)
    for start, stop, block in _head_blocks(
        teacher_logits, teacher_names, window_indices, k, rule, weights, temperature, block_elements
    ):
        head.put(start, stop, block)
        for first in range(0, stop - start, cdf_rows):
            last = min(first + cdf_rows, stop - start)
            cdf = cdf_buffer[: last - first].copy_(block.rest[first:last])
            torch.cumsum(cdf, dim=-1, out=cdf)  # (c, V) into a buffer: fresh pages cost more
            _uniform_where_empty(cdf, block.ids[first:last])
            draws[start + first : start + last] = draws_from_cdf(cdf, uniforms[start + first : start + last])
    return _hybrid(head.selection(batch, seq_len), draws.view(batch, seq_len, num_samples))
