"""Packaging: everything installs under the one namespace `logitcache`, nothing generic at top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import REPO


def test_wheel_installs_only_under_logitcache(tmp_path: Path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("logitcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    packages = {t for t in top if not t.endswith(".dist-info")}
    assert packages == {"logitcache"}, f"unexpected top-level entries in the wheel: {sorted(packages)}"
    for sub in ("pipeline", "kernels", "cache"):  # every source module of each folder is in the wheel
        for source in (REPO / sub).rglob("*.py"):
            assert f"logitcache/{sub}/{source.relative_to(REPO / sub).as_posix()}" in names, source
    assert not {"kernels", "cache", "pipeline"} & top
    for source in (REPO / "logitcache").rglob("*.py"):  # the package root: public API, integrations
        assert f"logitcache/{source.relative_to(REPO / 'logitcache').as_posix()}" in names, source
    assert "logitcache/integrations/hf_trainer.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "pipe = logitcache.pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_modules_resolve_to_the_repository_folders():
    code = (
        "import importlib.util as u, logitcache.kernels as k, logitcache.cache as c, logitcache.pipeline as p;"
        "print(k.__file__); print(c.__file__); print(p.__file__);"
        "print(u.find_spec('cache') is None, u.find_spec('pipeline') is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True
    ).stdout.split()
    assert out[:3] == [str(REPO / d / "__init__.py") for d in ("kernels", "cache", "pipeline")]
    assert out[3:] == ["True", "True"]  # no top-level `cache` or `pipeline` package is importable
