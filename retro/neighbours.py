"""The neighbour table: the neighbours job that writes it (for every chunk of a split, its k nearest
chunks from other documents, stored as Parquet shards: ``retromem retro neighbours``), its schema,
and its reader (:class:`NeighbourTable`).

The retriever is anything with DenseIndex's verb, ``search(queries, k, *, exclude_doc_ids=...)``
returning an object with ``chunk_ids`` (n, k) (-1: none) and ``scores``: an in-process
:class:`retromem.index.dense.DenseIndex`, or the retrieval service's client (``--server``: the server
must serve this datastore, checked by id). Queries are the chunks' stored embeddings when the index
records them (no re-embedding), else their text (embedded where the index is: in the server).

Exclusions: a chunk never retrieves from its own document (the paper's rule). Optionally
(``leakage_ngram``), a candidate neighbour (chunk + continuation) that shares a ``leakage_ngram``
-token n-gram with any held-out document is dropped too, so training never reads evaluation text
through its neighbours; the held-out n-grams are hashed (64-bit) into a sorted array in memory.

Resumable like every batch job here: the output directory is a job of
:mod:`retromem.datastore.job` (kind ``neighbours``: locked while the job runs, never deleted on
``--overwrite`` unless it holds neighbours); the split's chunks are cut into shards of
``shard_chunks``; each shard is written atomically (temp file, rename) and recorded in
``neighbours.json``, so a killed job re-run with the same settings skips finished shards.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retromem import storage
from retromem.config import fail, key_name, one_of, optional_positive_int, positive_int
from retromem.index.types import record_path  # relative: a moved tree still names its datastore
from retromem.datastore.atomic import atomic_path, write_json
from retromem.datastore.integrity import check_sizes, recorded_files, verify_files
from retromem.datastore.integrity import read_manifest as read_checked_manifest
from retromem.datastore.job import Job, open_job
from retromem.retro.splits import SPLITS, SplitSpec
from retromem.errors import ArtifactCorruptError, ConfigError

logger = logging.getLogger(__name__)

MANIFEST = "neighbours.json"
FORMAT_VERSION = 1

# One row per chunk of the split, in chunk_id order; list entries in rank order (best first).
NEIGHBOURS_SCHEMA = pa.schema([
    pa.field("chunk_id", pa.int64(), nullable=False),
    pa.field("doc_id", pa.int64(), nullable=False),
    pa.field("neighbour_ids", pa.list_(pa.int64()), nullable=False),  # k chunk ids; -1 where fewer were found
    pa.field("neighbour_doc_ids", pa.list_(pa.int64()), nullable=False),  # their documents; -1 likewise
    pa.field("scores", pa.list_(pa.float32()), nullable=False),  # retriever scores (inner product)
])


class Retriever(Protocol):
    """What the job needs from a retriever: DenseIndex.search's signature (texts or (n, dim) vectors)."""

    def search(self, queries: Any, k: int, *, exclude_doc_ids: Any = None, **kwargs: Any) -> Any: ...


# command-line flags of `retromem retro neighbours` that set these fields, named in error messages
_FLAGS = {"k": "-k", "split": "--split", "eval_fraction": "--eval-fraction", "query": "--query",
          "leakage_ngram": "--leakage-ngram", "candidates": "--candidates", "shard_chunks": "--shard-chunks",
          "batch_size": "--batch-size", "max_chunks": "--max-chunks"}


