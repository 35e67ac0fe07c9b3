"""Building Hugging Face causal LMs from a :class:`ModelConfig`, and loading saved ones."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from logitcache.pipeline.config import ModelConfig
from logitcache.pipeline.errors import TeacherError
from logitcache.pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID

# Our own progress bars cover the long work; transformers' per-save "Writing model shards" bars
# would only add noise to logs.
hf_logging.disable_progress_bar()


def build_model(config: ModelConfig, *, vocab_size: int, seq_len: int, seed: int) -> PreTrainedModel:
    """A freshly initialised LlamaForCausalLM or GPT2LMHeadModel (initialisation seeded)."""
    max_positions = config.max_position_embeddings or seq_len
    common = dict(
        vocab_size=vocab_size,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=config.tie_word_embeddings,
    )
    if config.family == "llama":
        hf_config = LlamaConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads or config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=max_positions,
            rope_theta=config.rope_theta,
            attention_dropout=config.dropout,
            **common,
        )
        model_cls: type[PreTrainedModel] = LlamaForCausalLM
    else:
        hf_config = GPT2Config(
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            n_positions=max_positions,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **common,
        )
        model_cls = GPT2LMHeadModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(hf_config)
    return model


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved HF causal LM (safetensors; never remote code)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"Expected a Hugging Face model directory (with config.json) at {path}. Found none."
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
