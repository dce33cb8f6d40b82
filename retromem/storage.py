"""Where batch jobs read and write: local paths, or URLs of any fsspec filesystem (``s3://``,
``gs://``, ``az://``, ``hf://``, ``file://``, ``memory://``, ...).

One small module so that every job says the same thing in the same way:

- :func:`is_url` / :func:`url_fs`: a URL is ``protocol://...``; its filesystem comes from fsspec,
  and an unknown protocol or a missing implementation (``s3fs``, ``gcsfs``) is a ConfigError
  naming the flag and what to install.
- :func:`list_inputs` and :func:`open_input`: input files named by a URL of a file, a "directory"
  (prefix) or a glob, read as streams (decompression stays with the reader, by the file's name).
- :func:`local_dir`: an artifact (datastore, embeddings, index) at a URL, mirrored into a local
  cache directory, since memory-mapped files and native engines need local paths. The mirror is
  kept per URL and only changed files are fetched again (size and modification time or ETag),
  under a lock, so the tasks of one node share one copy.
- :func:`output_dir`: a job's output at a URL is written to a local staging directory (the same
  directory on a re-run, so the job resumes; pulled from the URL first when it is not here), then
  put to the URL when the job ends: the old top-level JSON files (the manifest and the kind
  marker) are removed first, every new or changed file is put, and the top-level JSON files go
  last. Files the job no longer has stay at the URL (the manifest names the artifact's files;
  another artifact may live below the same prefix, such as a datastore's embeddings), except after
  ``overwrite``, which replaces the whole tree as a local ``--overwrite`` empties the directory. Every
  retromem artifact's manifest is a top-level JSON file written last, so a reader never takes a
  half-written tree for a finished one. Once the put succeeded the staging directory is deleted (it
  would double the local disk an artifact takes); after a failed job or put it stays, to resume.
  ``overwrite`` pulls only the top-level JSON files (enough for the job to check that it replaces
  its own kind of artifact), never the old artifact itself.

The cache root is ``$RETROMEM_CACHE`` (default ``~/.cache/retromem``): ``remote/`` holds the
mirrors, ``staging/`` the outputs being written. ``memory://`` lives inside one process: worker
processes and Ray tasks see an empty one, so multi-process jobs want ``file://`` or a store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import IO, Any, Iterator

from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

# beside each cache directory (never inside: a job's output must start empty): its lock, and what it
# holds, {relative path: [size, version tag]} (a mirror: the remote's tags; staging: local mtimes at the last put)
LOCK_SUFFIX = ".sync-lock"
STATE_SUFFIX = ".sync.json"
_OWN = (".retromem.lock",)  # never copied either way: the job lock is per machine
# datastore/job.py's kind marker (this floor cannot import it): an overwrite pulls the top-level JSON
# files only where it is there to say whose the tree is; elsewhere everything, for the job to refuse
KIND_MARKER = ".retromem-artifact.json"
PRUNE_SUFFIX = ".overwrite"  # beside a staging directory: the next put replaces the URL's whole tree


def is_url(path: str | os.PathLike[str] | None) -> bool:
    """True for ``protocol://...`` (``file://`` too); False for a plain path."""
    return path is not None and "://" in str(path)


def url_fs(url: str, flag: str = "path") -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of ``url``; ConfigError naming ``flag`` when the protocol
    is unknown, its implementation is not installed, or nothing follows ``://``."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is a dependency
        raise ConfigError(f"`{flag}` {url!r} is a URL, which needs fsspec: pip install fsspec") from exc
    protocol, _, rest = url.partition("://")
    if not protocol or not rest.strip("/") and protocol != "file":
        raise ConfigError(f"`{flag}` must be a path or a URL such as s3://bucket/prefix, got {url!r}")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ValueError as exc:
        known = ", ".join(sorted(p for p in fsspec.available_protocols() if len(p) > 2)[:12])
        raise ConfigError(f"`{flag}` {url!r}: unknown protocol {protocol!r} (fsspec knows {known}, ...)") from exc
    except ImportError as exc:
        raise ConfigError(f"`{flag}` {url!r}: the {protocol}:// filesystem is not installed ({exc})") from exc
    return fs, path


def _join(url: str, rel: str) -> str:
    return url.rstrip("/") + "/" + rel


