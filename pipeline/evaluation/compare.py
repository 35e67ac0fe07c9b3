"""Compare models trained with several seeds: mean, spread, and a verdict that respects the noise.

A claim such as "the distilled student beats its CE twin" is only as good as the difference between
the two relative to how much each moves with the seed. The rule used in docs/results.md is simple
and conservative: ``a`` is better than ``b`` (lower is better: perplexity, loss, ECE) only when
every seed of ``a`` is below every seed of ``b`` (their min-max ranges do not overlap); worse when
the reverse holds; otherwise the difference is within seed noise. A single run (e.g. one trained
teacher) is a range of width zero: its own seed noise is unknown, which the verdict text says.

:func:`paired` adds the finer view: with the same seed two students share initialisation and data
order, so per-seed differences (and how many seeds go each way, with an exact sign test) show a
consistent effect that overlapping ranges hide. :func:`one_factor_pairs` finds the cells of a
sweep that differ in one factor only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["better", "worse", "within seed noise"]


@dataclass(frozen=True)
class SeedSpread:
    """One metric of one model variant over its seeds."""

    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("Expected at least one value. Got none.")

    @classmethod
    def of(cls, values: Sequence[float]) -> SeedSpread:
        return cls(tuple(float(v) for v in values))

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def format(self, digits: int) -> str:
        """``mean (min-max)``, or the value alone for a single run."""
        if len(self.values) == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def compare(a: SeedSpread, b: SeedSpread) -> Verdict:
    """``a`` vs ``b`` for a metric where lower is better (see the module docstring)."""
    if a.high < b.low:
        return "better"
    if a.low > b.high:
        return "worse"
    return "within seed noise"


def relative_difference(a: SeedSpread, b: SeedSpread) -> float:
    """``(mean a - mean b) / mean b``."""
    return (a.mean - b.mean) / b.mean


@dataclass(frozen=True)
class PairedDifference:
    """``a`` vs ``b`` seed by seed: the same seed gives both the same initialisation and data order,
    so a per-seed difference removes the noise the two share (often most of it at small scale).
    """

    seeds: tuple[int, ...]
    relative: tuple[float, ...]  # (a_s - b_s) / b_s for each seed s

    @property
    def lower(self) -> int:
        """Seeds where ``a`` is lower."""
        return sum(d < 0 for d in self.relative)

    @property
    def higher(self) -> int:
        return sum(d > 0 for d in self.relative)

    @property
    def sign_test_p(self) -> float:
        """Two-sided exact sign test of "lower as often as higher" (ties dropped).

        Three seeds can never go below p = 0.25; six that agree give 0.031.
        """
        n = self.lower + self.higher
        if n == 0:
            return 1.0
        tail = sum(math.comb(n, i) for i in range(min(self.lower, self.higher) + 1))
        return min(1.0, 2 * tail / 2**n)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference:
    """Per-seed relative differences of ``a`` and ``b`` (value by seed) over the seeds both have."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"Expected runs with common seeds. Got seeds {sorted(a)} and {sorted(b)}.")
    return PairedDifference(seeds, tuple((a[s] - b[s]) / b[s] for s in seeds))


def paired_verdict(pair: PairedDifference, *, level: float = 0.05) -> Verdict:
    """``a`` vs ``b`` by their per-seed differences: "better"/"worse" when the sign test rejects "lower
    as often as higher" at ``level`` (six seeds must all agree), else "within seed noise"."""
    if pair.sign_test_p < level and pair.lower != pair.higher:
        return "better" if pair.lower > pair.higher else "worse"
    return "within seed noise"


def combined_verdict(a: SeedSpread, b: SeedSpread, pair: PairedDifference | None) -> tuple[Verdict, bool]:
    """The seed-range verdict (:func:`compare`); where the ranges overlap, the paired one
    (:func:`paired_verdict`) when it is not noise. Returns (verdict, decided by the pairs)."""
    verdict = compare(a, b)
    if verdict == "within seed noise" and pair is not None:
        by_pairs = paired_verdict(pair)
        if by_pairs != "within seed noise":
            return by_pairs, True
    return verdict, False


