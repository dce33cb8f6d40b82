"""Embedding backends on CPU: recall@10 of each backend against fp32 PyTorch on the same queries,
and chunks embedded per CPU-second, one thread, every backend timed in the same run.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/embed_backends.py --work /tmp/embed-backends

Data: a datastore (GPT-2 tokens, 64-token chunks) of the first documents of the three shared
corpora (../shared/corpora: python-docs, linux-docs, gcide); ``--chunks`` chunks drawn evenly
from the three are the corpus, ``--query-chunks`` other chunks and ``--questions`` gcide-qa
questions are the queries. Each backend (all-MiniLM-L6-v2 through
:class:`retromem.index.embed.Embedder`: torch fp32, torch-int8, onnx, onnx-int8, openvino) embeds
the corpus as documents and the queries as queries; exact inner-product top-10 over its own
corpus vectors is compared with fp32 torch's top-10 (recall@10 = overlap / 10, per query, with a
paired bootstrap interval of backend - fp32). Throughput: the corpus in blocks, each block embedded
by every backend in turn (so load on the shared machine falls on all alike), CPU time of this
process (``time.process_time``) per block; chunks per CPU-second is the corpus over the summed CPU
time, with the range over blocks. A backend is offered where its recall@10 is within 0.01 of fp32.
Prints a table and writes results.json under ``--work``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
BACKENDS = ("torch", "torch-int8", "onnx", "onnx-int8", "openvino")


def first_docs(name: str, n: int) -> list[dict]:
    out = []
    with gzip.open(CORPORA / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out.append({"id": rec["id"], "text": rec["text"]})
            if len(out) == n:
                break
    return out


def build_store(work: Path, name: str, n_docs: int):
    """A datastore of the first ``n_docs`` documents of one shared corpus (built once under ``work``)."""
    from retromem.datastore import BuildConfig, Datastore, build

    out = work / f"ds-{name}"
    if not out.exists():
        src = work / f"{name}.jsonl"
        with open(src, "w", encoding="utf-8") as fh:
            for rec in first_docs(name, n_docs):
                fh.write(json.dumps(rec) + "\n")
        build(BuildConfig(inputs=(str(src),), out=str(out), tokenizer="gpt2", workers=1))
    return Datastore.open(out)


def sample_texts(stores: list, n_corpus: int, n_queries: int, seed: int) -> tuple[list[str], list[str]]:
    """Corpus and query chunks, drawn evenly from the datastores, disjoint."""
    rng = np.random.default_rng(seed)
    corpus, queries = [], []
    for ds in stores:
        pick = rng.permutation(ds.num_chunks)
        corpus += ds.chunk_texts(pick[: n_corpus // len(stores)])
        queries += ds.chunk_texts(pick[n_corpus // len(stores): n_corpus // len(stores) + n_queries // len(stores)])
    return list(corpus), list(queries)


def questions(n: int) -> list[str]:
    out = []
    with gzip.open(CORPORA / "gcide-qa.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line)["query"])
            if len(out) == n:
                break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/embed-backends")
    ap.add_argument("--chunks", type=int, default=1500, help="corpus chunks (evenly from the three corpora)")
    ap.add_argument("--query-chunks", type=int, default=150)
    ap.add_argument("--questions", type=int, default=150, help="gcide-qa questions as queries")
    ap.add_argument("--block", type=int, default=100, help="chunks per timed block")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss
    import torch

    from retromem.index.embed import Embedder
    from retromem.stats import paired_bootstrap

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stores = [build_store(work, name, n) for name, n in (("python-docs", 12), ("linux-docs", 12), ("gcide", 1500))]
    corpus, qchunks = sample_texts(stores, args.chunks, args.query_chunks, args.seed)
    queries = qchunks + questions(args.questions)
    print(f"datastores {[ds.num_chunks for ds in stores]} chunks; corpus {len(corpus):,} chunks, {len(queries)} queries "
          f"({len(qchunks)} chunks + {len(queries) - len(qchunks)} gcide-qa questions); {args.threads} thread(s)", flush=True)

    names = [b for b in args.backends.split(",") if b]
    models, load_s = {}, {}
    for b in names:
        t0 = time.perf_counter()
        models[b] = Embedder("all-minilm-l6-v2", device="cpu", batch_size=args.batch_size, backend=b)
        models[b].encode_documents(corpus[:8])  # warm-up (first-call allocations, lazy init)
        load_s[b] = time.perf_counter() - t0
    vecs = {b: [] for b in names}
    cpu = {b: [] for b in names}
    wall = {b: [] for b in names}
    for s in range(0, len(corpus), args.block):
        block = corpus[s: s + args.block]
        for b in names:  # interleaved: every backend sees the same load
            c0, w0 = time.process_time(), time.perf_counter()
            vecs[b].append(models[b].encode_documents(block))
            cpu[b].append(time.process_time() - c0)
            wall[b].append(time.perf_counter() - w0)
        print(f"  block {s // args.block + 1}/{-(-len(corpus) // args.block)}: "
              + ", ".join(f"{b} {len(block) / cpu[b][-1]:.1f}" for b in names) + " chunks/CPU-s", flush=True)
    ref = "torch"
    results = {}
    top = {}
    for b in names:
        xb = np.concatenate(vecs[b]).astype(np.float32)
        xq = models[b].encode_queries(queries)
        _, top[b] = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
    for b in names:
        per_q = np.array([len(np.intersect1d(top[b][i], top[ref][i])) / 10 for i in range(len(queries))])
        boot = paired_bootstrap(per_q, np.ones_like(per_q), n=2000, seed=args.seed)
        sizes = np.array([len(corpus[s: s + args.block]) for s in range(0, len(corpus), args.block)])
        rates = sizes / np.array(cpu[b])
        # paired by block (every backend embedded the same block back to back): rate / torch's rate
        ratio = rates / (sizes / np.array(cpu[ref]))
        speed = paired_bootstrap(ratio, np.ones_like(ratio), n=2000, seed=args.seed)
        results[b] = {
            "block_cpu_seconds": cpu[b], "speed_vs_fp32_minus_1": speed.as_dict(),
            "recall_at_10": float(per_q.mean()), "recall_minus_fp32": boot.as_dict(),
            "recall_at_10_chunk_queries": float(per_q[: len(qchunks)].mean()),
            "recall_at_10_questions": float(per_q[len(qchunks):].mean()),
            "chunks_per_cpu_second": len(corpus) / sum(cpu[b]), "block_rate_min": float(rates.min()),
            "block_rate_max": float(rates.max()), "chunks_per_wall_second": len(corpus) / sum(wall[b]),
            "cpu_seconds": sum(cpu[b]), "load_seconds": load_s[b],
            "offered": bool(per_q.mean() >= 0.99),
        }
    base = results[ref]["chunks_per_cpu_second"]
    print(f"\n| backend | recall@10 vs fp32 | - fp32 [95% CI] | chunk queries | questions | chunks/CPU-s (block range) "
          f"| vs torch [95% CI, paired by block] | offered |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for b, r in results.items():
        ci = r["recall_minus_fp32"]
        print(f"| {b} | {r['recall_at_10']:.3f} | {ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}] "
              f"| {r['recall_at_10_chunk_queries']:.3f} | {r['recall_at_10_questions']:.3f} "
              f"| {r['chunks_per_cpu_second']:.1f} ({r['block_rate_min']:.1f}-{r['block_rate_max']:.1f}) "
              f"| {r['chunks_per_cpu_second'] / base:.2f}x [{1 + r['speed_vs_fp32_minus_1']['low']:.2f}, "
              f"{1 + r['speed_vs_fp32_minus_1']['high']:.2f}] | {'yes' if r['offered'] else 'no'} |")
    out = {"args": vars(args), "datastore_chunks": [ds.num_chunks for ds in stores], "corpus": len(corpus), "queries": len(queries),
           "results": results, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (work / "results.json").write_text(json.dumps(out, indent=2))
    print(f"\nwrote {work / 'results.json'}")


if __name__ == "__main__":
    main()
