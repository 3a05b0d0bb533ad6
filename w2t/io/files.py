"""Writing files so that a reader never sees half of one, and one writer at a time: the library's
atomic-write and cross-process lock helpers."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"  # `.{name}.<random>.tmp` beside the target: what a killed writer leaves behind


def atomic_write(target: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a hidden temporary file beside `target`, then rename it into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would hide the file from other users
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def exclusive_lock(lock_file: str | Path) -> Iterator[bool]:
    """Hold an exclusive lock on `lock_file` across processes. Yields whether it is held: False where flock
    does not exist (Windows), and then a caller must not remove files another writer may be writing."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write_text(target: str | Path, text: str) -> None:
    atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
