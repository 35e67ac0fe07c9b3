"""run.report_to: TensorBoard event files hold the numbers of metrics.jsonl; refused cleanly when absent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from logitcache.pipeline.config import load_config
from logitcache.pipeline.errors import ConfigError
from logitcache.pipeline.prepare import prepare_data
from logitcache.pipeline.teachers import train_teacher

pytest.importorskip("tensorboard", reason="optional: pip install 'logitcache[tensorboard]'")


def test_tensorboard_scalars_equal_the_jsonl_metrics(tiny_config: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = load_config(tiny_config, ['run.report_to=["tensorboard"]', "teachers.llama.train.epochs=2"])
    prepare_data(config)
    out = train_teacher(config, "llama", progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(config.run_dir / "tensorboard" / "teachers" / "llama"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "dev/loss"} <= set(
        events.Tags()["scalars"]
    )
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("dev/loss", "dev_loss")):
        expected = [(r["step"], r[key]) for r in records if key in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected] and len(got) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32


def test_tensorboard_gets_the_loss_parts(tmp_path: Path):
    """The student's records carry ``ce`` and ``kd`` beside ``loss``: TensorBoard shows them too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from logitcache.pipeline.tracking import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", report_to=["tensorboard"], tracker_dir=tmp_path / "tb")
    log.write({"step": 1, "epoch": 0, "loss": 2.5, "ce": 3.0, "kd": 2.0, "lr": 1e-3})
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/ce")] == [(1, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("train/kd")] == [(1, 2.0)]


def test_tensorboard_without_the_package_is_a_config_error(tiny_config: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"tensorboard package .*pip install 'logitcache\[tensorboard\]'"):
        load_config(tiny_config, ['run.report_to=["tensorboard"]'])
    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(tiny_config, ['run.report_to=["wandb-typo"]'])
