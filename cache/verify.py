"""Check every byte of a cache and report per shard (the library behind ``pipe verify-cache``).

Both passes (``quick=True`` stops after them):

* every metadata document: the root ``zarr.json`` parses, holds known metadata, layout and summary
  keys, and matches the digest it records of itself; every array's ``zarr.json`` parses, has the
  shape, dtype and chunks the layout implies, and matches the digest the summary records;
* the set of files: every expected file present, nothing else (extra files, crash leftovers);
* per shard: done flag 1; the ``shard_stats`` row readable, its digest matching, its position
  count exact; every shard file's size and index (crc32c, every inner chunk present, the chunks
  tiling the file exactly: a truncated or extended file is caught from the index alone);
* the summary agrees with the shard stats and the stored sizes.

The full pass then reads every shard file whole: its SHA-256 bound to (array, shard) must match
``shard_digests`` (so moved or swapped files with valid checksums are caught), every chunk decodes
(crc32c), ids in [0, vocab) and unique within a position, values in their code's range, tail in
[0, 1] and consistent with the stored entries, the stats' captured mass equal to the tail's; in
hybrid mode the head segment as topk, the tail draws as sampled (counts summing to m), and no
drawn id inside its position's head.

Caches written before the integrity records existed (no ``integrity`` in the summary) get every
check but the digests, and a note saying so. What no check here can catch: a consistent rewrite
(valid checksums and digests recomputed for wrong numbers); ``pipe verify-cache --recompute``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store, SuffixByteRequest
from zarr.core.buffer.core import default_buffer_prototype
from zarr.core.sync import sync

from logitcache.cache import storage
from logitcache.cache.encoding import (
    FLOAT_LOGP_MIN,
    decode_probs,
    mass_tolerance,
    split_hybrid,
    value_bits,
    value_max,
)
from logitcache.cache.errors import CacheError
from logitcache.cache.hashing import document_sha256, shard_file_sha256
from logitcache.cache.layout import (
    DIGESTS_ARRAY,
    DONE_ARRAY,
    STATS_ARRAY,
    ArraySpec,
    Layout,
    array_specs,
    chunk_key,
    digested_names,
    sharded_names,
)
from logitcache.cache.metadata import CacheMetadata, parse_sha256
from logitcache.cache.writer import INTEGRITY_KEY, read_attrs


@dataclass
class ShardReport:
    shard: int
    windows: tuple[int, int]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "windows": list(self.windows),
            "ok": self.ok,
            "problems": list(self.problems),
        }


@dataclass
class VerifyReport:
    location: str
    problems: list[str] = field(default_factory=list)  # cache-level problems
    shards: list[ShardReport] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why
    quick: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and all(shard.ok for shard in self.shards)

    @property
    def bad_shards(self) -> list[int]:
        return [shard.shard for shard in self.shards if not shard.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "ok": self.ok,
            "problems": list(self.problems),
            "bad_shards": self.bad_shards,
            "shards": [shard.to_dict() for shard in self.shards],
            "summary": self.summary,
            "notes": list(self.notes),
            "pass": "quick" if self.quick else "full",
        }


def _check_ids(gaps_or_ids: np.ndarray, values: np.ndarray, metadata: CacheMetadata) -> list[str]:
    if metadata.mode == "hybrid":
        return _check_hybrid_ids(gaps_or_ids, values, metadata)
    problems = []
    raw = gaps_or_ids.astype(np.int64)  # (R, T, k)
    if raw.min(initial=0) < 0:
        problems.append("negative ids")
    if metadata.encoding.id_code == "sorted_gaps":
        ids = np.cumsum(raw, axis=-1)
        later = raw[..., 1:]  # gaps after the first slot
        if metadata.mode == "topk":
            if (later < 1).any():
                problems.append("repeated ids within a position")
        else:
            padding = later == 0
            # padding only at the end, and only with count 0
            if (padding[..., :-1] & ~padding[..., 1:]).any():
                problems.append("repeated ids within a position (padding followed by entries)")
            if (values[..., 1:][padding] != 0).any():
                problems.append("padding slots with a non-zero count")
    else:
        ids = raw
        ordered = np.sort(ids, axis=-1)
        if (ordered[..., 1:] == ordered[..., :-1]).any():
            problems.append("repeated ids within a position")
    if ids.max(initial=0) >= metadata.vocab_size:
        problems.append(f"ids >= vocab_size {metadata.vocab_size} (max {int(ids.max())})")
    return problems


def _check_hybrid_ids(gaps: np.ndarray, values: np.ndarray, metadata: CacheMetadata) -> list[str]:
    """Hybrid mode: the head slots as a topk cache's, the tail slots as a sampled cache's (each
    segment its own sorted gaps), and no drawn tail id inside the head."""
    head_gaps, tail_gaps = split_hybrid(gaps.astype(np.int64), metadata)
    counts = split_hybrid(values, metadata)[1]
    problems = []
    if min(head_gaps.min(initial=0), tail_gaps.min(initial=0)) < 0:
        problems.append("negative ids")
    if (head_gaps[..., 1:] < 1).any():
        problems.append("repeated ids within a position's head")
    padding = tail_gaps[..., 1:] == 0
    if (padding[..., :-1] & ~padding[..., 1:]).any():
        problems.append("repeated ids within a position's tail draws (padding followed by entries)")
    if (counts[..., 1:][padding] != 0).any():
        problems.append("tail padding slots with a non-zero count")
    head, drawn = np.cumsum(head_gaps, axis=-1), np.cumsum(tail_gaps, axis=-1)
    top = max(int(head.max(initial=0)), int(drawn.max(initial=0)))
    if top >= metadata.vocab_size:
        problems.append(f"ids >= vocab_size {metadata.vocab_size} (max {top})")
    elif not problems:
        # key every id by its position so that one isin over the shard compares within positions
        position = np.arange(head.shape[0] * head.shape[1], dtype=np.int64).reshape(head.shape[:2] + (1,))
        real = counts > 0
        if np.isin(
            (drawn + position * metadata.vocab_size)[real], head + position * metadata.vocab_size
        ).any():
            problems.append("tail draws of ids inside the head (they must come from outside it)")
    return problems


def _check_values(values: np.ndarray, tail: np.ndarray | None, metadata: CacheMetadata) -> list[str]:
    if metadata.mode == "hybrid":
        head, counts = split_hybrid(values, metadata)
        problems = _check_values(head, tail, dataclasses.replace(metadata, mode="topk", num_samples=None))
        if counts.max(initial=0) > metadata.num_samples:
            problems.append(f"tail counts above num_samples={metadata.num_samples} (max {int(counts.max())})")
        elif (counts.astype(np.int64).sum(axis=-1) != metadata.num_samples).any():
            problems.append(f"tail counts that do not sum to num_samples={metadata.num_samples}")
        return problems
    problems = []
    code = metadata.encoding.value_code
    if code in ("logp_fp16", "logp_fp32", "logp_bf16"):
        if code == "logp_bf16":
            raw_logp = (values.astype(np.uint32) << 16).view(np.float32)
        else:
            raw_logp = values.astype(np.float32)
        if not np.isfinite(raw_logp).all():
            problems.append("non-finite values")
        elif (raw_logp > 0).any() or (raw_logp < FLOAT_LOGP_MIN).any():
            problems.append(f"log-probabilities outside [{FLOAT_LOGP_MIN}, 0]")
    else:
        limit = value_max(code, num_samples=metadata.num_samples)
        if values.max(initial=0) > limit:
            problems.append(f"values above the code's maximum {int(limit)} (max {int(values.max())})")
    if code.startswith("ratio_q"):
        levels = (1 << value_bits(code)) - 1
        if (values.max(axis=-1) != levels).any():
            problems.append(f"positions whose largest value is not {levels} (ratio code: top entry must be)")
    if code == "count" and not problems:
        sums = values.astype(np.int64).sum(axis=-1)
        if (sums != metadata.num_samples).any():
            problems.append(f"counts that do not sum to num_samples={metadata.num_samples}")
    if metadata.mode == "topk":
        if tail is None:
            pass  # missing / unreadable tail shard: reported by the caller
        elif not np.isfinite(tail).all() or (tail < 0).any() or (tail > 1).any():
            problems.append("tail mass outside [0, 1] or non-finite")
        elif not problems:
            tolerance = mass_tolerance(metadata)
            if tolerance is not None:
                probs = decode_probs(values, value_code=code, logp_floor=metadata.encoding.logp_floor)
                error = np.abs(probs.astype(np.float64).sum(-1) + tail.astype(np.float64) - 1.0)
                if error.max(initial=0) > tolerance:
                    problems.append(
                        f"stored entries + tail differ from 1 by {float(error.max()):.3g} (> tolerance {tolerance:.3g})"
                    )
    return problems


_EMPTY = (1 << 64) - 1  # sharding index entry of an absent inner chunk
SUMMARY_KEYS = (
    "num_shards",
    "positions",
    "stored_bytes",
    "bytes_per_position",
    "mean_captured_mass",
    "mean_teacher_entropy",
)
INTEGRITY_KEYS = ("array_metadata_sha256", "zarr_json_sha256")


def check_shard_index(
    index_and_crc: bytes, *, file_size: int, chunks_per_shard: int, chunks_expected: int
) -> str | None:
    """Structural check of one shard file from its index alone (zarr v3 sharding, index at the end).

    Index = ``chunks_per_shard`` pairs of little-endian uint64 (offset, nbytes), then a 4-byte
    crc32c; ``index_and_crc`` is the last ``16 * chunks_per_shard + 4`` bytes of the file. The
    writer stores every inner chunk inside the array (``write_empty_chunks``) back to back, so the
    first ``chunks_expected`` entries must be present, the others absent, and the present ones
    must tile ``[0, data end)`` exactly: a truncated, emptied or extended file fails here, without
    reading its data.
    """
    import crc32c

    index_bytes = 16 * chunks_per_shard
    if file_size < index_bytes + 4 or len(index_and_crc) != index_bytes + 4:
        return f"{file_size} bytes, shorter than its index ({index_bytes + 4} bytes): truncated"
    index, stored_crc = index_and_crc[:-4], index_and_crc[-4:]
    if crc32c.crc32c(index).to_bytes(4, "little") != stored_crc:
        return "shard index checksum mismatch (truncated, or a flipped bit in the index)"
    entries = np.frombuffer(index, dtype="<u8").reshape(chunks_per_shard, 2)
    spans = []
    for chunk in range(chunks_per_shard):
        offset, nbytes = (int(x) for x in entries[chunk])
        absent = offset == _EMPTY and nbytes == _EMPTY
        if chunk < chunks_expected and absent:
            return f"inner chunk {chunk} absent from the shard"
        if chunk >= chunks_expected and not absent:
            return f"inner chunk {chunk} present beyond the end of the array"
        if not absent:
            spans.append((offset, nbytes, chunk))
    position = 0
    for offset, nbytes, chunk in sorted(spans):
        if offset != position:
            return f"inner chunk {chunk} starts at byte {offset}, expected {position}: truncated or rewritten"
        position = offset + nbytes
    data_end = file_size - index_bytes - 4
    if position != data_end:
        return f"the chunks end at byte {position} but the data at {data_end}: truncated or extended"
    return None


def _read_suffix(store: Store, key: str, nbytes: int) -> bytes:
    buffer = sync(store.get(key, prototype=default_buffer_prototype(), byte_range=SuffixByteRequest(nbytes)))
    return b"" if buffer is None else bytes(buffer.to_bytes())


@dataclass
class _Context:
    """What every shard's check needs: the store, what it should hold, the arrays that opened."""

    store: Store
    metadata: CacheMetadata
    layout: Layout
    keys: set[str]
    arrays: dict[str, zarr.Array]
    digests: bool  # the cache records shard digests (written with integrity records)
    quick: bool


