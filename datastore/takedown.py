"""The takedown's proof side: compaction that removes deleted documents' bytes, and the check that
none remain.

**Probes.** When documents are deleted (:mod:`retromem.datastore.tombstones`) their *probes* are
kept: a 64-bit hash of one 32-byte window at the start of every chunk of their UTF-8 text (the
last window of the document for a chunk too close to its end), and of the first 16 tokens of
every chunk as uint16 bytes and the first 8 as uint32 bytes (the two widths token streams are
stored in: the datastore's arrays and the n-gram index use the narrowest that holds the
vocabulary, the Parquet chunk shards uint32). Chunks tile a document, so any surviving piece of
one chunk or more is caught; the hashes cannot be read back into the text. A document shorter
than one window (32 bytes, or 8 tokens) has no probe of that kind and is reported as unprobed.

**Check** (:func:`check`, ``retromem datastore check-takedown DS [--index DIR ...]``): every file
under the given directories is scanned — raw bytes, and for Parquet the decoded column buffers
(string, binary and list values: compressed pages hide nothing), for ``.gz`` / ``.zst`` / ``.npz``
the decompressed bytes — by hashing every 32-byte window (a rolling polynomial hash, vectorised)
and looking the hashes up among the probes. A probe that also occurs in the datastore's live
documents (shared boilerplate, a licence header) proves nothing either way and is left out, and
counted. Any hit names the file and the doc id.

**Compaction** (:func:`compact`, ``retromem datastore compact DS``) rewrites every segment that holds
deleted documents not yet purged into a new directory: their text is dropped from ``text.bin``
and the documents Parquet, their token rows become padding with length 0, their chunks' spans
empty, their metadata null; ids do not move. The new version (``min_readable_version``) makes
older versions unreadable, and the superseded segment files are deleted.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retromem.datastore.atomic import atomic_path, sha256_file
from retromem.datastore.dedup import _powers
from retromem.datastore.integrity import SECTION, read_manifest
from retromem.datastore.job import open_job
from retromem.datastore.segments import (CHUNK_ARRAYS, DOC_ARRAYS, ensure_version_file, file_records, list_versions,
                                         next_integrity, publish_version, remove_files, shard_arrays_sha256, version_file)
from retromem.datastore.store import Datastore

logger = logging.getLogger(__name__)

WINDOW = 32  # bytes per probe window
KINDS = ("text", "tokens-uint16", "tokens-uint32")
_BASE = 0x100000001B3
_BLOCK = 1 << 20


@lru_cache(maxsize=1)
def _tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    return _powers(_BASE, n)


def window_hashes(buf: np.ndarray | bytes) -> np.ndarray:
    """(len - WINDOW + 1,) uint64 hash of every WINDOW-byte window of ``buf`` (position-independent
    polynomial hash modulo 2**64 from prefix sums; processed in 1 MiB blocks)."""
    b = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else np.asarray(buf, np.uint8).reshape(-1)
    n = len(b) - WINDOW + 1
    if n <= 0:
        return np.zeros(0, np.uint64)
    pw, inv = _tables(_BLOCK + WINDOW)
    out = np.empty(n, np.uint64)
    for k in range(0, n, _BLOCK):
        seg = b[k:k + _BLOCK + WINDOW - 1].astype(np.uint64)
        m = len(seg)
        prefix = np.zeros(m + 1, np.uint64)
        np.cumsum(seg * pw[:m], dtype=np.uint64, out=prefix[1:])
        cnt = m - WINDOW + 1
        out[k:k + cnt] = (prefix[WINDOW:WINDOW + cnt] - prefix[:cnt]) * inv[:cnt]
    # no finalizer: equal windows give equal hashes, and a collision could only add a false
    # finding, never hide one; the scan's cost is a few passes per byte (BENCHMARKS.md)
    return out


def _probe_hashes(mat: np.ndarray) -> np.ndarray:
    """Hashes of the rows of a (n, WINDOW) uint8 matrix: each equals ``window_hashes(row)[0]``."""
    pw, _ = _tables(_BLOCK + WINDOW)
    return (mat.astype(np.uint64) * pw[:WINDOW]).sum(axis=1, dtype=np.uint64)


def _window_starts(lengths: np.ndarray, owner: np.ndarray, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, start) of one window per chunk: at the chunk's start, pulled back so it fits in its
    document (``lengths[owner]``); none for documents shorter than ``width``."""
    length = lengths[owner]
    keep = length >= width
    return keep, np.minimum(starts, length - width)[keep]


