"""Tune the student's training settings on the dev split, one factor at a time, over seeds.

    python scripts/sweep_student.py --config configs/demo.toml [--run-dir runs/demo] [--set K=V] [--mode ce]
        [--seeds 1,2] [--jobs 2] [--vary student.model.dropout=0.1,0.2,0.3 ...] [--out FILE.md]

Trains the base student (the config as it is) and, for each ``--vary KEY=V1,V2,...``, one student
per value with only that key changed, each at every seed, into RUN/sweeps/<mode>/students/ (a run dir of its own whose data, teachers
and cache link to RUN's: run `pipe run` or those stages first). The score of a setting
is its mean final dev loss over the seeds (next-token CE on the dev split, what the training loop
records at the end of each epoch); the lowest wins. The table (every setting, every seed, the
minimum over epochs too) goes to stdout and to --out. A finished student is reused, so an
interrupted sweep continues where it stopped.

This is how configs/demo.toml's student settings were chosen for the CE twin (docs/results.md):
the distilled student reuses them and only adds the teacher term.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from logitcache.pipeline.config import load_config
from logitcache.pipeline.rundir import RunLayout, git_commit
from logitcache.pipeline.student import train_student
from logitcache.pipeline.training import METRICS_FILE


def _train(args: tuple[str, list[str], str]) -> str:
    config_path, overrides, run_dir = args
    return str(train_student(load_config(config_path, overrides, run_dir=run_dir), progress=False))


def dev_losses(model_dir: Path) -> list[float]:
    records = [
        json.loads(line) for line in (model_dir / METRICS_FILE).read_text().splitlines() if line.strip()
    ]
    return [r["dev_loss"] for r in records if "dev_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument(
        "--set", action="append", default=[], help="config override for every student, as for pipe run"
    )
    parser.add_argument("--mode", default="ce", choices=["ce", "cache", "online"])
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--vary", action="append", default=[], help="KEY=V1,V2,...: one student per value")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()

    base = load_config(args.config, args.set, run_dir=args.run_dir)
    layout = RunLayout.of(base)
    run = layout.root / "sweeps" / args.mode  # its own run dir: `pipe run`'s evaluate stage never sees these
    run.mkdir(parents=True, exist_ok=True)
    for name in ("data", "teachers", "cache"):
        if (layout.root / name).exists() and not (run / name).exists():
            (run / name).symlink_to((layout.root / name).resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    settings: list[tuple[str, list[str]]] = [("base", [])]
    for spec in args.vary:
        key, _, values = spec.partition("=")
        settings += [(f"{key}={value}", [f"{key}={value}"]) for value in values.split(",")]
    tasks, names = [], []
    for label, overrides in settings:
        for seed in seeds:
            slug = label.replace("student.", "").replace("=", "-") if overrides else "base"
            name = f"{slug}-s{seed}"
            names.append((label, seed, name))
            tasks.append(
                (
                    args.config,
                    [
                        *args.set,
                        *overrides,
                        f"student.mode={args.mode}",
                        f"student.seed={seed}",
                        f"student.name={name}",
                    ],
                    str(run),
                )
            )
    started = time.perf_counter()
    if args.jobs <= 1:
        dirs = [_train(task) for task in tasks]
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            args.jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
        ) as pool:
            dirs = list(pool.map(_train, tasks))

    rows = []
    for (label, seed, _), model_dir in zip(names, dirs, strict=True):
        losses = dev_losses(Path(model_dir))
        rows.append(
            {
                "setting": label,
                "seed": seed,
                "final": losses[-1],
                "min": min(losses),
                "epoch_min": losses.index(min(losses)),
            }
        )
    scores = {
        label: statistics.mean(r["final"] for r in rows if r["setting"] == label) for label, _ in settings
    }
    best = min(scores, key=scores.get)
    lines = [
        f"Student sweep ({args.mode}), {base.source}, run {run}, seeds {args.seeds}, commit {git_commit()[:7]}, "
        f"{time.strftime('%Y-%m-%d')}, {(time.perf_counter() - started) / 60:.0f} min. Score: mean final dev loss "
        "(lower is better).",
        "",
        "| setting | mean final dev loss | "
        + " | ".join(f"seed {s} final (min @ epoch)" for s in seeds)
        + " |",
        "|---|---:|" + "---:|" * len(seeds),
    ]
    for label, _ in settings:
        cells = [
            f"{r['final']:.4f} ({r['min']:.4f} @ {r['epoch_min']})" for r in rows if r["setting"] == label
        ]
        mark = " **best**" if label == best else ""
        lines.append(f"| {label}{mark} | {scores[label]:.4f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    (run / "sweep.json").write_text(
        json.dumps({"rows": rows, "scores": scores, "best": best}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
