"""The byte-level BPE tokenizer (Hugging Face `tokenizers`), as in BabyLlama.

NFKC normalisation, byte-level pre-tokenisation (every byte sequence is encodable, no unknown
token), special tokens ``<pad>``=0, ``<s>``=1, ``</s>``=2. Encoding with special tokens prepends
``<s>``, like Llama tokenizers, so ``tokenizer(text)`` gives what the models were trained on.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

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
