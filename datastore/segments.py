"""Segments and versions of a datastore: the on-disk layout that lets a datastore grow and forget.

A datastore is a sequence of immutable *segments*; each holds a contiguous range of doc ids and
chunk ids (ids continue from one segment to the next and never change) in the layout a fresh
build writes: memory-mapped arrays (tokens, chunk -> document map, byte spans, offsets, text) with
ids *local* to the segment, and Parquet shards whose ``doc_id`` / ``chunk_id`` columns are global.
A fresh build is one segment at the datastore's root (``arrays/``, ``documents/``, ...);
``retromem datastore add`` writes the next under ``segments/seg-NNNNN/``; compaction rewrites a
segment into a new directory.

A *version* is one JSON file, ``versions/vNNNNN.json``, naming everything a reader needs: its
segments, the tombstone file of deleted documents, the audit log entries, the persisted dedup
state and, in its ``integrity`` section, the size and checksum of every file it reads (paths
relative to the datastore root: a copied or moved datastore opens). A version file is written
once, atomically (temporary + rename), after every file it names is complete, so a reader always
sees a whole version and a writer killed before the rename leaves the previous version as the
newest. ``manifest.json`` is a copy of the newest version (what a datastore of format 1 without
``versions/`` holds alone; such a datastore opens as version 1 with one segment).

:class:`Segment` opens one segment's arrays with the structural checks of issue 15 (sizes, ``.npy``
headers, monotone offsets, chunks inside their documents) and verifies a shard's checksums
before its rows are read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retromem.datastore.atomic import atomic_path, sha256_file
from retromem.datastore.integrity import SECTION, check_size, load_npy, read_manifest, record_files
from retromem.errors import ArtifactCorruptError, DatastoreError

VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"
FULL_CHECK_CHUNKS = 1 << 20  # chunk arrays up to this many rows are checked whole on open; beyond, a sample
FULL_CHECK_DOCS = 1 << 22  # document arrays likewise
SAMPLE_ROWS = 1 << 16  # rows of the chunk arrays checked on open beyond FULL_CHECK_CHUNKS
CHUNK_ARRAYS = ("chunk_doc_ids", "chunk_ntokens", "chunk_byte_spans")  # rows per chunk
DOC_ARRAYS = ("doc_first_chunk", "doc_byte_offsets")  # rows per document (+1)


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a version: its name, the version that added it, and its id ranges."""

    name: str
    version_added: int
    first_doc_id: int
    n_docs: int
    first_chunk_id: int
    n_chunks: int
    n_tokens: int


def shard_arrays_sha256(arrays: dict[str, np.ndarray], first_chunk: int, chunks: int, first_doc: int, docs: int) -> str:
    """sha256 of one shard's rows of the chunk and document arrays (rows local to the segment;
    recorded by the build as ``arrays_sha256``; reads verify it)."""
    h = hashlib.sha256()
    for name in CHUNK_ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][first_chunk:first_chunk + chunks]).tobytes())
    for name in DOC_ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][first_doc:first_doc + docs]).tobytes())
    return h.hexdigest()


# -- version files ---------------------------------------------------------------------------


def version_file(version: int) -> str:
    return f"{VERSIONS_DIR}/v{version:05d}.json"


def list_versions(root: str | Path) -> list[int]:
    """Version numbers with a version file, ascending (empty for a format-1 datastore)."""
    d = Path(root) / VERSIONS_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        if p.name.startswith("v") and p.name.endswith(".json") and p.name[1:-5].isdigit():
            out.append(int(p.name[1:-5]))
    return sorted(out)


def _single_segment(m: dict[str, Any]) -> dict[str, Any]:
    """The segment record of a datastore written before segments existed (one, at the root)."""
    c = m["counts"]
    return {"name": "seg-00001", "dir": ".", "version_added": 1, "first_doc_id": 0, "n_docs": int(c["documents"]),
            "first_chunk_id": 0, "n_chunks": int(c["chunks"]), "n_tokens": int(c["tokens"]),
            "text_bytes": int(c["text_bytes"]), "arrays": m["arrays"], "first_shard": 0, "n_shards": len(m["shards"]),
            "purged_doc_ids": []}


