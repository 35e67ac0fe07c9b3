"""train-student throughput in steady state: `cache` vs `ce` (vs `online`), loader worker counts.

Targets (issue 14): tokens/s of `cache` >= 0.95x `ce` (the cache costs the student almost nothing),
and `cache` >= 1.6x `online` with two teachers the size of the student.

    python -m benchmarks.bench_student configs/demo.toml --run-dir runs/demo            # 5 rounds x 200 steps

Needs a run directory with prepared data, trained teachers and the cache (`pipe run` up to
`cache-logits`). Each measurement runs the real stage (`train_student`, the same code as
`pipe train-student`, same student, same batch) for ``--warmup + --steps`` optimizer steps in a
temporary run directory that links RUN/data, RUN/teachers and RUN/cache. Its rate is the steady
state: the tokens of the last ``--steps`` steps over the loop's own ``train_s`` for them
(``metrics.jsonl``; model build, loader start-up and the first ``--warmup`` steps left out, dev
evaluation and checkpoint saving excluded by the loop's clock). The modes alternate within each
of ``--repeats`` rounds, the order rotating from round to round; every round is printed with the
machine's load average and its ratios, and the **median of the per-round ratios** is printed last.

``--profile-steps N`` then trains each mode once more, N steps under torch.profiler, and prints its
top ops by self time on the device and the time per step the loop waited for the DataLoader (does
reading the cache starve the GPU?); ``--repeats 0`` runs only that.

``--workers 0,1,2`` adds the `cache` student at each loader worker count to every round, and
``--loader-windows N`` the loader alone (the DataLoader the loop builds, iterated without
training: windows/s it delivers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from benchmarks import append_csv, device_name, git_commit, print_table, steady_state_rate
from logitcache.pipeline.config import Config, load_config
from logitcache.pipeline.data_order import MicroBatchSampler, loader_workers, make_loader
from logitcache.pipeline.distributed import resolve_device
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.student import make_dataset, make_order, student_seed, train_student


@contextlib.contextmanager
def scratch_run(run_dir: Path) -> Iterator[Path]:
    """A temporary run directory that links RUN/data, RUN/teachers and RUN/cache (students go there)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for name in ("data", "teachers", "cache"):
            if (run_dir / name).exists():
                (run / name).symlink_to(run_dir.resolve() / name)
        yield run


def student_config(
    config_path: str, run: Path, overrides: list[str], mode: str, steps: int, log_every: int
) -> Config:
    """The config of one measured student in the scratch ``run``: ``mode``, ``steps`` steps, no checkpoints."""
    settings = [
        *overrides,
        f"student.mode={mode}",
        f"student.train.max_steps={steps}",
        f"student.train.log_every={log_every}",
        "student.train.checkpoint_every=1000000",
    ]
    return load_config(config_path, settings, run_dir=run)


def student_rate(
    config_path: str, run_dir: Path, mode: str, warmup: int, steps: int, overrides: list[str]
) -> float:
    """Steady-state tokens/s of `train_student` in ``mode``: steps ``warmup .. warmup + steps``."""
    with scratch_run(run_dir) as run:
        log_every = math.gcd(warmup, steps) if warmup else steps
        config = student_config(config_path, run, overrides, mode, warmup + steps, log_every)
        out = train_student(config, progress=False)
        rate = steady_state_rate(out / "metrics.jsonl", warmup)["steady_tokens_per_s"]
        if rate is None:
            raise SystemExit(f"error: no steady-state rate for {mode}: fewer than {warmup + steps} steps ran")
        return float(rate)


def loader_rate(config_path: str, run_dir: Path, overrides: list[str], windows_limit: int) -> float:
    """Windows/s the student's DataLoader delivers on its own (from epoch 0, up to ``windows_limit``)."""
    config = load_config(config_path, overrides, run_dir=run_dir)
    data = PreparedData.open(run_dir / "data")
    windows = data.windows("train")
    device = resolve_device(config.run.device)
    train = config.student.train
    start = time.perf_counter()
    sampler = MicroBatchSampler(
        windows.shape[0], batch_size=train.batch_size, seed=student_seed(config),
        order=make_order(config, windows.shape[0], data.seq_len), grad_accum_steps=train.grad_accum_steps,
    )  # fmt: skip
    loader = make_loader(
        make_dataset(config, data, windows),
        sampler,
        workers=loader_workers(config.student.loader.workers, device),
        prefetch_factor=config.student.loader.prefetch_factor,
        pin_memory=device.type == "cuda",
    )
    delivered = 0
    for batch in loader:
        delivered += batch["input_ids"].shape[0]
        if delivered >= windows_limit:
            break
    seconds = time.perf_counter() - start
    del loader  # stops the workers
    return delivered / seconds


LOADER_WAIT_PREFIX = "enumerate(DataLoader)"  # torch's profiler label of each next(loader) call


