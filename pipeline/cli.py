"""The `pipe` command line: thin click shells over the library functions of each stage."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from logitcache.pipeline import __version__
from logitcache.pipeline.errors import LogitcacheError

CONFIG_ARG = click.argument("config", type=click.Path(dir_okay=False, path_type=Path))


def _common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="SECTION.KEY=VALUE",
        help="Override a config value (repeatable), e.g. --set data.seq_len=64 --set teachers.a.train.lr=1e-3.",
    )(func)
    func = click.option(
        "--run-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Run directory (overrides run.dir); every stage's output goes in a subfolder of it.",
    )(func)
    return func


def _load(config: Path, overrides: tuple[str, ...], run_dir: Path | None):
    from logitcache.pipeline.config import load_config

    return load_config(config, overrides, run_dir)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="logitcache")
def cli() -> None:
    """logitcache: offline knowledge distillation of language models from cached teacher logits.

    Stages write into one run directory (run.dir in the config, or --run-dir): data/, teachers/NAME/,
    and later cache/, students/NAME/, eval/. `pipe run CONFIG` runs every stage in order.
    """


@cli.command("prepare-data")
@CONFIG_ARG
@_common_options
@click.option("--overwrite", is_flag=True, help="Replace prepared data made from a different config.")
def prepare_data_cmd(config: Path, overrides: tuple[str, ...], run_dir: Path | None, overwrite: bool) -> None:
    """Train the BPE tokenizer and pack the corpus into train/dev/test token windows (RUN/data)."""
    from logitcache.pipeline.prepare import prepare_data

    cfg = _load(config, overrides, run_dir)
    out = prepare_data(cfg, overwrite=overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    splits = ", ".join(f"{name} {s['windows']} windows" for name, s in manifest["splits"].items())
    click.echo(f"prepared {out}: vocab {manifest['vocab_size']}, {splits}")


@cli.command("train-teacher")
@CONFIG_ARG
@click.option(
    "--teacher", "name", required=True, help="Name of the teacher (a [teachers.NAME] table of the config)."
)
@_common_options
@click.option("--overwrite", is_flag=True, help="Retrain a teacher that was trained from a different config.")
def train_teacher_cmd(
    config: Path, name: str, overrides: tuple[str, ...], run_dir: Path | None, overwrite: bool
) -> None:
    """Train one teacher LM on the prepared data (resumes from its last checkpoint). Works under torchrun."""
    from logitcache.pipeline.distributed import shutdown_distributed
    from logitcache.pipeline.teachers import train_teacher

    cfg = _load(config, overrides, run_dir)
    try:
        out = train_teacher(cfg, name, overwrite=overwrite)
    finally:
        shutdown_distributed()
    click.echo(f"teacher {name}: {out}")


@cli.command("run")
@CONFIG_ARG
@_common_options
def run_cmd(config: Path, overrides: tuple[str, ...], run_dir: Path | None) -> None:
    """Run every stage in order (prepare-data, train each teacher), skipping completed ones."""
    from logitcache.pipeline.distributed import shutdown_distributed
    from logitcache.pipeline.runner import run_pipeline

    cfg = _load(config, overrides, run_dir)
    try:
        run_pipeline(cfg, log=lambda line: click.echo(line, err=True))
    finally:
        shutdown_distributed()
    click.echo(f"done: {cfg.run_dir}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="pipe", standalone_mode=False)
    except LogitcacheError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
