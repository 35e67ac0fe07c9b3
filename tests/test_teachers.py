"""Teacher training: HF-loadable output, learning, exact resume after a kill, DDP = one rank."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.pipeline.config import load_config
from logitcache.pipeline.errors import ConfigError, StageError
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.teachers import teacher_dir, train_teacher

from .conftest import kill_when

PIPE = [sys.executable, "-m", "logitcache.pipeline.cli"]


def _losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_teacher_trains_and_loads_with_transformers(tiny_config: Path):
    config = load_config(tiny_config, ["teachers.llama.train.epochs=3"])
    prepare_data(config)
    out = train_teacher(config, "llama", progress=False)
    assert out == config.run_dir / "teachers" / "llama"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    # The loaded model reproduces the dev loss recorded by training, and it is far below log V.
    data = PreparedData.open(config.run_dir / "data")
    dev = torch.from_numpy(data.windows("dev").astype("int64"))
    with torch.no_grad():
        logits = model(input_ids=dev).logits
    dev_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), dev[:, 1:].flatten()).item()
    summary = json.loads((out / "train_summary.json").read_text())
    assert dev_loss == pytest.approx(summary["dev_loss"], rel=1e-4)
    assert dev_loss < math.log(data.vocab_size) - 1.0
    ids = tokenizer("Mr. Darcy")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1

    # GPT-2 family too.
    gpt = AutoModelForCausalLM.from_pretrained(train_teacher(config, "gpt", progress=False))
    assert gpt.config.model_type == "gpt2"


def test_unknown_teacher_and_pretrained_path(tiny_config: Path, tmp_path: Path):
    config = load_config(tiny_config)
    with pytest.raises(ConfigError, match="Unknown teacher 'bert'. The config defines: llama, gpt"):
        train_teacher(config, "bert")
    prepare_data(config)
    trained = train_teacher(config, "gpt", progress=False)
    adopted = load_config(tiny_config, [f"teachers.llama.path={trained}"])
    assert teacher_dir(adopted, "llama") == trained
    assert train_teacher(adopted, "llama") == trained  # nothing trained: the folder is used as is
    missing = load_config(tiny_config, [f"teachers.llama.path={tmp_path}"])
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        train_teacher(missing, "llama")


def test_retrain_with_other_config_is_refused(tiny_config: Path):
    config = load_config(tiny_config)
    prepare_data(config)
    train_teacher(config, "gpt", progress=False)
    changed = load_config(tiny_config, ["teachers.gpt.train.lr=1e-4"])
    with pytest.raises(StageError, match="different config"):
        train_teacher(changed, "gpt")


def test_resume_after_kill_reproduces_trajectory(tiny_config: Path, tmp_path: Path):
    """kill -9 in the middle of training, rerun: the loss trajectory equals an uninterrupted run."""
    overrides = ["teachers.llama.train.epochs=2", "teachers.llama.train.checkpoint_every=10"]
    config = load_config(tiny_config, overrides)
    prepare_data(config)
    reference = train_teacher(config, "llama", progress=False)
    expected = _losses(reference / "metrics.jsonl")

    run_b = tmp_path / "run-b"
    run_b.mkdir()
    os.symlink(config.run_dir / "data", run_b / "data")
    args = [*PIPE, "train-teacher", str(tiny_config), "--teacher", "llama", "--run-dir", str(run_b)]
    args += [a for o in overrides for a in ("--set", o)]
    checkpoints = run_b / "teachers" / "llama" / "checkpoints"
    kill_when(args, lambda: len(list(checkpoints.glob("step-*"))) >= 2)
    assert not (run_b / "teachers" / "llama" / "COMPLETE.json").exists()

    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = _losses(run_b / "teachers" / "llama" / "metrics.jsonl")
    assert [s for s, _ in resumed] == [s for s, _ in expected]
    assert resumed == expected  # bit-exact on CPU: same data order, optimizer and RNG state
    assert not checkpoints.exists()  # resumed from them, then removed once the model was complete


def test_ddp_two_ranks_match_one_rank(tiny_config: Path, tmp_path: Path):
    """2 gloo ranks on CPU give the same losses as 1 rank on the same global batch."""
    config = load_config(tiny_config)
    prepare_data(config)
    one = train_teacher(config, "llama", progress=False)
    expected = _losses(one / "metrics.jsonl")

    run_b = tmp_path / "run-ddp"
    run_b.mkdir()
    os.symlink(config.run_dir / "data", run_b / "data")
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
        "-m", "logitcache.pipeline.cli", "train-teacher", str(tiny_config), "--teacher", "llama",
        "--run-dir", str(run_b),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = _losses(run_b / "teachers" / "llama" / "metrics.jsonl")
    assert [s for s, _ in got] == [s for s, _ in expected]
    # Same math, different summation order (two half-batches, then an all-reduce): float32 rounding.
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, rel=2e-4, abs=2e-4)
    assert not (run_b / "teachers" / "llama" / "checkpoints" / ".tmp").exists()
