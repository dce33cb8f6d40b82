"""Result types of the index package: what every index verb and build returns, as small frozen
dataclasses, in one place so that callers (the service, RETRO, the command line) import them
without pulling in an engine.

A dense hit, an n-gram hit and a RETRO neighbour are the same kind of thing: a ``chunk_id`` in a
datastore. :func:`fetch_payloads` turns chunk ids into what a caller asked to see (text, tokens,
the continuation) through the datastore read API, so every index returns the same payload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# chunks, shared by every index


MAX_K = 4096  # the most hits one query may ask for, of any index


def check_k(k: int, ntotal: int) -> int:
    """``k`` as an int, or a :class:`~retromem.errors.QueryError` unless it is in 1..min(MAX_K, ntotal)."""
    from retromem.errors import QueryError

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError(f"k must be an integer, got {k!r}")
    limit = min(MAX_K, ntotal)
    if not 1 <= k <= limit:
        raise QueryError(f"k must be in 1..{limit}, got {k}")
    return int(k)


class BoundToDatastore:
    """An index bound to the datastore it was built from: ``meta`` (its manifest) records
    ``datastore_id`` and ``datastore_path``; the datastore opens from that path on first use, or is
    attached (a moved one, or one already open), and any other datastore is refused. The index sets
    ``path``, ``meta`` and ``_datastore`` (None until attached)."""

    path: Path
    meta: dict[str, Any]
    _datastore: Any

    @property
    def datastore_id(self) -> str:
        return self.meta["datastore_id"]

    @property
    def datastore(self):
        """The datastore this index was built from (opened from the recorded path on first use)."""
        if self._datastore is None:
            from retromem.datastore import Datastore
            from retromem.errors import DatastoreError, IndexFormatError

            try:
                self.attach_datastore(Datastore.open(self.meta["datastore_path"]))
            except DatastoreError as exc:
                raise IndexFormatError(f"{self.path} was built from the datastore at {self.meta['datastore_path']}, "
                                       f"which cannot be opened ({exc}); pass datastore= to "
                                       f"{type(self).__name__}.open") from exc
        return self._datastore

    def attach_datastore(self, ds) -> None:
        from retromem.errors import IndexFormatError

        if ds.datastore_id != self.datastore_id:
            raise IndexFormatError(f"{self.path} was built from datastore {self.datastore_id[:16]}, "
                                   f"not {ds.datastore_id[:16]} ({ds.path}): it will not serve another datastore")
        self._datastore = ds


@dataclass(frozen=True)
class ChunkPayload:
    """A chunk fetched from the datastore, with its continuation (the next chunk of the same
    document; ``continuation_id`` is ``None`` for a document's last chunk)."""

    chunk_id: int
    doc_id: int
    text: str | None = None
    tokens: np.ndarray | None = None
    continuation_id: int | None = None
    continuation_text: str | None = None
    continuation_tokens: np.ndarray | None = None


def fetch_payloads(ds, chunk_ids: Sequence[int] | np.ndarray, *, text: bool = True, tokens: bool = True,
                   continuation: bool = True) -> list[ChunkPayload]:
    """Payloads of ``chunk_ids`` from datastore ``ds`` (a :class:`retromem.datastore.Datastore`), in order.

    Negative ids (FAISS's "no result") are not allowed here: filter them first.
    """
    ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return []
    docs = ds.doc_ids(ids)
    texts = ds.chunk_texts(ids) if text else None
    if tokens:
        toks, lens = ds.tokens(ids)
    nxt = ds.continuation_ids(ids) if continuation else np.full(len(ids), -1)
    has = nxt >= 0
    ctexts: dict[int, str] = {}
    ctoks: dict[int, np.ndarray] = {}
    if continuation and has.any():
        nids = nxt[has]
        if text:
            ctexts = dict(zip(nids.tolist(), ds.chunk_texts(nids)))
        if tokens:
            nt, nl = ds.tokens(nids)
            ctoks = {int(c): np.array(nt[i, : nl[i]]) for i, c in enumerate(nids)}
    out = []
    for i, cid in enumerate(ids.tolist()):
        n = int(nxt[i])
        out.append(ChunkPayload(
            chunk_id=cid, doc_id=int(docs[i]),
            text=texts[i] if texts is not None else None,
            tokens=np.array(toks[i, : lens[i]]) if tokens else None,
            continuation_id=n if n >= 0 else None,
            continuation_text=ctexts.get(n) if n >= 0 else None,
            continuation_tokens=ctoks.get(n) if n >= 0 else None,
        ))
    return out


# ---------------------------------------------------------------------------------------------
# dense (FAISS)


@dataclass(frozen=True)
class SearchResult:
    """``chunk_ids`` (n, k) int64 and ``scores`` (n, k) float32 (cosine), best first. A row holds
    -1 / -inf only where the index has fewer than k eligible vectors under the search parameters.
    ``payloads[i][j]`` is hit (i, j) fetched from the datastore when asked for."""

    chunk_ids: np.ndarray
    scores: np.ndarray
    payloads: list[list[ChunkPayload]] | None = None


@dataclass(frozen=True)
class DenseBuildResult:
    out: Path
    meta: dict[str, Any]  # the index.json written
    seconds: dict[str, float]  # per build step, and "total"


@dataclass(frozen=True)
class TuneReport:
    """The search parameter chosen for a target recall, and the recall/speed curve that led to it
    (``param`` is ``None`` for an index without one: exact or fixed)."""

    param: str | None
    value: int | None
    target_recall: float
    k: int
    reached: bool
    curve: list[dict[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # index.json as rewritten with the new default
    held_out_recall: float | None = None  # recall@k at the chosen value on held-out queries of a query file


@dataclass(frozen=True)
class EvalReport:
    factory: str
    queries: int
    recall: dict[int, float]  # k -> recall@k against exact search
    qps: float  # this index, at its default parameters
    exact_qps: float  # exact search over the stored float32 vectors, same queries, same run
    bytes_per_vector: float
    float32_bytes_per_vector: int
    params: dict[str, int]
    single_qps: float = 0.0  # one query per call
    exact_single_qps: float = 0.0

    @property
    def speedup(self) -> float:
        return self.qps / self.exact_qps if self.exact_qps else float("nan")

    @property
    def single_speedup(self) -> float:
        return self.single_qps / self.exact_single_qps if self.exact_single_qps else float("nan")

    @property
    def compression(self) -> float:
        return self.float32_bytes_per_vector / self.bytes_per_vector


# ---------------------------------------------------------------------------------------------
# exact n-gram search (suffix array)


@dataclass(frozen=True)
class Count:
    count: int
    approx: bool = False


@dataclass(frozen=True)
class Prob:
    """P(next_token | prompt) from counts; ``prob`` is ``None`` when the prompt never occurs."""

    prompt_count: int
    cont_count: int
    prob: float | None


@dataclass(frozen=True)
class InfgramProb:
    """∞-gram probability: the prompt is cut to its longest suffix that occurs in the corpus
    (``suffix_len`` tokens, 0 for the unigram distribution) and P(next_token | that suffix)."""

    prompt_count: int
    cont_count: int
    prob: float
    suffix_len: int


@dataclass(frozen=True)
class TokenCount:
    count: int
    prob: float


@dataclass(frozen=True)
class NextTokenDistribution:
    """Next-token counts after the prompt (or after its longest occurring suffix, when
    ``suffix_len`` is set). ``approx`` when the engine sampled ``max_support`` occurrences."""

    prompt_count: int
    tokens: dict[int, TokenCount]
    approx: bool
    suffix_len: int | None = None

    def top(self, k: int = 10) -> list[tuple[int, TokenCount]]:
        return sorted(self.tokens.items(), key=lambda kv: (-kv[1].count, kv[0]))[:k]


@dataclass(frozen=True)
class Occurrence:
    """One place an n-gram occurs: token ``offset`` into document ``doc_id``, which falls in chunk
    ``chunk_id`` at ``chunk_offset`` (an n-gram may run on into the next chunk)."""

    doc_id: int
    chunk_id: int
    offset: int
    chunk_offset: int
    shard: int


@dataclass(frozen=True)
class FindResult:
    count: int
    occurrences: tuple[Occurrence, ...]  # at most ``limit``, in suffix-array order


@dataclass(frozen=True)
class DocumentSearch:
    """Matches of a CNF (AND of ORs of n-grams) and where they are."""

    count: int
    approx: bool
    hits: tuple[Occurrence, ...]

    @property
    def doc_ids(self) -> list[int]:
        return sorted({h.doc_id for h in self.hits})


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    prob: float
    suffix_len: int
    prompt_count: int
    cont_count: int


@dataclass(frozen=True)
class NgramBuildResult:
    path: Path
    manifest: dict[str, Any]
    already_complete: bool
    seconds: float
    peak_rss_bytes: int  # largest resident set of this process or any indexer child


# ---------------------------------------------------------------------------------------------
# compressed substring search (FM-index)


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


__all__ = [
    "ChunkPayload", "Count", "DenseBuildResult", "DocumentSearch", "EvalReport", "FMBuildResult", "FMContext",
    "FMFindResult", "FMHit", "FindResult", "InfgramProb", "NextTokenDistribution", "NgramBuildResult", "Occurrence",
    "Prob", "SearchResult", "TokenCount", "TokenScore", "TuneReport", "fetch_payloads",
]
