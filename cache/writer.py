"""Create (or resume) a cache and write it one whole shard at a time.

Protocol (one process, or ``world_size`` ranks under torchrun)::

    writer = create_cache(path, metadata, num_windows=N, seq_len=T)   # rank 0 only, then barrier
    writer = open_cache_writer(path, metadata=metadata)               # ranks != 0, after the barrier
    for s in writer.pending_shards(rank=rank, world_size=world_size):
        start, stop = writer.shard_rows(s)
        selection = ...  # Topk/Sampled/HybridSelection for windows [start, stop)
        writer.write_shard(s, selection)
    # barrier
    if rank == 0:
        writer.finalize()

Why whole shards: zarr re-reads and rewrites a shard on every partial write (11-38x slower), and
two processes writing parts of one shard lose updates. Shard ``s`` belongs to rank
``s % world_size``. ``done[s]`` (its own tiny chunk file) is set only after shard ``s`` of every
array is written, so after a crash (even ``kill -9``) rerunning the same job rewrites exactly the
shards whose flag is 0 and produces the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any, Final

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import LocalStore

from logitcache.cache import storage
from logitcache.cache.encoding import encode_entries
from logitcache.cache.errors import CacheError
from logitcache.cache.hashing import document_sha256, shard_file_sha256
from logitcache.cache.layout import (
    COMPLETE_KEY,
    DIGESTS_ARRAY,
    DONE_ARRAY,
    LAYOUT_KEY,
    METADATA_KEY,
    STATS_ARRAY,
    ArraySpec,
    Layout,
    array_specs,
    chunk_key,
    default_layout,
    digested_names,
    sharded_names,
)
from logitcache.cache.metadata import CacheMetadata, parse_format_version
from logitcache.cache.select import HybridSelection, SampledSelection, TopkSelection

Selection = TopkSelection | SampledSelection | HybridSelection


def _create_array(group: zarr.Group, spec: ArraySpec, metadata: CacheMetadata) -> zarr.Array:
    if spec.blosc:
        comp = metadata.encoding.id_compressor if spec.name == "ids" else metadata.encoding.compressor
        compressors: list[Any] = [
            BloscCodec(
                cname=comp.cname, clevel=comp.clevel, shuffle=comp.shuffle, typesize=spec.dtype.itemsize
            ),
            Crc32cCodec(),  # last: every inner chunk carries its own checksum
        ]
    else:
        compressors = [Crc32cCodec()]
    return group.create_array(
        spec.name,
        shape=spec.shape,
        dtype=spec.dtype,
        chunks=spec.chunks,
        shards=spec.shards,
        compressors=compressors,
        filters=None,
        fill_value=0,
        config={"write_empty_chunks": True},  # a shard file always exists once written
        overwrite=True,
    )


def read_attrs(group: zarr.Group) -> tuple[CacheMetadata, Layout, dict[str, Any] | None]:
    """The cache's group attributes: its metadata, its layout, and the summary once complete (else None)."""
    attrs = dict(group.attrs)
    if METADATA_KEY not in attrs:
        raise CacheError(
            "Expected a logitcache cache (group attribute 'logitcache'). Got a zarr group without it."
        )
    raw = attrs[METADATA_KEY]
    if isinstance(raw, dict):
        parse_format_version(raw.get("format_version"))
    metadata = CacheMetadata.from_dict(raw)
    if LAYOUT_KEY not in attrs:
        raise CacheError("Expected the group attribute 'logitcache_layout'. Got none: the cache is damaged.")
    layout = Layout.from_dict(attrs[LAYOUT_KEY])
    complete = attrs.get(COMPLETE_KEY)
    return metadata, layout, complete


INTEGRITY_KEY: Final = "integrity"
"""Key of the summary's integrity record: digests of every metadata document (docs/cache-format.md)."""
_PLACEHOLDER: Final = "0" * 64


def shard_digests(store: Store, metadata: CacheMetadata, shard: int) -> np.ndarray:
    """(A, 32) uint8: :func:`shard_file_sha256` of shard ``shard``'s file of each digested array."""
    rows = []
    for name in digested_names(metadata):
        blob = storage.read_bytes(store, chunk_key(name, shard))
        if blob is None:
            raise CacheError(f"Expected the file {chunk_key(name, shard)} after writing it. Got none.")
        rows.append(np.frombuffer(shard_file_sha256(name, shard, blob), dtype=np.uint8))
    return np.stack(rows)


