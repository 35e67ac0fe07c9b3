"""Where training metrics go: ``metrics.jsonl`` always, and the trackers of ``run.report_to``.

``metrics.jsonl`` (one JSON object per line: training records every ``log_every`` steps, a dev
record per epoch) is the record the project reads back (resume, reports, benchmarks). Training
records: ``step``, ``epoch``, ``loss``, for students its parts ``ce`` (mean cross-entropy per
predicted position) and ``kd`` (mean divergence per position, before ``kl_weight * T^2``; absent
in mode "ce"), ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``, ``train_s``.

Trackers (all off by default, each an optional package) receive the same numbers, as scalars
``train/<key>`` and ``dev/<key>`` against the optimizer step, one tracker run per model named
``teachers/<name>`` or ``students/<name>``:

* ``"tensorboard"``: one event folder per model, ``RUN/tensorboard/<teachers|students>/<name>``
  (``tensorboard --logdir RUN/tensorboard`` shows every model of a run side by side);
* ``"wandb"``: Weights & Biases, project ``$WANDB_PROJECT`` (default "logitcache"), run files
  under ``RUN/wandb``; credentials and mode come from W&B's own environment (``WANDB_API_KEY`` or
  ``wandb login``; ``WANDB_MODE=offline`` to sync later), never from the config;
* ``"mlflow"``: the MLflow tracking server or store of ``$MLFLOW_TRACKING_URI`` (required: a
  server URL, or e.g. ``sqlite:///mlflow.db`` with the full ``mlflow`` package), experiment
  ``$MLFLOW_EXPERIMENT_NAME`` (default "logitcache").

A model whose training resumes after an interruption starts a new tracker run (from the step it
resumes at); ``metrics.jsonl`` holds the whole history.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from logitcache.pipeline.rundir import RunLayout

NOT_SCALARS = ("step", "epoch")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrackedModel:
    """Which model the metrics are of: ``RUN`` and ``group/name`` (e.g. ``students/cache``)."""

    run_dir: Path
    group: str  # "teachers" or "students"
    name: str

    @property
    def label(self) -> str:
        return f"{self.group}/{self.name}"


class Tracker(Protocol):
    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, model: TrackedModel):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        folder = RunLayout(model.run_dir).tensorboard(model.group, model.name)
        folder.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(folder))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, model: TrackedModel):
        import wandb

        folder = RunLayout(model.run_dir).wandb
        folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "logitcache"),
            name=model.label,
            group=model.run_dir.resolve().name,
            dir=str(folder),
            config={"run_dir": str(model.run_dir.resolve()), "model": model.label},
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowTracker:
    def __init__(self, model: TrackedModel):
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "logitcache")
        experiment = self._client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
        run = self._client.create_run(
            experiment_id, run_name=model.label, tags={"logitcache.run_dir": str(model.run_dir.resolve())}
        )
        self._run_id = run.info.run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


_TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class MetricsLog:
    """Append records to ``metrics.jsonl`` (flushed per record) and forward them to trackers."""

    def __init__(self, path: Path, *, report_to: Sequence[str] = (), model: TrackedModel | None = None):
        self.path = path
        if report_to and model is None:
            raise ValueError("a TrackedModel is needed for the trackers of report_to")
        self._trackers: list[Tracker] = [_TRACKER_CLASSES[name](model) for name in report_to]
        self._file: IO[str] = open(path, "a")  # noqa: SIM115 (closed in close())

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not self._trackers:
            return
        group = "dev" if any(key.startswith("dev_") for key in record) else "train"
        scalars = {
            f"{group}/{key.removeprefix('dev_')}": float(value)
            for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, int | float) and math.isfinite(value)
        }
        for tracker in self._trackers:
            tracker.log(scalars, int(record["step"]))

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()
