"""train-student throughput: `cache` vs `ce` vs `online` students, and the data loader alone.

Targets (issue 7): tokens/s of `cache` >= 0.95x `ce` (the cache costs the student almost nothing),
and `cache` >= 1.6x `online` with two teachers the size of the student (BabyLlama-2's shapes).

    python -m benchmarks.bench_student configs/demo.toml --run-dir runs/demo --steps 40

Needs a run directory with prepared data, trained teachers and the cache (`pipe run` up to
`cache-logits`). Each measurement runs the real stage (`train_student`, the same code as
`pipe train-student`) for ``--steps`` optimizer steps in a temporary run directory that links
RUN/data, RUN/teachers and RUN/cache; tokens/s is the loop's own figure at the last step
(``metrics.jsonl``: all steps since the loop started, loader start-up included, dev evaluation
and saving excluded). The modes alternate for ``--repeats`` rounds and the best round of each is
reported, so that the ratios come from one run on the same (possibly shared) machine.

The loader alone: the student's batch source (DataLoader workers, block-aligned cache reads) over
the same plan, without training: windows/s it delivers, against the windows/s the cache-mode
student consumed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

from benchmarks import append_csv, device_name, git_commit, print_table
from logitcache.pipeline.config import load_config
from logitcache.pipeline.distributed import DistContext, resolve_device
from logitcache.pipeline.prepare import PreparedData
from logitcache.pipeline.student import make_batches, train_student
from logitcache.pipeline.training import TrainState, make_plan


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
    """Windows/s the student's batch source delivers on its own (one epoch or ``windows_limit``)."""
    config = load_config(config_path, overrides, run_dir=run_dir)
    data = PreparedData.open(run_dir / "data")
    windows = data.windows("train")
    ctx = DistContext(rank=0, world_size=1, device=resolve_device(config.run.device))
    train = config.student.train
    plan = make_plan(train, windows.shape[0], 1)
    batches = make_batches(config, data, windows, ctx, plan.micro_batch)
    start = time.perf_counter()
    batches.start(plan, TrainState())
    delivered = 0
    for batch in batches:
        delivered += batch["input_ids"].shape[0]
        if delivered >= windows_limit:
            break
    seconds = time.perf_counter() - start
    batches.close()
    return delivered / seconds


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
        "--loader-windows", type=int, default=4096, help="windows read by the loader-alone test"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--csv", default="benchmarks/results/student.csv")
    args = parser.parse_args()

    config = load_config(args.config, args.overrides, run_dir=args.run_dir)
    resolve_device(config.run.device)  # fail early on an unavailable device
    modes = args.modes.split(",")
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    loader: dict[int, list[float]] = {}
    for _ in range(args.repeats):
        for mode in modes:
            rates[mode].append(student_rate(args.config, args.run_dir, mode, args.steps, args.overrides))
            print(f"{mode}: {rates[mode][-1]:,.0f} tokens/s", flush=True)
        for workers in sorted({0, config.student.loader.workers}):
            settings = [*args.overrides, f"student.loader.workers={workers}"]
            rate = loader_rate(args.config, args.run_dir, settings, args.loader_windows)
            loader.setdefault(workers, []).append(rate)
            print(f"loader alone, {workers} workers: {rate:,.0f} windows/s", flush=True)
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
    for workers, values in sorted(loader.items()):
        row[f"loader_{workers}w_windows_per_s"] = round(max(values))
    if "cache" in best:
        row["cache_student_windows_per_s"] = round(best["cache"] / (seq_len - 1))
    print_table([row], list(row))
    append_csv(Path(args.csv), [row], list(row))


if __name__ == "__main__":
    main()
