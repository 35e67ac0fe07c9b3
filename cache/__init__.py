"""logitcache.cache: the versioned Zarr v3 logit-cache format, its writer, reader and verifier.

Spec: docs/cache-format.md. Typical use::

    from logitcache.cache import (CacheMetadata, TeacherInfo, create_cache, ensemble_logprobs,
                                  select_topk, open_cache, verify_cache)
"""

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
    SampledSelection,
    TopkSelection,
    ensemble_logprobs,
    ensemble_topk,
    select_sampled,
    select_topk,
    window_seed,
)
from logitcache.cache.storage import StoreLike, remove_partial_files
from logitcache.cache.verify import ShardReport, VerifyReport, verify_cache
from logitcache.cache.writer import CacheWriter, create_cache, open_cache_writer

__all__ = [
    "FORMAT_VERSION",
    "SAMPLED_ENCODING",
    "CacheBatch",
    "CacheMetadata",
    "CacheReader",
    "CacheWriter",
    "Compressor",
    "Encoding",
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
    "select_sampled",
    "select_topk",
    "verify_cache",
    "window_seed",
]
