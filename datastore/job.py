"""The resumable-job helper: every batch job's output directory, owned, locked and resumable.

Each batch job (datastore build, embeddings, dense and n-gram indexes, FM-index, neighbours)
writes one directory, its artifact. A builder opens it with :func:`open_job`, which

- creates the directory, or refuses it when it is not a retromem artifact of the same kind: a
  non-empty directory without a kind marker, or with another kind's, is neither written to nor
  deleted, so a mistyped ``--out`` never costs a user's files;
- takes an exclusive lock (``fcntl.flock`` on ``.retromem.lock``), held until the job ends, so a
  second job writing the same ``--out`` is refused at once with :class:`JobLockedError`;
- with ``overwrite=True`` empties the directory (an artifact of its own kind only), under the lock;
- records the kind in ``.retromem-artifact.json``.

Inside the job, work is cut into units; a finished unit leaves a done-marker, ``_work/NAME.json``
holding the unit's (JSON) result. :meth:`Job.map` runs a step over the units not yet done with a
local or Ray executor (:mod:`retromem.datastore.executors`) and yields every unit's result, the
done ones read back from their markers: the executor, not the step, skips finished work
(datatrove's rule), so a killed job re-run with the same command carries on where it stopped.
Steps write their outputs with :func:`atomic_path` / :func:`atomic_dir`, so a kill never leaves
half a file::

    with open_job(cfg.out, "embeddings", overwrite=overwrite, legacy=("embeddings.json",)) as job:
        if (job.path / "embeddings.json").exists():
            ...  # finished: check that it answers this request, and return it
        executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
        for shard, rec in job.map(executor, embed_shard, ctx, shards, marker=lambda s: f"shard-{s:05d}"):
            ...  # progress, totals
        job.seal("embeddings.json", manifest)  # the manifest last, with every file's size and checksum
        job.clear_work()  # optional: drop _work/ and its markers

The lock file stays in the finished directory (deleting a lock file others may be waiting on is a
race); it is empty but for the holder's pid and host.
"""

from __future__ import annotations

import fcntl
import re
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from retromem.datastore.atomic import atomic_dir, atomic_path, read_json, write_json
from retromem.datastore.integrity import SECTION, read_manifest, record_files
from retromem.errors import ConfigError, JobLockedError

__all__ = ["KINDS", "Job", "atomic_dir", "atomic_path", "open_job"]

KINDS = ("datastore", "embeddings", "dense-index", "ngram-index", "fm-index", "neighbours",
         "lexical-index")
MARKER = ".retromem-artifact.json"
LOCK = ".retromem.lock"
WORK = "_work"


