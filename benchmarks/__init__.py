"""Benchmarks of logitcache (run as modules, e.g. ``python -m benchmarks.bench_kernel``).

Shared helpers: make ``logitcache`` importable from a plain source tree (the GPU machine may not
have the package installed), environment facts for every row, timing, peak memory, table + CSV.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.abc
import importlib.machinery
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_SUBPACKAGES = ("pipeline", "kernels", "cache")


class _SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Maps ``logitcache.<sub>`` to ``<repo>/<sub>`` as pyproject.toml's package-dir does."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        if name == "logitcache":
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = []
            return spec
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "logitcache" and parts[1] in _SUBPACKAGES:
            folder = REPO_ROOT / parts[1]
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
        return None


def ensure_logitcache_importable() -> None:
    if importlib.util.find_spec("logitcache") is None:
        sys.meta_path.append(_SourceTreeFinder())


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            # the result CSVs that benchmarks append to do not make the measured code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import os
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} ({torch.get_num_threads()} threads)"


def today() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def time_ms(
    fn: Callable[[], object], *, grad_to_none: Sequence | None = None, rep_ms: int = 200
) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds: triton.testing.do_bench on CUDA, wall clock on CPU (smoke only)."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(
            fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
        )
        return float(p50), float(p20), float(p80)
    samples = []
    for _ in range(3):
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` beyond what was allocated before (MiB)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def print_table(rows: list[dict], columns: Sequence[str]) -> None:
    """A GitHub-markdown table (paste into docs/benchmarks.md or regenerate it from the CSV)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def append_csv(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """Append rows; a file whose header lacks some of ``columns`` is rewritten with the union (old rows blank)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns)
    if path.exists():
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            old_columns, old_rows = list(reader.fieldnames or []), list(reader)
        missing = [c for c in columns if c not in old_columns]
        if missing:  # rewrite beside, then replace: the old rows survive an interruption
            tmp = path.with_suffix(path.suffix + ".tmp")
            with tmp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=old_columns + missing, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(old_rows + rows)
            tmp.replace(path)
            return
        columns = old_columns
    new_file = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
