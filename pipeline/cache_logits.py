"""`pipe cache-logits` and `pipe verify-cache`: run the teachers once, store their ensemble.

``RUN/cache/`` holds ``logits.zarr`` (the cache, format in docs/cache-format.md) beside the stage's
``provenance.json``, ``COMPLETE.json`` and, once verified, ``verify.json`` (paths: :class:`RunLayout`).
The teachers are loaded and checked by :mod:`logitcache.pipeline.teacher_signal`, as for the
online student.

How it runs: every teacher does one forward pass per batch of ``cache.batch_size`` training
windows (bf16 autocast on CUDA, float32 on CPU); their logits are combined by the ensemble rule
and reduced to the stored entries (top-k + tail, or sampled ids + counts); whole shards are
handed to a background thread that encodes, compresses and writes them while the teachers go on
with the next shard. A shard counts only once its done flag is set, so after a crash (even
``kill -9``) rerunning the same command rewrites exactly the unfinished shards and the result is
bit-identical to an uninterrupted run. Under ``torchrun`` rank ``r`` of ``W`` writes shards
``s % W == r`` and rank 0 writes the final summary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logitcache.cache import (
    CacheMetadata,
    Encoding,
    SampledSelection,
    TopkSelection,
    create_cache,
    default_layout,
    open_cache,
    open_cache_writer,
    verify_cache,
)
from logitcache.cache.encoding import weight_error_bound
from logitcache.cache.metadata import SAMPLED_ENCODING
from logitcache.cache.writer import existing_cache
from logitcache.pipeline import __version__
from logitcache.pipeline.config import CacheConfig, Config, _validate_cache, cache_fingerprint, from_dict
from logitcache.pipeline.distributed import DistContext, init_distributed, resolve_device
from logitcache.pipeline.errors import CacheError, StageError
from logitcache.pipeline.prepare import PreparedData, TokenWindows
from logitcache.pipeline.progress import progress_bar
from logitcache.pipeline.rundir import (
    COMPLETE_MARKER,
    RunLayout,
    atomic_write_text,
    is_complete,
    locate_cache_store,
    mark_complete,
    read_marker,
    write_provenance,
)
from logitcache.pipeline.teacher_signal import TeacherEnsemble, resolve_teacher_path


def build_metadata(config: Config, data: PreparedData, teachers: TeacherEnsemble) -> CacheMetadata:
    """The metadata of ``RUN/cache``: :func:`cache_metadata` of the prepared training windows."""
    resolved = config.to_dict()
    return cache_metadata(
        config.cache,
        TokenWindows.from_prepared(data),
        teachers,
        seed=config.run.seed,
        base=config.run_dir,
        # Sections that decide the cache's content (not run.dir: moving a run changes nothing).
        config_sections={key: resolved[key] for key in ("data", "teachers", "cache")},
    )


def cache_metadata(
    cache: CacheConfig,
    tokens: TokenWindows,
    teachers: TeacherEnsemble,
    *,
    seed: int,
    base: Path | None,
    config_sections: dict[str, Any] | None = None,
) -> CacheMetadata:
    """What a cache of ``tokens`` by ``teachers`` with the ``cache`` settings records about itself.

    Teacher folders inside ``base`` (the run directory) are recorded relative to it.
    """
    sampled = cache.mode == "sampled"
    encoding = SAMPLED_ENCODING if sampled else Encoding(id_code=cache.id_code, value_code=cache.value_code)
    return CacheMetadata(
        vocab_size=tokens.vocab_size,
        tokenizer_sha256=tokens.tokenizer_sha256,
        dataset_sha256=tokens.windows_sha256,
        teachers=teachers.infos(base),
        k=cache.samples if sampled else cache.k,
        package_version=__version__,
        ensemble=cache.ensemble,
        teacher_weights=tuple(cache.weights) if cache.weights else None,
        temperature=cache.temperature,
        mode=cache.mode,
        num_samples=cache.samples if sampled else None,
        seed=seed,
        encoding=encoding,
        config=config_sections or {"cache": asdict(cache)},
    )


def _concat(parts: list[TopkSelection | SampledSelection]) -> TopkSelection | SampledSelection:
    cls = type(parts[0])
    return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})


def _shard_selections(
    teachers: TeacherEnsemble, windows: np.ndarray, writer: Any, shards: list[int], batch_size: int, bar: Any
) -> Iterator[tuple[int, TopkSelection | SampledSelection]]:
    for shard in shards:
        start, stop = writer.shard_rows(shard)
        parts = []
        for begin in range(start, stop, batch_size):
            end = min(begin + batch_size, stop)
            batch = torch.from_numpy(windows[begin:end].astype(np.int64))  # (B, T)
            parts.append(teachers.select(batch, torch.arange(begin, end)))
            bar.update((end - begin) * windows.shape[1])
        yield shard, _concat(parts)


def _chunking(windows_per_shard: int, shape: tuple[int, ...], k: int) -> dict[str, int | None]:
    """Chunk/shard sizes: the cache library's defaults unless a shard size is set (0 = default).

    A configured shard size keeps the default chunk size where it divides the shard (their gcd).
    """
    if not windows_per_shard:
        return {"windows_per_chunk": None, "windows_per_shard": None}
    default = default_layout(num_windows=shape[0], seq_len=shape[1], k=k).windows_per_chunk
    return {"windows_per_chunk": math.gcd(default, windows_per_shard), "windows_per_shard": windows_per_shard}


def _move_aside(out: Path, aside: Path) -> None:
    """`--overwrite`: move the stage folder ``out`` to ``aside``; the old output is deleted only once
    the new one is complete (see :func:`cache_logits`), so the user never has neither.

    If ``aside`` already exists, an earlier `--overwrite` was interrupted: when ``out`` is complete
    the replacement finished and ``aside`` is obsolete; otherwise ``out`` is the unfinished
    replacement (the complete old output is still aside) and is discarded instead.
    """
    if not out.is_dir() or not any(out.iterdir()):
        return
    if aside.exists():
        if read_marker(out) is None:
            shutil.rmtree(out)
            return
        shutil.rmtree(aside)
    os.replace(out, aside)


def cache_logits(
    config: Config, *, overwrite: bool = False, progress: bool | None = None, ctx: DistContext | None = None
) -> Path:
    """Build ``RUN/cache`` from the trained teachers; return its folder. Resumes an interrupted run.

    Everything is checked before anything is created, moved or deleted: the config (at load), the
    prepared data, the teachers, the cache metadata and layout, and that the store holds nothing
    but a logitcache cache. ``overwrite`` moves an existing ``RUN/cache`` to ``RUN/cache.replaced``
    and deletes that only after the new cache is complete; after an interruption ``RUN/cache``
    holds the unfinished new cache (rerun to resume it) and ``RUN/cache.replaced`` the old one.
    The writing itself is :func:`write_cache`, as for :func:`build_cache` (the Python API).
    """
    layout = RunLayout.of(config)
    out, aside = layout.cache, layout.cache_replaced
    fingerprint = cache_fingerprint(config)
    if is_complete(out, fingerprint) and not overwrite:
        # An earlier --overwrite finished its cache but not its cleanup (every rank may get here).
        shutil.rmtree(aside, ignore_errors=True)
        return out
    ctx = ctx or init_distributed(config.run.device)
    data = PreparedData.open(layout.data)
    for folder in (out, aside):
        if folder.exists() and not folder.is_dir():
            raise CacheError(
                f"Expected a folder for the cache at {folder}. Got a file; move it away or use another --run-dir."
            )
    teachers = TeacherEnsemble.load(config, data, ctx.device)
    metadata = build_metadata(config, data, teachers)  # validates k < vocab, weights, ...

    def setup() -> None:  # main process, once everything is validated
        if overwrite:
            _move_aside(out, aside)
        out.mkdir(parents=True, exist_ok=True)

    def created() -> None:  # main process, once the store is accepted
        for stale in (out / COMPLETE_MARKER, layout.verify_report):  # of an earlier cache being replaced
            stale.unlink(missing_ok=True)
        write_provenance(out, config, "cache-logits")

    summary = write_cache(
        layout.cache_store,
        teachers,
        data.windows("train"),
        metadata,
        batch_size=config.cache.batch_size,
        windows_per_shard=config.cache.windows_per_shard,
        overwrite=overwrite,
        ctx=ctx,
        progress=progress,
        setup=setup,
        created=created,
    )
    if ctx.is_main:
        mark_complete(out, fingerprint, summary)
        if aside.exists():
            shutil.rmtree(aside)  # the new cache is complete: only now the old one goes
    ctx.barrier()
    return out


def write_cache(
    store: Path,
    teachers: TeacherEnsemble,
    windows: np.ndarray,
    metadata: CacheMetadata,
    *,
    batch_size: int,
    windows_per_shard: int = 0,
    overwrite: bool = False,
    ctx: DistContext,
    progress: bool | None = None,
    setup: Callable[[], None] | None = None,
    created: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run ``teachers`` over ``windows`` (N, T) and write their entries into the cache ``store``.

    The one writing path of `pipe cache-logits` and :func:`build_cache`. Validates the store
    (nothing but a logitcache cache there) and the layout first; then, on the main process,
    ``setup()``, the store's creation (refusing a complete or different cache unless
    ``overwrite``; an unfinished identical one is resumed) and ``created()``. Shards are split
    over the ranks of ``ctx``. Returns the cache's summary (every rank; only the main process
    finalises the store).
    """
    existing_cache(store)  # refuses foreign content at the store's path, even with --overwrite
    chunking = _chunking(windows_per_shard, windows.shape, metadata.k)
    default_layout(num_windows=windows.shape[0], seq_len=windows.shape[1], k=metadata.k, **chunking)
    if ctx.is_main:
        if setup is not None:
            setup()
        writer = create_cache(  # refuses (changing nothing) a complete or different cache unless overwrite
            store,
            metadata,
            num_windows=windows.shape[0],
            seq_len=windows.shape[1],
            **chunking,
            overwrite=overwrite,
        )
        if created is not None:
            created()
    ctx.barrier()
    if not ctx.is_main:
        writer = open_cache_writer(store, metadata=metadata)
    shards = writer.pending_shards(rank=ctx.rank, world_size=ctx.world_size)
    total = sum(writer.shard_rows(s)[1] - writer.shard_rows(s)[0] for s in shards) * windows.shape[1]
    bar = progress_bar(
        total=total, desc="cache-logits", unit="tok", unit_scale=True, progress=progress, is_main=ctx.is_main
    )
    started = time.perf_counter()
    # One background writer: encoding + compression + I/O of shard s overlap the teachers' work on
    # shard s+1. At most two shards wait in memory, so a slow disk throttles the teachers.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as pool, bar:
        pending: list[Future[None]] = []
        for shard, selection in _shard_selections(teachers, windows, writer, shards, batch_size, bar):
            pending.append(pool.submit(writer.write_shard, shard, selection))
            while len(pending) > 1:
                pending.pop(0).result()
        for future in pending:
            future.result()
    elapsed = time.perf_counter() - started
    ctx.barrier()
    summary: dict[str, Any] = {}
    if ctx.is_main:
        summary = writer.finalize() | {
            "seconds": elapsed,
            "tokens_per_s_this_run": total / max(elapsed, 1e-9),
        }
    ctx.barrier()
    return summary


