"""scripts/gpu-check.sh --dry-run end to end (so the one GPU call cannot rot), and its helpers.

The dry run runs every part on CPU at tiny shapes under TRITON_INTERPRET=1 (about 2-3 minutes on a
busy 2-core machine); the checks here are on the format of what it writes (the numbers mean nothing
on CPU), so that a missing import, a wrong CLI flag or a broken output path fails here, not on the
GPU. The helper tests fake ``torch.cuda`` to reach the CUDA branches of the timing/memory helpers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks import PeakMemory, event_ms, host_buffer, steady_state_rate
from benchmarks.gpu_check import (
    FUSED_GPU_ARGS,
    KERNEL_GPU_ARGS,
    PART_KEYS,
    SCHEMA,
    STATUSES,
    TEACHERS,
    TRAIN_GPU,
    CmdResult,
    _stage_times_from_log,
    train_config_text,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check-out")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    return proc, out


def test_dry_run_passes_every_part(dry_run):
    proc, out = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    statuses = {p["key"]: (p["status"], p["error"]) for p in report["parts"]}
    assert proc.returncode == 0, f"{statuses}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert [p["key"] for p in report["parts"]] == list(PART_KEYS)
    for part in report["parts"]:
        assert part["status"] in STATUSES
        assert isinstance(part["seconds"], (int, float)) and isinstance(part["budget_s"], (int, float))
        expected = ("pass", "skipped") if part["key"] == "g" else ("pass",)
        assert part["status"] in expected, f"{part['key']}: {part['status']}: {part['error']}"
    assert report["schema"] == SCHEMA and report["dry_run"] is True
    assert report["wall_s"] < report["budget_s"]


def test_dry_run_figures_have_the_gpu_run_format(dry_run):
    _, out = dry_run
    report = json.loads((out / "gpu-check.json").read_text())
    parts = {p["key"]: p for p in report["parts"]}

    env = parts["a"]["figures"]
    for key in ("gpu", "driver", "version_torch", "version_triton", "torch_cuda", "host_cpus"):
        assert key in env, key
    for key in ("copy_gbs", "h2d_pinned_gbs", "matmul_bf16_tflops"):
        assert env[key] > 0, key
    assert env["autocast_dtype"] == "bfloat16"  # the training code's autocast, exercised on CPU
    assert report["environment"] == env

    tests = parts["b"]["figures"]
    assert tests["passed"] > 0 and tests["failures"] == 0 and tests["errors"] == 0 and tests["tiny"] is True

    kernel = parts["c"]
    impls = {(r["impl"], r.get("pass")) for r in kernel["rows"]}
    for impl in [("copy", "copy"), ("ours", "fwd+bwd"), ("ours-inplace", "fwd"), ("eager", "fwd+bwd")]:
        assert impl in impls
    assert ("torch.compile", "fwd+bwd") in impls
    liger = [r for r in kernel["rows"] if r["impl"] == "liger CE only"]
    assert liger and all(r.get("note", "").startswith("skipped") or r.get("ms") for r in liger)
    shape_figures = [v for v in kernel["figures"].values() if isinstance(v, dict)]
    assert shape_figures and all(f["ours_ms"] > 0 and f["eager_ms"] > 0 for f in shape_figures)

    fused = parts["d"]
    impls = {r["impl"] for r in fused["rows"]}
    assert {"gemm floor (3 matmuls)", "ours", "eager", "torch.compile", "liger FLCE", "CCE"} <= impls
    assert all(f["ours_ms"] > 0 for f in fused["figures"].values() if isinstance(f, dict))

    train = parts["e"]
    rows = {r["student"]: r for r in train["rows"]}
    assert set(rows) == {f"{m}-{c}" for m in ("cache", "ce", "online") for c in ("eager", "compile")}
    for name in ("cache-eager", "ce-eager", "online-eager"):
        assert rows[name]["steady_tokens_per_s"] > 0 and rows[name]["steady_steps"] >= 4, name
    for name in ("cache-compile", "ce-compile", "online-compile"):  # Inductor: GPU run only
        assert rows[name]["note"].startswith("skipped: dry run"), name
    for key in ("cache_over_ce_eager", "cache_over_online_eager", "train_windows", "cache_logits_s"):
        assert train["figures"][key] > 0, key
    # the profiled eager students: the loop's wait for the DataLoader and its time, per step
    for mode in ("cache", "ce"):
        assert train["figures"][f"profile_{mode}_train_ms_per_step"] > 0, mode
        assert train["figures"][f"profile_{mode}_loader_wait_ms_per_step"] >= 0, mode
    assert train["figures"]["profile"].startswith("loader wait ms/step: cache ")

    cache = parts["f"]["figures"]
    assert cache["ratio"] > 0 and cache["forward_tokens_per_s"] > 0

    small = parts["g"]
    assert small["rows"] and small["rows"][0]["stage"] == "prepare-data"
    assert all(set(r) == {"stage", "what", "seconds", "finished"} for r in small["rows"])

    assert len(report["targets"]) == 11
    for target in report["targets"]:
        assert set(target) == {"target", "value", "unit", "met"}
        assert target["met"] in (True, False, None)


def test_dry_run_writes_markdown_log_and_summary(dry_run):
    proc, out = dry_run
    markdown = (out / "gpu-check.md").read_text()
    assert "| part | status | seconds | budget | result | error |" in markdown
    assert "| target | value | unit | met |" in markdown
    for key, heading in (("a", "environment"), ("c", "kernel benchmark"), ("e", "training")):
        assert f"| {key}. {heading}" in markdown
    for section in (
        "Kernel (bf16",
        "Fused linear",
        "Training, steady state",
        "cache-logits vs plain forward",
    ):
        assert section in markdown
    log = (out / "gpu-check.log").read_text()
    assert "no .whl/ folder" in log
    for key in PART_KEYS:
        assert f"s {key}] $ " in log, f"no command logged for part {key}"
    summary = (out / "summary.txt").read_text()
    assert summary in proc.stdout  # printed last, as written
    assert "logitcache GPU check (DRY RUN)" in summary
    assert len(summary.splitlines()) <= 40  # one screen


def test_partial_run_names_its_machine_and_options(tmp_path):
    """Without part a the report still names the GPU and versions, and the command its options (the
    first GPU rerun of parts b, c and e printed "?" for both and dropped --parts)."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    argv = ["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run", "--parts", "c", "--budget-s", "200"]
    proc = subprocess.run(
        argv + ["--out", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["command"] == "bash scripts/gpu-check.sh --dry-run --parts c --budget-s 200"
    assert report["environment"]["gpu"] == "none (CPU)" and "copy_gbs" not in report["environment"]
    heading = (tmp_path / "gpu-check.md").read_text().splitlines()[0]
    assert heading.startswith("### GPU check (dry run on CPU: numbers mean nothing): none (CPU), ")
    assert "?" not in heading
    assert (
        "copy bandwidth and matmul rate not measured (part a did not run)."
        in (tmp_path / "gpu-check.md").read_text()
    )
    assert {p["key"]: p["status"] for p in report["parts"]}["c"] == "pass"


# ------------------------------------------------------------------------------------------------
# the helpers, on CPU and with a faked torch.cuda
# ------------------------------------------------------------------------------------------------


def test_timing_and_memory_helpers_fall_back_on_cpu():
    calls = []
    assert event_ms(lambda: calls.append(1), iters=3, warmup=2, device="cpu") >= 0.0
    assert len(calls) == 5
    with PeakMemory(device="cpu") as peak:
        torch.ones(1000)
    assert math.isnan(peak.peak_mib) and math.isnan(peak.extra_mib)
    buffer = host_buffer(16, torch.float32, device="cpu")
    assert buffer.shape == (16,) and not buffer.is_pinned()


class _FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.time = None

    def record(self) -> None:
        _FakeEvent.clock += 4.0
        self.time = _FakeEvent.clock

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.time - self.time


def test_timing_and_memory_helpers_cuda_branch(monkeypatch):
    """The CUDA branches, with torch.cuda faked: events around the loop, peak minus the start."""
    fake = {
        "is_available": lambda: True,
        "synchronize": lambda *a: None,
        "empty_cache": lambda: None,
        "reset_peak_memory_stats": lambda *a: None,
        "memory_allocated": lambda *a: 100 * 2**20,
        "max_memory_allocated": lambda *a: 300 * 2**20,
        "Event": _FakeEvent,
    }
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    calls = []
    assert event_ms(lambda: calls.append(1), iters=4, warmup=1) == pytest.approx(1.0)  # 4 ms / 4 calls
    assert len(calls) == 5
    with PeakMemory() as peak:
        pass
    assert peak.peak_mib == 300 and peak.extra_mib == 200
    assert benchmarks.peak_extra_mb(lambda: None) == 200
    seen = {}
    real_empty = torch.empty

    def empty(*args, **kwargs):
        seen.update(kwargs)
        return real_empty(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(torch, "empty", empty)
    host_buffer(8, torch.float32)
    assert seen["pin_memory"] is True


def test_steady_state_leaves_out_warmup(tmp_path):
    """Records every 10 steps of 1000 tokens; steps 1-30 take 1 s of training each, later ones
    0.1 s (the loop's train_s leaves evaluations out): from step 30 on, 10,000 tokens/s."""
    lines, train_s = [], 0.0
    for step in range(10, 101, 10):
        train_s += 10 * (1.0 if step <= 30 else 0.1)
        tokens = step * 1000
        lines.append({"step": step, "tokens": tokens, "tokens_per_s": tokens / train_s, "train_s": train_s})
        if step == 60:
            lines.append({"step": 60, "epoch": 0, "dev_loss": 3.0})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = steady_state_rate(path, warmup_steps=30)
    assert result["steady_tokens_per_s"] == pytest.approx(10_000)
    assert result["steady_steps"] == 70
    assert result["last_step"] == 100


def test_stage_times_from_log(tmp_path):
    log = tmp_path / "gpu-check.log"
    log.write_text(
        "[   1.0s g] $ python -m logitcache.pipeline.cli run c.toml   (timeout 100 s)\n"
        "[   2.0s g]   [prepare-data] complete, skipped\n"
        "[   2.5s g]   [train-teacher a] running\n"
        "[   9.0s g]   some output\n"
        "[  12.5s g]   [cache-logits] running\n"
        "[  20.0s g] = timed out after 19.0 s\n"
    )
    rows = _stage_times_from_log(log, ["python", "-m", "logitcache.pipeline.cli", "run", "c.toml"])
    assert [(r["stage"], r["seconds"], r["finished"]) for r in rows] == [
        ("prepare-data", 0.5, True),
        ("train-teacher a", 10.0, True),
        ("cache-logits", 7.5, False),
    ]
    log.write_text(log.read_text().replace("= timed out after 19.0 s", "= exit 0 after 19.0 s"))
    rows = _stage_times_from_log(log, ["python", "-m", "logitcache.pipeline.cli", "run", "c.toml"])
    assert rows[-1]["finished"] is True  # the last stage of a run that ended well


def test_command_error_names_the_error_line():
    result = CmdResult(
        ["x"], 1, False, 2.0, ["Traceback", "  File x", "ModuleNotFoundError: No module named 'zarr'", ""]
    )
    assert result.error() == "exit 1: ModuleNotFoundError: No module named 'zarr'"
    assert CmdResult(["x"], None, True, 30.0, []).error() == "timed out after 30 s"


# ------------------------------------------------------------------------------------------------
# what only the GPU run uses: its arguments and config, checked without running them
# ------------------------------------------------------------------------------------------------


def test_gpu_run_benchmark_arguments_parse():
    from benchmarks import bench_fused_linear, bench_kernel

    kernel = bench_kernel.parse_args(KERNEL_GPU_ARGS + ["--jsonl", "x.jsonl", "--csv", "x.csv"])
    assert kernel.shapes == "8192x128256x64,16384x16000x64" and kernel.compile_modes == "ghost"
    assert all(len(shape.split("x")) == 3 for shape in kernel.shapes.split(","))
    fused = bench_fused_linear.parse_args(FUSED_GPU_ARGS + ["--jsonl", "x.jsonl", "--csv", "x.csv"])
    assert fused.eager_shapes == 1 and len(fused.shapes.split(",")) == 2
    assert all(len(shape.split("x")) == 4 for shape in fused.shapes.split(","))


def test_gpu_run_training_config_loads(tmp_path):
    """The GPU shapes of part e make a valid config with every --set the part passes, and a
    student of about 30M parameters (the issue's shape)."""
    from logitcache.pipeline.config import load_config
    from logitcache.pipeline.models import build_model, count_parameters

    path = tmp_path / "config.toml"
    path.write_text(train_config_text(TRAIN_GPU, tmp_path / "run", "cuda"))
    sets = [f"teachers.{name}.train.max_steps={TRAIN_GPU['teacher_steps']}" for name in TEACHERS]
    for compiled in ("true", "false"):
        config = load_config(path, [*sets, "student.mode=online", f"student.train.compile={compiled}"])
        assert config.student.train.max_steps == TRAIN_GPU["steps"] > TRAIN_GPU["warmup"] + 100
        assert config.data.seq_len == 256 and config.data.vocab_size == 16000
    with torch.device("meta"):
        student = build_model(config.student.model, vocab_size=16000, seq_len=256, seed=0)
    assert 25e6 < count_parameters(student) < 40e6
