"""The ground floor for files: atomic writes, text and JSON writing, an inter-process lock.

Every file bdvae writes goes through `atomic_path`: written under a temporary name in the same
folder, flushed to disk, then renamed into place, so a reader (or a power cut) sees the old file
or the new one, never half of one. This module imports nothing of bdvae.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _os_error(e: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or one a library wrote into its message
    (safetensors: "... No space left on device (os error 28)"); None for anything else."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The one boundary of bdvae's writes: a failure of the disk (full, read-only, no permission),
    whether the block's writer raised it as an OSError or wrapped it in its own error, comes out
    as an OSError naming `path`, the file asked for, never the temporary one; the file that was at
    `path` before is left as it was."""
    path = Path(path)
    with _named(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with _named(path):
            yield Path(tmp)
            _finish(Path(tmp), path, umask)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """A failure of the disk inside the block, as an OSError naming `path`."""
    try:
        yield
    except Exception as e:
        code = _os_error(e)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from None


def _finish(tmp: Path, path: Path, umask: int) -> None:
    """Give the written temporary file the user's permissions, put it on disk, rename it onto `path`."""
    # mkstemp makes 0600 files, and so does safetensors' save_file, which writes the file anew:
    # the user's usual permissions, given once the block has written it.
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as written:  # on disk before the rename, so a power cut leaves old or new
        os.fsync(written.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


NON_FINITE = "non_finite"  # the key under which strict_json says which values it wrote as null, and why


def _finite(value: Any, where: str, found: dict[str, str]) -> Any:
    """`value` with NaN and infinite floats as None, each one's path and value noted in `found`."""
    if isinstance(value, float) and not math.isfinite(value):
        found[where] = repr(value)  # "nan", "inf", "-inf"
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}/{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}/{i}", found) for i, v in enumerate(value)]
    return value


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON that strict readers take (no NaN or Infinity tokens): a non-finite number is written as
    null, and a dict gets a NON_FINITE entry naming each such value's path and what it was."""
    found: dict[str, str] = {}
    clean = _finite(value, "", found)
    if found and isinstance(clean, dict):
        clean[NON_FINITE] = found
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented strict JSON (strict_json) with a final newline, atomically."""
    write_text(path, strict_json(value, indent=2) + "\n")


@contextlib.contextmanager
def file_lock(path: Path, tidy_on_error: bool = False) -> Iterator[None]:
    """Hold an flock on `path` (created if missing) for the duration of the block; a second
    process blocks until the first leaves it. Where flock does not exist (Windows) this is a
    no-op, and callers rely on their atomic renames alone.

    `tidy_on_error`: when the block raises, remove the lock file, and its folder where this call
    made it and nothing else is there, so a first attempt that failed leaves nothing behind. A
    waiter that then gets the removed file's lock notices and locks the path anew.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    made = [] if path.parent.exists() else [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()  # the file was removed while we waited for it: lock the new one
    try:
        yield
    except BaseException:
        if tidy_on_error:
            path.unlink(missing_ok=True)
            for folder in made:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
