"""Opening what is evaluated: any Hugging Face causal LM folder, its tokenizer, and checks against the data.

Every failure a user can cause (no such folder, a folder that is not a causal LM, a model whose
tokenizer differs from the one the prepared data was tokenized with) is a one-line
:class:`~logitcache.pipeline.errors.TeacherError`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from logitcache.pipeline.errors import TeacherError
from logitcache.pipeline.models import has_tokenizer, load_model, max_positions, output_vocab_size  # noqa: F401 (max_positions, output_vocab_size: re-exported)
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.teacher_signal import vocab_error


def load_causal_lm(path: str | Path, *, device: torch.device) -> PreTrainedModel:
    """A saved HF causal LM in float32 and eval mode on ``device`` (safetensors only, checked before
    anything is opened: :func:`~logitcache.pipeline.models.load_model`)."""
    return load_model(Path(path)).to(device).eval()


def load_tokenizer(model_dir: Path, *, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved with the model, else the one in ``fallback`` (a prepared-data folder)."""
    source = model_dir if has_tokenizer(model_dir) else fallback
    if source is None:
        raise TeacherError(
            f"Expected a tokenizer in {model_dir} (tokenizer.json or tokenizer_config.json). Found none: "
            "pass --data RUN/data to use the tokenizer of the prepared data."
        )
    try:
        return AutoTokenizer.from_pretrained(source)
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherError(
            f"Expected a loadable tokenizer in {source}. Got an error ({reason[:200]})."
        ) from None


def check_model_matches_data(model: PreTrainedModel, model_dir: Path, data: PreparedData) -> None:
    """The prepared windows are token ids of the data's tokenizer: the loaded model must predict them
    all (its folder's tokenizer and config were checked before loading, ``check_teacher``)."""
    vocab = output_vocab_size(model)
    if vocab < data.vocab_size:
        raise vocab_error("the model", model_dir, data, vocab)
