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
        (["prepare-data", "missing.toml"], "error: Expected a TOML config file. Got 'missing.toml', which does not exist."),
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
