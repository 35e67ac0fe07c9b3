"""Seed spreads and verdicts (pipeline/evaluation/compare.py) on hand-computed values."""

from __future__ import annotations

import pytest

from logitcache.pipeline.evaluation.compare import SeedSpread, compare, relative_difference


def test_spread_mean_range_and_format() -> None:
    s = SeedSpread.of([352.5, 349.6, 355.4])
    assert s.mean == pytest.approx(352.5)
    assert (s.low, s.high) == (349.6, 355.4)
    assert s.format(1) == "352.5 (349.6-355.4)"
    assert SeedSpread.of([0.01234]).format(4) == "0.0123"  # one run: no range
    with pytest.raises(ValueError, match="at least one"):
        SeedSpread.of([])


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([340.0, 345.0], [346.0, 360.0], "better"),  # every seed of a below every seed of b
        ([346.0, 360.0], [340.0, 345.0], "worse"),
        ([340.0, 350.0], [345.0, 360.0], "within seed noise"),  # overlapping ranges
        ([345.0, 350.0], [350.0, 360.0], "within seed noise"),  # touching ranges: not a difference
        ([351.9], [352.1], "better"),  # single runs: any difference (noise unknown; said in the docs)
    ],
)
def test_compare_needs_disjoint_seed_ranges(a: list[float], b: list[float], want: str) -> None:
    assert compare(SeedSpread.of(a), SeedSpread.of(b)) == want


def test_relative_difference_of_means() -> None:
    assert relative_difference(SeedSpread.of([99.0, 103.0]), SeedSpread.of([100.0])) == pytest.approx(0.01)
