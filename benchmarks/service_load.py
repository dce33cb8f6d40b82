"""Load test of the gRPC retrieval service on loopback, against the same calls in process.

Starts `retromem serve` as its own process over a datastore, its dense index and its n-gram index
(default: what `retromem demo` built), then drives a bounded closed-loop load: C client threads,
each sending its next request as soon as the last one returned, for a fixed time per cell. Every
cell is measured twice in the same run: over gRPC, and calling the library in this process with
the same threads and the same queries. Prints p50/p99 latency and QPS per workload x concurrency,
and the service's overhead (gRPC p50 minus in-process p50).

Workloads: n-gram count (2-4 token ids sampled from the datastore), dense search of one vector
(k=10), dense search of a batch of 64 vectors (k=10), GetChunks of 8 random ids with text, tokens
and continuation.

    python benchmarks/service_load.py --demo retromem-demo --seconds 3 --concurrency 1,8,32
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def closed_loop(call, make, concurrency: int, seconds: float, warmup: float = 0.3) -> dict:
    """C threads call ``call(make(i))`` back to back for ``seconds``; latencies after warm-up."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = time.perf_counter()
    t_begin, t_end = start + warmup, start + warmup + seconds

    def worker(w: int) -> None:
        rng = np.random.default_rng(w)
        mine = lat[w]
        while True:
            req = make(rng)
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                call(req)
            except Exception:
                errors[w] += 1
                continue
            t1 = time.perf_counter()
            if t0 >= t_begin:
                mine.append(t1 - t0)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    all_lat = np.array([x for l in lat for x in l])
    return {"n": int(len(all_lat)), "qps": len(all_lat) / seconds, "errors": int(sum(errors)),
            "p50_ms": float(np.percentile(all_lat, 50) * 1e3) if len(all_lat) else float("nan"),
            "p99_ms": float(np.percentile(all_lat, 99) * 1e3) if len(all_lat) else float("nan")}


def start_server(args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "retromem.cli", "serve", "--datastore", args.datastore, "--dense", args.dense,
           "--ngram", args.ngram, "--port", "0", "--workers", str(args.workers), "--max-queue", "256",
           "--torch-threads", "1", "--batch-wait-ms", str(args.batch_wait_ms)] + (["--faiss-threads", str(args.faiss_threads)] if args.faiss_threads else [])
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith("serving"):
            return proc, "127.0.0.1:" + line.split(" on ")[1].split()[0].rsplit(":", 1)[1]
    raise SystemExit("the server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="retromem-demo", help="directory `retromem demo` wrote")
    ap.add_argument("--datastore"), ap.add_argument("--dense"), ap.add_argument("--ngram")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per cell")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workers", type=int, default=8, help="server worker threads")
    ap.add_argument("--faiss-threads", type=int, default=0, help="FAISS threads in both the server and this process (0: default)")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0, help="the server's dense micro-batching bound")
    ap.add_argument("--only", default="", help="comma-separated workloads (count,dense1,dense64,chunks)")
    ap.add_argument("--json", dest="json_out", help="also write the figures here")
    args = ap.parse_args()
    demo = Path(args.demo)
    args.datastore = args.datastore or str(demo / "datastore")
    args.dense = args.dense or str(demo / "dense-index")
    args.ngram = args.ngram or str(demo / "ngram")

    import grpc
    import torch

    torch.set_num_threads(1)
    if args.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(args.faiss_threads)
    from index.types import fetch_payloads
    from service.config import ServerConfig
    from service.server import Backend
    from service.v1 import retrieval_pb2 as pb
    from service.v1 import retrieval_pb2_grpc as pb_grpc

    b = Backend.open(ServerConfig(datastore=args.datastore, dense=args.dense, ngram=args.ngram))
    ds, dense, ng = b.datastore, b.dense, b.ngram
    rng = np.random.default_rng(0)
    # queries: real n-grams of the datastore, real chunk texts embedded
    toks, lens = ds.tokens(rng.integers(0, ds.num_chunks, 512))
    ngrams = []
    for row, n in zip(toks, lens):
        m = int(rng.integers(2, 5))
        s = int(rng.integers(0, max(1, n - m)))
        ngrams.append([int(t) for t in row[s:s + m]])
    texts = [t for t in ds.chunk_texts(rng.integers(0, ds.num_chunks, 300)) if t.strip()][:256]
    vecs = dense.embedder.encode(texts)
    n_chunks = ds.num_chunks

    proc, target = start_server(args)
    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    stub = pb_grpc.RetrievalStub(ch)
    grpc.channel_ready_future(ch).result(timeout=30)
    count_reqs = [pb.NgramRequest(query=pb.NgramQuery(ids=pb.TokenIds(ids=g))) for g in ngrams]
    one_reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v))], k=10) for v in vecs]
    batch_reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v)) for v in vecs[i:i + 64]], k=10)
                  for i in range(0, 192, 8)]
    fetch_all = pb.Fetch(text=True, tokens=True, continuation=True)

    def pick(lst):
        return lambda r: lst[int(r.integers(len(lst)))]

    workloads = {
        "count": (lambda g: ng.count(g), pick(ngrams), lambda q: stub.Count(q, timeout=10), pick(count_reqs)),
        "dense1": (lambda v: dense.search(v[None], 10), pick(list(vecs)), lambda q: stub.Search(q, timeout=10), pick(one_reqs)),
        "dense64": (lambda i: dense.search(vecs[i:i + 64], 10), lambda r: int(r.integers(0, 24)) * 8,
                    lambda q: stub.Search(q, timeout=30), pick(batch_reqs)),
        "chunks": (lambda ids: fetch_payloads(ds, ids), lambda r: r.integers(0, n_chunks, 8),
                   lambda q: stub.GetChunks(q, timeout=10),
                   lambda r: pb.GetChunksRequest(chunk_ids=r.integers(0, n_chunks, 8).tolist(), fetch=fetch_all)),
    }
    only = [w for w in args.only.split(",") if w] or list(workloads)
    conc = [int(c) for c in args.concurrency.split(",")]
    rows = []
    print(f"server {target}, {args.workers} worker threads; {os.cpu_count()} cores; {args.seconds:.0f}s per cell; "
          f"datastore {ds.num_chunks:,} chunks, dense {dense.factory} over {dense.ntotal:,}, n-gram {ng.num_tokens:,} tokens")
    print(f"{'workload':<8} {'C':>3}  {'in-process p50/p99 ms':>22} {'QPS':>8}   {'gRPC p50/p99 ms':>17} {'QPS':>8}  "
          f"{'overhead p50':>12}  errors")
    try:
        for w in only:
            local_call, local_make, remote_call, remote_make = workloads[w]
            for c in conc:
                loc = closed_loop(local_call, local_make, c, args.seconds)
                rem = closed_loop(remote_call, remote_make, c, args.seconds)
                q_unit = 64 if w == "dense64" else 1
                rows.append({"workload": w, "concurrency": c, "in_process": loc, "grpc": rem,
                             "overhead_p50_ms": rem["p50_ms"] - loc["p50_ms"], "queries_per_request": q_unit})
                print(f"{w:<8} {c:>3}  {loc['p50_ms']:>9.3f} / {loc['p99_ms']:>8.3f} {loc['qps']:>8,.0f}   "
                      f"{rem['p50_ms']:>7.3f} / {rem['p99_ms']:>7.3f} {rem['qps']:>8,.0f}  "
                      f"{rem['p50_ms'] - loc['p50_ms']:>+9.3f} ms  {loc['errors'] + rem['errors']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        ch.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
