"""Inputs in the four cache modes and the tolerance rule shared by tests/test_kernels*.py and benchmarks/."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
EPS32 = torch.finfo(torch.float32).eps
MODES = ("topk", "ghost", "sampled", "hybrid")


@dataclass
class Case:
    logits: torch.Tensor  # (N, V) float64
    targets: torch.Tensor  # (N,)
    ids: torch.Tensor  # (N, k)
    weights: torch.Tensor  # (N, k) float64
    tail: torch.Tensor | None  # (N,) float64


def make_case(
    n: int,
    vocab: int,
    k: int,
    mode: str,
    *,
    seed: int = 0,
    scale: float = 3.0,
    sort_ids: bool = False,
    ignore_every: int = 4,
    device: str | torch.device = "cpu",
) -> Case:
    """A batch in one of the four cache modes, in float64.

    topk: renormalised teacher top-k (weights sum to 1); ghost: raw top-k probabilities with
    tail = the teacher's mass outside S (a masked sum); sampled: k draws, weights count/k on the
    distinct ids, padded with id -1; hybrid (as a hybrid cache decodes): the exact top-``k // 2``
    probabilities (ascending ids), then the distinct ids of ``m = k - k // 2`` draws from the
    teacher restricted to the other ids, ascending, weights ``tail * count / m`` (all weights sum
    to 1), padded by repeating the last drawn id with weight 0. Every ``ignore_every``-th position
    is ignored.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=gen, device=device)
    logits = torch.randn(n, vocab, dtype=torch.float64, **kw) * scale  # (N, V)
    targets = torch.randint(0, vocab, (n,), **kw)  # (N,)
    if ignore_every and n > 1:
        targets[::ignore_every] = IGNORE
    teacher = torch.softmax(torch.randn(n, vocab, dtype=torch.float64, **kw) * 2.0, dim=-1)
    tail = None
    if mode == "sampled":
        draws = torch.multinomial(teacher, k, replacement=True, generator=gen)  # (N, k)
        ids = torch.full((n, k), -1, dtype=torch.long, device=device)
        weights = torch.zeros(n, k, dtype=torch.float64, device=device)
        for row in range(n):
            uniq, counts = torch.unique(draws[row], return_counts=True)
            perm = torch.randperm(len(uniq), **kw)
            ids[row, : len(uniq)] = uniq[perm]
            weights[row, : len(uniq)] = counts[perm].double() / k
    elif mode == "hybrid":
        ids, weights = _hybrid_entries(teacher, k // 2, k - k // 2, gen)
    else:
        ids = torch.argsort(torch.rand(n, vocab, **kw), dim=1)[:, :k]  # distinct, unsorted
        weights = teacher.gather(1, ids)  # (N, k)
        if mode == "topk":
            weights = weights / weights.sum(dim=1, keepdim=True)
        elif mode == "ghost":
            outside = torch.ones_like(teacher, dtype=torch.bool).scatter_(1, ids, False)
            tail = (teacher * outside).sum(dim=1)  # masked sum, not 1 - sum
        else:
            raise ValueError(mode)
    if sort_ids:
        ids, order = torch.sort(ids, dim=1)
        weights = weights.gather(1, order)
    return Case(logits, targets, ids, weights, tail)


def _hybrid_entries(
    teacher: torch.Tensor, head: int, draws: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, head + draws), weights) of a hybrid cache for teacher probabilities (N, V) float64."""
    n = teacher.shape[0]
    head_ids = torch.topk(teacher, head, dim=1).indices.sort(dim=1).values  # (N, head)
    rest = teacher.scatter(1, head_ids, 0.0)  # (N, V) the tail distribution, unnormalised
    tail = rest.sum(dim=1)  # (N,) masked sum
    sample = torch.multinomial(rest, draws, replacement=True, generator=gen)  # (N, m)
    ids = torch.empty(n, head + draws, dtype=torch.long, device=teacher.device)
    weights = torch.zeros(n, head + draws, dtype=torch.float64, device=teacher.device)
    ids[:, :head], weights[:, :head] = head_ids, teacher.gather(1, head_ids)
    for row in range(n):
        uniq, counts = torch.unique(sample[row], return_counts=True)  # ascending
        ids[row, head:] = uniq[-1]  # padding repeats the last drawn id, weight 0
        ids[row, head : head + len(uniq)] = uniq
        weights[row, head : head + len(uniq)] = tail[row] * counts.double() / draws
    return ids, weights


def max_err(actual: torch.Tensor, exact: torch.Tensor) -> float:
    return float((actual.double() - exact.double()).abs().max()) if exact.numel() else 0.0


def assert_within_naive(actual: torch.Tensor, exact: torch.Tensor, naive: torch.Tensor, what: str) -> None:
    """CCE-style bound: the kernel may be at most twice as far from the float64 truth as the naive
    implementation in the kernel's working precision (fp32 reference, output rounded to the same
    dtype), plus 8 fp32 ulps of the largest exact value (covers lucky-exact naive results)."""
    err = max_err(actual, exact)
    naive_err = max_err(naive, exact)
    scale = float(exact.double().abs().max()) if exact.numel() else 0.0
    bound = 2.0 * naive_err + 8.0 * EPS32 * max(scale, 1e-30)
    assert err <= bound, (
        f"{what}: error {err:.3e} > bound {bound:.3e} (naive {naive_err:.3e}, scale {scale:.3e})"
    )