@dataclass(frozen=True)
class NeighboursConfig:
    """One neighbours job. ``index``: a dense index directory (ignored when a retriever is passed)."""

    datastore: str
    out: str
    index: str | None = None
    k: int = 2
    split: Literal["train", "eval", "all"] = "train"
    eval_fraction: float = 0.05
    split_seed: int = 0
    query: Literal["auto", "embeddings", "text"] = "auto"
    leakage_ngram: int | None = None
    candidates: int | None = None  # searched per chunk before filtering; default k (4k with leakage_ngram)
    shard_chunks: int = 8192
    batch_size: int = 512
    max_chunks: int | None = None  # the first N chunks of the split (smoke runs)

    def __post_init__(self) -> None:
        one_of(self.split, "split", SPLITS, flag=_FLAGS["split"])
        SplitSpec(self.eval_fraction, self.split_seed)
        for name in ("k", "shard_chunks", "batch_size"):
            positive_int(getattr(self, name), name, flag=_FLAGS[name])
        for name in ("leakage_ngram", "candidates", "max_chunks"):
            optional_positive_int(getattr(self, name), name, flag=_FLAGS[name])
        one_of(self.query, "query", ("auto", "embeddings", "text"), flag=_FLAGS["query"])
        if self.candidates is not None and self.candidates < self.k:
            fail("candidates", f"be >= k ({self.k})", self.candidates, flag=_FLAGS["candidates"])
        if self.split == "eval" and self.eval_fraction == 0:
            raise ConfigError(f"{key_name('split', _FLAGS['split'])} eval with "
                              f"{key_name('eval_fraction', _FLAGS['eval_fraction'])} 0 has no documents")

    @property
    def split_spec(self) -> SplitSpec:
        return SplitSpec(self.eval_fraction, self.split_seed)

    def identity(self) -> dict[str, Any]:
        """Settings that change the output: a re-run must match them to resume."""
        d = asdict(self)
        for name in ("out", "shard_chunks", "batch_size", "index"):
            d.pop(name)
        return d


@dataclass(frozen=True)
class NeighboursResult:
    out: Path
    chunks: int
    shards_done: int
    shards_skipped: int
    seconds: float
    dropped_for_leakage: int
    manifest: dict[str, Any]


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise ConfigError(f"{path} holds no neighbours: no {MANIFEST} (run `retromem retro neighbours --out {path}`)")
    return read_checked_manifest(p)


# -- leakage: n-grams of the held-out documents ---------------------------------------------------------

_MULT = np.uint64(0x9E3779B97F4A7C15)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of every n-gram of a 1-D token sequence ((len - n + 1,) uint64; empty if shorter)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if len(t) < n:
        return np.zeros(0, np.uint64)
    h = np.zeros(len(t) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):  # polynomial hash; wrap-around multiplication is the point
            h = h * _MULT + t[j: len(t) - n + 1 + j] + np.uint64(j + 1)
    return h


def doc_tokens(ds: Any, doc_id: int) -> np.ndarray:
    first = ds.doc_first_chunk_array
    ids = np.arange(first[doc_id], first[doc_id + 1])
    toks, lens = ds.tokens(ids)
    return np.concatenate([toks[i, : lens[i]] for i in range(len(ids))]) if len(ids) else np.zeros(0, np.int64)


class HeldOutNgrams:
    """The set of n-grams of the held-out documents (sorted hashes), and the check for a token row."""

    def __init__(self, ds: Any, spec: SplitSpec, n: int) -> None:
        self.n = n
        parts = [ngram_hashes(doc_tokens(ds, int(d)), n) for d in spec.doc_ids(ds.num_documents, "eval")]
        self.hashes = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)

    def overlaps(self, tokens: np.ndarray, length: int) -> bool:
        h = ngram_hashes(tokens[:length], self.n)
        if len(h) == 0 or len(self.hashes) == 0:
            return False
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return bool((self.hashes[pos] == h).any())


# -- the job ---------------------------------------------------------------------------------------


def _query_source(cfg: NeighboursConfig, retriever: Any, ds: Any):
    """(kind, fn(chunk_ids) -> queries): stored embeddings when the index records them and its model
    embeds a query as it embeds a chunk (same prompt), else texts, embedded as queries by the retriever."""
    emb_path = (getattr(retriever, "meta", None) or {}).get("embeddings_path")
    recorded = (getattr(retriever, "meta", None) or {}).get("embedder") or {}
    # a chunk's stored vector carries the document prompt; with another query prompt it is not the query's vector
    symmetric = (recorded.get("query_prompt") or "") == (recorded.get("document_prompt") or "")
    if (cfg.query == "embeddings" or symmetric) and cfg.query != "text" and emb_path and Path(emb_path).is_dir():
        from retromem.index.embed import Embeddings

        emb = Embeddings(emb_path)
        if emb.datastore_id == ds.datastore_id:
            return "embeddings", emb.get
        if cfg.query == "embeddings":
            raise ConfigError(f"the embeddings at {emb_path} belong to another datastore than {ds.path}")
    elif cfg.query == "embeddings":
        raise ConfigError("`query` embeddings: the retriever records no stored embeddings (`embeddings_path`); "
                          "use `query` text or auto")
    return "text", ds.chunk_texts


