"""Disk space for batch jobs: a check before a job starts writing, and one clear error when the disk
fills anyway.

A job states what it will write with :func:`preflight` (its output directory and an estimate of the
bytes still to write). When the filesystem has less free, the job is refused at once with a
:class:`DiskFullError` naming the directory, the space needed and the space free, before any work.
When the disk fills during the job regardless (an estimate is an estimate; other writers share the
disk), the failure arrives in many shapes: ``OSError`` ENOSPC from Python, ``EFBIG`` under a file
size limit, a plain ``Exception("No space left on device (os error 28)")`` from a Rust library
(tokenizers), a panic text from a Rust subprocess (the infini-gram indexer). :func:`is_disk_full`
recognises all of them and :func:`disk_full_message` turns them into one line naming the output
directory, the estimate and the free space, so the command line ends with ``error: ...`` and exit 2.
Nothing half-written is ever opened as valid (every job writes its manifest last), and re-running
the same command after freeing space resumes the job.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from retromem.errors import DiskFullError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXTS = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "file too large",
               "os error 27", "errno 28", "sigxfsz")

# the jobs running in this process that stated their needs: output directory -> (bytes, what)
_expected: dict[str, tuple[int, str]] = {}


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def existing_parent(path: str | Path) -> Path:
    """``path`` or its nearest existing ancestor (where a new directory would be created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    """Bytes free for an unprivileged writer on the filesystem that holds (or would hold) ``path``."""
    return int(shutil.disk_usage(existing_parent(path)).free)


def used_bytes(path: str | Path) -> int:
    """Bytes already under ``path`` (0 when it does not exist): a resumed job has written them."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    total = 0
    for root, _, files in os.walk(p):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def preflight(out: str | Path, needed: int, what: str) -> None:
    """Refuse to start ``what`` (e.g. "the datastore build") writing about ``needed`` bytes under
    ``out`` when its filesystem has less free than the part not yet written; remember the estimate
    for :func:`disk_full_message` otherwise."""
    remaining = max(0, int(needed) - used_bytes(out))
    _expected[str(Path(out).absolute())] = (int(needed), what)
    free = free_bytes(out)
    if remaining > free:
        raise DiskFullError(f"{out}: {what} needs about {fmt_bytes(remaining)} more, and the filesystem holding it has "
                            f"{fmt_bytes(free)} free; free some space or choose another output directory")


def forget() -> None:
    """Drop the estimates of earlier jobs (a command starts with a clean slate)."""
    _expected.clear()


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or a file-size limit is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DiskFullError):
            return False  # already a clear message
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def disk_full_message(exc: BaseException) -> str:
    """One line for a job that ran out of space: the output directory, what it needed, what is free."""
    filename = getattr(exc, "filename", None)
    target = None
    if _expected:
        if filename is None:  # no path in the error (a native library's): the job started last in this process
            target = next(reversed(_expected))
        else:  # the job whose directory holds the file that failed, if any
            target = next((d for d in _expected if str(Path(filename).absolute()).startswith(d + os.sep)), None)
    where = target or (str(filename) if filename is not None else None)
    parts = [f"{where}: " if where else "", "no space left on device"]
    text = str(exc).lower()
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG or "too large" in text or "sigxfsz" in text:
        parts[1] = "a file outgrew the file size limit (ulimit -f) or the filesystem's"
    if target is not None:
        needed, what = _expected[target]
        parts.append(f" during {what}, which needs about {fmt_bytes(needed)} in all")
    if where is not None:
        parts.append(f"; {fmt_bytes(free_bytes(where))} free there now")
    parts.append(". Free some space (or choose another output directory) and re-run the same command: it resumes")
    return "".join(parts)


__all__ = ["DiskFullError", "disk_full_message", "existing_parent", "fmt_bytes", "free_bytes", "is_disk_full",
           "forget", "preflight", "used_bytes"]
