"""Benchmarks of logitcache (run as modules, e.g. ``python -m benchmarks.bench_kernel``).

Shared helpers: environment facts for every row, timing, peak memory, table + CSV,
and JSON-lines rows (``append_jsonl``) that a driver (``benchmarks.gpu_check``) reads back even when
it had to stop a benchmark at its time budget.

CUDA-only calls (events, peak-memory statistics, pinned host memory) go through three small helpers,
:func:`event_ms`, :class:`PeakMemory` and :func:`host_buffer`, each with a CPU fallback, so that the
CPU dry run and the unit tests (tests/test_gpu_check.py, which also fakes ``torch.cuda``) reach every
line the GPU run takes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# First of ours: run from this checkout (not installed, as on the GPU machine), logitcache maps
# logitcache.<sub> to ./<sub> and keeps ./kernels from shadowing an installed `kernels`
# (logitcache/_source_tree.py).
import logitcache  # noqa: F401, E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit (+dirty) of the checkout; $LOGITCACHE_COMMIT where the tree travelled without .git."""
    import os

    if os.environ.get("LOGITCACHE_COMMIT"):
        return os.environ["LOGITCACHE_COMMIT"]
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
    fn: Callable[[], object],
    *,
    grad_to_none: Sequence | None = None,
    rep_ms: int = 200,
    warmup_ms: int = 25,
    cpu_reps: int = 3,
) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds: triton.testing.do_bench on CUDA (``warmup_ms``/``rep_ms`` of
    warm-up and repetitions, events, L2 flushed between calls), ``cpu_reps`` wall-clock calls on CPU
    (smoke only)."""
    import torch

    if torch.cuda.is_available():
        from triton.testing import do_bench

        p50, p20, p80 = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]
        )
        return float(p50), float(p20), float(p80)
    samples = []
    for _ in range(max(cpu_reps, 1)):
        if grad_to_none:
            for tensor in grad_to_none:
                tensor.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[0], samples[-1]


def event_ms(
    fn: Callable[[], object], *, iters: int = 10, warmup: int = 2, device: str | None = None
) -> float:
    """Mean milliseconds per call of ``fn`` over ``iters`` calls after ``warmup`` calls.

    CUDA: one pair of CUDA events around the ``iters`` calls (no host sync inside the loop);
    CPU: the host clock around the same loop. ``device`` defaults to CUDA when available.
    """
    import torch

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if use_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / iters
    begin = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - begin) * 1e3 / iters


class PeakMemory:
    """Peak device memory of a region: ``with PeakMemory() as peak: ...``, then ``peak.extra_mib``
    (the peak beyond what was allocated on entry) and ``peak.peak_mib`` (the absolute peak).

    CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` (caching allocator,
    after ``empty_cache``). CPU: no allocator statistics, both figures are NaN (reported "n/a").
    """

    def __init__(self, device: str | None = None) -> None:
        import torch

        self.use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.before = 0
        self.peak_mib = float("nan")
        self.extra_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        import torch

        if self.use_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.use_cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self.peak_mib = peak / 2**20
            self.extra_mib = (peak - self.before) / 2**20


def host_buffer(numel: int, dtype, *, device: str | None = None):  # noqa: ANN001
    """A host tensor to copy to ``device``: pinned (page-locked) when CUDA is used, so that
    ``tensor.to(device, non_blocking=True)`` is an asynchronous DMA; pageable memory on CPU,
    where pinning needs an accelerator and a non-blocking copy is an ordinary one."""
    import torch

    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    return torch.empty(numel, dtype=dtype, pin_memory=use_cuda)


def peak_extra_mb(fn: Callable[[], object]) -> float:
    """Peak CUDA memory allocated by one call of ``fn`` beyond what was allocated before (MiB); NaN on CPU."""
    with PeakMemory() as peak:
        fn()
    return peak.extra_mib


def append_jsonl(path: Path | None, row: dict) -> None:
    """Append one row as a JSON line (flushed at once: a reader sees it even if the writer is killed)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)

    def plain(value: object) -> object:
        if isinstance(value, float) and value != value:
            return None  # NaN is not JSON
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    with path.open("a") as handle:
        handle.write(json.dumps({key: plain(value) for key, value in row.items()}) + "\n")


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


def steady_state_rate(metrics_path: Path, warmup_steps: int) -> dict:
    """Steady-state training tokens/s of one run from its ``metrics.jsonl``, warm-up left out.

    The loop logs ``tokens`` (cumulative) and ``train_s`` (seconds spent in training steps since
    the process started; dev evaluation and checkpoint saving excluded) at every ``log_every``
    steps. The rate is the tokens between the first record at or after ``warmup_steps`` and the
    last record, over the ``train_s`` between them.
    """
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "train_s" in r and r["step"] >= warmup_steps]
    if len(steps) < 2:
        return {
            "steady_tokens_per_s": None,
            "steady_steps": 0,
            "last_step": steps[-1]["step"] if steps else None,
        }
    first, last = steps[0], steps[-1]
    seconds = last["train_s"] - first["train_s"]
    return {
        "steady_tokens_per_s": (last["tokens"] - first["tokens"]) / seconds if seconds > 0 else None,
        "steady_steps": last["step"] - first["step"],
        "last_step": last["step"],
        "cumulative_tokens_per_s": last.get("tokens_per_s"),
    }


def report_rows(rows: list[dict], columns: Sequence[str], csv_path: Path, *, smoke: bool) -> None:
    """Print the markdown table; append the rows to ``csv_path`` unless this was a smoke run."""
    print_table(rows, columns)
    if not smoke:
        append_csv(csv_path, rows, columns)
        print(f"\nappended {len(rows)} rows to {csv_path}")


def import_peer(module: str, name: str, *, device: str) -> tuple[object | None, str | None]:
    """A peer library's entry point for a comparison row, or why there is none: ``(obj, None)``, or
    ``(None, note)`` with "skipped: ... not installed", "error: importing ..." (installed but
    broken: an error row, the others go on) or "skipped: needs CUDA"."""
    package = module.split(".")[0]
    try:
        obj = getattr(importlib.import_module(module), name)
    except ImportError:
        return None, f"skipped: {package} not installed"
    except Exception as exc:  # noqa: BLE001
        return None, f"error: importing {package}: {type(exc).__name__}: {exc}"[:300]
    if device != "cuda":
        return None, "skipped: needs CUDA"
    return obj, None