def build_cache(
    teachers: Mapping[str, str | Path] | Sequence[str | Path],
    out: str | Path,
    *,
    data: str | Path | None = None,
    windows: Any = None,
    tokenizer: str | Path | None = None,
    cache: CacheConfig | None = None,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    **settings: Any,
) -> Path:
    """Build a cache at ``out`` (a Zarr v3 store) from Hugging Face teacher folders; return ``out``.

    ``teachers``: ``{name: folder}`` or a list of folders (named by their folder names). The
    token windows: ``data`` (a prepared ``RUN/data`` folder: its train split) or ``windows``
    (N, T) with the ``tokenizer`` (``tokenizer.json`` or its folder) that made them; every
    teacher's tokenizer must equal it. What is stored: ``cache`` (a :class:`CacheConfig`) with
    ``settings`` overriding its fields, e.g. ``k=32, temperature=2.0``. Resumes an interrupted
    build; ``overwrite`` replaces a complete or different cache. Runs on one process (under
    torchrun, every rank writes its shards). Everything is validated before anything is written.
    """
    if (data is None) == (windows is None):
        raise StageError("Expected either data (a prepared RUN/data folder) or windows with a tokenizer. Got "
                         + ("both." if data is not None else "neither."))  # fmt: skip
    if windows is not None and tokenizer is None:
        raise StageError("Expected the tokenizer the windows were made with (tokenizer=...). Got none.")
    names = _teacher_names(teachers)
    raw = {**asdict(cache or CacheConfig()), **settings}
    settings_checked = from_dict(CacheConfig, raw, where="cache")
    _validate_cache(settings_checked, len(names))
    tokens = (
        TokenWindows.from_prepared(PreparedData.open(data))
        if data is not None
        else TokenWindows.of(windows, tokenizer)  # type: ignore[arg-type]
    )
    store = Path(out)
    ctx = init_distributed(device)
    ensemble = TeacherEnsemble(names, tokens, ctx.device, cache=settings_checked, seed=seed)
    metadata = cache_metadata(
        settings_checked, tokens, ensemble, seed=seed, base=store.resolve().parent.parent
    )
    write_cache(
        store,
        ensemble,
        tokens.windows,
        metadata,
        batch_size=settings_checked.batch_size,
        windows_per_shard=settings_checked.windows_per_shard,
        overwrite=overwrite,
        ctx=ctx,
        progress=progress,
        setup=lambda: store.parent.mkdir(parents=True, exist_ok=True),
    )
    return store


