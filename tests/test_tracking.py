"""run.report_to: TensorBoard, W&B and MLflow receive the numbers of metrics.jsonl; refused cleanly
when a package or the tracker's settings are missing."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from logitcache.pipeline.config import load_config
from logitcache.pipeline.errors import ConfigError
from logitcache.pipeline.prepare import prepare_data
from logitcache.pipeline.teachers import train_teacher
from logitcache.pipeline.tracking import MetricsLog, TrackedModel


def _train_tiny_teacher(tiny_config: Path, tracker: str) -> tuple[Path, list[dict]]:
    config = load_config(tiny_config, [f'run.report_to=["{tracker}"]', "teachers.llama.train.epochs=2"])
    prepare_data(config)
    out = train_teacher(config, "llama", progress=False)
    return config.run_dir, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if key in r]


def test_tensorboard_scalars_equal_the_jsonl_metrics(tiny_config: Path):
    pytest.importorskip("tensorboard", reason="optional: pip install 'logitcache[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records = _train_tiny_teacher(tiny_config, "tensorboard")
    events = EventAccumulator(str(run / "tensorboard" / "teachers" / "llama"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "dev/loss"} <= set(
        events.Tags()["scalars"]
    )
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("dev/loss", "dev_loss")):
        expected = _expected(records, key)
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in expected] and len(got) >= 2
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # stored as float32


def test_tensorboard_gets_the_loss_parts(tmp_path: Path):
    """The student's records carry ``ce`` and ``kd`` beside ``loss``: TensorBoard shows them too."""
    pytest.importorskip("tensorboard", reason="optional: pip install 'logitcache[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(
        tmp_path / "metrics.jsonl", report_to=["tensorboard"], model=TrackedModel(tmp_path, "students", "x")
    )
    log.write({"step": 1, "epoch": 0, "loss": 2.5, "ce": 3.0, "kd": 2.0, "lr": 1e-3})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "students" / "x"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/ce")] == [(1, 3.0)]
    assert [(e.step, e.value) for e in events.Scalars("train/kd")] == [(1, 2.0)]


def test_mlflow_metrics_equal_the_jsonl_metrics(tiny_config: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip("mlflow", reason="optional: pip install 'logitcache[mlflow]'")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()  # a local store: mlflow-skinny has no sqlite backend
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    _, records = _train_tiny_teacher(tiny_config, "mlflow")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "teachers/llama" and run.info.status == "FINISHED"
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("dev/loss", "dev_loss")):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        expected = _expected(records, key)
        assert len(got) >= 2 and [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-12)


def test_wandb_gets_every_record_and_finishes(tiny_config: Path, monkeypatch):
    """What our tracker hands W&B, recorded by a stand-in module (the real one is run offline below)."""
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class Run:
        def log(self, scalars, step):  # noqa: ANN001
            calls["log"].append((step, dict(scalars)))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or Run()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a)
    )
    run, records = _train_tiny_teacher(tiny_config, "wandb")
    (init,) = calls["init"]
    assert init["name"] == "teachers/llama" and init["dir"] == str(run / "wandb")
    assert calls["finish"] == [True]
    for tag, key in (("train/loss", "loss"), ("dev/loss", "dev_loss")):
        got = [(step, scalars[tag]) for step, scalars in calls["log"] if tag in scalars]
        assert got == _expected(records, key) and len(got) >= 2


def test_wandb_offline_run_is_written(tmp_path: Path, monkeypatch):
    pytest.importorskip("wandb", reason="optional: pip install 'logitcache[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(
        tmp_path / "metrics.jsonl", report_to=["wandb"], model=TrackedModel(tmp_path, "students", "x")
    )
    for step in (1, 2):
        log.write({"step": step, "epoch": 0, "loss": 3.0 - step, "ce": 3.0, "kd": 2.0})
    log.close()
    (record,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    assert record.stat().st_size > 0


def test_trackers_without_their_package_or_settings_are_config_errors(tiny_config: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"tensorboard package .*pip install 'logitcache\[tensorboard\]'"):
        load_config(tiny_config, ['run.report_to=["tensorboard"]'])
    with pytest.raises(ConfigError, match="run.report_to"):
        load_config(tiny_config, ['run.report_to=["wandb-typo"]'])
    trackers = ("tensorboard", "wandb", "mlflow")  # all present from here on
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name in trackers else real(name, *a)
    )
    with pytest.raises(ConfigError, match="each tracker once"):
        load_config(tiny_config, ['run.report_to=["mlflow", "mlflow"]'])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="Expected MLFLOW_TRACKING_URI in the environment"):
        load_config(tiny_config, ['run.report_to=["mlflow"]'])
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tiny_config.parent / "no-netrc"))
    monkeypatch.setenv("HOME", str(tiny_config.parent))
    with pytest.raises(ConfigError, match="Expected W&B credentials .*WANDB_MODE=offline"):
        load_config(tiny_config, ['run.report_to=["wandb"]'])
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load_config(tiny_config, ['run.report_to=["wandb"]']).run.report_to == ["wandb"]
