"""What every writing command checks before it touches anything, and how it replaces output safely.

* :func:`check_writable`: the folder an output goes to (or the nearest one that exists) can be
  written, probed by creating and removing a file there, the only test that holds for every user
  (``os.access`` says yes to root on a folder a read-only mount refuses, and file modes do not
  bind root at all).
* :class:`StageLock`: one process at a time per output folder. A lock file beside the folder
  (``RUN/cache.lock``, ``RUN/students/NAME.lock``) records the owner's pid, host and command,
  and the owner holds an exclusive ``flock`` on it while it runs. The kernel drops that lock
  when the process ends however it ends (even ``kill -9``), so a lock file nobody holds is
  stale: the next run takes it over and says whose it was. A second process while the owner
  runs is refused, naming the owner.
* :func:`move_aside` / :func:`finish_replacement`: ``--overwrite`` moves the old output to
  ``NAME.replaced`` and deletes it only once the new output is complete, so a failure on the
  way never leaves the user with neither.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from logitcache.pipeline.errors import StageError

LOCK_SUFFIX = ".lock"
REPLACED_SUFFIX = ".replaced"


# ----------------------------------------------------------------------------------------------
# Writable outputs


def existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest ancestor that does."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(target: str | Path, what: str) -> None:
    """Refuse (:class:`StageError`, one line) when ``target``, a folder that will be created or
    written into, cannot be: a file in the way, no permission, a read-only file system.

    The probe creates and removes a file in ``target`` (or the nearest folder above it that
    exists, where ``target`` would be created); nothing else is touched.
    """
    target = Path(target)
    folder = existing_ancestor(target)
    if not folder.is_dir():
        raise StageError(
            f"Expected a folder for {what} at {target}. Got the file {folder} in the way: move it, or "
            "use another --run-dir."
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".logitcache-write-probe-", dir=folder)
    except OSError as exc:
        raise StageError(
            f"Expected a writable folder for {what} at {folder}. Got: {exc.strerror or exc}. Make it "
            "writable (permissions, a read-write mount) or use another --run-dir/--out; nothing was changed."
        ) from None
    os.close(handle)
    os.unlink(probe)


# ----------------------------------------------------------------------------------------------
# One process per output


def lock_path(stage_dir: Path) -> Path:
    """The lock file of an output folder: beside it, ``NAME.lock`` (never inside, which may be moved)."""
    return stage_dir.with_name(stage_dir.name + LOCK_SUFFIX)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "a process that has not written its details yet"
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')!r} (since {owner.get('started', '?')}: "
        f"{' '.join(map(str, owner.get('command') or []))[:120]})"
    )


# Lock files held by this process. A forked child (a DataLoader worker) gets copies of their
# descriptors, and an flock lasts while any copy is open: the child closes its copies at once, so
# the lock ends with its owner even when the owner is killed before its workers exit.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _HELD_LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class StageLock:
    """An exclusive lock on one output folder for the life of this process's work on it.

    ``with StageLock(RUN/cache, "the cache", log=print): ...``. Refuses (:class:`StageError`)
    when another live process holds it; takes over a stale one (its owner ended without
    removing it) with a message through ``log``. Only the main process of a torchrun job
    takes it (the others write only what rank 0 coordinates).
    """

    def __init__(self, stage_dir: Path, what: str, *, log: Any = None, enabled: bool = True):
        self.path = lock_path(Path(stage_dir))
        self.what = what
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.enabled = enabled
        self._fd: int | None = None
        self._pid = os.getpid()
        self._created: list[Path] = []

    def acquire(self) -> None:
        if not self.enabled or self._fd is not None:
            return
        missing = self.path.parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)  # deepest first; removed on release if still empty
            missing = missing.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # retried only when the file was replaced while we opened it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                owner = _read_owner(self.path)
                raise StageError(
                    f"Expected no other process working on {self.what}. Got one: {_describe(owner)} holds "
                    f"{self.path}. Wait for it to finish (or stop it), then rerun."
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the previous owner removed the file between our open and flock
                os.close(fd)
                continue
            previous = _read_owner(self.path)
            if previous and previous.get("pid") != os.getpid():
                alive = previous.get("host") == socket.gethostname() and _pid_alive(
                    int(previous.get("pid", -1))
                )
                state = "still running but not holding it" if alive else "no longer running"
                self.log(f"note: took over the stale lock {self.path} of {_describe(previous)}, {state}")
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": sys.argv,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
            self._fd = fd
            self._pid = os.getpid()
            _HELD_LOCK_FDS.add(fd)
            return
        raise StageError(f"Could not take the lock {self.path}: it keeps being replaced. Rerun.")

    def release(self) -> None:
        if self._fd is None or self._pid != os.getpid():  # a forked child never releases its parent's lock
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding it: a waiting process then retries on a new file
        _HELD_LOCK_FDS.discard(self._fd)
        os.close(self._fd)
        self._fd = None
        for folder in self._created:  # a run that failed early leaves no empty folders behind
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own (read before torch.distributed starts)."""
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------------------------
# --overwrite without a gap


def replaced_path(stage_dir: Path) -> Path:
    return stage_dir.with_name(stage_dir.name + REPLACED_SUFFIX)


def move_aside(out: Path, aside: Path, *, is_complete: bool) -> None:
    """`--overwrite`: move the output folder ``out`` to ``aside``; the old output is deleted only
    once the new one is complete (:func:`finish_replacement`), so the user never has neither.

    If ``aside`` already exists, an earlier `--overwrite` was interrupted: when ``out`` is complete
    (``is_complete``) the replacement finished and ``aside`` is obsolete; otherwise ``out`` is the
    unfinished replacement (the complete old output is still aside) and is discarded instead.
    """
    if not out.is_dir() or not any(out.iterdir()):
        return
    if aside.exists():
        if not is_complete:
            shutil.rmtree(out)
            return
        shutil.rmtree(aside)
    os.replace(out, aside)


def finish_replacement(aside: Path) -> None:
    """The new output is complete: only now does the old one (if any) go."""
    if aside.exists():
        shutil.rmtree(aside)