def _check_served_datastore(retriever: Any, ds: Any) -> None:
    """A retrieval server (anything with ``info()``, as the gRPC client) must serve this datastore: the
    chunk ids it returns are written as this datastore's. A router over shards numbers its own ids."""
    info = getattr(retriever, "info", None)
    if not callable(info) or hasattr(retriever, "datastore"):
        return
    served = info()
    if served.HasField("datastore") and served.datastore.datastore_id != ds.datastore_id:
        raise ConfigError(f"the server serves datastore {served.datastore.datastore_id[:16]}, not {ds.datastore_id[:16]} "
                          f"at {ds.path}: its chunk ids would not be this datastore's")
    if not served.HasField("datastore") or not served.HasField("dense"):
        raise ConfigError("the server serves no datastore and dense index: the neighbours job needs both "
                          "(`retromem serve --datastore DS --dense INDEX`)")


@dataclass(frozen=True)
class RetrieverSpec:
    """How a task of another process or node opens the job's retriever: a dense index directory
    (``index``, on storage every node sees) or a retrieval server (``server`` HOST:PORT, with an
    optional bearer ``token`` and ``tls_ca`` file). Local paths are made absolute where the spec is
    made (the driver): a task resolves a relative one in its own working directory."""

    index: str | None = None
    server: str | None = None
    token: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if (self.index is None) == (self.server is None):
            raise ConfigError("a retriever spec names exactly one of `index` (a dense index directory) and `server`")
        for name in ("index", "tls_ca"):  # frozen: set once, here, before the spec is pickled to tasks
            object.__setattr__(self, name, storage.node_path(getattr(self, name)))

    def open(self, ds: Any) -> Retriever:
        if self.server is not None:
            from retromem.service.client import RetrievalClient

            return RetrievalClient(self.server, token=self.token, tls_ca=self.tls_ca, retries=2)
        from retromem.index.dense import DenseIndex

        return DenseIndex.open(self.index, datastore=ds)


def compute_neighbours(cfg: NeighboursConfig, retriever: Retriever | None = None, *, overwrite: bool = False,
                       progress: bool = True, executor: Any = None, spec: RetrieverSpec | None = None) -> NeighboursResult:
    """Runs (or resumes) the job; returns what was done. ``retriever`` defaults to ``DenseIndex.open(cfg.index)``.
    ``overwrite`` deletes the neighbours at ``cfg.out`` first (only ever neighbours: anything else is refused).

    ``executor`` (:func:`retromem.datastore.executors.make_executor`: local processes or Ray) computes
    the output shards as tasks, one per shard, each opening the datastore and the retriever named by
    ``spec`` (default: ``cfg.index``) itself; the driver records each shard as it lands, so a killed
    job resumes the same way, and the files are the ones the in-process run writes (tested)."""
    from retromem.datastore import Datastore

    t0 = time.perf_counter()
    ds = Datastore.open(cfg.datastore)
    if executor is not None and spec is None:
        if not cfg.index:
            raise ConfigError("tasks open their own retriever: give `index` (a dense index directory every worker "
                              "sees) or a retriever spec (a server)")
        spec = RetrieverSpec(index=cfg.index)
    opened_here = retriever is None  # a client this function opens (a --server spec) is closed by it too
    if retriever is None:
        if spec is not None:
            retriever = spec.open(ds)
        elif not cfg.index:
            raise ConfigError("give `index` (a dense index directory) or a retriever object")
        else:
            from retromem.index.dense import DenseIndex

            retriever = DenseIndex.open(cfg.index, datastore=ds)
    try:
        if not callable(getattr(retriever, "search", None)):
            raise TypeError(f"the retriever must have a search(queries, k, exclude_doc_ids=...) method, got {type(retriever).__name__}")
        _check_served_datastore(retriever, ds)
        with open_job(cfg.out, "neighbours", overwrite=overwrite, legacy=(MANIFEST,)) as job:
            return _run(cfg, retriever, ds, job, progress, t0, executor, spec)
    finally:
        if opened_here and callable(getattr(retriever, "close", None)):
            retriever.close()


