"""`pipe run`: every stage of the pipeline in order, skipping stages already complete."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from logitcache.pipeline.cache_logits import cache_logits, is_cache_complete, is_verified, verify_stage
from logitcache.pipeline.config import Config
from logitcache.pipeline.distributed import init_distributed
from logitcache.pipeline.prepare import data_fingerprint, prepare_data
from logitcache.pipeline.rundir import RunLayout, is_complete
from logitcache.pipeline.teachers import is_teacher_complete, train_teacher


@dataclass(frozen=True)
class StageResult:
    name: str
    skipped: bool


def run_pipeline(
    config: Config, *, progress: bool | None = None, log: Callable[[str], None] = print
) -> list[StageResult]:
    """Run every stage in order; each is skipped when its output is complete for this config."""
    ctx = init_distributed(config.run.device)
    results: list[StageResult] = []

    done = is_complete(RunLayout(config.run_dir).data, data_fingerprint(config))
    log(f"[prepare-data] {'complete, skipped' if done else 'running'}")
    if not done and ctx.is_main:
        prepare_data(config, progress=progress)
    ctx.barrier()
    results.append(StageResult("prepare-data", done))

    for name in config.teachers:
        done = is_teacher_complete(config, name)
        log(f"[train-teacher {name}] {'complete, skipped' if done else 'running'}")
        if not done:
            train_teacher(config, name, progress=progress, ctx=ctx)
        results.append(StageResult(f"train-teacher {name}", done))

    done = is_cache_complete(config)
    log(f"[cache-logits] {'complete, skipped' if done else 'running'}")
    if not done:
        cache_logits(config, progress=progress, ctx=ctx)
    results.append(StageResult("cache-logits", done))

    done = is_verified(config)
    log(f"[verify-cache] {'verified, skipped' if done else 'running'}")
    if not done and ctx.is_main:
        verify_stage(config, progress=progress)
    ctx.barrier()
    results.append(StageResult("verify-cache", done))
    return results
