"""The `pipe` command line: thin click shells over the library functions of each stage."""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from logitcache.pipeline import __version__
from logitcache.pipeline.config import DEVICES, EVAL_SPLITS, STUDENT_MODES, EvalConfig

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
    from logitcache.pipeline.prepare import PreparedData, prepare_data

    out = prepare_data(_load(config, overrides, run_dir), overwrite=overwrite)
    click.echo(f"prepared {out}: {PreparedData.open(out).describe()}")


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
    from logitcache.pipeline.teachers import describe_training, train_teacher

    cfg = _load(config, overrides, run_dir)
    try:
        out = train_teacher(cfg, name, overwrite=overwrite)
    finally:
        shutdown_distributed()
    click.echo(f"teacher {name}: {out} ({describe_training(out)})")


@cli.command("run")
@CONFIG_ARG
@_common_options
def run_cmd(config: Path, overrides: tuple[str, ...], run_dir: Path | None) -> None:
    """Run every stage in order, skipping completed ones.

    prepare-data, train-teacher (each teacher), cache-logits, verify-cache, train-student (each mode
    of run.students), evaluate, report.
    """
    from logitcache.pipeline.distributed import shutdown_distributed
    from logitcache.pipeline.runner import run_pipeline

    cfg = _load(config, overrides, run_dir)
    try:
        run_pipeline(cfg, log=lambda line: click.echo(line, err=True))
    finally:
        shutdown_distributed()
    click.echo(f"done: {cfg.run_dir}")


