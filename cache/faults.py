"""Single-file damage to a cache store, for checking that verification reports every one of them.

:func:`file_damages` yields, for one file, every damage tried on it: deleting it, truncating it
(to 0 bytes, to half, by one byte) and flipping single bits (first, middle and last byte, and a
few random ones). :func:`sweep_store` applies each damage to each file of a store in turn, runs a
check, and restores the file. `scripts/verify_fault_sweep.py` runs it over a real cache with
`pipe verify-cache`; tests/test_cache_verify.py over small ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def file_damages(
    path: Path, rng: np.random.Generator, *, random_flips: int = 3
) -> Iterator[tuple[str, Callable[[], None]]]:
    """(description, apply) for every damage tried on the file ``path`` (apply it, then restore the
    file's original bytes yourself)."""
    original = path.read_bytes()
    yield "deleted", lambda: path.unlink()
    for size in sorted({0, len(original) // 2, max(len(original) - 1, 0)}):
        yield f"truncated to {size} bytes", lambda size=size: path.write_bytes(original[:size])
    if not original:
        return
    offsets = {
        0,
        len(original) - 1,
        len(original) // 2,
        *rng.choice(len(original), size=random_flips).tolist(),
    }
    for offset in sorted(offsets):
        bit = int(rng.integers(8))

        def flip(offset: int = offset, bit: int = bit) -> None:
            damaged = bytearray(original)
            damaged[offset] ^= 1 << bit
            path.write_bytes(bytes(damaged))

        yield f"bit {bit} of byte {offset} flipped", flip


@dataclass(frozen=True)
class DamageOutcome:
    file: str  # relative to the store's root, POSIX
    damage: str
    reported: bool  # the check failed
    named: bool  # and one of its problem lines names the file
    lines: tuple[str, ...]


def sweep_store(
    root: Path,
    check: Callable[[], tuple[bool, list[str]]],
    *,
    seed: int = 17,
    names_relative_to: Path | None = None,
) -> list[DamageOutcome]:
    """Damage every file under ``root`` in turn (:func:`file_damages`), run ``check()`` (-> ok,
    problem lines) after each damage, restore the file. ``names_relative_to``: the folder the
    problem lines name files relative to (default ``root``)."""
    rng = np.random.default_rng(seed)
    base = names_relative_to or root
    outcomes = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = path.relative_to(base).as_posix()
        original = path.read_bytes()
        try:
            for what, damage in file_damages(path, rng):
                damage()
                ok, lines = check()
                outcomes.append(
                    DamageOutcome(key, what, not ok, any(key in line for line in lines), tuple(lines))
                )
                path.write_bytes(original)
        finally:
            path.write_bytes(original)
    return outcomes
