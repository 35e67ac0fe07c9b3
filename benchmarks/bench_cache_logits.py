"""cache-logits throughput vs a plain teacher forward pass, side by side in one run.

Target (issue 5): the whole stage (teachers + ensemble + top-k selection + background encode,
compress and write) reaches >= 0.9x the tokens/s of the teachers' forward passes alone at the
same batch size, i.e. the GPU (or CPU) never waits on the disk.

    python -m benchmarks.bench_cache_logits configs/demo.toml --run-dir runs/demo

A third measurement, the teachers plus ensemble and selection without the writer, splits the
overhead between selection and writing.

Needs a run directory with prepared data and trained teachers (`pipe run` up to the teachers).
The cache is written to a temporary copy of the run directory; nothing in RUN changes.

Throughput does not depend on what the teachers learned, so teachers of other sizes can be
measured without training them: ``--untrained-teachers`` prepares the data in a temporary run
and saves freshly initialised teachers of the config's architecture (change it with ``--set``):

    python -m benchmarks.bench_cache_logits configs/demo.toml --untrained-teachers \
        --set teachers.llama.model.hidden_size=512 --set teachers.gpt2.model.hidden_size=512
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import append_csv, device_name, git_commit, print_table
from logitcache.pipeline.cache_logits import cache_logits
from logitcache.pipeline.config import load_config, teacher_fingerprint
from logitcache.pipeline.distributed import resolve_device
from logitcache.pipeline.models import build_model, count_parameters
from logitcache.pipeline.prepare import PreparedData, prepare_data
from logitcache.pipeline.teacher_signal import TeacherEnsemble
from logitcache.pipeline.teachers import finalize_model_dir, teacher_config, teacher_dir


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("--run-dir", help="a run with prepared data and trained teachers")
    parser.add_argument(
        "--untrained-teachers",
        action="store_true",
        help="prepare data and initialise the teachers in a temporary run instead of --run-dir",
    )
    parser.add_argument("--set", action="append", default=[], help="config override, as for pipe run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds after one warm-up round")
    parser.add_argument("--csv", default="benchmarks/results/cache_logits.csv")
    args = parser.parse_args()
    if bool(args.run_dir) == args.untrained_teachers:
        parser.error("give either --run-dir RUN or --untrained-teachers")
    with tempfile.TemporaryDirectory() as scratch:
        if args.untrained_teachers:
            args.run_dir = str(_untrained_run(args.config, args.set, Path(scratch) / "base"))
        measure(args)


def _untrained_run(config_path: str, overrides: list[str], run: Path) -> Path:
    """A run with prepared data and freshly initialised (untrained) teachers, marked complete."""
    config = load_config(config_path, overrides, run_dir=run)
    data = PreparedData.open(prepare_data(config, progress=False))
    for name in config.teachers:
        model = build_model(
            teacher_config(config, name).model, vocab_size=data.vocab_size, seq_len=data.seq_len, seed=0
        )
        summary = {"dev_loss": float("nan"), "steps": 0, "untrained": True}
        finalize_model_dir(teacher_dir(config, name), model, data, summary, teacher_fingerprint(config, name))
    return run


def measure(args: argparse.Namespace) -> None:
    config = load_config(args.config, args.set, run_dir=args.run_dir)
    data = PreparedData.open(Path(args.run_dir) / "data")
    device = resolve_device(config.run.device)
    selector = TeacherEnsemble.load(config, data, device)
    windows = data.windows("train")  # both measurements cover all training windows
    tokens = windows.size
    batch = config.cache.batch_size

    def plain_forward() -> tuple[float, float]:
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for begin in range(0, windows.shape[0], batch):
                ids = torch.from_numpy(windows[begin : begin + batch].astype(np.int64)).to(device)
                for model in selector.models:
                    with selector.autocast:
                        _ = model(input_ids=ids).logits
        _sync(device)
        return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)

    def forward_and_select() -> tuple[float, float]:
        """The teachers plus ensemble and selection (results on the host), without the writer."""
        _sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        for begin in range(0, windows.shape[0], batch):
            ids = torch.from_numpy(windows[begin : begin + batch].astype(np.int64))
            selector.select(ids, torch.arange(begin, begin + ids.shape[0]))
        _sync(device)
        return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu)

    def whole_stage() -> tuple[float, float, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            run.mkdir()
            (run / "data").symlink_to(Path(args.run_dir).resolve() / "data")
            (run / "teachers").symlink_to(Path(args.run_dir).resolve() / "teachers")
            cfg = load_config(args.config, args.set, run_dir=run)
            start, cpu = time.perf_counter(), time.process_time()
            out = cache_logits(cfg, progress=False)
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
            summary = json.loads((out / "COMPLETE.json").read_text())["summary"]
            shutil.rmtree(out)
        return tokens / seconds, tokens / cpu_seconds, summary

    # Steady state: one warm-up round (not counted), then `repeats` rounds in which the three
    # measurements alternate, so a change in the machine's load hits all three alike. Every
    # round is printed with the load average; the row reports the medians. Beside the wall-clock
    # rates, tokens per CPU-second of the process (all its threads): on a shared or virtual
    # machine the wall clock also counts time the process was not given, the CPU time does not
    # (but it does not see a stage that waits with cores idle: read both).
    plain_forward(), forward_and_select(), whole_stage()
    rounds, summary = [], {}
    for index in range(args.repeats):
        forward_rate, forward_cpu = plain_forward()
        select_rate, _ = forward_and_select()
        stage_rate, stage_cpu, summary = whole_stage()
        rounds.append(
            {
                "round": index + 1,
                "forward_tokens_per_s": round(forward_rate),
                "forward_select_tokens_per_s": round(select_rate),
                "cache_logits_tokens_per_s": round(stage_rate),
                "ratio": round(stage_rate / forward_rate, 3),
                "ratio_cpu_time": round(stage_cpu / forward_cpu, 3),
                "load_1min": round(os.getloadavg()[0], 2),
            }
        )
    print_table(rounds, list(rounds[0]))
    print()
    forward, selected, stage, ratio, ratio_cpu = (
        float(np.median([r[key] for r in rounds]))
        for key in (
            "forward_tokens_per_s",
            "forward_select_tokens_per_s",
            "cache_logits_tokens_per_s",
            "ratio",
            "ratio_cpu_time",
        )
    )
    row = {
        "date": dt.date.today().isoformat(),
        "commit": git_commit(),
        "device": device_name(),
        "config": args.config,
        "teachers": len(selector.models),
        "batch_windows": batch,
        "seq_len": windows.shape[1],
        "k": config.cache.k,
        "vocab": data.vocab_size,
        "teacher_params": "+".join(str(count_parameters(m)) for m in selector.models),
        "teachers_trained": not args.untrained_teachers,
        "forward_tokens_per_s": round(forward),
        "forward_select_tokens_per_s": round(selected),
        "cache_logits_tokens_per_s": round(stage),
        "ratio": round(ratio, 3),  # median of the per-round ratios
        "ratio_cpu_time": round(ratio_cpu, 3),
        "rounds": args.repeats,
        "bytes_per_position": round(summary.get("bytes_per_position", float("nan")), 1),
        "shards": summary.get("num_shards", ""),
    }
    print_table([row], list(row))
    append_csv(Path(args.csv), [row], list(row))


if __name__ == "__main__":
    main()
