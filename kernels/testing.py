"""Inputs in the three cache modes and the tolerance rule shared by tests/test_kernels*.py and benchmarks/."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
EPS32 = torch.finfo(torch.float32).eps
MODES = ("topk", "ghost", "sampled")


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
    """A batch in one of the three cache modes, in float64.

    topk: renormalised teacher top-k (weights sum to 1); ghost: raw top-k probabilities with
    tail = the teacher's mass outside S (a masked sum); sampled: k draws, weights count/k on the
    distinct ids, padded with id -1. Every ``ignore_every``-th position is ignored.
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
