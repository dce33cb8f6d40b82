"""Result types of the index package: what every index verb and build returns, as small frozen
dataclasses, in one place so that callers (the service, RETRO, the command line) import them
without pulling in an engine.

A dense hit, an n-gram hit and a RETRO neighbour are the same kind of thing: a ``chunk_id`` in a
datastore. :func:`fetch_payloads` turns chunk ids into what a caller asked to see (text, tokens,
the continuation) through the datastore read API, so every index returns the same payload.
"""

from __future__ import annotations

import os
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


# ---------------------------------------------------------------------------------------------
# portable paths: an artifact records the paths of what it was built from relative to itself, so a
# tree of datastore + indexes can be copied or moved and still opens; the datastore_id check makes
# sure a path that now points somewhere else is refused, not trusted.

PATH_KEYS = ("datastore_path", "embeddings_path")  # manifest fields holding a path


def record_path(target: str | Path, artifact_dir: str | Path) -> str:
    """``target`` as a POSIX path relative to ``artifact_dir`` (what a manifest records); a URL as it is."""
    if "://" in str(target):
        return str(target)
    rel = os.path.relpath(Path(target).resolve(), Path(artifact_dir).resolve())
    return Path(rel).as_posix()


def resolve_path(artifact_dir: str | Path, recorded: str | Path) -> Path:
    """The path a manifest of ``artifact_dir`` records, made absolute: relative paths (since issue 18)
    are relative to the artifact, absolute ones (older manifests) are taken as they are; a URL
    (:mod:`retromem.storage`) is returned as it is (a str)."""
    if "://" in str(recorded):
        return recorded  # type: ignore[return-value]  # Path() would fold s3://b into s3:/b
    p = Path(recorded)
    return p if p.is_absolute() else Path(os.path.normpath(Path(artifact_dir).resolve() / p))


def portable_meta(meta: dict[str, Any], artifact_dir: str | Path) -> dict[str, Any]:
    """A copy of ``meta`` with every path field relative to ``artifact_dir`` (to write it)."""
    out = dict(meta)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = record_path(resolve_path(artifact_dir, out[key]), artifact_dir)
    return out


def resolved_meta(meta: dict[str, Any], artifact_dir: str | Path) -> dict[str, Any]:
    """A copy of ``meta`` with every path field absolute (to use it in this process)."""
    out = dict(meta)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(resolve_path(artifact_dir, out[key]))
    return out


def open_bound_datastore(artifact_dir: str | Path, meta: dict[str, Any], datastore=None, *, error: type[Exception],
                         what: str = "index"):
    """The datastore an artifact was built from: ``datastore`` (an open one, or a directory: a
    moved copy, given with ``--datastore``) or else the one at the recorded path, checked by
    ``datastore_id``; any other datastore raises ``error`` naming both ids."""
    from retromem.datastore import Datastore
    from retromem.errors import DatastoreError

    want = meta["datastore_id"]
    if datastore is not None and not isinstance(datastore, (str, Path)):
        ds = datastore
    else:
        where = datastore if datastore is not None else resolve_path(artifact_dir, meta["datastore_path"])
        try:
            ds = Datastore.open(where)
        except DatastoreError as exc:
            hint = ("" if datastore is not None else
                    f" (recorded as {meta['datastore_path']!r}, relative to the {what}); if the datastore moved, "
                    f"point at it with --datastore DIR")
            raise error(f"{artifact_dir} was built from the datastore at {where}, which cannot be opened: {exc}{hint}") from exc
    if ds.datastore_id != want:
        raise error(f"{artifact_dir} was built from datastore {want[:16]}, not {ds.datastore_id[:16]} ({ds.path}): "
                    f"the {what} will not serve another datastore; give the datastore it was built from (--datastore)")
    return ds


class BoundToDatastore:
    """An index bound to the datastore it was built from: ``meta`` (its manifest) records
    ``datastore_id`` and ``datastore_path`` (relative to the index; absolute in older manifests);
    the datastore opens from that path on first use, or is attached (a moved one, or one already
    open), and any other datastore is refused. The index sets ``path``, ``meta`` and
    ``_datastore`` (None until attached)."""

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
            from retromem.errors import IndexFormatError

            self._datastore = open_bound_datastore(self.path, self.meta, error=IndexFormatError)
        return self._datastore

    def attach_datastore(self, ds) -> None:
        """Serve with ``ds`` (an open datastore or its directory), refused unless it has this index's ``datastore_id``."""
        from retromem.errors import IndexFormatError

        self._datastore = open_bound_datastore(self.path, self.meta, ds, error=IndexFormatError)


# ---------------------------------------------------------------------------------------------
# what the datastore says about documents: tombstones, source ids, metadata. The read API of
# issue 18 (versions, tombstones, metadata) is used where the datastore has it; an older datastore
# has no deletions, and its source ids come from its documents table.


def deleted_doc_ids(ds) -> np.ndarray:
    """Sorted int64 doc ids deleted in the datastore's opened version (empty without tombstones)."""
    got = getattr(ds, "deleted_doc_ids", None)
    if got is None:
        return np.zeros(0, np.int64)
    return np.asarray(got() if callable(got) else got, dtype=np.int64)


def deleted_chunk_ids(ds) -> np.ndarray:
    """Sorted int64 chunk ids of the deleted documents (empty without tombstones)."""
    got = getattr(ds, "deleted_chunk_ids", None)
    if got is None:
        return np.zeros(0, np.int64)
    return np.asarray(got() if callable(got) else got, dtype=np.int64)


