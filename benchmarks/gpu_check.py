"""The GPU check (issue 16): every GPU figure of logitcache in one call of at most 8 minutes.

Run through ``scripts/gpu-check.sh`` (which installs the carried wheels offline and makes this
checkout importable as ``logitcache``), from the repository root::

    bash scripts/gpu-check.sh              # on the GPU machine: results in $OUT/gpu-check/
    bash scripts/gpu-check.sh --dry-run    # on CPU: tiny shapes, TRITON_INTERPRET=1 (CI runs this)

Parts, in order (cheapest and most important first), each in its own processes with a time budget;
a part that fails or overruns is reported and the next one starts:

a. environment: GPU, memory, driver, versions, device-to-device copy bandwidth (the kernel's
   physical reference), pinned host-to-device copy, a bf16 matrix product;
b. ``pytest -m gpu tests/test_kernels_gpu.py`` at full size (tiny shapes on CPU in the dry run);
c. ``benchmarks.bench_kernel``: sparse-KD+CE vs eager, torch.compile and Liger's CE;
d. ``benchmarks.bench_fused_linear``: vs the three matmuls, Cut Cross-Entropy and Liger's FLCE;
e. training through the ``pipe`` CLI: prepare-data, two teachers, cache-logits, then
   train-student ``cache`` / ``ce`` / ``online`` with torch.compile off, then on; steady-state
   tokens/s from ``RUN/students/NAME/metrics.jsonl`` with the warm-up steps left out;
f. ``benchmarks.bench_cache_logits`` on part e's run: cache-logits vs a plain teacher forward;
g. ``pipe run configs/small.toml`` cut off at the global deadline (skipped when the file is absent).

Outputs in ``--out`` (default ``$OUT/gpu-check``): ``gpu-check.json`` (every figure, schema
``SCHEMA``), ``gpu-check.md`` (tables ready to paste into docs/benchmarks.md), ``gpu-check.log``
(every command and its output, time-stamped) and ``summary.txt`` (the one-screen summary printed
last). The JSON and markdown are rewritten after each part, so a run killed from outside still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "logitcache-gpu-check/1"
STATUSES = ("pass", "fail", "skipped")
PART_KEYS = "abcdefg"
GLOBAL_BUDGET_S = 465.0  # from the start of scripts/gpu-check.sh: 8 minutes less a margin for the summary
DRY_GLOBAL_BUDGET_S = 420.0
FINAL_RESERVE_S = 5.0  # kept for writing the outputs after the last part


class PartSkipped(Exception):
    """Raised by a part that cannot run here (the message says why)."""


class PartFailed(Exception):
    """Raised by a part whose check failed (the message says what)."""


@dataclass
class PartResult:
    key: str
    name: str
    status: str = "skipped"
    error: str | None = None
    seconds: float = 0.0
    budget_s: float = 0.0
    headline: str = ""
    figures: dict = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)


@dataclass
class CmdResult:
    argv: list[str]
    rc: int | None
    timed_out: bool
    seconds: float
    lines: list[str]

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def error(self) -> str:
        """One line: why the command failed (its last error-looking line)."""
        what = f"timed out after {self.seconds:.0f} s" if self.timed_out else f"exit {self.rc}"
        for line in reversed(self.lines):
            text = line.strip()
            if re.match(r"^([\w.]+(Error|Exception|Interrupt)\b|error:|FAILED|E\s)", text):
                return f"{what}: {text[:300]}"
        last = next((line.strip() for line in reversed(self.lines) if line.strip()), "")
        return f"{what}: {last[:300]}" if last else what


class Check:
    """Shared state of one check: where outputs go, the deadline, how commands run and log."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dry = bool(args.dry_run)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.keep_work = bool(args.work) or args.keep_work
        self.python = sys.executable
        started = args.started_at or time.time()
        self.started_wall = started
        self.budget_s = args.budget_s or (DRY_GLOBAL_BUDGET_S if self.dry else GLOBAL_BUDGET_S)
        # monotonic deadline: the shell script's start plus the budget
        self.deadline = time.monotonic() - (time.time() - started) + self.budget_s
        self.small_config = (
            Path(args.small_config) if args.small_config else REPO_ROOT / "configs" / "small.toml"
        )
        self.log_path = self.out / "gpu-check.log"
        self._log = self.log_path.open("a", buffering=1)
        self._log_bytes = self.log_path.stat().st_size
        self._lock = threading.Lock()
        self.current = ""
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        if self.dry:  # a shared 2-core CI machine: one thread each (the GPU run keeps the defaults)
            self.env["TRITON_INTERPRET"] = "1"
            self.env.setdefault("OMP_NUM_THREADS", "1")
            self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.shared: dict = {}  # what one part leaves for a later one (part e's run for f and g)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, line: str) -> None:
        elapsed = time.time() - self.started_wall
        text = f"[{elapsed:7.1f}s {self.current or '-'}] {line.rstrip()}\n"
        with self._lock:
            if self._log_bytes < 15 * 2**20:  # stay under the 16 MB that comes back from $OUT
                self._log.write(text)
                self._log_bytes += len(text)

    def say(self, line: str) -> None:
        """A progress line on stdout (and in the log)."""
        print(line, flush=True)
        self.log(line)

    def run(
        self, argv: list[str], *, timeout: float, env: dict | None = None, cwd: Path | None = None
    ) -> CmdResult:
        """Run ``argv`` in its own process group, its output streamed to the log; killed (the whole
        group: DataLoader workers, compile workers) after ``timeout`` seconds."""
        timeout = max(1.0, min(timeout, self.remaining() - FINAL_RESERVE_S))
        self.log(f"$ {' '.join(argv)}   (timeout {timeout:.0f} s)")
        start = time.monotonic()
        proc = subprocess.Popen(
            argv,
            cwd=str(cwd or REPO_ROOT),
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
        )
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if len(lines) > 4000:
                    del lines[:1000]
                self.log("  " + line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        reader.join(timeout=10)
        seconds = time.monotonic() - start
        result = CmdResult(argv, proc.returncode, timed_out, seconds, lines)
        self.log(f"= {'timed out' if timed_out else f'exit {proc.returncode}'} after {seconds:.1f} s")
        return result

    def close(self) -> None:
        self._log.close()
        if not self.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this check started, then SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ------------------------------------------------------------------------------------------------
# a. environment
# ------------------------------------------------------------------------------------------------


def probe_environment(dry: bool, facts_only: bool = False) -> dict:
    """Facts and the physical ceilings of this machine (runs in a child process: ``--probe-env``).

    ``facts_only``: the versions, GPU and driver without the measurements (a run without part a
    still names its machine in the report)."""
    import importlib.metadata as md
    import platform

    import torch

    from benchmarks import PeakMemory, event_ms, host_buffer

    facts: dict = {"python": platform.python_version(), "host_cpus": os.cpu_count()}
    try:
        facts["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    for dist in ("torch", "triton", "transformers", "tokenizers", "numpy", "zarr", "numcodecs",
                 "liger-kernel", "cut-cross-entropy"):  # fmt: skip
        try:
            facts[f"version_{dist}"] = md.version(dist)
        except md.PackageNotFoundError:
            facts[f"version_{dist}"] = "not installed"
    facts["cuda_available"] = torch.cuda.is_available()
    facts["torch_cuda"] = torch.version.cuda or "cpu build"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        )
        try:
            smi = (
                subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=driver_version,memory.used,utilization.gpu,clocks.sm,clocks.mem",
                        "--format=csv,noheader,nounits",
                    ],  # fmt: skip
                    capture_output=True,
                    text=True,
                    timeout=15,
                )
                .stdout.strip()
                .splitlines()[0]
            )
            driver, used, util, sm, mem = (x.strip() for x in smi.split(","))
            facts.update(driver=driver, gpu_memory_used_mib_before=used, gpu_util_pct_before=util,
                         sm_clock_mhz=sm, mem_clock_mhz=mem)  # fmt: skip
        except (OSError, subprocess.SubprocessError, IndexError, ValueError) as exc:
            facts["driver"] = f"nvidia-smi failed: {exc}"
    else:
        facts.update(gpu="none (CPU)", driver="none")
    if facts_only:
        return facts

    # Device-to-device copy: read + write of a buffer far larger than L2 (random data, not zeros).
    nbytes = 8 * 2**20 if dry else 2 * 2**30
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), iters=2 if dry else 20, warmup=1 if dry else 3, device=device)
    facts["copy_gbs"] = round(2 * nbytes / ms / 1e6, 1)
    facts["copy_bytes"] = 2 * nbytes
    # Host-to-device from pinned memory with a non-blocking copy (what the student's loader does).
    h2d_bytes = 4 * 2**20 if dry else 512 * 2**20
    host = host_buffer(h2d_bytes // 4, torch.float32, device=device)
    host.uniform_()
    facts["host_pinned"] = bool(host.is_pinned()) if device == "cuda" else False
    ms = event_ms(lambda: host.to(device, non_blocking=True), iters=2 if dry else 10, warmup=1, device=device)
    facts["h2d_pinned_gbs"] = round(h2d_bytes / ms / 1e6, 1)
    # bf16 matrix product (the fused-linear ceiling) on random bf16 operands; then autocast, as the
    # training code runs it, must turn an fp32 product into bf16.
    size = 256 if dry else 8192
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    b = torch.randn(size, size, device=device).to(torch.bfloat16)
    with PeakMemory(device=device) as peak:
        ms = event_ms(lambda: a @ b, iters=2 if dry else 10, warmup=1 if dry else 3, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        facts["autocast_dtype"] = str((a.float()[:8, :8] @ b.float()[:8, :8]).dtype).removeprefix("torch.")
    facts["matmul_bf16_tflops"] = round(2 * size**3 / ms / 1e9, 1)
    facts["matmul_peak_mib"] = None if math.isnan(peak.peak_mib) else round(peak.peak_mib, 1)
    return facts


def run_probe(check: Check, timeout: float, *, facts_only: bool = False) -> tuple[CmdResult, dict | None]:
    """:func:`probe_environment` in a child process: its result and the facts (None if none came)."""
    path = check.work / ("env-facts.json" if facts_only else "env.json")
    argv = [check.python, "-m", "benchmarks.gpu_check", "--probe-env", str(path)]
    argv += (["--facts-only"] if facts_only else []) + (["--dry-run"] if check.dry else [])
    result = check.run(argv, timeout=timeout)
    return result, json.loads(path.read_text()) if result.ok and path.is_file() else None


def probe_facts_only(check: Check) -> dict:
    """The machine's facts for the report when part a does not run (no measurements; {} on failure)."""
    return run_probe(check, 60, facts_only=True)[1] or {}


def part_environment(check: Check, part: PartResult) -> None:
    result, facts = run_probe(check, part.budget_s)
    if facts is None:
        raise PartFailed(result.error())
    part.figures.update(facts)
    check.shared["copy_gbs"] = facts.get("copy_gbs")
    check.shared["env"] = facts
    memory = f" {facts['gpu_memory_gib']} GiB" if "gpu_memory_gib" in facts else ""
    part.headline = (
        f"{facts.get('gpu')}{memory}, driver {facts.get('driver')}, "
        f"torch {facts.get('version_torch')}, triton {facts.get('version_triton')}, "
        f"copy {facts.get('copy_gbs')} GB/s, bf16 mm {facts.get('matmul_bf16_tflops')} TFLOP/s"
    )
    if not check.dry and not facts.get("cuda_available"):
        raise PartFailed("no CUDA device visible to torch")


# ------------------------------------------------------------------------------------------------
# b. pytest -m gpu
# ------------------------------------------------------------------------------------------------


def part_pytest(check: Check, part: PartResult) -> None:
    junit = check.work / "junit-gpu.xml"
    argv = [check.python, "-m", "pytest", "-m", "gpu", "tests/test_kernels_gpu.py", "-v", "-p", "no:cacheprovider",
            f"--junitxml={junit}"]  # fmt: skip
    env = {"LOGITCACHE_GPU_TESTS": "tiny"} if check.dry else {}
    if not check.dry and importlib.util.find_spec("xdist") is not None:
        # ~45 Triton specialisations compile in 4 processes instead of one (16 host cores, one GPU)
        argv += ["-n", "4"]
        part.figures["xdist_workers"] = 4
    result = check.run(argv, timeout=part.budget_s, env=env)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[dict] = []
    if junit.is_file():
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            for key in counts:
                counts[key] = int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                for bad in list(case.findall("failure")) + list(case.findall("error")):
                    message = (bad.get("message") or bad.text or "").strip().splitlines()
                    failed.append({"test": case.get("name"), "error": (message[0] if message else "")[:300]})
    else:  # killed at the budget: no XML; count the -v lines ("PASSED tests/x.py::t" or "x.py::t PASSED")
        outcomes = {}
        for line in result.lines:
            match = re.search(
                r"(PASSED|FAILED|SKIPPED|ERROR)\s+(\S+::\S+)|(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR)", line
            )
            if match:
                outcomes[match[2] or match[3]] = match[1] or match[4]
        values = list(outcomes.values())
        counts.update(tests=len(values), failures=values.count("FAILED"), errors=values.count("ERROR"),
                      skipped=values.count("SKIPPED"))  # fmt: skip
        failed += [
            {"test": t, "error": "(see the log)"} for t, o in outcomes.items() if o in ("FAILED", "ERROR")
        ]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    part.figures.update(counts, tiny=check.dry)
    part.rows.extend(failed)
    part.headline = f"{counts['passed']} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if result.timed_out:
        raise PartFailed(f"{result.error()} ({part.headline} in the report so far)")
    if failed:
        raise PartFailed(f"{len(failed)} failed, first: {failed[0]['test']}: {failed[0]['error']}")
    if counts["passed"] == 0:
        raise PartFailed(result.error() if not result.ok else "no test ran (no CUDA?)")
    if not result.ok:
        raise PartFailed(result.error())


# ------------------------------------------------------------------------------------------------
# c. kernel benchmark, d. fused-linear benchmark
# ------------------------------------------------------------------------------------------------


def _bench_rows(check: Check, part: PartResult, module: str, args: list[str]) -> list[dict]:
    jsonl = check.work / f"{module.rsplit('.', 1)[-1]}.jsonl"
    jsonl.unlink(missing_ok=True)
    argv = [check.python, "-m", module, "--jsonl", str(jsonl), "--csv", str(check.work / f"{jsonl.stem}.csv")]
    result = check.run(argv + args, timeout=part.budget_s)
    rows = read_jsonl(jsonl)
    part.rows.extend(rows)
    errors = [r for r in rows if str(r.get("note") or "").startswith(("error", "out of memory"))]
    if not result.ok:
        raise PartFailed(f"{result.error()} ({len(rows)} rows measured before)")
    if not rows:
        raise PartFailed("no rows measured")
    if errors:
        first = errors[0]
        raise PartFailed(
            f"{len(errors)} rows failed, first: {first.get('impl')} {first.get('mode')}: {first.get('note')}"
        )
    return rows


def _pick(rows: list[dict], **match: object) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and _num(row.get("ms")) is not None:
            return row
    return None


# The benchmark arguments of the GPU run (tests/test_gpu_check.py parses them with each benchmark's parser).
KERNEL_GPU_ARGS = ["--shapes", "8192x128256x64,16384x16000x64", "--dtypes", "bf16", "--modes", "ghost,topk",
                   "--compile-modes", "ghost", "--rep-ms", "100"]  # fmt: skip
KERNEL_DRY_ARGS = ["--smoke", "--modes", "ghost,topk", "--compile-modes", "ghost"]
FUSED_GPU_ARGS = ["--shapes", "16384x1024x128256x64,16384x2048x128256x64", "--eager-shapes", "1",
                  "--modes", "ghost", "--rep-ms", "100"]  # fmt: skip
FUSED_DRY_ARGS = ["--smoke", "--modes", "ghost"]


def part_kernel(check: Check, part: PartResult) -> None:
    args = KERNEL_DRY_ARGS if check.dry else KERNEL_GPU_ARGS
    rows = _bench_rows(check, part, "benchmarks.bench_kernel", args)
    headline = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ours = _pick(rows, shape=shape, mode="ghost", impl="ours", **{"pass": "fwd+bwd"})
        inplace = _pick(rows, shape=shape, mode="ghost", impl="ours-inplace", **{"pass": "fwd"})
        liger = _pick(rows, shape=shape, impl="liger CE only", **{"pass": "fwd+bwd"})
        eager = _pick(rows, shape=shape, mode="ghost", impl="eager", **{"pass": "fwd+bwd"})
        compiled = _pick(rows, shape=shape, mode="ghost", impl="torch.compile", **{"pass": "fwd+bwd"})
        vocab = int(shape.split("x")[1])
        fig = {
            "ours_ms": ours and ours["ms"],
            "ours_pct_copy": ours and ours.get("% copy"),
            "ours_gbs": ours and ours.get("GB/s"),
            "inplace_fwd_peak_extra_mib": inplace and inplace.get("peak extra MiB"),
            "logits_mib": int(shape.split("x")[0]) * vocab * 2 / 2**20,
            "eager_ms": eager and eager["ms"],
            "compile_ms": compiled and compiled["ms"],
            "liger_ce_ms": liger and liger["ms"],
        }
        if ours and liger:
            fig["liger_over_ours"] = liger["ms"] / ours["ms"]
        if ours and eager:
            fig["eager_over_ours"] = eager["ms"] / ours["ms"]
        part.figures[shape] = fig
        pct = _num(fig["ours_pct_copy"])
        headline.append(
            f"V={vocab}: {fig['ours_ms'] and round(fig['ours_ms'], 3)} ms"
            + (f", {pct:.0f}% copy" if pct is not None else "")
            + (f", liger/ours {fig['liger_over_ours']:.2f}" if "liger_over_ours" in fig else "")
        )
    part.headline = "; ".join(headline)


def part_fused_linear(check: Check, part: PartResult) -> None:
    args = FUSED_DRY_ARGS if check.dry else FUSED_GPU_ARGS
    rows = _bench_rows(check, part, "benchmarks.bench_fused_linear", args)
    headline = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ours = _pick(rows, shape=shape, mode="ghost", impl="ours")
        cce = _pick(rows, shape=shape, impl="CCE")
        liger = _pick(rows, shape=shape, impl="liger FLCE")
        floor = _pick(rows, shape=shape, impl="gemm floor (3 matmuls)")
        fig = {
            "ours_ms": ours and ours["ms"],
            "ours_x_floor": ours and ours.get("x floor"),
            "ours_peak_mib": ours and ours.get("peak MiB"),
            "ours_peak_over_inputs": ours and ours.get("peak / inputs"),
            "floor_ms": floor and floor["ms"],
            "cce_ms": cce and cce["ms"],
            "cce_peak_mib": cce and cce.get("peak MiB"),
            "liger_ms": liger and liger["ms"],
            "liger_peak_mib": liger and liger.get("peak MiB"),
        }
        part.figures[shape] = fig
        hidden = shape.split("x")[1]
        xf = _num(fig["ours_x_floor"])
        po = _num(fig["ours_peak_over_inputs"])
        headline.append(
            f"H={hidden}: {fig['ours_ms'] and round(fig['ours_ms'], 2)} ms"
            + (f", {xf:.2f}x floor" if xf is not None else "")
            + (f", peak {po:.2f}x inputs" if po is not None else "")
        )
    part.headline = "; ".join(headline)


# ------------------------------------------------------------------------------------------------
# e. training through the CLI
# ------------------------------------------------------------------------------------------------

# The GPU shapes: a ~34M-parameter Llama student (V = 16000, hidden 512, 6 layers, untied
# embeddings), two teachers of the same size (Llama and GPT-2), 256-token windows, batch 32.
TRAIN_GPU = dict(
    max_chars=800_000, vocab=16000, seq_len=256, hidden=512, layers=6, heads=8, kv_heads=4, ffn=1408,
    gpt_ffn=2048, batch=32, steps=140, warmup=30, log_every=10, teacher_steps=10, cache_batch=64,
    held_out_fraction=0.02, profile_steps=40,
)  # fmt: skip
TRAIN_DRY = dict(
    max_chars=12_000, vocab=512, seq_len=32, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64,
    gpt_ffn=64, batch=16, steps=8, warmup=3, log_every=1, teacher_steps=1, cache_batch=64,
    held_out_fraction=0.1,  # 8 sources x 12k characters: 0.02 leaves the test split empty
    profile_steps=3,
)  # fmt: skip
TEACHERS = ("llama", "gpt2")
ONLINE_COMPILE_MIN_S = 60  # GPU: compile the online student only with this much of part e's budget left
PROFILE_MIN_S = 45  # GPU: profile the eager cache and ce students only with this much of part e's budget left
PROFILE_LINE = re.compile(r"^profile of (\w+): (.*)$")
STUDENT_MODES = ("cache", "ce", "online")


def train_config_text(shape: dict, run_dir: Path, device: str) -> str:
    return textwrap.dedent(
        f"""\
        # Written by benchmarks/gpu_check.py (part e). Teachers: {shape["teacher_steps"]} steps only
        # (their cost per step does not depend on what they learned).
        [run]
        dir = "{run_dir}"
        seed = 1
        device = "{device}"

        [data]
        corpus = "{REPO_ROOT / "corpus"}"
        max_chars_per_file = {shape["max_chars"]}
        vocab_size = {shape["vocab"]}
        seq_len = {shape["seq_len"]}
        document_words = 128
        dev_fraction = {shape["held_out_fraction"]}
        test_fraction = {shape["held_out_fraction"]}

        [teachers.llama.model]
        family = "llama"
        hidden_size = {shape["hidden"]}
        num_layers = {shape["layers"]}
        num_heads = {shape["heads"]}
        num_kv_heads = {shape["kv_heads"]}
        intermediate_size = {shape["ffn"]}

        [teachers.llama.train]
        batch_size = {shape["batch"]}
        checkpoint_every = 100000
        log_every = 1

        [teachers.gpt2.model]
        family = "gpt2"
        hidden_size = {shape["hidden"]}
        num_layers = {shape["layers"]}
        num_heads = {shape["heads"]}
        intermediate_size = {shape["gpt_ffn"]}

        [teachers.gpt2.train]
        batch_size = {shape["batch"]}
        checkpoint_every = 100000
        log_every = 1

        [cache]
        k = 64
        mode = "topk"
        batch_size = {shape["cache_batch"]}

        [student.model]
        family = "llama"
        hidden_size = {shape["hidden"]}
        num_layers = {shape["layers"]}
        num_heads = {shape["heads"]}
        num_kv_heads = {shape["kv_heads"]}
        intermediate_size = {shape["ffn"]}

        [student.train]
        lr = 1e-3
        batch_size = {shape["batch"]}
        epochs = 1000
        max_steps = {shape["steps"]}
        warmup_steps = 10
        log_every = {shape["log_every"]}
        checkpoint_every = 100000

        [student.distill]
        alpha = 0.5
        temperature = 2.0
        tail = "ghost"
        """
    )


def part_training(check: Check, part: PartResult) -> None:
    from benchmarks import steady_state_rate

    shape = TRAIN_DRY if check.dry else TRAIN_GPU
    part_deadline = time.monotonic() + part.budget_s
    root = check.work / "train"
    run_dir = root / "run"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text(train_config_text(shape, run_dir, "cpu" if check.dry else "cuda"))
    sets = [
        arg
        for name in TEACHERS
        for arg in ("--set", f"teachers.{name}.train.max_steps={shape['teacher_steps']}")
    ]
    pipe = [check.python, "-m", "logitcache.pipeline.cli"]
    part.figures["shape"] = dict(shape)

    def left() -> float:
        return part_deadline - time.monotonic()

    def stage(label: str, argv: list[str]) -> CmdResult:
        result = check.run(argv, timeout=left())
        part.figures[f"{label}_s"] = round(result.seconds, 1)
        if not result.ok:
            raise PartFailed(f"{label}: {result.error()}")
        return result

    stage("prepare_data", [*pipe, "prepare-data", str(config)])
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    part.figures["train_windows"] = manifest["splits"]["train"]["windows"]
    for name in TEACHERS:
        stage(f"train_teacher_{name}", [*pipe, "train-teacher", str(config), "--teacher", name, *sets])
    stage("cache_logits", [*pipe, "cache-logits", str(config), *sets])
    check.shared["train"] = {"config": config, "run_dir": run_dir, "sets": sets}

    failures: list[str] = []
    cut_off: list[str] = []
    rates: dict[tuple[str, bool], float] = {}
    for compiled in (False, True):
        for mode in STUDENT_MODES:
            name = f"{mode}-{'compile' if compiled else 'eager'}"
            row: dict = {"student": name, "mode": mode, "compile": compiled}
            if left() < 10:
                row["note"] = "skipped: part e's time budget spent"
                part.rows.append(row)
                continue
            if compiled and check.dry:
                # Inductor on a CPU takes minutes; the flag itself is checked by
                # tests/test_gpu_check.py::test_gpu_run_training_config_loads
                row["note"] = "skipped: dry run (Inductor on CPU is too slow for CI)"
                part.rows.append(row)
                continue
            if compiled and mode == "online" and left() < ONLINE_COMPILE_MIN_S:
                # the targets compare cache with ce compiled; online's compile comes last, if it fits
                row["note"] = f"skipped: under {ONLINE_COMPILE_MIN_S} s of part e's budget left"
                part.rows.append(row)
                continue
            argv = [*pipe, "train-student", str(config), "--mode", mode, "--name", name, *sets,
                    "--set", f"student.train.compile={'true' if compiled else 'false'}"]  # fmt: skip
            result = check.run(argv, timeout=left())
            row["wall_s"] = round(result.seconds, 1)
            metrics = run_dir / "students" / name / "metrics.jsonl"
            if metrics.is_file():
                row.update(steady_state_rate(metrics, shape["warmup"]))
            if result.timed_out:  # the part's budget, not a broken run: noted, not a failure
                row["note"] = f"cut off at part e's budget after {result.seconds:.0f} s"
                cut_off.append(name)
            elif not result.ok:
                row["note"] = result.error()
                failures.append(f"{name}: {result.error()}")
            elif row.get("steady_tokens_per_s"):
                rates[(mode, compiled)] = row["steady_tokens_per_s"]
            else:
                failures.append(f"{name}: no steady-state interval in metrics.jsonl")
            part.rows.append(row)
    headline = []
    for compiled in (False, True):
        tag = "compile" if compiled else "eager"
        cache, ce, online = (rates.get((m, compiled)) for m in STUDENT_MODES)
        if cache and ce:
            part.figures[f"cache_over_ce_{tag}"] = cache / ce
        if cache and online:
            part.figures[f"cache_over_online_{tag}"] = cache / online
        if cache:
            part.figures[f"cache_tokens_per_s_{tag}"] = cache
            headline.append(
                f"{tag}: cache {cache:,.0f} tok/s"
                + (f", /ce {cache / ce:.2f}" if ce else "")
                + (f", /online {cache / online:.2f}" if online else "")
            )
    part.headline = "; ".join(headline) or "no student finished"
    if cut_off:
        part.figures["cut_off"] = cut_off
        part.headline += f" ({', '.join(cut_off)} cut off at the budget)"
    profile_students(check, part, shape, config, run_dir, sets, left())
    if str(part.figures.get("profile", "")).startswith("loader wait"):
        part.headline += f"; {part.figures['profile']}"
    if failures:
        raise PartFailed("; ".join(failures))


def profile_students(
    check: Check, part: PartResult, shape: dict, config: Path, run_dir: Path, sets: list[str], left: float
) -> None:
    """The eager cache and ce students again, a few steps each under torch.profiler, when the part's
    budget allows: their top ops go to the log, the loop's wait for the DataLoader per step to the
    figures (``profile_<mode>_loader_wait_ms_per_step``): does reading the cache starve the GPU?"""
    min_s = 5 if check.dry else PROFILE_MIN_S
    if left < min_s:
        part.figures["profile"] = f"skipped: under {min_s} s of part e's budget left"
        return
    argv = [check.python, "-m", "benchmarks.bench_student", str(config), "--run-dir", str(run_dir),
            "--repeats", "0", "--profile-steps", str(shape["profile_steps"]), "--modes", "cache,ce",
            "--csv", str(check.work / "student_profile.csv"), *sets,
            "--set", "student.train.compile=false"]  # fmt: skip
    result = check.run(argv, timeout=left)
    if not result.ok:
        part.figures["profile"] = f"failed: {result.error()}"  # diagnostics only: not a part failure
        return
    for line in result.lines:
        match = PROFILE_LINE.match(line.strip())
        for name, value in (item.rsplit(" ", 1) for item in match.group(2).split(", ")) if match else []:
            part.figures[f"profile_{match.group(1)}_{name}"] = float(value)
    waits = [f"{m} {part.figures[f'profile_{m}_loader_wait_ms_per_step']:.1f}" for m in ("cache", "ce")
             if f"profile_{m}_loader_wait_ms_per_step" in part.figures]  # fmt: skip
    part.figures["profile"] = "loader wait ms/step: " + ", ".join(waits) if waits else "no profile lines"


# ------------------------------------------------------------------------------------------------
# f. cache-logits vs a plain forward
# ------------------------------------------------------------------------------------------------


def part_cache_logits(check: Check, part: PartResult) -> None:
    train = check.shared.get("train")
    if not train:
        raise PartSkipped("needs part e's run (prepared data and two teachers), which did not finish")
    csv_path = check.work / "cache_logits.csv"
    argv = [check.python, "-m", "benchmarks.bench_cache_logits", str(train["config"]), "--run-dir",
            str(train["run_dir"]), "--repeats", "1" if check.dry else "2", "--csv", str(csv_path), *train["sets"]]  # fmt: skip
    result = check.run(argv, timeout=part.budget_s)
    if not result.ok:
        raise PartFailed(result.error())
    import csv

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise PartFailed("bench_cache_logits wrote no row")
    row = rows[-1]
    part.rows.append(row)
    for key in ("forward_tokens_per_s", "forward_select_tokens_per_s", "cache_logits_tokens_per_s", "ratio",
                "bytes_per_position", "teacher_params", "vocab", "seq_len", "batch_windows"):  # fmt: skip
        value = row.get(key, "")
        try:
            part.figures[key] = float(value)
        except ValueError:
            part.figures[key] = value
    fwd = part.figures.get("forward_tokens_per_s")
    sel = part.figures.get("forward_select_tokens_per_s")
    if isinstance(fwd, float) and isinstance(sel, float) and fwd > 0:
        part.figures["select_over_forward"] = sel / fwd
    part.headline = (
        f"forward {row.get('forward_tokens_per_s')} tok/s, +selection {row.get('forward_select_tokens_per_s')}, "
        f"whole stage {row.get('cache_logits_tokens_per_s')}, ratio {row.get('ratio')}"
    )


# ------------------------------------------------------------------------------------------------
# g. pipe run configs/small.toml, cut off at the deadline
# ------------------------------------------------------------------------------------------------


def part_small_run(check: Check, part: PartResult) -> None:
    config, run_dir, sets, note = check.small_config, check.work / "small-run", [], ""
    if not config.is_file():
        train = check.shared.get("train")
        if not (check.dry and train):
            raise PartSkipped(f"{config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config} "
                              "does not exist yet")  # fmt: skip
        # dry run: the cut-off and the stage parsing are exercised on part e's tiny run
        config, run_dir, sets = train["config"], train["run_dir"], train["sets"]
        note = f"dry run: {check.small_config.name} absent, exercised on part e's tiny config"
    cutoff = part.budget_s if check.dry else check.remaining() - FINAL_RESERVE_S - 5
    if cutoff < (5 if check.dry else 20):
        raise PartSkipped(f"only {cutoff:.0f} s left before the deadline")
    argv = [
        check.python,
        "-m",
        "logitcache.pipeline.cli",
        "run",
        str(config),
        "--run-dir",
        str(run_dir),
        *sets,
    ]
    start = time.monotonic()
    result = check.run(argv, timeout=cutoff)
    # stage lines look like "[cache-logits] running" / "[prepare-data] complete, skipped"; the log
    # holds them with their time stamps
    times = _stage_times_from_log(check.log_path, argv)
    part.rows.extend(times)
    part.figures.update(
        config=str(config), cutoff_s=round(cutoff), wall_s=round(time.monotonic() - start, 1),
        cut_off=result.timed_out, stages_reached=len(times), note=note,
    )  # fmt: skip
    reached = times[-1]["stage"] if times else "none"
    part.headline = (
        f"{'cut off' if result.timed_out else 'finished'} after {result.seconds:.0f} s at stage {reached}"
        + (f" ({note})" if note else "")
    )
    if not result.timed_out and not result.ok:
        raise PartFailed(result.error())


def _stage_times_from_log(log_path: Path, argv: list[str]) -> list[dict]:
    """Seconds per stage of the last `pipe run` in the log: from its "[stage] ..." line to the next."""
    lines = log_path.read_text(errors="replace").splitlines()
    command = f"$ {' '.join(argv)}"
    begin = max((i for i, line in enumerate(lines) if command in line), default=-1)
    events: list[tuple[float, str, str]] = []
    end_time, completed = None, False
    for line in lines[begin + 1 :]:
        match = re.match(r"^\[\s*(?P<t>[\d.]+)s [^\]]*\]\s+(?P<text>.*)$", line)
        if not match:
            continue
        text = match["text"].strip()
        if text.startswith("= "):
            end_time, completed = float(match["t"]), text.startswith("= exit 0")
            break
        stage = re.match(r"^\[(?P<stage>[^\]]+)\] (?P<what>running|complete, skipped)", text)
        if stage:
            events.append((float(match["t"]), stage["stage"], stage["what"]))
    rows = []
    for index, (t, stage, what) in enumerate(events):
        t_next = events[index + 1][0] if index + 1 < len(events) else end_time
        rows.append(
            {
                "stage": stage,
                "what": what,
                "seconds": None if t_next is None else round(t_next - t, 1),
                "finished": index + 1 < len(events) or completed,  # the last one: if the run ended well
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------
# targets, outputs, summary
# ------------------------------------------------------------------------------------------------

PARTS: list[tuple[str, str, float, float, Callable[[Check, PartResult], None]]] = [
    # key, name, GPU budget (s), dry-run budget (s), function
    ("a", "environment", 45, 60, part_environment),
    ("b", "pytest -m gpu", 120, 90, part_pytest),
    ("c", "kernel benchmark", 90, 60, part_kernel),
    ("d", "fused-linear benchmark", 90, 60, part_fused_linear),
    ("e", "training: cache vs ce vs online", 275, 180, part_training),
    ("f", "cache-logits vs forward", 60, 60, part_cache_logits),
    # GPU: whatever time is left; dry run: part e's tiny run has most stages done: ~20 s (under
    # load, 10 s did not reach the first stage line: Python start-up alone takes that long)
    ("g", "pipe run configs/small.toml", 0, 30, part_small_run),
]


def evaluate_targets(parts: dict[str, PartResult]) -> list[dict]:
    """The issue's targets with the measured value and met / not met / None (not measured)."""
    targets = []

    def add(name: str, value: float | None, met: bool | None, unit: str = "") -> None:
        targets.append(
            {"target": name, "value": value, "unit": unit, "met": met if value is not None else None}
        )

    kernel = parts["c"].figures if "c" in parts else {}
    small_v = next((v for k, v in kernel.items() if isinstance(v, dict) and "x16000x" in k), {})
    large_v = next((v for k, v in kernel.items() if isinstance(v, dict) and "x128256x" in k), {})
    pct = _num(small_v.get("ours_pct_copy"))
    add("kernel fwd+bwd >= 80 % of copy bandwidth at V = 16000", pct, pct is not None and pct >= 80, "%")
    ratio = _num(large_v.get("liger_over_ours"))
    add("kernel at N = 8192, V = 128256 no slower than Liger CE-only (liger/ours >= 1)", ratio,
        ratio is not None and ratio >= 1.0, "x")  # fmt: skip
    extra, logits = _num(large_v.get("inplace_fwd_peak_extra_mib")), _num(large_v.get("logits_mib"))
    share = extra / logits if extra is not None and logits else None
    add("in-place kernel: peak extra memory O(N k), not O(N V) (< 10 % of the logits)", share,
        share is not None and share < 0.10, "x logits")  # fmt: skip
    fused = parts["d"].figures if "d" in parts else {}
    first = next((v for k, v in fused.items() if isinstance(v, dict) and "x1024x" in k), {})
    po = _num(first.get("ours_peak_over_inputs"))
    add(
        "fused linear peak memory <= 1.2x (weights + hidden + grads), H = 1024",
        po,
        po is not None and po <= 1.2,
        "x",
    )
    ours_peak, cce_peak = _num(first.get("ours_peak_mib")), _num(first.get("cce_peak_mib"))
    add("fused linear peak memory <= Cut Cross-Entropy's (ours/CCE)",
        ours_peak / cce_peak if ours_peak and cce_peak else None,
        bool(ours_peak and cce_peak and ours_peak <= cce_peak), "x")  # fmt: skip
    xf = _num(first.get("ours_x_floor"))
    add(
        "fused linear time <= 1.15x the matmuls it replaces, H = 1024", xf, xf is not None and xf <= 1.15, "x"
    )
    train = parts["e"].figures if "e" in parts else {}
    for tag in ("eager", "compile"):
        value = _num(train.get(f"cache_over_ce_{tag}"))
        add(
            f"train-student cache >= 0.95x ce tokens/s ({tag})",
            value,
            value is not None and value >= 0.95,
            "x",
        )
        value = _num(train.get(f"cache_over_online_{tag}"))
        add(
            f"train-student cache >= 1.6x online, two teachers ({tag})",
            value,
            value is not None and value >= 1.6,
            "x",
        )
    cache = parts["f"].figures if "f" in parts else {}
    value = _num(cache.get("ratio"))
    add("cache-logits >= 0.9x a plain teacher forward", value, value is not None and value >= 0.9, "x")
    return targets


def _fmt(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value).replace("|", "/")


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return out


KERNEL_COLUMNS = [
    "shape",
    "dtype",
    "mode",
    "impl",
    "pass",
    "ms",
    "GB/s",
    "% copy",
    "peak extra MiB",
    "x vs eager",
    "note",
]
FUSED_COLUMNS = ["shape", "mode", "impl", "ms", "TFLOP/s", "x floor", "peak MiB", "peak / inputs", "note"]
TRAIN_COLUMNS = [
    "student",
    "steady_tokens_per_s",
    "steady_steps",
    "cumulative_tokens_per_s",
    "wall_s",
    "note",
]
CACHE_COLUMNS = ["teachers", "teacher_params", "vocab", "seq_len", "batch_windows", "forward_tokens_per_s",
                 "forward_select_tokens_per_s", "cache_logits_tokens_per_s", "ratio", "bytes_per_position"]  # fmt: skip


def render_markdown(report: dict) -> str:
    env = report.get("environment", {})
    title = "GPU check (dry run on CPU: numbers mean nothing)" if report["dry_run"] else "GPU check"
    lines = [
        f"### {title}: {env.get('gpu', '?')}, {report['started']}, commit {report['commit']}",
        "",
        f"Command: `{report['command']}`; wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"torch {env.get('version_torch', '?')} (CUDA {env.get('torch_cuda', '?')}), triton "
        f"{env.get('version_triton', '?')}, driver {env.get('driver', '?')}, Liger {env.get('version_liger-kernel', '?')}, "
        f"CCE {env.get('version_cut-cross-entropy', '?')}; "
        + (
            f"copy bandwidth {env['copy_gbs']} GB/s (read + write), bf16 matmul "
            f"{env.get('matmul_bf16_tflops', '?')} TFLOP/s."
            if "copy_gbs" in env
            else "copy bandwidth and matmul rate not measured (part a did not run)."
        ),
        "",
    ]
    lines += _table(
        [
            {
                "part": f"{p['key']}. {p['name']}",
                "status": p["status"],
                "seconds": p["seconds"],
                "budget": p["budget_s"],
                "result": p["headline"],
                "error": p["error"],
            }  # fmt: skip
            for p in report["parts"]
        ],
        ["part", "status", "seconds", "budget", "result", "error"],
    )
    lines += ["", "Targets (issue 16):", ""]
    lines += _table(
        [
            dict(t, met={True: "met", False: "**not met**", None: "not measured"}[t["met"]])
            for t in report["targets"]
        ],
        ["target", "value", "unit", "met"],
    )
    parts = {p["key"]: p for p in report["parts"]}
    sections = [
        ("c", "Kernel (bf16, k = 64; do_bench p50)", KERNEL_COLUMNS),
        ("d", "Fused linear (bf16, k = 64, forward + backward)", FUSED_COLUMNS),
        ("e", "Training, steady state (warm-up steps left out)", TRAIN_COLUMNS),
        ("f", "cache-logits vs plain forward", CACHE_COLUMNS),
        ("g", "pipe run (stage seconds until the cut-off)", ["stage", "what", "seconds", "finished"]),
        ("b", "Failed GPU tests", ["test", "error"]),
    ]
    for key, heading, columns in sections:
        if key in parts and parts[key]["rows"]:
            lines += ["", f"{heading}:", ""] + _table(parts[key]["rows"], columns)
    return "\n".join(lines) + "\n"


def render_summary(report: dict, out: Path) -> str:
    env = report.get("environment", {})
    lines = [
        "=" * 100,
        f"logitcache GPU check{' (DRY RUN)' if report['dry_run'] else ''}: {env.get('gpu', '?')} | torch "
        f"{env.get('version_torch', '?')} | triton {env.get('version_triton', '?')} | commit {report['commit']} | "
        f"wall {report['wall_s']:.0f}/{report['budget_s']:.0f} s",
        "-" * 100,
    ]
    for p in report["parts"]:
        lines.append(
            f"{p['key']}. {p['name'][:30]:30} {p['status']:7} {p['seconds']:5.0f}/{p['budget_s']:3.0f} s  {p['headline'][:150]}"
        )
        if p["error"]:
            lines.append(f"     {'error' if p['status'] == 'fail' else 'why'}: {p['error'][:300]}")
    lines.append("-" * 100)
    for t in report["targets"]:
        mark = {True: "MET    ", False: "NOT MET", None: "n/a    "}[t["met"]]
        lines.append(
            f"[{mark}] {t['target']}: {_fmt(t['value'])} {t['unit'] if t['value'] is not None else ''}"
        )
    lines += ["-" * 100, f"files: {out}/gpu-check.json, gpu-check.md, gpu-check.log, summary.txt", "=" * 100]
    return "\n".join(lines) + "\n"


def write_outputs(check: Check, results: list[PartResult], command: str) -> dict:
    from benchmarks import git_commit

    parts = {r.key: r for r in results}
    report = {
        "schema": SCHEMA,
        "dry_run": check.dry,
        "command": command,
        "commit": git_commit(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(check.started_wall)),
        "wall_s": time.time() - check.started_wall,
        "budget_s": check.budget_s,
        "environment": parts["a"].figures
        if parts.get("a") and parts["a"].figures
        else check.shared.get("env", {}),
        "parts": [asdict(r) for r in results],
        "targets": evaluate_targets(parts),
    }
    report = _json_safe(report)
    tmp = check.out / "gpu-check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str, allow_nan=False) + "\n")
    tmp.replace(check.out / "gpu-check.json")
    (check.out / "gpu-check.md").write_text(render_markdown(report))
    (check.out / "summary.txt").write_text(render_summary(report, check.out))
    return report


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def run_check(args: argparse.Namespace) -> int:
    check = Check(args)
    wanted = args.parts or PART_KEYS
    command = command_line(args)
    results: list[PartResult] = []
    check.say(f"gpu-check: {'dry run on CPU' if check.dry else 'GPU run'}, budget {check.budget_s:.0f} s, "
              f"{check.remaining():.0f} s left, out {check.out}, work {check.work}")  # fmt: skip
    if "a" not in wanted:  # the report still names the machine and the versions
        check.shared["env"] = probe_facts_only(check)
    try:
        for key, name, budget, dry_budget, fn in PARTS:
            part = PartResult(key=key, name=name, budget_s=float(dry_budget if check.dry else budget))
            results.append(part)
            if key not in wanted:
                part.error = "skipped: not in --parts"
                continue
            left = check.remaining() - FINAL_RESERVE_S
            if key == "g" and not check.dry:
                part.budget_s = max(0.0, left)
            part.budget_s = min(part.budget_s, max(0.0, left))
            if part.budget_s < 5:
                part.error = f"skipped: global deadline ({check.budget_s:.0f} s) reached"
                check.say(f"[{key}] {name}: {part.error}")
                continue
            check.current = key
            check.say(f"[{key}] {name}: start (budget {part.budget_s:.0f} s)")
            start = time.monotonic()
            try:
                fn(check, part)
                part.status = "pass"
            except PartSkipped as exc:
                part.status, part.error = "skipped", str(exc)
            except PartFailed as exc:
                part.status, part.error = "fail", str(exc)
            except Exception as exc:  # noqa: BLE001 (a bug in one part must not stop the others)
                part.status, part.error = "fail", f"{type(exc).__name__}: {exc}"
                check.log(traceback.format_exc())
            part.seconds = round(time.monotonic() - start, 1)
            part.figures = _json_safe(part.figures)
            part.rows = _json_safe(part.rows)
            check.say(f"[{key}] {name}: {part.status} in {part.seconds:.0f} s"
                      + (f": {part.error}" if part.error else f": {part.headline}"))  # fmt: skip
            check.current = ""
            write_outputs(check, results, command)
        report = write_outputs(check, results, command)
        summary = render_summary(report, check.out)
        check.log(summary)
        print(summary, end="", flush=True)
    finally:
        check.close()
    return 1 if any(r.status == "fail" for r in results) else 0


def command_line(args: argparse.Namespace) -> str:
    """The command as the report shows it: the script and the options that change what runs."""
    words = ["bash", "scripts/gpu-check.sh"] + (["--dry-run"] if args.dry_run else [])
    for flag, value in (
        ("--parts", args.parts),
        ("--budget-s", args.budget_s),
        ("--small-config", args.small_config),
    ):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(words)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU: tiny shapes, TRITON_INTERPRET=1, 1-2 iterations"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: $OUT/gpu-check, else /tmp/gpu-check)"
    )
    parser.add_argument(
        "--work", default=None, help="scratch folder for runs (default: a temporary one, removed)"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    parser.add_argument(
        "--parts", default=None, help=f"subset of {PART_KEYS!r} to run (the others are skipped)"
    )
    parser.add_argument(
        "--budget-s", type=float, default=None, help="global budget in seconds from --started-at"
    )
    parser.add_argument(
        "--started-at", type=float, default=None, help="epoch seconds the shell script started"
    )
    parser.add_argument("--small-config", default=None, help="config of part g (default: configs/small.toml)")
    parser.add_argument("--probe-env", default=None, help=argparse.SUPPRESS)  # part a's child process
    parser.add_argument("--facts-only", action="store_true", help=argparse.SUPPRESS)  # with --probe-env
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = str(Path(os.environ.get("OUT") or "/tmp") / "gpu-check")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.probe_env:
        if args.dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")
        facts = probe_environment(args.dry_run, facts_only=args.facts_only)
        Path(args.probe_env).write_text(json.dumps(facts, indent=1) + "\n")
        return
    sys.exit(run_check(args))


if __name__ == "__main__":
    main()
