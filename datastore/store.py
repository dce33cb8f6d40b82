"""Read API of a built datastore: chunks, continuations, documents and the token array.

Random access never touches Parquet: the token array (``n_chunks x chunk_length``, uint16 or
uint32), the chunk -> document map, the byte spans and the concatenated text are memory-mapped
``.npy``/``.bin`` files, so fetching a chunk's tokens and its continuation by ``chunk_id`` is an
O(1) array lookup. Parquet shards are the canonical, portable copy (documents with metadata,
chunks with spans and tokens) and are read for iteration and metadata.

Damage never reaches a caller as a crash or a wrong answer (issue 15). Opening checks, before
anything is memory-mapped, every recorded file's size, the ``.npy`` headers against the manifest's
shapes and dtypes, and the offsets: document offsets monotone from 0 to the totals (all rows up to
``FULL_CHECK_DOCS`` documents, an even sample beyond), and for the chunk arrays (all rows up to
``FULL_CHECK_CHUNKS`` chunks, an even sample beyond) each chunk inside its document, byte spans
tiling the text, token counts in range. Then every read (tokens, texts, documents, doc ids) first
verifies the checksums of the shard(s) it touches, once per shard and process: the tokens, text
and chunk/document arrays of a shard are hashed and compared with the manifest (a read of the
shard: 0.18 s per 16 MiB shard of python-docs on a loaded 2-core machine, BENCHMARKS.md); the bulk
arrays ``token_array`` and ``text_bytes`` verify every shard on first access.
:meth:`Datastore.verify` checks every file's checksum. A failure is an
:class:`~retromem.errors.ArtifactCorruptError` naming the file.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from retromem.datastore import schema
from retromem.datastore.atomic import sha256_file
from retromem.datastore.integrity import check_size, check_sizes, load_npy, read_manifest, recorded_files, verify_files
from retromem.errors import ArtifactCorruptError, DatastoreError

FULL_CHECK_CHUNKS = 1 << 20  # chunk arrays up to this many rows are checked whole on open; beyond, a sample
FULL_CHECK_DOCS = 1 << 22  # document arrays likewise
SAMPLE_ROWS = 1 << 16  # rows of the chunk arrays checked on open beyond FULL_CHECK_CHUNKS
CHUNK_ARRAYS = ("chunk_doc_ids", "chunk_ntokens", "chunk_byte_spans")  # rows per chunk
DOC_ARRAYS = ("doc_first_chunk", "doc_byte_offsets")  # rows per document (+1)


def shard_arrays_sha256(arrays: dict[str, np.ndarray], first_chunk: int, chunks: int, first_doc: int, docs: int) -> str:
    """sha256 of one shard's rows of the chunk and document arrays (recorded by the build as
    ``arrays_sha256``; reads verify it)."""
    h = hashlib.sha256()
    for name in CHUNK_ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][first_chunk:first_chunk + chunks]).tobytes())
    for name in DOC_ARRAYS:
        h.update(np.ascontiguousarray(arrays[name][first_doc:first_doc + docs]).tobytes())
    return h.hexdigest()


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


@dataclass(frozen=True)
class Document:
    doc_id: int
    source: str
    source_id: str
    text: str
    first_chunk_id: int
    n_chunks: int
    n_tokens: int


class Datastore:
    """A finished datastore directory, opened read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = " (an unfinished build: re-run `retromem datastore build` to finish it)" if (self.path / "_work").exists() else ""
            raise DatastoreError(f"{self.path} is not a datastore: no manifest.json{hint}")
        self.manifest = read_manifest(manifest_path)
        version = self.manifest.get("format_version")
        if version != schema.FORMAT_VERSION:
            raise DatastoreError(
                f"{self.path} has datastore format version {version}; this retromem reads version "
                f"{schema.FORMAT_VERSION}. Rebuild it with this version."
            )
        try:
            self._open_arrays()
            self._shard_first_doc = [int(s["first_doc_id"]) for s in self.manifest["shards"]]
            self._shard_first_chunk = [int(s["first_chunk_id"]) for s in self.manifest["shards"]]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactCorruptError(manifest_path, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                                      "the manifest is damaged; rebuild the datastore") from None
        self._check_structure()
        self._shard_cache: tuple[int, object] | None = None
        self._verified: set[int] = set()  # shards whose checksums reads have verified
        self._docs_verified: set[int] = set()  # shards whose documents Parquet file was verified
        self._all_verified = False
        self._verify_lock = threading.Lock()

    def _open_arrays(self) -> None:
        """Memory-map the arrays after checking sizes, headers, shapes and dtypes (never mmap a short file)."""
        m = self.manifest
        check_sizes(self.path, m)  # one stat per recorded file
        spec = m["arrays"]

        def array(name: str) -> np.ndarray:
            return load_npy(self.path / spec[name]["file"], shape=spec[name]["shape"], dtype=spec[name]["dtype"])

        self._tokens = array("tokens")
        self._chunk_doc = array("chunk_doc_ids")
        self._chunk_ntok = array("chunk_ntokens")
        self._byte_spans = array("chunk_byte_spans")
        self._doc_first_chunk = array("doc_first_chunk")
        self._doc_bytes = array("doc_byte_offsets")
        size = int(spec["text"]["bytes"])
        check_size(self.path / spec["text"]["file"], size)
        self._text = np.memmap(self.path / spec["text"]["file"], dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        n, d = int(m["counts"]["chunks"]), int(m["counts"]["documents"])
        for name, arr, rows in (("tokens", self._tokens, n), ("chunk_doc_ids", self._chunk_doc, n),
                                ("chunk_ntokens", self._chunk_ntok, n), ("chunk_byte_spans", self._byte_spans, n),
                                ("doc_first_chunk", self._doc_first_chunk, d + 1), ("doc_byte_offsets", self._doc_bytes, d + 1)):
            if arr.shape[0] != rows:
                raise ArtifactCorruptError(self.path / spec[name]["file"], f"has {arr.shape[0]} rows, the manifest counts {rows}")
        if self._tokens.ndim != 2 or self._tokens.shape[1] != self.chunk_length:
            raise ArtifactCorruptError(self.path / spec["tokens"]["file"], f"has shape {self._tokens.shape}, "
                                       f"not (chunks, {self.chunk_length})")

    def _corrupt(self, name: str, what: str) -> ArtifactCorruptError:
        return ArtifactCorruptError(self.path / "arrays" / (name + ("" if name == "text.bin" else ".npy")), what)

    def _check_structure(self) -> None:
        """Offsets monotone and in range (vectorised; chunk rows sampled beyond FULL_CHECK_CHUNKS)."""
        n, d = self.num_chunks, self.num_documents
        size = len(self._text)
        # documents: every row up to FULL_CHECK_DOCS, else an even sample of consecutive pairs
        docs = np.arange(d, dtype=np.int64) if d <= FULL_CHECK_DOCS else np.linspace(0, d - 1, SAMPLE_ROWS).astype(np.int64)
        for name, arr, total in (("doc_first_chunk", self._doc_first_chunk, n), ("doc_byte_offsets", self._doc_bytes, size)):
            lo, hi = np.asarray(arr[docs], dtype=np.int64), np.asarray(arr[docs + 1], dtype=np.int64)
            if arr[0] != 0 or arr[-1] != total or (hi < lo).any() or (lo > total).any():
                raise self._corrupt(name, f"offsets are not monotone from 0 to {total:,}: the file is damaged")
        if n == 0:
            return
        whole = n <= FULL_CHECK_CHUNKS
        if whole:
            rows = np.arange(n, dtype=np.int64)
        else:  # an even sample, and the first and last chunk of every (sampled) document
            first = np.asarray(self._doc_first_chunk[docs], dtype=np.int64)
            ends = np.concatenate((first, np.asarray(self._doc_first_chunk[docs + 1], dtype=np.int64) - 1))
            rows = np.unique(np.concatenate((np.linspace(0, n - 1, SAMPLE_ROWS).astype(np.int64), ends[(ends >= 0) & (ends < n)])))
        self._check_rows(rows, whole)

    def _check_rows(self, rows: np.ndarray, whole: bool = False) -> None:
        """Chunk rows ``rows`` consistent with the document arrays: each chunk inside its document's
        chunk range and byte range, token counts in 1..chunk_length (full only at a document's end)."""
        d, L, size = self.num_documents, self.chunk_length, len(self._text)
        first = self._doc_first_chunk
        doc = np.asarray(self._chunk_doc[rows], dtype=np.int64)
        if ((doc < 0) | (doc >= d)).any():
            bad = rows[(doc < 0) | (doc >= d)][0]
            raise self._corrupt("chunk_doc_ids", f"chunk {int(bad)} names document {int(self._chunk_doc[bad])}, "
                                                 f"outside 0..{d - 1}: the file is damaged")
        lo, hi = np.asarray(first[doc], dtype=np.int64), np.asarray(first[doc + 1], dtype=np.int64)
        if ((rows < lo) | (rows >= hi)).any():
            bad = int(rows[(rows < lo) | (rows >= hi)][0])
            raise self._corrupt("chunk_doc_ids", f"chunk {bad} names document {int(self._chunk_doc[bad])}, whose chunks "
                                                 "are elsewhere (doc_first_chunk.npy disagrees): one of them is damaged")
        spans = np.asarray(self._byte_spans[rows], dtype=np.int64).reshape(-1, 2)
        b0, b1 = np.asarray(self._doc_bytes[doc], dtype=np.int64), np.asarray(self._doc_bytes[doc + 1], dtype=np.int64)
        bad = (spans[:, 0] < b0) | (spans[:, 0] > spans[:, 1]) | (spans[:, 1] > b1) | (spans[:, 1] > size)
        if whole and len(spans):  # the spans tile the text
            bad[1:] |= spans[1:, 0] != spans[:-1, 1]
            bad[0] |= spans[0, 0] != 0
            bad[-1] |= spans[-1, 1] != size
        if bad.any():
            raise self._corrupt("chunk_byte_spans", f"chunk {int(rows[bad][0])} has byte span {spans[bad][0].tolist()}, "
                                                    "outside its document's text: the file is damaged")
        ntok = np.asarray(self._chunk_ntok[rows], dtype=np.int64)
        last = rows == hi - 1
        bad = (ntok < 1) | (ntok > L) | (~last & (ntok != L))
        if bad.any():
            raise self._corrupt("chunk_ntokens", f"chunk {int(rows[bad][0])} has {int(ntok[bad][0])} tokens; chunks "
                                                 f"hold {L} (fewer only at a document's end): the file is damaged")

    # -- verified reads ----------------------------------------------------------------------

    def _verify_shard(self, s: int) -> None:
        """Check shard ``s``'s tokens, text and chunk/document array rows against its recorded
        checksums (once per process); ArtifactCorruptError naming the file otherwise."""
        rec = self.manifest["shards"][s]
        c0, n = int(rec["first_chunk_id"]), int(rec["chunks"])
        d0, nd = int(rec["first_doc_id"]), int(rec["documents"])
        if "tokens_sha256" in rec and hashlib.sha256(np.ascontiguousarray(self._tokens[c0:c0 + n]).tobytes()).hexdigest() != rec["tokens_sha256"]:
            raise self._corrupt("tokens", f"the tokens of chunks {c0}..{c0 + n - 1} (shard {s}) differ from their "
                                          "recorded checksum: the file is damaged")
        if "text_sha256" in rec and nd:
            b0, b1 = int(self._doc_bytes[d0]), int(self._doc_bytes[d0 + nd])
            if hashlib.sha256(self._text[b0:b1].tobytes()).hexdigest() != rec["text_sha256"]:
                raise self._corrupt("text.bin", f"the text of documents {d0}..{d0 + nd - 1} (bytes {b0:,}..{b1:,}, shard {s}) "
                                                "differs from its recorded checksum: the file is damaged")
        if "arrays_sha256" in rec:
            arrays = {"chunk_doc_ids": self._chunk_doc, "chunk_ntokens": self._chunk_ntok, "chunk_byte_spans": self._byte_spans,
                      "doc_first_chunk": self._doc_first_chunk, "doc_byte_offsets": self._doc_bytes}
            if shard_arrays_sha256(arrays, c0, n, d0, nd) != rec["arrays_sha256"]:
                raise ArtifactCorruptError(self.path / "arrays", f"the chunk and document arrays of shard {s} (chunks "
                                           f"{c0}..{c0 + n - 1}) differ from their recorded checksum: one of "
                                           f"{', '.join(CHUNK_ARRAYS + DOC_ARRAYS)} is damaged")

    def _verified_chunks(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` (checked chunk ids), after verifying the shards they fall in."""
        if len(arr):
            for s in np.unique(np.searchsorted(self._shard_first_chunk, arr, side="right") - 1).tolist():
                self._verify(s)
        return arr

    def _verified_doc(self, doc: int) -> int:
        self._verify(bisect.bisect_right(self._shard_first_doc, doc) - 1)
        return doc

    def _verify(self, s: int) -> None:
        if s in self._verified:
            return
        with self._verify_lock:
            if s not in self._verified:
                self._verify_shard(s)
                self._verified.add(s)

    def verify_reads(self) -> None:
        """Verify every shard now (what reads do shard by shard): for jobs that read the whole arrays."""
        if self._all_verified:
            return
        for s in range(len(self.manifest["shards"])):
            self._verify(s)
        self._all_verified = True

    @classmethod
    def open(cls, path: str | Path) -> "Datastore":
        return cls(path)

    # -- sizes and identity --------------------------------------------------------------

    @property
    def num_documents(self) -> int:
        return int(self.manifest["counts"]["documents"])

    @property
    def num_chunks(self) -> int:
        return int(self.manifest["counts"]["chunks"])

    @property
    def chunk_length(self) -> int:
        return int(self.manifest["chunk_length"])

    @property
    def datastore_id(self) -> str:
        """Fingerprint of the content; indexes record it and refuse another datastore."""
        return self.manifest["datastore_id"]

    @property
    def pad_token_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_token_id"])

    @property
    def token_array(self) -> np.ndarray:
        """Memory-mapped (num_chunks, chunk_length) token ids; short chunks are padded. Its users read
        it in bulk, so the first access verifies every shard (:meth:`verify_reads`)."""
        self.verify_reads()
        return self._tokens

    # Whole-datastore arrays for vectorised work (indexes, samplers), memory-mapped, read-only.

    @property
    def chunk_doc_array(self) -> np.ndarray:
        """(num_chunks,) doc_id of every chunk."""
        return self._chunk_doc

    @property
    def chunk_ntokens_array(self) -> np.ndarray:
        """(num_chunks,) tokens in every chunk (only a document's last chunk is short)."""
        return self._chunk_ntok

    @property
    def chunk_byte_spans_array(self) -> np.ndarray:
        """(num_chunks, 2) [start, end) of every chunk's text in ``text_bytes``."""
        return self._byte_spans

    @property
    def doc_first_chunk_array(self) -> np.ndarray:
        """(num_documents + 1,) first chunk_id of every document, then num_chunks: document d owns
        chunks [a[d], a[d + 1])."""
        return self._doc_first_chunk

    @property
    def doc_byte_offsets_array(self) -> np.ndarray:
        """(num_documents + 1,) where every document's text starts in ``text_bytes``, then its size."""
        return self._doc_bytes

    @property
    def text_bytes(self) -> np.ndarray:
        """(text_bytes,) uint8: the normalized UTF-8 text of every document, concatenated in doc_id
        order. The first access verifies every shard (:meth:`verify_reads`), as for ``token_array``."""
        self.verify_reads()
        return self._text

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

    def _check_ids(self, ids: Sequence[int] | np.ndarray, what: str = "chunk_id", limit: int | None = None) -> np.ndarray:
        """Ids in range (IndexError otherwise); chunk ids come back with their shards verified."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        limit = self.num_chunks if limit is None else limit
        bad = (arr < 0) | (arr >= limit)
        if bad.any():
            raise IndexError(f"{what} {int(arr[bad][0])} out of range: this datastore has {limit} ({what} 0..{limit - 1})")
        if what == "chunk_id":
            return self._verified_chunks(arr)
        return np.asarray([self._verified_doc(int(x)) for x in arr], dtype=np.int64)

    def tokens(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, L) padded with the pad id, lengths (n,)) of the given chunks."""
        arr = self._check_ids(ids)
        return self._tokens[arr], self._chunk_ntok[arr]

    def continuation_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """chunk_id + 1 where that chunk continues the same document, else -1."""
        arr = self._check_ids(ids)
        nxt = arr + 1
        ok = nxt < self.num_chunks
        self._verified_chunks(nxt[ok])
        same = np.zeros(len(arr), dtype=bool)
        same[ok] = self._chunk_doc[nxt[ok]] == self._chunk_doc[arr[ok]]
        return np.where(same, nxt, -1)

    def continuation(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each chunk's continuation: ((n, L) padded, lengths (n,), 0 where none)."""
        nxt = self.continuation_ids(ids)
        self._verified_chunks(nxt[nxt >= 0])
        has = nxt >= 0
        toks = np.full((len(nxt), self.chunk_length), self.pad_token_id, dtype=self._tokens.dtype)
        lens = np.zeros(len(nxt), dtype=np.int32)
        toks[has] = self._tokens[nxt[has]]
        lens[has] = self._chunk_ntok[nxt[has]]
        return toks, lens

    def neighbour_tokens(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RETRO's retrieved unit: each chunk followed by its continuation, (n, 2L) and lengths.

        Tokens are left-aligned: chunk tokens, then continuation tokens, then padding.
        """
        arr = self._check_ids(ids)
        L = self.chunk_length
        nxt = self._verified_chunks(np.minimum(arr + 1, self.num_chunks - 1))
        same = (nxt != arr) & (self._chunk_doc[nxt] == self._chunk_doc[arr])
        out = np.empty((len(arr), 2 * L), dtype=self._tokens.dtype)
        out[:, :L] = self._tokens[arr]
        out[:, L:] = self._tokens[nxt]
        out[~same, L:] = self.pad_token_id
        # only a document's last chunk is short, and it never has a continuation
        return out, self._chunk_ntok[arr] + np.where(same, self._chunk_ntok[nxt], 0)

    def chunk_texts(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        arr = self._check_ids(ids)
        spans = self._byte_spans[arr]
        return [self._decode(s, e) for s, e in spans]

    def _decode(self, start: int, end: int) -> str:
        try:
            return self._text[start:end].tobytes().decode("utf-8")
        except UnicodeDecodeError as exc:  # only a damaged datastore written without checksums gets here
            raise self._corrupt("text.bin", f"bytes {start + exc.start:,}..{start + exc.end:,} are not UTF-8: the file is damaged") from None

    def doc_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.asarray(self._chunk_doc[self._check_ids(ids)])

    def chunks(self, ids: Sequence[int] | np.ndarray) -> list[Chunk]:
        arr = self._check_ids(ids)
        toks, lens = self.tokens(arr)
        docs = self._chunk_doc[arr]
        first = self._doc_first_chunk[docs]
        nxt = self.continuation_ids(arr)
        texts = self.chunk_texts(arr)
        out = []
        for i, cid in enumerate(arr):
            doc = int(docs[i])
            doc_start = int(self._doc_bytes[doc])
            s, e = (int(x) for x in self._byte_spans[cid])
            prefix = self._decode(doc_start, s)
            out.append(Chunk(
                chunk_id=int(cid), doc_id=doc, position=int(cid - first[i]),
                tokens=np.array(toks[i, : lens[i]]), text=texts[i],
                char_start=len(prefix), char_end=len(prefix) + len(texts[i]),
                continuation_id=int(nxt[i]) if nxt[i] >= 0 else None,
            ))
        return out

    # -- documents -----------------------------------------------------------------------

    def document_text(self, doc_id: int) -> str:
        d = int(self._check_ids([doc_id], "doc_id", self.num_documents)[0])
        return self._decode(int(self._doc_bytes[d]), int(self._doc_bytes[d + 1]))

    def document_chunk_ids(self, doc_id: int) -> np.ndarray:
        d = int(self._check_ids([doc_id], "doc_id", self.num_documents)[0])
        return np.arange(self._doc_first_chunk[d], self._doc_first_chunk[d + 1], dtype=np.int64)

    def document(self, doc_id: int) -> Document:
        d = int(self._check_ids([doc_id], "doc_id", self.num_documents)[0])
        shard = bisect.bisect_right(self._shard_first_doc, d) - 1
        if self._shard_cache is None or self._shard_cache[0] != shard:
            path = self._documents_file(shard)
            cols = ["source", "source_id", "n_tokens"]
            self._shard_cache = (shard, pq.read_table(path, columns=cols).to_pydict())
        rows = self._shard_cache[1]
        row = d - self._shard_first_doc[shard]
        return Document(
            doc_id=d, source=rows["source"][row], source_id=rows["source_id"][row],
            text=self.document_text(d), first_chunk_id=int(self._doc_first_chunk[d]),
            n_chunks=int(self._doc_first_chunk[d + 1] - self._doc_first_chunk[d]),
            n_tokens=int(rows["n_tokens"][row]),
        )

    def _documents_file(self, shard: int) -> Path:
        """The documents Parquet file of ``shard``, its checksum verified once per process (Parquet
        pages carry no checksum pyarrow checks: a damaged page could decode to wrong values)."""
        rec = self.manifest["shards"][shard]["documents_file"]
        path = self.path / rec["path"]
        if shard not in self._docs_verified:
            if sha256_file(path) != rec["sha256"]:
                raise ArtifactCorruptError(path, "differs from its recorded checksum: the file is damaged")
            self._docs_verified.add(shard)
        return path

    def iter_documents(self, columns: list[str] | None = None) -> Iterator[dict]:
        """Rows of the documents shards in doc_id order (all columns unless named)."""
        for s in range(len(self.manifest["shards"])):
            pf = pq.ParquetFile(self._documents_file(s))
            for batch in pf.iter_batches(columns=columns, batch_size=1024):
                yield from batch.to_pylist()

    def iter_chunk_batches(self, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(chunk_ids, texts) in chunk_id order: what an embedding job reads."""
        for start in range(0, self.num_chunks, batch_size):
            ids = np.arange(start, min(start + batch_size, self.num_chunks), dtype=np.int64)
            yield ids, self.chunk_texts(ids)

    # -- integrity -----------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every checksum; returns the problems found as ``file: what`` (empty if none).

        With recorded file checksums (datastores built since issue 15) every file is checked whole,
        and a damaged array is then located shard by shard; without them (older datastores) the
        Parquet shards and each shard's tokens and text are checked against their own checksums."""
        problems = [f"{rel}: {what}" for rel, what in verify_files(self.path, self.manifest)]
        damaged = {p.split(":")[0] for p in problems}
        recorded = recorded_files(self.manifest) is not None
        for i, s in enumerate(self.manifest["shards"]):
            if not recorded:
                for key in ("documents_file", "chunks_file", "removed_file"):
                    f = s[key]
                    if sha256_file(self.path / f["path"]) != f["sha256"]:
                        problems.append(f"{f['path']}: checksum mismatch")
            if recorded and not damaged & {"arrays/tokens.npy", "arrays/text.bin", *(f"arrays/{a}.npy" for a in CHUNK_ARRAYS + DOC_ARRAYS)}:
                continue
            try:
                self._verify_shard(i)
            except ArtifactCorruptError as exc:
                problems.append(f"{Path(exc.path).relative_to(self.path)}: {exc.what}")
        return problems
