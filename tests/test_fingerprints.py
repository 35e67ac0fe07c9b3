"""Stage fingerprints take input paths as the config file writes them: a checkout copied elsewhere
finds its runs complete; markers written before this rule (absolute paths) are still accepted where
they were made, then rewritten. (End to end, with a whole run: tests/test_runner.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from logitcache.pipeline.config import (
    Fingerprint,
    cache_fingerprint,
    data_fingerprint,
    eval_fingerprint,
    load_config,
    student_fingerprint,
    teacher_fingerprint,
)
from logitcache.pipeline.errors import ConfigError
from logitcache.pipeline.rundir import COMPLETE_MARKER, is_complete, mark_complete, records

from .conftest import REPO, write_config

BLIMP = REPO / "tests" / "fixtures" / "blimp_mini"


def _stages(config_path: Path, *overrides: str) -> dict[str, Fingerprint]:
    config = load_config(config_path, overrides)
    return {
        "data": data_fingerprint(config),
        "teacher": teacher_fingerprint(config, "llama"),
        "cache": cache_fingerprint(config),
        "student": student_fingerprint(config),
        "eval": eval_fingerprint(config),
    }


def _checkout(root: Path, corpus: Path) -> Path:
    """A checkout at ``root``: configs/c.toml with the corpus and BLiMP beside it, written relative."""
    (root / "configs").mkdir(parents=True)
    shutil.copytree(corpus, root / "corpus")
    shutil.copytree(BLIMP, root / "blimp")
    extra = '\n[evaluate]\nblimp_dir = "../blimp"\n'
    return write_config(root / "configs" / "c.toml", Path("../corpus"), Path("../run"), extra=extra)


def test_a_checkout_elsewhere_has_the_same_fingerprints(tmp_path: Path, small_corpus: Path):
    here = _stages(_checkout(tmp_path / "a", small_corpus))
    there = _stages(_checkout(tmp_path / "b" / "deeper", small_corpus))
    assert there == here
    written = [
        load_config(root / "configs" / "c.toml").as_written()
        for root in (tmp_path / "a", tmp_path / "b" / "deeper")
    ]
    assert written[0]["data"] == written[1]["data"] and written[0]["data"]["corpus"] == "../corpus"
    assert written[0]["evaluate"]["blimp_dir"] == "../blimp" and "written_paths" not in written[0]
    # the fingerprints of the first rule (absolute paths) differ between the two, as they did
    assert all(there[stage].legacy != here[stage].legacy for stage in here)
    assert all(here[stage] != here[stage].legacy for stage in here)
    # the run directory is no input: another one has the same fingerprints
    assert _stages(tmp_path / "a" / "configs" / "c.toml", f"run.dir={tmp_path / 'x'}") == here

    # another corpus path, as written, is another input (every stage built on the data changes);
    # another BLiMP path only the evaluation's
    (tmp_path / "a" / "corpus").rename(tmp_path / "a" / "corpus2")
    moved = _stages(tmp_path / "a" / "configs" / "c.toml", "data.corpus=../corpus2")
    assert all(moved[stage] != here[stage] for stage in here)
    other_blimp = _stages(tmp_path / "b" / "deeper" / "configs" / "c.toml", f"evaluate.blimp_dir={BLIMP}")
    assert {stage for stage in here if other_blimp[stage] != here[stage]} == {"eval"}


def test_absolute_paths_count_as_they_are(tmp_path: Path, small_corpus: Path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = write_config(tmp_path / "one" / "c.toml", small_corpus, tmp_path / "run")
    second = write_config(tmp_path / "two" / "c.toml", small_corpus, tmp_path / "run")
    assert _stages(first) == _stages(second)  # the config file moved, the corpus did not
    # the same corpus given by a relative path is the path as written: another fingerprint
    relative = write_config(tmp_path / "c.toml", Path("corpus"), Path("run"))
    assert load_config(relative).data.corpus == str(small_corpus)
    assert _stages(relative)["data"] != _stages(first)["data"]
    assert _stages(relative)["data"].legacy == _stages(first)["data"].legacy  # (the first rule: equal)


def test_written_paths_are_not_a_config_key(tmp_path: Path, small_corpus: Path):
    config = write_config(tmp_path / "c.toml", small_corpus, tmp_path / "run")
    config.write_text("written_paths = {}\n" + config.read_text())
    with pytest.raises(ConfigError, match="Unknown config key 'written_paths'"):
        load_config(config)


def test_markers_of_the_first_rule_are_accepted_and_rewritten(tmp_path: Path, small_corpus: Path):
    fingerprint = data_fingerprint(load_config(_checkout(tmp_path / "checkout", small_corpus)))
    stage = tmp_path / "stage"
    stage.mkdir()
    mark_complete(stage, fingerprint, {"windows": 3})
    marker = json.loads((stage / COMPLETE_MARKER).read_text())
    assert marker == {"fingerprint": str(fingerprint), "summary": {"windows": 3}}
    assert is_complete(stage, fingerprint)

    # a marker written by the first rule: accepted, and its fingerprint replaced by the current one
    (stage / COMPLETE_MARKER).write_text(
        json.dumps({"fingerprint": fingerprint.legacy, "summary": {"windows": 3}})
    )
    assert is_complete(stage, fingerprint)
    assert json.loads((stage / COMPLETE_MARKER).read_text()) == marker
    # a plain string is compared as it is; another fingerprint is not accepted (and nothing is written)
    assert not is_complete(stage, fingerprint.legacy)
    assert not is_complete(stage, Fingerprint("0" * 64, "1" * 64))
    assert json.loads((stage / COMPLETE_MARKER).read_text()) == marker

    # any JSON document that records a fingerprint (verify.json): the other keys are kept
    report = tmp_path / "verify.json"
    document = {"ok": True, "fingerprint": fingerprint.legacy, "positions": 12}
    report.write_text(json.dumps(document))
    assert records(report, document, fingerprint)
    assert json.loads(report.read_text()) == document | {"fingerprint": str(fingerprint)}