def doc_probes(ds: Datastore, doc_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """Probes of the given documents (read with ``include_deleted``; their shards verified),
    vectorised per segment: arrays ``doc_id`` (int64), ``kind`` (uint8, index into KINDS) and
    ``hash`` (uint64), one row per probe (duplicates within a document dropped)."""
    docs = np.unique(np.asarray(doc_ids, dtype=np.int64))
    ds._check_ids(docs, "doc_id", include_deleted=True)
    L = ds.chunk_length
    widths = [(1, np.uint16)] if int(ds.manifest["tokenizer"]["vocab_size"]) <= 1 << 16 else []
    widths.append((2, np.uint32))
    out_doc, out_kind, out_hash = [], [], []
    for s, sel, local in ds._groups(docs, "doc"):
        seg = ds._segs[s]
        gdocs = docs[sel]
        lo = np.asarray(seg.doc_first_chunk[local], np.int64)
        n = np.asarray(seg.doc_first_chunk[local + 1], np.int64) - lo
        rows = np.repeat(lo - np.concatenate(([0], np.cumsum(n)[:-1])), n) + np.arange(int(n.sum()), dtype=np.int64)
        ds._verified_chunks(rows + seg.first_chunk_id)
        owner = np.repeat(np.arange(len(gdocs)), n)  # index into gdocs of every chunk
        pos = rows - lo[owner]  # chunk position in its document
        # text: one window per chunk start (byte offsets inside the document)
        b0 = np.asarray(seg.doc_bytes[local], np.int64)
        blen = np.asarray(seg.doc_bytes[local + 1], np.int64) - b0
        cstart = np.asarray(seg.byte_spans[rows, 0], np.int64) - b0[owner]
        keep, st = _window_starts(blen, owner, cstart, WINDOW)
        text = np.asarray(seg.text)
        mat = text[(b0[owner][keep] + st)[:, None] + np.arange(WINDOW)]
        out_doc.append(gdocs[owner[keep]])
        out_kind.append(np.zeros(len(st), np.uint8))
        out_hash.append(_probe_hashes(mat))
        # tokens: each document's stream (padding dropped), one window per chunk start
        ntok = np.asarray(seg.chunk_ntok[rows], np.int64)
        toks = np.asarray(seg.tokens[rows])
        flat = toks[np.arange(L)[None, :] < ntok[:, None]]
        tlen = np.bincount(owner, weights=ntok, minlength=len(gdocs)).astype(np.int64)
        toff = np.concatenate(([0], np.cumsum(tlen)[:-1]))
        for kind, dtype in widths:
            width = WINDOW // np.dtype(dtype).itemsize
            keep, st = _window_starts(tlen, owner, pos * L, width)
            win = flat[(toff[owner][keep] + st)[:, None] + np.arange(width)].astype(dtype)
            out_doc.append(gdocs[owner[keep]])
            out_kind.append(np.full(len(st), kind, np.uint8))
            out_hash.append(_probe_hashes(np.ascontiguousarray(win).view(np.uint8).reshape(-1, WINDOW)))
    doc = np.concatenate(out_doc) if out_doc else np.zeros(0, np.int64)
    kind = np.concatenate(out_kind) if out_kind else np.zeros(0, np.uint8)
    h = np.concatenate(out_hash) if out_hash else np.zeros(0, np.uint64)
    uniq = np.unique(np.stack([doc.astype(np.uint64), kind.astype(np.uint64), h], axis=1), axis=0)
    return {"doc_id": uniq[:, 0].astype(np.int64), "kind": uniq[:, 1].astype(np.uint8), "hash": uniq[:, 2]}


# -- the check -------------------------------------------------------------------------------


@dataclass
class TakedownReport:
    """What :func:`check` found: ``found`` holds (file, doc_id, kind) for every deleted document
    with a probe in a file; ``ok`` when none."""

    deleted_docs: int = 0
    probes: int = 0
    shared_probes: int = 0  # also in live documents: left out
    unprobed_docs: int = 0  # too short for a window
    files: int = 0
    bytes: int = 0
    found: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.found


def load_probes(ds: Datastore) -> dict[str, np.ndarray]:
    """Every probe of the documents deleted as of ``ds``'s version."""
    parts = []
    for rel in ds.manifest.get("takedown_probes", []):
        with np.load(ds.path / rel) as z:
            parts.append({k: z[k] for k in ("doc_id", "kind", "hash")})
    if not parts:
        return {"doc_id": np.zeros(0, np.int64), "kind": np.zeros(0, np.uint8), "hash": np.zeros(0, np.uint64)}
    return {k: np.concatenate([p[k] for p in parts]) for k in ("doc_id", "kind", "hash")}


def _live_buffers(ds: Datastore) -> Iterator[np.ndarray]:
    """The live documents' text, and their tokens in both widths, segment by segment."""
    for i in range(len(ds.segments)):
        seg = ds.segment_arrays(i)
        docs = np.arange(seg.n_docs, dtype=np.int64) + seg.first_doc_id
        live = ds.is_live_doc(docs)
        lengths = np.diff(np.asarray(seg.doc_bytes, dtype=np.int64))
        yield np.asarray(seg.text)[np.repeat(live, lengths)]
        rows = ds.live_chunks(np.arange(seg.n_chunks, dtype=np.int64) + seg.first_chunk_id)
        toks = np.asarray(seg.tokens)[rows]
        yield toks.astype(np.uint16).reshape(-1).view(np.uint8)
        yield toks.astype(np.uint32).reshape(-1).view(np.uint8)


def _arrow_buffers(arr: pa.Array) -> Iterator[np.ndarray]:
    t = arr.type
    if pa.types.is_dictionary(t):
        yield from _arrow_buffers(arr.dictionary)
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        yield from _arrow_buffers(arr.flatten())
    elif pa.types.is_struct(t):
        for j in range(t.num_fields):
            yield from _arrow_buffers(arr.field(j))
    else:
        bufs = arr.buffers()
        data = bufs[2] if len(bufs) > 2 and bufs[2] is not None else (bufs[1] if len(bufs) > 1 else None)
        if data is not None and data.size:
            yield np.frombuffer(data, dtype=np.uint8)


def file_buffers(path: Path) -> Iterator[np.ndarray]:
    """The bytes to scan of one file: raw, plus decoded columns (Parquet) or decompressed members."""
    name = path.name.lower()
    size = path.stat().st_size
    if size:
        yield np.memmap(path, dtype=np.uint8, mode="r")
    try:
        if name.endswith(".parquet"):
            table = pq.read_table(path)
            for col in table.columns:
                for chunk in col.chunks:
                    yield from _arrow_buffers(chunk)
        elif name.endswith(".gz"):
            yield np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8)
        elif name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(open(path, "rb")) as r:
                yield np.frombuffer(r.read(), np.uint8)
        elif name.endswith((".npz", ".zip")):
            with zipfile.ZipFile(path) as z:
                for member in z.namelist():
                    yield np.frombuffer(z.read(member), np.uint8)
    except Exception as exc:  # an undecodable file still had its raw bytes scanned
        logger.warning("%s: scanned raw only (%s: %s)", path, type(exc).__name__, exc)


