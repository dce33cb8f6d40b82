"""The compressed variant of exact search (infini-gram mini's idea): an FM-index over the
datastore's normalized document text, answering ``count`` and ``find`` of any substring and fetching
the document around a hit.

The index is the ``fm-index`` package's ``MultiFMIndex`` (Rust; one FM-index over all documents
joined with separators, so no match crosses a document boundary), saved with its own serialisation
in ``fm_index.bin``; ``fm_index.json`` records the datastore it was built from and the file size.
Hits are character offsets into a document; they map to the datastore chunk that holds them.

Measured against the issue's target (index at most 50% of the corpus bytes), this library does not
meet it: see BENCHMARKS.md ("N-gram search"), where the size ratio is reported.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from datastore.atomic import atomic_path, read_json, write_json
from retromem.errors import ConfigError, RetromemError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "fm_index.json"
DATA_NAME = "fm_index.bin"


class FMIndexError(RetromemError):
    """An FM-index directory is missing, truncated, or built from another datastore."""


class FMQueryError(RetromemError, ValueError):
    """An FM-index query is empty, too long or not text."""


@dataclass(frozen=True)
class FMHit:
    """An occurrence: character ``offset`` into document ``doc_id``, inside chunk ``chunk_id``."""

    doc_id: int
    offset: int
    chunk_id: int


@dataclass(frozen=True)
class FMFindResult:
    count: int
    hits: tuple[FMHit, ...]


@dataclass(frozen=True)
class FMContext:
    """The document text around a hit: ``text[match_start:match_end]`` is the match."""

    doc_id: int
    chunk_id: int
    text: str
    match_start: int
    match_end: int
    doc_chars: int


@dataclass(frozen=True)
class FMBuildResult:
    path: Path
    manifest: dict
    already_complete: bool
    seconds: float


def build_fm_index(datastore_path: str | Path, out: str | Path, *, overwrite: bool = False,
                   progress: bool = True) -> FMBuildResult:
    """Build the FM-index of the datastore's documents in ``out`` (one atomic step: re-run to redo it)."""
    import importlib.metadata as md
    import shutil

    from fm_index import MultiFMIndex
    from tqdm.auto import tqdm

    from datastore import Datastore

    t0 = time.perf_counter()
    ds = Datastore.open(datastore_path)
    out = Path(out)
    mpath = out / MANIFEST_NAME
    if overwrite and out.exists():
        shutil.rmtree(out)
    if mpath.exists():
        m = read_json(mpath)
        if m.get("datastore_id") != ds.datastore_id:
            raise FMIndexError(f"{out} holds an FM-index of datastore {m.get('datastore_id', '?')[:16]}, not of "
                               f"{ds.datastore_id[:16]}; pass --overwrite or another --out")
        return FMBuildResult(out, m, True, time.perf_counter() - t0)
    texts = [ds.document_text(d) for d in tqdm(range(ds.num_documents), desc="FM-index: documents", disable=not progress)]
    text_bytes = int(ds.manifest["counts"]["text_bytes"])
    logger.info("building the FM-index of %d documents (%d bytes)", len(texts), text_bytes)
    fm = MultiFMIndex(texts)
    del texts
    with atomic_path(out / DATA_NAME) as tmp:
        tmp.write_bytes(fm.__getstate__())
    size = (out / DATA_NAME).stat().st_size
    m = {
        "format_version": FORMAT_VERSION, "kind": "FM-index (fm-index MultiFMIndex)",
        "library": {"package": "fm-index", "version": md.version("fm-index")},
        "datastore_id": ds.datastore_id, "datastore_path": str(Path(datastore_path).resolve()),
        "documents": ds.num_documents, "text_bytes": text_bytes, "index_bytes": size,
        "size_ratio": size / max(text_bytes, 1),
    }
    write_json(mpath, m)
    return FMBuildResult(out, m, False, time.perf_counter() - t0)


