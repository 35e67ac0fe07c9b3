"""Building Hugging Face causal LMs from a :class:`ModelConfig`, and loading saved ones.

A model is built from the size keys of its :class:`ModelConfig` (``family`` "llama", "gpt2", or any
other transformers model type, e.g. "qwen2", "mistral", given the same Llama-style sizes), or from
the architecture in an HF folder (``path``: its config.json), freshly initialised or, with
``init = "pretrained"``, from the folder's weights. Weights are read from safetensors only, and
never with remote code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from logitcache.pipeline.config import BUILT_IN_FAMILIES, ModelConfig
from logitcache.pipeline.errors import ConfigError, TeacherError
from logitcache.pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID

# Our own progress bars cover the long work; transformers' per-save "Writing model shards" bars
# would only add noise to logs.
hf_logging.disable_progress_bar()


# The special token ids of the project's own BPE tokenizer (data prepared without data.tokenizer).
DEFAULT_TOKEN_IDS: Mapping[str, int | None] = {
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

# Torch dtypes by the names configs use ("auto" = as the weights are stored).
DTYPES: Mapping[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def build_model(
    config: ModelConfig,
    *,
    vocab_size: int,
    seq_len: int,
    seed: int,
    token_ids: Mapping[str, int | None] | None = None,
    where: str = "the model",
) -> PreTrainedModel:
    """The model of ``config`` for a vocabulary of ``vocab_size`` tokens and windows of ``seq_len``.

    Fresh models (initialisation seeded by ``seed``) get ``vocab_size`` output rows and the special
    token ids ``token_ids`` (``{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}``;
    default: the project's BPE tokenizer's). A pretrained one keeps its own (it must have at least
    ``vocab_size`` output rows; padded rows beyond are allowed). Every model must take ``seq_len``
    positions. ``where`` names the model in errors (e.g. ``student.model``).
    """
    ids = dict(DEFAULT_TOKEN_IDS if token_ids is None else token_ids)
    if config.init == "pretrained":
        # float32 master weights whatever the stored dtype (training autocasts to bf16 on CUDA)
        model = load_model(config.path, dtype=torch.float32)
    else:
        hf_config, model_cls = _hf_config(
            config, vocab_size=vocab_size, seq_len=seq_len, token_ids=ids, where=where
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                if model_cls is not None:
                    model = model_cls(hf_config)
                else:  # float32 whatever dtype a folder's config names (training autocasts on CUDA)
                    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
            except (ValueError, TypeError, AttributeError) as exc:
                raise ConfigError(
                    f"Expected {where} to describe a model transformers can build. Got an error from "
                    f"{type(hf_config).__name__}: {_first_line(exc)}"
                ) from None
    check_model_fits(model, vocab_size=vocab_size, seq_len=seq_len, where=where)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _hf_config(
    config: ModelConfig, *, vocab_size: int, seq_len: int, token_ids: dict[str, Any], where: str
) -> tuple[Any, type[PreTrainedModel] | None]:
    """The transformers config of a fresh model, and its class (None: AutoModelForCausalLM decides)."""
    if config.path:
        hf_config = read_hf_config(config.path, where=where)
        hf_config.vocab_size = vocab_size  # the data's vocabulary, whatever the folder's tokenizer had
        for name, value in token_ids.items():
            setattr(hf_config, name, value)
        return hf_config, None
    positions = config.max_position_embeddings or seq_len
    common = dict(vocab_size=vocab_size, tie_word_embeddings=config.tie_word_embeddings, **token_ids)
    if config.family != "gpt2":
        # Llama, or any other transformers causal LM given the Llama-style names most of them share.
        llama_style = dict(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads or config.num_heads,
            intermediate_size=config.intermediate_size,
            max_position_embeddings=positions,
            rope_theta=config.rope_theta,
            attention_dropout=config.dropout,
            **common,
        )
        if config.family not in BUILT_IN_FAMILIES:
            return AutoConfig.for_model(config.family, **llama_style), None
        hf_config = LlamaConfig(**llama_style)
        model_cls: type[PreTrainedModel] = LlamaForCausalLM
    else:
        hf_config = GPT2Config(
            n_embd=config.hidden_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_inner=config.intermediate_size,
            n_positions=positions,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **common,
        )
        model_cls = GPT2LMHeadModel
    return hf_config, model_cls


def read_hf_config(path: str | Path, *, where: str = "the model") -> Any:
    """The transformers config in an HF model folder (never remote code)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"Expected a Hugging Face model directory (with config.json) at {path} ({where}). Found none."
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        raise TeacherError(
            f"Expected a config.json transformers can read at {path} ({where}). Got: {_first_line(exc)}"
        ) from None