def _walk(paths: Sequence[str | Path]) -> Iterator[Path]:
    for p in paths:
        p = Path(p)
        if p.is_file():
            yield p
        else:
            yield from sorted(q for q in p.rglob("*") if q.is_file() and not q.is_symlink())


_SIEVE_BITS = 22


def _sieve(h: np.ndarray) -> np.ndarray:
    """A bitmap over the top bits of the probe hashes: one gather per window rules out almost all."""
    sieve = np.zeros(1 << _SIEVE_BITS, dtype=bool)
    sieve[h >> np.uint64(64 - _SIEVE_BITS)] = True
    return sieve


def _present(h: np.ndarray, sieve: np.ndarray, wh: np.ndarray) -> np.ndarray:
    """(len(h),) bool: which probes occur among the window hashes ``wh``."""
    cand = wh[sieve[wh >> np.uint64(64 - _SIEVE_BITS)]]
    return np.isin(h, cand) if len(cand) else np.zeros(len(h), dtype=bool)


def check(paths: Sequence[str | Path], ds: Datastore) -> TakedownReport:
    """Scan every file under ``paths`` for the probes of ``ds``'s deleted documents (see the module
    docstring); the report names each file and doc id found."""
    probes = load_probes(ds)
    rep = TakedownReport(deleted_docs=len(ds.deleted_doc_ids))
    rep.unprobed_docs = int(len(np.setdiff1d(ds.deleted_doc_ids, probes["doc_id"][probes["kind"] == 0])))
    h = probes["hash"]
    shared = np.zeros(len(h), dtype=bool)
    if len(h):
        sieve = _sieve(h)
        for buf in _live_buffers(ds):
            shared |= _present(h, sieve, window_hashes(buf))
    rep.shared_probes = int(shared.sum())
    keep = ~shared
    h, docs, kinds = h[keep], probes["doc_id"][keep], probes["kind"][keep]
    rep.probes = int(len(h))
    sieve = _sieve(h)
    for f in _walk(paths):
        rep.files += 1
        rep.bytes += f.stat().st_size
        if not len(h):
            continue
        found: set[tuple[int, str]] = set()
        for buf in file_buffers(f):
            hit = _present(h, sieve, window_hashes(buf))
            found.update(zip(docs[hit].tolist(), (KINDS[k] for k in kinds[hit].tolist())))
        for d, kind in sorted(found):
            rep.found.append((str(f), d, kind))
    return rep


