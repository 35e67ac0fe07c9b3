"""The `pipe` CLI: help everywhere, version, and user errors as one line with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from logitcache.pipeline import __version__
from logitcache.pipeline.cli import cli

PIPE = [sys.executable, "-m", "logitcache.pipeline.cli"]


def _commands() -> list[str]:
    return sorted(cli.commands)


def test_every_command_has_help():
    runner = CliRunner()
    assert {"prepare-data", "train-teacher", "cache-logits", "verify-cache", "run"} <= set(_commands())
    for name in _commands():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Usage: " in result.output
        if "CONFIG" in result.output.splitlines()[0]:  # every command on a config takes --run-dir/--set
            assert "--run-dir" in result.output and "--set" in result.output, name


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare-data", "missing.toml"], "error: Expected a TOML config file. Got 'missing.toml', which does not exist: pass the path of one"),
        (["prepare-data", "{demo}", "--set", "data.vocab=5"], "error: Unknown config key 'data.vocab'. Did you mean 'vocab_size'?"),
        (["train-teacher", "{demo}", "--teacher", "nope", "--run-dir", "{tmp}"], "error: Unknown teacher 'nope'. The config defines: llama, gpt2."),
        (["train-teacher", "{demo}", "--teacher", "llama", "--run-dir", "{tmp}"], "error: Expected prepared data in"),
    ],
)  # fmt: skip
def test_user_errors_are_one_line(args: list[str], message: str, tmp_path: Path):
    from .conftest import REPO

    args = [a.format(demo=REPO / "configs" / "demo.toml", tmp=tmp_path) for a in args]
    done = subprocess.run([*PIPE, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_kernel_errors_are_user_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """A KernelError (bad tensor or loss option) is reported like a LogitcacheError: one line, exit 2."""
    from logitcache.kernels.errors import KernelError
    from logitcache.pipeline import cli as cli_module
    from logitcache.pipeline import prepare

    from .conftest import REPO

    def bad_option(*args: object, **kwargs: object) -> None:
        raise KernelError("Expected reduction in ('mean', 'sum'). Got 'max'.")

    monkeypatch.setattr(prepare, "prepare_data", bad_option)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["prepare-data", str(REPO / "configs" / "demo.toml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: Expected reduction in ('mean', 'sum'). Got 'max'.\n"


def test_other_exceptions_are_not_swallowed(monkeypatch: pytest.MonkeyPatch):
    from logitcache.pipeline import cli as cli_module
    from logitcache.pipeline import prepare

    from .conftest import REPO

    def bug(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(prepare, "prepare_data", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli_module.main(["prepare-data", str(REPO / "configs" / "demo.toml")])


# ----------------------------------------------------------------------------------------------
# The library functions behind the thin commands (what they print)


def test_printed_summaries_come_from_the_library(tmp_path: Path):
    from logitcache.pipeline.cache_logits import describe_cache, report_lines
    from logitcache.pipeline.prepare import PreparedData
    from logitcache.pipeline.rundir import mark_complete

    splits = {"train": {"windows": 120}, "dev": {"windows": 6}, "test": {"windows": 0}}
    data = PreparedData(tmp_path, {"vocab_size": 512, "splits": splits})
    assert data.describe() == "vocab 512, train 120 windows, dev 6 windows, test 0 windows"

    assert describe_cache(tmp_path) == ""  # not complete (a rank > 0 before rank 0 finished)
    summary = {
        "positions": 12345,
        "bytes_per_position": 81.25,
        "mean_captured_mass": 0.5,
        "mean_teacher_entropy": 2.0,
    }
    mark_complete(tmp_path, "f" * 64, summary)
    assert describe_cache(tmp_path) == (
        f"cache {tmp_path}: 12,345 positions, 81.2 bytes/position, mean captured mass 0.5000, "
        "mean teacher entropy 2.000 nats"
    )

    report = {
        "ok": False,
        "store": "RUN/cache/logits.zarr",
        "problems": ["metadata: bad"],
        "shards": [{"shard": 0, "problems": []}, {"shard": 3, "problems": ["checksum", "ids"]}],
        "recompute": {"windows": [1, 2], "ok": True},
    }
    assert report_lines(report) == [
        "FAIL metadata: bad",
        "FAIL shard 3: checksum",
        "FAIL shard 3: ids",
        'recompute: {"windows": 2, "ok": true}',
        "FAILED: RUN/cache/logits.zarr",
    ]
    assert report_lines({"ok": True, "store": "s"}) == ["OK: s"]


def test_evaluate_needs_models_or_a_run():
    from logitcache.pipeline.errors import ConfigError
    from logitcache.pipeline.evaluation.evaluate import evaluate_command

    with pytest.raises(ConfigError, match="Expected MODEL_DIR arguments or --run-dir RUN"):
        evaluate_command([])
