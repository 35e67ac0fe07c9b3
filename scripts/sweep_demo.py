"""A small distillation sweep at demo scale, with seeds, as in the BabyLlama papers.

For every (k, T) a cache is built (next to the base run, sharing its data and teachers); for
every alpha and seed a student is trained from it (alpha = KL weight, CE weight = 1 - alpha;
alpha = 1.0 means no CE term); CE-only twins with the same seeds are the reference. Every
student is evaluated on the held-out test split. Prints a markdown table of mean and spread
(min-max) over seeds and writes every number to SWEEP/sweep.json.

    python scripts/sweep_demo.py --base runs/results-demo --out runs/sweep [--seeds 1,2] [--ks 8,64] [--temps 1,2] [--alphas 0.5,1.0]

The base run must hold prepared data and trained teachers (`pipe run configs/demo.toml --run-dir BASE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from logitcache.pipeline.cache_logits import cache_logits
from logitcache.pipeline.config import load_config
from logitcache.pipeline.evaluation.evaluate import EvalOptions, evaluate_models
from logitcache.pipeline.student import train_student


def _link_base(base: Path, run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    for name in ("data", "teachers"):
        if not (run / name).exists():
            (run / name).symlink_to((base / name).resolve())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/demo.toml")
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--ks", default="8,64")
    parser.add_argument("--temps", default="1,2")
    parser.add_argument("--alphas", default="0.5,1.0")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict] = []

    def evaluate(model_dir: Path, data_dir: Path) -> dict:
        result = evaluate_models([model_dir], options=EvalOptions(data_dir=data_dir), progress=False)
        return result["models"][0]["held_out"]

    ce_run = args.out / "ce"
    _link_base(args.base, ce_run)
    for seed in seeds:
        config = load_config(
            args.config,
            ["student.mode=ce", f"student.seed={seed}", f"student.name=ce-s{seed}"],
            run_dir=ce_run,
        )
        held = evaluate(train_student(config, progress=False), ce_run / "data")
        rows.append({"variant": "ce", "k": None, "T": None, "alpha": 0.0, "seed": seed, **held})
        print(f"ce seed {seed}: perplexity {held['perplexity']:.2f}", flush=True)

    for k in [int(x) for x in args.ks.split(",")]:
        for temp in [float(x) for x in args.temps.split(",")]:
            run = args.out / f"k{k}-T{temp:g}"
            _link_base(args.base, run)
            cache_settings = [
                f"cache.k={k}",
                f"cache.temperature={temp}",
                f"student.distill.temperature={temp}",
            ]
            cache_logits(load_config(args.config, cache_settings, run_dir=run), progress=False)
            for alpha in [float(x) for x in args.alphas.split(",")]:
                for seed in seeds:
                    overrides = [
                        *cache_settings,
                        f"student.distill.alpha={alpha}",
                        f"student.seed={seed}",
                        f"student.name=a{alpha:g}-s{seed}",
                    ]
                    config = load_config(args.config, overrides, run_dir=run)
                    held = evaluate(train_student(config, progress=False), run / "data")
                    rows.append({"variant": "cache", "k": k, "T": temp, "alpha": alpha, "seed": seed, **held})
                    print(
                        f"k {k} T {temp:g} alpha {alpha:g} seed {seed}: perplexity {held['perplexity']:.2f}",
                        flush=True,
                    )

    (args.out / "sweep.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["k"], row["T"], row["alpha"]), []).append(row)
    print("| variant | k | T | alpha | seeds | test perplexity mean (min-max) | ECE mean (min-max) |")
    print("|---|---|---|---|---|---|---|")
    for (variant, k, temp, alpha), group in groups.items():
        ppl = [g["perplexity"] for g in group]
        ece = [g["ece"] for g in group]
        print(
            f"| {variant} | {k or '-'} | {temp or '-'} | {alpha:g} | {len(group)} | "
            f"{statistics.mean(ppl):.1f} ({min(ppl):.1f}-{max(ppl):.1f}) | "
            f"{statistics.mean(ece):.4f} ({min(ece):.4f}-{max(ece):.4f}) |"
        )


if __name__ == "__main__":
    main()
