"""Integrity of finished artifacts: every file's size and checksum, recorded when it is written,
checked cheaply on every open and fully on verify.

Every batch job (datastore, embeddings, dense / n-gram / FM index, neighbour table) finishes by
writing its manifest with :meth:`retromem.datastore.job.Job.seal`, which adds a section::

    "integrity": {"algorithm": "sha256", "files": {"arrays/tokens.npy": {"bytes": 123, "sha256": "..."}, ...}}

listing every file of the artifact (paths relative to it) but the manifest itself, the kind marker,
the lock and ``_work/``. Openers call :func:`check_sizes` (one ``stat`` per file: a truncated or
extended file is refused before anything memory-maps it) and read manifests and ``.npy`` files
through :func:`read_manifest` and :func:`load_npy`, which turn a damaged one into an
:class:`~retromem.errors.ArtifactCorruptError` naming the file instead of a traceback.
:func:`verify_artifact` recomputes every checksum (a full read, streamed in 4 MiB blocks, several
files at once) and names each damaged file. Artifacts written before checksums were recorded
have no section: verify says so and the openers fall back to their structural checks.

Same-size damage inside a file (flipped bytes) is found only by a checksum; which openers pay for
one on every open is each opener's decision (the n-gram index does, for the files its native
engine would crash on).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retromem.datastore.atomic import sha256_file
from retromem.errors import ArtifactCorruptError, DatastoreError

ALGORITHM = "sha256"
SECTION = "integrity"
MARKER = ".retromem-artifact.json"
WORK = "_work"
# the manifest of each artifact kind, the file written last
MANIFESTS = {"datastore": "manifest.json", "embeddings": "embeddings.json", "dense-index": "index.json",
             "ngram-index": "ngram_index.json", "fm-index": "fm_index.json", "neighbours": "neighbours.json",
             "lexical-index": "lexical_index.json", "model": "checksums.json"}


MANIFEST_NAMES_DATASTORE = MANIFESTS["datastore"]


def _threads(n_files: int) -> int:
    # hashlib releases the GIL on large updates: a few files hash in parallel
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus, n_files))


def artifact_files(root: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """Relative paths of the files an artifact holds: everything under ``root`` but ``_work/``,
    dot-files (the kind marker, the lock, temporaries of atomic writes) and ``exclude``."""
    root = Path(root)
    skip = set(exclude)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (rel_dir == Path(".") and d == WORK))
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if not name.startswith(".") and rel not in skip:
                out.append(rel)
    return sorted(out)


def record_files(root: str | Path, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The integrity section of the artifact at ``root``: size and checksum of every file."""
    root = Path(root)
    files = artifact_files(root, exclude)
    with ThreadPoolExecutor(_threads(len(files))) as pool:
        digests = list(pool.map(lambda f: sha256_file(root / f), files))
    return {"algorithm": ALGORITHM,
            "files": {f: {"bytes": (root / f).stat().st_size, ALGORITHM: d} for f, d in zip(files, digests)}}


def recorded_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The recorded ``{relpath: {bytes, sha256}}`` of a manifest, or None for an artifact written
    before checksums were recorded."""
    sec = manifest.get(SECTION) if isinstance(manifest, dict) else None
    if not isinstance(sec, dict) or not isinstance(sec.get("files"), dict):
        return None
    return sec["files"]


def _size_problem(path: Path, expected: int) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size == expected:
        return None
    how = "truncated" if size < expected else "extended"
    return f"{size:,} bytes, but {expected:,} were written ({how})"


def check_sizes(root: str | Path, manifest: dict[str, Any], *, names: Sequence[str] | None = None,
                error: type[ArtifactCorruptError] = ArtifactCorruptError) -> None:
    """Raise ``error`` naming the first recorded file (of ``names``, or all) that is missing or
    whose size differs from the manifest's; nothing for an artifact without recorded checksums."""
    files = recorded_files(manifest)
    if files is None:
        return
    root = Path(root)
    for rel, rec in files.items():
        if names is not None and rel not in names:
            continue
        what = _size_problem(root / rel, int(rec["bytes"]))
        if what is not None:
            raise error(root / rel, f"{what}; the artifact is damaged: rebuild it or restore the file")


