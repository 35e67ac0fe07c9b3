"""SHA-256 fingerprints of files and arrays, used to tie caches and models to their inputs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and little-endian C-order bytes (storage-independent)."""
    array = np.ascontiguousarray(array)
    canonical = array.astype(array.dtype.newbyteorder("<"), copy=False)
    digest = hashlib.sha256(f"{canonical.dtype.str}{tuple(canonical.shape)}".encode())
    digest.update(canonical.tobytes())
    return digest.hexdigest()
