"""Indexes that follow a growing and forgetting datastore (issue 18): ``retromem index update DIR...``.

A datastore gains segments (``datastore add``) and loses documents (``datastore delete``, then
``datastore compact``); its ``datastore_id`` stays, so an index built on version 1 still binds to
version 3. :func:`update_index` brings one index up to the datastore's newest version doing only
the new work:

- dense: the new chunks (ids past those the index covers) are embedded with the index's own
  embedder and added to a new index shard, a copy of the trained index (IVF/PQ ``add`` without
  retraining; the centroids and codebooks stay). A recall@10 check on a sample of the new chunks,
  against exact search over every indexed vector, warns when the new data has drifted from what
  the index was trained on. Vectors of deleted documents are removed from every shard
  (``remove_ids``), so the index no longer holds them.
- n-gram: the new documents get a suffix-array shard of their own (counts sum over shards); a
  shard that holds tokens of deleted documents is rebuilt with those documents empty (one
  separator each, so document offsets stay aligned), into a new folder, and the old one removed.
- FM-index and BM25: rebuilt whole with the same settings (their files have no incremental form).

Each update writes its new files first and seals the manifest last, so a reader sees the old index
or the new one; the index directory is a job of :mod:`retromem.datastore.job` (locked while it runs).
Measured against full rebuilds in BENCHMARKS.md (benchmarks/incremental_update.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retromem.errors import ConfigError, IndexFormatError

logger = logging.getLogger(__name__)

DRIFT_QUERIES = 200  # new chunks sampled as queries for the recall check
DRIFT_MARGIN = 0.05  # warn when recall@10 on new chunks falls this far below the index's target


@dataclass(frozen=True)
class UpdateReport:
    """What one update did: ``kind`` of index, chunks or documents added, vectors removed, shards
    written or rebuilt, bytes written, seconds, and (dense) the recall check on new chunks."""

    path: Path
    kind: str
    added: int = 0  # dense: vectors; n-gram: documents
    removed: int = 0  # dense: vectors of deleted documents; n-gram: deleted documents emptied
    shards_written: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    recall_new: float | None = None  # dense: recall@10 of the updated index on a sample of new chunks
    drifted: bool = False
    note: str = ""


def index_kind(path: str | Path) -> str:
    """dense | ngram | fm | bm25, from the manifest in ``path``; an IndexFormatError otherwise."""
    p = Path(path)
    for name, kind in (("index.json", "dense"), ("ngram_index.json", "ngram"), ("fm_index.json", "fm"),
                       ("lexical_index.json", "bm25")):
        if (p / name).is_file():
            return kind
    raise IndexFormatError(f"{p} is not an index retromem can update (no index.json, ngram_index.json, "
                           "fm_index.json or lexical_index.json)")


def update_index(path: str | Path, *, datastore=None, progress: bool = False, batch_size: int = 64) -> UpdateReport:
    """Bring the index at ``path`` up to the newest version of its datastore (``datastore``: an
    open one or a directory, for a moved datastore; default the one it records). See the module doc."""
    kind = index_kind(path)
    t0 = time.perf_counter()
    if kind == "dense":
        rep = _update_dense(Path(path), datastore, progress, batch_size)
    elif kind == "ngram":
        rep = _update_ngram(Path(path), datastore, progress)
    else:
        rep = _rebuild(Path(path), kind, datastore, progress)
    return UpdateReport(**{**rep.__dict__, "seconds": time.perf_counter() - t0})


def _open_ds(path: Path, meta: dict[str, Any], datastore, error=IndexFormatError):
    from retromem.index.types import open_bound_datastore

    return open_bound_datastore(path, meta, datastore, error=error)


def _bytes(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())


# ---------------------------------------------------------------------------------------------
# dense


def _update_dense(path: Path, datastore, progress: bool, batch_size: int) -> UpdateReport:
    import faiss

    from retromem.datastore.atomic import write_json
    from retromem.datastore.integrity import read_manifest
    from retromem.datastore.job import open_job
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_faiss import read_index, write_index
    from retromem.index.types import deleted_chunk_ids, portable_meta, resolved_meta

    with open_job(path, "dense-index", legacy=("index.json", "_work/plan.json")) as job:
        meta = resolved_meta(read_manifest(path / "index.json"), path)
        if meta.get("merged"):
            raise ConfigError(f"{path} was merged on disk (--merge ondisk): its inverted lists cannot take new vectors in "
                              "place; rebuild it with `retromem index dense build`")
        ds = _open_ds(path, meta, datastore)
        covered = int(meta.get("chunks_covered", meta["ntotal"] + int(meta.get("removed", 0))))
        new_ids = np.arange(covered, ds.num_chunks, dtype=np.int64)
        dead = deleted_chunk_ids(ds)
        new_ids = new_ids[~np.isin(new_ids, dead)]
        written: list[str] = []
        nbytes = 0
        # 1. vectors of deleted documents out of every shard (those already removed are not there)
        removed = 0
        already = int(meta.get("removed", 0))
        gone = dead[dead < covered]
        if len(gone) > int(meta.get("removed_upto", 0)):
            sel = faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(np.ascontiguousarray(gone)))
            for rec in meta["shards"]:
                f = path / rec["file"]
                idx = read_index(f)
                try:
                    n = int(idx.remove_ids(sel))
                except RuntimeError as exc:
                    raise ConfigError(f"{path}: {meta['factory']} cannot remove vectors ({str(exc).splitlines()[0][:120]}); "
                                      "rebuild it with `retromem index dense build` to drop deleted documents") from exc
                if n:
                    write_index(idx, f)
                    rec["ntotal"], rec["bytes"] = int(idx.ntotal), f.stat().st_size
                    written.append(rec["file"])
                    nbytes += rec["bytes"]
                    removed += n
        # 2. new chunks: embedded with the index's embedder, added to a copy of the trained index
        recall = None
        drifted = False
        if len(new_ids):
            index = DenseIndex.open(path, datastore=ds, verify=False)
            emb = index.embedder
            encode = getattr(emb, "encode_documents", None) or emb.encode  # chunks as documents (their prompt)
            trained = path / "trained.index"
            if not trained.is_file():
                raise IndexFormatError(f"{trained} is missing: the index cannot take new vectors without retraining; "
                                       "rebuild it with `retromem index dense build`")
            shard = read_index(trained)
            vecs = []
            for lo in range(0, len(new_ids), 4096):
                ids = new_ids[lo:lo + 4096]
                x = np.asarray(encode(ds.chunk_texts(ids, include_deleted=True)), dtype=np.float32)
                shard.add_with_ids(np.ascontiguousarray(x), ids)
                vecs.append(x)
            name = f"shard-{len(meta['shards']):05d}.index"
            while (path / name).exists():
                name = f"shard-{int(name[6:11]) + 1:05d}.index"
            write_index(shard, path / name)
            # the new vectors kept beside it (float16, as the embedding job stores them): exact search for
            # the recall checks of later updates, and a rebuild without embedding again
            vec_name = name.replace(".index", ".vectors.npy")
            np.save(path / vec_name, np.concatenate(vecs).astype(np.float16))
            np.save(path / vec_name.replace(".vectors.npy", ".ids.npy"), new_ids)
            meta["shards"].append({"shard": len(meta["shards"]), "file": name, "first_chunk_id": int(new_ids[0]),
                                   "ntotal": int(shard.ntotal), "bytes": (path / name).stat().st_size,
                                   "vectors": vec_name, "version_added": int(getattr(ds, "version", 1) or 1)})
            written += [name, vec_name]
            nbytes += _bytes([path / name, path / vec_name, path / vec_name.replace(".vectors.npy", ".ids.npy")])
        meta["ntotal"] = sum(int(r["ntotal"]) for r in meta["shards"])
        meta["chunks_covered"] = int(ds.num_chunks)
        meta["removed"] = already + removed
        meta["removed_upto"] = int(len(dead[dead < ds.num_chunks]))
        meta["datastore_version"] = int(getattr(ds, "version", 1) or 1)
        meta["index_bytes"] = sum(int(r["bytes"]) for r in meta["shards"])
        sealed = job.seal("index.json", portable_meta(meta, path))
        if len(new_ids):  # searched through the index as now sealed
            recall, drifted = _recall_check(path, meta, ds, np.concatenate(vecs), new_ids)
            write_json(path / "index.json", {**sealed, "last_update": {"added": len(new_ids), "removed": removed,
                                                                       "recall_new_at_10": recall, "drifted": drifted}})
        nbytes += (path / "index.json").stat().st_size
    note = "recall check skipped: no new chunks" if recall is None else ""
    return UpdateReport(path, "dense", added=len(new_ids), removed=removed, shards_written=written, bytes_written=nbytes,
                        recall_new=recall, drifted=drifted, note=note)


def _recall_check(path: Path, meta: dict, ds, new_vecs: np.ndarray, new_ids: np.ndarray) -> tuple[float, bool]:
    """recall@10 of the updated index on a sample of the new chunks as queries, against exact search
    over every indexed vector (the stored embeddings of the build, the vectors of earlier updates
    kept beside their shards, the new ones), deleted chunks left out of both."""
    import faiss

    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings, faiss_metric, faiss_scores, index_similarity
    from retromem.index.types import deleted_chunk_ids

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(new_ids), size=min(DRIFT_QUERIES, len(new_ids)), replace=False))
    q = np.ascontiguousarray(new_vecs[pick])
    k = 10
    emb = Embeddings(meta["embeddings_path"])
    dead = deleted_chunk_ids(ds)
    best_d = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)

    similarity = index_similarity(meta)  # the index's own metric: exact search must rank as it does
    metric = faiss_metric(similarity)

    def merge(D, I):
        nonlocal best_d, best_i
        D = np.concatenate([best_d, faiss_scores(D, similarity)], axis=1)  # higher is better for any metric
        I = np.concatenate([best_i, I], axis=1)
        o = np.argsort(-D, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(D, o, 1), np.take_along_axis(I, o, 1)

    for start, block in emb.iter_blocks(0, emb.num_vectors):
        ids = np.arange(start, start + len(block), dtype=np.int64)
        keep = ~np.isin(ids, dead)
        if keep.any():
            D, I = faiss.knn(q, np.ascontiguousarray(block[keep], dtype=np.float32), min(k, int(keep.sum())),
                             metric=metric)
            merge(D, ids[keep][I])
    for rec in meta["shards"]:
        if rec.get("vectors"):  # this update's and earlier updates' vectors
            x = np.load(path / rec["vectors"]).astype(np.float32)
            ids = np.load(path / rec["vectors"].replace(".vectors.npy", ".ids.npy"))
            keep = ~np.isin(ids, dead)
            if keep.any():
                D, I = faiss.knn(q, np.ascontiguousarray(x[keep]), min(k, int(keep.sum())), metric=metric)
                merge(D, ids[keep][I])
    fresh = DenseIndex.open(path, datastore=ds, verify=False)
    got = fresh.search(q, min(k, fresh.ntotal)).chunk_ids
    hits = sum(len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(got, best_i))
    recall = hits / max(1, int((best_i >= 0).sum()))
    target = float((meta.get("build") or {}).get("target_recall") or 0.95)
    tuned = (meta.get("tuning") or {})
    want = min(target, 1.0)
    drifted = recall < want - DRIFT_MARGIN
    if drifted:
        logger.warning("%s: recall@10 on %d new chunks is %.3f, below the index's target %.2f (tuned %s): the new "
                       "data has drifted from what the index was trained on; retune (`retromem index dense tune`) or "
                       "rebuild it", path, len(q), recall, want, tuned.get("value"))
    return float(recall), bool(drifted)


# ---------------------------------------------------------------------------------------------
# n-gram


def _update_ngram(path: Path, datastore, progress: bool) -> UpdateReport:
    from retromem.datastore.atomic import sha256_file
    from retromem.datastore.integrity import read_manifest
    from retromem.datastore.job import open_job
    from retromem.errors import NgramIndexError
    from retromem.index.ngram_build import MANIFEST_NAME, NgramBuildConfig, _doc_token_counts, _plan_shards
    from retromem.index.types import deleted_doc_ids

    with open_job(path, "ngram-index", legacy=(MANIFEST_NAME, "_work/build.json")) as job:
        m = read_manifest(path / MANIFEST_NAME)
        ds = _open_ds(path, m, datastore, error=NgramIndexError)
        width = int(m["token_width"])
        build = m.get("build", {})
        cfg = NgramBuildConfig(shard_tokens=int(build.get("shard_tokens", 1_000_000_000)), cpus=int(build.get("cpus", 1)),
                               mem_bytes=int(build.get("mem_bytes", 4 << 30)))
        first_chunk, doc_tokens = _doc_token_counts(ds)
        dead = deleted_doc_ids(ds)
        doc_tokens = doc_tokens.copy()
        doc_tokens[dead] = 0  # a deleted document is written empty: its separator only
        ntok = np.array(ds.chunk_ntokens_array)
        ntok[ds.chunk_ids_of_docs(dead) if len(dead) else np.zeros(0, np.int64)] = 0
        covered = sum(int(s["documents"]) for s in m["shards"])
        shards = list(m["shards"])
        written: list[str] = []
        nbytes = 0
        emptied = 0
        stale: list[Path] = []
        # 1. shards holding tokens of deleted documents: rebuilt with those documents empty
        for i, s in enumerate(shards):
            d0, n = int(s["first_doc_id"]), int(s["documents"])
            mine = dead[(dead >= d0) & (dead < d0 + n)]
            if not len(mine):
                continue
            offs = np.fromfile(path / s["dir"] / "offset.0", dtype="<u8").astype(np.int64)
            ends = np.append(offs[1:], int(s["tokenized_bytes"]))
            if (ends[mine - d0] - offs[mine - d0] <= width).all():
                continue  # already empty in this shard
            new_dir = _fresh_dir(path, s["dir"])
            rec = _write_shard(ds, first_chunk, doc_tokens, ntok, d0, d0 + n, width, job.work, path / new_dir, cfg)
            shards[i] = {**s, **rec, "dir": new_dir}
            stale.append(path / s["dir"])
            written.append(new_dir)
            nbytes += _bytes((path / new_dir).iterdir())
            emptied += len(mine)
        # 2. documents added since: shards of their own
        added = 0
        if ds.num_documents > covered:
            for a, b in _plan_shards(doc_tokens[covered:], cfg.shard_tokens):
                d0, d1 = covered + a, covered + b
                new_dir = _fresh_dir(path, f"shard-{len(shards):05d}")
                rec = _write_shard(ds, first_chunk, doc_tokens, ntok, d0, d1, width, job.work, path / new_dir, cfg)
                shards.append({"shard": len(shards), "dir": new_dir, "first_doc_id": d0, "documents": d1 - d0, **rec,
                               "version_added": int(getattr(ds, "version", 1) or 1)})
                written.append(new_dir)
                nbytes += _bytes((path / new_dir).iterdir())
                added += d1 - d0
        if not written:
            return UpdateReport(path, "ngram", note="up to date")
        for d in stale:  # the manifest is rewritten next; a reader opening in between gets a clear error
            shutil.rmtree(d, ignore_errors=True)
        m["shards"] = shards
        m["counts"] = {"documents": sum(int(s["documents"]) for s in shards),
                       "tokens": sum(int(s["tokens"]) - int(s["documents"]) for s in shards), "shards": len(shards)}
        m["datastore_manifest_sha256"] = sha256_file(ds.path / "manifest.json")
        m["datastore_version"] = int(getattr(ds, "version", 1) or 1)
        m.pop("integrity", None)
        job.seal(MANIFEST_NAME, m)
        job.clear_work()
        nbytes += (path / MANIFEST_NAME).stat().st_size
    return UpdateReport(path, "ngram", added=added, removed=emptied, shards_written=written, bytes_written=nbytes)


def _fresh_dir(root: Path, base: str) -> str:
    """``base`` if free, else ``base-r1``, ``base-r2``... (a rebuilt shard never overwrites a mapped one)."""
    stem = base.split("-r")[0]
    name, r = base, 0
    while (root / name).exists():
        r += 1
        name = f"{stem}-r{r}"
    return name


def _write_shard(ds, first_chunk: np.ndarray, doc_tokens: np.ndarray, ntok: np.ndarray, d0: int, d1: int, width: int,
                 work: Path, shard: Path, cfg) -> dict[str, Any]:
    """One suffix-array shard of documents [d0, d1) (deleted ones empty): its manifest record."""
    from retromem.index.ngram_build import _build_suffix_array, _ptr_size, _write_token_stream

    work.mkdir(parents=True, exist_ok=True)
    _write_token_stream(ds, first_chunk, doc_tokens, d0, d1, width, work, shard, chunk_ntok=ntok)
    _build_suffix_array(shard, work, width, cfg.cpus or os.cpu_count() or 1, cfg.mem_bytes)
    n = int(doc_tokens[d0:d1].sum()) + (d1 - d0)
    ds_bytes = n * width
    return {"tokens": n, "tokenized_bytes": ds_bytes, "offset_bytes": (d1 - d0) * 8,
            "table_bytes": n * _ptr_size(ds_bytes), "ptr_size": _ptr_size(ds_bytes)}


# ---------------------------------------------------------------------------------------------
# FM-index and BM25: rebuilt


def _rebuild(path: Path, kind: str, datastore, progress: bool) -> UpdateReport:
    from retromem.datastore.integrity import read_manifest

    name = "fm_index.json" if kind == "fm" else "lexical_index.json"
    m = read_manifest(path / name)
    ds = _open_ds(path, m, datastore)
    if kind == "fm":
        from retromem.index.fm_index import build_fm_index

        build_fm_index(ds.path, path, backend=m["backend"], sample_rate=int(m.get("sample_rate", 32)), overwrite=True,
                       progress=progress)
    else:
        from retromem.index.lexical import LexicalBuildConfig, build_lexical_index

        b = m["bm25"]
        build_lexical_index(ds.path, path, LexicalBuildConfig(tokenization=b["tokenization"], k1=b["k1"], b=b["b"]),
                            overwrite=True, progress=progress)
    return UpdateReport(path, kind, added=ds.num_documents, bytes_written=_bytes(p for p in path.rglob("*")),
                        note="rebuilt whole (no incremental form)")


__all__ = ["UpdateReport", "index_kind", "update_index"]