def load_version(root: str | Path, version: int | None = None) -> tuple[dict[str, Any], str]:
    """(manifest, version_id) of ``version`` (default: the current one) of the datastore at ``root``.

    ``manifest.json`` names the current version (a copy of its version file); ``versions/vN.json``
    the others. A datastore without ``versions/`` opens as version 1. The version id is the
    sha256 of the version file's bytes."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.exists():
        hint = " (an unfinished build: re-run `retromem datastore build` to finish it)" if (root / "_work").exists() else ""
        raise DatastoreError(f"{root} is not a datastore: no manifest.json{hint}")
    path = mpath
    current = read_manifest(mpath)
    cv = current.get("version", 1)
    if version is not None and int(version) != cv:
        v = int(version)
        versions = list_versions(root)
        if v not in versions or v > cv:
            shown = f"its versions are {min(versions + [cv])}..{cv}"
            raise DatastoreError(f"{root} has no version {v}; {shown} (`retromem datastore log {root}` lists them)")
        floor = int(current.get("min_readable_version", 1))
        if v < floor:
            raise DatastoreError(f"version {v} of {root} is no longer readable: compaction at version {floor} removed "
                                 f"the files holding deleted documents; open version {floor} or later")
        path = root / version_file(v)
    raw = path.read_bytes()
    m = read_manifest(path) if path != mpath else current
    try:
        m.setdefault("version", 1)
        if "segments" not in m:
            m["segments"] = [_single_segment(m)]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactCorruptError(path, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                         "the manifest is damaged; rebuild the datastore") from None
    return m, hashlib.sha256(raw).hexdigest()


def current_version(root: str | Path) -> int:
    """The version ``manifest.json`` names (1 for a datastore without versions)."""
    return int(read_manifest(Path(root) / MANIFEST).get("version", 1))


def publish_version(root: str | Path, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` as version ``manifest["version"]`` (refusing an existing one), then as
    ``manifest.json``; returns the version id. Call with the datastore's job lock held, after
    every file the version names is written."""
    import json

    root = Path(root)
    v = int(manifest["version"])
    path = root / version_file(v)
    if path.exists():  # only a publish killed before its manifest.json rename: ensure_version_file rolls it forward
        raise DatastoreError(f"{root} already has version {v}: another writer got there first; retry")
    # the earlier version files are immutable: this version's integrity section covers them (its own
    # file cannot be; verify compares it with manifest.json, its byte-for-byte copy)
    files = manifest.setdefault(SECTION, {"algorithm": "sha256", "files": {}}).setdefault("files", {})
    for old in list_versions(root):
        rel = version_file(old)
        if old < v and rel not in files:
            files[rel] = {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)}
    manifest[SECTION]["files"] = dict(sorted(files.items()))
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def ensure_version_file(root: str | Path) -> None:
    """Before a writer starts (under the job lock): give a datastore built before versions existed
    its ``versions/v00001.json``; and roll forward a publish killed between writing its version
    file (complete: written atomically) and copying it to ``manifest.json``."""
    root = Path(root)
    versions = list_versions(root)
    if not (root / MANIFEST).is_file():
        return
    if not versions:
        with atomic_path(root / version_file(1)) as tmp:
            tmp.write_bytes((root / MANIFEST).read_bytes())
    elif versions[-1] > current_version(root):
        with atomic_path(root / MANIFEST) as tmp:
            tmp.write_bytes((root / version_file(versions[-1])).read_bytes())


