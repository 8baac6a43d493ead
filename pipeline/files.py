"""File-system safety in one place: atomic writes, private temporary names, locks.

Every file another process may read is written to a temporary name unique to its
writer (host, process, random part) and renamed into place, so a reader sees the old
file or the new one, never half of one, and two writers never share a temporary.
Locks are ``fcntl`` locks on a lock file: the kernel releases them when their holder
dies, so a killed process (even ``kill -9``) never leaves a run or a registry locked.

No torch, ray or dask: the CLI and the config import it on login nodes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path


def temporary_name(path: str | Path) -> Path:
    """A name beside ``path`` that no other writer uses: ``.NAME.tmp-HOST-PID-RANDOM``."""
    path = Path(path)
    host = socket.gethostname().split(".")[0]
    return path.with_name(f".{path.name}.tmp-{host}-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a private temporary and a rename (fsynced, so a
    crash leaves the old file or the new one); ``mode`` sets the permissions (0o600 for
    secrets) before any byte is written."""
    path = Path(path)
    tmp = temporary_name(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries of ``path`` (see :func:`temporary_name`) whose writer was a
    process of this host that is gone (killed mid-write); a live writer's temporary and
    any other host's are kept. Returns what was removed."""
    path = Path(path)
    prefix, host = f".{path.name}.tmp-", socket.gethostname().split(".")[0]
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            parts = entry.name[len(prefix):].rsplit("-", 2)  # HOST-PID-RANDOM
            if (len(parts) != 3 or parts[0] != host or not parts[1].isdigit()
                    or _alive(int(parts[1]))):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def replace_folder(tmp: str | Path, path: str | Path) -> None:
    """Put the finished folder ``tmp`` at ``path``: what was there is moved aside to a
    private temporary, then removed, so a reader finds the old folder, none, or the new
    one whole - never a mix. A kill between the renames leaves only temporaries, which
    :func:`clean_stale` removes at the next write."""
    path = Path(path)
    old = temporary_name(path) if os.path.lexists(path) else None
    if old is not None:
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class Locked(Exception):
    """Another process holds the lock (raised by :func:`file_lock` with ``wait=False``)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by {holder or 'another process'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    ``wait=False`` raises :class:`Locked` at once, naming the holder (``host pid``, which
    the holder writes into the file), instead of queueing behind it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            raise Locked(path, handle.read().strip()) from None
        try:
            holder = f"{socket.gethostname()} {os.getpid()}\n"
            handle.seek(0)
            if handle.read() != holder:  # written only when it changes: no new mtime
                handle.seek(0)
                handle.truncate()
                handle.write(holder)
                handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
