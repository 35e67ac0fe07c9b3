"""Reference predictors a run's models are read against: the teachers' ensemble and a unigram model.

* **ensemble**: the distribution the cache stores entries of, ``ensemble_logprobs`` of the
  teachers with the config's ``[cache]`` rule and weights, at temperature 1 (a language model's
  perplexity, whatever temperature the cache uses). A distilled student is trained towards it, so
  "does the student beat its teachers" asks about this row as much as about each teacher.
* **unigram**: the token frequencies of the training split's targets, add-one smoothed over the
  vocabulary. A teacher that is not clearly better than this has little to teach.

Both are scored exactly like a model (:func:`~.heldout.held_out_metrics`: same windows, targets,
loss and calibration bins).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from logitcache.pipeline.config import Config
from logitcache.pipeline.evaluation.heldout import held_out_metrics
from logitcache.pipeline.prepare import PreparedData

ENSEMBLE = "teachers/ensemble"
UNIGRAM = "unigram"


def unigram_logprobs(train_windows: np.ndarray, vocab_size: int) -> torch.Tensor:
    """(V,) log-probabilities of each token among the train split's targets (positions 1..T-1), add-one smoothed."""
    counts = np.bincount(np.asarray(train_windows)[:, 1:].reshape(-1).astype(np.int64), minlength=vocab_size)
    counts = counts[:vocab_size].astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


def reference_entries(
    config: Config,
    data: PreparedData,
    *,
    split: str,
    batch_size: int,
    num_bins: int,
    device: torch.device,
    teacher_dirs: dict[str, Any],
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """The results entries of the references (``name``, ``description``, ``held_out``) for ``split``."""
    from logitcache.pipeline.teacher_signal import TeacherEnsemble  # loads transformers models

    windows = data.windows(split)
    entries = []
    if len(teacher_dirs) >= 2:
        cache = dataclasses.replace(config.cache, temperature=1.0)
        ensemble = TeacherEnsemble(teacher_dirs, data, device, cache=cache, seed=config.run.seed)
        metrics = held_out_metrics(
            ensemble.logprobs,
            windows,
            split=split,
            batch_size=batch_size,
            num_bins=num_bins,
            progress=progress,
            device=device,
        )
        rule = config.cache.ensemble + (
            f", weights {list(config.cache.weights)}" if config.cache.weights else ""
        )
        entries.append(
            {
                "name": ENSEMBLE,
                "description": f"the teachers' ensemble ({rule}, temperature 1): what the cache stores the entries of",
                "held_out": metrics.to_dict(),
            }
        )
    unigram = unigram_logprobs(data.windows("train"), data.vocab_size).to(device)
    metrics = held_out_metrics(
        lambda batch: unigram.expand(*batch.shape, -1),
        windows,
        split=split,
        batch_size=batch_size,
        num_bins=num_bins,
        device=device,
    )
    entries.append(
        {
            "name": UNIGRAM,
            "description": "token frequencies of the training targets, add-one smoothed",
            "held_out": metrics.to_dict(),
        }
    )
    return entries