def _teacher_names(teachers: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, Path]:
    if isinstance(teachers, Mapping):
        named = {str(name): Path(path) for name, path in teachers.items()}
    else:
        named = {}
        for path in map(Path, teachers):
            if path.name in named:
                raise StageError(
                    f"Expected teacher folders with distinct names. Got {path.name!r} twice; pass a dict "
                    "{name: folder} instead."
                )
            named[path.name] = path
    if not named:
        raise StageError("Expected at least one teacher folder. Got none.")
    return named


def describe_cache(out: Path) -> str:
    """One line on a complete cache stage folder (what `pipe cache-logits` prints); "" if incomplete."""
    summary = (read_marker(out) or {}).get("summary") or {}
    if not summary:
        return ""
    return (
        f"cache {out}: {summary['positions']:,} positions, {summary['bytes_per_position']:.1f} bytes/position, "
        f"mean captured mass {summary['mean_captured_mass']:.4f}, mean teacher entropy "
        f"{summary['mean_teacher_entropy']:.3f} nats"
    )


def resolve_cache_store(path: str | Path) -> Path:
    """A cache location given by the user: a stage folder (RUN/cache) or the store itself."""
    store = locate_cache_store(path)
    if store.is_file():
        raise CacheError(f"Expected a cache folder. Got the file {store}.")
    if not store.exists():
        raise CacheError(
            f"Expected a logit cache at {store}. Found nothing; run `pipe cache-logits CONFIG` first."
        )
    return store


