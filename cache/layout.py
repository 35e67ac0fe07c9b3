"""Where things live in a cache group: array names, shapes, chunk/shard grid, codecs, keys.

Group layout (see docs/cache-format.md)::

    zarr.json       group; attributes "logitcache" (metadata), "logitcache_layout",
                    and "logitcache_complete" once finalized
    ids/            (N, T, k)  uint16 | int32   sharded
    values/         (N, T, k)  see encoding     sharded
    tail/           (N, T)     float32          sharded, topk and hybrid modes
    shard_stats/    (S, 3)     float64          chunk (1, 3): positions, sum captured mass, sum entropy
    shard_digests/  (S, A, 32) uint8            chunk (1, A, 32): SHA-256 of each file of shard s
    done/           (S,)       uint8            chunk (1,): 1 once shard s is fully written

Shard ``s`` holds windows ``[s * windows_per_shard, min((s + 1) * windows_per_shard, N))`` of
every sharded array; inside it, inner chunks of ``windows_per_chunk`` windows each carry
``Blosc -> crc32c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from logitcache.cache.encoding import value_dtype
from logitcache.cache.errors import CacheError
from logitcache.cache.metadata import CacheMetadata, check_keys, parse_positive_int

METADATA_KEY: Final = "logitcache"
LAYOUT_KEY: Final = "logitcache_layout"
COMPLETE_KEY: Final = "logitcache_complete"

SHARDED_ARRAYS: Final = ("ids", "values", "tail")
DONE_ARRAY: Final = "done"
STATS_ARRAY: Final = "shard_stats"
DIGESTS_ARRAY: Final = "shard_digests"
STATS_COLUMNS: Final = ("positions", "sum_captured_mass", "sum_entropy")

# Chosen by benchmarks/bench_cache_size.py (see docs/cache-format.md, "Chunk and shard sizes"):
# inner chunks of ~1 MiB of raw ids keep random window reads cheap (one chunk decoded per window
# block), shards of ~64 MiB raw ids+values are tens of MB on disk: few files, cheap whole-shard writes.
CHUNK_TARGET_BYTES: Final = 1 << 20
SHARD_TARGET_BYTES: Final = 64 << 20


@dataclass(frozen=True)
class Layout:
    """Array shapes and the chunk/shard grid of one cache."""

    num_windows: int
    seq_len: int
    k: int
    windows_per_chunk: int
    windows_per_shard: int

    def __post_init__(self) -> None:
        for name in ("num_windows", "seq_len", "k", "windows_per_chunk", "windows_per_shard"):
            parse_positive_int(getattr(self, name), f"layout.{name}")
        if self.windows_per_shard % self.windows_per_chunk:
            raise CacheError(
                "Expected layout.windows_per_shard to be a multiple of windows_per_chunk. "
                f"Got {self.windows_per_shard} and {self.windows_per_chunk}."
            )

    @property
    def num_shards(self) -> int:
        return -(-self.num_windows // self.windows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Window range ``[start, stop)`` of shard ``shard``."""
        if not 0 <= shard < self.num_shards:
            raise CacheError(f"Expected a shard index in [0, {self.num_shards}). Got {shard}.")
        start = shard * self.windows_per_shard
        return start, min(start + self.windows_per_shard, self.num_windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_windows": self.num_windows,
            "seq_len": self.seq_len,
            "k": self.k,
            "windows_per_chunk": self.windows_per_chunk,
            "windows_per_shard": self.windows_per_shard,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Layout:
        keys = ("num_windows", "seq_len", "k", "windows_per_chunk", "windows_per_shard")
        check_keys(data, keys, keys, "cache attribute 'logitcache_layout'")
        return cls(**{key: data[key] for key in keys})


def default_layout(
    *,
    num_windows: int,
    seq_len: int,
    k: int,
    windows_per_chunk: int | None = None,
    windows_per_shard: int | None = None,
) -> Layout:
    """Layout with chunk/shard sizes from the byte targets above, unless given explicitly."""
    parse_positive_int(num_windows, "num_windows")
    parse_positive_int(seq_len, "seq_len")
    raw_window_bytes = seq_len * k * 2  # uint16 ids of one window
    if windows_per_chunk is None:
        windows_per_chunk = max(1, CHUNK_TARGET_BYTES // raw_window_bytes)
        windows_per_chunk = min(windows_per_chunk, num_windows)
    if windows_per_shard is None:
        chunks = max(1, SHARD_TARGET_BYTES // (2 * raw_window_bytes * windows_per_chunk))
        needed = -(-num_windows // windows_per_chunk)  # no shard bigger than the whole array
        windows_per_shard = windows_per_chunk * min(chunks, needed)
    return Layout(
        num_windows=num_windows,
        seq_len=seq_len,
        k=k,
        windows_per_chunk=windows_per_chunk,
        windows_per_shard=windows_per_shard,
    )


@dataclass(frozen=True)
class ArraySpec:
    """Everything zarr.create_array needs for one array of the cache."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    blosc: bool


def array_specs(metadata: CacheMetadata, layout: Layout) -> list[ArraySpec]:
    """The arrays of a cache, in creation order (``done`` last: its existence means all exist).

    ``layout.k`` is the stored width (:attr:`CacheMetadata.width`: ``k + num_samples`` in hybrid mode).
    """
    n, t, k = layout.num_windows, layout.seq_len, layout.k
    c, s = layout.windows_per_chunk, layout.windows_per_shard
    specs = [
        ArraySpec("ids", (n, t, k), np.dtype(metadata.id_dtype), (c, t, k), (s, t, k), True),
        ArraySpec("values", (n, t, k), value_dtype(metadata.encoding.value_code), (c, t, k), (s, t, k), True),
    ]
    if metadata.has_tail:
        specs.append(ArraySpec("tail", (n, t), np.dtype("float32"), (c, t), (s, t), True))
    specs.append(ArraySpec(STATS_ARRAY, (layout.num_shards, 3), np.dtype("float64"), (1, 3), None, False))
    width = len(digested_names(metadata))
    digests = ArraySpec(
        DIGESTS_ARRAY, (layout.num_shards, width, 32), np.dtype("uint8"), (1, width, 32), None, False
    )
    specs.append(digests)
    specs.append(ArraySpec(DONE_ARRAY, (layout.num_shards,), np.dtype("uint8"), (1,), None, False))
    return specs


def sharded_names(metadata: CacheMetadata) -> tuple[str, ...]:
    return ("ids", "values", "tail") if metadata.has_tail else ("ids", "values")


def digested_names(metadata: CacheMetadata) -> tuple[str, ...]:
    """The arrays whose shard-``s`` file ``shard_digests[s]`` records, in column order."""
    return (*sharded_names(metadata), STATS_ARRAY)


def array_ndim(name: str) -> int:
    return {"ids": 3, "values": 3, "tail": 2, STATS_ARRAY: 2, DIGESTS_ARRAY: 3, DONE_ARRAY: 1}[name]


def chunk_key(name: str, shard: int) -> str:
    """Store key of the file holding shard ``shard``'s rows of array ``name`` (any array of the cache)."""
    return shard_key(name, shard, array_ndim(name))


def shard_key(name: str, shard: int, ndim: int) -> str:
    """Store key of shard ``shard`` of array ``name`` (default v3 chunk key encoding, '/')."""
    return "/".join([name, "c", str(shard)] + ["0"] * (ndim - 1))