# -- compaction ------------------------------------------------------------------------------


@dataclass
class CompactResult:
    version: int | None  # the new version (None: nothing to compact)
    segments: list[str]  # rewritten
    purged_docs: int  # newly purged by this compaction
    bytes_freed: int
    bytes_written: int


def compact(path: str | Path) -> CompactResult:
    """Rewrite the segments holding deleted documents without their bytes, as a new version; delete
    the superseded files (older versions become unreadable). See the module docstring."""
    path = Path(path)
    with open_job(path, "datastore", legacy=("manifest.json",)):
        ensure_version_file(path)
        ds = Datastore.open(path)
        bm = ds.manifest
        dead = ds.deleted_doc_ids
        v = ds.version + 1
        todo, n_purged = [], 0
        for i, seg in enumerate(ds.segments):
            rec = bm["segments"][i]
            in_seg = dead[(dead >= seg.first_doc_id) & (dead < seg.first_doc_id + seg.n_docs)]
            fresh = np.setdiff1d(in_seg, np.asarray(rec.get("purged_doc_ids", []), np.int64))
            if len(fresh):
                todo.append((i, in_seg))
                n_purged += len(fresh)
        if not todo:
            return CompactResult(None, [], 0, 0, 0)
        segments = [dict(r) for r in bm["segments"]]
        shards = [dict(s) for s in bm["shards"]]
        new_files: dict[str, Any] = {}
        old_rels: set[str] = set()
        for i, in_seg in todo:
            rec = segments[i]
            rel = f"segments/{rec['name']}-c{v:05d}"
            s0, ns = int(rec["first_shard"]), int(rec["n_shards"])
            new_rec, new_shards = _rewrite_segment(ds, i, rec, shards[s0:s0 + ns], in_seg, path, rel)
            old_rels |= _segment_files(rec, shards[s0:s0 + ns])
            segments[i] = new_rec
            shards[s0:s0 + ns] = new_shards
            new_files |= file_records(path, rel)
        m = {k: val for k, val in bm.items() if k != SECTION}
        m.update({"version": v, "parent_version": ds.version, "operation": "compact", "created": _now(),
                  "segments": segments, "shards": shards, "min_readable_version": v,
                  "counts": {**bm["counts"], "text_bytes": sum(int(r["text_bytes"]) for r in segments),
                             "tokens": sum(int(r["n_tokens"]) for r in segments)}})
        if len(segments) == 1:
            m["arrays"] = segments[0]["arrays"]
        else:
            m.pop("arrays", None)
        m[SECTION] = next_integrity(bm, new_files, remove=old_rels)
        publish_version(path, m)
        # superseded: every segment file some version recorded that this one does not read
        keep = set(m[SECTION]["files"])
        stale = set()
        for old_v in list_versions(path):
            om = read_manifest(path / version_file(old_v))
            for s in om.get("shards", []):
                stale |= {s[k]["path"] for k in ("documents_file", "chunks_file", "removed_file") if k in s}
            for sg in om.get("segments", []):
                stale |= {a["file"] for a in sg.get("arrays", {}).values()}
        freed = remove_files(path, stale - keep)
        if (path / "_work").is_dir() and (path / "manifest.json").is_file():  # a kept work dir (--keep-work) holds staged text
            shutil.rmtree(path / "_work")
        written = sum(int(r["bytes"]) for r in new_files.values())
        return CompactResult(v, [segments[i]["name"] for i, _ in todo], n_purged, freed, written)


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _segment_files(rec: dict[str, Any], shards: list[dict[str, Any]]) -> set[str]:
    out = {a["file"] for a in rec["arrays"].values()}
    for s in shards:
        out |= {s[k]["path"] for k in ("documents_file", "chunks_file", "removed_file")}
    return out