def _where(name: str, key: str, rows: tuple[int, int]) -> str:
    return f"array '{name}', file {key}, windows {rows[0]}..{rows[1] - 1}"


def _read_row(ctx: _Context, name: str, shard: int, report: ShardReport) -> np.ndarray | None:
    """Row ``shard`` of an unsharded per-shard array (done, shard_stats, shard_digests), or None."""
    array, key = ctx.arrays.get(name), chunk_key(name, shard)
    if array is None:
        return None  # the array's zarr.json is damaged: reported once for the cache
    if key not in ctx.keys:
        report.problems.append(f"{_where(name, key, report.windows)}: missing")
        return None
    try:
        return np.asarray(array[shard])
    except Exception as exc:  # noqa: BLE001 - checksum / truncation / decode errors
        report.problems.append(
            f"{_where(name, key, report.windows)}: unreadable ({type(exc).__name__}: {exc})"
        )
        return None


def _verify_shard(ctx: _Context, shard: int) -> tuple[ShardReport, np.ndarray | None, dict[str, int]]:
    """Check shard ``shard`` of every array. Returns the report, its stats row and its file sizes."""
    layout, metadata = ctx.layout, ctx.metadata
    start, stop = layout.shard_rows(shard)
    report = ShardReport(shard=shard, windows=(start, stop))
    flag = _read_row(ctx, DONE_ARRAY, shard, report)
    if flag is not None and int(flag) != 1:
        report.problems.append(
            f"{_where(DONE_ARRAY, chunk_key(DONE_ARRAY, shard), (start, stop))}: not done (flag {int(flag)})"
        )
    elif flag is None and ctx.arrays.get(DONE_ARRAY) is not None and report.problems:
        report.problems[-1] += " (so the shard is not done)"
    stats = _read_row(ctx, STATS_ARRAY, shard, report)
    stats_where = _where(STATS_ARRAY, chunk_key(STATS_ARRAY, shard), (start, stop))
    positions = (stop - start) * layout.seq_len
    if stats is not None:
        if stats.shape != (3,) or not np.isfinite(stats).all():
            report.problems.append(f"{stats_where}: not 3 finite numbers ({stats.tolist()})")
            stats = None
        # entropy: float32 rounding can leave a near-deterministic position a hair below 0
        elif stats[0] != positions or not 0 <= stats[1] <= positions or stats[2] < -1e-4 * positions:
            report.problems.append(
                f"{stats_where}: positions {stats[0]:g}, captured mass {stats[1]:g}, entropy {stats[2]:g}; "
                f"expected {positions} positions, 0 <= captured mass <= positions, entropy >= ~0"
            )
    recorded = _read_row(ctx, DIGESTS_ARRAY, shard, report) if ctx.digests else None
    chunks_per_shard = layout.windows_per_shard // layout.windows_per_chunk
    chunks_expected = -(-(stop - start) // layout.windows_per_chunk)
    index_len = 16 * chunks_per_shard + 4
    sizes: dict[str, int] = {}
    data: dict[str, np.ndarray] = {}
    for column, name in enumerate(digested_names(metadata)):
        key = chunk_key(name, shard)
        where = _where(name, key, (start, stop))
        if name not in ctx.arrays or key not in ctx.keys:
            if name in ctx.arrays and name != STATS_ARRAY:  # a missing stats file is reported above
                report.problems.append(f"{where}: missing")
            continue
        whole = name == STATS_ARRAY or not ctx.quick  # stats files are tiny: always read whole
        blob = storage.read_bytes(ctx.store, key) if whole else None
        if name != STATS_ARRAY:
            size = len(blob) if blob is not None else storage.key_size(ctx.store, key) or 0
            sizes[name] = size
            if blob is not None:
                tail_bytes = blob[-index_len:] if len(blob) >= index_len else b""
            else:
                tail_bytes = _read_suffix(ctx.store, key, index_len) if size >= index_len else b""
            structural = check_shard_index(
                tail_bytes, file_size=size, chunks_per_shard=chunks_per_shard, chunks_expected=chunks_expected
            )
            if structural is not None:
                report.problems.append(f"{where}: unreadable ({structural})")
                continue
        if blob is not None and recorded is not None:
            if shard_file_sha256(name, shard, blob) != recorded[column].tobytes():
                report.problems.append(
                    f"{where}: bytes differ from the digest recorded when the shard was written "
                    "(damaged, or a file moved, swapped or rewritten)"
                )
                continue
        if ctx.quick or name == STATS_ARRAY:
            continue
        try:
            data[name] = np.asarray(ctx.arrays[name][start:stop])
        except Exception as exc:  # noqa: BLE001 - checksum / truncation / decode errors
            report.problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
    if "ids" in data and "values" in data:
        rows = (start, stop)
        report.problems += [
            f"{_where('ids', chunk_key('ids', shard), rows)}: {p}"
            for p in _check_ids(data["ids"], data["values"], metadata)
        ]
        report.problems += [
            f"{_where('values', chunk_key('values', shard), rows)}: {p}"
            for p in _check_values(data["values"], data.get("tail"), metadata)
        ]
    if stats is not None and not ctx.quick:
        captured: float | None = float(positions)
        if metadata.has_tail:  # the writer's own expression: bit-identical on the same tail
            captured = float((1.0 - data["tail"].astype(np.float64)).sum()) if "tail" in data else None
        if captured is not None and stats[1] != captured:
            report.problems.append(
                f"{stats_where}: captured mass {stats[1]!r} differs from the stored tail's {captured!r}"
            )
    return report, stats, sizes


def _check_integrity(raw: bytes, summary: dict[str, Any], report: VerifyReport) -> dict[str, Any] | None:
    """The summary's integrity record, checked against the root document's bytes (None if absent/bad)."""
    integrity = summary.get(INTEGRITY_KEY)
    if integrity is None:
        report.notes.append(
            "written before integrity records existed: no digests of the metadata documents or of the "
            "shard files, so a changed metadata value or a moved/swapped shard file with valid checksums "
            "cannot be detected (every other check ran); rebuild the cache to get them"
        )
        return None
    try:
        if not isinstance(integrity, dict) or sorted(integrity) != sorted(INTEGRITY_KEYS):
            raise CacheError(f"Expected the keys {list(INTEGRITY_KEYS)}. Got {integrity!r}.")
        recorded = parse_sha256(integrity["zarr_json_sha256"], "integrity.zarr_json_sha256")
        documents = integrity["array_metadata_sha256"]
        if not isinstance(documents, dict):
            raise CacheError(f"Expected array_metadata_sha256 to be an object. Got {documents!r}.")
        for key, value in documents.items():
            parse_sha256(value, f"integrity.array_metadata_sha256[{key!r}]")
    except CacheError as exc:
        report.problems.append(f"zarr.json: summary 'integrity' damaged ({exc})")
        return None
    if document_sha256(raw, recorded) != recorded:
        report.problems.append(
            "zarr.json: bytes differ from the digest the document records of itself "
            "(the group metadata changed after the cache was finalized)"
        )
    return integrity


def _check_summary_keys(summary: dict[str, Any], report: VerifyReport) -> bool:
    if not isinstance(summary, dict):
        report.problems.append(f"zarr.json: summary 'logitcache_complete' is not an object ({summary!r})")
        return False
    unknown = sorted(set(summary) - set(SUMMARY_KEYS) - {INTEGRITY_KEY})
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    if unknown or missing:
        report.problems.append(
            f"zarr.json: summary 'logitcache_complete' has unknown keys {unknown} / lacks {missing}"
        )
        return False
    return True


def _check_summary_values(
    summary: dict[str, Any], layout: Layout, stats: np.ndarray, stored: int | None, report: VerifyReport
) -> None:
    """The summary must say what finalize computes from the shard stats and stored sizes."""
    positions = int(stats[:, 0].sum())
    expected: dict[str, Any] = {
        "num_shards": layout.num_shards,
        "positions": layout.num_windows * layout.seq_len,
        "mean_captured_mass": float(stats[:, 1].sum() / max(positions, 1)),
        "mean_teacher_entropy": float(stats[:, 2].sum() / max(positions, 1)),
    }
    if stored is not None:
        expected |= {"stored_bytes": stored, "bytes_per_position": stored / max(positions, 1)}
    for key, want in expected.items():
        got = summary.get(key)
        same = (
            got == want
            if isinstance(want, int)
            else isinstance(got, int | float) and math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)
        )
        if not same or isinstance(got, bool):
            report.problems.append(
                f"zarr.json: summary '{key}' is {got!r}, but the shard stats and files give {want!r}"
            )


