"""The run directory: one folder per config, one subfolder per stage, completion markers.

Layout (``RUN`` = ``run.dir``); :class:`RunLayout` is the one place that knows these paths::

    RUN/data/                  prepared corpus: tokenizer.json, windows.zarr, manifest.json
    RUN/teachers/NAME/         a trained teacher (HF model + tokenizer), checkpoints/ inside until complete
    RUN/cache/logits.zarr      the logit cache (Zarr v3); RUN/cache/verify.json once verified
                               (with ``cache.store`` = a URL the store is remote; RUN/cache keeps
                               the markers, provenance and verify report)
    RUN/students/NAME/         a trained student, checkpoints/ inside until complete
    RUN/eval/results.json      evaluation results; RUN/eval/report.html and figures/ the report

A stage's folder counts as complete only when it holds ``COMPLETE.json`` (written last) with the
fingerprint of the config it was made from (see the fingerprints in :mod:`logitcache.pipeline.config`);
``pipe run`` skips complete stages with the same fingerprint and refuses to overwrite ones made
from a different config.
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

from logitcache.pipeline.config import Config, Fingerprint
from logitcache.pipeline.errors import StageError

COMPLETE_MARKER = "COMPLETE.json"
PROVENANCE_FILE = "provenance.json"
CACHE_STORE = "logits.zarr"
MODEL_GROUPS = ("teachers", "students")  # the folders of RUN that hold model folders


@dataclass(frozen=True)
class RunLayout:
    """Every path under a run directory."""

    root: Path
    cache_url: str = ""  # ``cache.store``: the cache's store when it is remote ("" = local)

    @classmethod
    def of(cls, config: Config) -> RunLayout:
        return cls(config.run_dir, config.cache.store)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def teachers(self) -> Path:
        return self.root / "teachers"

    def teacher(self, name: str) -> Path:
        return self.teachers / name

    @property
    def cache(self) -> Path:
        """The cache stage's folder (provenance, markers, verify report) around the store."""
        return self.root / "cache"

    @property
    def cache_store(self) -> Path:
        """The local Zarr v3 store of the cache (used unless ``cache_url`` is set)."""
        return self.cache / CACHE_STORE

    @property
    def cache_location(self) -> str | Path:
        """The store that `pipe cache-logits` writes and the student reads: ``cache_url`` or ``cache_store``."""
        return self.cache_url or self.cache_store

    @property
    def cache_replaced(self) -> Path:
        """Where `pipe cache-logits --overwrite` keeps the old cache stage until the new one is complete."""
        return self.root / "cache.replaced"

    @property
    def verify_report(self) -> Path:
        return self.cache / "verify.json"

    def tensorboard(self, group: str, name: str) -> Path:
        """The TensorBoard event folder of one model (``run.report_to = ["tensorboard"]``)."""
        return self.root / "tensorboard" / group / name

    @property
    def wandb(self) -> Path:
        """Where W&B keeps its run files (``run.report_to = ["wandb"]``)."""
        return self.root / "wandb"

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def stage_log(self) -> Path:
        """`pipe run`'s record of every stage it ran: one JSON line each (name, seconds, time, commit)."""
        return self.root / "stages.jsonl"

    def student(self, name: str) -> Path:
        return self.students / name

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def eval_results(self) -> Path:
        return self.eval / "results.json"

    @property
    def report(self) -> Path:
        return self.eval / "report.html"

    @property
    def figures(self) -> Path:
        return self.eval / "figures"


def locate_cache_store(path: str | Path) -> Path:
    """The store of a cache given as its stage folder (``RUN/cache``) or as the store itself.

    A folder that holds no store and is not one gives ``folder/logits.zarr`` (missing), so that
    errors name where the cache should be; callers check that it exists.
    """
    path = Path(path)
    store = path / CACHE_STORE
    if store.exists() or (path.is_dir() and not (path / "zarr.json").is_file()):
        return store
    return path


def read_marker(stage_dir: Path) -> dict[str, Any] | None:
    marker = stage_dir / COMPLETE_MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(stage_dir: Path, fingerprint: str) -> bool:
    """Whether ``stage_dir`` holds a finished stage made from ``fingerprint`` (see :func:`records`)."""
    marker = read_marker(stage_dir)
    return marker is not None and records(stage_dir / COMPLETE_MARKER, marker, fingerprint)


def records(path: Path, document: dict[str, Any], fingerprint: str) -> bool:
    """Whether ``document`` (the JSON read from ``path``: a COMPLETE.json, verify.json) records
    ``fingerprint`` under the key "fingerprint".

    A :class:`Fingerprint` also accepts its ``legacy`` form, which runs made before fingerprints took
    input paths as written recorded (absolute paths, so only where the run was made); such a document
    is rewritten with the current fingerprint (only that key changes), after which the checkout can
    move. One that cannot be rewritten (a read-only folder) is left as it is.
    """
    recorded = document.get("fingerprint")
    if not fingerprint_matches(fingerprint, recorded):
        return False
    if recorded != str(fingerprint):
        try:
            text = json.dumps(document | {"fingerprint": str(fingerprint)}, indent=2, sort_keys=True) + "\n"
            atomic_write_text(path, text)
        except OSError:
            pass
    return True


def fingerprint_matches(fingerprint: str, recorded: object) -> bool:
    if isinstance(fingerprint, Fingerprint):
        return fingerprint.matches(recorded)
    return recorded == fingerprint


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
    payload = {"fingerprint": str(fingerprint), "summary": summary or {}}
    atomic_write_text(stage_dir / COMPLETE_MARKER, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (temp file, fsync, rename); a failure (disk full) leaves
    ``path`` as it was and no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