def _run(cfg: NeighboursConfig, retriever: Retriever, ds: Any, job: Job, progress: bool, t0: float,
         executor: Any = None, spec: RetrieverSpec | None = None) -> NeighboursResult:
    from tqdm.auto import tqdm

    out = job.path
    manifest_path = out / MANIFEST
    ident = cfg.identity()
    if manifest_path.is_file():
        manifest = read_checked_manifest(manifest_path)
        if manifest.get("config") != ident or manifest.get("datastore_id") != ds.datastore_id:
            raise ConfigError(f"{out} holds neighbours computed with other settings ({manifest.get('config')}); "
                              f"use another --out or --overwrite")
    else:
        manifest = {"format_version": FORMAT_VERSION, "config": ident, "datastore_id": ds.datastore_id,
                    "datastore_path": record_path(cfg.datastore, out), "k": cfg.k, "split": cfg.split,
                    "split_spec": cfg.split_spec.as_dict(), "schema": NEIGHBOURS_SCHEMA.to_string(),
                    "shards": [], "complete": False}
        write_json(manifest_path, manifest)

    chunk_ids = cfg.split_spec.chunk_ids(ds, cfg.split)
    if cfg.max_chunks is not None:
        chunk_ids = chunk_ids[: cfg.max_chunks]
    if len(chunk_ids) == 0:
        raise ConfigError(f"split {cfg.split!r} has no chunks (eval_fraction {cfg.eval_fraction})")
    n_shards = -(-len(chunk_ids) // cfg.shard_chunks)
    done = {s["shard"] for s in manifest["shards"] if (out / s["file"]).is_file()}
    manifest["shards"] = [s for s in manifest["shards"] if s["shard"] in done]
    kind, get_queries = _query_source(cfg, retriever, ds)
    # tasks build their own held-out n-grams: the driver needs them only when it searches itself
    leak = HeldOutNgrams(ds, cfg.split_spec, cfg.leakage_ngram) if cfg.leakage_ngram and executor is None else None
    n_cand = _candidates(cfg)
    logger.info("neighbours: %d chunks of split %s in %d shards (%d done), k=%d, queries from %s", len(chunk_ids),
                cfg.split, n_shards, len(done), cfg.k, kind)
    dropped = 0
    todo = [s for s in range(n_shards) if s not in done]
    bar = tqdm(total=len(chunk_ids), initial=sum(min(cfg.shard_chunks, len(chunk_ids) - s * cfg.shard_chunks) for s in done),
               unit="chunk", desc="neighbours", disable=not progress)
    items = [(s, chunk_ids[s * cfg.shard_chunks:(s + 1) * cfg.shard_chunks]) for s in todo]
    if executor is None:
        landed = ((item, _shard(cfg, retriever, ds, out, item[0], item[1], kind, get_queries, leak, n_cand, bar))
                  for item in items)
    else:
        # absolute paths (a Ray worker does not share this process's working directory); a URL as given
        ctx = (cfg, spec, str(Path(out).resolve()), kind, storage.node_path(cfg.datastore))
        landed = executor.map(_shard_task, ctx, items)
    for (s, ids), entry in landed:
        if executor is not None:
            bar.update(len(ids))
        manifest["shards"].append(entry)
        dropped += entry["dropped_for_leakage"]
        manifest["shards"].sort(key=lambda r: r["shard"])
        write_json(manifest_path, manifest)
    bar.close()
    manifest["complete"] = len(manifest["shards"]) == n_shards
    manifest["chunks"] = int(len(chunk_ids))
    manifest["query"] = kind
    if manifest["complete"]:
        manifest = job.seal(MANIFEST, manifest)  # with every shard's size and checksum
    else:
        write_json(manifest_path, manifest)
    return NeighboursResult(out, len(chunk_ids), len(todo), len(done), time.perf_counter() - t0, dropped, manifest)


def _shard(cfg: NeighboursConfig, retriever: Retriever, ds: Any, out: Path, s: int, ids: np.ndarray, kind: str,
           get_queries: Any, leak: "HeldOutNgrams | None", n_cand: int, bar: Any = None) -> dict[str, Any]:
    """Output shard ``s`` (the split's chunks ``ids``): searched, filtered, written atomically; its
    manifest entry."""
    docs = ds.doc_ids(ids)
    nbr = np.full((len(ids), cfg.k), -1, np.int64)
    scores = np.full((len(ids), cfg.k), -np.inf, np.float32)
    shard_dropped = 0
    for b in range(0, len(ids), cfg.batch_size):
        sel = np.arange(b, min(b + cfg.batch_size, len(ids)))
        queries = get_queries(ids[sel])
        if kind == "text":  # a whitespace-only chunk is no query (embedders refuse it): it gets no neighbours
            has_text = np.array([bool(t.strip()) for t in queries], dtype=bool)
            sel, queries = sel[has_text], [t for t, h in zip(queries, has_text) if h]
            if bar is not None:
                bar.update(int((~has_text).sum()))
            if not len(sel):
                continue
        res = retriever.search(queries, n_cand, exclude_doc_ids=[[int(d)] for d in docs[sel]])
        I, D = np.asarray(res.chunk_ids, dtype=np.int64), np.asarray(res.scores, dtype=np.float32)
        for r, row in enumerate(sel.tolist()):
            keep = I[r] >= 0
            if leak is not None and keep.any():
                cand = I[r][keep]
                toks, lens = ds.neighbour_tokens(cand)
                ok = np.array([not leak.overlaps(toks[j], int(lens[j])) for j in range(len(cand))])
                shard_dropped += int((~ok).sum())
                keep[np.flatnonzero(keep)[~ok]] = False
            got = I[r][keep][: cfg.k]
            nbr[row, : len(got)] = got
            scores[row, : len(got)] = D[r][keep][: cfg.k]
        if bar is not None:
            bar.update(len(I))
    has = nbr >= 0
    nbr_docs = np.where(has, ds.chunk_doc_array[np.maximum(nbr, 0)], -1)
    assert not (nbr_docs == docs[:, None]).any(), "a chunk retrieved from its own document"
    table = pa.Table.from_arrays([
        pa.array(ids, pa.int64()), pa.array(docs, pa.int64()),
        pa.array(nbr.tolist(), pa.list_(pa.int64())), pa.array(nbr_docs.tolist(), pa.list_(pa.int64())),
        pa.array(np.where(has, scores, np.nan).tolist(), pa.list_(pa.float32())),
    ], schema=NEIGHBOURS_SCHEMA)
    name = f"neighbours-{s:05d}.parquet"
    with atomic_path(out / name) as tmp:
        pq.write_table(table, tmp)
    return {"shard": s, "file": name, "first_chunk_id": int(ids[0]), "chunks": len(ids),
            "missing": int((~has).sum()), "dropped_for_leakage": shard_dropped}


@functools.lru_cache(maxsize=2)
def _task_state(cfg: NeighboursConfig, spec: RetrieverSpec, kind: str, ds_path: str) -> tuple[Any, Any, Any, Any, int]:
    """A worker's datastore, retriever, query source, held-out n-grams and candidate count, opened
    once per process (local workers and Ray's reused workers run many shards)."""
    from retromem.datastore import Datastore

    ds = Datastore.open(ds_path)
    retriever = spec.open(ds)
    got, get_queries = _query_source(cfg, retriever, ds)
    if got != kind:  # the driver saw stored embeddings this worker cannot reach (or the reverse)
        raise ConfigError(f"a worker would query with {got} where the driver chose {kind}: the index's embeddings "
                          f"must be on storage every worker sees")
    leak = HeldOutNgrams(ds, cfg.split_spec, cfg.leakage_ngram) if cfg.leakage_ngram else None
    return ds, retriever, get_queries, leak, _candidates(cfg)


def _candidates(cfg: NeighboursConfig) -> int:
    """Hits searched per chunk before filtering: ``candidates``, else k (4k when leakage is filtered)."""
    return cfg.candidates or (4 * cfg.k if cfg.leakage_ngram else cfg.k)


def _shard_task(ctx: tuple[NeighboursConfig, RetrieverSpec, str, str, str], item: tuple[int, np.ndarray]) -> dict[str, Any]:
    cfg, spec, out, kind, ds_path = ctx
    ds, retriever, get_queries, leak, n_cand = _task_state(cfg, spec, kind, ds_path)
    return _shard(cfg, retriever, ds, Path(out), item[0], item[1], kind, get_queries, leak, n_cand)


# -- the reader -------------------------------------------------------------------------------------


class NeighbourTable:
    """chunk_id -> its k retrieved neighbour chunk ids (-1: none found), from one or more directories
    written by :func:`compute_neighbours`."""

    def __init__(self, paths: str | Path | Sequence[str | Path], ds: Any | None = None) -> None:
        import pyarrow.parquet as pq

        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ConfigError("`neighbours` must name at least one directory written by `retromem retro neighbours`")
        ids, nbrs, self.manifests = [], [], []
        for p in paths:
            m = read_manifest(p)
            if not m.get("complete"):
                raise ConfigError(f"neighbours at {p} are incomplete: re-run `retromem retro neighbours` to finish them")
            if ds is not None and m["datastore_id"] != ds.datastore_id:
                raise ConfigError(f"neighbours at {p} were computed for datastore {m['datastore_id'][:16]}, "
                                  f"not {ds.datastore_id[:16]} ({ds.path})")
            self.manifests.append(m)
            # the shards are read whole anyway: check their recorded sizes and checksums first
            check_sizes(p, m)
            if recorded_files(m) is not None and (bad := verify_files(p, m)):
                raise ArtifactCorruptError(Path(p) / bad[0][0], bad[0][1] + "; re-run `retromem retro neighbours --overwrite`")
            for shard in m["shards"]:
                f = Path(p) / shard["file"]
                try:
                    t = pq.read_table(f, columns=["chunk_id", "neighbour_ids"])
                    table = np.asarray(t.column("neighbour_ids").to_pylist(), dtype=np.int64).reshape(len(t), int(m["k"]))
                except (OSError, ValueError, pa.ArrowException) as exc:
                    raise ArtifactCorruptError(f, f"cannot be read as a neighbour shard ({str(exc).splitlines()[0][:160]})") from None
                chunk = t.column("chunk_id").to_numpy()
                if len(chunk) != int(shard["chunks"]) or (len(chunk) and int(chunk[0]) != int(shard["first_chunk_id"])):
                    raise ArtifactCorruptError(f, f"holds {len(chunk)} rows from chunk {int(chunk[0]) if len(chunk) else None}, "
                                                  f"the manifest records {shard['chunks']} from {shard['first_chunk_id']}")
                if ds is not None and (((chunk < 0) | (chunk >= ds.num_chunks)).any() or ((table < -1) | (table >= ds.num_chunks)).any()):
                    raise ArtifactCorruptError(f, f"holds chunk ids outside 0..{ds.num_chunks - 1}: the file is damaged")
                ids.append(chunk)
                nbrs.append(table)
        ks = {int(m["k"]) for m in self.manifests}
        if len(ks) != 1:
            raise ConfigError(f"neighbour directories {paths} hold different k: {sorted(ks)}")
        self.k = ks.pop()
        self.chunk_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        table = np.concatenate(nbrs) if nbrs else np.zeros((0, self.k), np.int64)
        order = np.argsort(self.chunk_ids, kind="stable")
        self.chunk_ids, self.neighbours = self.chunk_ids[order], table[order]  # (n,), (n, k)

    @property
    def split_spec(self) -> SplitSpec:
        specs = {(m["split_spec"]["eval_fraction"], m["split_spec"]["seed"]) for m in self.manifests}
        if len(specs) != 1:
            raise ConfigError(f"neighbour directories were computed with different splits: {sorted(specs)}")
        frac, seed = specs.pop()
        return SplitSpec(frac, seed)

    def lookup(self, chunk_ids: np.ndarray) -> np.ndarray:
        """(n, k) neighbour ids of ``chunk_ids``; ConfigError if any chunk has no row."""
        q = np.asarray(chunk_ids, dtype=np.int64)
        pos = np.searchsorted(self.chunk_ids, q)
        pos = np.minimum(pos, max(len(self.chunk_ids) - 1, 0))
        ok = len(self.chunk_ids) > 0 and bool((self.chunk_ids[pos] == q).all()) if len(q) else True
        if not ok:
            missing = q[self.chunk_ids[pos] != q] if len(self.chunk_ids) else q
            raise ConfigError(f"no neighbours for chunk {int(missing[0])} (and {len(missing) - 1} more): run "
                              f"`retromem retro neighbours` for the split these chunks belong to")
        return self.neighbours[pos]
