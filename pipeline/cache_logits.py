"""`pipe cache-logits` and `pipe verify-cache`: run the teachers once, store their ensemble.

``RUN/cache/`` holds ``logits.zarr`` (the cache, format in docs/cache-format.md) beside the stage's
``provenance.json``, ``COMPLETE.json`` and, once verified, ``verify.json`` (paths: :class:`RunLayout`).
With ``cache.store`` = a URL (``s3://bucket/prefix/logits.zarr``, docs/object-stores.md) the store is
remote and ``RUN/cache/`` holds the rest.
The teachers are loaded and checked by :mod:`logitcache.pipeline.teacher_signal`, as for the
online student.

How it runs: every teacher does one forward pass per batch of ``cache.batch_size`` training
windows (bf16 autocast on CUDA, float32 on CPU); their logits are combined by the ensemble rule
and reduced to the stored entries (top-k + tail, sampled ids + counts, or both: hybrid); whole shards are
handed to a background thread that encodes, compresses and writes them while the teachers go on
with the next shard. A shard counts only once its done flag is set, so after a crash (even
``kill -9``) rerunning the same command rewrites exactly the unfinished shards and the result is
bit-identical to an uninterrupted run. Under ``torchrun`` rank ``r`` of ``W`` writes shards
``s % W == r`` and rank 0 writes the final summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from zarr.storage import MemoryStore

from logitcache.cache import (
    CacheMetadata,
    Encoding,
    create_cache,
    default_layout,
    open_cache,
    open_cache_writer,
    verify_cache,
)
from logitcache.cache.encoding import decode_entries, encode_entries, weight_error_bound
from logitcache.cache.layout import sharded_names
from logitcache.cache.metadata import SAMPLED_ENCODING
from logitcache.cache.select import tail_cdf, tail_uniforms
from logitcache.cache.storage import StoreLike, is_url, key_size, list_keys
from logitcache.cache.writer import Selection, existing_cache, unfinished_metadata
from logitcache.pipeline import __version__
from logitcache.pipeline.config import (
    CacheConfig,
    Config,
    _validate_cache,
    cache_fingerprint,
    cache_settings,
    from_dict,
)
from logitcache.pipeline.distributed import DistContext, init_distributed, resolve_device
from logitcache.pipeline.errors import CacheError, StageError
from logitcache.pipeline.preflight import StageLock, check_writable, finish_replacement, move_aside
from logitcache.pipeline.prepare import PreparedData, TokenWindows
from logitcache.pipeline.progress import progress_bar
from logitcache.pipeline.rundir import (
    CACHE_STORE,
    COMPLETE_MARKER,
    RunLayout,
    atomic_write_text,
    is_complete,
    locate_cache_store,
    mark_complete,
    read_marker,
    records,
    write_provenance,
)
from logitcache.pipeline.teacher_signal import TeacherEnsemble, resolve_teacher_path


def build_metadata(config: Config, data: PreparedData, teachers: TeacherEnsemble) -> CacheMetadata:
    """The metadata of ``RUN/cache``: :func:`cache_metadata` of the prepared training windows."""
    written = config.as_written()  # input paths as the config file wrote them: equal in every clone
    return cache_metadata(
        config.cache,
        TokenWindows.from_prepared(data),
        teachers,
        seed=config.run.seed,
        base=config.run_dir,
        # Sections that decide the cache's content (not run.dir or cache.store: where the cache
        # lives changes nothing, so a moved run or a cache uploaded elsewhere has the same bytes;
        # nor where the checkout is, so an unfinished cache resumes after the checkout moved).
        config_sections={
            "data": written["data"],
            "teachers": written["teachers"],
            "cache": cache_settings(config),
        },
    )


def _as_recorded_by_unfinished(config: Config, metadata: CacheMetadata, store: StoreLike) -> CacheMetadata:
    """``metadata``, or, when the unfinished cache at ``store`` was started by a version that recorded
    the input paths resolved (up to 2026-12-03: absolute paths) and differs in nothing else, the same
    with the record it started with, so that it resumes where it was started (a moved checkout still
    needs ``--overwrite``: its resolved paths differ)."""
    started = unfinished_metadata(store)
    if started is None or started.differences(metadata) != ["config"]:
        return metadata
    resolved = config.to_dict()
    by_path = {**metadata.config, "data": resolved["data"], "teachers": resolved["teachers"]}
    if json.loads(json.dumps(by_path)) != started.config:  # as stored: JSON (tuples are lists)
        return metadata
    return dataclasses.replace(metadata, config=started.config)


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
    num_samples = {"sampled": cache.samples, "hybrid": cache.tail_samples}.get(cache.mode)
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
        num_samples=num_samples,
        seed=seed,
        encoding=encoding,
        config=config_sections or {"cache": asdict(cache)},
    )


def _concat(parts: list[Selection]) -> Selection:
    cls = type(parts[0])
    return cls(**{f: torch.cat([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__})


def _shard_selections(
    teachers: TeacherEnsemble, windows: np.ndarray, writer: Any, shards: list[int], batch_size: int, bar: Any
) -> Iterator[tuple[int, Selection]]:
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
    A remote store (``cache.store``) cannot be moved aside: ``overwrite`` deletes its objects when
    the new cache is created, after every check above.
    """
    layout = RunLayout.of(config)
    out, aside = layout.cache, layout.cache_replaced
    fingerprint = cache_fingerprint(config)
    if is_complete(out, fingerprint) and not overwrite:
        # An earlier --overwrite finished its cache but not its cleanup (every rank may get here).
        shutil.rmtree(aside, ignore_errors=True)
        return out
    for folder in (out, aside):
        if folder.exists() and not folder.is_dir():
            raise CacheError(
                f"Expected a folder for the cache at {folder}. Got a file; move it away or use another --run-dir."
            )
    check_writable(out, "the cache")
    ctx = ctx or init_distributed(config.run.device)
    data = PreparedData.open(layout.data)
    teachers = TeacherEnsemble.load(config, data, ctx.device)
    metadata = build_metadata(config, data, teachers)  # validates k < vocab, weights, ...
    if not overwrite:
        metadata = _as_recorded_by_unfinished(config, metadata, layout.cache_location)

    def setup() -> None:  # main process, once everything is validated
        if overwrite:
            move_aside(out, aside, is_complete=read_marker(out) is not None)
        out.mkdir(parents=True, exist_ok=True)

    def created() -> None:  # main process, once the store is accepted
        for stale in (out / COMPLETE_MARKER, layout.verify_report):  # of an earlier cache being replaced
            stale.unlink(missing_ok=True)
        write_provenance(out, config, "cache-logits")

    with StageLock(out, "the cache", enabled=ctx.is_main):  # one cache-logits per run directory
        summary = write_cache(
            layout.cache_location,
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
            if layout.cache_url:  # a remote store: `verify-cache RUN/cache` follows this
                summary["store"] = layout.cache_url
            mark_complete(out, fingerprint, summary)
            finish_replacement(aside)  # the new cache is complete: only now the old one goes
    ctx.barrier()
    return out


def write_cache(
    store: StoreLike,
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
    chunking = _chunking(windows_per_shard, windows.shape, metadata.width)
    default_layout(num_windows=windows.shape[0], seq_len=windows.shape[1], k=metadata.width, **chunking)
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
    where = summary.get("store", out)  # the bucket URL of a remote store
    return (
        f"cache {where}: {summary['positions']:,} positions, {summary['bytes_per_position']:.1f} bytes/position, "
        f"mean captured mass {summary['mean_captured_mass']:.4f}, mean teacher entropy "
        f"{summary['mean_teacher_entropy']:.3f} nats"
    )


# ----------------------------------------------------------------------------------------------
# `pipe cache-logits --dry-run`: what a run would cost, from a few real batches, writing nothing


@dataclass(frozen=True)
class DryRunEstimate:
    """What `pipe cache-logits` would store and how long its teachers would take (:func:`dry_run`)."""

    windows: int
    seq_len: int
    positions: int  # windows x seq_len: one stored entry set per position
    sampled_windows: int  # distinct windows the estimates were measured on
    bytes_per_position: float  # as stored (encoded + compressed), measured on the sampled windows
    estimated_bytes: int  # bytes_per_position x positions
    raw_bytes_per_position: float  # encoded, uncompressed
    raw_bytes: int
    batch_size: int
    timed_batches: int  # batches timed (the first batch, the warm-up, is not among them)
    seconds_per_window: float  # teachers + ensemble + selection, mean over the timed batches
    estimated_seconds: float  # seconds_per_window x windows (one process on this device)
    write_seconds_per_window: float  # encoding + compression (the real run does it in a background thread)
    load_seconds: float  # loading and checking the teachers
    device: str
    teachers: tuple[tuple[str, str], ...]  # (name, compute dtype)
    complete: bool  # a complete cache for this config exists already (the real command does nothing)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def dry_run(config: Config, *, batches: int = 4) -> DryRunEstimate:
    """Estimate the cache of ``config`` without writing anything (`pipe cache-logits --dry-run`).

    Loads and checks the teachers as the real run does, runs them on ``batches`` batches of
    ``cache.batch_size`` windows spread over the training windows, and times each; the first batch
    is a warm-up and is not counted (at least one batch is timed). The entries of those windows are
    encoded and compressed exactly as the writer stores them (one shard of an in-memory cache, with
    the real cache's chunk size), which gives the bytes per position; times the positions, the size.
    Nothing is written to the run directory (or anywhere on disk).
    """
    layout = RunLayout.of(config)
    data = PreparedData.open(layout.data)
    device = resolve_device(config.run.device)
    started = time.perf_counter()
    teachers = TeacherEnsemble.load(config, data, device)
    load_seconds = time.perf_counter() - started
    metadata = build_metadata(config, data, teachers)  # validates k < vocab, weights, ...
    windows = data.windows("train")  # (N, T)
    num_windows, seq_len = windows.shape
    real = default_layout(
        num_windows=num_windows,
        seq_len=seq_len,
        k=metadata.width,
        **_chunking(config.cache.windows_per_shard, windows.shape, metadata.width),
    )
    batch = min(config.cache.batch_size, num_windows)
    starts = np.linspace(0, num_windows - batch, num=max(2, batches)).round().astype(np.int64)
    parts, rows, seconds = [], [], []
    for start in starts:
        index = torch.arange(int(start), int(start) + batch)  # (B,)
        ids = torch.from_numpy(windows[int(start) : int(start) + batch].astype(np.int64))  # (B, T)
        begin = _now(device)
        parts.append(teachers.select(ids, index))  # on the CPU: the device's work is done
        seconds.append(_now(device) - begin)
        rows.append(index)
    timed = seconds[1:]  # the first batch warms up (kernels, allocator, caches)
    # Sizes: the distinct sampled windows (batches overlap on small data), stored as the writer does.
    _, first = np.unique(torch.cat(rows).numpy(), return_index=True)
    picked = torch.from_numpy(first)
    sample = _concat(parts)
    sample = type(sample)(**{f: getattr(sample, f)[picked] for f in sample.__dataclass_fields__})
    sampled = int(picked.numel())
    per_chunk = min(real.windows_per_chunk, sampled)
    store = MemoryStore()
    writer = create_cache(
        store,
        metadata,
        num_windows=sampled,
        seq_len=seq_len,
        windows_per_chunk=per_chunk,
        windows_per_shard=per_chunk * -(-sampled // per_chunk),  # one shard holds the whole sample
    )
    begin = time.perf_counter()
    writer.write_shard(0, sample)
    write_seconds = time.perf_counter() - begin
    stored = sum(
        key_size(store, key) or 0
        for name in sharded_names(metadata)
        for key in list_keys(store, f"{name}/c/")
    )
    encoded = encode_entries(sample, metadata)
    raw = sum(a.nbytes for a in (encoded.ids, encoded.values, encoded.tail) if a is not None)
    positions = num_windows * seq_len
    per_position = stored / (sampled * seq_len)
    raw_per_position = raw / (sampled * seq_len)
    per_window = sum(timed) / (len(timed) * batch)
    return DryRunEstimate(
        windows=num_windows,
        seq_len=seq_len,
        positions=positions,
        sampled_windows=sampled,
        bytes_per_position=per_position,
        estimated_bytes=round(per_position * positions),
        raw_bytes_per_position=raw_per_position,
        raw_bytes=round(raw_per_position * positions),
        batch_size=batch,
        timed_batches=len(timed),
        seconds_per_window=per_window,
        estimated_seconds=per_window * num_windows,
        write_seconds_per_window=write_seconds / sampled,
        load_seconds=load_seconds,
        device=str(device),
        teachers=tuple(zip(teachers.names, teachers.dtypes, strict=True)),
        complete=is_cache_complete(config),
    )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def dry_run_lines(estimate: DryRunEstimate) -> list[str]:
    """What `pipe cache-logits --dry-run` prints."""
    e = estimate
    teachers = ", ".join(f"{name} ({dtype})" for name, dtype in e.teachers)
    lines = [
        f"dry run, nothing written: teachers {teachers} on {e.device}, loaded and checked in {e.load_seconds:.1f} s",
        f"positions: {e.positions:,} ({e.windows:,} windows x {e.seq_len})",
        f"estimated size: {e.estimated_bytes:,} bytes ({_size(e.estimated_bytes)}, {e.bytes_per_position:.1f} "
        f"bytes/position: the compression measured on {e.sampled_windows:,} windows encoded and compressed as "
        f"stored); uncompressed {e.raw_bytes:,} bytes ({e.raw_bytes_per_position:.1f} bytes/position)",
        f"estimated time: {_duration(e.estimated_seconds)} ({e.seconds_per_window * 1e3:.2f} ms/window, the mean "
        f"of {e.timed_batches} timed batches of {e.batch_size} windows after one warm-up batch: teachers, "
        f"ensemble and selection, one process on {e.device}); encoding and compression take about "
        f"{_duration(e.write_seconds_per_window * e.windows)} in the background writer, overlapped with them",
    ]
    if e.complete:
        lines.append(
            "note: a complete cache for this config exists already: `pipe cache-logits` would do nothing"
        )
    return lines


def resolve_cache_store(path: str | Path) -> str | Path:
    """A cache location given by the user: a store URL, a stage folder (RUN/cache) or the store itself.

    A stage folder whose cache is remote (its COMPLETE.json names the ``store`` URL) gives that URL.
    """
    if is_url(str(path)):
        return str(path)
    remote = _remote_store_of(Path(path))
    if remote is not None:
        return remote
    store = locate_cache_store(path)
    if store.is_file():
        raise CacheError(
            f"Expected a cache folder. Got the file {store}: pass RUN/cache or RUN/cache/logits.zarr."
        )
    if not store.exists():
        raise CacheError(
            f"Expected a logit cache at {store}. Found nothing; run `pipe cache-logits CONFIG` first."
        )
    return store


def _remote_store_of(stage: Path) -> str | None:
    """The store URL a stage folder's COMPLETE.json names (a cache written to ``cache.store``), or None."""
    if not stage.is_dir() or (stage / CACHE_STORE).exists():
        return None
    remote = ((read_marker(stage) or {}).get("summary") or {}).get("store")
    return remote if isinstance(remote, str) and is_url(remote) else None


def verify(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    device: str = "auto",
    progress: bool | None = None,
    quick: bool = False,
    stage_dir: Path | None = None,
) -> dict[str, Any]:
    """Check a cache (see `pipe verify-cache`); returns a JSON-ready report with ``ok``.

    ``path``: a store (folder or URL) or a stage folder (RUN/cache). ``quick``: metadata, file
    sizes and shard indexes only (docs/cache-format.md, "Verifying"). ``stage_dir``: the stage
    folder whose COMPLETE.json must agree with the store (default: the folder around a local
    store named logits.zarr, or the stage folder given as ``path``).
    """
    if quick and recompute:
        raise StageError("Expected --quick or --recompute. Got both: --recompute needs the full pass.")
    store = resolve_cache_store(path)
    if isinstance(store, Path):
        run_root: Path | None = store.parent.parent  # RUN/cache/logits.zarr -> RUN
        if stage_dir is None and store.name == CACHE_STORE:
            stage_dir = store.parent
    else:  # a remote store: its stage folder is known only when given
        if stage_dir is None and not is_url(str(path)):
            stage_dir = Path(path)
        run_root = stage_dir.parent if stage_dir is not None else None
    run_data = RunLayout(run_root).data if run_root is not None else None
    if data_dir is None and run_data is not None and (run_data / COMPLETE_MARKER).is_file():
        data_dir = run_data
    data = PreparedData.open(data_dir) if data_dir is not None else None
    report = verify_cache(
        store,
        dataset_sha256=data.windows_sha256("train") if data else None,
        tokenizer_sha256=data.manifest["tokenizer_sha256"] if data else None,
        quick=quick,
    ).to_dict()
    report["problems"] += _marker_problems(stage_dir, report.get("summary"))
    report["ok"] = not report["problems"] and not report["bad_shards"]
    report["store"] = str(store)
    report["aligned_with"] = str(data.root) if data else None
    if recompute and report["ok"]:
        if data is None:
            raise StageError("--recompute needs the prepared data (pass --data RUN/data).")
        report["recompute"] = recompute_check(store, data, recompute, seed=seed, device=device)
        report["ok"] = report["ok"] and report["recompute"]["ok"]
    return report


def _marker_problems(stage: Path | None, summary: dict[str, Any] | None) -> list[str]:
    """The stage folder's COMPLETE.json (if any) must parse, carry a fingerprint, and repeat the
    store's summary: it is what `pipe run` trusts to skip the stage."""
    if stage is None or not (stage / COMPLETE_MARKER).exists():
        return []
    marker_path = stage / COMPLETE_MARKER
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


def recompute_check(
    store: str | Path, data: PreparedData, count: int, *, seed: int, device: str
) -> dict[str, Any]:
    """Rerun the teachers on ``count`` random windows and compare with the stored entries.

    Tolerance per stored weight (topk mode, weights as the loss gets them, ``w = u / sum(u) * (1 - tail)``):
    :func:`~logitcache.cache.encoding.weight_error_bound` of the recomputed probabilities, i.e. the
    encoding's per-entry bound carried through the renormalisation (every entry's rounding error
    enters ``sum(u)`` and so moves every weight), plus :data:`FLOAT_SLACK`, plus
    :data:`HARDWARE_SLACK` when the teachers ran in bf16. Top-k sets may differ only where the k-th
    and (k+1)-th probabilities are within the float slack (ties). Hybrid mode: the head likewise,
    the tail mass within the slack, and every tail draw redrawn from the cache seed and checked
    against the recomputed tail CDF (:func:`_recompute_hybrid`). Sampled mode: a loose mean check.
    """
    reader = open_cache(store)
    meta = reader.metadata
    base = Path(store).resolve().parent.parent  # the run directory of RUN/cache/logits.zarr
    dirs = {t.name: resolve_teacher_path(t.path, base) for t in meta.teachers}
    cache_cfg = CacheConfig(
        k=meta.k,
        mode=meta.mode,
        samples=meta.num_samples or 64,
        tail_samples=meta.num_samples or 32,
        ensemble=meta.ensemble,
        weights=list(meta.teacher_weights or []),
        temperature=meta.temperature,
    )
    dtypes = {t.name: t.dtype for t in meta.teachers}  # on a CPU, the dtype each was loaded in
    teachers = TeacherEnsemble(
        dirs, data, resolve_device(device), cache=cache_cfg, seed=meta.seed, dtypes=dtypes
    )
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(reader.num_windows, size=min(count, reader.num_windows), replace=False))
    windows = torch.from_numpy(data.windows("train")[rows].astype(np.int64))  # (n, T)
    stored = reader.read_windows(rows, weights="ghost" if meta.mode == "topk" else "renormalized")
    logp = teachers.logprobs(windows, torch.from_numpy(rows)).cpu()  # (n, T, V)
    probs = logp.double().exp()  # (n, T, V) float64: the bound's arithmetic must not add error
    if meta.mode == "sampled":
        recomputed = probs.gather(-1, stored.ids)  # (n, T, k) exact probabilities of the stored ids
        # count/n estimates p without bias; its error is statistical, so only a loose mean check.
        error = float((stored.weights.double() - recomputed).abs().mean())
        return {"windows": rows.tolist(), "mean_abs_error": error, "tolerance": 0.05, "ok": error < 0.05}
    float32 = teachers.all_float32 and all(t.dtype == "float32" for t in meta.teachers)  # then and now
    slack = FLOAT_SLACK + (0.0 if float32 else HARDWARE_SLACK)
    if meta.mode == "hybrid":
        return {"windows": rows.tolist()} | _recompute_hybrid(reader, rows, logp, slack, bf16=not float32)
    if stored.tail is None:  # ghost mode of a topk cache always returns the tail
        raise CacheError(f"Expected a tail in the topk cache at {store}. Got none: the cache is damaged.")
    kept = 1.0 - stored.tail.double()  # (n, T): what the reader scaled the entries to
    return {"windows": rows.tolist()} | _recompute_head(probs, stored.ids, stored.weights, kept, meta, slack)


def _recompute_head(
    probs: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    kept: torch.Tensor,
    meta: CacheMetadata,
    slack: float,
) -> dict[str, Any]:
    """Top-k entries (topk cache, or a hybrid cache's head) against recomputed probabilities.

    ``probs`` (n, T, V) float64; ``ids``, ``weights`` (n, T, k) as the loss gets them, scaled to
    ``kept`` (n, T) = 1 - stored tail. See :func:`recompute_check` for the tolerance.
    """
    recomputed = probs.gather(-1, ids)  # (n, T, k) exact probabilities of the stored ids
    bound = weight_error_bound(recomputed.numpy(), kept.numpy(), meta)  # (n, T, k)
    tolerance = torch.from_numpy(bound) + slack  # (n, T, k)
    error = (weights.double() - recomputed).abs()  # (n, T, k)
    kth = torch.topk(probs, meta.k + 1, dim=-1).values  # (n, T, k+1)
    near_tie = (kth[..., meta.k - 1] - kth[..., meta.k]) <= slack  # (n, T)
    top_ids = torch.topk(probs, meta.k, dim=-1).indices.sort(-1).values
    same_set = (top_ids == ids.sort(-1).values).all(-1)  # (n, T)
    set_ok = bool((same_set | near_tie).all())
    value_ok = bool((error <= tolerance).all())
    return {
        "max_abs_error": float(error.max()),
        "worst_error_over_tolerance": float((error / tolerance).max()),
        "positions_with_other_topk_set": int((~same_set).sum()),
        "ok": set_ok and value_ok,
    }


# Hybrid tail draws: the draw of uniform u is the id v with F(v-1) <= u < F(v), F the tail's
# normalised CDF (cache/select.py). The writer sums the float32 exp(z - max z) of the fused pass,
# the checker exp(log p) of `ensemble_logprobs`, both in float64, from the same teachers: the two,
# and another batch composition, differ by float32 rounding in each probability (relative ~1e-6),
# so F by a few 1e-6 at most: 1e-4 is a wide margin that is
# still far below the width of most ids' intervals. bf16 teachers (GPU autocast) rounded logits to
# 8 bits of mantissa (|d z| up to ~0.03 at |z| ~ 8, so relative |d p| ~3 %): F may move by ~0.05.
TAIL_CDF_SLACK = 1e-4
TAIL_CDF_SLACK_BF16 = 0.05


def _recompute_hybrid(
    reader: Any, rows: np.ndarray, logp: torch.Tensor, slack: float, *, bf16: bool
) -> dict[str, Any]:
    """A hybrid cache's windows ``rows`` against recomputed log-probabilities ``logp`` (n, T, V) float32.

    Head: as a topk cache (:func:`_recompute_head`). Tail mass: within ``slack`` of the recomputed
    ``sum p`` outside the stored head. Draws: the window's uniforms are regenerated from the cache
    seed (:func:`~logitcache.cache.select.tail_uniforms`); sorted, the i-th uniform must fall in
    the CDF interval ``[F(d - 1), F(d)]`` (+- :data:`TAIL_CDF_SLACK`) of the i-th drawn id ``d``
    (the drawn ids expanded by their counts, ascending: the inverse CDF is monotone). Positions
    whose stored tail mass is 0 are skipped: their draws weigh nothing.
    """
    meta = reader.metadata
    k, m = meta.k, meta.num_samples
    raw = reader.read_raw(rows)
    decoded = decode_entries(raw["ids"], raw["values"], raw["tail"], meta)
    head_ids = decoded.ids[..., :k]  # (n, T, k)
    tail_ids = torch.from_numpy(decoded.ids[..., k:])  # (n, T, m)
    counts = torch.from_numpy(raw["values"][..., k:].astype(np.int64))  # (n, T, m)
    stored_tail = torch.from_numpy(raw["tail"].astype(np.float64))  # (n, T)
    probs = logp.double().exp()  # (n, T, V)
    head_ids_t = torch.from_numpy(head_ids)
    head = _recompute_head(
        probs,
        head_ids_t,
        torch.from_numpy(decoded.weights[..., :k]),
        1.0 - stored_tail,
        dataclasses.replace(meta, mode="topk", num_samples=None),
        slack,
    )
    outside = probs.scatter(-1, head_ids_t, 0.0).sum(-1)  # (n, T) recomputed tail mass
    tail_error = float((stored_tail - outside).abs().max())
    cdf_slack = TAIL_CDF_SLACK_BF16 if bf16 else TAIL_CDF_SLACK
    worst, outside_draws = 0.0, 0
    for b, window in enumerate(rows.tolist()):
        cdf = tail_cdf(logp[b], head_ids_t[b])  # (T, V)
        cdf = cdf / cdf[:, -1:]  # normalised: F(V - 1) = 1
        lower = torch.cat([torch.zeros_like(cdf[:, :1]), cdf[:, :-1]], dim=1)  # (T, V) F(v - 1)
        seq_len = cdf.shape[0]
        uniforms = tail_uniforms(meta.seed, window, seq_len=seq_len, num_samples=m).sort(-1).values  # (T, m)
        draws = torch.stack(
            [torch.repeat_interleave(tail_ids[b, t], counts[b, t]) for t in range(seq_len)]
        )  # (T, m) ascending; counts sum to m (verify-cache checked it)
        below = lower.gather(1, draws) - uniforms  # > 0: u before the id's interval
        above = uniforms - cdf.gather(1, draws)  # > 0: u after it
        distance = torch.maximum(below, above).clamp(min=0.0)  # (T, m)
        # a stored tail mass of 0 (the tail underflowed in float32 when the cache was written) has
        # uniform, zero-weight draws outside the head: nothing to check against F
        distance[stored_tail[b] <= 0] = 0.0
        worst = max(worst, float(distance.max()))
        outside_draws += int((distance > cdf_slack).sum())
    return {
        **head,
        "tail_mass_max_error": tail_error,
        "tail_draws_outside_their_interval": outside_draws,
        "tail_draw_worst_distance": worst,
        "tail_cdf_slack": cdf_slack,
        "ok": head["ok"] and tail_error <= slack and outside_draws == 0,
    }


def verify_stage(config: Config, *, progress: bool | None = None) -> dict[str, Any]:
    """`pipe run`'s verify step: verify RUN/cache against RUN/data, record verify.json, raise if bad."""
    layout = RunLayout.of(config)
    remote = layout.cache_url
    report = verify(
        remote or layout.cache,
        data_dir=layout.data,
        progress=progress,
        stage_dir=layout.cache if remote else None,
    )
    report["fingerprint"] = str(cache_fingerprint(config))
    atomic_write_text(layout.verify_report, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if not report["ok"]:
        raise CacheError(f"The cache at {layout.cache} failed verification; see {layout.verify_report}.")
    return report


def is_verified(config: Config) -> bool:
    path = RunLayout.of(config).verify_report
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    return bool(report.get("ok")) and records(path, report, cache_fingerprint(config))


def is_cache_complete(config: Config) -> bool:
    return is_complete(RunLayout.of(config).cache, cache_fingerprint(config))
