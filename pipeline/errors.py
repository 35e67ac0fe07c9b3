"""The one error hierarchy of logitcache.

Every error a user can cause (bad config, bad corpus, mismatched cache, ...) is a
:class:`LogitcacheError`. The CLI prints its message as one line and exits non-zero,
with no traceback. Messages are shaped "Expected X. Got Y." plus what to do.
"""


class LogitcacheError(Exception):
    """Base class for errors caused by user input or by the state of files on disk."""


class ConfigError(LogitcacheError):
    """A config file or a ``--set`` override is invalid."""


class DataError(LogitcacheError):
    """The corpus or a prepared dataset is missing, empty, undecodable or too small."""


class StageError(LogitcacheError):
    """A stage cannot run because an earlier stage's output is missing or incompatible."""


class CacheError(LogitcacheError):
    """A logit cache is missing, incomplete, corrupt, incompatible or of an unknown version."""


class TeacherError(LogitcacheError):
    """A teacher model is missing, incompatible with the tokenizer, or produced invalid output."""