def profile_student(
    config_path: str, run_dir: Path, mode: str, steps: int, overrides: list[str], row_limit: int = 15
) -> tuple[str, dict[str, float]]:
    """`train_student` in ``mode`` for ``steps`` steps under torch.profiler (start-up included).

    Returns the table of the ``row_limit`` ops with the most self time on the training device (the
    CPU when there is no GPU), and figures: the training loop's own seconds per step and the
    seconds per step the loop waited for the DataLoader (``next(loader)``, torch's
    ``enumerate(DataLoader)...`` events), the test of whether reading the cache starves the GPU.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with scratch_run(run_dir) as run:
        config = student_config(config_path, run, overrides, mode, steps, steps)
        with profile(activities=activities) as prof:
            out = train_student(config, progress=False)
        summary_path = out / "train_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    averages = prof.key_averages()
    wait_us = sum(e.cpu_time_total for e in averages if e.key.startswith(LOADER_WAIT_PREFIX))
    figures = {"loader_wait_ms_per_step": wait_us / 1e3 / steps}
    if summary.get("train_s"):
        figures["train_ms_per_step"] = 1e3 * float(summary["train_s"]) / steps
    return averages.table(sort_by=sort_by, row_limit=row_limit), figures


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=200, help="measured optimizer steps per round and mode")
    parser.add_argument("--warmup", type=int, default=20, help="steps left out at the start of each run")
    parser.add_argument(
        "--repeats", type=int, default=5, help="alternating rounds; the median ratio is reported"
    )
    parser.add_argument("--modes", default="cache,ce", help="e.g. cache,ce,online")
    parser.add_argument("--workers", default="", help="student.loader.workers values to compare, e.g. 0,1,2")
    parser.add_argument("--loader-windows", type=int, default=0, help="windows read by the loader-alone test")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="after the rounds, train each mode this many steps under torch.profiler: top ops, loader wait",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--csv", default="benchmarks/results/student.csv")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides, run_dir=args.run_dir)
    resolve_device(config.run.device)  # fail early on an unavailable device
    modes = [mode for mode in args.modes.split(",") if mode]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    seq_len = PreparedData.open(args.run_dir / "data").seq_len
    base = {
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "config": args.config,
        "overrides": " ".join(args.overrides),
        "warmup": args.warmup,
        "steps": args.steps,
        "batch_windows": config.student.train.batch_size,
        "seq_len": seq_len,
        "k": config.cache.k,
        "teachers": len(config.teachers),
    }
    print(f"{base['device']}, {base['threads']} threads, commit {base['commit']}, {load()}", flush=True)
    rows = []
    ratios: dict[str, list[float]] = {}
    for round_ in range(1, args.repeats + 1):
        shift = (round_ - 1) % len(modes)
        order = modes[shift:] + modes[:shift]  # no mode always runs first
        rates = {}
        loads = []
        for mode in order:
            rates[mode] = student_rate(
                args.config, args.run_dir, mode, args.warmup, args.steps, args.overrides
            )
            loads.append(os.getloadavg()[0])
            print(f"round {round_}: {mode}: {rates[mode]:,.0f} tokens/s ({load()})", flush=True)
        row = {**base, "round": round_, "order": ",".join(order), "load_1min_max": round(max(loads), 2)}
        row |= {f"{mode}_tokens_per_s": round(rate) for mode, rate in rates.items()}
        for other in ("ce", "online"):
            if "cache" in rates and other in rates:
                ratio = rates["cache"] / rates[other]
                ratios.setdefault(f"cache_over_{other}", []).append(ratio)
                row[f"cache_over_{other}"] = round(ratio, 3)
                print(f"round {round_}: cache / {other} = {ratio:.3f}", flush=True)
        turn = shift % len(worker_counts) if worker_counts else 0
        for workers in worker_counts[turn:] + worker_counts[:turn]:
            settings = [*args.overrides, f"student.loader.workers={workers}"]
            rate = student_rate(args.config, args.run_dir, "cache", args.warmup, args.steps, settings)
            row[f"cache_{workers}w_tokens_per_s"] = round(rate)
            print(f"round {round_}: cache, {workers} workers: {rate:,.0f} tokens/s ({load()})", flush=True)
            if args.loader_windows:
                windows_per_s = loader_rate(args.config, args.run_dir, settings, args.loader_windows)
                row[f"loader_{workers}w_windows_per_s"] = round(windows_per_s)
                print(
                    f"round {round_}: loader alone, {workers} workers: {windows_per_s:,.0f} windows/s",
                    flush=True,
                )
        rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print_table(rows, [c for c in columns if c not in base or c in ("commit",)])
    append_csv(Path(args.csv), rows, columns)
    for mode in modes if args.profile_steps else []:
        table, figures = profile_student(args.config, args.run_dir, mode, args.profile_steps, args.overrides)
        print(f"profile of {mode}, {args.profile_steps} steps (start-up included):\n{table}", flush=True)
        print(f"profile of {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    for name, values in ratios.items():
        print(
            f"median {name.replace('_over_', ' / ')} over {len(values)} rounds: {statistics.median(values):.3f}"
        )


if __name__ == "__main__":
    main()
