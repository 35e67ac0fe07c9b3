"""`pipe run`: every stage of the pipeline in order, skipping stages already complete.

prepare-data → train-teacher (each) → cache-logits → verify-cache → train-student (each mode of
``run.students``) → evaluate → report. A stage is skipped when its output is complete for the same
config (its fingerprint), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from logitcache.pipeline.cache_logits import cache_logits, is_cache_complete, is_verified, verify_stage
from logitcache.pipeline.config import Config, data_fingerprint, eval_fingerprint, run_students
from logitcache.pipeline.distributed import init_distributed
from logitcache.pipeline.prepare import prepare_data
from logitcache.pipeline.rundir import RunLayout, git_commit, is_complete, mark_complete
from logitcache.pipeline.student import is_student_complete, train_student
from logitcache.pipeline.teachers import describe_training, is_teacher_complete, teacher_dir, train_teacher


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool
    seconds: float = 0.0  # wall time of the stage in this process (0 when skipped)


def format_seconds(seconds: float) -> str:
    """``42.3 s``, ``3 min 07 s``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def record_stage(layout: RunLayout, name: str, seconds: float, commit: str) -> None:
    """Append one stage's wall time to ``RUN/stages.jsonl`` (what docs/results.md reports per stage)."""
    entry = {
        "stage": name,
        "seconds": round(seconds, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": commit,
        "cpus": os.cpu_count(),
    }
    with open(layout.stage_log, "a", encoding="utf-8") as log_file:
        log_file.write(json.dumps(entry) + "\n")


def read_stage_log(layout: RunLayout) -> list[dict]:
    """The entries of ``RUN/stages.jsonl``, oldest first ([] when there is none)."""
    if not layout.stage_log.is_file():
        return []
    return [
        json.loads(line) for line in layout.stage_log.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def run_pipeline(
    config: Config, *, progress: bool | None = None, log: Callable[[str], None] = print
) -> list[StageResult]:
    """Run every stage in order; each is skipped when its output is complete for this config."""
    from logitcache.pipeline.evaluation.evaluate import EvalOptions, evaluate_run
    from logitcache.pipeline.evaluation.report import build_report

    ctx = init_distributed(config.run.device)
    layout = RunLayout.of(config)
    commit = git_commit()
    results: list[StageResult] = []

    def stage(name: str, done: bool, action: Callable[[], object], *, main_only: bool = False) -> None:
        log(f"[{name}] {'complete, skipped' if done else 'running'}")
        start = time.perf_counter()
        if not done and (ctx.is_main or not main_only):
            action()
        if main_only:
            ctx.barrier()
        seconds = 0.0 if done else time.perf_counter() - start
        if not done:
            log(f"[{name}] done in {format_seconds(seconds)}")
            if ctx.is_main:
                record_stage(layout, name, seconds, commit)
        results.append(StageResult(name, done, seconds))

    stage(
        "prepare-data",
        is_complete(layout.data, data_fingerprint(config)),
        lambda: prepare_data(config, progress=progress),
        main_only=True,
    )

    def trained(out: Path) -> None:
        if ctx.is_main and (line := describe_training(out)):
            log(f"{out.parent.name}/{out.name}: {line}")

    for name in config.teachers:
        stage(
            f"train-teacher {name}",
            is_teacher_complete(config, name),
            lambda name=name: trained(train_teacher(config, name, progress=progress, ctx=ctx)),
        )
    stage("cache-logits", is_cache_complete(config), lambda: cache_logits(config, progress=progress, ctx=ctx))
    stage(
        "verify-cache", is_verified(config), lambda: verify_stage(config, progress=progress), main_only=True
    )
    for student in run_students(config):
        stage(
            f"train-student {student.student.mode}",
            is_student_complete(student),
            lambda student=student: trained(train_student(student, progress=progress, ctx=ctx)),
        )

    fingerprint = eval_fingerprint(config)

    def evaluate() -> None:
        teachers = {name: teacher_dir(config, name) for name in config.teachers}
        evaluate_run(
            layout.root,
            options=EvalOptions.from_config(config),
            progress=progress,
            log=log,
            teachers=teachers,
            config=config,
        )
        mark_complete(layout.eval, fingerprint)

    stage("evaluate", is_complete(layout.eval, fingerprint), evaluate, main_only=True)
    # The report is cheap: rebuilt whenever an earlier stage ran or it is missing.
    anything_ran = any(not r.skipped for r in results)
    report_done = not anything_ran and layout.report.is_file()
    stage("report", report_done, lambda: build_report(layout.root), main_only=True)
    ran = [r for r in results if not r.skipped]
    if ran:
        log(
            f"pipe run: {len(ran)} stages ran in {format_seconds(sum(r.seconds for r in ran))}"
            + (f", {len(results) - len(ran)} complete and skipped" if len(ran) < len(results) else "")
        )
    return results
