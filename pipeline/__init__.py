"""logitcache.pipeline: configs, CLI and the stages of the distillation pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("logitcache")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