def verify(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
    quick: bool = False,
) -> dict[str, Any]:
    """Check a cache (see `pipe verify-cache`); returns a JSON-ready report with ``ok``.

    ``quick``: metadata, file sizes and shard indexes only (docs/cache-format.md, "Verifying").
    """
    if quick and recompute:
        raise StageError("Expected --quick or --recompute. Got both: --recompute needs the full pass.")
    store = resolve_cache_store(path)
    run_data = RunLayout(store.parent.parent).data  # RUN/cache/logits.zarr -> RUN/data
    if data_dir is None and (run_data / COMPLETE_MARKER).is_file():
        data_dir = run_data
    data = PreparedData.open(data_dir) if data_dir is not None else None
    report = verify_cache(
        store,
        dataset_sha256=data.windows_sha256("train") if data else None,
        tokenizer_sha256=data.manifest["tokenizer_sha256"] if data else None,
        quick=quick,
    ).to_dict()
    report["problems"] += _marker_problems(store, report.get("summary"))
    report["ok"] = not report["problems"] and not report["bad_shards"]
    report["store"] = str(store)
    report["aligned_with"] = str(data.root) if data else None
    if recompute and report["ok"]:
        if data is None:
            raise StageError("--recompute needs the prepared data (pass --data RUN/data).")
        report["recompute"] = recompute_check(store, data, recompute, seed=seed, device=device)
        report["ok"] = report["ok"] and report["recompute"]["ok"]
    return report


