"""What a one-vector dense search costs with warm caches and with cold ones, layer by layer.

A load test measures a server whose caches the gRPC machinery, the client and the search itself
keep evicting; a loop over the same call measures warm caches. This script times one-vector
searches of real queries (chunk texts of the datastore, embedded) both ways, in one process, CPU
time of the calling thread:

- ``faiss``: the FAISS index's own ``search`` (one shard, the parameters built once);
- ``knn``: :meth:`DenseIndex.knn` (what the server's lone-request path calls);
- ``handler``: the server's ``Search`` handler called directly on a parsed request (checks, the
  search, the answer; no gRPC);
- ``info``: the ``Info`` handler, the floor.

"cold" evicts the caches before every call by reading a buffer larger than the last-level cache
(``--flush-mib``); "warm" runs the calls back to back. It also gives the bytes of inverted lists a
query scans at each nprobe (IVF indexes), read from the index's own list sizes.

    python benchmarks/search_cache.py --demo retromem-demo --nprobe 1,4,16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


class _Context:
    """The part of a gRPC servicer context the handlers read."""

    def time_remaining(self):
        return None

    def is_active(self):
        return True

    def abort(self, code, details):
        raise RuntimeError(f"{code}: {details}")


def scanned_bytes(index, queries: np.ndarray, nprobe: int) -> float:
    """Mean bytes of codes + ids in the lists a query probes (IVF), else nan."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return float("nan")
    sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)])
    _, lists = ivf.quantizer.search(queries, nprobe)
    return float(sizes[lists].sum(axis=1).mean() * (ivf.code_size + 8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="retromem-demo", help="directory `retromem demo` wrote")
    ap.add_argument("--datastore"), ap.add_argument("--dense")
    ap.add_argument("--nprobe", default="", help="comma-separated nprobe values (default: the index's tuned one)")
    ap.add_argument("--calls", type=int, default=1000, help="calls per cell")
    ap.add_argument("--flush-mib", type=int, default=64, help="bytes read between cold calls")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    demo = Path(args.demo)
    from retromem.service.config import ServerConfig
    from retromem.service.servicer import Backend, RetrievalServicer
    from retromem.service.v1 import retrieval_pb2 as pb

    cfg = ServerConfig(datastore=args.datastore or str(demo / "datastore"), dense=args.dense or str(demo / "dense-index"))
    backend = Backend.open(cfg)
    servicer = RetrievalServicer(cfg, backend)
    dense, ds = backend.dense, backend.datastore
    rng = np.random.default_rng(0)
    texts = [t for t in ds.chunk_texts(rng.integers(0, ds.num_chunks, 300)) if t.strip()][:256]
    vecs = dense.embedder.encode(texts).astype(np.float32)
    index = dense._indexes[0]
    tuned = dense.defaults.get("nprobe")
    nprobes = [int(x) for x in args.nprobe.split(",") if x] or [tuned]
    junk = np.ones((args.flush_mib << 20) // 8, np.uint64)
    lines = junk[::8]  # one word per 64-byte cache line: reading it brings every line in
    ctx = _Context()

    def timed(call, cold: bool) -> float:
        total = 0.0
        for i in range(args.calls):
            if cold:
                lines.sum()
            t = time.thread_time()
            call(i % len(vecs))
            total += time.thread_time() - t
        return total / args.calls * 1e6

    print(f"{dense.factory} over {dense.ntotal:,} vectors; {len(vecs)} real queries; {args.calls} calls a cell; "
          f"cold = {args.flush_mib} MiB read before each call; CPU us per call (thread time)", flush=True)
    print(f"{'nprobe':>6} {'KB scanned':>10}  {'layer':<8} {'warm':>8} {'cold':>8} {'cold/warm':>9}")
    rows = []
    for nprobe in nprobes:
        params = dense._params(0, nprobe, None, None) if nprobe else None
        reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v))], k=10, nprobe=nprobe or 0) for v in vecs]
        reqs = [pb.SearchRequest.FromString(r.SerializeToString()) for r in reqs]  # as the server holds them
        layers = {
            "faiss": lambda i: index.search(vecs[i:i + 1], 10, params=params),
            "knn": lambda i: dense.knn(vecs[i:i + 1], 10, nprobe=nprobe),
            "handler": lambda i: servicer.Search(reqs[i], ctx),
            "info": lambda i: servicer.Info(pb.InfoRequest(), ctx),
        }
        kb = scanned_bytes(index, vecs, nprobe) / 1024 if nprobe else float("nan")
        for name, call in layers.items():
            warm, cold = [], []
            for _ in range(args.rounds):
                warm.append(timed(call, False))
                cold.append(timed(call, True))
            w, c = float(np.median(warm)), float(np.median(cold))
            rows.append({"nprobe": nprobe, "kb_scanned": kb, "layer": name, "warm_us": w, "cold_us": c,
                         "warm_runs": warm, "cold_runs": cold})
            print(f"{nprobe!s:>6} {kb:>10.0f}  {name:<8} {w:>8.1f} {c:>8.1f} {c / w:>8.2f}x", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