def array_document_digests(store: Store, metadata: CacheMetadata) -> dict[str, str]:
    """SHA-256 of the bytes of every array's ``zarr.json`` (missing documents are absent)."""
    found = {}
    for spec in array_specs(metadata, Layout(1, 1, 1, 1, 1)):  # names only
        raw = storage.read_bytes(store, f"{spec.name}/zarr.json")
        if raw is not None:
            found[f"{spec.name}/zarr.json"] = hashlib.sha256(raw).hexdigest()
    return found


def existing_cache(store: storage.StoreLike) -> bool:
    """Whether ``store`` holds a logitcache cache (False: empty or missing). Touches nothing.

    Raises :class:`CacheError` for a file or for foreign content, which no command may replace.
    """
    zstore = storage.resolve_store(store, read_only=True, must_exist=False)
    if isinstance(zstore, LocalStore) and not Path(zstore.root).exists():
        return False
    return _probe(zstore) is not None


def unfinished_metadata(store: storage.StoreLike) -> CacheMetadata | None:
    """The metadata of the unfinished cache at ``store`` (the one a resume would continue); None
    when the location is empty or missing or its cache is complete. Touches nothing.

    Raises :class:`CacheError` for a file or for foreign content.
    """
    if not existing_cache(store):
        return None
    metadata, _, complete = read_attrs(_probe(storage.resolve_store(store, read_only=True, must_exist=True)))
    return metadata if complete is None else None


def _probe(store: Store) -> zarr.Group | None:
    """The existing cache group, None for an empty location; refuses foreign content."""
    if storage.is_empty(store):
        return None
    try:
        group = zarr.open_group(store, mode="r")
    except Exception:  # noqa: BLE001 - any failure to open means "not a zarr group"
        raise CacheError(
            f"Expected an empty location or a logitcache cache at {storage.describe(store)}. "
            "Got other files. Choose another path or remove them."
        ) from None
    if METADATA_KEY not in group.attrs:
        raise CacheError(
            f"Expected a logitcache cache at {storage.describe(store)}. Got a zarr group that is not one. "
            "Choose another path."
        )
    return group