def _tag(info: dict[str, Any]) -> str:
    """A version tag of a remote file from its listing: ETag, else modification or creation time."""
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _mtime_ns(info: dict[str, Any]) -> int:
    """A listing's modification time in ns (0 when the filesystem gives none)."""
    import datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return int(v * 1e9)
        if isinstance(v, datetime.datetime):
            return int(v.timestamp() * 1e9)
        if isinstance(v, str):
            try:
                return int(datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


# -- inputs ----------------------------------------------------------------------------------


def list_inputs(spec: str, flag: str = "input") -> list[tuple[str, int, int]]:
    """``(url, size, mtime_ns)`` of the files a URL names: one file, every file below a prefix
    (sorted, hidden names skipped) or a glob's matches (sorted); ConfigError when none."""
    fs, path = url_fs(spec, flag)
    protocol = spec.partition("://")[0]

    def url_of(p: str) -> str:
        return fs.unstrip_protocol(p) if protocol != "file" else "file://" + p

    if any(ch in path for ch in "*?["):
        found = fs.glob(path, detail=True)
        rows = sorted((p, i) for p, i in found.items() if i.get("type") == "file")
        if not rows:
            raise ConfigError(f"input glob {spec!r} matches no file")
        return [(url_of(p), int(i.get("size") or 0), _mtime_ns(i)) for p, i in rows]
    if not fs.exists(path):
        raise ConfigError(f"input not found: {spec!r} is neither a file, a prefix nor a glob")
    if fs.isdir(path):
        base = path.rstrip("/")
        rows = sorted((p, i) for p, i in fs.find(base, detail=True).items()
                      if not any(part.startswith(".") for part in p[len(base):].strip("/").split("/")))
        if not rows:
            raise ConfigError(f"input directory {spec!r} holds no file")
        return [(url_of(p), int(i.get("size") or 0), _mtime_ns(i)) for p, i in rows]
    info = fs.info(path)
    return [(url_of(path), int(info.get("size") or 0), _mtime_ns(info))]  # one spelling: duplicates show


def node_path(path: str | os.PathLike[str] | None) -> str | None:
    """``path`` as the tasks of another process or node will read it: an existing local path made
    absolute (a Ray worker does not share this process's working directory); a URL as given (each
    node mirrors it: ``Path`` would fold ``s3://b/x`` into ``s3:/b/x``), and anything else (a built-in
    model name, a hub id, a path that does not exist here) as given."""
    if path is None:
        return None
    if is_url(path) or not Path(path).exists():
        return str(path)
    return str(Path(path).resolve())


def open_input(url: str, flag: str = "input") -> IO[bytes]:
    """A binary read stream of one file at ``url`` (not decompressed: the caller decides by name)."""
    fs, path = url_fs(url, flag)
    return fs.open(path, "rb")


# -- the local cache ------------------------------------------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get("RETROMEM_CACHE") or Path.home() / ".cache" / "retromem")


def _slot(kind: str, url: str) -> Path:
    digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return cache_root() / kind / f"{name}-{digest}"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory.with_name(directory.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # wait: another task of this node is syncing the same copy
        yield
    finally:
        os.close(fd)


def _read_state(directory: Path) -> dict[str, list]:
    try:
        return json.loads(directory.with_name(directory.name + STATE_SUFFIX).read_text())
    except (OSError, ValueError):
        return {}


def _write_state(directory: Path, state: dict[str, list]) -> None:
    dest = directory.with_name(directory.name + STATE_SUFFIX)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    os.replace(tmp, dest)


def _remote_files(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """Relative path -> listing of every file below ``path`` (an empty dict when there is none)."""
    base = path.rstrip("/")
    if not fs.exists(base):
        return {}
    out = {}
    for p, info in fs.find(base, detail=True).items():
        rel = p[len(base):].strip("/")
        if rel and rel.rsplit("/", 1)[-1] not in _OWN and info.get("type", "file") == "file":
            out[rel] = info
    return out


def _pull(fs: Any, path: str, local: Path, state: dict[str, list],
          remote: dict[str, dict[str, Any]] | None = None) -> dict[str, list]:
    """Make ``local`` mirror the files below ``path`` (or only ``remote``, a part of their listing):
    fetch new and changed files (each to a temporary name, then renamed), drop files the remote no
    longer has. Returns the new state."""
    remote = _remote_files(fs, path) if remote is None else remote
    new_state: dict[str, list] = {}
    for rel, info in sorted(remote.items()):
        tag = [int(info.get("size") or 0), _tag(info)]
        dest = local / rel
        if state.get(rel) == tag and dest.is_file() and dest.stat().st_size == tag[0]:
            new_state[rel] = tag
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        fs.get_file(path.rstrip("/") + "/" + rel, str(tmp))
        os.replace(tmp, dest)
        new_state[rel] = tag
    for p in sorted(local.rglob("*"), reverse=True):  # files the remote dropped, then empty folders
        rel = p.relative_to(local).as_posix()
        if p.is_file() and rel not in remote and p.name not in _OWN:
            p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    return new_state


def local_dir(path: str | os.PathLike[str], flag: str = "artifact") -> Path:
    """``path`` itself when local; for a URL, its local mirror, brought up to date (see the module
    doc). A URL with nothing below it is a ConfigError naming ``flag``."""
    if not is_url(path):
        return Path(path)
    url = str(path)
    fs, rpath = url_fs(url, flag)
    if url.startswith("file://"):
        return Path(rpath)  # already local: no copy
    local = _slot("remote", url)
    with _locked(local):
        if not _remote_files(fs, rpath):
            raise ConfigError(f"`{flag}` {url!r} holds no file: nothing was written there (or not yet)")
        _write_state(local, _pull(fs, rpath, local, _read_state(local)))
    return local


# -- outputs ---------------------------------------------------------------------------------


def _is_last(rel: str) -> bool:
    # the manifest (and the kind marker) of every retromem artifact: top-level JSON, written last
    return "/" not in rel and rel.endswith(".json")


def put_tree(local: Path, url: str, flag: str = "--out", *, prune: bool = False) -> int:
    """Put the job directory ``local`` to ``url``, top-level JSON files last (see the module doc);
    files unchanged since the last put (size and mtime) are skipped. ``prune``: also delete the
    files at ``url`` that ``local`` does not have (before the manifest goes up), so that the URL
    holds exactly this tree, as an overwritten local directory does. Returns the files put."""
    fs, rpath = url_fs(url, flag)
    base = rpath.rstrip("/")
    with _locked(local):
        state = _read_state(local)
        files = {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*"))
                 if p.is_file() and p.name not in _OWN and not p.name.endswith(".part")}
        stamp = {rel: [p.stat().st_size, str(p.stat().st_mtime_ns)] for rel, p in files.items()}
        remote = _remote_files(fs, rpath)
        changed = [rel for rel in files if state.get(rel) != stamp[rel] or rel not in remote]
        stale = sorted(rel for rel in remote if rel not in files) if prune else []
        if changed or stale:
            for rel in sorted(r for r in remote if _is_last(r)):  # "not finished" while the tree changes
                fs.rm_file(f"{base}/{rel}")
        for rel in sorted(rel for rel in changed if not _is_last(rel)):
            fs.makedirs(f"{base}/{rel}".rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(files[rel]), f"{base}/{rel}")
        for rel in stale:  # the overwritten artifact's files (its top-level JSON went above)
            if not _is_last(rel):
                fs.rm_file(f"{base}/{rel}")
        for rel in sorted(rel for rel in files if _is_last(rel)):  # all of them: the first loop removed them
            fs.put_file(str(files[rel]), f"{base}/{rel}")
        _write_state(local, stamp)
    logger.info("put %d files to %s%s", len(changed), url, f", deleted {len(stale)} old ones" if stale else "")
    return len(changed)


def _job_running(staging: Path) -> bool:
    """Whether a job holds the job lock inside ``staging`` (another process of this node writing it)."""
    lock = staging / _OWN[0]
    if not lock.is_file():
        return False
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the flock taken here
    return False


def _drop_staging(staging: Path) -> None:
    """Delete a staging directory and its state once its tree is at the URL (not while a job of
    another process writes in it; its own put will clear it)."""
    with _locked(staging):
        if _job_running(staging):
            logger.info("staging %s kept: a job is writing it", staging)
            return
        shutil.rmtree(staging, ignore_errors=True)
        for suffix in (STATE_SUFFIX, PRUNE_SUFFIX):
            staging.with_name(staging.name + suffix).unlink(missing_ok=True)


@contextlib.contextmanager
def output_dir(path: str | os.PathLike[str], flag: str = "--out", *, overwrite: bool = False) -> Iterator[Path]:
    """The local directory a job writes: ``path`` itself when local; for a URL, a staging directory
    kept per URL (pulled from the URL first when it is empty here, so a job begun elsewhere resumes)
    and put to the URL when the block ends without an error, then deleted. After an error (in the
    job or the put) the staging directory stays, and the same command resumes from it.

    ``overwrite`` (the job's ``--overwrite``): the old artifact is not downloaded, only its top-level
    JSON files (its kind marker and manifest, for the job to check it replaces its own kind; a tree
    without the marker is pulled whole, so that the job refuses it as it would locally), and the put
    deletes the old files the new tree does not have. The overwrite is remembered beside the staging
    directory until a put succeeds, so a resumed run without the flag still replaces the tree."""
    if not is_url(path):
        yield Path(path)
        return
    url = str(path)
    fs, rpath = url_fs(url, flag)
    if url.startswith("file://"):
        yield Path(rpath)
        return
    staging = _slot("staging", url)
    prune_flag = staging.with_name(staging.name + PRUNE_SUFFIX)
    with _locked(staging):
        remote = _remote_files(fs, rpath) if not any(p.name not in _OWN for p in staging.iterdir()) else {}
        if overwrite:
            prune_flag.touch()
            if KIND_MARKER in remote:
                remote = {rel: info for rel, info in remote.items() if _is_last(rel)}
        if remote:
            state = _pull(fs, rpath, staging, {}, remote)
            _write_state(staging, {rel: [(staging / rel).stat().st_size, str((staging / rel).stat().st_mtime_ns)]
                                   for rel in state})
    yield staging
    put_tree(staging, url, flag, prune=prune_flag.exists())
    _drop_staging(staging)


def clear_staging(path: str) -> None:
    """Drop the staging directory of an output URL (a failed job's, to start again from the URL),
    with what is recorded beside it (its put state, a pending overwrite)."""
    if is_url(path):
        staging = _slot("staging", str(path))
        shutil.rmtree(staging, ignore_errors=True)
        for suffix in (STATE_SUFFIX, PRUNE_SUFFIX):
            staging.with_name(staging.name + suffix).unlink(missing_ok=True)


__all__ = ["cache_root", "clear_staging", "is_url", "list_inputs", "local_dir", "node_path", "open_input",
           "output_dir", "put_tree", "url_fs"]
