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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from logitcache.pipeline.errors import CacheError, TeacherError


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
    compute_dtype = torch.float64 if teacher_logits[0].dtype == torch.float64 else torch.float32
    total = float(sum(weights))
    if rule == "mean_logits":
        mixed = None
        for name, logits, weight in zip(teacher_names, teacher_logits, weights, strict=True):
            check_finite(logits, teacher_name=name, window_indices=window_indices)
            term = logits.to(compute_dtype) * (weight / total)  # (B, T, V)
            mixed = term if mixed is None else mixed + term
        assert mixed is not None
        return torch.log_softmax(mixed / temperature, dim=-1)
    if rule == "mean_probs":
        parts = []
        for name, logits, weight in zip(teacher_names, teacher_logits, weights, strict=True):
            check_finite(logits, teacher_name=name, window_indices=window_indices)
            logp = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)  # (B, T, V)
            parts.append(logp + torch.log(torch.tensor(weight / total, dtype=compute_dtype)))
        return torch.logsumexp(torch.stack(parts, dim=0), dim=0)  # (B, T, V)
    raise CacheError(f"Expected ensemble rule 'mean_logits' or 'mean_probs'. Got {rule!r}.")


def entropy_of(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy ``-sum p log p`` over the last axis (0 log 0 = 0). (B, T, V) -> (B, T)."""
    probs = logprobs.exp()
    return -(probs * torch.where(probs > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)


def select_topk(logprobs: torch.Tensor, *, k: int) -> TopkSelection:
    """The k most probable ids of (B, T, V) log-probabilities, their log p and the tail mass."""
    vocab = logprobs.shape[-1]
    if not 0 < k < vocab:
        raise CacheError(f"Expected 0 < k < vocab size. Got k={k}, vocab size={vocab}. Choose a smaller k.")
    top_logp, top_ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)  # (B, T, k)
    rest = logprobs.scatter(-1, top_ids, float("-inf"))  # (B, T, V), top-k removed
    log_tail = torch.logsumexp(rest, dim=-1) - torch.logsumexp(logprobs, dim=-1)  # (B, T)
    return TopkSelection(
        ids=top_ids.to(torch.int64),
        logprobs=top_logp.to(torch.float32),
        tail=log_tail.exp().clamp(0.0, 1.0).to(torch.float32),
        entropy=entropy_of(logprobs).to(torch.float32),
    )


def select_sampled(
    logprobs: torch.Tensor,
    *,
    num_samples: int,
    seed: int,
    window_indices: Sequence[int] | torch.Tensor,
) -> SampledSelection:
    """Draw ``num_samples`` ids per position from ``exp(logprobs)`` (B, T, V); keep unique ids + counts."""
    batch, seq_len, vocab = logprobs.shape
    if num_samples < 1:
        raise CacheError(f"Expected num_samples >= 1. Got {num_samples}.")
    if num_samples >= vocab:
        raise CacheError(
            f"Expected num_samples (the stored width k) < vocab size. Got {num_samples} >= {vocab}."
        )
    if len(window_indices) != batch:
        raise CacheError(f"Expected {batch} window indices. Got {len(window_indices)}.")
    probs = logprobs.to(torch.float32).exp()  # (B, T, V); multinomial normalises each row itself
    draws = torch.empty(batch, seq_len, num_samples, dtype=torch.int64, device=logprobs.device)
    for b in range(batch):
        generator = torch.Generator(device=logprobs.device)
        generator.manual_seed(window_seed(seed, int(window_indices[b])))
        draws[b] = torch.multinomial(probs[b], num_samples, replacement=True, generator=generator)  # (T, n)
    ordered, _ = torch.sort(draws, dim=-1)  # (B, T, n)
    is_new = torch.ones_like(ordered, dtype=torch.bool)
    is_new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    slot = torch.cumsum(is_new.to(torch.int64), dim=-1) - 1  # (B, T, n) slot of each draw's unique id
    ids = torch.full_like(ordered, -1).scatter(-1, slot, ordered)  # unfilled slots stay -1
    ids = torch.cummax(ids, dim=-1).values  # padding repeats the last real id (ids ascend)
    counts = torch.zeros_like(ordered, dtype=torch.int32).scatter_add(
        -1, slot, torch.ones_like(ordered, dtype=torch.int32)
    )
    return SampledSelection(ids=ids, counts=counts, entropy=entropy_of(logprobs).to(torch.float32))
