"""Imports from a source checkout: ``./kernels`` is ``logitcache.kernels``, never ``kernels``.

pyproject.toml maps ``logitcache.<sub>`` to the checkout's top-level folders ``pipeline/``,
``kernels/`` and ``cache/``. Whenever the checkout's root is on ``sys.path`` (pytest, ``python -m``
or ``python -c`` run from the root), a plain ``import kernels`` would find ``./kernels`` and shadow
an installed package of the same name, such as Hugging Face's ``kernels``, which transformers 5.25
and later imports as it loads a model (collection failed with ``cannot import name
'CUDAProperties' from 'kernels'``). :func:`install` (run by ``logitcache/__init__.py``, so before
anything of ours imports transformers) adds two import hooks, only in a source checkout:

- a top-level import of one of those names resolves to the installed package of that name, when
  there is one (else the import goes on as before);
- ``logitcache.<sub>`` resolves to ``./<sub>`` when the checkout is not installed (the GPU machine
  runs the benchmarks from a carried tree with the root on ``PYTHONPATH``).

An installed wheel has no checkout around it: there :func:`install` does nothing. Standard library
only: this runs on ``import logitcache``, which must stay cheap.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("pipeline", "kernels", "cache")
ROOT = Path(__file__).resolve().parent.parent


def is_source_checkout(root: Path = ROOT) -> bool:
    """Whether ``root`` is this repository's checkout (pyproject.toml beside the mapped folders)."""
    return (root / "pyproject.toml").is_file() and all(
        (root / s / "__init__.py").is_file() for s in SUBPACKAGES
    )


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT  # "" is the working directory
    except OSError:
        return False


class InstalledFirst(importlib.abc.MetaPathFinder):
    """``import kernels`` (or ``cache``, ``pipeline``): the installed package of that name, found on
    ``sys.path`` without the checkout's root; None (the normal search) when there is none."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (the MetaPathFinder signature)
        if path is not None or name not in SUBPACKAGES:
            return None
        return importlib.machinery.PathFinder.find_spec(name, [e for e in sys.path if not _is_root(e)])


class CheckoutSubpackages(importlib.abc.MetaPathFinder):
    """``logitcache.<sub>`` -> ``<checkout>/<sub>``, as pyproject.toml's package-dir maps it."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        parent, _, sub = name.partition(".")
        if parent != "logitcache" or sub not in SUBPACKAGES:
            return None
        folder = ROOT / sub
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install() -> None:
    """Add both hooks (once) when this package runs from a source checkout."""
    if not is_source_checkout():
        return
    if not any(isinstance(f, InstalledFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, InstalledFirst())
    if not any(isinstance(f, CheckoutSubpackages) for f in sys.meta_path):
        sys.meta_path.append(CheckoutSubpackages())  # after the installed (editable) finders