class FMIndex:
    """A finished FM-index, loaded into memory, with its datastore for mapping hits to chunks."""

    def __init__(self, path: str | Path, datastore=None, max_query_chars: int = 10_000) -> None:
        from fm_index import MultiFMIndex

        from datastore import Datastore

        self.path = Path(path)
        self.max_query_chars = max_query_chars
        mpath = self.path / MANIFEST_NAME
        if not mpath.exists():
            raise FMIndexError(f"{self.path} is not an FM-index: no {MANIFEST_NAME}")
        self.manifest = m = read_json(mpath)
        if m.get("format_version") != FORMAT_VERSION:
            raise FMIndexError(f"{self.path} has FM-index format {m.get('format_version')}; rebuild it with this version")
        data = self.path / DATA_NAME
        if not data.is_file():
            raise FMIndexError(f"{data} is missing; rebuild with `retromem index build-fm --overwrite`")
        if data.stat().st_size != m["index_bytes"]:
            raise FMIndexError(f"{data} is truncated or corrupt: {data.stat().st_size} bytes, the index records "
                               f"{m['index_bytes']}; rebuild with `retromem index build-fm --overwrite`")
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore or m["datastore_path"])
        if self.datastore.datastore_id != m["datastore_id"]:
            raise FMIndexError(f"{self.path} was built from datastore {m['datastore_id'][:16]}, not from "
                               f"{self.datastore.datastore_id[:16]} at {self.datastore.path}")
        self.fm = MultiFMIndex([])
        try:
            self.fm.__setstate__(data.read_bytes())
        except Exception as exc:  # the library raises its own error types on bad bytes
            raise FMIndexError(f"{data} cannot be read as an FM-index: {exc}") from exc
        self._spans = np.load(self.datastore.path / "arrays" / "chunk_byte_spans.npy", mmap_mode="r")
        self._doc_first_chunk = np.load(self.datastore.path / "arrays" / "doc_first_chunk.npy", mmap_mode="r")
        self._doc_bytes = np.load(self.datastore.path / "arrays" / "doc_byte_offsets.npy", mmap_mode="r")

    def _check(self, pattern: str) -> str:
        if not isinstance(pattern, str):
            raise TypeError(f"`pattern` must be text, got {type(pattern).__name__}")
        if not pattern:
            raise FMQueryError("`pattern` is empty; give at least one character")
        if len(pattern) > self.max_query_chars:
            raise FMQueryError(f"`pattern` has {len(pattern)} characters, more than max_query_chars={self.max_query_chars}")
        return pattern

    def count(self, pattern: str) -> int:
        return int(self.fm.count_all(self._check(pattern)))

    def find(self, pattern: str, limit: int = 100) -> FMFindResult:
        """Occurrences (document, character offset, chunk): the first ``limit`` by document and offset."""
        if not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"`limit` must be a non-negative integer, got {limit!r}")
        by_doc = self.fm.locate(self._check(pattern))
        hits: list[FMHit] = []
        total = sum(len(v) for v in by_doc.values())
        for d in sorted(by_doc):
            if len(hits) >= limit:
                break
            offs = sorted(by_doc[d])[: limit - len(hits)]
            hits.extend(FMHit(int(d), int(o), self._chunk_of(int(d), int(o))) for o in offs)
        return FMFindResult(total, tuple(hits))

    def _chunk_of(self, doc_id: int, char_offset: int) -> int:
        text = self.datastore.document_text(doc_id)
        byte = int(self._doc_bytes[doc_id]) + len(text[:char_offset].encode("utf-8"))
        c0, c1 = int(self._doc_first_chunk[doc_id]), int(self._doc_first_chunk[doc_id + 1])
        starts = np.asarray(self._spans[c0:c1, 0])
        return c0 + int(np.searchsorted(starts, byte, side="right")) - 1

    def context(self, hit: FMHit, pattern_chars: int, window: int = 200) -> FMContext:
        """The document around ``hit``: ``window`` characters either side of the match."""
        text = self.datastore.document_text(hit.doc_id)
        s, e = max(0, hit.offset - window), min(len(text), hit.offset + pattern_chars + window)
        return FMContext(hit.doc_id, hit.chunk_id, text[s:e], hit.offset - s, hit.offset - s + pattern_chars, len(text))

    def contexts(self, hits: Sequence[FMHit], pattern_chars: int, window: int = 200) -> list[FMContext]:
        return [self.context(h, pattern_chars, window) for h in hits]
