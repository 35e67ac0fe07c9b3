"""The one error hierarchy of logitcache, as the pipeline sees it.

The base class and the errors the cache layer raises live at the bottom, in
:mod:`logitcache.cache.errors` (re-exported here); this module adds the pipeline's own. Kernels
raise :class:`logitcache.kernels.errors.KernelError` (a ``ValueError``) for bad tensors or options.
Every error a user can cause (bad config, bad corpus, mismatched cache, ...) is a
:class:`LogitcacheError` or a ``KernelError``: the CLI prints its message as one line and exits
with status 2, with no traceback. Messages are shaped "Expected X. Got Y." plus what to do.
"""

from logitcache.cache.errors import CacheError, LogitcacheError, TeacherError

__all__ = ["CacheError", "ConfigError", "DataError", "LogitcacheError", "StageError", "TeacherError"]


class ConfigError(LogitcacheError):
    """A config file or a ``--set`` override is invalid."""


class DataError(LogitcacheError):
    """The corpus or a prepared dataset is missing, empty, undecodable or too small."""


class StageError(LogitcacheError):
    """A stage cannot run because an earlier stage's output is missing or incompatible."""