# Files that hold a Hugging Face tokenizer (any one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a Hugging Face tokenizer (any of :data:`TOKENIZER_FILES`)."""
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


# Weight files that unpickle when read (arbitrary code can run): refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_model_dir(path: str | Path) -> list[Path]:
    """The safetensors weight files of the HF model folder ``path`` (checked before anything is opened).

    Refused (:class:`TeacherError`, one line with what to do): no such folder, no ``config.json``,
    and a folder whose weights are pickle files only (``pytorch_model.bin``, ``.pt``, ``.pth``,
    ``.ckpt``): those are never read, since unpickling can run code. Every safetensors file's header
    must parse and its data must be as long as the header says (a truncated download or copy). A
    folder with no weights at all is left to the loader, which names what it expected.
    """
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(
            f"Expected a model directory at {path}. Got {'a file' if path.exists() else 'nothing'}: pass the "
            "folder of a saved Hugging Face model."
        )
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"Expected a Hugging Face model directory (with config.json) at {path}. Found none: pass the folder "
            "of a saved model (save_pretrained)."
        )
    files = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files and pickles:
        raise TeacherError(
            f"Expected safetensors weights in {path}. Found only pickle weights ({', '.join(pickles[:3])}): "
            "pickle files are never loaded (they can run code). Convert them once, where you trust them: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)."
        )
    for file in files:
        problem = _safetensors_problem(file)
        if problem:
            raise TeacherError(
                f"Expected complete safetensors weights in {file}. Got {problem}: the file is damaged "
                "(an interrupted copy or download); copy or save it again."
            )
    return files


def _safetensors_problem(file: Path) -> str:
    """ "" when the file's header parses and its size is what the header says, else what is wrong."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a header"
            header_len = int.from_bytes(head, "little")
            if header_len > size - 8:
                return f"a header of {header_len} bytes in a file of {size}"
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"an unreadable header ({type(exc).__name__})"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header says {expected}"
    return ""


def load_model(path: str | Path, *, dtype: torch.dtype | str = torch.float32) -> PreTrainedModel:
    """Load a saved HF causal LM: safetensors only (checked first, :func:`check_model_dir`), never
    remote code. A folder transformers cannot load is a one-line :class:`TeacherError`.

    ``dtype``: a torch dtype, or ``"auto"`` for the dtype the weights are stored in.
    """
    path = Path(path)
    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
    except (ValueError, KeyError, OSError, RuntimeError, SafetensorError, json.JSONDecodeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TeacherError(
            f"Expected a Hugging Face causal language model at {path}. Got one transformers cannot load "
            f"as AutoModelForCausalLM ({reason[:200]})."
        ) from None


def output_vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output layer: the number of token ids the model can take and predict."""
    return int(model.get_output_embeddings().weight.shape[0])


def max_positions(model: PreTrainedModel) -> int | None:
    """The longest input the model takes (None when its config sets no limit)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model_fits(model: PreTrainedModel, *, vocab_size: int, seq_len: int, where: str) -> None:
    """Refuse a model with fewer output rows than the tokenizer has tokens, or fewer positions than a window.

    More output rows than tokens is fine: embeddings are often padded to a multiple of 64 or 128,
    and the padded ids are never used (their logits are cut off before any loss or top-k).
    """
    rows = output_vocab_size(model)
    if rows < vocab_size:
        raise TeacherError(
            f"Expected {where} to have at least {vocab_size} output logits (the tokenizer's vocabulary). "
            f"Got {rows}: it was made for another tokenizer."
        )
    limit = max_positions(model)
    if limit is not None and limit < seq_len:
        raise TeacherError(
            f"Expected {where} to take windows of data.seq_len = {seq_len} positions. Got a limit of {limit} "
            "(max_position_embeddings): use a smaller data.seq_len."
        )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
