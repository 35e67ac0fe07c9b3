"""logitcache.cache: the versioned Zarr v3 logit-cache format, its writer, reader and verifier.

Spec: docs/cache-format.md. Typical use::

    from logitcache.cache import (CacheMetadata, TeacherInfo, create_cache, ensemble_logprobs,
                                  select_topk, open_cache, verify_cache)
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from logitcache.cache.encoding import decode_entries, encode_entries
    from logitcache.cache.hashing import array_sha256, file_sha256
    from logitcache.cache.layout import Layout, default_layout
    from logitcache.cache.metadata import (
        FORMAT_VERSION,
        SAMPLED_ENCODING,
        CacheMetadata,
        Compressor,
        Encoding,
        TeacherInfo,
    )
    from logitcache.cache.reader import CacheBatch, CacheReader, open_cache
    from logitcache.cache.select import (
        HybridSelection,
        SampledSelection,
        TopkSelection,
        ensemble_logprobs,
        ensemble_topk,
        select_hybrid,
        select_sampled,
        select_topk,
        window_seed,
    )
    from logitcache.cache.storage import StoreLike, remove_partial_files
    from logitcache.cache.verify import ShardReport, VerifyReport, verify_cache
    from logitcache.cache.writer import CacheWriter, create_cache, open_cache_writer

_EXPORTS = {  # public name -> the submodule that defines it
    "CacheBatch": "reader",
    "CacheMetadata": "metadata",
    "CacheReader": "reader",
    "CacheWriter": "writer",
    "Compressor": "metadata",
    "Encoding": "metadata",
    "FORMAT_VERSION": "metadata",
    "HybridSelection": "select",
    "Layout": "layout",
    "SAMPLED_ENCODING": "metadata",
    "SampledSelection": "select",
    "ShardReport": "verify",
    "StoreLike": "storage",
    "TeacherInfo": "metadata",
    "TopkSelection": "select",
    "VerifyReport": "verify",
    "array_sha256": "hashing",
    "create_cache": "writer",
    "decode_entries": "encoding",
    "default_layout": "layout",
    "encode_entries": "encoding",
    "ensemble_logprobs": "select",
    "ensemble_topk": "select",
    "file_sha256": "hashing",
    "open_cache": "reader",
    "open_cache_writer": "writer",
    "remove_partial_files": "storage",
    "select_hybrid": "select",
    "select_sampled": "select",
    "select_topk": "select",
    "verify_cache": "verify",
    "window_seed": "select",
}


def __getattr__(name: str) -> Any:
    """Import the submodule of ``name`` on first use (PEP 562).

    Importing :mod:`logitcache.cache.errors` (as every layer above does) then loads neither torch
    nor zarr, so that `pipe --help` starts in a fraction of a second.
    """
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "FORMAT_VERSION",
    "SAMPLED_ENCODING",
    "CacheBatch",
    "CacheMetadata",
    "CacheReader",
    "CacheWriter",
    "Compressor",
    "Encoding",
    "HybridSelection",
    "Layout",
    "SampledSelection",
    "ShardReport",
    "StoreLike",
    "TeacherInfo",
    "TopkSelection",
    "VerifyReport",
    "array_sha256",
    "create_cache",
    "decode_entries",
    "default_layout",
    "encode_entries",
    "ensemble_logprobs",
    "ensemble_topk",
    "file_sha256",
    "open_cache",
    "open_cache_writer",
    "remove_partial_files",
    "select_hybrid",
    "select_sampled",
    "select_topk",
    "verify_cache",
    "window_seed",
]
