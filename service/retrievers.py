"""What the LangChain and LlamaIndex retrievers (:mod:`retromem.service.langchain`,
:mod:`retromem.service.llamaindex`) share, with neither framework imported: one text query searched
on a dense index in this process or through the retrieval service's client, and its hits as
:class:`RetrievedChunk` records carrying what a citation needs (``doc_id``, ``chunk_id``,
``source_id``, score, the document's metadata, the chunk's text and, when asked, its continuation).

The searcher is duck-typed on :meth:`retromem.index.dense.DenseIndex.search`'s verb, which
:class:`retromem.service.client.RetrievalClient` shares: ``search(queries, k, *, exclude_doc_ids,
fetch, nprobe, ef_search)``, returning a :class:`retromem.index.types.SearchResult` with payloads.
Queries are embedded by the index (in process or on the server) with its recorded query prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retromem.config import fail, positive_int
from retromem.errors import QueryError

# the keys every framework document carries (besides the document's own ``metadata``)
HIT_KEYS = ("doc_id", "chunk_id", "source_id", "score", "continuation_id")


@dataclass(frozen=True)
class RetrievedChunk:
    """One hit: a chunk of a datastore, its score under the index's similarity (higher is better),
    its document (``doc_id``, and ``source_id``: the document's id in the input) and that document's
    metadata; ``continuation_*`` is the next chunk of the same document when it was asked for."""

    text: str
    score: float
    chunk_id: int
    doc_id: int
    source_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    continuation_id: int | None = None
    continuation_text: str | None = None

    def fields(self) -> dict[str, Any]:
        """The framework documents' metadata: the ids and score flat, the document's metadata
        under ``metadata`` (nested, so a document field never shadows an id)."""
        out = {"doc_id": self.doc_id, "chunk_id": self.chunk_id, "source_id": self.source_id, "score": self.score,
               "continuation_id": self.continuation_id, "metadata": dict(self.metadata)}
        if self.continuation_text is not None:
            out["continuation"] = self.continuation_text
        return out


@dataclass(frozen=True)
class SearchOptions:
    """How a framework retriever searches: ``k`` hits per query, documents to leave out of every
    answer, FAISS parameters (None: the index's tuned defaults), metadata ``filters`` (passed on
    only when given, to searchers that take them) and whether to fetch each hit's continuation."""

    k: int = 4
    exclude_doc_ids: tuple[int, ...] = ()
    nprobe: int | None = None
    ef_search: int | None = None
    filters: dict[str, Any] | None = None
    with_continuation: bool = False

    def __post_init__(self) -> None:
        positive_int(self.k, "k")
        for name in ("nprobe", "ef_search"):
            v = getattr(self, name)
            if v is not None:
                positive_int(v, name)
        if self.filters is not None and not isinstance(self.filters, dict):
            fail("filters", "be a dict {field: value or [values]}", self.filters)


def search_one(searcher: Any, query: str, opts: SearchOptions) -> list[RetrievedChunk]:
    """The hits of one text ``query`` on ``searcher`` (a dense index or a retrieval client), best first."""
    if not isinstance(query, str):
        raise QueryError(f"the query must be a string, got {type(query).__name__}")
    kwargs: dict[str, Any] = {"nprobe": opts.nprobe, "ef_search": opts.ef_search,
                              "fetch": ("text", "continuation") if opts.with_continuation else ("text",)}
    if opts.exclude_doc_ids:
        kwargs["exclude_doc_ids"] = [list(opts.exclude_doc_ids)]
    if opts.filters is not None:
        kwargs["filters"] = opts.filters
    res = searcher.search([query], opts.k, **kwargs)
    ids = np.asarray(res.chunk_ids[0])
    scores = np.asarray(res.scores[0])
    payloads = res.payloads[0] if res.payloads is not None else []
    valid = ids >= 0  # FAISS's -1: fewer hits than k were reachable
    if len(payloads) != int(valid.sum()):
        raise AssertionError(f"{len(payloads)} payloads for {int(valid.sum())} hits")
    return [_chunk(p, float(s)) for p, s in zip(payloads, scores[valid])]


def _chunk(p: Any, score: float) -> RetrievedChunk:
    # source_id and metadata ride on the payload where the datastore records them
    meta = getattr(p, "metadata", None) or {}
    return RetrievedChunk(text=p.text or "", score=score, chunk_id=int(p.chunk_id), doc_id=int(p.doc_id),
                          source_id=getattr(p, "source_id", None) or None, metadata=dict(meta),
                          continuation_id=p.continuation_id, continuation_text=p.continuation_text)


def open_index(path: str | Path, datastore: Any = None) -> Any:
    """A dense index opened for a framework retriever (``datastore``: a moved one, as ``DenseIndex.open`` takes)."""
    from retromem.index.dense import DenseIndex

    return DenseIndex.open(path, datastore=datastore) if datastore is not None else DenseIndex.open(path)


def open_client(target: str, **kwargs: Any) -> Any:
    """A retrieval client for a framework retriever (``kwargs``: token, tls_ca, timeout, as the client takes)."""
    from retromem.service.client import RetrievalClient

    return RetrievalClient(target, **kwargs)


def options(k: int, exclude_doc_ids: Sequence[int] | None, **kwargs: Any) -> SearchOptions:
    return SearchOptions(k=k, exclude_doc_ids=tuple(int(d) for d in (exclude_doc_ids or ())), **kwargs)