def file_records(root: str | Path, rel_dir: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Integrity records (size, sha256) of every file under ``root/rel_dir``, keyed by their
    paths relative to ``root`` (what a version's integrity section holds)."""
    sub = Path(root) / rel_dir
    files = record_files(sub, exclude=exclude)["files"]
    prefix = "" if rel_dir in ("", ".") else rel_dir.rstrip("/") + "/"
    return {prefix + k: v for k, v in files.items()}


def next_integrity(base: dict[str, Any], add: dict[str, Any], remove: set[str] = frozenset()) -> dict[str, Any]:
    """The integrity section of a new version: the base version's files less ``remove``, plus
    ``add`` (only new files are hashed: a version costs what it writes, not the datastore's size)."""
    files = {k: v for k, v in (base.get(SECTION, {}).get("files", {}) or {}).items() if k not in remove}
    files.update(add)
    return {"algorithm": "sha256", "files": dict(sorted(files.items()))}


# -- one segment's arrays --------------------------------------------------------------------


class Segment:
    """One segment's memory-mapped arrays (local ids), opened after size and header checks.

    ``first_doc_id`` / ``first_chunk_id`` turn local rows into global ids; ``shards`` are the
    version's shard records of this segment (global ids, root-relative paths)."""

    def __init__(self, root: Path, rec: dict[str, Any], shards: list[dict[str, Any]], chunk_length: int,
                 limits: tuple[int, int, int] = (FULL_CHECK_CHUNKS, FULL_CHECK_DOCS, SAMPLE_ROWS)) -> None:
        self.root = root
        self.limits = limits  # (chunks checked whole, documents checked whole, sample rows beyond)
        self.rec = rec
        self.name = str(rec["name"])
        self.first_doc_id = int(rec["first_doc_id"])
        self.first_chunk_id = int(rec["first_chunk_id"])
        self.n_docs = int(rec["n_docs"])
        self.n_chunks = int(rec["n_chunks"])
        self.chunk_length = chunk_length
        self.shards = shards
        # documents whose text and tokens compaction removed (global ids): their chunks are empty rows
        self.purged = np.asarray(sorted(rec.get("purged_doc_ids", [])), dtype=np.int64)
        spec = rec["arrays"]

        def array(name: str) -> np.ndarray:
            return load_npy(root / spec[name]["file"], shape=spec[name]["shape"], dtype=spec[name]["dtype"])

        self.files = {name: root / spec[name]["file"] for name in spec}
        self.tokens = array("tokens")
        self.chunk_doc = array("chunk_doc_ids")
        self.chunk_ntok = array("chunk_ntokens")
        self.byte_spans = array("chunk_byte_spans")
        self.doc_first_chunk = array("doc_first_chunk")
        self.doc_bytes = array("doc_byte_offsets")
        size = int(spec["text"]["bytes"])
        check_size(self.files["text"], size)
        self.text = np.memmap(self.files["text"], dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        n, d = self.n_chunks, self.n_docs
        for name, arr, rows in (("tokens", self.tokens, n), ("chunk_doc_ids", self.chunk_doc, n),
                                ("chunk_ntokens", self.chunk_ntok, n), ("chunk_byte_spans", self.byte_spans, n),
                                ("doc_first_chunk", self.doc_first_chunk, d + 1), ("doc_byte_offsets", self.doc_bytes, d + 1)):
            if arr.shape[0] != rows:
                raise ArtifactCorruptError(self.files[name], f"has {arr.shape[0]} rows, the manifest counts {rows}")
        if self.tokens.ndim != 2 or self.tokens.shape[1] != chunk_length:
            raise ArtifactCorruptError(self.files["tokens"], f"has shape {self.tokens.shape}, not (chunks, {chunk_length})")
        self.shard_first_doc = [int(s["first_doc_id"]) - self.first_doc_id for s in shards]
        self.shard_first_chunk = [int(s["first_chunk_id"]) - self.first_chunk_id for s in shards]
        self.check_structure()

    @property
    def info(self) -> SegmentInfo:
        r = self.rec
        return SegmentInfo(self.name, int(r["version_added"]), self.first_doc_id, self.n_docs, self.first_chunk_id,
                           self.n_chunks, int(r["n_tokens"]))

    def corrupt(self, name: str, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(self.files["text" if name == "text.bin" else name], what)

    def check_structure(self) -> None:
        """Offsets monotone and in range (vectorised; chunk rows sampled beyond FULL_CHECK_CHUNKS)."""
        n, d = self.n_chunks, self.n_docs
        size = len(self.text)
        full_chunks, full_docs, sample = self.limits
        docs = np.arange(d, dtype=np.int64) if d <= full_docs else np.linspace(0, d - 1, sample).astype(np.int64)
        for name, arr, total in (("doc_first_chunk", self.doc_first_chunk, n), ("doc_byte_offsets", self.doc_bytes, size)):
            lo, hi = np.asarray(arr[docs], dtype=np.int64), np.asarray(arr[docs + 1], dtype=np.int64)
            if arr[0] != 0 or arr[-1] != total or (hi < lo).any() or (lo > total).any():
                raise self.corrupt(name, f"offsets are not monotone from 0 to {total:,}: the file is damaged")
        if n == 0:
            return
        whole = n <= full_chunks
        if whole:
            rows = np.arange(n, dtype=np.int64)
        else:  # an even sample, and the first and last chunk of every (sampled) document
            first = np.asarray(self.doc_first_chunk[docs], dtype=np.int64)
            ends = np.concatenate((first, np.asarray(self.doc_first_chunk[docs + 1], dtype=np.int64) - 1))
            rows = np.unique(np.concatenate((np.linspace(0, n - 1, sample).astype(np.int64), ends[(ends >= 0) & (ends < n)])))
        self.check_rows(rows, whole)

    def check_rows(self, rows: np.ndarray, whole: bool = False) -> None:
        """Chunk rows ``rows`` (local) consistent with the document arrays: each chunk inside its
        document's chunk range and byte range, token counts in 1..chunk_length (full only at a
        document's end; 0 for the empty rows of a document compaction purged)."""
        d, L, size = self.n_docs, self.chunk_length, len(self.text)
        first = self.doc_first_chunk
        doc = np.asarray(self.chunk_doc[rows], dtype=np.int64)
        if ((doc < 0) | (doc >= d)).any():
            bad = rows[(doc < 0) | (doc >= d)][0]
            raise self.corrupt("chunk_doc_ids", f"chunk {int(bad) + self.first_chunk_id} names document "
                                                f"{int(self.chunk_doc[bad]) + self.first_doc_id}, outside its segment: the file is damaged")
        lo, hi = np.asarray(first[doc], dtype=np.int64), np.asarray(first[doc + 1], dtype=np.int64)
        if ((rows < lo) | (rows >= hi)).any():
            bad = int(rows[(rows < lo) | (rows >= hi)][0])
            raise self.corrupt("chunk_doc_ids", f"chunk {bad + self.first_chunk_id} names document "
                                                f"{int(self.chunk_doc[bad]) + self.first_doc_id}, whose chunks are elsewhere "
                                                "(doc_first_chunk.npy disagrees): one of them is damaged")
        spans = np.asarray(self.byte_spans[rows], dtype=np.int64).reshape(-1, 2)
        b0, b1 = np.asarray(self.doc_bytes[doc], dtype=np.int64), np.asarray(self.doc_bytes[doc + 1], dtype=np.int64)
        bad = (spans[:, 0] < b0) | (spans[:, 0] > spans[:, 1]) | (spans[:, 1] > b1) | (spans[:, 1] > size)
        if whole and len(spans):  # the spans tile the text
            bad[1:] |= spans[1:, 0] != spans[:-1, 1]
            bad[0] |= spans[0, 0] != 0
            bad[-1] |= spans[-1, 1] != size
        if bad.any():
            raise self.corrupt("chunk_byte_spans", f"chunk {int(rows[bad][0]) + self.first_chunk_id} has byte span "
                                                   f"{spans[bad][0].tolist()}, outside its document's text: the file is damaged")
        ntok = np.asarray(self.chunk_ntok[rows], dtype=np.int64)
        last = rows == hi - 1
        purged = np.isin(doc + self.first_doc_id, self.purged) if len(self.purged) else np.zeros(len(rows), bool)
        bad = np.where(purged, ntok != 0, (ntok < 1) | (ntok > L) | (~last & (ntok != L)))
        if bad.any():
            raise self.corrupt("chunk_ntokens", f"chunk {int(rows[bad][0]) + self.first_chunk_id} has {int(ntok[bad][0])} "
                                                f"tokens; chunks hold {L} (fewer only at a document's end): the file is damaged")

    def verify_shard(self, s: int) -> None:
        """Check shard ``s`` (index into this segment's shards) against its recorded checksums:
        tokens, text and the chunk/document array rows; ArtifactCorruptError naming the file."""
        rec = self.shards[s]
        c0, n = self.shard_first_chunk[s], int(rec["chunks"])
        d0, nd = self.shard_first_doc[s], int(rec["documents"])
        g0 = c0 + self.first_chunk_id
        if "tokens_sha256" in rec and hashlib.sha256(np.ascontiguousarray(self.tokens[c0:c0 + n]).tobytes()).hexdigest() != rec["tokens_sha256"]:
            raise self.corrupt("tokens", f"the tokens of chunks {g0}..{g0 + n - 1} (segment {self.name}, shard {s}) "
                                         "differ from their recorded checksum: the file is damaged")
        if "text_sha256" in rec and nd:
            b0, b1 = int(self.doc_bytes[d0]), int(self.doc_bytes[d0 + nd])
            if hashlib.sha256(self.text[b0:b1].tobytes()).hexdigest() != rec["text_sha256"]:
                gd = d0 + self.first_doc_id
                raise self.corrupt("text.bin", f"the text of documents {gd}..{gd + nd - 1} (bytes {b0:,}..{b1:,}, "
                                               f"segment {self.name}, shard {s}) differs from its recorded checksum: the file is damaged")
        if "arrays_sha256" in rec:
            arrays = {"chunk_doc_ids": self.chunk_doc, "chunk_ntokens": self.chunk_ntok, "chunk_byte_spans": self.byte_spans,
                      "doc_first_chunk": self.doc_first_chunk, "doc_byte_offsets": self.doc_bytes}
            if shard_arrays_sha256(arrays, c0, n, d0, nd) != rec["arrays_sha256"]:
                raise ArtifactCorruptError(self.files["tokens"].parent, f"the chunk and document arrays of shard {s} "
                                           f"(chunks {g0}..{g0 + n - 1}, segment {self.name}) differ from their recorded "
                                           f"checksum: one of {', '.join(CHUNK_ARRAYS + DOC_ARRAYS)} is damaged")


def remove_files(root: Path, rels: set[str]) -> int:
    """Delete the files ``rels`` (root-relative) and the directories they leave empty; bytes freed."""
    freed = 0
    dirs = set()
    for rel in sorted(rels):
        p = root / rel
        if p.is_file():
            freed += p.stat().st_size
            p.unlink()
            dirs.add(p.parent)
    for d in sorted(dirs, key=lambda x: len(x.parts), reverse=True):
        while d != root and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent
    return freed


__all__ = ["CHUNK_ARRAYS", "DOC_ARRAYS", "MANIFEST", "Segment", "SegmentInfo", "VERSIONS_DIR", "current_version",
           "ensure_version_file", "file_records",
           "list_versions", "load_version", "next_integrity", "publish_version", "remove_files", "shard_arrays_sha256",
           "version_file"]
