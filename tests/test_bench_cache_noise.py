"""benchmarks/bench_cache_noise.py: the measured gradient noise of iid draws against its closed form."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_cache_noise import estimate, iid_noise, noise, parse_caches


def _distributions() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=g, dtype=torch.float64) * 1.5
    return logits.softmax(-1)  # (P, V)


@pytest.mark.parametrize(("k", "m"), [(0, 8), (0, 30), (3, 8), (10, 4)])
def test_iid_noise_matches_its_closed_form(k: int, m: int) -> None:
    p = _distributions()
    measured = noise(p, k, m, systematic=False, repeats=400)
    assert measured == pytest.approx(iid_noise(p, k, m), rel=0.05)


@pytest.mark.parametrize(("k", "m"), [(0, 8), (3, 8)])
def test_estimates_are_unbiased_and_systematic_draws_are_less_noisy(k: int, m: int) -> None:
    p = _distributions()
    g = torch.Generator().manual_seed(0)
    for systematic in (False, True):
        mean = torch.stack([estimate(p, k, m, systematic=systematic, generator=g) for _ in range(2000)]).mean(
            0
        )
        torch.testing.assert_close(mean, p, atol=0.01, rtol=0)
        if k:
            head = p.topk(k, dim=-1).indices
            torch.testing.assert_close(
                mean.gather(1, head), p.gather(1, head), atol=1e-12, rtol=0
            )  # exact head
    assert noise(p, k, m, systematic=True, repeats=200) < noise(p, k, m, systematic=False, repeats=200)


def test_parse_caches() -> None:
    assert parse_caches("sampled:24,hybrid:2+16") == [("sampled:24", 0, 24), ("hybrid:2+16", 2, 16)]
    with pytest.raises(SystemExit, match="bad cache 'topk:16'"):
        parse_caches("topk:16")
