"""ECE and reliability bins: hand-computed cases, bin edges, and a NumPy reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from logitcache.pipeline.evaluation.calibration import (
    CalibrationAccumulator,
    ReliabilityDiagram,
    expected_calibration_error,
)


def reference_bins(confidence: np.ndarray, correct: np.ndarray, num_bins: int):
    """Independent reference: bin b holds lower < c <= upper (c == 0 in bin 0), by explicit comparisons."""
    edges = [b / num_bins for b in range(num_bins + 1)]
    count, conf, acc = [], [], []
    for b in range(num_bins):
        lower, upper = edges[b], edges[b + 1]
        members = [i for i, c in enumerate(confidence) if (lower < c <= upper) or (b == 0 and c == 0.0)]
        count.append(len(members))
        conf.append(sum(confidence[i] for i in members) / len(members) if members else math.nan)
        acc.append(sum(correct[i] for i in members) / len(members) if members else math.nan)
    n = len(confidence)
    ece = sum(k / n * abs(a - c) for k, a, c in zip(count, acc, conf, strict=True) if k)
    return count, conf, acc, ece


def accumulate(confidence, correct, num_bins=15, chunks=1) -> ReliabilityDiagram:
    acc = CalibrationAccumulator(num_bins)
    for conf_part, right_part in zip(
        np.array_split(np.asarray(confidence), chunks),
        np.array_split(np.asarray(correct), chunks),
        strict=True,
    ):
        acc.update(torch.as_tensor(conf_part), torch.as_tensor(right_part, dtype=torch.bool))
    return acc.result()


def test_ece_of_a_hand_computed_example():
    # 15 bins of width 1/15 = 0.0667. Positions and their bins:
    #   0.95 -> bin 14 (0.933, 1],  right        0.91, 0.92 -> bin 13 (0.867, 0.933], one right
    #   0.30 -> bin 4 (0.267, 0.333], wrong      0.62 -> bin 9 (0.6, 0.667], right
    # bin 14: |1 - 0.95| = 0.05 (1 position); bin 13: |0.5 - 0.915| = 0.415 (2);
    # bin 4: |0 - 0.3| = 0.3 (1); bin 9: |1 - 0.62| = 0.38 (1)
    # ECE = (0.05 + 2 * 0.415 + 0.3 + 0.38) / 5 = 1.56 / 5 = 0.312
    confidence = [0.95, 0.91, 0.92, 0.30, 0.62]
    correct = [True, True, False, False, True]
    diagram = accumulate(confidence, correct)
    assert diagram.ece == pytest.approx(0.312, abs=1e-12)
    assert expected_calibration_error(np.array(confidence), np.array(correct)) == pytest.approx(
        0.312, abs=1e-12
    )
    assert diagram.total == 5
    assert diagram.count == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1]
    assert diagram.confidence[13] == pytest.approx(0.915)
    assert diagram.accuracy[13] == 0.5
    assert math.isnan(diagram.confidence[0]) and math.isnan(diagram.accuracy[0])
    as_dict = diagram.to_dict()
    assert as_dict["confidence"][0] is None and as_dict["accuracy"][0] is None
    assert ReliabilityDiagram.from_dict(as_dict).count == diagram.count


def test_confidences_on_bin_edges_go_to_the_lower_bin():
    edges = np.linspace(0.0, 1.0, 16)
    confidence = np.array([0.0, edges[1], edges[5], np.nextafter(edges[5], 1.0), 1.0])
    diagram = accumulate(confidence, np.ones(5, dtype=bool))
    expected = [0] * 15
    for b in (0, 0, 4, 5, 14):
        expected[b] += 1
    assert diagram.count == expected
    assert reference_bins(confidence, np.ones(5), 15)[0] == expected


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_accumulated_bins_and_ece_match_the_reference(num_bins: int):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.5, size=(3000, 20))  # (N, V)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    confidence = probs.max(-1)
    targets = np.array([rng.choice(20, p=p) for p in probs])
    correct = probs.argmax(-1) == targets
    count, conf, acc, ece = reference_bins(confidence, correct, num_bins)
    diagram = accumulate(confidence, correct, num_bins, chunks=7)  # several updates
    assert diagram.count == count
    np.testing.assert_allclose(diagram.confidence, conf, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(diagram.accuracy, acc, rtol=1e-12, equal_nan=True)
    # float64 sums in another order: agreement to ~1e-15 relative; 1e-12 leaves room.
    assert diagram.ece == pytest.approx(ece, rel=1e-12, abs=1e-15)
    assert expected_calibration_error(confidence, correct, num_bins=num_bins) == pytest.approx(ece, rel=1e-12)


def test_a_calibrated_predictor_has_small_ece_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.0, 1.0, 200_000)
    calibrated = rng.uniform(size=confidence.size) < confidence  # right with probability = confidence
    # Sampling noise per bin ~ sqrt(0.25 / 13_000) = 0.004; the ECE averages such gaps.
    assert accumulate(confidence, calibrated).ece < 0.01
    overconfident = rng.uniform(size=confidence.size) < confidence**2  # accuracy c^2 < c
    # E|c - c^2| over c ~ U(0, 1) = 1/6.
    assert accumulate(confidence, overconfident).ece == pytest.approx(1 / 6, abs=0.01)
