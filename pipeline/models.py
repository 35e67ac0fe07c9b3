"""Building Hugging Face causal LMs from a :class:`ModelConfig`, and loading saved ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
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


# Files that hold a Hugging Face tokenizer (any one of them is enough for AutoTokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

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


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a saved HF causal LM: safetensors only (checked first, :func:`check_model_dir`), never
    remote code. A folder transformers cannot load is a one-line :class:`TeacherError`."""
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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
