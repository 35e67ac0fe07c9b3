"""Store plumbing: turn a path or zarr store into a zarr ``Store``; list, size and clean keys."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore

from logitcache.cache.errors import CacheError

StoreLike = str | os.PathLike[str] | Store
"""A cache location: a filesystem path, or any zarr v3 ``Store`` (LocalStore, FsspecStore, ...)."""

# LocalStore writes `<key>.<uuid4 hex>.partial` and renames it; a crash leaves these behind.
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def describe(store: StoreLike) -> str:
    if isinstance(store, LocalStore):
        return str(store.root)
    return str(store)


def resolve_store(store: StoreLike, *, read_only: bool, must_exist: bool) -> Store:
    """A zarr Store for ``store``; paths become :class:`LocalStore`.

    Raises :class:`CacheError` if the path is an existing file, or does not exist and
    ``must_exist``.
    """
    if isinstance(store, Store):
        if not read_only and store.read_only:
            raise CacheError(
                f"Expected a writable store. Got a read-only store {store}. Open it with read_only=False."
            )
        return store
    if not isinstance(store, str | os.PathLike):
        raise CacheError(f"Expected a cache path or a zarr Store. Got {type(store).__name__}.")
    path = Path(store)
    if path.exists() and not path.is_dir():
        raise CacheError(f"Expected a cache directory at {path}. Got an existing file. Choose another path.")
    if must_exist and not path.is_dir():
        raise CacheError(
            f"Expected a logit cache at {path}. Got no such directory. Run `pipe cache-logits` first."
        )
    return LocalStore(path, read_only=read_only)


def remove_partial_files(store: Store) -> list[str]:
    """Delete temporary files a crashed LocalStore write left behind. Returns their paths.

    Only for :class:`LocalStore` (other stores write objects atomically or not at all). Must run
    only while no other process is writing to the cache (the writer's creator does it once).
    """
    if not isinstance(store, LocalStore):
        return []
    root = Path(store.root)
    removed = []
    if root.is_dir():
        for path in root.rglob("*.partial"):
            if path.is_file() and _PARTIAL_RE.search(path.name):
                path.unlink(missing_ok=True)
                removed.append(str(path))
    return removed


def list_keys(store: Store, prefix: str = "") -> list[str]:
    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sorted(sync(collect()))


def key_size(store: Store, key: str) -> int | None:
    """Size in bytes of ``key``, or None if it does not exist."""
    if not sync(store.exists(key)):
        return None
    size: Any = sync(store.getsize(key))
    return int(size)


def read_bytes(store: Store, key: str) -> bytes | None:
    """The whole value of ``key``, or None if it does not exist."""
    from zarr.core.buffer.core import default_buffer_prototype

    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else bytes(buffer.to_bytes())


def is_empty(store: Store) -> bool:
    return bool(sync(store.is_empty("")))


def delete_all(store: Store) -> None:
    sync(store.delete_dir(""))