@cli.command("evaluate")
@click.argument("model_dirs", nargs=-1, type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared data folder (RUN/data): held-out perplexity, loss and calibration (ECE) on --split.",
)
@click.option(
    "--blimp",
    "blimp_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory of BLiMP .jsonl files (native format): minimal-pair accuracy.",
)
@click.option(
    "--blimp-pairs",
    type=click.IntRange(min=0),
    default=EvalConfig.blimp_pairs,
    show_default=True,
    help="Pairs per BLiMP paradigm, a fixed sample (0 = all).",
)
@click.option("--split", type=click.Choice(EVAL_SPLITS), default=EvalConfig.split, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=EvalConfig.batch_size, show_default=True)
@click.option("--ece-bins", type=click.IntRange(min=1), default=EvalConfig.ece_bins, show_default=True)
@click.option(
    "--random-twins/--no-random-twins",
    default=EvalConfig.random_twins,
    show_default=True,
    help="Also score a randomly initialised twin of each distinct architecture (seed 0), the baseline "
    "for BLiMP and perplexity.",
)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Evaluate every model of a run (RUN/teachers/*, RUN/students/*) on RUN/data; "
    "results go to RUN/eval/results.json unless --out says otherwise.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results JSON here (default: stdout, or RUN/eval/results.json with --run-dir).",
)
def evaluate_cmd(
    model_dirs: tuple[Path, ...],
    data_dir: Path | None,
    blimp_dir: Path | None,
    blimp_pairs: int,
    split: str,
    batch_size: int,
    ece_bins: int,
    random_twins: bool,
    device: str,
    run_dir: Path | None,
    out: Path | None,
) -> None:
    """Held-out perplexity, BLiMP and calibration of MODEL_DIR... (any Hugging Face causal LM folders)."""
    from logitcache.pipeline.evaluation.evaluate import EvalOptions, evaluate_command

    options = EvalOptions(
        data_dir=data_dir,
        blimp_dir=blimp_dir,
        blimp_pairs=blimp_pairs,
        split=split,
        batch_size=batch_size,
        ece_bins=ece_bins,
        random_twins=random_twins,
        device=device,
    )
    log = lambda line: click.echo(line, err=True)  # noqa: E731
    result = evaluate_command(model_dirs, options=options, run_dir=run_dir, out=out, log=log)
    click.echo(f"results: {result}" if isinstance(result, Path) else result, nl=isinstance(result, Path))


@cli.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--results",
    "results_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Evaluation results JSON (default: RUN/eval/results.json when it exists).",
)
def report_cmd(run_dir: Path, results_path: Path | None) -> None:
    """Write RUN/eval/report.html and PNG figures: training curves, BLiMP bars, reliability diagrams."""
    from logitcache.pipeline.evaluation.report import build_report

    click.echo(f"report: {build_report(run_dir, results_path=results_path)}")


@cli.command("cache-logits")
@CONFIG_ARG
@_common_options
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a complete cache, or one made with other settings. The old one waits in "
    "RUN/cache.replaced and is deleted only once the new one is complete.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Write nothing: run the teachers on a few batches and print the positions, the estimated "
    "size (compression measured on those batches) and the estimated time (the batches timed, the first "
    "one excluded as warm-up).",
)
def cache_logits_cmd(
    config: Path, overrides: tuple[str, ...], run_dir: Path | None, overwrite: bool, dry_run: bool
) -> None:
    """Run the teachers once over the training windows and write their ensemble's top-k (RUN/cache).

    Resumable: rerunning after a crash finishes the unfinished shards. Works under torchrun (ranks
    write disjoint shards).
    """
    from logitcache.pipeline.cache_logits import cache_logits, describe_cache, dry_run_lines
    from logitcache.pipeline.cache_logits import dry_run as estimate
    from logitcache.pipeline.distributed import shutdown_distributed

    cfg = _load(config, overrides, run_dir)
    if dry_run:
        click.echo("\n".join(dry_run_lines(estimate(cfg))))
        return
    try:
        out = cache_logits(cfg, overwrite=overwrite)
    finally:
        shutdown_distributed()
    if line := describe_cache(out):  # "" on ranks > 0 of torchrun before the summary exists
        click.echo(line)


@cli.command("verify-cache")
@click.argument("path")  # a folder, or a store URL (s3://bucket/prefix/logits.zarr): not a click.Path
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Prepared data folder to check alignment against (default: RUN/data beside RUN/cache).",
)
@click.option(
    "--recompute",
    type=int,
    default=0,
    metavar="N",
    help="Also rerun the teachers on N random windows and compare with the stored entries.",
)
@click.option("--seed", type=int, default=0, help="Seed choosing the --recompute windows.")
@click.option(
    "--quick", is_flag=True, help="Only metadata, file sizes and shard indexes (no shard data is read)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cache_cmd(
    path: str, data_dir: Path | None, recompute: int, seed: int, quick: bool, as_json: bool
) -> None:
    """Check every byte of a cache: metadata documents and their digests, the set of files, every
    shard's index, checksums and digest (bound to its position), ids, values, tail, hashes.

    PATH: RUN/cache, the store folder, or a store URL (s3://bucket/prefix/logits.zarr, gs://...).
    Exits 1 when any check fails, naming the file, array and windows.
    """
    from logitcache.pipeline.cache_logits import report_lines, verify

    report = verify(path, data_dir=data_dir, recompute=recompute, seed=seed, quick=quick)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json else "\n".join(report_lines(report)))
    if not report["ok"]:
        sys.exit(1)


@cli.command("train-student")
@CONFIG_ARG
@click.option(
    "--mode",
    type=click.Choice(STUDENT_MODES),
    default=None,
    help="cache: distil from RUN/cache; online: run the teachers at every step; ce: no teacher "
    "(default: student.mode of the config, 'cache').",
)
@click.option(
    "--name", default=None, help="Output folder RUN/students/NAME (default: student.name, else the mode)."
)
@_common_options
@click.option("--overwrite", is_flag=True, help="Retrain a student that was trained from a different config.")
def train_student_cmd(
    config: Path,
    mode: str | None,
    name: str | None,
    overrides: tuple[str, ...],
    run_dir: Path | None,
    overwrite: bool,
) -> None:
    """Train the student (resumes from its last checkpoint). Works under torchrun."""
    from logitcache.pipeline.config import with_student
    from logitcache.pipeline.distributed import launched_rank, shutdown_distributed
    from logitcache.pipeline.student import student_name, train_student
    from logitcache.pipeline.teachers import describe_training

    cfg = with_student(_load(config, overrides, run_dir), mode=mode, name=name)
    try:
        out = train_student(cfg, overwrite=overwrite)
    finally:
        shutdown_distributed()
    if launched_rank() == 0:  # under torchrun, one summary, not one per rank
        click.echo(f"student {student_name(cfg)}: {out} ({describe_training(out)})")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback.

    User errors are :class:`~logitcache.pipeline.errors.LogitcacheError` (config, data, cache,
    stage, teacher) and :class:`~logitcache.kernels.errors.KernelError` (a bad loss input or
    option). They are imported only when something was raised, so ``pipe --help`` loads no torch.
    """
    try:
        cli.main(args=argv, prog_name="pipe", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # a bad option or argument: one line too, and where to look
        from logitcache.pipeline.errors import error_line

        ctx = getattr(exc, "ctx", None)
        hint = f" See '{ctx.command_path} --help'." if isinstance(exc, click.UsageError) and ctx else ""
        click.echo(f"error: {error_line(exc.format_message())}{hint}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # the machine refused a read or write: disk full, permissions, ...
        click.echo(f"error: {os_error_line(exc)}", err=True)
        sys.exit(2)
    except Exception as exc:
        from logitcache.kernels.errors import KernelError
        from logitcache.pipeline.errors import LogitcacheError, error_line

        if not isinstance(exc, LogitcacheError | KernelError):
            raise
        click.echo(f"error: {error_line(str(exc))}", err=True)
        sys.exit(2)


_OS_ADVICE = {
    errno.ENOSPC: "Free disk space, then rerun the same command: finished work (completed checkpoints, "
    "shards, stages) is kept and the stage resumes.",
    errno.EDQUOT: "Free space within your quota, then rerun the same command: finished work is kept and "
    "the stage resumes.",
    errno.EACCES: "Make it readable/writable for you, or use another --run-dir.",
    errno.EPERM: "Make it readable/writable for you, or use another --run-dir.",
    errno.EROFS: "The file system is read-only: use another --run-dir.",
}


def os_error_line(exc: OSError) -> str:
    """``No space left on device (/run/x). Free disk space, then rerun ...`` for any OSError."""
    from logitcache.pipeline.errors import error_line

    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    advice = _OS_ADVICE.get(exc.errno or 0, "Check the path and rerun the same command.")
    return error_line(f"{reason}{where}. {advice}")


if __name__ == "__main__":
    main()
