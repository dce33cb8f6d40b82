"""Measuring a dense index against exact search: the exact reference, recall, tuning the search
parameter for a target recall, and the recall / speed / size report.

Queries are datastore chunks sampled from the stored embeddings, each excluding its own document
(as RETRO retrieves), and, for tuning, optionally a file of real queries (texts or vectors), part
of which is held out: an index tuned on its own chunks alone can fall short on queries from outside
the datastore (0.965 -> 0.925 recall@10 in issue 15's check), so the held-out recall is what a
tuned default promises. The reference is exact inner-product search over every stored vector. Only
the searcher's public verbs are used (``DenseIndex.search``, ``knn``, ``check_k``), so what is
measured is what callers get.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retromem.datastore.atomic import write_json
from retromem.errors import ConfigError, IndexFormatError
from retromem.index.dense import DenseIndex
from retromem.index.dense_faiss import has_search_param
from retromem.index.embed import Embeddings, faiss_metric, faiss_scores
from retromem.index.factory import parse_factory
from retromem.index.types import EvalReport, TuneReport, portable_meta

logger = logging.getLogger(__name__)


def exact_search(emb: Embeddings, queries: np.ndarray, k: int, exclude_docs: list[np.ndarray] | None = None,
                 chunk_doc: np.ndarray | None = None, block: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over every stored embedding under the embedder's similarity (scores higher
    is better), blockwise (memory bounded by ``block`` vectors), optionally excluding documents per
    query. The reference for recall."""
    import faiss

    n = len(queries)
    extra = 0
    if exclude_docs is not None:
        assert chunk_doc is not None
        extra = int(max((np.isin(chunk_doc, e).sum() if len(e) else 0) for e in exclude_docs)) if n else 0
    kk = min(k + extra, emb.num_vectors)
    bestD = np.full((n, 0), -np.inf, np.float32)
    bestI = np.full((n, 0), -1, np.int64)
    for start, xb in emb.iter_blocks(block=block):
        D, I = faiss.knn(queries, xb, min(kk, len(xb)), metric=faiss_metric(emb.embedder.similarity))
        D = np.asarray(faiss_scores(D, emb.embedder.similarity), np.float32)
        I = np.asarray(I, np.int64) + start
        bestD = np.concatenate([bestD, D], axis=1)
        bestI = np.concatenate([bestI, I], axis=1)
        order = np.argsort(-bestD, axis=1, kind="stable")[:, :kk]
        bestD = np.take_along_axis(bestD, order, axis=1)
        bestI = np.take_along_axis(bestI, order, axis=1)
    if exclude_docs is None:
        return bestD[:, :k], bestI[:, :k]
    outD = np.full((n, k), -np.inf, np.float32)
    outI = np.full((n, k), -1, np.int64)
    for q in range(n):
        keep = ~np.isin(chunk_doc[bestI[q]], exclude_docs[q])
        m = min(int(keep.sum()), k)
        outD[q, :m] = bestD[q][keep][:m]
        outI[q, :m] = bestI[q][keep][:m]
    return outD, outI


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx[:, :k] ∩ exact[:, :k]| / k (the "k-recall@k" FAISS benchmarks report)."""
    hits = 0
    for a, e in zip(approx[:, :k], exact[:, :k]):
        hits += len(np.intersect1d(a[a >= 0], e[e >= 0]))
    return hits / (k * len(exact))


@dataclass(frozen=True)
class QuerySet:
    chunk_ids: np.ndarray
    vectors: np.ndarray
    exclude: list[np.ndarray]  # each query's own document


def sample_queries(index: DenseIndex, n: int, seed: int, exclude_own_doc: bool = True) -> QuerySet:
    """Datastore chunks as queries, each excluding its own document (as RETRO retrieves): the
    query's own vector is in the index, so without exclusion rank 1 would be trivially itself."""
    emb = Embeddings(index.meta["embeddings_path"])
    if emb.datastore_id != index.datastore_id:
        raise IndexFormatError(f"the embeddings at {emb.path} are not those of {index.path}")
    ids, vecs = emb.sample(n, seed=seed)
    docs = index.datastore.doc_ids(ids)
    excl = [np.array([d]) for d in docs] if exclude_own_doc else [np.zeros(0, np.int64) for _ in docs]
    return QuerySet(ids, vecs, excl)


def _timed_search(index: DenseIndex, qs: QuerySet, k: int, **params) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    res = index.search(qs.vectors, k, exclude_doc_ids=qs.exclude, **params)
    dt = time.perf_counter() - t0
    return res.chunk_ids, len(qs.vectors) / dt