def _kind_of(path: Path, legacy: Sequence[str], kind: str) -> str | None:
    """The artifact kind recorded in ``path``; ``kind`` for a marker-less directory holding one of
    the ``legacy`` files (written before markers existed); None when it is not an artifact."""
    marker = path / MARKER
    if marker.is_file():
        try:
            return str(read_json(marker)["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    if any((path / name).exists() for name in legacy):
        return kind
    return None


def _contents(path: Path) -> list[str]:
    # the marker's atomic-write temporary too: a job between taking the lock and writing its marker
    # (or killed there) leaves only that, and a second job must then meet the lock, not a refusal
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                  if p.name not in (LOCK, MARKER) and not p.name.startswith(f".{MARKER}.tmp-"))


def _check_owned(path: Path, kind: str, legacy: Sequence[str], overwrite: bool) -> None:
    """Raise unless ``path`` is absent, empty, or a retromem artifact of ``kind``."""
    if not path.exists():
        return
    if not path.is_dir():
        raise ConfigError(f"`--out` {path} is a file, not a directory; choose another --out")
    names = _contents(path)
    if not names and not (path / MARKER).exists():
        return
    found = _kind_of(path, legacy, kind)
    if found == kind:
        return
    what = "delete" if overwrite else "write into"
    if found is None:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") or f"an unreadable {MARKER}"
        raise ConfigError(f"`--out` {path} is not empty and holds no retromem {kind} (it holds {shown}); "
                          f"refusing to {what} it: choose another --out")
    raise ConfigError(f"`--out` {path} holds a retromem {found} (this job writes {kind}); refusing to "
                      f"{what} it: choose another --out")


class Job:
    """One job's output directory, locked for the job's life. Make it with :func:`open_job`."""

    def __init__(self, path: Path, kind: str, lock_fd: int) -> None:
        self.path = path
        self.kind = kind
        self.work = path / WORK
        self._lock_fd: int | None = lock_fd

    # -- done-markers ----------------------------------------------------------------------

    def marker(self, name: str) -> Path:
        """The done-marker file of unit ``name`` (a relative name such as ``tokenize/part-00003``)."""
        return self.work / f"{name}.json"

    def done(self, name: str) -> Any | None:
        """The recorded result of unit ``name``, or None when it has not finished."""
        path = self.marker(name)
        return read_json(path) if path.is_file() else None

    def mark_done(self, name: str, result: Any) -> None:
        """Record that unit ``name`` finished with ``result`` (JSON). Write its outputs first."""
        write_json(self.marker(name), result)

    def map(self, executor: Any, step: Callable[[Any, Any], Any], ctx: Any, items: Iterable[Any],
            marker: Callable[[Any], str]) -> Iterator[tuple[Any, Any]]:
        """``(item, result)`` for every item: done items from their markers (first), the rest from
        ``executor.map(step, ctx, todo)`` as they finish, each recorded done as it arrives.

        ``step(ctx, item)`` does one unit's work and returns its result (a JSON object); it does
        not check whether the unit is done. Results come back through the driver, which alone
        writes the markers, so workers on Ray need only write their own outputs.
        """
        todo = []
        for item in items:
            result = self.done(marker(item))
            if result is None:
                todo.append(item)
            else:
                yield item, result
        for item, result in executor.map(step, ctx, todo):
            self.mark_done(marker(item), result)
            yield item, result

    def finished(self, manifest_name: str, datastore_id: str, *, what: str,
                 error: type[Exception] = ConfigError) -> dict[str, Any] | None:
        """The manifest of the finished artifact here, or None when the job has not finished.

        An artifact is finished once its manifest is written (last). One built from another
        datastore is refused with ``error`` naming both ids, so a re-run never mixes them."""
        path = self.path / manifest_name
        if not path.exists():
            return None
        m = read_manifest(path)  # a damaged manifest is an error naming it, not a traceback
        if m.get("datastore_id") != datastore_id:
            raise error(f"{self.path} holds {what} of datastore {str(m.get('datastore_id', '?'))[:16]}, not of "
                        f"{datastore_id[:16]}; pass --overwrite or another --out")
        return m

    def seal(self, manifest_name: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the finished artifact's manifest (last: it says "complete") with the size and
        checksum of every other file here (:func:`retromem.datastore.integrity.record_files`), so
        opens can check sizes and verify can check every byte; returns what was written."""
        manifest = {**manifest, SECTION: record_files(self.path, exclude=(manifest_name,))}
        write_json(self.path / manifest_name, manifest)
        return manifest

    def clear_work(self) -> None:
        """Drop ``_work/`` (done-markers and intermediates) once the artifact is complete."""
        shutil.rmtree(self.work, ignore_errors=True)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Release the lock (closing the descriptor releases the flock)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _lock(path: Path) -> int:
    """Take ``path/.retromem.lock`` without waiting; JobLockedError naming the holder if taken."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise JobLockedError(f"another retromem job is writing {path} (held by {holder}); "
                             "wait for it to finish, or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def open_job(path: str | Path, kind: str, *, overwrite: bool = False, legacy: Sequence[str] = ()) -> Job:
    """Open (create, or resume in) the output directory of a ``kind`` job, locked; see the module doc.

    ``legacy``: file names (relative to ``path``) that identify a directory of this kind written
    before kind markers existed, such as its manifest; such a directory is adopted.
    ``overwrite``: empty the directory first (only ever an artifact of ``kind``).
    Use as a context manager (or call :meth:`Job.close`) so the lock is released.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {', '.join(KINDS)}")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(path)):  # s3://b/x (or a Path of it, s3:/b/x): never a local folder
        raise ConfigError(f"`--out` {path} is a URL: a job writes a local directory; wrap it in "
                          "retromem.storage.output_dir(url), which stages it and puts it to the URL (the CLI does)")
    path = Path(path)
    _check_owned(path, kind, legacy, overwrite)  # before writing anything there, even a lock file
    path.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    job = Job(path, kind, fd)
    try:
        _check_owned(path, kind, legacy, overwrite)  # again under the lock: the first look raced
        if overwrite:
            for entry in path.iterdir():
                if entry.name == LOCK:
                    continue  # ours, held: another job may be waiting to open it
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if not (path / MARKER).is_file():
            write_json(path / MARKER, {"kind": kind})
    except BaseException:
        job.close()
        raise
    return job
