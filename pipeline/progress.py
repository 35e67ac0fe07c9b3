"""Progress bars (tqdm): shown on a terminal, quiet in CI and other non-TTY output, rank 0 only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_disabled(progress: bool | None, is_main: bool = True) -> bool | None:
    """tqdm's ``disable``: True off rank 0 or when asked; None (auto: quiet when not a TTY) by default."""
    if progress is False or not is_main:
        return True
    return None if progress is None else False


def progress_bar(
    iterable: Iterable[T] | None = None, *, progress: bool | None, is_main: bool = True, **kwargs: Any
):
    return tqdm(iterable, disable=progress_disabled(progress, is_main), dynamic_ncols=True, **kwargs)
