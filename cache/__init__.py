"""logitcache.cache: the versioned Zarr v3 logit-cache format, its writer, reader and verifier."""
