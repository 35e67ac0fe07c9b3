"""Store plumbing: turn a path, URL or zarr store into a zarr ``Store``; list, size and clean keys.

A cache lives in a local folder (:class:`~zarr.storage.LocalStore`) or behind a URL such as
``s3://bucket/prefix/logits.zarr``, ``gs://...`` or ``memory://...`` (zarr's
:class:`~zarr.storage.FsspecStore`, docs/object-stores.md). Credentials and endpoints come from
the environment the filesystem package reads (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE`` /
``~/.aws``, ``AWS_ENDPOINT_URL_S3``), never from a config file. Everything above this module
works on keys through the store API (list, size, get), so the writer, the reader and the
verifier do the same on every store.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore

from logitcache.cache.errors import CacheError

StoreLike = str | os.PathLike[str] | Store
"""A cache location: a filesystem path, a URL (``s3://bucket/prefix``, ``memory://...``), or any
zarr v3 ``Store`` (LocalStore, FsspecStore, ...)."""

# LocalStore writes `<key>.<uuid4 hex>.partial` and renames it; a crash leaves these behind.
_PARTIAL_RE = re.compile(r"\.[0-9a-f]{32}\.partial$")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What to install for the common protocols (fsspec names the package in its ImportError too).
_PACKAGES = {
    "s3": "pip install 'logitcache[s3]' (fsspec and s3fs)",
    "s3a": "pip install 'logitcache[s3]' (fsspec and s3fs)",
    "gs": "pip install fsspec gcsfs",
    "gcs": "pip install fsspec gcsfs",
    "az": "pip install fsspec adlfs",
    "abfs": "pip install fsspec adlfs",
}
_CREDENTIALS_HINT = (
    "Check the URL, that the bucket exists, and the credentials in the environment "
    "(S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, ~/.aws, AWS_ENDPOINT_URL_S3 for "
    "S3-compatible servers; GCS: GOOGLE_APPLICATION_CREDENTIALS)"
)


def is_url(location: object) -> bool:
    """Whether ``location`` is a URL string (``scheme://...``) rather than a filesystem path."""
    return isinstance(location, str) and _URL_RE.match(location) is not None


def describe(store: StoreLike) -> str:
    """The location of ``store`` as a user would write it: a path or a URL."""
    if isinstance(store, LocalStore):
        return str(store.root)
    fs, path = getattr(store, "fs", None), getattr(store, "path", None)
    if fs is not None and isinstance(path, str):  # FsspecStore
        protocol = getattr(fs, "protocol", None) or getattr(getattr(fs, "sync_fs", None), "protocol", "")
        protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        return f"{protocol}://{path.lstrip('/')}" if protocol else path
    return str(store)


def resolve_store(store: StoreLike, *, read_only: bool, must_exist: bool) -> Store:
    """A zarr Store for ``store``; paths become :class:`LocalStore`, URLs :class:`FsspecStore`.

    Raises :class:`CacheError` if the path is an existing file, or does not exist and
    ``must_exist``; for a URL: a missing filesystem package, an unreachable store (no such bucket,
    no or wrong credentials), or no objects under it and ``must_exist``.
    """
    if isinstance(store, Store):
        if not read_only and store.read_only:
            raise CacheError(
                f"Expected a writable store. Got a read-only store {store}. Open it with read_only=False."
            )
        return store
    if is_url(store):
        return _url_store(str(store), read_only=read_only, must_exist=must_exist)
    if not isinstance(store, str | os.PathLike):
        raise CacheError(f"Expected a cache path, URL or a zarr Store. Got {type(store).__name__}.")
    path = Path(store)
    if path.exists() and not path.is_dir():
        raise CacheError(f"Expected a cache directory at {path}. Got an existing file. Choose another path.")
    if must_exist and not path.is_dir():
        raise CacheError(
            f"Expected a logit cache at {path}. Got no such directory. Run `pipe cache-logits` first."
        )
    return LocalStore(path, read_only=read_only)


def _url_store(url: str, *, read_only: bool, must_exist: bool) -> Store:
    """``FsspecStore.from_url(url)`` with no storage options (the environment configures it), probed once.

    The probe (one listing of the prefix) turns a missing bucket or missing credentials into one
    line here, before a command creates or changes anything.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.username or parts.password:
        raise CacheError(
            f"Expected a store URL without credentials. Got user/password in {parts.scheme}://...@{parts.hostname}. "
            "Put them in the environment (e.g. AWS_ACCESS_KEY_ID, AWS_PROFILE) instead."
        )
    if scheme == "file":
        path = parts.netloc + parts.path
        return resolve_store(path, read_only=read_only, must_exist=must_exist)
    install = _PACKAGES.get(scheme, "install fsspec and the fsspec filesystem package for this protocol")
    try:
        from zarr.storage import FsspecStore

        zstore = FsspecStore.from_url(url, read_only=read_only)
    except ImportError as exc:
        raise CacheError(
            f"Expected the packages that open {scheme}:// URLs. Got: {str(exc).rstrip('.')}. To use {url}: {install}."
        ) from None
    except ValueError as exc:  # an unknown protocol
        raise CacheError(
            f"Expected a store URL fsspec knows. Got {url} ({exc}). To use it: {install}."
        ) from None
    try:
        empty = is_empty(zstore)
    except Exception as exc:  # noqa: BLE001 - NoSuchBucket, NoCredentialsError, AccessDenied, ...
        raise CacheError(
            f"Expected to reach the store {url}. Got {type(exc).__name__}: {str(exc).strip() or 'no message'}. "
            f"{_CREDENTIALS_HINT}."
        ) from None
    if must_exist and empty:
        raise CacheError(
            f"Expected a logit cache at {url}. Got no objects there. Run `pipe cache-logits` first."
        )
    return zstore


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
