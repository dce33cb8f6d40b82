"""Read API of a built datastore: chunks, continuations, documents and the token array.

Random access never touches Parquet: the token array (``n_chunks x chunk_length``, uint16 or
uint32), the chunk -> document map, the byte spans and the concatenated text are memory-mapped
``.npy``/``.bin`` files, so fetching a chunk's tokens and its continuation by ``chunk_id`` is an
O(1) array lookup. Parquet shards are the canonical, portable copy (documents with metadata,
chunks with spans and tokens) and are read for iteration and metadata.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from retromem.datastore import schema
from retromem.datastore.atomic import read_json, sha256_file
from retromem.errors import DatastoreError


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
        self.manifest = read_json(manifest_path)
        version = self.manifest.get("format_version")
        if version != schema.FORMAT_VERSION:
            raise DatastoreError(
                f"{self.path} has datastore format version {version}; this retromem reads version "
                f"{schema.FORMAT_VERSION}. Rebuild it with this version."
            )
        arrays = self.path / "arrays"
        self._tokens = np.load(arrays / "tokens.npy", mmap_mode="r")
        self._chunk_doc = np.load(arrays / "chunk_doc_ids.npy", mmap_mode="r")
        self._chunk_ntok = np.load(arrays / "chunk_ntokens.npy", mmap_mode="r")
        self._byte_spans = np.load(arrays / "chunk_byte_spans.npy", mmap_mode="r")
        self._doc_first_chunk = np.load(arrays / "doc_first_chunk.npy", mmap_mode="r")
        self._doc_bytes = np.load(arrays / "doc_byte_offsets.npy", mmap_mode="r")
        size = self.manifest["arrays"]["text"]["bytes"]
        self._text = np.memmap(arrays / "text.bin", dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._shard_first_doc = [s["first_doc_id"] for s in self.manifest["shards"]]
        self._shard_cache: tuple[int, object] | None = None

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
        """Memory-mapped (num_chunks, chunk_length) token ids; short chunks are padded."""
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
        """(text_bytes,) uint8: the normalized UTF-8 text of every document, concatenated in doc_id order."""
        return self._text

    @cached_property
    def tokenizer(self):
        """The datastore's own tokenizer (a transformers fast tokenizer), loaded from its directory."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path / "tokenizer"))

    # -- chunks --------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int] | np.ndarray, what: str = "chunk_id", limit: int | None = None) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        limit = self.num_chunks if limit is None else limit
        bad = (arr < 0) | (arr >= limit)
        if bad.any():
            raise IndexError(f"{what} {int(arr[bad][0])} out of range: this datastore has {limit} ({what} 0..{limit - 1})")
        return arr

    def tokens(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (n, L) padded with the pad id, lengths (n,)) of the given chunks."""
        arr = self._check_ids(ids)
        return self._tokens[arr], self._chunk_ntok[arr]

    def continuation_ids(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """chunk_id + 1 where that chunk continues the same document, else -1."""
        arr = self._check_ids(ids)
        nxt = arr + 1
        ok = nxt < self.num_chunks
        same = np.zeros(len(arr), dtype=bool)
        same[ok] = self._chunk_doc[nxt[ok]] == self._chunk_doc[arr[ok]]
        return np.where(same, nxt, -1)

    def continuation(self, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of each chunk's continuation: ((n, L) padded, lengths (n,), 0 where none)."""
        nxt = self.continuation_ids(ids)
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
        nxt = np.minimum(arr + 1, self.num_chunks - 1)
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
        return [self._text[s:e].tobytes().decode("utf-8") for s, e in spans]

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
            prefix = self._text[doc_start:s].tobytes().decode("utf-8")
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
        return self._text[self._doc_bytes[d] : self._doc_bytes[d + 1]].tobytes().decode("utf-8")

    def document_chunk_ids(self, doc_id: int) -> np.ndarray:
        d = int(self._check_ids([doc_id], "doc_id", self.num_documents)[0])
        return np.arange(self._doc_first_chunk[d], self._doc_first_chunk[d + 1], dtype=np.int64)

    def document(self, doc_id: int) -> Document:
        d = int(self._check_ids([doc_id], "doc_id", self.num_documents)[0])
        shard = bisect.bisect_right(self._shard_first_doc, d) - 1
        if self._shard_cache is None or self._shard_cache[0] != shard:
            path = self.path / self.manifest["shards"][shard]["documents_file"]["path"]
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

    def iter_documents(self, columns: list[str] | None = None) -> Iterator[dict]:
        """Rows of the documents shards in doc_id order (all columns unless named)."""
        for shard in self.manifest["shards"]:
            pf = pq.ParquetFile(self.path / shard["documents_file"]["path"])
            for batch in pf.iter_batches(columns=columns, batch_size=1024):
                yield from batch.to_pylist()

    def iter_chunk_batches(self, batch_size: int = 4096) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(chunk_ids, texts) in chunk_id order: what an embedding job reads."""
        for start in range(0, self.num_chunks, batch_size):
            ids = np.arange(start, min(start + batch_size, self.num_chunks), dtype=np.int64)
            yield ids, self.chunk_texts(ids)

    # -- integrity -----------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Recompute every checksum in the manifest; returns the problems found (empty if none)."""
        import hashlib

        problems = []
        for s in self.manifest["shards"]:
            for key in ("documents_file", "chunks_file", "removed_file"):
                f = s[key]
                if sha256_file(self.path / f["path"]) != f["sha256"]:
                    problems.append(f"{f['path']}: checksum mismatch")
            c0, n = s["first_chunk_id"], s["chunks"]
            if hashlib.sha256(np.ascontiguousarray(self._tokens[c0 : c0 + n]).tobytes()).hexdigest() != s["tokens_sha256"]:
                problems.append(f"arrays/tokens.npy rows {c0}..{c0 + n - 1} (shard {s['shard']}): checksum mismatch")
        return problems
