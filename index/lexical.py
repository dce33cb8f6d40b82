"""Lexical retrieval: BM25 over a datastore's chunks with the ``bm25s`` library, the baseline the dense
index is measured against (``retromem index lexical build|search``).

Every chunk of the datastore is one BM25 "document", numbered by its ``chunk_id``, so a hit is the same
kind of thing as a dense hit: :meth:`LexicalIndex.search` has :class:`retromem.index.dense.DenseIndex`'s
signature (``search(queries, k, exclude_doc_ids=..., fetch=...)``) and returns the same
:class:`~retromem.index.types.SearchResult` with payloads from the datastore, so
:mod:`retromem.retro.ralm` and :mod:`retromem.retro.qa` use either without knowing which.

Tokenization (the same for chunks and queries): ``bm25s.tokenize`` with ``lower=True`` and its
default pattern (runs of two or more word characters, ``(?u)\\b\\w\\w+\\b``), no stemmer, and its
English stop-word list removed (``tokenization="stopwords-en"``, the default) or kept
(``tokenization="words"``). Scoring: bm25s's ``lucene`` variant with ``k1`` and ``b``.

Scores are BM25 scores, not cosines. A chunk that shares no term with the query scores 0 and is never
returned: a row holds -1 / -inf past the last chunk that matches (as a dense row does past the last
reachable vector), so a query of stop words only has no hits.

The build is a batch job (:func:`retromem.datastore.job.open_job`, kind ``lexical-index``): locked,
refusing a directory that is not a lexical index, and atomic rather than resumable in parts (BM25's
statistics are global and the whole build is one pass over the text): the bm25s files are written
into ``_work/`` and moved into place, then ``lexical_index.json`` is written last (with every file's
size and checksum, :meth:`retromem.datastore.job.Job.seal`, so ``retromem index verify`` checks it),
binding the index to its datastore (id, path, the manifest's checksum). A re-run over a finished index returns it; one
over an index of another datastore, or with other settings, is refused.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from retromem.config import number, one_of, positive_int
from retromem.datastore.atomic import read_json, sha256_file
from retromem.datastore.job import open_job
from retromem.errors import IndexFormatError, QueryError
from retromem.index.dense import _fetch_flags  # the same fetch= as dense search
from retromem.index.types import BoundToDatastore, SearchResult, check_k, deleted_chunk_ids, fetch_payloads, record_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "lexical_index.json"
BM25_DIR = "bm25"
TOKENIZATIONS = ("stopwords-en", "words")


@dataclass(frozen=True)
class LexicalBuildConfig:
    """How to build: the tokenization (see the module doc), BM25's ``k1`` and ``b``, and how many
    chunk texts are read and tokenized per batch."""

    tokenization: str = "stopwords-en"
    k1: float = 1.5
    b: float = 0.75
    batch_chunks: int = 20_000

    def __post_init__(self) -> None:
        one_of(self.tokenization, "tokenization", TOKENIZATIONS, flag="--tokenization")
        number(self.k1, "k1", ge=0, flag="--k1")
        number(self.b, "b", ge=0, le=1, flag="--b")
        positive_int(self.batch_chunks, "batch_chunks", flag="--batch-chunks")


@dataclass(frozen=True)
class LexicalBuildResult:
    path: Path
    manifest: dict
    already_complete: bool
    seconds: float


def tokenize(texts: Sequence[str], tokenization: str) -> list[list[str]]:
    """Each text as its BM25 terms (lowercased words of 2+ characters, stop words dropped unless
    ``tokenization == "words"``)."""
    import bm25s

    if not texts:
        return []
    stop = "en" if tokenization == "stopwords-en" else None
    return bm25s.tokenize(list(texts), lower=True, stopwords=stop, stemmer=None, return_ids=False,
                          show_progress=False)


# ---------------------------------------------------------------------------------------------
# build


def build_lexical_index(datastore_path: str | Path, out: str | Path, config: LexicalBuildConfig | None = None, *,
                        overwrite: bool = False, progress: bool = True) -> LexicalBuildResult:
    """Build the BM25 index of every chunk of the datastore at ``datastore_path`` in ``out`` (see the
    module doc); a finished index of the same datastore and settings is returned as it is."""
    import bm25s
    from tqdm.auto import tqdm

    from retromem.datastore import Datastore

    cfg = config or LexicalBuildConfig()
    t0 = time.perf_counter()
    ds = Datastore.open(datastore_path)
    settings = {"tokenization": cfg.tokenization, "k1": cfg.k1, "b": cfg.b, "method": "lucene"}
    with open_job(out, "lexical-index", overwrite=overwrite, legacy=(MANIFEST_NAME,)) as job:
        m = job.finished(MANIFEST_NAME, ds.datastore_id, what="a lexical index", error=IndexFormatError)
        if m is not None:
            if m["bm25"] != settings:
                raise IndexFormatError(f"{job.path} holds a lexical index built with {m['bm25']}, not {settings}; "
                                       "pass --overwrite or another --out")
            return LexicalBuildResult(job.path, m, True, time.perf_counter() - t0)
        terms: list[list[str]] = []
        bar = tqdm(total=ds.num_chunks, unit="chunk", desc="bm25 tokenize", disable=not progress)
        for _, texts in ds.iter_chunk_batches(cfg.batch_chunks):
            terms += tokenize(texts, cfg.tokenization)
            bar.update(len(texts))
        bar.close()
        retriever = bm25s.BM25(k1=cfg.k1, b=cfg.b, method="lucene")
        retriever.index(terms, show_progress=progress)
        n_terms = int(sum(len(t) for t in terms))
        del terms
        tmp = job.work / BM25_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        retriever.save(str(tmp), show_progress=False)
        shutil.rmtree(job.path / BM25_DIR, ignore_errors=True)  # a kill between move and manifest left it
        os.replace(tmp, job.path / BM25_DIR)
        files = {p.name: p.stat().st_size for p in sorted((job.path / BM25_DIR).iterdir()) if p.is_file()}
        import importlib.metadata as md

        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "bm25",
            "engine": {"package": "bm25s", "version": md.version("bm25s")},
            "datastore_id": ds.datastore_id,
            "datastore_path": record_path(datastore_path, job.path),  # relative: the tree may move
            "datastore_manifest_sha256": sha256_file(ds.path / "manifest.json"),
            "bm25": settings,
            "counts": {"chunks": ds.num_chunks, "documents": ds.num_documents, "terms": n_terms,
                       "vocabulary": len(retriever.vocab_dict)},
            "files": {f"{BM25_DIR}/{k}": v for k, v in files.items()},
        }
        manifest = job.seal(MANIFEST_NAME, manifest)  # last, with every file's size and checksum
        job.clear_work()
        logger.info("bm25 index of %d chunks (%d terms) in %.1fs", ds.num_chunks, n_terms, time.perf_counter() - t0)
        return LexicalBuildResult(job.path, manifest, False, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# search


class LexicalIndex(BoundToDatastore):
    """A built BM25 index, opened for search; refuses to serve another datastore than its own."""

    def __init__(self, path: str | Path, *, datastore=None) -> None:
        import bm25s

        self.path = Path(path)
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            hint = (" (an unfinished build: re-run `retromem index lexical build`)" if (self.path / "_work").exists()
                    else "; build one with `retromem index lexical build`")
            raise IndexFormatError(f"{self.path} is not a lexical index: no {MANIFEST_NAME}{hint}")
        try:
            self.meta = read_json(mpath)
        except ValueError as exc:
            raise IndexFormatError(f"{mpath} is corrupt: {exc}") from exc
        if self.meta.get("format_version") != FORMAT_VERSION or self.meta.get("kind") != "bm25":
            raise IndexFormatError(f"{self.path} holds lexical index format {self.meta.get('format_version')} "
                                   f"({self.meta.get('kind')}); this retromem reads bm25 format {FORMAT_VERSION}")
        for name, size in self.meta["files"].items():
            p = self.path / name
            if not p.is_file() or p.stat().st_size != size:
                raise IndexFormatError(f"index file {p} is missing or not {size} bytes: truncated or replaced; "
                                       "rebuild with `retromem index lexical build --overwrite`")
        self.tokenization = self.meta["bm25"]["tokenization"]
        self.ntotal = int(self.meta["counts"]["chunks"])
        self._bm25 = bm25s.BM25.load(str(self.path / BM25_DIR), show_progress=False)
        if int(self._bm25.scores["num_docs"]) != self.ntotal:
            raise IndexFormatError(f"{self.path}: the bm25 files hold {self._bm25.scores['num_docs']} chunks, "
                                   f"{MANIFEST_NAME} says {self.ntotal}")
        self._datastore = None
        if datastore is not None:
            self.attach_datastore(datastore)

    @classmethod
    def open(cls, path: str | Path, **kwargs) -> "LexicalIndex":
        return cls(path, **kwargs)


    def check_k(self, k: int) -> int:
        return check_k(k, self.ntotal)

    def scores(self, query: str) -> np.ndarray:
        """(ntotal,) float32 BM25 score of every chunk for one query text."""
        ids = self._bm25.get_tokens_ids(tokenize([query], self.tokenization)[0])
        if not ids:
            return np.zeros(self.ntotal, dtype=np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

    def search(self, queries: Sequence[str], k: int = 10, *,
               exclude_doc_ids: Sequence[Iterable[int] | int | None] | None = None,
               fetch: bool | str | Sequence[str] = False) -> SearchResult:
        """Top-k chunks by BM25 score for each query text, best first (ties by chunk id).

        ``exclude_doc_ids[i]`` (an int or ints): documents query i must not retrieve from; ``fetch``
        adds payloads (True, or any of "text", "tokens", "continuation"), as :meth:`DenseIndex.search`.
        """
        if isinstance(queries, str):
            raise QueryError("`queries` must be a batch: a list of texts, not one string")
        queries = list(queries)
        if not queries:
            raise QueryError("the query batch is empty")
        if not all(isinstance(q, str) for q in queries):
            raise QueryError("a lexical index takes query texts, not vectors or token ids")
        k = self.check_k(k)
        if exclude_doc_ids is not None and len(exclude_doc_ids) != len(queries):
            raise QueryError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {len(queries)} queries: "
                             "give one (or None) per query")
        want = _fetch_flags(fetch)
        first = None
        if exclude_doc_ids is not None:
            first = np.asarray(self.datastore.doc_first_chunk_array, dtype=np.int64)
        dead = deleted_chunk_ids(self.datastore)  # tombstones: scored 0, never a hit
        dead = dead[dead < self.ntotal]
        I = np.full((len(queries), k), -1, np.int64)
        D = np.full((len(queries), k), -np.inf, np.float32)
        for i, q in enumerate(queries):
            s = self.scores(q)
            s[dead] = 0.0
            if first is not None and exclude_doc_ids[i] is not None:
                excl = np.atleast_1d(np.asarray(exclude_doc_ids[i], dtype=np.int64)).reshape(-1)
                if len(excl) and (excl.min() < 0 or excl.max() >= len(first) - 1):
                    bad = int(excl[(excl < 0) | (excl >= len(first) - 1)][0])
                    raise QueryError(f"exclude_doc_ids[{i}] holds doc_id {bad}, outside 0..{len(first) - 2}")
                for d in np.unique(excl).tolist():
                    s[first[d]:first[d + 1]] = 0.0
            top = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
            top = top[np.lexsort((top, -s[top]))]  # by score, then chunk id: deterministic ties
            top = top[s[top] > 0]  # a chunk sharing no term with the query is no hit
            I[i, :len(top)] = top
            D[i, :len(top)] = s[top]
        payloads = None
        if want:
            payloads = [fetch_payloads(self.datastore, row[row >= 0], text="text" in want, tokens="tokens" in want,
                                       continuation="continuation" in want) for row in I]
        return SearchResult(I, D, payloads)


__all__ = ["FORMAT_VERSION", "LexicalBuildConfig", "LexicalBuildResult", "LexicalIndex", "MANIFEST_NAME",
           "TOKENIZATIONS", "build_lexical_index", "tokenize"]
