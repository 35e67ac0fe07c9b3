"""SHA-256 fingerprints that tie a cache to the exact token windows and tokenizer it was computed on."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and values, independent of memory layout and byte order.

    Hashed bytes: ``b"logitcache-array-v1\\0"``, the canonical little-endian dtype string
    (e.g. ``"<i4"``, ``"|u1"``), ``"\\0"``, the shape as comma-separated decimals, ``"\\0"``, then the
    C-order little-endian bytes of the values. Two arrays hash equal iff they have the same
    dtype (kind and width), the same shape and the same values.
    """
    arr = np.asarray(array)
    if arr.dtype.hasobject:
        raise TypeError(f"Expected a numeric array. Got dtype {arr.dtype}.")
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    digest = hashlib.sha256()
    digest.update(b"logitcache-array-v1\0")
    digest.update(little.dtype.str.encode("ascii") + b"\0")
    digest.update(",".join(str(n) for n in arr.shape).encode("ascii") + b"\0")
    digest.update(np.ascontiguousarray(little).tobytes(order="C"))
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike[str], *, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (e.g. ``tokenizer.json``, a safetensors file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def shard_file_sha256(name: str, shard: int, blob: bytes) -> bytes:
    """SHA-256 (32 raw bytes) binding the bytes of one stored file to its array and shard.

    Hashed: ``b"logitcache-shard-v1\\0"``, the array name, ``"\\0"``, the shard index in decimal,
    ``"\\0"``, then the file's bytes (chunks and shard index alike). The same file under another
    array or shard hashes differently, so moved or swapped files are caught (docs/cache-format.md).
    """
    digest = hashlib.sha256()
    digest.update(
        b"logitcache-shard-v1\0" + name.encode("ascii") + b"\0" + str(shard).encode("ascii") + b"\0"
    )
    digest.update(blob)
    return digest.digest()


def document_sha256(raw: bytes, recorded: str) -> str:
    """SHA-256 of a JSON document that records its own digest ``recorded`` (a 64-hex string).

    The digest is taken over the bytes with the first ``"recorded"`` replaced by 64 zeros, the
    placeholder it had when it was hashed; a flip anywhere, including in the digest, is a mismatch.
    """
    placeholder = b'"' + b"0" * 64 + b'"'
    return hashlib.sha256(raw.replace(b'"' + recorded.encode("ascii") + b'"', placeholder, 1)).hexdigest()
