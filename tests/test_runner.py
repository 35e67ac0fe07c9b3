"""`pipe run` end to end on tiny models: every stage, skipping, and resuming after kill -9."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from transformers import AutoModelForCausalLM

from logitcache.cache import open_cache
from logitcache.cache.errors import CacheError
from logitcache.cache.layout import METADATA_KEY
from logitcache.cache.writer import CacheWriter
from logitcache.pipeline.cache_logits import cache_logits, is_cache_complete
from logitcache.pipeline.config import load_config
from logitcache.pipeline.errors import StageError
from logitcache.pipeline.rundir import RunLayout
from logitcache.pipeline.runner import read_stage_log, run_pipeline

from .conftest import REPO, kill_when, write_config

TINY_STUDENT_AND_EVAL = f"""
[cache]
k = 16
batch_size = 32
windows_per_shard = 256

[student.model]
family = "llama"
hidden_size = 32
num_layers = 1
num_heads = 4
intermediate_size = 64

[student.train]
lr = 3e-3
batch_size = 16
epochs = 1
checkpoint_every = 1000
log_every = 5

[evaluate]
blimp_dir = "{REPO / "tests" / "fixtures" / "blimp_mini"}"
batch_size = 32
"""


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


STAGES = [
    "prepare-data", "train-teacher llama", "train-teacher gpt", "cache-logits", "verify-cache",
    "train-student cache", "train-student ce", "evaluate", "report",
]  # fmt: skip


def test_pipeline_runs_every_stage_then_skips(tmp_path: Path, small_corpus: Path, monkeypatch):
    # a checkout: the config in configs/, the corpus and the run beside it, written relative to it
    (tmp_path / "configs").mkdir()
    assert small_corpus == tmp_path / "corpus"
    config_path = write_config(
        tmp_path / "configs" / "c.toml", Path("../corpus"), Path("../run"), extra=TINY_STUDENT_AND_EVAL
    )
    config = load_config(config_path)
    lines: list[str] = []
    results = run_pipeline(config, progress=False, log=lines.append)
    assert [(r.name, r.skipped) for r in results] == [(name, False) for name in STAGES]
    run = config.run_dir
    for model_dir in ("teachers/llama", "teachers/gpt", "students/cache", "students/ce"):
        assert AutoModelForCausalLM.from_pretrained(run / model_dir) is not None
    results_json = json.loads((run / "eval" / "results.json").read_text())
    names = [m["name"] for m in results_json["models"]]
    assert sorted(names) == ["students/cache", "students/ce", "teachers/gpt", "teachers/llama"]
    for model in results_json["models"]:
        assert model["blimp"]["overall"] is not None and model["held_out"]["perplexity"] > 1
    assert (run / "eval" / "report.html").is_file()
    assert all(r.seconds > 0 for r in results)
    assert sum(line.startswith("[") and " done in " in line for line in lines) == len(STAGES)
    assert lines[-1].startswith(f"pipe run: {len(STAGES)} stages ran in ")
    # every stage that ran is recorded with its wall time in RUN/stages.jsonl
    recorded = read_stage_log(RunLayout(run))
    assert [(e["stage"], e["seconds"]) for e in recorded] == [(r.name, round(r.seconds, 2)) for r in results]
    assert all(e["git_commit"] == recorded[0]["git_commit"] and e["cpus"] >= 1 for e in recorded)
    # references and the headline comparisons are logged by the evaluate stage
    assert any(line.startswith("teachers/ensemble: test perplexity") for line in lines)
    assert any(
        line.startswith("students/cache: test perplexity") and "for students/ce" in line for line in lines
    )

    lines.clear()
    again = run_pipeline(config, progress=False, log=lines.append)
    assert [(r.name, r.skipped) for r in again] == [(name, True) for name in STAGES]
    assert lines[0] == "[prepare-data] complete, skipped"
    assert read_stage_log(RunLayout(run)) == recorded  # skipped stages are not recorded

    # The checkout copied elsewhere (another clone, another machine): every stage is complete there
    # (fingerprints take input paths as the config wrote them)
    clone = tmp_path / "elsewhere" / "clone"
    for name in ("configs", "corpus", "run"):
        shutil.copytree(tmp_path / name, clone / name, symlinks=True)
    elsewhere = run_pipeline(load_config(clone / "configs" / "c.toml"), progress=False, log=lambda line: None)
    assert [(r.name, r.skipped) for r in elsewhere] == [(name, True) for name in STAGES]
    # the cache records the corpus as written too, so a cache left unfinished in one checkout
    # resumes in a copy of it elsewhere (here: the first shard's write fails in the clone)
    assert open_cache(run / "cache" / "logits.zarr").metadata.config["data"]["corpus"] == "../corpus"
    shutil.rmtree(clone / "run" / "cache")
    real_write = CacheWriter.write_shard

    def failing_write(self, shard, selection):  # noqa: ANN001, ANN202
        raise CacheError("Expected to write the shard. Got an error: the disk is full.")

    monkeypatch.setattr(CacheWriter, "write_shard", failing_write)
    with pytest.raises(CacheError, match="disk is full"):
        cache_logits(load_config(clone / "configs" / "c.toml"), progress=False)
    monkeypatch.setattr(CacheWriter, "write_shard", real_write)
    shutil.copytree(clone, tmp_path / "elsewhere" / "again", symlinks=True)
    again = load_config(tmp_path / "elsewhere" / "again" / "configs" / "c.toml")
    cache_logits(again, progress=False)
    assert is_cache_complete(again)
    assert _files(again.run_dir / "cache" / "logits.zarr") == _files(run / "cache" / "logits.zarr")
    # A cache left unfinished by a version that recorded the input paths resolved (absolute, up to
    # 2026-12-03) resumes where it was started, keeping its record; its entries are the same bytes
    older = clone.parent / "older"
    shutil.copytree(clone, older, symlinks=True)
    older_config = load_config(older / "configs" / "c.toml")
    store = older / "run" / "cache" / "logits.zarr"
    group = zarr.open_group(store, mode="r+")
    recorded = dict(group.attrs[METADATA_KEY])
    resolved = older_config.to_dict()
    recorded["config"] = {**recorded["config"], "data": resolved["data"], "teachers": resolved["teachers"]}
    assert recorded["config"]["data"]["corpus"] == str(older / "corpus")
    group.attrs[METADATA_KEY] = recorded
    cache_logits(older_config, progress=False)
    assert open_cache(store).metadata.config["data"]["corpus"] == str(older / "corpus")
    resumed, original = _files(store), _files(run / "cache" / "logits.zarr")
    assert resumed.pop(Path("zarr.json")) != original.pop(Path("zarr.json"))  # the group's attributes
    assert resumed == original
    # ... but not when anything else differs (here: the corpus it was started from)
    shutil.rmtree(older / "run" / "cache")
    shutil.copytree(clone / "run" / "cache", older / "run" / "cache", symlinks=True)
    group = zarr.open_group(store, mode="r+")
    recorded["config"]["data"]["corpus"] = str(tmp_path / "another-corpus")
    group.attrs[METADATA_KEY] = recorded
    with pytest.raises(CacheError, match="Got different config"):
        cache_logits(older_config, progress=False)
    shutil.rmtree(tmp_path / "elsewhere")

    # A changed student setting: the earlier stages are still complete and skipped; the student
    # trained from the other config is not silently replaced.
    changed = load_config(config_path, ["student.train.lr=1e-3"])
    lines.clear()
    with pytest.raises(
        StageError, match="students/cache holds a student 'cache' made from a different config"
    ):
        run_pipeline(changed, progress=False, log=lines.append)
    assert lines[-1] == "[train-student cache] running" and lines[-2] == "[verify-cache] complete, skipped"


def test_pipeline_resumes_after_kill(tmp_path: Path, small_corpus: Path):
    config_path = write_config(
        tmp_path / "c.toml", small_corpus, tmp_path / "run", extra=TINY_STUDENT_AND_EVAL
    )
    args = [sys.executable, "-m", "logitcache.pipeline.cli", "run", str(config_path)]
    marker = tmp_path / "run" / "teachers" / "gpt" / "metrics.jsonl"
    kill_when(args, marker.exists)
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stderr.splitlines()
    assert "[prepare-data] complete, skipped" in log
    assert "[train-teacher llama] complete, skipped" in log
    assert "[train-teacher gpt] running" in log and "[report] running" in log
    assert (tmp_path / "run" / "eval" / "report.html").is_file()
