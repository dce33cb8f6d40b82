"""Takedown latency (issue 18): how long after `datastore delete` of 1,000 documents a running
server stops returning them, and what tombstones cost at query time.

Builds (cached under ``--work``: a ``pristine/`` folder holding ds, emb, dense and ngram, which may
be copied from elsewhere, e.g. the grown store of incremental_update.py) a datastore of the first
``--docs`` documents of a shared corpus (gcide: short dictionary entries), its embeddings, a Flat
dense index and an n-gram index, and
starts a server on loopback (in process; ``--workers`` threads). Queries: the first chunk of each
document to be deleted (so every query would retrieve its own document) as vectors, k=10.

1. Before: every query returns its own document.
2. ``delete`` of ``--delete`` random documents (one call, as `retromem datastore delete` makes),
   then the ``Reload`` RPC; then the queries are searched again: seconds from the start of the
   delete to the reload's answer, and whether any deleted document still comes back (Search,
   GetChunks, Count of an n-gram only a deleted document holds).
3. Latency with tombstones against without: a second server over the version before the delete
   (the same files) answers the same queries, interleaved one by one with the first so that the
   machine's load falls on both alike; per-query paired difference with a bootstrap interval.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/takedown_latency.py --work /tmp/takedown
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("RETROMEM_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "corpora"


def build_store(work: Path, corpus: str, n_docs: int) -> None:
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    if (work / "pristine" / "ngram" / "ngram_index.json").exists():
        return
    shutil.rmtree(work / "pristine", ignore_errors=True)
    (work / "pristine").mkdir(parents=True)
    docs = []
    with gzip.open(SHARED / f"{corpus}.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            docs.append(json.dumps({"id": r["id"], "text": r["text"], "license": r.get("license", "")}) + "\n")
            if len(docs) == n_docs:
                break
    (work / "docs.jsonl").write_text("".join(docs))
    p = work / "pristine"
    build(BuildConfig(inputs=(str(work / "docs.jsonl"),), out=str(p / "ds"), tokenizer="gpt2", workers=1))
    embed_datastore(EmbedConfig(datastore=str(p / "ds"), out=str(p / "emb"), batch_size=64), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(p / "emb"), out=str(p / "dense"), factory="Flat", tune=False), progress=False)
    build_ngram_index(p / "ds", p / "ngram", NgramBuildConfig(cpus=1), progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--corpus", default="gcide")
    ap.add_argument("--docs", type=int, default=8000)
    ap.add_argument("--delete", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from retromem.datastore import Datastore
    from retromem.datastore.tombstones import delete
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings
    from retromem.index.ngram import NgramIndex
    from retromem.service.client import RetrievalClient, ServiceCallError
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server
    from retromem.service.servicer import Backend
    from retromem.stats import paired_bootstrap

    work = Path(args.work)
    t0 = time.perf_counter()
    build_store(work, args.corpus, args.docs)
    print(f"store ready in {time.perf_counter() - t0:.0f} s", flush=True)
    run = work / "run"  # a fresh copy each time: the delete writes a version into it
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(work / "pristine", run)
    ds0 = Datastore.open(run / "ds")
    rng = np.random.default_rng(0)
    first = ds0.doc_first_chunk_array
    emb = Embeddings(run / "emb")
    # documents whose first chunk has a stored vector (a store grown by `datastore add` + `index update`
    # keeps the new segment's vectors in the index, not in the embeddings directory)
    eligible = np.flatnonzero(np.asarray(first[:-1]) < emb.num_vectors)
    victims = np.sort(rng.choice(eligible, size=args.delete, replace=False))
    q_ids = first[victims].astype(np.int64)
    x = emb.get(q_ids).astype(np.float32)
    victim_chunks = set(ds0.chunk_ids_of_docs(victims).tolist())
    cfg = ServerConfig(datastore=str(run / "ds"), dense=str(run / "dense"), ngram=str(run / "ngram"), port=0,
                       workers=args.workers, faiss_threads=args.threads, torch_threads=args.threads)
    live_server = start_server(cfg)
    # the control: the version before the delete, opened explicitly, served alongside
    old_ds = Datastore.open(run / "ds", version=ds0.version)
    old = Backend(old_ds, DenseIndex.open(run / "dense", datastore=old_ds), NgramIndex(run / "ngram", old_ds))
    control = start_server(ServerConfig(datastore=str(run / "ds"), dense=str(run / "dense"), ngram=str(run / "ngram"), port=0,
                                        workers=args.workers), old)
    out: dict = {"args": vars(args), "documents": ds0.num_documents, "chunks": ds0.num_chunks}
    with RetrievalClient(live_server.target, timeout=120) as c, RetrievalClient(control.target, timeout=120) as cc:
        res = c.search(x, 10)
        out["before_queries_returning_their_document"] = float(np.mean([q in row for q, row in zip(q_ids, res.chunk_ids)]))
        # an n-gram only a deleted document holds (a long one from its first chunk)
        probe = None
        for d in victims[:50]:
            toks = ds0.doc_token_ids(int(d))[:12].tolist()
            if len(toks) >= 8 and NgramIndex(run / "ngram", ds0).count(toks).count == 1:
                probe = toks
                break
        t_delete = time.perf_counter()
        delete(run / "ds", doc_ids=victims.tolist(), reason="takedown latency benchmark", who="benchmark")
        t_deleted = time.perf_counter()
        r = c.reload()
        t_reloaded = time.perf_counter()
        res = c.search(x, 10)
        t_served = time.perf_counter()
        leaked = int(sum(len(set(row.tolist()) & victim_chunks) for row in res.chunk_ids))
        full = int((res.chunk_ids >= 0).all(axis=1).sum())
        try:
            c.get_chunks([int(q_ids[0])])
            chunks_refused = False
        except ServiceCallError:
            chunks_refused = True
        out["takedown"] = {"delete_s": t_deleted - t_delete, "reload_rpc_s": t_reloaded - t_deleted,
                           "server_open_s": r.seconds, "delete_to_served_s": t_reloaded - t_delete,
                           "first_search_after_s": t_served - t_reloaded, "deleted_hits_after": leaked,
                           "queries_with_k_hits_after": full, "queries": len(q_ids), "get_chunks_refused": chunks_refused,
                           "probe_count_before": 1 if probe else None,
                           "probe_count_after": c.count(probe).count if probe else None, "version": r.version}
        print(json.dumps(out["takedown"], indent=2), flush=True)
        # latency with tombstones vs without, interleaved query by query (vectors, k=10)
        lat_t, lat_c = [], []
        order = rng.permutation(len(x))
        for rep in range(2):
            for i in order:
                first_is_live = (i + rep) % 2 == 0
                pair = [(c, lat_t), (cc, lat_c)] if first_is_live else [(cc, lat_c), (c, lat_t)]
                for client, sink in pair:
                    s = time.perf_counter()
                    client.search(x[i:i + 1], 10)
                    sink.append(time.perf_counter() - s)
        a, b = np.asarray(lat_t) * 1000, np.asarray(lat_c) * 1000
        bs = paired_bootstrap(a, b, n=2000, seed=0)
        out["latency_ms"] = {"with_tombstones": {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
                                                 "mean": float(a.mean())},
                             "without": {"median": float(np.median(b)), "p90": float(np.percentile(b, 90)),
                                         "mean": float(b.mean())},
                             "paired_mean_diff_ms": float(bs.mean), "interval": [float(bs.low), float(bs.high)],
                             "pairs": len(a)}
        print(json.dumps(out["latency_ms"], indent=2), flush=True)
    live_server.stop(0)
    control.stop(0)
    (work / "results.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
