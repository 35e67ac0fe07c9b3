"""The errors of the cache layer, and the base of logitcache's one error hierarchy.

This module imports nothing of logitcache, so the bottom layer (``cache/``) raises its own types
without depending on the pipeline; :mod:`logitcache.pipeline.errors` re-exports them and adds the
pipeline's. Every error a user can cause is a :class:`LogitcacheError`: the CLI prints its message
as one line and exits non-zero. Messages are shaped "Expected X. Got Y." plus what to do.
"""


class LogitcacheError(Exception):
    """Base class for errors caused by user input or by the state of files on disk."""


class CacheError(LogitcacheError):
    """A logit cache is missing, incomplete, corrupt, incompatible or of an unknown version."""


class TeacherError(LogitcacheError):
    """A teacher model is missing, incompatible with the tokenizer, or produced invalid output."""