def _spec_mismatch(array: zarr.Array, spec: ArraySpec) -> str | None:
    got = (tuple(array.shape), np.dtype(array.dtype), tuple(array.chunks), array.shards)
    want = (spec.shape, spec.dtype, spec.chunks, spec.shards)
    if got != want:
        return f"shape, dtype, chunks, shards {got}; the layout implies {want}"
    return None


def verify_cache(
    store: storage.StoreLike,
    *,
    dataset_sha256: str | None = None,
    tokenizer_sha256: str | None = None,
    quick: bool = False,
) -> VerifyReport:
    """Verify the cache at ``store`` (see the module docstring; ``quick``: skip reading shard data).

    Never raises for a damaged cache, however damaged: see ``report.ok``, ``report.problems``
    (cache-level, each naming its file) and ``report.shards`` (each naming array, file and windows).
    (Raises :class:`CacheError` only when the location is a file.)
    """
    zstore = storage.resolve_store(store, read_only=True, must_exist=False)
    report = VerifyReport(location=storage.describe(zstore), quick=quick)
    try:
        _verify(zstore, report, dataset_sha256=dataset_sha256, tokenizer_sha256=tokenizer_sha256)
    except Exception as exc:  # noqa: BLE001 - damage no check above foresaw is still a finding
        report.problems.append(
            f"verification stopped by damage it could not parse ({type(exc).__name__}: {exc})"
        )
    return report


