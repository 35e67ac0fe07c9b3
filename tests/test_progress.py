"""Progress output in logs (stderr not a terminal): whole lines at an interval, rank 0 only."""

from __future__ import annotations

import time

import pytest

from logitcache.pipeline.progress import PROGRESS_SECONDS_ENV, progress_bar


def _run(steps: int, pause: float, **kwargs) -> None:
    bar = progress_bar(total=steps, desc="students/cache", **kwargs)
    for i in range(steps):
        time.sleep(pause)
        bar.update(1)
        bar.set_postfix(loss=f"{5 - i / 10:.3f}")
    bar.close()


def test_lines_at_an_interval_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.05")
    _run(12, 0.02, progress=None)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert 2 <= len(lines) < 12  # at an interval, not one per step
    assert all(line.startswith("students/cache: ") for line in lines)
    assert lines[-1].startswith("students/cache: 100% 12/12 [") and lines[-1].endswith("loss=3.900]")
    counts = [int(line.split()[2].split("/")[0]) for line in lines]
    # one line per new position, plus at most one last line with the final postfix
    assert counts == sorted(counts) and len(counts) - len(set(counts)) <= 1


def test_a_stage_shorter_than_the_interval_prints_nothing(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "30")
    _run(5, 0.0, progress=None)
    for _ in progress_bar(range(100), progress=None, desc="BLiMP", leave=False):
        pass
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kwargs", [{"progress": False}, {"progress": None, "is_main": False}])
def test_quiet_when_asked_and_off_rank_0(capsys, monkeypatch, kwargs):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0.01")
    _run(5, 0.02, **kwargs)
    assert capsys.readouterr().err == ""


def test_interval_zero_turns_log_lines_off(capsys, monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    _run(5, 0.02, progress=None)
    assert capsys.readouterr().err == ""