def _rewrite_segment(ds: Datastore, i: int, rec: dict[str, Any], shards: list[dict[str, Any]], dead: np.ndarray,
                     root: Path, rel: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Segment ``i`` without the bytes of documents ``dead`` (global ids), written under ``rel``."""
    seg = ds.segment_arrays(i)
    out = root / rel
    if out.exists():
        shutil.rmtree(out)  # a compaction killed before it published: start this segment over
    (out / "arrays").mkdir(parents=True)
    d0 = seg.first_doc_id
    purge = np.zeros(seg.n_docs, dtype=bool)
    purge[dead - d0] = True
    doc_bytes = np.asarray(seg.doc_bytes, np.int64)
    lengths = np.diff(doc_bytes)
    new_lengths = np.where(purge, 0, lengths)
    new_doc_bytes = np.concatenate(([0], np.cumsum(new_lengths))).astype(np.int64)
    text = np.asarray(seg.text)[np.repeat(~purge, lengths)]
    chunk_doc = np.asarray(seg.chunk_doc, np.int64)
    chunk_purged = purge[chunk_doc]
    spans = np.asarray(seg.byte_spans, np.int64) - doc_bytes[chunk_doc][:, None] + new_doc_bytes[chunk_doc][:, None]
    spans[chunk_purged] = new_doc_bytes[chunk_doc[chunk_purged]][:, None]
    ntok = np.where(chunk_purged, 0, np.asarray(seg.chunk_ntok)).astype(np.int32)
    tokens = np.array(seg.tokens)
    tokens[chunk_purged] = ds.pad_token_id
    arrays = {"tokens": tokens, "chunk_doc_ids": chunk_doc, "chunk_ntokens": ntok, "chunk_byte_spans": spans,
              "doc_first_chunk": np.asarray(seg.doc_first_chunk, np.int64), "doc_byte_offsets": new_doc_bytes}
    for name, arr in arrays.items():
        with atomic_path(out / "arrays" / f"{name}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
    with atomic_path(out / "arrays" / "text.bin") as tmp:
        tmp.write_bytes(text.tobytes())
    new_shards = []
    for s, shard in enumerate(shards):
        lc, n = seg.shard_first_chunk[s], int(shard["chunks"])
        ld, nd = seg.shard_first_doc[s], int(shard["documents"])
        new = dict(shard)
        for key, kind in (("documents_file", "documents"), ("chunks_file", "chunks"), ("removed_file", "removed")):
            src = root / shard[key]["path"]
            dst_rel = f"{rel}/{kind}/{Path(shard[key]['path']).name}"
            t = pq.read_table(src)
            if kind == "documents":
                t = _blank_documents(t, purge[ld:ld + nd])
            elif kind == "chunks":
                t = _blank_chunks(t, chunk_purged[lc:lc + n], tokens[lc:lc + n], ntok[lc:lc + n])
            with atomic_path(root / dst_rel) as tmp:
                pq.write_table(t, tmp, compression="zstd", row_group_size=8192)
            new[key] = {"path": dst_rel, "sha256": sha256_file(root / dst_rel), "rows": t.num_rows,
                        "bytes": (root / dst_rel).stat().st_size}
        new["tokens_sha256"] = _sha(tokens[lc:lc + n].tobytes())
        b0, b1 = int(new_doc_bytes[ld]), int(new_doc_bytes[ld + nd])
        new["text_sha256"] = _sha(text[b0:b1].tobytes())
        new["text_bytes"] = b1 - b0
        new["tokens"] = int(ntok[lc:lc + n].sum())
        new["arrays_sha256"] = shard_arrays_sha256(arrays, lc, n, ld, nd)
        new_shards.append(new)
    prefix = rel + "/"
    new_rec = dict(rec, dir=rel, text_bytes=int(len(text)), n_tokens=int(ntok.sum()),
                   purged_doc_ids=sorted(set(rec.get("purged_doc_ids", [])) | set(dead.tolist())),
                   arrays={name: dict(a, file=prefix + "arrays/" + Path(a["file"]).name) if name != "text"
                           else dict(a, file=prefix + "arrays/text.bin", bytes=int(len(text)))
                           for name, a in rec["arrays"].items()})
    assert set(CHUNK_ARRAYS + DOC_ARRAYS) <= set(new_rec["arrays"])
    return new_rec, new_shards


def _sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _blank_documents(t: pa.Table, purge: np.ndarray) -> pa.Table:
    mask = pa.array(purge)
    for name in t.column_names:
        col = t.column(name)
        if name == "text":
            col = pc.if_else(mask, pa.scalar("", col.type), col)
        elif name in ("content_hash",):
            col = pc.if_else(mask, pa.scalar("", col.type), col)
        elif name == "n_tokens":
            col = pc.if_else(mask, pa.scalar(0, col.type), col)
        elif name.startswith("metadata."):
            col = pc.if_else(mask, pa.scalar(None, col.type), col)
        else:
            continue
        t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), col)
    return t


def _blank_chunks(t: pa.Table, purge: np.ndarray, tokens: np.ndarray, ntok: np.ndarray) -> pa.Table:
    mask = pa.array(purge)
    valid = np.arange(tokens.shape[1])[None, :] < ntok[:, None]
    toks = pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(ntok))).astype(np.int32)),
                                    pa.array(tokens[valid].astype(np.uint32), pa.uint32()))
    t = t.set_column(t.schema.get_field_index("tokens"), t.schema.field("tokens"), toks.cast(t.schema.field("tokens").type))
    for name in ("char_start", "char_end"):
        col = t.column(name)
        t = t.set_column(t.schema.get_field_index(name), t.schema.field(name), pc.if_else(mask, pa.scalar(0, col.type), col))
    return t


__all__ = ["KINDS", "WINDOW", "CompactResult", "TakedownReport", "check", "compact", "doc_probes", "file_buffers",
           "load_probes", "window_hashes"]
