"""Seed spreads and verdicts (pipeline/evaluation/compare.py) on hand-computed values."""

from __future__ import annotations

import pytest

from logitcache.pipeline.evaluation.compare import (
    SeedSpread,
    combined_verdict,
    compare,
    one_factor_pairs,
    paired,
    paired_verdict,
    relative_difference,
)


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


def test_one_factor_pairs_of_a_partial_grid():
    # k x T x alpha as in the sweep, with the cell (64, 2, 1) missing
    cells = {
        (8.0, 1.0, 0.5): "a",
        (8.0, 1.0, 1.0): "b",
        (8.0, 2.0, 0.5): "c",
        (64.0, 1.0, 0.5): "d",
        (64.0, 2.0, 0.5): "e",
        (64.0, 1.0, 1.0): "f",
    }
    pairs = dict(one_factor_pairs(cells))
    # k: 64 vs 8 with (T, alpha) fixed: (1, .5), (1, 1), (2, .5)
    assert pairs[0] == [
        ("d", "a", (64.0, 1.0, 0.5)),
        ("f", "b", (64.0, 1.0, 1.0)),
        ("e", "c", (64.0, 2.0, 0.5)),
    ]
    # T: 2 vs 1; (k=8, alpha=1) and (64, 1) have no T = 2 cell
    assert pairs[1] == [("c", "a", (8.0, 2.0, 0.5)), ("e", "d", (64.0, 2.0, 0.5))]
    # alpha: 1 vs 0.5; only the T = 1 cells have both
    assert pairs[2] == [("b", "a", (8.0, 1.0, 1.0)), ("f", "d", (64.0, 1.0, 1.0))]


def test_one_factor_pairs_skip_constant_factors_and_refuse_ragged_keys():
    assert one_factor_pairs({(1.0, 5.0): "x", (2.0, 5.0): "y"}) == [(0, [("y", "x", (2.0, 5.0))])]
    assert one_factor_pairs({}) == []
    with pytest.raises(ValueError, match="same number of factors"):
        one_factor_pairs({(1.0,): "x", (1.0, 2.0): "y"})


def test_paired_differences_and_sign_test_by_hand():
    a = {1: 90.0, 2: 110.0, 3: 95.0, 4: 50.0}
    b = {1: 100.0, 2: 100.0, 3: 100.0}  # seed 4 has no twin: left out
    p = paired(a, b)
    assert p.seeds == (1, 2, 3)
    assert p.relative == pytest.approx((-0.1, 0.1, -0.05))
    assert (p.lower, p.higher) == (2, 1)
    assert p.sign_test_p == 1.0  # 2 * (C(3,0) + C(3,1)) / 8 = 1
    all_lower = paired({s: 1.0 for s in range(3)}, {s: 2.0 for s in range(3)})
    assert all_lower.sign_test_p == pytest.approx(0.25)  # 2 / 2^3
    six = paired({s: 1.0 for s in range(6)}, {s: 2.0 for s in range(6)})
    assert six.sign_test_p == pytest.approx(2 / 64)
    # 5 lower, 1 higher: 2 * (1 + 6) / 64
    mixed = paired({s: (3.0 if s == 0 else 1.0) for s in range(6)}, {s: 2.0 for s in range(6)})
    assert (mixed.lower, mixed.higher) == (5, 1)
    assert mixed.sign_test_p == pytest.approx(14 / 64)
    ties = paired({1: 2.0, 2: 2.0}, {1: 2.0, 2: 2.0})
    assert (ties.lower, ties.higher, ties.sign_test_p) == (0, 0, 1.0)
    with pytest.raises(ValueError, match="common seeds"):
        paired({1: 1.0}, {2: 1.0})


def test_paired_verdict_decides_only_where_the_seed_ranges_overlap():
    # the CE twin's seeds spread more than the gap, but every seed of the student is lower
    student = {s: v for s, v in enumerate([243.4, 250.0, 255.0, 258.0, 260.0, 261.4], 1)}
    twin = {s: v for s, v in enumerate([251.9, 262.0, 270.0, 275.0, 278.0, 282.7], 1)}
    a, b = SeedSpread.of(list(student.values())), SeedSpread.of(list(twin.values()))
    assert compare(a, b) == "within seed noise"
    pair = paired(student, twin)
    assert paired_verdict(pair) == "better" and paired_verdict(paired(twin, student)) == "worse"
    assert combined_verdict(a, b, pair) == ("better", True)
    assert combined_verdict(b, a, paired(twin, student)) == ("worse", True)
    # five of six agreeing (p = 14/64) is not enough, nor is no pairing at all
    five = {**student, 6: 290.0}
    assert paired_verdict(paired(five, twin)) == "within seed noise"
    assert combined_verdict(SeedSpread.of(list(five.values())), b, paired(five, twin)) == (
        "within seed noise",
        False,
    )
    assert combined_verdict(a, b, None) == ("within seed noise", False)
    # disjoint ranges decide by themselves
    far = SeedSpread.of([100.0, 101.0])
    assert combined_verdict(far, b, None) == ("better", False)
