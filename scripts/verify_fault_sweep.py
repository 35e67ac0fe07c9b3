"""Damage every file of a cache store in turn and check that `pipe verify-cache` reports each damage.

    python scripts/verify_fault_sweep.py RUN/cache [--quick] [--seed 17]

The store is copied to a temporary folder first (RUN/cache is never touched). For every file of
the copy: delete it, truncate it (to 0 bytes, half, minus one byte), flip single bits (first,
middle, last byte and three random ones); after each damage `pipe verify-cache COPY --json` runs
in this process, and the file is restored. A damage counts as caught when the command exits
non-zero and one of its problem lines names the damaged file. Prints one line per damage that was
missed, then a summary; exits 1 if any was missed (issue 17's done-when).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from logitcache.cache.faults import sweep_store
from logitcache.pipeline.cli import main as pipe


def verify_cli(path: Path, quick: bool) -> tuple[bool, list[str]]:
    """`pipe verify-cache PATH --json` in this process: (passed, problem lines)."""
    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            pipe(["verify-cache", str(path), "--json", *(["--quick"] if quick else [])])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    try:
        report = json.loads(out.getvalue())
    except json.JSONDecodeError:  # refused before a report (a one-line error on stderr)
        return code == 0, [err.getvalue().strip()]
    lines = list(report.get("problems", [])) + [p for s in report.get("shards", []) for p in s["problems"]]
    return code == 0 and report.get("ok", False), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache", type=Path, help="RUN/cache (a finished cache-logits output)")
    parser.add_argument("--quick", action="store_true", help="check with verify-cache --quick")
    parser.add_argument("--seed", type=int, default=17, help="seed of the random bit flips")
    args = parser.parse_args(argv)
    store = args.cache / "logits.zarr"
    if not (store / "zarr.json").is_file():
        print(f"error: Expected a cache store at {store}. Got none: pass RUN/cache of a finished run.")
        return 2
    with tempfile.TemporaryDirectory(prefix="fault-sweep-") as tmp:
        copy = Path(tmp) / "cache"
        copy.mkdir()
        shutil.copytree(store, copy / "logits.zarr")
        data = args.cache.parent / "data"  # verify-cache compares with RUN/data beside RUN/cache
        if data.is_dir():
            (Path(tmp) / "data").symlink_to(data.resolve())
        ok, lines = verify_cli(copy, args.quick)
        if not ok:
            print(f"error: the undamaged copy does not verify: {lines[:3]}")
            return 2
        started = time.perf_counter()
        outcomes = sweep_store(
            copy / "logits.zarr",
            lambda: verify_cli(copy, args.quick),
            seed=args.seed,
            names_relative_to=copy / "logits.zarr",
        )
        seconds = time.perf_counter() - started
    missed = [o for o in outcomes if not (o.reported and o.named)]
    for o in missed:
        why = "passed" if not o.reported else "failed without naming the file"
        print(f"MISSED {o.file}: {o.damage}: verify-cache {why}: {list(o.lines)[:2]}")
    files = len({o.file for o in outcomes})
    print(
        f"{len(outcomes) - len(missed)} of {len(outcomes)} damages to {files} files caught "
        f"({'quick' if args.quick else 'full'} pass, {seconds / max(len(outcomes), 1):.2f} s per check)"
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
