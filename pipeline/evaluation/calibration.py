"""Calibration of next-token predictions: expected calibration error (ECE) and the reliability diagram.

At every predicted position n (N in all) the model's confidence is the largest probability of its
next-token distribution, ``c_n = max_v p(v | x_<=n)``, and the prediction is right when that token is
the actual next token, ``a_n = [argmax_v p(v | x_<=n) = x_{n+1}]``. The unit interval is cut into B
equal-width bins with edges ``e_b = b / B``; bin b (0-based) holds the confidences in
``(e_b, e_{b+1}]`` (a confidence of exactly 0 falls in bin 0). With n_b positions in bin b::

    conf_b = (1/n_b) sum_{n in b} c_n          acc_b = (1/n_b) sum_{n in b} a_n
    ECE    = sum_b (n_b / N) |acc_b - conf_b|

Empty bins add nothing to the ECE; the diagram reports them with count 0 and no conf/acc. B = 15 as
in Guo et al. (2017), "On Calibration of Modern Neural Networks".

:class:`CalibrationAccumulator` bins batch after batch on the model's device (sums in float64);
:func:`expected_calibration_error` is the plain NumPy computation of the same number from all
confidences at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from logitcache.pipeline.config import EvalConfig

DEFAULT_BINS = EvalConfig.ece_bins  # B = 15, the one default (config's [evaluate] section)


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin data of a reliability diagram and the ECE it gives."""

    edges: list[float]  # (B + 1,) bin edges, 0 .. 1
    count: list[int]  # (B,) positions per bin
    confidence: list[float]  # (B,) mean confidence per bin (NaN where the bin is empty)
    accuracy: list[float]  # (B,) fraction right per bin (NaN where the bin is empty)
    ece: float
    total: int  # N, the number of positions

    @property
    def num_bins(self) -> int:
        return len(self.count)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN (empty bin) becomes null."""

        def clean(values: list[float]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        return {
            "ece": self.ece,
            "total": self.total,
            "edges": self.edges,
            "count": self.count,
            "confidence": clean(self.confidence),
            "accuracy": clean(self.accuracy),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReliabilityDiagram:
        def nan(values: list[float | None]) -> list[float]:
            return [math.nan if v is None else float(v) for v in values]

        return cls(
            edges=[float(e) for e in raw["edges"]],
            count=[int(c) for c in raw["count"]],
            confidence=nan(raw["confidence"]),
            accuracy=nan(raw["accuracy"]),
            ece=float(raw["ece"]),
            total=int(raw["total"]),
        )


def bin_edges(num_bins: int) -> np.ndarray:
    """(B + 1,) equal-width edges over [0, 1] (float64)."""
    return np.linspace(0.0, 1.0, num_bins + 1)


class CalibrationAccumulator:
    """Bins (confidence, right/wrong) pairs batch by batch; :meth:`result` gives the diagram and ECE."""

    def __init__(self, num_bins: int = DEFAULT_BINS, *, device: torch.device | str = "cpu") -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self._edges = torch.from_numpy(bin_edges(num_bins)).to(device)  # (B + 1,) float64
        self._count = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self._conf_sum = torch.zeros(num_bins, dtype=torch.float64, device=device)
        self._correct_sum = torch.zeros(num_bins, dtype=torch.float64, device=device)

    def update(self, confidence: torch.Tensor, correct: torch.Tensor) -> None:
        """Add positions: ``confidence`` in [0, 1] and ``correct`` (bool), any equal shapes."""
        conf = confidence.detach().reshape(-1).to(self._edges.device, torch.float64)  # (n,)
        right = correct.detach().reshape(-1).to(self._edges.device, torch.float64)  # (n,)
        # bucketize (right=False) gives i with edges[i-1] < c <= edges[i]: bin i - 1; 0 goes to bin 0.
        index = (torch.bucketize(conf, self._edges, right=False) - 1).clamp_(0, self.num_bins - 1)
        self._count += torch.bincount(index, minlength=self.num_bins).to(torch.float64)
        self._conf_sum += torch.bincount(index, weights=conf, minlength=self.num_bins)
        self._correct_sum += torch.bincount(index, weights=right, minlength=self.num_bins)

    def result(self) -> ReliabilityDiagram:
        count = self._count.cpu().numpy()
        conf_sum = self._conf_sum.cpu().numpy()
        correct_sum = self._correct_sum.cpu().numpy()
        total = float(count.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            confidence = np.where(count > 0, conf_sum / count, np.nan)
            accuracy = np.where(count > 0, correct_sum / count, np.nan)
        gaps = np.where(count > 0, np.abs(accuracy - confidence), 0.0)
        ece = float((count * gaps).sum() / total) if total > 0 else math.nan
        return ReliabilityDiagram(
            edges=bin_edges(self.num_bins).tolist(),
            count=[int(c) for c in count],
            confidence=confidence.tolist(),
            accuracy=accuracy.tolist(),
            ece=ece,
            total=int(total),
        )


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, *, num_bins: int = DEFAULT_BINS
) -> float:
    """ECE of all positions at once (NumPy): ``sum_b (n_b / N) |acc_b - conf_b|``, bins ``(b/B, (b+1)/B]``."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)  # (N,)
    right = np.asarray(correct, dtype=np.float64).reshape(-1)  # (N,)
    index = np.clip(np.searchsorted(bin_edges(num_bins), conf, side="left") - 1, 0, num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        members = index == b
        if members.any():
            ece += members.sum() / conf.size * abs(right[members].mean() - conf[members].mean())
    return float(ece)
