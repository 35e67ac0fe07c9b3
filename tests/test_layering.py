"""Errors live at the bottom: the storage and kernel layers never import the pipeline above them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

UPPER = "logitcache.pipeline"


def upward_imports(package: str) -> list[str]:
    """``file:line module`` for every import of ``logitcache.pipeline`` in ``REPO/package/*.py``."""
    found = []
    for path in sorted((REPO / package).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
                if node.module == "logitcache":  # from logitcache import pipeline
                    modules = [f"logitcache.{alias.name}" for alias in node.names]
            else:
                continue
            found += [
                f"{Path(package) / path.name}:{node.lineno} {m}"
                for m in modules
                if m == UPPER or m.startswith(UPPER + ".")
            ]
    return found


def private_cross_imports(package: str) -> list[str]:
    """``file:line name`` for every ``from logitcache.<package>.x import _private`` between modules."""
    found = []
    for path in sorted((REPO / package).glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"logitcache.{package}."):
                found += [
                    f"{Path(package) / path.name}:{node.lineno} {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    return found


def test_cache_does_not_import_the_pipeline():
    assert upward_imports("cache") == []


def test_kernels_do_not_import_the_pipeline():
    assert upward_imports("kernels") == []


def test_cache_modules_share_no_private_helpers():
    assert private_cross_imports("cache") == []


def test_pipeline_errors_reexport_the_cache_errors():
    """``except LogitcacheError`` catches what the cache layer raises; the pipeline adds its own."""
    from logitcache.cache import errors as bottom
    from logitcache.pipeline import errors as top

    assert top.LogitcacheError is bottom.LogitcacheError
    assert top.CacheError is bottom.CacheError and top.TeacherError is bottom.TeacherError
    for cls in (top.ConfigError, top.DataError, top.StageError, top.CacheError, top.TeacherError):
        assert issubclass(cls, top.LogitcacheError)


def test_cache_package_exports_resolve():
    """``logitcache.cache`` loads its submodules on first use; every exported name resolves."""
    import logitcache.cache as cache

    assert sorted(cache.__all__) == sorted(cache._EXPORTS)
    for name in cache.__all__:
        assert getattr(cache, name) is not None
    with pytest.raises(AttributeError):
        cache.not_a_name  # noqa: B018


def test_cli_starts_without_torch():
    """`pipe --help` stays fast: the CLI and the error types import neither torch nor zarr."""
    code = (
        "import sys, logitcache.pipeline.cli, logitcache.pipeline.errors; "
        "print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