def _verify(
    zstore: Store, report: VerifyReport, *, dataset_sha256: str | None, tokenizer_sha256: str | None
) -> None:
    keys = set(storage.list_keys(zstore)) if not storage.is_empty(zstore) else set()
    leftovers = sorted(key for key in keys if key.endswith(".partial"))
    if leftovers:
        report.problems.append(
            f"{len(leftovers)} temporary '.partial' files left by a crash (e.g. {leftovers[0]})"
        )
    raw = storage.read_bytes(zstore, "zarr.json")
    if raw is None:
        report.problems.append("zarr.json: missing (no cache group at this location)")
        return
    try:
        json.loads(raw)
    except ValueError as exc:
        report.problems.append(f"zarr.json: not valid JSON ({exc}): the group metadata is damaged")
        return
    try:
        group = zarr.open_group(zstore, mode="r")
        metadata, layout, summary = read_attrs(group)
    except CacheError as exc:
        report.problems.append(f"zarr.json: {exc}")
        return
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"zarr.json: no readable cache metadata ({type(exc).__name__}: {exc})")
        return
    report.summary = summary
    integrity = None
    if summary is None:
        report.problems.append("zarr.json: cache not finalized (no 'logitcache_complete' summary)")
    elif _check_summary_keys(summary, report):
        integrity = _check_integrity(raw, summary, report)
    for name, given, stored in (
        ("dataset_sha256", dataset_sha256, metadata.dataset_sha256),
        ("tokenizer_sha256", tokenizer_sha256, metadata.tokenizer_sha256),
    ):
        if given is not None and given != stored:
            report.problems.append(f"{name} mismatch: cache has {stored}, expected {given}")

    with_digests = integrity is not None or f"{DIGESTS_ARRAY}/zarr.json" in keys
    specs = [s for s in array_specs(metadata, layout) if with_digests or s.name != DIGESTS_ARRAY]
    expected = {"zarr.json"} | {f"{s.name}/zarr.json" for s in specs}
    expected |= {chunk_key(s.name, shard) for s in specs for shard in range(layout.num_shards)}
    extra = sorted(keys - expected - set(leftovers))
    if extra:
        shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
        report.problems.append(f"{len(extra)} files that are not part of the cache: {shown}")

    documents = integrity["array_metadata_sha256"] if integrity is not None else None
    if documents is not None:
        unknown = sorted(set(documents) - {f"{s.name}/zarr.json" for s in specs})
        if unknown:
            report.problems.append(f"zarr.json: summary 'integrity' names unknown documents {unknown}")
    arrays: dict[str, zarr.Array] = {}
    for spec in specs:
        key = f"{spec.name}/zarr.json"
        where = f"array '{spec.name}', file {key}"
        doc = storage.read_bytes(zstore, key)
        if doc is None:
            report.problems.append(f"{where}: missing")
            continue
        if documents is not None and documents.get(key) != hashlib.sha256(doc).hexdigest():
            report.problems.append(f"{where}: bytes differ from the digest recorded at finalize")
            continue
        try:
            node = zarr.open_array(zstore, path=spec.name, mode="r")
            mismatch = _spec_mismatch(node, spec)
        except Exception as exc:  # noqa: BLE001 - a damaged array document is a finding
            report.problems.append(f"{where}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if mismatch is not None:
            report.problems.append(f"{where}: {mismatch}")
            continue
        arrays[spec.name] = node

    ctx = _Context(zstore, metadata, layout, keys, arrays, digests=with_digests, quick=report.quick)
    stats_rows: list[np.ndarray | None] = []
    stored: int | None = 0
    for shard in range(layout.num_shards):
        shard_report, stats, sizes = _verify_shard(ctx, shard)
        report.shards.append(shard_report)
        stats_rows.append(stats)
        if stored is not None and len(sizes) == len(sharded_names(metadata)):
            stored += sum(sizes.values())
        else:
            stored = None
    if summary is not None and isinstance(summary, dict) and all(row is not None for row in stats_rows):
        _check_summary_values(summary, layout, np.stack(stats_rows), stored, report)  # type: ignore[arg-type]
