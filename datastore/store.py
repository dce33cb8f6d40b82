"""Read API of a built datastore: chunks, continuations, documents, metadata and tombstones.

A reader opens one consistent *version* (:mod:`retromem.datastore.segments`): the newest, or
one named. A version is a list of immutable segments with contiguous id ranges; random access
never touches Parquet: each segment's token array (``n_chunks x chunk_length``, uint16 or
uint32), chunk -> document map, byte spans and concatenated text are memory-mapped
``.npy``/``.bin`` files, and a global id finds its segment by a binary search over the segment
starts, so fetching a chunk's tokens and its continuation by ``chunk_id`` stays O(1) per id.
Parquet shards are the canonical, portable copy (documents with typed metadata columns, chunks
with spans and tokens) and are read for iteration and metadata.

Deleted documents (``retromem datastore delete``) stay in the files until compaction; the
version's tombstones mark them, and every read of a deleted id raises
:class:`~retromem.errors.DocumentDeletedError` unless ``include_deleted=True`` (for the index
jobs that must subtract or purge them).

Damage never reaches a caller as a crash or a wrong answer (issue 15). Opening checks, before
anything is memory-mapped, every recorded file's size, the ``.npy`` headers against the manifest's
shapes and dtypes, and the offsets (:class:`~retromem.datastore.segments.Segment`). Then every
read (tokens, texts, documents, doc ids) first verifies the checksums of the shard(s) it touches,
once per shard and process (0.18 s per 16 MiB shard of python-docs on a loaded 2-core machine,
BENCHMARKS.md); the bulk arrays ``token_array`` and ``text_bytes`` verify every shard on first
access. :meth:`Datastore.verify` checks every file's checksum. A failure is an
:class:`~retromem.errors.ArtifactCorruptError` naming the file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retromem.datastore import schema
from retromem.datastore.atomic import sha256_file
from retromem.datastore.integrity import check_sizes, read_manifest, recorded_files, verify_files, version_problems
from retromem.datastore.segments import (CHUNK_ARRAYS, DOC_ARRAYS, FULL_CHECK_CHUNKS, FULL_CHECK_DOCS, SAMPLE_ROWS,
                                         Segment, SegmentInfo, current_version, load_version, shard_arrays_sha256)
from retromem import storage
from retromem.errors import ArtifactCorruptError, ConfigError, DatastoreError, DocumentDeletedError

__all__ = ["CHUNK_ARRAYS", "DOC_ARRAYS", "FULL_CHECK_CHUNKS", "FULL_CHECK_DOCS", "SAMPLE_ROWS", "Chunk", "Datastore",
           "Document", "SegmentInfo", "shard_arrays_sha256"]


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    doc_id: int
    position: int  # chunk index within its document
    tokens: np.ndarray  # (n_tokens,) token ids
    text: str
    char_start: int
    char_end: int
    continuation_id: int | None  # chunk_id + 1 when it belongs to the same document
    source_id: str = ""  # the document's id in its input (for citing a hit)


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    source_id: str
    text: str
    first_chunk_id: int
    n_chunks: int
    n_tokens: int
    metadata: dict[str, Any] = field(default_factory=dict)  # the input's extra fields, typed (see metadata_fields)


def _ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class Datastore:
    """One version of a finished datastore directory, opened read-only."""

    def __init__(self, path: str | Path, version: int | None = None) -> None:
        self.path = storage.local_dir(path)  # a URL: its local mirror (mmap needs files)
        self.manifest, self.version_id = load_version(self.path, version)
        m = self.manifest
        fv = m.get("format_version")
        if fv != schema.FORMAT_VERSION:
            raise DatastoreError(
                f"{self.path} has datastore format version {fv}; this retromem reads version "
                f"{schema.FORMAT_VERSION}. Rebuild it with this version."
            )
        manifest_path = self.path / "manifest.json"
        try:
            check_sizes(self.path, m)  # one stat per recorded file: never mmap a short file
            shards = m["shards"]
            self._segs: list[Segment] = []
            for rec in m["segments"]:
                s0, ns = int(rec["first_shard"]), int(rec["n_shards"])
                # the sampling limits are read here, at open, so that tests can lower them
                self._segs.append(Segment(self.path, rec, shards[s0:s0 + ns], self.chunk_length,
                                          limits=(FULL_CHECK_CHUNKS, FULL_CHECK_DOCS, SAMPLE_ROWS)))
            self._seg_c0 = np.asarray([s.first_chunk_id for s in self._segs], dtype=np.int64)
            self._seg_d0 = np.asarray([s.first_doc_id for s in self._segs], dtype=np.int64)
            tomb = m.get("tombstones")
            self._deleted = self._load_tombstones(tomb) if tomb else np.zeros(0, np.int64)
            self._pad_token_id = int(m["tokenizer"]["pad_token_id"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactCorruptError(manifest_path, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                                      "the manifest is damaged; rebuild the datastore") from None
        self._shard_cache: tuple[tuple[int, int], dict] | None = None
        self._doc_cols: dict[tuple[int, str], pa.Array] = {}
        self._verified: set[tuple[int, int]] = set()  # (segment, shard) whose checksums reads have verified
        self._docs_verified: set[str] = set()  # documents Parquet files verified
        self._all_verified = False
        self._verify_lock = threading.Lock()
        self._plain_views: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @classmethod
    def open(cls, path: str | Path, version: int | None = None) -> "Datastore":
        """The newest version of the datastore at ``path`` (or ``version``)."""
        return cls(path, version)

    def _load_tombstones(self, rec: dict[str, Any]) -> np.ndarray:
        from retromem.datastore.integrity import load_npy

        arr = np.asarray(load_npy(self.path / rec["file"], dtype="int64", mmap=False))
        if arr.ndim != 1 or (len(arr) > 1 and (np.diff(arr) <= 0).any()) or (len(arr) and (arr[0] < 0 or arr[-1] >= self.num_documents)):
            raise ArtifactCorruptError(self.path / rec["file"], "is not a sorted list of doc ids in range: the file is damaged")
        return arr

    # -- sizes, identity, versions -------------------------------------------------------

    @property
    def num_documents(self) -> int:
        """Every doc id ever issued (deleted ones included)."""
        return int(self.manifest["counts"]["documents"])

    @property
    def num_chunks(self) -> int:
        """Every chunk id ever issued (deleted ones included)."""
        return int(self.manifest["counts"]["chunks"])

    n_docs = num_documents
    n_chunks = num_chunks

    @property
    def chunk_length(self) -> int:
        return int(self.manifest["chunk_length"])

    @property
    def datastore_id(self) -> str:
        """The lineage's id: the same for every version (adds, deletes, compaction); indexes record
        it and refuse another datastore."""
        return self.manifest["datastore_id"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        return tuple(s.info for s in self._segs)

    @property
    def pad_token_id(self) -> int:
        return self._pad_token_id

    @property
    def token_dtype(self) -> np.dtype:
        return np.dtype(self.manifest["tokenizer"]["token_dtype"])

    # -- tombstones ----------------------------------------------------------------------

    @property
    def deleted_doc_ids(self) -> np.ndarray:
        """(n,) sorted int64 doc ids deleted as of this version."""
        return self._deleted

    def deleted_chunk_ids(self) -> np.ndarray:
        """Sorted int64 chunk ids of the deleted documents."""
        return self.chunk_ids_of_docs(self._deleted)

    def is_live_doc(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) bool: not deleted (ids are not range-checked)."""
        arr = _ids(doc_ids)
        if not len(self._deleted):
            return np.ones(len(arr), dtype=bool)
        pos = np.searchsorted(self._deleted, arr)
        hit = (pos < len(self._deleted)) & (self._deleted[np.minimum(pos, len(self._deleted) - 1)] == arr)
        return ~hit

    def live_chunks(self, chunk_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) bool: the chunk's document is not deleted."""
        arr = _ids(chunk_ids)
        if not len(self._deleted):
            return np.ones(len(arr), dtype=bool)
        return self.is_live_doc(self._chunk_docs(self._in_range(arr, "chunk_id", self.num_chunks)))

    def _refuse_deleted(self, doc_ids: np.ndarray, include_deleted: bool) -> None:
        if include_deleted or not len(self._deleted):
            return
        live = self.is_live_doc(doc_ids)
        if not live.all():
            dead = sorted(set(doc_ids[~live].tolist()))
            shown = ", ".join(map(str, dead[:10])) + (f" and {len(dead) - 10} more" if len(dead) > 10 else "")
            raise DocumentDeletedError(dead, f"doc_id {shown} {'was' if len(dead) == 1 else 'were'} deleted "
                                             f"(version {self.version} of {self.path}); see `retromem datastore log`")

    def audit_log(self) -> list[dict[str, Any]]:
        """Every takedown up to this version: version, time, who, why, doc_ids, source_ids."""
        out = []
        for rel in self.manifest.get("audit", []):
            out.append(read_manifest(self.path / rel))
        return out

    # -- segment lookup ------------------------------------------------------------------

    def _groups(self, ids: np.ndarray, kind: str) -> Iterator[tuple[int, np.ndarray | slice, np.ndarray]]:
        """(segment index, selector into ids, local rows) for the ids of each segment touched."""
        if len(self._segs) == 1:
            yield 0, slice(None), ids
            return
        starts = self._seg_c0 if kind == "chunk" else self._seg_d0
        sidx = np.searchsorted(starts, ids, side="right") - 1
        for s in np.unique(sidx).tolist():
            sel = sidx == s
            yield s, sel, ids[sel] - int(starts[s])

    def _in_range(self, arr: np.ndarray, what: str, limit: int) -> np.ndarray:
        bad = (arr < 0) | (arr >= limit)
        if bad.any():
            raise IndexError(f"{what} {int(arr[bad][0])} out of range: this datastore has {limit} ({what} 0..{limit - 1})")
        return arr

    def _plain(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Segment ``s``'s token, chunk -> document and chunk length arrays as plain ndarrays (no copy)."""
        got = self._plain_views.get(s)
        if got is None:
            seg = self._segs[s]
            got = tuple(np.asarray(a).view(np.ndarray) for a in (seg.tokens, seg.chunk_doc, seg.chunk_ntok))
            self._plain_views[s] = got
        return got

    def _chunk_docs(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.int64)
        for s, sel, local in self._groups(ids, "chunk"):
            out[sel] = self._segs[s].chunk_doc[local] + self._segs[s].first_doc_id
        return out

    def _chunk_ntok(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty(len(ids), dtype=np.int32)
        for s, sel, local in self._groups(ids, "chunk"):
            out[sel] = self._segs[s].chunk_ntok[local]
        return out

    def _chunk_tokens(self, ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), self.chunk_length), dtype=self._segs[0].tokens.dtype)
        for s, sel, local in self._groups(ids, "chunk"):
            out[sel] = self._segs[s].tokens[local]
        return out

    def _doc_first(self, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first chunk id, end chunk id) of each document (global)."""
        lo, hi = np.empty(len(docs), np.int64), np.empty(len(docs), np.int64)
        for s, sel, local in self._groups(docs, "doc"):
            seg = self._segs[s]
            lo[sel] = seg.doc_first_chunk[local] + seg.first_chunk_id
            hi[sel] = seg.doc_first_chunk[local + 1] + seg.first_chunk_id
        return lo, hi

    # -- verified reads ------------------------------------------------------------------

    def _verify(self, s: int, shard: int) -> None:
        if (s, shard) in self._verified:
            return
        with self._verify_lock:
            if (s, shard) not in self._verified:
                self._segs[s].verify_shard(shard)
                self._verified.add((s, shard))
                # every shard checked: later reads skip the per-call shard lookup (a third of a fetch's time)
                self._all_verified = len(self._verified) == sum(len(seg.shards) for seg in self._segs)

    def verify_reads(self) -> None:
        """Verify every shard now (what reads do shard by shard): for jobs that read the whole arrays."""
        if self._all_verified:
            return
        for s, seg in enumerate(self._segs):
            for shard in range(len(seg.shards)):
                self._verify(s, shard)
        self._all_verified = True

    def token_rows(self, c0: int, c1: int) -> np.ndarray:
        """(c1 - c0, chunk_length) token ids of chunks [c0, c1), after verifying only the shards they
        fall in: a job that reads one range (an n-gram shard) need not hash the whole datastore."""
        if not self._all_verified:
            for s, seg in enumerate(self._segs):
                a, b = max(c0 - seg.first_chunk_id, 0), min(c1 - seg.first_chunk_id, len(seg.chunk_ntok))
                if a < b:
                    lo = int(np.searchsorted(seg.shard_first_chunk, a, side="right")) - 1
                    hi = int(np.searchsorted(seg.shard_first_chunk, b - 1, side="right")) - 1
                    for shard in range(lo, hi + 1):
                        self._verify(s, shard)
        return self._whole("tokens")[c0:c1]

    def _verified_chunks(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (checked chunk ids), after verifying the shards they fall in."""
        if len(arr) and not self._all_verified:
            for s, _, local in self._groups(arr, "chunk"):
                seg = self._segs[s]
                for shard in np.unique(np.searchsorted(seg.shard_first_chunk, local, side="right") - 1).tolist():
                    self._verify(s, shard)
        return arr

    def _verified_docs(self, arr: np.ndarray) -> np.ndarray:
        if len(arr) and not self._all_verified:
            for s, _, local in self._groups(arr, "doc"):
                seg = self._segs[s]
                for shard in np.unique(np.searchsorted(seg.shard_first_doc, local, side="right") - 1).tolist():
                    self._verify(s, shard)
        return arr

    def _check_ids(self, ids: Sequence[int] | np.ndarray, what: str = "chunk_id", limit: int | None = None,
                   include_deleted: bool = False) -> np.ndarray:
        """Ids in range (IndexError otherwise), not deleted (DocumentDeletedError unless
        ``include_deleted``), their shards verified."""
        arr = _ids(ids)
        if what == "chunk_id":
            self._in_range(arr, what, self.num_chunks if limit is None else limit)
            self._verified_chunks(arr)
            if len(self._deleted) and not include_deleted:
                self._refuse_deleted(self._chunk_docs(arr), include_deleted)
            return arr
        self._in_range(arr, what, self.num_documents if limit is None else limit)
        self._verified_docs(arr)
        self._refuse_deleted(arr, include_deleted)
        return arr

    # -- whole-datastore arrays ----------------------------------------------------------
    # For vectorised work (indexes, samplers). One segment: its memory-mapped arrays, as before.
    # Several: concatenated copies (ids and offsets made global), built on first access; jobs
    # that scale per segment use segment_arrays() instead.

    def _whole(self, name: str) -> np.ndarray:
        if len(self._segs) == 1:
            seg = self._segs[0]
            return {"tokens": seg.tokens, "chunk_doc_ids": seg.chunk_doc, "chunk_ntokens": seg.chunk_ntok,
                    "chunk_byte_spans": seg.byte_spans, "doc_first_chunk": seg.doc_first_chunk,
                    "doc_byte_offsets": seg.doc_bytes, "text": seg.text}[name]
        return self._concatenated[name]

    @cached_property
    def _concatenated(self) -> dict[str, np.ndarray]:
        segs = self._segs
        byte0 = np.cumsum([0] + [len(s.text) for s in segs])
        out = {
            "tokens": np.concatenate([s.tokens for s in segs]),
            "chunk_doc_ids": np.concatenate([s.chunk_doc + s.first_doc_id for s in segs]),
            "chunk_ntokens": np.concatenate([s.chunk_ntok for s in segs]),
            "chunk_byte_spans": np.concatenate([s.byte_spans + b for s, b in zip(segs, byte0)]),
            "doc_first_chunk": np.concatenate([s.doc_first_chunk[:-1] + s.first_chunk_id for s in segs] + [[self.num_chunks]]),
            "doc_byte_offsets": np.concatenate([s.doc_bytes[:-1] + b for s, b in zip(segs, byte0)] + [[byte0[-1]]]),
            "text": np.concatenate([s.text for s in segs]),
        }
        for a in out.values():
            a.flags.writeable = False
        return out

    def segment_arrays(self, i: int) -> Segment:
        """Segment ``i``'s memory-mapped arrays (``tokens``, ``chunk_doc``, ``chunk_ntok``,
        ``byte_spans``, ``doc_first_chunk``, ``doc_bytes``, ``text``), rows and values local to
        it: add ``first_doc_id`` / ``first_chunk_id`` for global ids. Its shards are verified."""
        for shard in range(len(self._segs[i].shards)):
            self._verify(i, shard)
        return self._segs[i]

    @property
    def token_array(self) -> np.ndarray:
        """(num_chunks, chunk_length) token ids; short chunks are padded. Its users read it in bulk,
        so the first access verifies every shard (:meth:`verify_reads`). Deleted documents' rows
        are still there until compaction: mask them with :meth:`live_chunks`."""
        self.verify_reads()
        return self._whole("tokens")

    @property
    def chunk_doc_array(self) -> np.ndarray:
        """(num_chunks,) doc_id of every chunk."""
        return self._whole("chunk_doc_ids")

    @property
    def chunk_ntokens_array(self) -> np.ndarray:
        """(num_chunks,) tokens in every chunk (only a document's last chunk is short; 0 in the
        rows of a document compaction purged)."""
        return self._whole("chunk_ntokens")

    @property
    def chunk_byte_spans_array(self) -> np.ndarray:
        """(num_chunks, 2) [start, end) of every chunk's text in ``text_bytes``."""
        return self._whole("chunk_byte_spans")

    @property
    def doc_first_chunk_array(self) -> np.ndarray:
        """(num_documents + 1,) first chunk_id of every document, then num_chunks: document d owns
        chunks [a[d], a[d + 1])."""
        return self._whole("doc_first_chunk")

    @property
    def doc_byte_offsets_array(self) -> np.ndarray:
        """(num_documents + 1,) where every document's text starts in ``text_bytes``, then its size."""
        return self._whole("doc_byte_offsets")

    @property
    def text_bytes(self) -> np.ndarray:
        """(text_bytes,) uint8: the normalized UTF-8 text of every document, concatenated in doc_id
        order. The first access verifies every shard (:meth:`verify_reads`), as for ``token_array``."""
        self.verify_reads()
        return self._whole("text")

    @cached_property
    def tokenizer(self):
        """The datastore's own tokenizer (a transformers fast tokenizer), loaded from its directory."""
        from transformers import AutoTokenizer

        files = recorded_files(self.manifest) or {}
        bad = verify_files(self.path, self.manifest, names=[f for f in files if f.startswith("tokenizer/")])
        if bad:  # a few MB, read whole by the tokenizer anyway: a damaged vocabulary would tokenize wrongly
            raise ArtifactCorruptError(self.path / bad[0][0], bad[0][1] + "; the datastore's tokenizer is damaged")
        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    # -- chunks --------------------------------------------------------------------------

    def tokens(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, L) padded with the pad id, lengths (n,)) of the given chunks."""
        arr = self._check_ids(ids, include_deleted=include_deleted)
        return self._chunk_tokens(arr), self._chunk_ntok(arr)

    def continuation_ids(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> np.ndarray:
        """chunk_id + 1 where that chunk continues the same document, else -1."""
        arr = self._check_ids(ids, include_deleted=include_deleted)
        nxt = arr + 1
        ok = nxt < self.num_chunks
        self._verified_chunks(nxt[ok])
        same = np.zeros(len(arr), dtype=bool)
        same[ok] = self._chunk_docs(nxt[ok]) == self._chunk_docs(arr[ok])
        return np.where(same, nxt, -1)

    def continuation(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each chunk's continuation: ((n, L) padded, lengths (n,), 0 where none)."""
        nxt = self.continuation_ids(ids, include_deleted)
        has = nxt >= 0
        toks = np.full((len(nxt), self.chunk_length), self.pad_token_id, dtype=self._segs[0].tokens.dtype)
        lens = np.zeros(len(nxt), dtype=np.int32)
        toks[has] = self._chunk_tokens(nxt[has])
        lens[has] = self._chunk_ntok(nxt[has])
        return toks, lens

    def neighbour_tokens(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """RETRO's retrieved unit: each chunk followed by its continuation, (n, 2L) and lengths.

        Tokens are left-aligned: chunk tokens, then continuation tokens, then padding.
        """
        arr = self._check_ids(ids, include_deleted=include_deleted)
        L = self.chunk_length
        self._verified_chunks(np.minimum(arr + 1, self.num_chunks - 1))
        out = np.empty((len(arr), 2 * L), dtype=self._segs[0].tokens.dtype)
        lens = np.empty(len(arr), dtype=np.int64)
        pad = self.pad_token_id
        for s, sel, local in self._groups(arr, "chunk"):
            seg = self._segs[s]
            n = len(seg.chunk_doc)
            if n < 2:  # a one-chunk segment: no continuation anywhere
                out[sel, :L], out[sel, L:] = seg.tokens[local], pad
                lens[sel] = seg.chunk_ntok[local]
                continue
            # a chunk and the next row: one np.take of both per array, from plain ndarray views (np.memmap's
            # __getitem__ costs a Python call per gather): 2x two separate memmap gathers (BENCHMARKS.md)
            last = local == n - 1  # the segment's last chunk: gather the pair one row earlier, then shift
            pair = local - last
            two = np.stack([pair, pair + 1], 1).reshape(-1)  # each row and its successor, interleaved
            tokens, chunk_doc, chunk_ntok = self._plain(s)
            rows = np.take(tokens, two, axis=0).reshape(len(pair), 2 * L)
            docs, ntok = np.take(chunk_doc, two).reshape(-1, 2), np.take(chunk_ntok, two).reshape(-1, 2)
            if last.any():
                rows[last, :L], docs[last, 0], ntok[last, 0] = rows[last, L:], docs[last, 1], ntok[last, 1]
            same = (docs[:, 0] == docs[:, 1]) & ~last  # documents never cross segments
            rows[~same, L:] = pad
            if isinstance(sel, slice):  # one segment: the gather is the answer, no second copy
                out = rows
            else:
                out[sel] = rows
            # only a document's last chunk is short, and it never has a continuation
            lens[sel] = ntok[:, 0] + np.where(same, ntok[:, 1], 0)
        return out, lens

    def chunk_texts(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> list[str]:
        arr = self._check_ids(ids, include_deleted=include_deleted)
        out: list[str] = [""] * len(arr)
        for s, sel, local in self._groups(arr, "chunk"):
            seg = self._segs[s]
            where = np.arange(len(arr))[sel]
            for i, (a, b) in zip(where.tolist(), seg.byte_spans[local].tolist()):
                out[i] = self._decode(seg, a, b)
        return out

    def _decode(self, seg: Segment, start: int, end: int) -> str:
        try:
            return seg.text[start:end].tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:  # only a damaged datastore written without checksums gets here
            raise seg.corrupt("text.bin", f"bytes {start + exc.start:,}..{start + exc.end:,} are not UTF-8: the file is damaged") from None

    def doc_ids(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = True) -> np.ndarray:
        """doc_id of each chunk (deleted ones too by default: a hit's document is what marks it)."""
        return self._chunk_docs(self._check_ids(ids, include_deleted=include_deleted))

    def chunks(self, ids: Sequence[int] | np.ndarray, include_deleted: bool = False) -> list[Chunk]:
        arr = self._check_ids(ids, include_deleted=include_deleted)
        toks, lens = self._chunk_tokens(arr), self._chunk_ntok(arr)
        docs = self._chunk_docs(arr)
        first, _ = self._doc_first(docs)
        nxt = self.continuation_ids(arr, include_deleted=True)
        texts = self.chunk_texts(arr, include_deleted=True)
        sources = self.source_ids(docs)
        out = []
        for i, cid in enumerate(arr.tolist()):
            doc = int(docs[i])
            s = int(np.searchsorted(self._seg_c0, cid, side="right") - 1)
            seg = self._segs[s]
            local = cid - seg.first_chunk_id
            doc_start = int(seg.doc_bytes[doc - seg.first_doc_id])
            prefix = self._decode(seg, doc_start, int(seg.byte_spans[local][0]))
            out.append(Chunk(
                chunk_id=cid, doc_id=doc, position=int(cid - first[i]),
                tokens=np.array(toks[i, : lens[i]]), text=texts[i],
                char_start=len(prefix), char_end=len(prefix) + len(texts[i]),
                continuation_id=int(nxt[i]) if nxt[i] >= 0 else None, source_id=sources[i],
            ))
        return out

    # -- documents -----------------------------------------------------------------------

    def document_text(self, doc_id: int, include_deleted: bool = False) -> str:
        d = int(self._check_ids([doc_id], "doc_id", include_deleted=include_deleted)[0])
        s, _, local = next(self._groups(np.asarray([d]), "doc"))
        seg = self._segs[s]
        return self._decode(seg, int(seg.doc_bytes[local[0]]), int(seg.doc_bytes[local[0] + 1]))

    def document_chunk_ids(self, doc_id: int, include_deleted: bool = False) -> np.ndarray:
        d = int(self._check_ids([doc_id], "doc_id", include_deleted=include_deleted)[0])
        lo, hi = self._doc_first(np.asarray([d]))
        return np.arange(lo[0], hi[0], dtype=np.int64)

    def doc_token_ids(self, doc_id: int, include_deleted: bool = False) -> np.ndarray:
        """The document's token stream (its chunks' tokens, concatenated, padding dropped)."""
        ids = self.document_chunk_ids(doc_id, include_deleted)
        toks, lens = self._chunk_tokens(ids), self._chunk_ntok(ids)
        return np.concatenate([t[:n] for t, n in zip(toks, lens)]) if len(ids) else np.zeros(0, toks.dtype)

    def chunk_ids_of_docs(self, doc_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted chunk ids of the given documents (deleted ones too)."""
        docs = np.unique(self._in_range(_ids(doc_ids), "doc_id", self.num_documents))
        if not len(docs):
            return np.zeros(0, np.int64)
        lo, hi = self._doc_first(docs)
        n = hi - lo
        return np.repeat(lo - np.concatenate(([0], np.cumsum(n)[:-1])), n) + np.arange(int(n.sum()), dtype=np.int64)

    def document(self, doc_id: int, include_deleted: bool = False) -> Document:
        d = int(self._check_ids([doc_id], "doc_id", include_deleted=include_deleted)[0])
        s, _, local = next(self._groups(np.asarray([d]), "doc"))
        seg = self._segs[s]
        shard = int(np.searchsorted(seg.shard_first_doc, local[0], side="right") - 1)
        if self._shard_cache is None or self._shard_cache[0] != (s, shard):
            path = self._documents_file(seg.shards[shard])
            cols = ["source", "source_id", "n_tokens"] + [c for c in pq.ParquetFile(path).schema_arrow.names
                                                          if c.startswith(schema.METADATA_PREFIX)]
            self._shard_cache = ((s, shard), pq.read_table(path, columns=cols).to_pydict())
        rows = self._shard_cache[1]
        row = int(local[0]) - seg.shard_first_doc[shard]
        lo, hi = self._doc_first(np.asarray([d]))
        return Document(
            doc_id=d, source=rows["source"][row], source_id=rows["source_id"][row],
            text=self.document_text(d, include_deleted=True), first_chunk_id=int(lo[0]),
            n_chunks=int(hi[0] - lo[0]), n_tokens=int(rows["n_tokens"][row]),
            metadata=self.metadata([d])[0],
        )

    def _documents_file(self, shard_rec: dict[str, Any]) -> Path:
        """A documents Parquet file, its checksum verified once per process (Parquet pages carry no
        checksum pyarrow checks: a damaged page could decode to wrong values)."""
        rec = shard_rec["documents_file"]
        path = self.path / rec["path"]
        if rec["path"] not in self._docs_verified:
            if sha256_file(path) != rec["sha256"]:
                raise ArtifactCorruptError(path, "differs from its recorded checksum: the file is damaged")
            self._docs_verified.add(rec["path"])
        return path

    def iter_documents(self, columns: list[str] | None = None, include_deleted: bool = True) -> Iterator[dict]:
        """Rows of the documents shards in doc_id order (all columns unless named; metadata columns
        are named ``metadata.FIELD``). Deleted documents are included unless ``include_deleted`` is
        False (``doc_id`` is then read too)."""
        want = None if columns is None else list(columns) + ([] if include_deleted or "doc_id" in columns else ["doc_id"])
        for seg in self._segs:
            for shard in seg.shards:
                pf = pq.ParquetFile(self._documents_file(shard))
                present = pf.schema_arrow.names
                cols = None if want is None else [c for c in want if c in present]
                for batch in pf.iter_batches(columns=cols, batch_size=1024):
                    rows = batch.to_pylist()
                    live = self.is_live_doc([r["doc_id"] for r in rows]) if not include_deleted else None
                    for i, row in enumerate(rows):
                        if live is not None and not live[i]:
                            continue
                        if want is not None:
                            row = {c: row.get(c) for c in columns}
                        yield row

    def iter_chunk_batches(self, batch_size: int = 4096, include_deleted: bool = True) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(chunk_ids, texts) in chunk_id order: what an embedding job reads (deleted chunks
        included by default, so ids stay dense; pass ``include_deleted=False`` to skip them)."""
        for start in range(0, self.num_chunks, batch_size):
            ids = np.arange(start, min(start + batch_size, self.num_chunks), dtype=np.int64)
            if not include_deleted:
                ids = ids[self.live_chunks(ids)]
            yield ids, self.chunk_texts(ids, include_deleted=True)

    # -- metadata ------------------------------------------------------------------------

    @property
    def metadata_fields(self) -> dict[str, str]:
        """Declared metadata field -> arrow type name (``string``, ``int64``, ``double``, ``bool``;
        ``json`` for nested values, kept as JSON text)."""
        return dict(self.manifest.get("metadata_fields", {}))

    def _doc_column(self, s: int, name: str) -> pa.Array:
        """Segment ``s``'s column ``name`` (``source_id`` or a metadata field, cast to its declared
        type; null where a shard lacks it), one row per document; read once per reader."""
        key = (s, name)
        if key not in self._doc_cols:
            col = name if name == "source_id" else schema.METADATA_PREFIX + name
            arrow = pa.string() if name == "source_id" else schema.metadata_arrow_type(self.metadata_fields[name])
            parts = []
            for shard in self._segs[s].shards:
                path = self._documents_file(shard)
                pf = pq.ParquetFile(path)
                if col in pf.schema_arrow.names:
                    parts.append(pq.read_table(path, columns=[col]).column(col).cast(arrow))
                else:
                    parts.append(pa.chunked_array([pa.nulls(int(shard["documents"]), arrow)]))
            chunks = [c for p in parts for c in p.chunks]
            self._doc_cols[key] = pa.chunked_array(chunks, type=arrow).combine_chunks() if chunks else pa.array([], arrow)
        return self._doc_cols[key]

    def _doc_table(self, s: int, columns: list[str]) -> pa.Table:
        return pa.table([self._doc_column(s, c) for c in columns], names=columns)

    def _doc_rows(self, doc_ids: Sequence[int] | np.ndarray, columns: list[str]) -> dict[str, list]:
        docs = self._in_range(_ids(doc_ids), "doc_id", self.num_documents)
        out: dict[str, list] = {c: [None] * len(docs) for c in columns}
        for s, sel, local in self._groups(docs, "doc"):
            t = self._doc_table(s, columns).take(pa.array(local))
            where = np.arange(len(docs))[sel].tolist()
            for c in columns:
                vals = t.column(c).to_pylist()
                for i, v in zip(where, vals):
                    out[c][i] = v
        return out

    def source_ids(self, doc_ids: Sequence[int] | np.ndarray) -> list[str]:
        """The input id of each document (deleted ones too: an audit names them)."""
        return self._doc_rows(doc_ids, ["source_id"])["source_id"]

    def metadata(self, doc_ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """Each document's metadata (declared fields; None where a document lacks one)."""
        fields = list(self.metadata_fields)
        if not fields:
            return [{} for _ in range(len(_ids(doc_ids)))]
        rows = self._doc_rows(doc_ids, fields)
        return [{f: rows[f][i] for f in fields} for i in range(len(rows[fields[0]]))]

    def docs_matching(self, filters: dict[str, Any]) -> np.ndarray:
        """Sorted doc ids of the live documents whose metadata matches every filter: a value
        (equality) or a list/tuple/set of values (membership). An unknown field is a ConfigError
        naming it; a value of the wrong type for its field too."""
        fields = self.metadata_fields
        for f in filters:
            if f not in fields:
                raise ConfigError(f"metadata filter field {f!r} is not declared in {self.path}; declared fields: "
                                  f"{', '.join(sorted(fields)) or 'none'}")
        out = []
        for s, seg in enumerate(self._segs):
            t = self._doc_table(s, list(filters))
            mask = pa.array(np.ones(seg.n_docs, dtype=bool))
            for f, want in filters.items():
                values = list(want) if isinstance(want, (list, tuple, set, frozenset)) else [want]
                try:
                    vs = pa.array(values, type=schema.metadata_arrow_type(fields[f]))
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                    raise ConfigError(f"metadata filter {f!r}: {values!r} do not fit the field's type "
                                      f"{fields[f]} ({exc})") from None
                mask = pc.and_(mask, pc.fill_null(pc.is_in(t.column(f), value_set=vs), False))
            hit = np.flatnonzero(np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)) + seg.first_doc_id
            out.append(hit)
        ids = np.concatenate(out) if out else np.zeros(0, np.int64)
        return ids[self.is_live_doc(ids)].astype(np.int64)

    # -- integrity -----------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every checksum of this version; returns the problems found as ``file: what``
        (empty if none).

        With recorded file checksums (datastores built since issue 15) every file is checked whole,
        and a damaged array is then located shard by shard; without them (older datastores) the
        Parquet shards and each shard's tokens and text are checked against their own checksums."""
        problems = [f"{rel}: {what}" for rel, what in verify_files(self.path, self.manifest)]
        recorded = recorded_files(self.manifest) is not None
        if recorded and self.version == current_version(self.path):
            problems += [f"{rel}: {what}" for rel, what in version_problems(self.path)]
        damaged = {p.split(":")[0] for p in problems}
        for s, seg in enumerate(self._segs):
            array_files = {str(p.relative_to(self.path)) for p in seg.files.values()}
            for i, shard in enumerate(seg.shards):
                if not recorded:
                    for key in ("documents_file", "chunks_file", "removed_file"):
                        f = shard[key]
                        if sha256_file(self.path / f["path"]) != f["sha256"]:
                            problems.append(f"{f['path']}: checksum mismatch")
                if recorded and not damaged & array_files:
                    continue
                try:
                    seg.verify_shard(i)
                except ArtifactCorruptError as exc:
                    problems.append(f"{Path(exc.path).relative_to(self.path)}: {exc.what}")
        return problems
