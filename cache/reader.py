"""Open a finished cache and read batches of windows as torch tensors (the student's loader API).

    reader = open_cache(path_or_store)
    reader.check_compatible(tokenizer_sha256=..., dataset_sha256=..., vocab_size=...)
    batch = reader.read_windows([3, 17, 42])          # or a slice; weights="renormalized" | "ghost"
    batch.ids      # (B, T, k) int64, valid token ids (padding slots repeat an id with weight 0)
    batch.weights  # (B, T, k) float32 teacher probabilities the loss consumes
    batch.tail     # (B, T) float32 in ghost mode (weights + tail == 1), else None

Entries come back in storage order: ascending id (``sorted_gaps``) or rank order (``rank``).
For throughput, read aligned blocks of ``layout.windows_per_chunk`` windows (one decoded chunk
each) and shuffle inside a buffer of blocks; scattered single windows decode a whole chunk each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from logitcache.cache import storage
from logitcache.cache.encoding import decode_entries
from logitcache.cache.errors import CacheError
from logitcache.cache.layout import DONE_ARRAY, Layout, shard_key, sharded_names
from logitcache.cache.metadata import CacheMetadata
from logitcache.cache.writer import read_attrs


@dataclass(frozen=True)
class CacheBatch:
    """Teacher targets for B windows."""

    window_indices: torch.Tensor  # (B,) int64
    ids: torch.Tensor  # (B, T, k) int64
    weights: torch.Tensor  # (B, T, k) float32
    tail: torch.Tensor | None  # (B, T) float32, ghost mode only


WindowSelection = slice | Sequence[int] | np.ndarray | torch.Tensor


class CacheReader:
    """A finished, complete cache. Create with :func:`open_cache`."""

    def __init__(
        self, store: Any, group: zarr.Group, metadata: CacheMetadata, layout: Layout, summary: dict[str, Any]
    ):
        self.store = store
        self.metadata = metadata
        self.layout = layout
        self.summary = summary
        self._arrays: dict[str, zarr.Array] = {}
        for name in sharded_names(metadata):
            node = group[name]
            if not isinstance(node, zarr.Array):
                raise CacheError(f"Expected '{name}' to be an array. Got a group: the cache is damaged.")
            self._arrays[name] = node

    @property
    def num_windows(self) -> int:
        return self.layout.num_windows

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    @property
    def k(self) -> int:
        return self.layout.k

    def check_compatible(
        self,
        *,
        tokenizer_sha256: str | None = None,
        dataset_sha256: str | None = None,
        vocab_size: int | None = None,
        num_windows: int | None = None,
        seq_len: int | None = None,
    ) -> None:
        """Raise :class:`CacheError` naming the first given property that does not match."""
        checks = [
            ("tokenizer_sha256", tokenizer_sha256, self.metadata.tokenizer_sha256, "the tokenizer"),
            ("dataset_sha256", dataset_sha256, self.metadata.dataset_sha256, "the prepared windows"),
            ("vocab_size", vocab_size, self.metadata.vocab_size, "the vocabulary"),
            ("num_windows", num_windows, self.layout.num_windows, "the prepared windows"),
            ("seq_len", seq_len, self.layout.seq_len, "the prepared windows"),
        ]
        for name, given, stored, what in checks:
            if given is not None and given != stored:
                raise CacheError(
                    f"Expected the cache's {name} to match {what} in use ({given}). Got {stored}. "
                    "Rebuild the cache for this dataset/tokenizer, or point to the matching cache."
                )

    def _rows(self, windows: WindowSelection) -> tuple[Any, np.ndarray, np.ndarray | None]:
        """(zarr selection, window indices, inverse permutation or None)."""
        if isinstance(windows, slice):
            start, stop, step = windows.indices(self.num_windows)
            if step != 1:
                raise CacheError(f"Expected a contiguous slice of windows. Got step {step}.")
            return slice(start, stop), np.arange(start, stop, dtype=np.int64), None
        index = np.asarray(
            windows.cpu() if isinstance(windows, torch.Tensor) else windows, dtype=np.int64
        ).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.num_windows):
            raise CacheError(
                f"Expected window indices in [0, {self.num_windows}). Got [{index.min()}, {index.max()}]."
            )
        unique, inverse = np.unique(index, return_inverse=True)
        return unique, index, inverse

    def read_raw(self, windows: WindowSelection) -> dict[str, np.ndarray]:
        """The stored (encoded) arrays for ``windows``, as zarr returns them."""
        selection, _, inverse = self._rows(windows)
        out: dict[str, np.ndarray] = {}
        for name, array in self._arrays.items():
            try:
                data = array[selection] if isinstance(selection, slice) else array.oindex[selection]
            except Exception as exc:  # noqa: BLE001 - a checksum / decode failure names the array
                raise CacheError(
                    f"Expected readable data in array '{name}' of the cache. Got {type(exc).__name__}: {exc}. "
                    "Run `pipe verify-cache` to locate the damaged shard."
                ) from exc
            out[name] = np.asarray(data) if inverse is None else np.asarray(data)[inverse]
        return out

    def read_windows(self, windows: WindowSelection, *, weights: str = "renormalized") -> CacheBatch:
        """Teacher ids and weights for ``windows`` (a slice or a list of indices, any order).

        ``weights="renormalized"``: weights over the stored entries sum to 1, ``tail`` None.
        ``weights="ghost"`` (topk only): weights sum to ``1 - tail`` and ``tail`` is returned.
        """
        _, index, _ = self._rows(windows)
        raw = self.read_raw(windows)
        decoded = decode_entries(raw["ids"], raw["values"], raw.get("tail"), self.metadata, weights=weights)
        return CacheBatch(
            window_indices=torch.from_numpy(index),
            ids=torch.from_numpy(decoded.ids),
            weights=torch.from_numpy(decoded.weights),
            tail=None if decoded.tail is None else torch.from_numpy(decoded.tail),
        )


def open_cache(store: storage.StoreLike, *, verify: bool = True) -> CacheReader:
    """Open a complete cache for reading.

    Refuses (``CacheError``): a missing path or a file; no logitcache metadata; an unknown
    ``format_version``; an unfinished cache (no ``logitcache_complete`` summary, or any done flag
    0); a shard file missing from the store (zarr would silently read it as zeros); and, with
    ``verify`` (the default), any failure of ``verify_cache(quick=True)``: metadata documents and
    their digests, the set of files, every shard index and digest record (an emptied or truncated
    shard, a damaged summary). That reads no shard data (about 0.02 s on the demo cache); a chunk
    damaged inside is found when it is read (its checksum), or by the full ``verify_cache``.
    ``verify=False`` is for a process that reopens a cache another one verified (loader workers).
    """
    zstore = storage.resolve_store(store, read_only=True, must_exist=True)
    try:
        reader = _open(zstore)
    except CacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - damage the checks below did not foresee
        if verify:
            refuse_unless_intact(zstore)  # names the damaged file
        raise CacheError(
            f"Expected a readable cache at {storage.describe(zstore)}. Got {type(exc).__name__}: {exc}. "
            "Run `pipe verify-cache` on it."
        ) from None
    if verify:
        refuse_unless_intact(zstore)
    return reader


def _open(zstore: Any) -> CacheReader:
    try:
        group = zarr.open_group(zstore, mode="r")
    except Exception:  # noqa: BLE001
        raise CacheError(
            f"Expected a logit cache (zarr v3 group) at {storage.describe(zstore)}. Got none. "
            "Run `pipe cache-logits` first."
        ) from None
    metadata, layout, summary = read_attrs(group)
    if summary is None:
        raise CacheError(
            f"Expected a complete cache at {storage.describe(zstore)}. Got an unfinished one. "
            "Rerun `pipe cache-logits` with the same config to finish it."
        )
    done_node = group.get(DONE_ARRAY)
    if not isinstance(done_node, zarr.Array):
        raise CacheError("Expected a 'done' array in the cache. Got none: the cache is damaged.")
    try:
        done = np.asarray(done_node[:])
    except Exception as exc:  # noqa: BLE001
        raise CacheError(f"Expected readable done flags. Got {type(exc).__name__}: {exc}.") from exc
    if done.shape != (layout.num_shards,) or not bool((done == 1).all()):
        pending = [int(s) for s in np.flatnonzero(done != 1)][:10]
        raise CacheError(
            f"Expected every shard to be done. Got shards {pending} not done. The cache is incomplete or damaged: "
            "run `pipe verify-cache`, then rerun `pipe cache-logits`."
        )
    for name in sharded_names(metadata):
        ndim = 3 if name != "tail" else 2
        present = set(storage.list_keys(zstore, f"{name}/c/"))
        missing = [s for s in range(layout.num_shards) if shard_key(name, s, ndim) not in present]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CacheError(
                f"Expected every shard file of array '{name}'. Got {shard_key(name, missing[0], ndim)}{more} "
                f"missing (shards {missing[:10]}; they would read back as zeros). Run `pipe verify-cache` "
                "and rebuild the cache."
            )
    return CacheReader(zstore, group, metadata, layout, summary)


def refuse_unless_intact(store: storage.StoreLike) -> None:
    """Raise a one-line :class:`CacheError` naming the first problem ``verify_cache(quick=True)`` finds."""
    from logitcache.cache.verify import verify_cache  # verify reads through this module's peers

    report = verify_cache(store, quick=True)
    if report.ok:
        return
    first = ([p for shard in report.shards for p in shard.problems] or report.problems)[0]  # names a file
    damaged = f" (damaged shards {report.bad_shards})" if report.bad_shards else ""
    raise CacheError(
        f"Expected an intact cache at {report.location}. Got: {first}{damaged}. Run `pipe verify-cache` on "
        "it for the full list; rebuild it with `pipe cache-logits CONFIG --overwrite`."
    )
