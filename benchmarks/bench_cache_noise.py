"""Gradient noise of the sampled and hybrid cache estimators for your teachers, iid vs systematic draws.

With a cache estimate ``p_hat`` of the teachers' distribution ``p``, the KL term's gradient with
respect to the student's logits is ``q - p_hat`` (T = 1): its noise per position is
``E ||p_hat - p||^2``. For iid draws it has a closed form, ``(1 - sum p^2) / n`` for ``n`` sampled
draws and ``tail^2 (1 - sum r^2) / m`` for a hybrid cache (exact top-k head, ``m`` draws from the
tail distribution ``r = p_tail / tail``), printed beside the measured value. Systematic draws
(``u_j = (j + U) / m``, one uniform per position) are not a cache mode yet: this measures what
they would gain.

    python -m benchmarks.bench_cache_noise configs/demo.toml --run-dir runs/demo \\
        --caches sampled:24,hybrid:2+16,hybrid:8+4 [--windows 16] [--repeats 20]

Needs a run with prepared data and trained teachers. Cheap: one teacher forward over ``--windows``
training windows, then draws. Bytes per position are not computed here (a cache of each kind
gives them: ``pipe cache-logits`` prints them, docs/results.md lists the demo's).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import logitcache  # noqa: F401  (first of ours: see benchmarks/__init__.py)
from logitcache.cache.select import draws_from_cdf


def _draws(dist: torch.Tensor, m: int, systematic: bool, generator: torch.Generator) -> torch.Tensor:
    """(P, m) ids drawn from the rows of ``dist`` (P, V), unnormalised, by the caches' inverse CDF."""
    rows = dist.shape[0]
    if systematic:
        offset = torch.rand(rows, 1, generator=generator, dtype=torch.float64)
        u = (torch.arange(m, dtype=torch.float64) + offset) / m
    else:
        u = torch.rand(rows, m, generator=generator, dtype=torch.float64)
    return draws_from_cdf(dist.cumsum(-1), u)


def estimate(
    p: torch.Tensor, k: int, m: int, *, systematic: bool, generator: torch.Generator
) -> torch.Tensor:
    """A cache's estimate of ``p`` (P, V) float64: the exact top-``k`` head (k = 0: a sampled cache)
    plus ``m`` draws from the rest, each weighing ``tail / m``."""
    if k > 0:
        head = p.topk(k, dim=-1).indices
        rest = p.scatter(1, head, 0.0)
        out = torch.zeros_like(p).scatter_(1, head, p.gather(1, head))
    else:
        rest, out = p, torch.zeros_like(p)
    tail = rest.sum(-1, keepdim=True)  # (P, 1)
    ids = _draws(rest, m, systematic, generator)
    return out.scatter_add_(1, ids, (tail / m).expand(-1, m).contiguous())


def noise(p: torch.Tensor, k: int, m: int, *, systematic: bool, repeats: int, seed: int = 0) -> float:
    """Mean over positions and ``repeats`` draws of ``||p_hat - p||^2``."""
    generator = torch.Generator().manual_seed(seed)
    values = [
        float(((estimate(p, k, m, systematic=systematic, generator=generator) - p) ** 2).sum(-1).mean())
        for _ in range(repeats)
    ]
    return float(np.mean(values))


def iid_noise(p: torch.Tensor, k: int, m: int) -> float:
    """The closed form of :func:`noise` for iid draws: mean of ``tail^2 (1 - sum r^2) / m``."""
    rest = p.scatter(1, p.topk(k, dim=-1).indices, 0.0) if k > 0 else p
    tail = rest.sum(-1)
    r = rest / tail.clamp(min=1e-300).unsqueeze(-1)
    return float((tail**2 * (1 - (r**2).sum(-1)) / m).mean())


def parse_caches(text: str) -> list[tuple[str, int, int]]:
    """``sampled:24,hybrid:2+16`` -> [("sampled:24", 0, 24), ("hybrid:2+16", 2, 16)]."""
    out = []
    for spec in filter(None, text.split(",")):
        mode, _, size = spec.partition(":")
        if mode == "sampled":
            out.append((spec, 0, int(size)))
        elif mode == "hybrid" and "+" in size:
            head, draws = size.split("+")
            out.append((spec, int(head), int(draws)))
        else:
            raise SystemExit(f"error: bad cache {spec!r}: expected sampled:N or hybrid:K+M.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, help="a run with prepared data and trained teachers")
    parser.add_argument("--set", action="append", default=[], help="config override, as for pipe run")
    parser.add_argument("--caches", default="sampled:24,sampled:48,sampled:128,hybrid:2+16,hybrid:16+48")
    parser.add_argument("--windows", type=int, default=16, help="training windows whose positions are used")
    parser.add_argument("--repeats", type=int, default=20, help="independent draws per position")
    args = parser.parse_args()
    caches = parse_caches(args.caches)

    from logitcache.pipeline.config import load_config
    from logitcache.pipeline.prepare import PreparedData
    from logitcache.pipeline.teacher_signal import TeacherEnsemble

    config = load_config(args.config, args.set, run_dir=args.run_dir)
    data = PreparedData.open(Path(args.run_dir) / "data")
    teachers = TeacherEnsemble.load(config, data, torch.device("cpu"))
    windows = torch.from_numpy(data.windows("train")[: args.windows].astype(np.int64))
    with torch.no_grad():
        p = teachers.logprobs(windows).reshape(-1, data.vocab_size).double().exp()  # (P, V)
    entropy = float(-(p * p.clamp(min=1e-300).log()).sum(-1).mean())
    print(
        f"{p.shape[0]} positions, V = {p.shape[1]}, mean teacher entropy {entropy:.2f} nats, "
        f"mean sum p^2 {float((p**2).sum(-1).mean()):.4f}; {args.repeats} draws per position"
    )
    print(
        "| cache | head mass | iid (closed form) | iid (measured) | systematic (measured) | systematic / iid |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for spec, k, m in caches:
        head_mass = float(p.topk(k, dim=-1).values.sum(-1).mean()) if k else 0.0
        iid = noise(p, k, m, systematic=False, repeats=args.repeats)
        stratified = noise(p, k, m, systematic=True, repeats=args.repeats)
        print(
            f"| {spec} | {head_mass:.3f} | {iid_noise(p, k, m):.5f} | {iid:.5f} | {stratified:.5f} | "
            f"{stratified / iid:.2f} |"
        )


if __name__ == "__main__":
    main()
