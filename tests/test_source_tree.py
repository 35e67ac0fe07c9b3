"""A source checkout never exposes ./kernels, ./cache or ./pipeline as top-level packages
(logitcache/_source_tree.py): transformers >= 5.25 imports Hugging Face's `kernels`, which
./kernels shadowed whenever the checkout's root was on sys.path (pytest, `python -m`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from logitcache import _source_tree

from .conftest import REPO


def _python(code: str, *, cwd: Path, pythonpath: Path, flags: tuple[str, ...] = ()) -> str:
    out = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=cwd,
        env={"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _installed_kernels(tmp_path: Path) -> Path:
    """A stand-in for an installed top-level ``kernels`` package (Hugging Face's, in real life)."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    return site


def test_installed_kernels_package_wins_over_the_checkout_folder(tmp_path):
    site = _installed_kernels(tmp_path)
    # `python -c` from the root puts the root first on sys.path: without the hook, ./kernels wins
    shadowed = _python("import kernels; print(kernels.__file__)", cwd=REPO, pythonpath=site)
    assert Path(shadowed) == REPO / "kernels" / "__init__.py"
    found = _python(
        "import logitcache, kernels, logitcache.kernels as ours; print(kernels.WHO, ours.__file__)",
        cwd=REPO,
        pythonpath=site,
    )
    who, ours = found.split()
    assert who == "installed"
    assert Path(ours) == REPO / "kernels" / "__init__.py"


def test_checkout_subpackages_resolve_without_an_install(tmp_path):
    # -S: no site-packages, so no installed (editable) logitcache; only the checkout on PYTHONPATH
    code = (
        "import importlib.util, logitcache; "
        "print(*[importlib.util.find_spec(f'logitcache.{s}').origin for s in ('pipeline', 'kernels', 'cache')])"
    )
    origins = _python(code, cwd=tmp_path, pythonpath=REPO, flags=("-S",)).split()
    assert [Path(o) for o in origins] == [REPO / s / "__init__.py" for s in ("pipeline", "kernels", "cache")]


def test_hooks_only_in_a_checkout(tmp_path):
    assert _source_tree.is_source_checkout(REPO)
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    assert not _source_tree.is_source_checkout(tmp_path)  # e.g. site-packages of a wheel install
