"""The run directory: one folder per config, one subfolder per stage, completion markers.

Layout (``RUN`` = ``run.dir``)::

    RUN/data/              prepared corpus: tokenizer.json, windows.zarr, manifest.json
    RUN/teachers/NAME/     a trained teacher (HF model + tokenizer), checkpoints/ inside
    RUN/cache/             the logit cache (Zarr v3)
    RUN/students/NAME/     a trained student, checkpoints/ inside
    RUN/eval/              evaluation results and the report

A stage's folder counts as complete only when it holds ``COMPLETE.json`` (written last) with the
fingerprint of the config it was made from; ``pipe run`` skips complete stages with the same
fingerprint and refuses to overwrite ones made from a different config.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from logitcache.pipeline.config import Config
from logitcache.pipeline.errors import StageError

COMPLETE_MARKER = "COMPLETE.json"
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def teacher(self, name: str) -> Path:
        return self.root / "teachers" / name

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def student(self, name: str) -> Path:
        return self.root / "students" / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"


def read_marker(stage_dir: Path) -> dict[str, Any] | None:
    marker = stage_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage_dir: Path, fingerprint: str) -> bool:
    marker = read_marker(stage_dir)
    return marker is not None and marker.get("fingerprint") == fingerprint


def stage_is_done(stage_dir: Path, fingerprint: str, *, overwrite: bool, what: str) -> bool:
    """Whether a stage can be skipped: True when ``stage_dir`` is complete for ``fingerprint``.

    Output made from a different config is never replaced silently: without ``overwrite`` that
    raises a :class:`StageError` naming ``what`` the folder holds.
    """
    if overwrite:
        return False
    if is_complete(stage_dir, fingerprint):
        return True
    if read_marker(stage_dir) is not None:
        raise StageError(
            f"{stage_dir} holds {what} made from a different config. Use another run directory "
            "(--run-dir), or pass --overwrite to replace it."
        )
    return False


def mark_complete(stage_dir: Path, fingerprint: str, summary: dict[str, Any] | None = None) -> None:
    """Write the completion marker last, atomically (temp file + rename)."""
    payload = {"fingerprint": fingerprint, "summary": summary or {}}
    atomic_write_text(stage_dir / COMPLETE_MARKER, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("logitcache", "torch", "transformers", "tokenizers", "zarr", "numcodecs", "numpy", "triton"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def write_provenance(
    stage_dir: Path, config: Config, stage: str, extra: dict[str, Any] | None = None
) -> None:
    """Record what made this output: resolved config, package versions, git commit, command."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "stage": stage,
        "config": config.to_dict(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "command": sys.argv,
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    atomic_write_text(stage_dir / PROVENANCE_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")