def live_chunk_mask(ds, chunk_ids: np.ndarray) -> np.ndarray:
    """(n,) bool: which of ``chunk_ids`` belong to documents that are not deleted."""
    deleted = deleted_chunk_ids(ds)
    ids = np.asarray(chunk_ids, dtype=np.int64)
    return ~np.isin(ids, deleted) if len(deleted) else np.ones(len(ids), dtype=bool)


def live_doc_mask(ds, doc_ids: np.ndarray) -> np.ndarray:
    """(n,) bool: which of ``doc_ids`` are not deleted."""
    deleted = deleted_doc_ids(ds)
    ids = np.asarray(doc_ids, dtype=np.int64)
    return ~np.isin(ids, deleted) if len(deleted) else np.ones(len(ids), dtype=bool)


def source_ids(ds, doc_ids: Sequence[int] | np.ndarray) -> list[str]:
    """The ``source_id`` of each document (its id in the input it came from)."""
    docs = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
    if hasattr(ds, "source_ids"):
        return list(ds.source_ids(docs))
    seen: dict[int, str] = {}
    for d in np.unique(docs).tolist():
        seen[d] = ds.document(d).source_id
    return [seen[d] for d in docs.tolist()]


def doc_metadata(ds, doc_ids: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
    """The metadata (extra input fields) of each document; empty dicts where the datastore keeps none."""
    docs = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
    if hasattr(ds, "metadata") and callable(ds.metadata):
        return [dict(m or {}) for m in ds.metadata(docs)]
    return [{} for _ in docs]


def metadata_fields(ds) -> dict[str, str]:
    """Declared metadata fields -> type name (``source_id`` and ``source`` are always filterable)."""
    fields = dict(getattr(ds, "metadata_fields", None) or {})
    return {"source_id": "string", "source": "string", **fields}


def check_filters(filters: Any, fields: dict[str, str] | None = None) -> dict[str, list]:
    """``filters`` as ``{field: [values]}``: a dict of field -> value (equality) or a non-empty list of
    values (set membership), values str, int, float or bool; a :class:`QueryError` names what is wrong."""
    from retromem.errors import QueryError

    if not isinstance(filters, dict):
        raise QueryError(f"`filters` must be a mapping of field -> value or list of values, got {type(filters).__name__}")
    out: dict[str, list] = {}
    for name, value in filters.items():
        if not isinstance(name, str) or not name:
            raise QueryError(f"`filters` has field name {name!r}: names are non-empty strings")
        if fields is not None and name not in fields:
            raise QueryError(f"`filters.{name}`: no such metadata field; this datastore declares "
                             f"{', '.join(sorted(fields)) or 'none'}")
        values = list(value) if isinstance(value, (list, tuple, set, frozenset, np.ndarray)) else [value]
        if not values:
            raise QueryError(f"`filters.{name}` is an empty list: give at least one value")
        for v in values:
            if not isinstance(v, (str, int, float, bool, np.integer, np.floating)):
                raise QueryError(f"`filters.{name}` holds {v!r} ({type(v).__name__}); values are text, numbers or booleans")
        out[name] = [v.item() if isinstance(v, np.generic) else v for v in values]
    return out


def chunks_matching(ds, filters: dict[str, Any]) -> np.ndarray:
    """Sorted int64 chunk ids of the documents matching ``filters`` (AND over fields, equality or set
    membership on each; see :func:`check_filters`)."""
    from retromem.errors import ConfigError, QueryError

    flt = check_filters(filters, metadata_fields(ds))
    docs = None
    builtin = {k: v for k, v in flt.items() if k in ("source_id", "source")}
    declared = {k: v for k, v in flt.items() if k not in builtin}
    if declared:
        try:
            docs = np.asarray(ds.docs_matching({k: v if len(v) > 1 else v[0] for k, v in declared.items()}), dtype=np.int64)
        except ConfigError as exc:
            raise QueryError(str(exc)) from exc
    if builtin:
        # the documents table's own columns: one pass over them
        cols = sorted(builtin)
        keep = [row["doc_id"] for row in ds.iter_documents(columns=["doc_id", *cols]) if all(row[c] in builtin[c] for c in cols)]
        b = np.asarray(keep, dtype=np.int64)
        b = b[live_doc_mask(ds, b)]
        docs = b if docs is None else np.intersect1d(docs, b)
    docs = np.unique(docs)
    first = np.asarray(ds.doc_first_chunk_array, dtype=np.int64)
    if not len(docs):
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(first[d], first[d + 1], dtype=np.int64) for d in docs.tolist()])


@dataclass(frozen=True)
class ChunkPayload:
    """A chunk fetched from the datastore, with its continuation (the next chunk of the same
    document; ``continuation_id`` is ``None`` for a document's last chunk), its document's
    ``source_id`` (its id in the input: what a citation names) and metadata."""

    chunk_id: int
    doc_id: int
    text: str | None = None
    tokens: np.ndarray | None = None
    continuation_id: int | None = None
    continuation_text: str | None = None
    continuation_tokens: np.ndarray | None = None
    source_id: str | None = None
    metadata: dict[str, Any] | None = None


def fetch_payloads(ds, chunk_ids: Sequence[int] | np.ndarray, *, text: bool = True, tokens: bool = True,
                   continuation: bool = True) -> list[ChunkPayload]:
    """Payloads of ``chunk_ids`` from datastore ``ds`` (a :class:`retromem.datastore.Datastore`), in order.

    Negative ids (FAISS's "no result") are not allowed here: filter them first.
    """
    ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return []
    docs = ds.doc_ids(ids)
    sids = source_ids(ds, docs)
    metas = doc_metadata(ds, docs)
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
            source_id=sids[i], metadata=metas[i],
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
