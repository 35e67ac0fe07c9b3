"""Where training metrics go: ``metrics.jsonl`` always, and the trackers of ``run.report_to``.

``metrics.jsonl`` (one JSON object per line: training records every ``log_every`` steps, a dev
record per epoch) is the record the project reads back (resume, reports, benchmarks). Training
records: ``step``, ``epoch``, ``loss``, for students its parts ``ce`` (mean cross-entropy per
predicted position) and ``kd`` (mean divergence per position, before ``kl_weight * T^2``; absent
in mode "ce"), ``lr``, ``grad_norm``, ``tokens``, ``tokens_per_s``, ``train_s``. Trackers
receive the same numbers: ``"tensorboard"`` writes scalars ``train/<key>`` and ``dev/<key>`` against
the optimizer step into one event folder per model, ``RUN/tensorboard/<teachers|students>/<name>``
(``tensorboard --logdir RUN/tensorboard`` shows every model of a run side by side).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

NOT_SCALARS = ("step", "epoch")


class MetricsLog:
    """Append records to ``metrics.jsonl`` (flushed per record) and forward them to trackers."""

    def __init__(self, path: Path, *, report_to: Sequence[str] = (), tracker_dir: Path | None = None):
        self.path = path
        self._file: IO[str] = open(path, "a")  # noqa: SIM115 (closed in close())
        self._tensorboard = None
        if "tensorboard" in report_to:
            if tracker_dir is None:
                raise ValueError("tracker_dir is needed for the tensorboard tracker")
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            tracker_dir.mkdir(parents=True, exist_ok=True)
            self._tensorboard = SummaryWriter(log_dir=str(tracker_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            group = "dev" if any(key.startswith("dev_") for key in record) else "train"
            for key, value in record.items():
                if key in NOT_SCALARS or not isinstance(value, int | float) or not math.isfinite(value):
                    continue
                self._tensorboard.add_scalar(f"{group}/{key.removeprefix('dev_')}", value, record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