class CacheWriter:
    """Writes whole shards of one cache. Create with :func:`create_cache` / :func:`open_cache_writer`."""

    def __init__(self, store: Store, group: zarr.Group, metadata: CacheMetadata, layout: Layout) -> None:
        self.store = store
        self.metadata = metadata
        self.layout = layout
        self._group = group
        self._arrays: dict[str, zarr.Array] = {}
        for name in (*sharded_names(metadata), STATS_ARRAY, DIGESTS_ARRAY, DONE_ARRAY):
            node = group[name]
            if not isinstance(node, zarr.Array):
                raise CacheError(f"Expected '{name}' to be an array. Got a group: the cache is damaged.")
            self._arrays[name] = node

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def shard_rows(self, shard: int) -> tuple[int, int]:
        """Window range ``[start, stop)`` of ``shard``."""
        return self.layout.shard_rows(shard)

    def done_flags(self) -> np.ndarray:
        """(num_shards,) uint8: 1 where the shard is fully written."""
        return np.asarray(self._arrays[DONE_ARRAY][:])

    def pending_shards(self, *, rank: int = 0, world_size: int = 1) -> list[int]:
        """Shards owned by ``rank`` (``s % world_size == rank``) whose done flag is 0, ascending."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise CacheError(f"Expected 0 <= rank < world_size. Got rank={rank}, world_size={world_size}.")
        done = self.done_flags()
        return [s for s in range(rank, self.num_shards, world_size) if done[s] != 1]

    def _check_selection(self, shard: int, selection: Selection) -> None:
        start, stop = self.shard_rows(shard)
        rows = (stop - start, self.layout.seq_len)
        if isinstance(selection, HybridSelection):
            parts = [
                ("head", selection.head_ids, self.metadata.k),
                ("tail", selection.tail_ids, self.layout.k - self.metadata.k),
            ]
        else:
            parts = [("", selection.ids, self.layout.k)]
        for what, ids, width in parts:
            expected = (*rows, width)
            shape = tuple(ids.shape)
            if shape != expected:
                raise CacheError(
                    f"Expected {what + ' ' if what else ''}entries of shape {expected} (windows, positions, "
                    f"entries) for shard {shard} (windows {start}..{stop - 1}). Got {shape}."
                )
            self._check_ids(shard, ids)

    def _check_ids(self, shard: int, ids: object) -> None:
        low, high = int(ids.min()), int(ids.max())  # type: ignore[attr-defined]
        if low < 0 or high >= self.metadata.vocab_size:
            raise CacheError(
                f"Expected ids in [0, {self.metadata.vocab_size}) for shard {shard}. Got ids in [{low}, {high}]."
            )

    def write_shard(self, shard: int, selection: Selection) -> None:
        """Encode and write windows ``shard_rows(shard)`` of every array, then set ``done[shard]``.

        ``selection`` holds exactly those windows (torch or NumPy fields). On a storage error
        (e.g. disk full) raises :class:`CacheError`; the shard's done flag stays 0, so a rerun
        rewrites it, and shards already written are untouched.
        """
        self._check_selection(shard, selection)
        start, stop = self.shard_rows(shard)
        encoded = encode_entries(selection, self.metadata)
        entropy = np.asarray(
            selection.entropy.detach().cpu().numpy()
            if hasattr(selection.entropy, "detach")
            else selection.entropy,
            dtype=np.float64,
        )
        positions = float((stop - start) * self.layout.seq_len)
        captured = (
            float((1.0 - encoded.tail.astype(np.float64)).sum()) if encoded.tail is not None else positions
        )
        stats = np.array([[positions, captured, float(entropy.sum())]], dtype=np.float64)
        try:
            self._arrays["ids"][start:stop] = encoded.ids
            self._arrays["values"][start:stop] = encoded.values
            if encoded.tail is not None:
                self._arrays["tail"][start:stop] = encoded.tail
            self._arrays[STATS_ARRAY][shard : shard + 1] = stats
            # Read back what was stored: the digests bind these exact bytes to (array, shard).
            self._arrays[DIGESTS_ARRAY][shard : shard + 1] = shard_digests(self.store, self.metadata, shard)[
                None
            ]
            self._arrays[DONE_ARRAY][shard : shard + 1] = np.ones(1, dtype=np.uint8)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else f"{type(exc).__name__}: {exc}"
            raise CacheError(
                f"Expected to write shard {shard} of the cache at {storage.describe(self.store)}. Got an error: "
                f"{reason}. The shard is not marked done; free space and rerun to resume."
            ) from exc

    def finalize(self) -> dict[str, Any]:
        """Rank 0, after every shard is done: write the ``logitcache_complete`` summary. Returns it."""
        done = self.done_flags()
        missing = [int(s) for s in np.flatnonzero(done != 1)]
        if missing:
            shown = ", ".join(str(s) for s in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise CacheError(
                f"Expected every shard to be done before finalize. Got {len(missing)} pending: {shown}. "
                "Write them (all ranks) first."
            )
        digests = self._arrays[DIGESTS_ARRAY]
        for shard in np.flatnonzero(~np.asarray(digests[:]).any(axis=(1, 2))):
            # shards written before this writer recorded digests (an older version's unfinished cache)
            digests[int(shard) : int(shard) + 1] = shard_digests(self.store, self.metadata, int(shard))[None]
        stats = np.asarray(self._arrays[STATS_ARRAY][:], dtype=np.float64)  # (S, 3)
        positions = int(stats[:, 0].sum())
        stored = 0
        for name in sharded_names(self.metadata):
            for key in storage.list_keys(self.store, f"{name}/c/"):
                stored += storage.key_size(self.store, key) or 0
        summary = {
            "num_shards": self.num_shards,
            "positions": positions,
            "stored_bytes": stored,
            "bytes_per_position": stored / max(positions, 1),
            "mean_captured_mass": float(stats[:, 1].sum() / max(positions, 1)),
            "mean_teacher_entropy": float(stats[:, 2].sum() / max(positions, 1)),
        }
        summary[INTEGRITY_KEY] = {
            "array_metadata_sha256": array_document_digests(self.store, self.metadata),
            "zarr_json_sha256": _PLACEHOLDER,
        }
        try:
            # The root zarr.json records its own digest: hash it with a placeholder, then write the
            # digest in the placeholder's place (same length, so every other byte stays put).
            self._group.update_attributes({COMPLETE_KEY: summary})
            raw = storage.read_bytes(self.store, "zarr.json") or b""
            summary[INTEGRITY_KEY]["zarr_json_sha256"] = digest = hashlib.sha256(raw).hexdigest()
            self._group.update_attributes({COMPLETE_KEY: summary})
        except OSError as exc:
            raise CacheError(
                f"Expected to write the cache summary. Got {type(exc).__name__}: {exc}."
            ) from exc
        raw = storage.read_bytes(self.store, "zarr.json") or b""
        if document_sha256(raw, digest) != digest:
            raise CacheError(
                "Expected the cache's zarr.json to hold its own digest after finalize. Got other bytes: "
                "the store rewrote the document differently; report this with your zarr version."
            )
        return summary


def create_cache(
    store: storage.StoreLike,
    metadata: CacheMetadata,
    *,
    num_windows: int,
    seq_len: int,
    windows_per_chunk: int | None = None,
    windows_per_shard: int | None = None,
    overwrite: bool = False,
) -> CacheWriter:
    """Create a cache at ``store``, or reopen an unfinished identical one to resume it.

    * empty / missing location: create the group and arrays;
    * an unfinished cache with identical metadata and layout: remove crash leftovers
      (``*.partial`` temp files) and resume (``pending_shards`` lists what is left);
    * a complete cache: :class:`CacheError` unless ``overwrite`` (then it is deleted and recreated);
    * a cache with other metadata (dataset, tokenizer, k, ...): :class:`CacheError` naming the
      fields that differ, unless ``overwrite``;
    * a file, or a location holding something that is not a logitcache cache: :class:`CacheError`.

    With several ranks, call it on rank 0 only, then barrier, then :func:`open_cache_writer` on
    the others: it deletes crash leftovers, which must not race with other writers.
    """
    zstore = storage.resolve_store(store, read_only=False, must_exist=False)
    layout = default_layout(
        num_windows=num_windows,
        seq_len=seq_len,
        k=metadata.width,
        windows_per_chunk=windows_per_chunk,
        windows_per_shard=windows_per_shard,
    )
    try:
        existing = _probe(zstore)
    except CacheError:
        raise
    if existing is not None and not overwrite:
        old_metadata, old_layout, complete = read_attrs(existing)
        if complete is not None:
            raise CacheError(
                f"Expected no complete cache at {storage.describe(zstore)}. Got a complete one. "
                "Pass overwrite=True (--overwrite) to replace it, or choose another path."
            )
        differing = old_metadata.differences(metadata)
        differing += [
            f"layout.{key}" for key, value in layout.to_dict().items() if old_layout.to_dict()[key] != value
        ]
        if differing:
            raise CacheError(
                f"Expected the unfinished cache at {storage.describe(zstore)} to have the same settings. "
                f"Got different {', '.join(differing)}. Rerun with the original settings, or pass overwrite=True."
            )
        storage.remove_partial_files(zstore)
        group = zarr.open_group(zstore, mode="r+")
        if DONE_ARRAY not in group:  # crashed during creation: nothing can be done yet
            for spec in array_specs(metadata, layout):
                _create_array(group, spec, metadata)
        elif DIGESTS_ARRAY not in group:  # unfinished by a version that recorded no digests
            spec = next(s for s in array_specs(metadata, layout) if s.name == DIGESTS_ARRAY)
            _create_array(group, spec, metadata)
        return CacheWriter(zstore, group, metadata, layout)
    if existing is not None:
        storage.delete_all(zstore)
    storage.remove_partial_files(zstore)
    attributes = {METADATA_KEY: metadata.to_dict(), LAYOUT_KEY: layout.to_dict()}
    group = zarr.create_group(zstore, attributes=attributes, overwrite=False)
    for spec in array_specs(metadata, layout):  # `done` last: once it exists, all arrays do
        _create_array(group, spec, metadata)
    return CacheWriter(zstore, group, metadata, layout)


def open_cache_writer(store: storage.StoreLike, *, metadata: CacheMetadata) -> CacheWriter:
    """Open the unfinished cache rank 0 created, for another rank. Never creates or deletes.

    Raises :class:`CacheError` if there is no cache, it is complete, or its metadata differs.
    """
    zstore = storage.resolve_store(store, read_only=False, must_exist=True)
    existing = _probe(zstore)
    if existing is None:
        raise CacheError(
            f"Expected a cache created by rank 0 at {storage.describe(zstore)}. Got an empty location. "
            "Call create_cache on rank 0 and barrier before opening on other ranks."
        )
    old_metadata, layout, complete = read_attrs(existing)
    if complete is not None:
        raise CacheError(f"Expected an unfinished cache at {storage.describe(zstore)}. Got a complete one.")
    differing = old_metadata.differences(metadata)
    if differing:
        raise CacheError(
            f"Expected the cache at {storage.describe(zstore)} to have this rank's settings. "
            f"Got different {', '.join(differing)}. Every rank must use the same config."
        )
    group = zarr.open_group(zstore, mode="r+")
    if DONE_ARRAY not in group:
        raise CacheError(
            "Expected the cache arrays to exist. Got none: rank 0 has not finished create_cache."
        )
    return CacheWriter(zstore, group, old_metadata, layout)
