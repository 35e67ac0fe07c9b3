"""Resume that survives torn writes: damaged checkpoints are skipped, a torn metrics line dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from logitcache.pipeline.config import ModelConfig, TrainConfig
from logitcache.pipeline.errors import StageError
from logitcache.pipeline.models import build_model
from logitcache.pipeline.training import (
    TrainState,
    _truncate_metrics,
    make_optimizer,
    resume_from_checkpoints,
    save_checkpoint,
)

TINY = ModelConfig(family="llama", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def _model_and_optimizer(seed: int):
    model = build_model(TINY, vocab_size=32, seq_len=8, seed=seed)
    return model, make_optimizer(model, TrainConfig())


def _two_checkpoints(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Checkpoints at steps 1 and 2 with different weights; returns both state dicts."""
    states = []
    for step, seed in ((1, 1), (2, 2)):
        model, optimizer = _model_and_optimizer(seed)
        save_checkpoint(out, model, optimizer, TrainState(global_step=step), keep=5, fingerprint="f")
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states[0], states[1]


@pytest.mark.parametrize("damage", ["truncate_model", "delete_optimizer", "garble_state"])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path, damage: str):
    first, _ = _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000002"
    if damage == "truncate_model":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "delete_optimizer":
        (newest / "optimizer.safetensors").unlink()
    else:
        (newest / "trainer_state.json").write_text('{"train_state": {"glob')
    model, optimizer = _model_and_optimizer(seed=3)
    warnings: list[str] = []
    state = resume_from_checkpoints(tmp_path, model, optimizer, "f", warn=warnings.append)
    assert state.global_step == 1
    for name, value in model.state_dict().items():  # the older checkpoint's weights, read back
        assert torch.equal(value, first[name]), name
    assert "step-00000002 is damaged" in warnings[0] and "step-00000001" in warnings[-1]


def test_only_damaged_checkpoints_is_one_clear_error(tmp_path: Path):
    _two_checkpoints(tmp_path)
    for folder in (tmp_path / "checkpoints").iterdir():
        (folder / "model.safetensors").write_bytes(b"")
    model, optimizer = _model_and_optimizer(seed=3)
    with pytest.raises(StageError, match="Every checkpoint in .* is damaged. Remove that folder"):
        resume_from_checkpoints(tmp_path, model, optimizer, "f", warn=lambda line: None)


def test_a_checkpoint_of_another_config_is_refused_not_skipped(tmp_path: Path):
    _two_checkpoints(tmp_path)
    model, optimizer = _model_and_optimizer(seed=3)
    with pytest.raises(StageError, match="different config"):
        resume_from_checkpoints(tmp_path, model, optimizer, "other", warn=lambda line: None)


def test_no_checkpoint_starts_fresh(tmp_path: Path):
    model, optimizer = _model_and_optimizer(seed=3)
    assert resume_from_checkpoints(tmp_path, model, optimizer, "f", warn=lambda line: None) == TrainState()


def test_torn_metrics_line_is_dropped_on_resume(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    _truncate_metrics(path, global_step=2)
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
