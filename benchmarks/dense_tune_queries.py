"""Does a tuned dense index keep its recall on real queries? (issue 15)

    python benchmarks/dense_tune_queries.py --embeddings EMB_DIR --queries QUERIES.jsonl \
        --factory IVF256,Flat --target 0.95 --out /tmp/tune-bench

Builds the index once without tuning, then tunes it twice in the same run: (1) on datastore
chunks alone, as `index dense tune` did before, and (2) on the chunks plus the tuning part of the
query file (``--holdout`` of it held out). For each chosen value it reports recall@k against exact
search on the datastore chunks and on the held-out queries (the same held-out queries for both),
so the shortfall of chunk-only tuning on real queries and what the query file buys are measured
side by side, with the nprobe/efSearch cost (queries per second) of each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embeddings", required=True, help="An embeddings directory (retromem index dense embed).")
    ap.add_argument("--queries", required=True, help="Real queries: JSONL with text/query, plain lines, or .npy.")
    ap.add_argument("--factory", default="IVF256,Flat")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--chunk-queries", type=int, default=500)
    ap.add_argument("--holdout", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import faiss

    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.dense_eval import exact_search, load_query_file, recall_at, tune
    from retromem.index.embed import Embeddings

    faiss.omp_set_num_threads(args.threads)
    out = Path(args.out)
    base = out / "index"
    if not (base / "index.json").exists():
        t0 = time.perf_counter()
        build_dense(DenseBuildConfig(embeddings=args.embeddings, out=str(base), factory=args.factory, tune=False),
                    overwrite=True, progress=True)
        print(f"built {args.factory} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {}
    for name, qf in (("chunks only", None), ("chunks + query file", args.queries)):
        d = out / name.replace(" ", "_").replace("+", "and")
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(base, d)
        rep = tune(d, target_recall=args.target, k=args.k, n_queries=args.chunk_queries, query_file=args.queries
                   if qf else None, holdout=args.holdout)
        rows[name] = (d, rep)
    # the held-out queries: the same rows `tune` held out (seed 1, as tune's default)
    index = DenseIndex.open(rows["chunks + query file"][0])
    x, _ = load_query_file(args.queries, index)
    src = rows["chunks + query file"][1].meta["tuning"]["query_source"]
    held = np.sort(np.random.default_rng(1).permutation(len(x))[:src["file_held_out"]])
    emb = Embeddings(index.meta["embeddings_path"])
    _, truth = exact_search(emb, x[held], args.k)
    param, key = rows["chunks only"][1].param, "nprobe" if rows["chunks only"][1].param == "nprobe" else "ef_search"
    result = {"factory": args.factory, "k": args.k, "target": args.target, "vectors": emb.num_vectors,
              "queries_file": args.queries, "held_out": len(held), "tuned_on": src["file_tuned_on"], "rows": []}
    print(f"\n{args.factory}, {emb.num_vectors:,} vectors, target recall@{args.k} {args.target}; held-out real "
          f"queries: {len(held)} (tuned on {src['file_tuned_on']})")
    print(f"{'tuned on':<22} {param:>8} {'recall chunks':>14} {'recall held-out':>16} {'q/s (chunks)':>13}")
    for name, (d, rep) in rows.items():
        idx = DenseIndex.open(d)
        r_held = recall_at(idx.knn(np.ascontiguousarray(x[held]), args.k, **{key: rep.value})[1], truth, args.k)
        at = next(c for c in rep.curve if c[param] == rep.value)
        result["rows"].append({"tuned_on": name, param: rep.value, "recall_chunks": at["recall"],
                               "recall_held_out": r_held, "qps": at["qps"], "reached": rep.reached})
        print(f"{name:<22} {rep.value:>8} {at['recall']:>14.4f} {r_held:>16.4f} {at['qps']:>13,.0f}")
    (out / "results.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
