"""Errors raised by logitcache.kernels for bad inputs or options (ValueError subclasses, no upper-layer imports)."""


class KernelError(ValueError):
    """A tensor or an option given to a sparse-KD loss is invalid (shape, dtype, range, option value)."""