def load_query_file(path: str | Path, index: DenseIndex) -> tuple[np.ndarray, str]:
    """Query vectors from ``path`` and the file's sha256: an ``.npy`` array (n, dim), JSONL (``.jsonl``
    or ``.jsonl.gz``; each line an object with ``text`` or ``query``, or a JSON string), or plain text
    (one query per non-empty line), embedded with the index's own embedder."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--query-file` {p} does not exist or is not a file")
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    if p.suffix == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except ValueError as e:
            raise ConfigError(f"`--query-file` {p}: not a readable .npy array ({e})") from None
        if x.ndim != 2 or x.shape[1] != index.dim or not np.issubdtype(x.dtype, np.floating):
            raise ConfigError(f"`--query-file` {p}: query vectors must be a float (n, {index.dim}) array, "
                              f"got {x.dtype} {x.shape}")
        if len(x) < 2 or not np.isfinite(x).all():
            raise ConfigError(f"`--query-file` {p}: needs at least 2 finite query vectors")
        return np.ascontiguousarray(x, dtype=np.float32), digest
    opener = gzip.open if p.name.endswith(".gz") else open
    texts: list[str] = []
    jsonl = ".jsonl" in p.name or ".json" in p.suffixes
    with opener(p, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if not jsonl:
                texts.append(line.strip())
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"`--query-file` {p} line {n}: not JSON ({e.msg})") from None
            text = rec if isinstance(rec, str) else rec.get("text", rec.get("query")) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"`--query-file` {p} line {n}: expected a JSON string or an object with a "
                                  f"non-empty `text` or `query`")
            texts.append(text)
    if len(texts) < 2:
        raise ConfigError(f"`--query-file` {p} holds {len(texts)} queries; give at least 2 (some are held out)")
    return index.embedder.encode(texts), digest


def tune(path: str | Path, *, target_recall: float = 0.95, k: int = 10, n_queries: int = 500, seed: int = 1,
         exclude_own_doc: bool = True, query_file: str | Path | None = None, holdout: float = 0.3) -> TuneReport:
    """Smallest nprobe (IVF) or efSearch (HNSW) whose recall@k against exact search reaches
    ``target_recall``; stored in index.json as the default, with the queries it was tuned on.

    Queries: ``n_queries`` sampled datastore chunks (own document excluded) and, with
    ``query_file``, real queries of which a seeded ``holdout`` share is held out. The value chosen
    reaches the target on the chunks and on the tuning part of the file; the held-out part's recall
    at that value is reported (``held_out_recall``) as what real queries can expect."""
    if not 0 < target_recall <= 1:
        raise ConfigError(f"`--target-recall` must be in (0, 1], got {target_recall}")
    if not 0 < holdout < 1:
        raise ConfigError(f"`--holdout` must be in (0, 1), got {holdout}")
    index = DenseIndex.open(path)
    k = index.check_k(k)
    emb = Embeddings(index.meta["embeddings_path"])
    qs = sample_queries(index, n_queries, seed, exclude_own_doc)
    _, truth = exact_search(emb, qs.vectors, k, qs.exclude, np.asarray(index.datastore.chunk_doc_array))
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (vectors, exact top-k)
    source: dict[str, object] = {"chunks": len(qs.vectors), "exclude_own_doc": exclude_own_doc}
    if query_file is not None:
        xq, digest = load_query_file(query_file, index)
        order = np.random.default_rng(seed).permutation(len(xq))
        n_held = min(len(xq) - 1, max(1, int(round(holdout * len(xq)))))
        for name, rows in (("held_out", order[:n_held]), ("file", order[n_held:])):
            x = np.ascontiguousarray(xq[np.sort(rows)])
            parts[name] = (x, exact_search(emb, x, k)[1])
        source.update(query_file=str(Path(query_file).resolve()), query_file_sha256=digest,
                      file_tuned_on=len(xq) - n_held, file_held_out=n_held, holdout_seed=seed)
    if has_search_param(index.factory, "nprobe", index.dim):
        param, key = "nprobe", "nprobe"
        nlist = parse_factory(index.factory, index.dim).nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= nlist] or [nlist]
    elif has_search_param(index.factory, "efSearch", index.dim):
        param, key = "efSearch", "ef_search"
        values = [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048) if v >= k]
    else:
        return TuneReport(None, None, target_recall, k, True, [], index.meta)
    curve = []
    chosen = None
    for v in values:
        got, qps = _timed_search(index, qs, k, **{key: v})
        point = {param: v, "recall": recall_at(got, truth, k), "qps": qps}
        for name, (x, exact) in parts.items():
            point[f"recall_{name}"] = recall_at(index.knn(x, k, **{key: v})[1], exact, k)
        curve.append(point)
        logger.info("tune: %s=%d recall@%d=%.4f (file %s, held out %s) %.0f q/s", param, v, k, point["recall"],
                    point.get("recall_file"), point.get("recall_held_out"), qps)
        if min(point["recall"], point.get("recall_file", 1.0)) >= target_recall:
            chosen = v
            break
    reached = chosen is not None
    if not reached:
        best = max(curve, key=lambda c: min(c["recall"], c.get("recall_file", 1.0)))
        chosen = int(best[param])
        logger.warning("tune: %s reaches recall@%d %.4f at most (%s=%d), short of %.2f: the codes are too coarse; "
                       "use more PQ bytes, SQ8, or add RFlat", index.factory, k, best["recall"], param, chosen, target_recall)
    at = next(c for c in curve if c[param] == chosen)
    held = at.get("recall_held_out")
    if held is not None and held < target_recall:
        logger.warning("tune: %s=%d reaches %.2f on the tuning queries but %.4f on the held-out ones: give more "
                       "queries or a higher --target-recall", param, chosen, target_recall, held)
    meta = dict(index.meta)
    meta["search_defaults"] = {**meta.get("search_defaults", {}), param: int(chosen)}
    meta["tuning"] = {"param": param, "value": int(chosen), "target_recall": target_recall, "k": k, "reached": reached,
                      "queries": len(qs.vectors), "exclude_own_doc": exclude_own_doc, "query_source": source,
                      "held_out_recall": held, "curve": curve}
    write_json(Path(path) / "index.json", portable_meta(meta, path))
    return TuneReport(param, int(chosen), target_recall, k, reached, curve, meta, held_out_recall=held)


def evaluate(path: str | Path, *, n_queries: int = 1000, ks: Sequence[int] = (1, 10, 100), seed: int = 2,
             exclude_own_doc: bool = True, repeats: int = 5, **params) -> EvalReport:
    """Recall@k of the index against exact inner-product search and queries per second of both,
    on sampled datastore chunks as queries (own document excluded)."""
    import faiss

    index = DenseIndex.open(path)
    kmax = index.check_k(max(ks))
    emb = Embeddings(index.meta["embeddings_path"])
    qs = sample_queries(index, n_queries, seed, exclude_own_doc)
    chunk_doc = np.asarray(index.datastore.chunk_doc_array)
    # the exact reference: a flat inner-product index over the same vectors, searched the same way
    # QPS of both is timed on the plain top-k search (without the exclusion step), best of `repeats`
    # interleaved runs so that a busy machine penalises both alike
    flat = faiss.IndexFlat(emb.dim, faiss_metric(emb.embedder.similarity))
    for _, xb in emb.iter_blocks():
        flat.add(xb)
    kw = {"nprobe": params.get("nprobe"), "ef_search": params.get("ef_search")}
    t_exact, t_index = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        flat.search(qs.vectors, kmax)
        t_exact.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index.knn(qs.vectors, kmax, nprobe=kw["nprobe"], ef_search=kw["ef_search"])
        t_index.append(time.perf_counter() - t0)
    # one query per call, as a generation loop retrieves: no batching for BLAS to exploit
    few = qs.vectors[: min(200, len(qs.vectors))]
    t_exact1, t_index1 = [], []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        for row in few:
            flat.search(row[None], kmax)
        t_exact1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for row in few:
            index.knn(row[None], kmax, nprobe=kw["nprobe"], ef_search=kw["ef_search"])
        t_index1.append(time.perf_counter() - t0)
    del flat
    exact_qps = len(qs.vectors) / min(t_exact)
    qps = len(qs.vectors) / min(t_index)
    single = (len(few) / min(t_index1), len(few) / min(t_exact1))
    _, truth = exact_search(emb, qs.vectors, kmax, qs.exclude, chunk_doc)
    got = index.search(qs.vectors, kmax, exclude_doc_ids=qs.exclude, **kw).chunk_ids
    recall = {k: recall_at(got, truth, k) for k in ks}
    return EvalReport(index.factory, len(qs.vectors), recall, qps, exact_qps, index.meta["index_bytes"] / index.ntotal,
                      4 * index.dim, {**index.defaults, **{k: v for k, v in kw.items() if v is not None}},
                      single_qps=single[0], exact_single_qps=single[1])
