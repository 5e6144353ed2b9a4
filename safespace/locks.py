"""Cross-process locks on the cache folder, so that processes sharing it (the app, CLI runs) build a
shared artefact once: the first takes the lock and builds, the others wait, then reuse the result.

The lock is a `filelock.FileLock`: an `fcntl.flock` on POSIX, which the OS releases when its holder
exits or is killed, so a dead holder never blocks anyone (where a file system has no flock,
filelock falls back to a marker file holding the owner's pid and breaks it once that pid is dead).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(path, what: str = "its work", on_wait: Callable[[str], None] | None = None,
              timeout: float | None = None, poll: float = 0.25) -> Iterator[bool]:
    """Hold the lock file `path` (created with its folder if missing) for the block; yields whether
    this process had to wait for another holder first. When it must wait it says so once, through
    logging and `on_wait(message)`. `timeout` (seconds, None: forever) raises TimeoutError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        message = f"waiting for another process to finish {what} (it holds {path})"
        log.info(message)
        if on_wait is not None:
            on_wait(message)
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout, poll_interval=poll)
        except Timeout:
            raise TimeoutError(f"{path} is still held by another process after {timeout:g} s") from None
    try:
        yield waited
    finally:
        lock.release()

