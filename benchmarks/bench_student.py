"""train-student throughput: `cache` vs `ce` vs `online` students, loader worker counts, the loader alone.

Targets (issue 7): tokens/s of `cache` >= 0.95x `ce` (the cache costs the student almost nothing),
and `cache` >= 1.6x `online` with two teachers the size of the student (BabyLlama-2's shapes).

    python -m benchmarks.bench_student configs/demo.toml --run-dir runs/demo --steps 40

Needs a run directory with prepared data, trained teachers and the cache (`pipe run` up to
`cache-logits`). Each measurement runs the real stage (`train_student`, the same code as
`pipe train-student`) for ``--steps`` optimizer steps in a temporary run directory that links
RUN/data, RUN/teachers and RUN/cache; tokens/s is the loop's own figure at the last step
(``metrics.jsonl``: all steps since the loop started, loader start-up included, dev evaluation
and saving excluded). Each round runs every mode (``student.loader.workers`` as configured), then
the `cache` student with each of ``--workers`` loader worker counts, then the loader alone with
each count; rounds repeat ``--repeats`` times, every round is printed with the machine's load
average, and the best round of each is reported, so that the ratios come from one run on the same
(possibly shared) machine.

The loader alone: the DataLoader the loop builds (pipeline/data_order.py: the student's dataset,
the micro-batch sampler over the same plan, the configured order) iterated without training:
windows/s it delivers, against the windows/s the cache-mode student consumed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks import append_csv, device_name, git_commit, print_table
from logitcache.pipeline.config import load_config
from logitcache.pipeline.data_order import MicroBatchSampler, make_loader
from logitcache.pipeline.distributed import resolve_device
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.student import make_dataset, make_order, student_seed, train_student


def student_rate(config_path: str, run_dir: Path, mode: str, steps: int, overrides: list[str]) -> float:
    """tokens/s of `train_student` in ``mode`` for ``steps`` steps (the loop's figure at the last step)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        for name in ("data", "teachers", "cache"):
            if (run_dir / name).exists():
                (run / name).symlink_to(run_dir.resolve() / name)
        settings = [
            *overrides,
            f"student.mode={mode}",
            f"student.train.max_steps={steps}",
            f"student.train.log_every={steps}",
            "student.train.checkpoint_every=1000000",
        ]
        config = load_config(config_path, settings, run_dir=run)
        out = train_student(config, progress=False)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return float([r for r in rows if r.get("step") == steps and "tokens_per_s" in r][-1]["tokens_per_s"])


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
        workers=config.student.loader.workers,
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


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds; the best of each is kept")
    parser.add_argument("--modes", default="cache,ce,online")
    parser.add_argument(
        "--workers", default="0,1,2", help="student.loader.workers values to compare (cache student, loader)"
    )
    parser.add_argument(
        "--loader-windows", type=int, default=4096, help="windows read by the loader-alone test"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--csv", default="benchmarks/results/student.csv")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides, run_dir=args.run_dir)
    resolve_device(config.run.device)  # fail early on an unavailable device
    modes = [mode for mode in args.modes.split(",") if mode]
    worker_counts = [int(w) for w in args.workers.split(",") if w]
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    by_workers: dict[int, list[float]] = {w: [] for w in worker_counts}
    loader: dict[int, list[float]] = {w: [] for w in worker_counts}
    for round_ in range(1, args.repeats + 1):
        shift = (round_ - 1) % max(1, len(worker_counts))
        rotated = worker_counts[shift:] + worker_counts[:shift]  # no worker count always runs first
        for mode in modes:
            rates[mode].append(student_rate(args.config, args.run_dir, mode, args.steps, args.overrides))
            print(f"round {round_}: {mode}: {rates[mode][-1]:,.0f} tokens/s ({load()})", flush=True)
        for workers in rotated:
            settings = [*args.overrides, f"student.loader.workers={workers}"]
            by_workers[workers].append(student_rate(args.config, args.run_dir, "cache", args.steps, settings))
            print(
                f"round {round_}: cache, {workers} workers: {by_workers[workers][-1]:,.0f} tokens/s ({load()})",
                flush=True,
            )
        for workers in rotated:
            settings = [*args.overrides, f"student.loader.workers={workers}"]
            loader[workers].append(loader_rate(args.config, args.run_dir, settings, args.loader_windows))
            print(
                f"round {round_}: loader alone, {workers} workers: {loader[workers][-1]:,.0f} windows/s ({load()})",
                flush=True,
            )
    best = {mode: max(values) for mode, values in rates.items()}
    seq_len = PreparedData.open(args.run_dir / "data").seq_len
    row = {
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "device": device_name(),
        "config": args.config,
        "steps": args.steps,
        "batch_windows": config.student.train.batch_size,
        "seq_len": seq_len,
        "k": config.cache.k,
        "teachers": len(config.teachers),
        **{f"{mode}_tokens_per_s": round(value) for mode, value in best.items()},
    }
    if "cache" in best and "ce" in best:
        row["cache_over_ce"] = round(best["cache"] / best["ce"], 3)
    if "cache" in best and "online" in best:
        row["cache_over_online"] = round(best["cache"] / best["online"], 3)
    for workers, values in by_workers.items():
        row[f"cache_{workers}w_tokens_per_s"] = round(max(values))
    for workers, values in loader.items():
        row[f"loader_{workers}w_windows_per_s"] = round(max(values))
    if "cache" in best:
        row["cache_student_windows_per_s"] = round(best["cache"] / (seq_len - 1))
    print_table([row], list(row))
    append_csv(Path(args.csv), [row], list(row))


if __name__ == "__main__":
    main()