def one_factor_pairs(
    cells: Mapping[tuple[float, ...], str],
) -> list[tuple[int, list[tuple[str, str, tuple[float, ...]]]]]:
    """Pairs of grid cells that differ in one factor only, for one-factor-at-a-time verdicts.

    ``cells`` maps each cell's factor values (the same number of factors in every key) to its name.
    For each factor that takes two or more values: ``(factor index, pairs)`` where each pair is
    ``(name at the factor's highest value, name at its lowest value, the cell key at the highest)``
    for every cell whose twin at the lowest value exists with all other factors equal.
    """
    widths = {len(key) for key in cells}
    if len(widths) > 1:
        raise ValueError(f"Expected cells with the same number of factors. Got key lengths {sorted(widths)}.")
    out = []
    for axis in range(widths.pop() if widths else 0):
        values = sorted({key[axis] for key in cells})
        if len(values) < 2:
            continue
        low, high = values[0], values[-1]
        pairs = []
        for key, name in sorted(cells.items()):
            twin = (*key[:axis], low, *key[axis + 1 :])
            if key[axis] == high and twin in cells:
                pairs.append((name, cells[twin], key))
        out.append((axis, pairs))
    return out


def headline_lines(results: Mapping) -> list[str]:
    """What one run's evaluation says about distillation, one sentence each.

    Held-out perplexity: every student against the CE twin (``students/ce``), and the best student
    against the best single teacher and the teachers' ensemble, e.g. ``students/cache: test
    perplexity 239.05 vs 266.71 for students/ce (-10.4 %)``. BLiMP (when scored): every student
    against the CE twin, and every model against its random-init twin (``random_twins``). One seed:
    the seed spread is not known from one run.
    """

    def perplexity(entry: Mapping) -> float | None:
        held = entry.get("held_out") or {}
        value = held.get("perplexity")
        return value if isinstance(value, int | float) and math.isfinite(value) else None

    models = {m["name"]: perplexity(m) for m in results.get("models", [])}
    references = {r["name"]: perplexity(r) for r in results.get("references", [])}
    split = next((m["held_out"]["split"] for m in results.get("models", []) if m.get("held_out")), "held-out")
    lines = []
    twin = models.get("students/ce")
    students = {n: p for n, p in models.items() if n.startswith("students/") and p is not None}
    for name, value in students.items():
        if name != "students/ce" and twin is not None:
            lines.append(
                f"{name}: {split} perplexity {value:.2f} vs {twin:.2f} for students/ce ({(value - twin) / twin:+.1%})"
            )
    teachers = {n: p for n, p in models.items() if n.startswith("teachers/") and p is not None}
    if students and teachers:
        best_name, best = min(students.items(), key=lambda item: item[1])
        teacher_name, teacher = min(teachers.items(), key=lambda item: item[1])
        text = f"best student {best_name} ({best:.2f}) vs best teacher {teacher_name} ({teacher:.2f}): {(best - teacher) / teacher:+.1%}"
        ensemble = references.get("teachers/ensemble")
        if ensemble is not None:
            text += f"; vs the teachers' ensemble ({ensemble:.2f}): {(best - ensemble) / ensemble:+.1%}"
        lines.append(text)
    unigram = references.get("unigram")
    if teachers and unigram is not None:
        worst_name, worst = max(teachers.items(), key=lambda item: item[1])
        lines.append(
            f"weakest teacher {worst_name} ({worst:.2f}) vs a unigram model ({unigram:.2f}): {(worst - unigram) / unigram:+.1%}"
        )
    blimp = {m["name"]: 100 * m["blimp"]["overall"] for m in results.get("models", []) if m.get("blimp")}
    twin_ce = blimp.get("students/ce")
    for name, value in blimp.items():
        if name.startswith("students/") and name != "students/ce" and twin_ce is not None:
            lines.append(
                f"{name}: BLiMP {value:.1f} % vs {twin_ce:.1f} % for students/ce ({value - twin_ce:+.1f} points)"
            )
    for twin in results.get("random_twins", []):
        if not twin.get("blimp"):
            continue
        chance = 100 * twin["blimp"]["overall"]
        for name in twin.get("twin_of", []):
            if name in blimp:
                lines.append(
                    f"{name}: BLiMP {blimp[name]:.1f} % vs {chance:.1f} % for its random-init twin "
                    f"({blimp[name] - chance:+.1f} points)"
                )
    return lines
