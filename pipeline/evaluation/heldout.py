"""Held-out perplexity, loss per token and calibration of next-token predictions on prepared windows.

Every window of a prepared split is a full stretch of the packed ``<s> doc </s>`` stream, so every
position after the first is a target. Over the N = windows x (seq_len - 1) targets::

    loss       = -(1/N) sum_n log p(x_{n+1} | x_<=n)     (nats per token)
    perplexity = exp(loss)

The same forward pass feeds the calibration bins (see :mod:`.calibration`): confidence
``max_v p(v | x_<=n)``, right when the argmax is ``x_{n+1}``. Logits are taken to float32 before the
softmax; the loss sum is accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from logitcache.pipeline.config import EvalConfig
from logitcache.pipeline.errors import DataError, TeacherError
from logitcache.pipeline.evaluation.calibration import (
    DEFAULT_BINS,
    CalibrationAccumulator,
    ReliabilityDiagram,
)
from logitcache.pipeline.evaluation.loading import max_positions, output_vocab_size
from logitcache.pipeline.progress import progress_bar


@dataclass(frozen=True)
class HeldOutMetrics:
    split: str
    windows: int
    tokens: int  # N, the predicted positions
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    calibration: ReliabilityDiagram

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "windows": self.windows,
            "tokens": self.tokens,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "ece": self.calibration.ece,
            "reliability": self.calibration.to_dict(),
        }


@torch.no_grad()
def evaluate_held_out(
    model: PreTrainedModel,
    windows: np.ndarray | torch.Tensor,
    *,
    split: str = "",
    batch_size: int = EvalConfig.batch_size,
    num_bins: int = DEFAULT_BINS,
    progress: bool | None = None,
) -> HeldOutMetrics:
    """Loss, perplexity and reliability diagram of ``model`` on ``windows`` (num_windows, seq_len)."""
    ids = _check_windows(windows, split)
    limit = max_positions(model)
    if limit is not None and ids.shape[1] > limit:
        raise TeacherError(
            f"Expected windows of at most {limit} tokens (the model's limit). Got {ids.shape[1]}."
        )
    if int(ids.max()) >= output_vocab_size(model):
        raise TeacherError(
            f"Expected token ids below the model's vocabulary ({output_vocab_size(model)}). Got id {int(ids.max())}."
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return held_out_metrics(
            lambda batch: model(input_ids=batch.to(device)).logits,
            ids,
            split=split,
            batch_size=batch_size,
            num_bins=num_bins,
            progress=progress,
            device=device,
        )
    finally:
        model.train(was_training)


def _check_windows(windows: np.ndarray | torch.Tensor, split: str) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(windows).astype(np.int64))  # (W, T)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DataError(
            f"Expected the {split or 'held-out'} split to hold windows of >= 2 tokens. Got shape {tuple(ids.shape)}: "
            "use the other split (--split) or prepare more data."
        )
    return ids


@torch.no_grad()
def held_out_metrics(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    windows: np.ndarray | torch.Tensor,
    *,
    split: str = "",
    batch_size: int = EvalConfig.batch_size,
    num_bins: int = DEFAULT_BINS,
    progress: bool | None = None,
    device: torch.device | str = "cpu",
) -> HeldOutMetrics:
    """The metrics of any next-token predictor: ``logits_fn(ids (B, T)) -> (B, T, V)`` logits or log-probs."""
    ids = _check_windows(windows, split)
    calibration = CalibrationAccumulator(num_bins, device=device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in progress_bar(
        range(0, ids.shape[0], batch_size), progress=progress, desc=f"perplexity {split}".strip(), leave=False
    ):
        batch = ids[start : start + batch_size].to(device)  # (B, T)
        logits = logits_fn(batch)[:, :-1].float()  # (B, T-1, V)
        log_normalizer = torch.logsumexp(logits, dim=-1)  # (B, T-1)
        targets = batch[:, 1:]  # (B, T-1)
        # log p(target) = z_target - logsumexp(z): no (B, T-1, V) log-softmax is materialised.
        target_log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_normalizer  # (B, T-1)
        nll_sum -= target_log_probs.double().sum()
        max_logit, predicted = logits.max(dim=-1)  # (B, T-1) each
        calibration.update(torch.exp(max_logit - log_normalizer), predicted == targets)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    loss = float(nll_sum) / tokens
    return HeldOutMetrics(
        split=split,
        windows=int(ids.shape[0]),
        tokens=int(tokens),
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        calibration=calibration.result(),
    )
