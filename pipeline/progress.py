"""Progress: tqdm bars on a terminal, plain lines at a fixed interval in logs, rank 0 only.

* stderr is a terminal: a tqdm bar (``progress=None``, the default).
* stderr is not a terminal (nohup, SLURM, CI logs, ``| tee``): one plain line every
  ``LOGITCACHE_PROGRESS_SECONDS`` seconds (default 30; 0 = none), e.g.
  ``students/cache:  40% 115/288 [01:02<01:33, 1.85it/s, loss=5.412, tok_s=3,911]``, and a
  last line when the stage ends, so a log shows where a long stage is without carriage returns.
* ``progress=False`` (the library's quiet mode) or a rank other than 0: nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

PROGRESS_SECONDS_ENV = "LOGITCACHE_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


class LogLines(tqdm):
    """A tqdm that writes whole lines (no carriage returns), at most every ``mininterval`` seconds.

    The first line comes after ``delay`` seconds, so a stage shorter than the interval prints
    nothing; a stage that printed something prints a last line when it closes (unless ``leave=False``).
    """

    LINE_FORMAT = (
        "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.total:
            self.bar_format = self.LINE_FORMAT

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the line: nothing to clear in a log
            return True
        self.fp.write((msg or self.__str__()).strip() + "\n")
        self.fp.flush()
        self._shown = (self.n, self.postfix)
        return True

    def clear(self, *args: Any, **kwargs: Any) -> None:
        return None

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # shown with the next line

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        displayed = self.last_print_t >= self.start_t + self.delay
        if displayed and self.leave is not False and getattr(self, "_shown", None) != (self.n, self.postfix):
            self.display()
        self.disable = True
        self._decr_instances(self)


def progress_disabled(progress: bool | None, is_main: bool = True) -> bool | None:
    """tqdm's ``disable``: True off rank 0 or when asked; None (auto: quiet when not a TTY) by default."""
    if progress is False or not is_main:
        return True
    return None if progress is None else False


def _log_interval() -> float:
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "")
    try:
        return float(raw) if raw else DEFAULT_PROGRESS_SECONDS
    except ValueError:
        return DEFAULT_PROGRESS_SECONDS


def progress_bar(
    iterable: Iterable[T] | None = None, *, progress: bool | None, is_main: bool = True, **kwargs: Any
):
    disable = progress_disabled(progress, is_main)
    if disable is None and not sys.stderr.isatty():
        interval = _log_interval()
        if interval <= 0:
            return tqdm(iterable, disable=True, **kwargs)
        return LogLines(
            iterable,
            file=sys.stderr,
            mininterval=interval,
            maxinterval=interval,
            delay=interval,
            ascii=True,
            **kwargs,
        )
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