def check_size(path: Path, expected: int, *, error: type[ArtifactCorruptError] = ArtifactCorruptError) -> None:
    """Raise ``error`` unless ``path`` exists with ``expected`` bytes (a size recorded elsewhere)."""
    what = _size_problem(path, expected)
    if what is not None:
        raise error(path, f"{what}; the artifact is damaged: rebuild it or restore the file")


def verify_files(root: str | Path, manifest: dict[str, Any], names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``(relpath, what is wrong)`` for every recorded file (of ``names``, or all) that is missing,
    has another size, or another checksum; empty when all match."""
    files = recorded_files(manifest) or {}
    root = Path(root)
    todo = [(rel, rec) for rel, rec in files.items() if names is None or rel in names]
    problems: list[tuple[str, str]] = []
    to_hash = []
    for rel, rec in todo:
        what = _size_problem(root / rel, int(rec["bytes"]))
        if what is not None:
            problems.append((rel, what))
        else:
            to_hash.append((rel, rec))
    with ThreadPoolExecutor(_threads(len(to_hash))) as pool:
        digests = list(pool.map(lambda r: sha256_file(root / r[0]), to_hash))
    for (rel, rec), d in zip(to_hash, digests):
        if d != rec[ALGORITHM]:
            problems.append((rel, f"{ALGORITHM} checksum differs from the one recorded when it was written "
                                  "(same size: bytes changed in place)"))
    return sorted(problems)


# -- reading files defensively --------------------------------------------------------------------


def read_manifest(path: str | Path, *, error: type[ArtifactCorruptError] = ArtifactCorruptError) -> dict[str, Any]:
    """A manifest (JSON object), or ``error`` naming the file when it does not parse."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(path, f"not valid JSON ({exc}): the manifest is damaged; rebuild the artifact") from None
    if not isinstance(obj, dict):
        raise error(path, f"holds a JSON {type(obj).__name__}, not an object: the manifest is damaged; rebuild the artifact")
    return obj


def npy_header(path: Path, *, error: type[ArtifactCorruptError] = ArtifactCorruptError) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of an ``.npy`` file, checked against the file's size, without
    mapping it; ``error`` naming the file when the header does not parse or the size disagrees."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as fh:
            major, _ = fmt.read_magic(fh)
            if major == 1:
                shape, fortran, dtype = fmt.read_array_header_1_0(fh)
            elif major in (2, 3):
                shape, fortran, dtype = fmt.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unknown .npy version {major}")
            offset = fh.tell()
    except FileNotFoundError:
        raise error(path, "missing; the artifact is damaged: rebuild it or restore the file") from None
    except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as exc:
        raise error(path, f"its .npy header does not parse ({str(exc).splitlines()[0][:160]})") from None
    if dtype.hasobject:
        raise error(path, "its .npy header declares Python objects; retromem arrays never hold them")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != offset + nbytes:
        how = "truncated" if size < offset + nbytes else "extended"
        raise error(path, f"{size:,} bytes, but its .npy header says {shape} {dtype} ({offset + nbytes:,} bytes): {how}")
    return tuple(int(x) for x in shape), dtype, offset


def load_npy(path: str | Path, *, shape: Sequence[int] | None = None, dtype: Any = None, mmap: bool = True,
             error: type[ArtifactCorruptError] = ArtifactCorruptError) -> np.ndarray:
    """``np.load`` of an artifact's array (memory-mapped by default) after checking its header and
    size, and the shape and dtype the manifest expects; ``error`` naming the file otherwise."""
    path = Path(path)
    got_shape, got_dtype, _ = npy_header(path, error=error)
    if shape is not None and tuple(got_shape) != tuple(int(x) for x in shape):
        raise error(path, f"holds an array of shape {got_shape}, the manifest expects {tuple(shape)}")
    if dtype is not None and got_dtype != np.dtype(dtype):
        raise error(path, f"holds {got_dtype} values, the manifest expects {np.dtype(dtype)}")
    if mmap and int(np.prod(got_shape, dtype=np.int64)) == 0:
        mmap = False  # an empty file region cannot be memory-mapped
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# -- saved models --------------------------------------------------------------------------------


def seal_model_dir(root: str | Path) -> Path:
    """Record the size and checksum of every file of a saved model directory (weights, configs,
    tokenizer) in ``checksums.json``, written last; a model directory is then an artifact of kind
    ``model`` that ``retromem index verify`` checks like any other."""
    from retromem.datastore.atomic import write_json

    root = Path(root)
    name = MANIFESTS["model"]
    write_json(root / name, {"kind": "model", SECTION: record_files(root, exclude=[name])})
    return root / name


def check_model_dir(root: str | Path) -> None:
    """Before a saved model is loaded: every recorded file present, of its size and checksum (the
    weights are read whole by the load anyway; a flipped weight would otherwise load silently).
    ArtifactCorruptError naming the first damaged file; nothing for a directory saved without
    ``checksums.json`` (an older save, a Hugging Face download)."""
    root = Path(root)
    path = root / MANIFESTS["model"]
    if not path.is_file():
        return
    problems = verify_files(root, read_manifest(path))
    if problems:
        rel, what = problems[0]
        raise ArtifactCorruptError(root / rel, f"{what}; the saved model is damaged: restore it or train again")


# -- verifying a whole artifact -------------------------------------------------------------------


def version_problems(root: str | Path) -> list[tuple[str, str]]:
    """What a datastore's integrity section cannot cover: ``manifest.json`` must be the byte-for-byte
    copy of its own version's file ``versions/vNNNNN.json`` (each later version records the earlier
    version files); ``(relpath, what)`` for both when they differ."""
    root = Path(root)
    mpath = root / MANIFEST_NAMES_DATASTORE
    try:
        version = int(read_manifest(mpath).get("version", 1))
    except (ArtifactCorruptError, OSError, TypeError, ValueError):
        return []  # the manifest itself is reported by whoever read it
    rel = f"versions/v{version:05d}.json"
    if not (root / rel).is_file():
        return [] if version == 1 else [(rel, "missing: the version manifest.json names has no version file")]
    if (root / rel).read_bytes() != mpath.read_bytes():
        what = f"differs from its copy (manifest.json and {rel} are written with the same bytes): one of them is damaged"
        return [(rel, what), (MANIFEST_NAMES_DATASTORE, what)]
    return []


def artifact_kind(path: str | Path) -> str:
    """The kind recorded in the artifact's marker, or guessed from its manifest's name (artifacts
    written before markers existed); DatastoreError when ``path`` is not a retromem artifact."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text())["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            kind = None
        if kind in MANIFESTS:
            return kind
    for kind, name in MANIFESTS.items():
        if (path / name).is_file():
            return kind
    raise DatastoreError(f"{path} is not a retromem artifact: no {MARKER} and none of "
                         f"{', '.join(sorted(set(MANIFESTS.values())))}")


@dataclass
class VerifyReport:
    """What :func:`verify_artifact` found: ``problems`` are ``(relpath, what)``; ``recorded`` is
    False for an artifact written before checksums were recorded (then only structure was checked)."""

    path: Path
    kind: str
    recorded: bool
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_artifact(path: str | Path, kind: str | None = None) -> VerifyReport:
    """Recompute the checksum of every file the artifact at ``path`` recorded; name each damaged
    one (and an unreadable manifest). Structural checks are the openers' job."""
    path = Path(path)
    kind = kind or artifact_kind(path)
    name = MANIFESTS[kind]
    t0 = time.perf_counter()
    if not (path / name).is_file():
        return VerifyReport(path, kind, False, problems=[(name, "missing: the artifact is unfinished or damaged")])
    try:
        manifest = read_manifest(path / name)
    except ArtifactCorruptError as exc:
        return VerifyReport(path, kind, False, problems=[(name, exc.what)])
    files = recorded_files(manifest)
    if files is None:
        return VerifyReport(path, kind, False, seconds=time.perf_counter() - t0)
    problems = verify_files(path, manifest)
    if kind == "datastore":
        problems = sorted(problems + version_problems(path))
    return VerifyReport(path, kind, True, len(files), sum(int(r["bytes"]) for r in files.values()),
                        time.perf_counter() - t0, problems)


__all__ = ["ALGORITHM", "MANIFESTS", "SECTION", "VerifyReport", "artifact_files", "artifact_kind", "check_size",
           "check_model_dir", "check_sizes", "load_npy", "seal_model_dir", "npy_header", "read_manifest", "record_files", "recorded_files", "verify_artifact", "version_problems",
           "verify_files"]