def _marker_problems(store: Path, summary: dict[str, Any] | None) -> list[str]:
    """The stage folder's COMPLETE.json (when the store is RUN/cache/logits.zarr) must parse, carry a
    fingerprint, and repeat the store's summary: it is what `pipe run` trusts to skip the stage."""
    stage = store.parent
    marker_path = stage / COMPLETE_MARKER
    if store.name != RunLayout(stage.parent).cache_store.name or not marker_path.exists():
        return []
    marker = read_marker(stage)
    where = f"{marker_path}"
    if not isinstance(marker, dict) or not isinstance(marker.get("summary"), dict):
        return [f"{where}: not valid JSON with a 'summary' object: the stage marker is damaged"]
    fingerprint = marker.get("fingerprint")
    if (
        not isinstance(fingerprint, str)
        or len(fingerprint) != 64
        or set(fingerprint) - set("0123456789abcdef")
    ):
        return [f"{where}: fingerprint {fingerprint!r} is not a SHA-256: the stage marker is damaged"]
    if summary is None:
        return []  # the store's own problem is reported already
    differing = sorted(key for key, value in summary.items() if marker["summary"].get(key) != value)
    if differing:
        return [f"{where}: summary differs from the cache's in {', '.join(differing)}"]
    return []


def report_lines(report: dict[str, Any]) -> list[str]:
    """The report of :func:`verify` as `pipe verify-cache` prints it: failures, recompute, verdict last."""
    lines = [f"FAIL {line}" for line in report.get("problems", [])]
    for shard in report.get("shards", []):
        lines += [f"FAIL shard {shard['shard']}: {problem}" for problem in shard.get("problems", [])]
    lines += [f"note: {note}" for note in report.get("notes", [])]
    if "recompute" in report:
        recompute = report["recompute"] | {"windows": len(report["recompute"]["windows"])}
        lines.append(f"recompute: {json.dumps(recompute)}")
    lines.append(f"{'OK' if report['ok'] else 'FAILED'}: {report['store']}")
    return lines


# Absolute slack on top of the encoding's bound: the cache used the fused top-k path
# (`TeacherEnsemble.select`), the check recomputes full float32 log-softmaxes, so the same
# probability may differ in its last float32 bits (|dp| ~ 1e-7 at p ~ 1); 1e-5 is 100x that, and
# still 30x below the smallest step of the default code's bound at p_max ~ 0.3.
FLOAT_SLACK = 1e-5
# bf16 teachers on a GPU (autocast) round logits to 8 bits of mantissa: recomputing on other
# hardware or in another batch order moves probabilities by up to ~2e-3.
HARDWARE_SLACK = 2e-3


