"""The tokenizer of the prepared data: a byte-level BPE trained on the corpus, or a pretrained one.

The trained tokenizer (Hugging Face `tokenizers`, as in BabyLlama): NFKC normalisation, byte-level
pre-tokenisation (every byte sequence is encodable, no unknown token), special tokens
``<pad>``=0, ``<s>``=1, ``</s>``=2. Encoding with special tokens prepends ``<s>``, like Llama
tokenizers, so ``tokenizer(text)`` gives what the models were trained on.

A pretrained tokenizer (``data.tokenizer``, e.g. the teachers' own) is any Hugging Face fast
tokenizer folder, loaded with ``AutoTokenizer`` (never remote code): :func:`load_pretrained_tokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from logitcache.pipeline.errors import DataError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID), strict=True):
        if tokenizer.token_to_id(token) != expected:  # guaranteed by the trainer; checked once here
            raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}")
    return tokenizer


# transformers' own "no limit" value (VERY_LARGE_INTEGER would be 1e30); for the prepared data's
# tokenizer, which belongs to no model. Model folders get the model's real limit.
UNLIMITED_LENGTH = 1_000_000


def load_hf_tokenizer(
    tokenizer_json: Path, *, model_max_length: int = UNLIMITED_LENGTH
):  # -> PreTrainedTokenizerFast
    """The tokenizer as a transformers ``PreTrainedTokenizerFast`` (for save_pretrained/from_pretrained).

    ``model_max_length``: the most positions of the model it is saved with (what truncation and
    pipelines use); unlimited for the prepared data's copy.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        model_max_length=model_max_length,
    )


def load_pretrained_tokenizer(path: str | Path) -> Any:  # -> PreTrainedTokenizerFast
    """The Hugging Face fast tokenizer in folder ``path`` (``data.tokenizer``); a one-line
    :class:`~logitcache.pipeline.errors.DataError` when there is none or it is not a fast one."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(
            f"Expected data.tokenizer to be a Hugging Face tokenizer folder. Got {str(path)!r}, "
            f"{'a file' if path.exists() else 'which does not exist'}."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"Expected a tokenizer AutoTokenizer can load at data.tokenizer = {str(path)!r}. Got: {reason[:200]}"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"Expected a fast tokenizer (tokenizer.json) at data.tokenizer = {str(path)!r}. Got the slow "
            f"{type(tokenizer).__name__}: save it once with a fast class (e.g. install `sentencepiece` and "
            "re-save with AutoTokenizer) and point data.tokenizer at that folder."
        )
    return tokenizer


def vocabulary_size(vocab: dict[str, int]) -> int:
    """Number of token ids a tokenizer uses: its largest id + 1 (added tokens included)."""
    return max(vocab.values()) + 1
