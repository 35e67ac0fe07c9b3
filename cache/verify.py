"""Check a cache end to end and report per shard (the library behind ``pipe verify-cache``).

Checks: metadata present, parseable and of a known format version; the cache finalized;
alignment hashes (when given); for every shard: done flag 1, shard file present in every array,
every chunk decodes (crc32c checksums: a flipped byte or a truncated file raises on read and is
reported with the shard and array), ids in [0, vocab) and unique within a position, values in
their code's range, tail in [0, 1] and consistent with the stored entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from logitcache.cache import storage
from logitcache.cache.encoding import FLOAT_LOGP_MIN, decode_probs, mass_tolerance, value_bits, value_max
from logitcache.cache.errors import CacheError
from logitcache.cache.layout import DONE_ARRAY, STATS_ARRAY, Layout, shard_key, sharded_names
from logitcache.cache.metadata import CacheMetadata
from logitcache.cache.writer import read_attrs


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
        }


def _check_ids(gaps_or_ids: np.ndarray, values: np.ndarray, metadata: CacheMetadata) -> list[str]:
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


def _check_values(values: np.ndarray, tail: np.ndarray | None, metadata: CacheMetadata) -> list[str]:
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


def check_shard_index(blob: bytes, *, chunks_per_shard: int, chunks_expected: int) -> str | None:
    """Structural check of one shard file (zarr v3 sharding, index at the end, crc32c-protected).

    Index = ``chunks_per_shard`` pairs of little-endian uint64 (offset, nbytes), then a 4-byte
    crc32c. The writer stores every inner chunk inside the array (``write_empty_chunks``), so the
    first ``chunks_expected`` entries must all be present and lie inside the file: a truncated or
    emptied shard would otherwise read back as fill values without any error.
    """
    import crc32c

    index_bytes = 16 * chunks_per_shard
    if len(blob) < index_bytes + 4:
        return f"{len(blob)} bytes, shorter than its index ({index_bytes + 4} bytes): truncated"
    index, stored_crc = blob[-index_bytes - 4 : -4], blob[-4:]
    if crc32c.crc32c(index).to_bytes(4, "little") != stored_crc:
        return "shard index checksum mismatch"
    entries = np.frombuffer(index, dtype="<u8").reshape(chunks_per_shard, 2)
    data_end = len(blob) - index_bytes - 4
    for chunk in range(chunks_expected):
        offset, nbytes = (int(x) for x in entries[chunk])
        if offset == _EMPTY and nbytes == _EMPTY:
            return f"inner chunk {chunk} absent from the shard"
        if offset + nbytes > data_end:
            return f"inner chunk {chunk} extends past the end of the data: truncated"
    return None


def _verify_shard(
    shard: int,
    layout: Layout,
    metadata: CacheMetadata,
    arrays: dict[str, zarr.Array],
    done: np.ndarray | None,
    present: dict[str, set[str]],
    store: Store,
) -> ShardReport:
    start, stop = layout.shard_rows(shard)
    report = ShardReport(shard=shard, windows=(start, stop))
    if done is None or done[shard] != 1:
        report.problems.append("not done (done flag is 0: never fully written)")
    data: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        key = shard_key(name, shard, array.ndim)
        if key not in present[name]:
            report.problems.append(f"array '{name}': shard file {key} missing")
            continue
        blob = storage.read_bytes(store, key) or b""
        chunks_per_shard = layout.windows_per_shard // layout.windows_per_chunk
        chunks_expected = -(-(stop - start) // layout.windows_per_chunk)
        structural = check_shard_index(
            blob, chunks_per_shard=chunks_per_shard, chunks_expected=chunks_expected
        )
        if structural is not None:
            report.problems.append(f"array '{name}': shard file {key} unreadable ({structural})")
            continue
        try:
            data[name] = np.asarray(array[start:stop])
        except Exception as exc:  # noqa: BLE001 - checksum / truncation / decode errors
            report.problems.append(
                f"array '{name}': shard file {key} unreadable ({type(exc).__name__}: {exc})"
            )
    if "ids" in data and "values" in data:
        report.problems += [f"array 'ids': {p}" for p in _check_ids(data["ids"], data["values"], metadata)]
        report.problems += [
            f"array 'values': {p}" for p in _check_values(data["values"], data.get("tail"), metadata)
        ]
    return report


def verify_cache(
    store: storage.StoreLike,
    *,
    dataset_sha256: str | None = None,
    tokenizer_sha256: str | None = None,
) -> VerifyReport:
    """Verify every shard of the cache at ``store``. Never raises for a damaged cache: see ``report.ok``.

    (Raises :class:`CacheError` only when the location is a file.)
    """
    zstore = storage.resolve_store(store, read_only=True, must_exist=False)
    report = VerifyReport(location=storage.describe(zstore))
    try:
        group = zarr.open_group(zstore, mode="r")
        metadata, layout, summary = read_attrs(group)
    except CacheError as exc:
        report.problems.append(str(exc))
        return report
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"no readable cache metadata ({type(exc).__name__}: {exc})")
        return report
    report.summary = summary
    if summary is None:
        report.problems.append("cache not finalized (no 'logitcache_complete' summary)")
    for name, given, stored in (
        ("dataset_sha256", dataset_sha256, metadata.dataset_sha256),
        ("tokenizer_sha256", tokenizer_sha256, metadata.tokenizer_sha256),
    ):
        if given is not None and given != stored:
            report.problems.append(f"{name} mismatch: cache has {stored}, expected {given}")
    leftovers = [key for key in storage.list_keys(zstore) if key.endswith(".partial")]
    if leftovers:
        report.problems.append(
            f"{len(leftovers)} temporary '.partial' files left by a crash (e.g. {leftovers[0]})"
        )
    arrays: dict[str, zarr.Array] = {}
    for name in sharded_names(metadata):
        node = group.get(name)
        if isinstance(node, zarr.Array):
            arrays[name] = node
        else:
            report.problems.append(f"array '{name}' missing")
    done: np.ndarray | None = None
    done_node = group.get(DONE_ARRAY)
    if isinstance(done_node, zarr.Array):
        try:
            done = np.asarray(done_node[:])
        except Exception as exc:  # noqa: BLE001
            report.problems.append(f"done flags unreadable ({type(exc).__name__}: {exc})")
    else:
        report.problems.append("array 'done' missing")
    if group.get(STATS_ARRAY) is None:
        report.problems.append(f"array '{STATS_ARRAY}' missing")
    present = {name: set(storage.list_keys(zstore, f"{name}/c/")) for name in arrays}
    for shard in range(layout.num_shards):
        report.shards.append(_verify_shard(shard, layout, metadata, arrays, done, present, zstore))
    return report
