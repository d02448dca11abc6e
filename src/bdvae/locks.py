"""An exclusive inter-process lock on a file, for work that two processes must not do at once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the duration of the block; a second
    process blocks until the first leaves it. Where flock does not exist (Windows) this is a
    no-op, and callers rely on their atomic renames alone."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