def recompute_check(store: Path, data: PreparedData, count: int, *, seed: int, device: str) -> dict[str, Any]:
    """Rerun the teachers on ``count`` random windows and compare with the stored entries.

    Tolerance per stored weight (topk mode, weights as the loss gets them, ``w = u / sum(u) * (1 - tail)``):
    :func:`~logitcache.cache.encoding.weight_error_bound` of the recomputed probabilities, i.e. the
    encoding's per-entry bound carried through the renormalisation (every entry's rounding error
    enters ``sum(u)`` and so moves every weight), plus :data:`FLOAT_SLACK`, plus
    :data:`HARDWARE_SLACK` when the teachers ran in bf16. Top-k sets may differ only where the k-th
    and (k+1)-th probabilities are within the float slack (ties).
    """
    reader = open_cache(store)
    meta = reader.metadata
    base = Path(store).resolve().parent.parent  # the run directory of RUN/cache/logits.zarr
    dirs = {t.name: resolve_teacher_path(t.path, base) for t in meta.teachers}
    cache_cfg = CacheConfig(
        k=meta.k,
        mode=meta.mode,
        samples=meta.num_samples or 64,
        ensemble=meta.ensemble,
        weights=list(meta.teacher_weights or []),
        temperature=meta.temperature,
    )
    teachers = TeacherEnsemble(dirs, data, resolve_device(device), cache=cache_cfg, seed=meta.seed)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(reader.num_windows, size=min(count, reader.num_windows), replace=False))
    windows = torch.from_numpy(data.windows("train")[rows].astype(np.int64))  # (n, T)
    stored = reader.read_windows(rows, weights="ghost" if meta.mode == "topk" else "renormalized")
    logp = teachers.logprobs(windows, torch.from_numpy(rows)).cpu()  # (n, T, V)
    probs = logp.double().exp()  # (n, T, V) float64: the bound's arithmetic must not add error
    recomputed = probs.gather(-1, stored.ids)  # (n, T, k) exact probabilities of the stored ids
    if meta.mode == "sampled":
        # count/n estimates p without bias; its error is statistical, so only a loose mean check.
        error = float((stored.weights.double() - recomputed).abs().mean())
        return {"windows": rows.tolist(), "mean_abs_error": error, "tolerance": 0.05, "ok": error < 0.05}
    slack = FLOAT_SLACK + (0.0 if teachers.dtype == "float32" else HARDWARE_SLACK)
    if stored.tail is None:  # ghost mode of a topk cache always returns the tail
        raise CacheError(f"Expected a tail in the topk cache at {store}. Got none: the cache is damaged.")
    kept = 1.0 - stored.tail.double()  # (n, T): what the reader scaled the entries to
    bound = weight_error_bound(recomputed.numpy(), kept.numpy(), meta)  # (n, T, k)
    tolerance = torch.from_numpy(bound) + slack  # (n, T, k)
    error = (stored.weights.double() - recomputed).abs()  # (n, T, k)
    kth = torch.topk(probs, meta.k + 1, dim=-1).values  # (n, T, k+1)
    near_tie = (kth[..., meta.k - 1] - kth[..., meta.k]) <= slack  # (n, T)
    top_ids = torch.topk(probs, meta.k, dim=-1).indices.sort(-1).values
    same_set = (top_ids == stored.ids.sort(-1).values).all(-1)  # (n, T)
    set_ok = bool((same_set | near_tie).all())
    value_ok = bool((error <= tolerance).all())
    return {
        "windows": rows.tolist(),
        "max_abs_error": float(error.max()),
        "worst_error_over_tolerance": float((error / tolerance).max()),
        "positions_with_other_topk_set": int((~same_set).sum()),
        "ok": set_ok and value_ok,
    }


def verify_stage(config: Config, *, progress: bool | None = None) -> dict[str, Any]:
    """`pipe run`'s verify step: verify RUN/cache against RUN/data, record verify.json, raise if bad."""
    layout = RunLayout.of(config)
    report = verify(layout.cache, data_dir=layout.data, progress=progress)
    report["fingerprint"] = cache_fingerprint(config)
    atomic_write_text(layout.verify_report, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not report["ok"]:
        raise CacheError(f"The cache at {layout.cache} failed verification; see {layout.verify_report}.")
    return report


def is_verified(config: Config) -> bool:
    path = RunLayout.of(config).verify_report
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    return bool(report.get("ok")) and report.get("fingerprint") == cache_fingerprint(config)


def is_cache_complete(config: Config) -> bool:
    return is_complete(RunLayout.of(config).cache, cache_fingerprint(config))
