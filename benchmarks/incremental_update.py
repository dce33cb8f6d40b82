"""Incremental update against a full rebuild (issue 18): adding 10% new documents to a datastore
and its dense and n-gram indexes.

From the first ``--docs`` documents of a shared corpus (gcide by default: many short documents),
the first 90% make a base datastore with its embeddings, a dense index (``--factory``, trained on
the base) and an n-gram index (untimed). Then, timed, with the bytes each step writes (files new
or changed under the output, summed):

- incremental: ``datastore add`` of the last 10%, ``index update`` of the dense index (embeds and
  adds only the new chunks, no retraining) and of the n-gram index (one new shard);
- rebuild: a datastore of all the documents built from scratch, its embeddings, a dense index
  trained on everything, an n-gram index.

Then recall@10 of the updated and of the rebuilt dense index against exact search over every
vector, on ``--queries`` chunks sampled from the whole datastore (each query's own document
excluded), and on new chunks only; both at the same nprobe. The two datastores hold the same
documents in the same order, so chunk ids agree (checked).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/incremental_update.py --out /tmp/inc --threads 1
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


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def written(before: dict, root: Path) -> int:
    """Bytes of the files new or changed since ``before``."""
    return sum(s for p, (s, m) in snapshot(root).items() if before.get(p) != (s, m))


def timed(label: str, root: Path, fn, results: dict) -> None:
    before = snapshot(root)
    t0 = time.perf_counter()
    fn()
    results[label] = {"seconds": time.perf_counter() - t0, "bytes": written(before, root)}
    print(f"{label:<22} {results[label]['seconds']:8.1f} s  {results[label]['bytes'] / 2**20:9.2f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="gcide")
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--new-fraction", type=float, default=0.1)
    ap.add_argument("--factory", default="IVF128,Flat")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.datastore.pipeline import add
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, Embeddings, embed_datastore
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index
    from retromem.index.update import update_index

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "inputs").mkdir(parents=True)
    docs = []
    with gzip.open(SHARED / f"{args.corpus}.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            docs.append({"id": r["id"], "text": r["text"]})
            if len(docs) == args.docs:
                break
    cut = int(round(len(docs) * (1 - args.new_fraction)))
    for name, part in (("base", docs[:cut]), ("new", docs[cut:])):
        (out / "inputs" / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in part))
    shutil.copy(out / "inputs" / "base.jsonl", out / "inputs" / "all.jsonl")
    with open(out / "inputs" / "all.jsonl", "a") as fh:
        fh.write((out / "inputs" / "new.jsonl").read_text())
    ncpu = 1
    emb_cfg = dict(batch_size=64)
    res: dict[str, dict] = {}

    # base (untimed): datastore, embeddings, dense, n-gram over the first 90%
    inc = out / "incremental"
    t0 = time.perf_counter()
    build(BuildConfig(inputs=(str(out / "inputs" / "base.jsonl"),), out=str(inc / "ds"), tokenizer="gpt2", workers=ncpu))
    embed_datastore(EmbedConfig(datastore=str(inc / "ds"), out=str(inc / "emb"), **emb_cfg), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(inc / "emb"), out=str(inc / "dense"), factory=args.factory, tune=False),
                progress=False)
    build_ngram_index(inc / "ds", inc / "ngram", NgramBuildConfig(cpus=ncpu), progress=False)
    print(f"base built in {time.perf_counter() - t0:.0f} s", flush=True)

    # incremental
    timed("inc: datastore add", inc, lambda: add(inc / "ds", [str(out / "inputs" / "new.jsonl")], workers=ncpu), res)
    upd: dict = {}
    timed("inc: dense update", inc, lambda: upd.setdefault("dense", update_index(inc / "dense")), res)
    timed("inc: n-gram update", inc, lambda: upd.setdefault("ngram", update_index(inc / "ngram")), res)

    # full rebuild
    full = out / "rebuild"
    full.mkdir()
    timed("full: datastore build", full, lambda: build(BuildConfig(inputs=(str(out / "inputs" / "all.jsonl"),),
                                                                   out=str(full / "ds"), tokenizer="gpt2", workers=ncpu)), res)
    timed("full: embed", full, lambda: embed_datastore(EmbedConfig(datastore=str(full / "ds"), out=str(full / "emb"), **emb_cfg),
                                                       progress=False), res)
    timed("full: dense build", full, lambda: build_dense(DenseBuildConfig(embeddings=str(full / "emb"), out=str(full / "dense"),
                                                                          factory=args.factory, tune=False), progress=False), res)
    timed("full: n-gram build", full, lambda: build_ngram_index(full / "ds", full / "ngram", NgramBuildConfig(cpus=ncpu),
                                                                progress=False), res)

    inc_t = sum(v["seconds"] for k, v in res.items() if k.startswith("inc"))
    full_t = sum(v["seconds"] for k, v in res.items() if k.startswith("full"))
    inc_b = sum(v["bytes"] for k, v in res.items() if k.startswith("inc"))
    full_b = sum(v["bytes"] for k, v in res.items() if k.startswith("full"))
    print(f"incremental {inc_t:.1f} s, {inc_b / 2**20:.2f} MiB; rebuild {full_t:.1f} s, {full_b / 2**20:.2f} MiB; "
          f"ratio time {inc_t / full_t:.3f}, bytes {inc_b / full_b:.3f}", flush=True)

    # recall@10 against exact search over every vector
    ds_i, ds_f = Datastore.open(inc / "ds"), Datastore.open(full / "ds")
    assert ds_i.num_chunks == ds_f.num_chunks, (ds_i.num_chunks, ds_f.num_chunks)
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(ds_f.num_chunks, size=min(args.queries, ds_f.num_chunks), replace=False))
    assert ds_i.chunk_texts(sample[:50]) == ds_f.chunk_texts(sample[:50])
    new_first = ds_i.segments[1].first_chunk_id
    new_sample = np.sort(rng.choice(np.arange(new_first, ds_f.num_chunks), size=min(args.queries, ds_f.num_chunks - new_first),
                                    replace=False))
    emb_f = Embeddings(full / "emb")
    xb = np.concatenate([b for _, b in emb_f.iter_blocks(0, emb_f.num_vectors)]).astype(np.float32)
    idx_u, idx_r = DenseIndex.open(inc / "dense"), DenseIndex.open(full / "dense")
    out_rec = {}
    for name, ids in (("all", sample), ("new", new_sample)):
        q = np.ascontiguousarray(xb[ids])
        docs_q = ds_f.doc_ids(ids)
        excl = [np.array([d]) for d in docs_q]
        # exact: top 10 excluding the query's own document
        D, I = faiss.knn(q, xb, 60, metric=faiss.METRIC_INNER_PRODUCT)
        dq = ds_f.doc_ids(I.reshape(-1)).reshape(I.shape)
        exact = np.stack([row[d != docs_q[r]][:10] for r, (row, d) in enumerate(zip(I, dq))])
        for label, idx in (("updated", idx_u), ("rebuilt", idx_r)):
            got = idx.search(q, 10, exclude_doc_ids=excl).chunk_ids
            rec = float(np.mean([len(np.intersect1d(a, e)) / 10 for a, e in zip(got, exact)]))
            out_rec[f"{name}/{label}"] = rec
        print(f"recall@10 on {name} chunks ({len(ids)} queries, nprobe {idx_u.defaults.get('nprobe')}): "
              f"updated {out_rec[f'{name}/updated']:.4f}, rebuilt {out_rec[f'{name}/rebuilt']:.4f}", flush=True)
    summary = {"args": vars(args), "steps": res, "incremental": {"seconds": inc_t, "bytes": inc_b},
               "rebuild": {"seconds": full_t, "bytes": full_b}, "ratio": {"seconds": inc_t / full_t, "bytes": inc_b / full_b},
               "recall_at_10": out_rec, "dense_update_recall_check": upd["dense"].recall_new,
               "chunks": {"base": int(new_first), "new": int(ds_f.num_chunks - new_first)},
               "documents": {"base": cut, "new": len(docs) - cut}}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
