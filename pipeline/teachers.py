"""`pipe train-teacher`: train one teacher LM on the prepared corpus (or adopt an existing one).

The finished teacher is a Hugging Face model folder, ``RUN/teachers/NAME``, holding the weights
(safetensors), config and tokenizer, so ``AutoModelForCausalLM.from_pretrained(RUN/teachers/NAME)``
and ``AutoTokenizer.from_pretrained(RUN/teachers/NAME)`` load it; checkpoints live in
``RUN/teachers/NAME/checkpoints/`` while it trains (a rerun after a crash resumes from the last
one) and are removed once the model is complete. A teacher
whose config names ``path`` is an existing HF model folder: nothing is trained, later stages read
it from there (its tokenizer must match the prepared data, checked when it is used). A teacher that
is trained may start from an HF folder's architecture or weights (``teachers.NAME.model.path``,
``init``): :func:`init_model`, shared with the student.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from logitcache.pipeline.config import Config, ModelConfig, TeacherConfig, teacher_fingerprint
from logitcache.pipeline.data_order import WindowsDataset
from logitcache.pipeline.distributed import DistContext, init_distributed
from logitcache.pipeline.errors import ConfigError
from logitcache.pipeline.models import build_model, check_model_dir, count_parameters
from logitcache.pipeline.preflight import (
    StageLock,
    check_writable,
    finish_replacement,
    move_aside,
    replaced_path,
)
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.rundir import (
    RunLayout,
    is_complete,
    mark_complete,
    read_marker,
    stage_is_done,
    write_provenance,
)
from logitcache.pipeline.tracking import TrackedModel
from logitcache.pipeline.training import CHECKPOINT_DIR, causal_lm_loss, make_plan, train_model


def teacher_config(config: Config, name: str) -> TeacherConfig:
    if name not in config.teachers:
        known = ", ".join(config.teachers) or "none"
        raise ConfigError(f"Unknown teacher {name!r}. The config defines: {known}. Pass one of them.")
    return config.teachers[name]


def teacher_dir(config: Config, name: str) -> Path:
    """Where teacher ``name`` lives: its configured ``path``, or ``RUN/teachers/NAME``."""
    teacher = teacher_config(config, name)
    return Path(teacher.path) if teacher.path else RunLayout.of(config).teacher(name)


def is_teacher_complete(config: Config, name: str) -> bool:
    if teacher_config(config, name).path:
        return True
    return is_complete(teacher_dir(config, name), teacher_fingerprint(config, name))


def _name_seed(name: str) -> int:
    return int.from_bytes(name.encode()[:4].ljust(4, b"\0"), "little")


def train_teacher(
    config: Config,
    name: str,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    ctx: DistContext | None = None,
) -> Path:
    """Train teacher ``name`` (resuming if interrupted); return its model folder."""
    teacher = teacher_config(config, name)
    out = teacher_dir(config, name)
    if teacher.path:
        if not (out / "config.json").is_file():
            raise ConfigError(
                f"teachers.{name}.path = {str(out)!r} is not a Hugging Face model folder (no config.json)."
            )
        check_model_dir(out)  # pickle-only or truncated weights: refused now, not at the next stage
        return out
    fingerprint = teacher_fingerprint(config, name)
    aside = replaced_path(out)
    if stage_is_done(out, fingerprint, overwrite=overwrite, what=f"a teacher '{name}'"):
        shutil.rmtree(aside, ignore_errors=True)  # an earlier --overwrite finished all but its cleanup
        remove_checkpoints(out)  # left by a crash between the marker and their removal
        return out
    # Everything is checked before anything is created, moved or deleted (see train_student).
    check_writable(out, f"the teacher '{name}'")
    data = PreparedData.open(RunLayout.of(config).data)
    seed = config.run.seed + _name_seed(name)
    model = init_model(teacher.model, data, seed=seed, where=f"teachers.{name}.model")
    ctx = ctx or init_distributed(config.run.device)
    train_windows = WindowsDataset(data.windows("train"))  # (N, T) windows, read by micro-batch
    dev_windows = torch.from_numpy(data.windows("dev").astype("int64"))  # (N_dev, T)
    make_plan(teacher.train, len(train_windows), ctx.world_size)  # a batch that does not fit: refused now

    with StageLock(out, f"the teacher '{name}'", enabled=ctx.is_main):
        if ctx.is_main:
            if overwrite:
                move_aside(out, aside, is_complete=read_marker(out) is not None)
            out.mkdir(parents=True, exist_ok=True)
            write_provenance(
                out, config, "train-teacher", {"teacher": name, "parameters": count_parameters(model)}
            )
        ctx.barrier()
        summary = train_model(
            model,
            train=teacher.train,
            dataset=train_windows,
            seq_len=data.seq_len,
            loss_fn=causal_lm_loss,
            dev_windows=dev_windows,
            out_dir=out,
            seed=seed,
            fingerprint=fingerprint,
            ctx=ctx,
            progress=progress,
            desc=f"teacher {name}",
            report_to=config.run.report_to,
            tracked=TrackedModel(RunLayout.of(config).root, "teachers", name),
        )
        if ctx.is_main:
            finalize_model_dir(
                out, model, data, summary | {"parameters": count_parameters(model)}, fingerprint
            )
            finish_replacement(aside)  # the new teacher is complete: only now the old one goes
        ctx.barrier()
    return out


def init_model(model: ModelConfig, data: PreparedData, *, seed: int, where: str) -> PreTrainedModel:
    """The model a teacher or student starts from: built from ``model`` for ``data`` (vocabulary,
    special tokens, window length). A folder it is built from (``model.path``) is checked against the
    data first, as teachers are (its tokenizer, if it has one; safetensors weights when pretrained)."""
    from logitcache.pipeline.teacher_signal import check_model_folder  # that module imports this one

    if model.path:
        check_model_folder(where, Path(model.path), data, weights=model.init == "pretrained")
    return build_model(
        model,
        vocab_size=data.vocab_size,
        seq_len=data.seq_len,
        seed=seed,
        token_ids=data.token_ids,
        where=where,
    )


def describe_training(out: Path) -> str:
    """What a finished model folder's ``train_summary.json`` says, for the log ("" when absent):
    steps, dev loss and the training throughput the loop measured (tokens/s; evaluation and
    checkpoints excluded), e.g. ``166 steps, dev loss 5.860, 14,012 tokens/s``."""
    path = out / "train_summary.json"
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text())
    rate = summary.get("tokens_per_s")
    speed = f", {rate:,.0f} tokens/s" if rate else ""
    return f"{summary['steps']} steps, dev loss {summary['dev_loss']:.3f}{speed}"


def finalize_model_dir(
    out: Path, model: torch.nn.Module, data: PreparedData, summary: dict[str, Any], fingerprint: str
) -> None:
    """Save the final model + tokenizer as an HF folder, mark it complete, then drop its checkpoints.

    The tokenizer's ``model_max_length`` and the generation config's ``max_length`` are the
    model's number of positions, so that transformers (truncation, pipelines, lm-eval-harness,
    ``generate()`` by default) never feed it longer inputs. The checkpoints are
    removed only after the marker: a crash before it still resumes from them.
    """
    positions = getattr(model.config, "max_position_embeddings", None)  # GPT-2: n_positions, aliased
    if positions and getattr(model, "generation_config", None) is not None:
        # generate() without max_new_tokens stops at the last position the model has (GPT-2's
        # learned positions end there; past it, an IndexError).
        model.generation_config.max_length = positions
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = data.hf_tokenizer()
    if positions:  # what the model can take, not the tokenizer's "unlimited" default
        tokenizer.model_max_length = positions
    tokenizer.save_pretrained(out)
    shutil.copyfile(data.tokenizer_path, out / "tokenizer.json")  # byte-identical to the data's tokenizer
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    mark_complete(out, fingerprint, {"dev_loss": summary["dev_loss"], "steps": summary["steps"]})
    remove_checkpoints(out)


def remove_checkpoints(out: Path) -> None:
    """Delete the training checkpoints of a complete model folder (they only serve a resume)."""
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
