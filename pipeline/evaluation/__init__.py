"""Evaluation of causal LMs: held-out perplexity and calibration, BLiMP minimal pairs, the run report.

Modules: :mod:`.loading` (model folders, tokenizers, checks against prepared data),
:mod:`.heldout` (loss, perplexity), :mod:`.calibration` (ECE, reliability diagram), :mod:`.blimp`
(reading, scoring, accuracies), :mod:`.evaluate` (the results JSON), :mod:`.report` (figures and HTML),
:mod:`.compare` (seed spreads and verdicts for docs/results.md).
"""

from logitcache.pipeline.evaluation.blimp import BlimpResult, evaluate_blimp, read_blimp, sentence_log_probs
from logitcache.pipeline.evaluation.calibration import ReliabilityDiagram, expected_calibration_error
from logitcache.pipeline.evaluation.evaluate import (
    EvalOptions,
    evaluate_models,
    evaluate_run,
    find_run_models,
    read_results,
    write_results,
)
from logitcache.pipeline.evaluation.heldout import HeldOutMetrics, evaluate_held_out

__all__ = [
    "BlimpResult",
    "EvalOptions",
    "HeldOutMetrics",
    "ReliabilityDiagram",
    "evaluate_blimp",
    "evaluate_held_out",
    "evaluate_models",
    "evaluate_run",
    "expected_calibration_error",
    "find_run_models",
    "read_blimp",
    "read_results",
    "sentence_log_probs",
    "write_results",
]
