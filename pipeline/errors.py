"""The one error hierarchy of logitcache, as the pipeline sees it.

The base class and the errors the cache layer raises live at the bottom, in
:mod:`logitcache.cache.errors` (re-exported here); this module adds the pipeline's own. Kernels
raise :class:`logitcache.kernels.errors.KernelError` (a ``ValueError``) for bad tensors or options.
Every error a user can cause (bad config, bad corpus, mismatched cache, ...) is a
:class:`LogitcacheError` or a ``KernelError``: the CLI prints its message as one line and exits
with status 2, with no traceback. Messages are shaped "Expected X. Got Y." plus what to do.
"""

from logitcache.cache.errors import CacheError, LogitcacheError, TeacherError

__all__ = [
    "CacheError",
    "ConfigError",
    "DataError",
    "LogitcacheError",
    "StageError",
    "TeacherError",
    "error_line",
]


class ConfigError(LogitcacheError):
    """A config file or a ``--set`` override is invalid."""


class DataError(LogitcacheError):
    """The corpus or a prepared dataset is missing, empty, undecodable or too small."""


class StageError(LogitcacheError):
    """A stage cannot run because an earlier stage's output is missing or incompatible."""


def error_line(message: str) -> str:
    """A message as one line (what the CLI prints after ``error:``).

    An error re-raised from a DataLoader worker carries the worker's traceback in its message
    (``Caught X in DataLoader worker process N. Original Traceback ...``): its last line holds the
    original message, which is kept; the traceback is dropped. Whitespace runs become one space.
    """
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        head, sep, rest = last.partition(": ")
        message = rest if sep and "." in head and " " not in head else last
    return " ".join(message.split())
