"""The compressed variant of exact search (infini-gram mini's idea): an FM-index over the
datastore's normalized document text, answering ``count`` and ``find`` of any substring and fetching
the document around a hit.

The index is the ``fm-index`` package's ``FMIndex`` (Rust) over all documents joined with a NUL
separator; the datastore's normalizer removes control characters, so NUL never occurs in a document
and a pattern (which may not contain it) never matches across a document boundary. We use the
single-text ``FMIndex`` rather than the package's ``MultiFMIndex``: on 3,000 documents of the shared
corpora the latter's index was 2.4x larger (359% vs 152% of the text bytes, measured). The index is
saved with the package's own serialisation in ``fm_index.bin``, the documents' starting character
offsets in ``doc_starts.npy``; ``fm_index.json`` records the datastore it came from and the file
sizes. Hits are character offsets into a document; they map to the datastore chunk that holds them.

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
STARTS_NAME = "doc_starts.npy"
SEP = "\x00"


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

    from fm_index import FMIndex as _FMIndex
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
    if any(SEP in t for t in texts):
        raise FMIndexError("a document contains NUL, the FM-index's document separator; rebuild the datastore "
                           "(its normalizer removes control characters)")
    lens = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(texts) else np.zeros(0, np.int64)
    fm = _FMIndex(SEP.join(texts))
    del texts
    with atomic_path(out / STARTS_NAME) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, starts)
    with atomic_path(out / DATA_NAME) as tmp:
        tmp.write_bytes(fm.__getstate__())
    size = (out / DATA_NAME).stat().st_size + (out / STARTS_NAME).stat().st_size
    m = {
        "format_version": FORMAT_VERSION, "kind": "FM-index (fm-index FMIndex over NUL-joined documents)",
        "library": {"package": "fm-index", "version": md.version("fm-index")},
        "datastore_id": ds.datastore_id, "datastore_path": str(Path(datastore_path).resolve()),
        "documents": ds.num_documents, "text_bytes": text_bytes, "index_bytes": size,
        "file_bytes": {DATA_NAME: (out / DATA_NAME).stat().st_size, STARTS_NAME: (out / STARTS_NAME).stat().st_size},
        "size_ratio": size / max(text_bytes, 1),
    }
    write_json(mpath, m)
    return FMBuildResult(out, m, False, time.perf_counter() - t0)


class FMIndex:
    """A finished FM-index, loaded into memory, with its datastore for mapping hits to chunks."""

    def __init__(self, path: str | Path, datastore=None, max_query_chars: int = 10_000) -> None:
        from fm_index import FMIndex as _FMIndex

        from datastore import Datastore

        self.path = Path(path)
        self.max_query_chars = max_query_chars
        mpath = self.path / MANIFEST_NAME
        if not mpath.exists():
            raise FMIndexError(f"{self.path} is not an FM-index: no {MANIFEST_NAME}")
        self.manifest = m = read_json(mpath)
        if m.get("format_version") != FORMAT_VERSION:
            raise FMIndexError(f"{self.path} has FM-index format {m.get('format_version')}; rebuild it with this version")
        for name, size in m["file_bytes"].items():
            f = self.path / name
            if not f.is_file():
                raise FMIndexError(f"{f} is missing; rebuild with `retromem index build-fm --overwrite`")
            if f.stat().st_size != size:
                raise FMIndexError(f"{f} is truncated or corrupt: {f.stat().st_size} bytes, the index records "
                                   f"{size}; rebuild with `retromem index build-fm --overwrite`")
        data = self.path / DATA_NAME
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore or m["datastore_path"])
        if self.datastore.datastore_id != m["datastore_id"]:
            raise FMIndexError(f"{self.path} was built from datastore {m['datastore_id'][:16]}, not from "
                               f"{self.datastore.datastore_id[:16]} at {self.datastore.path}")
        self._starts = np.load(self.path / STARTS_NAME)
        self.fm = _FMIndex("")
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
        if SEP in pattern:
            raise FMQueryError("`pattern` contains NUL, which no document contains (it separates documents)")
        if len(pattern) > self.max_query_chars:
            raise FMQueryError(f"`pattern` has {len(pattern)} characters, more than max_query_chars={self.max_query_chars}")
        return pattern

    def count(self, pattern: str) -> int:
        return int(self.fm.count(self._check(pattern)))

    def find(self, pattern: str, limit: int = 100) -> FMFindResult:
        """Occurrences (document, character offset, chunk): the first ``limit`` by document and offset."""
        if not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"`limit` must be a non-negative integer, got {limit!r}")
        pos = np.sort(np.asarray(self.fm.locate(self._check(pattern)), dtype=np.int64))
        docs = np.searchsorted(self._starts, pos[:limit], side="right") - 1
        offs = pos[:limit] - self._starts[docs]
        hits = tuple(FMHit(int(d), int(o), self._chunk_of(int(d), int(o))) for d, o in zip(docs, offs))
        return FMFindResult(int(len(pos)), hits)

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
