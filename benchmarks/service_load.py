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

With ``--rounds R`` every cell is measured R times, the workloads interleaved within each round
(so that a change in the machine's load hits them alike), and a summary gives each cell's median
and range over the rounds, and its QPS as a fraction of the ``info`` floor's measured next to it:
the geometric mean of the per-round ratios with a paired bootstrap 95% interval over the rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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


def closed_loop_raw(call, make, concurrency: int, seconds: float, warmup: float = 0.3,
                    start: float | None = None) -> tuple[list[float], int]:
    """C threads call ``call(make(rng))`` back to back for ``seconds``; latencies after warm-up, errors."""
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    start = time.perf_counter() if start is None else start
    t_begin, t_end = start + warmup, start + warmup + seconds

    def worker(w: int) -> None:
        rng = np.random.default_rng(w + 1000 * os.getpid())
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
    return [x for l in lat for x in l], int(sum(errors))


def summarize(lat: list[float], errors: int, seconds: float) -> dict:
    all_lat = np.asarray(lat)
    return {"n": int(len(all_lat)), "qps": len(all_lat) / seconds, "errors": errors,
            "p50_ms": float(np.percentile(all_lat, 50) * 1e3) if len(all_lat) else float("nan"),
            "p99_ms": float(np.percentile(all_lat, 99) * 1e3) if len(all_lat) else float("nan")}


def closed_loop(call, make, concurrency: int, seconds: float, warmup: float = 0.3) -> dict:
    return summarize(*closed_loop_raw(call, make, concurrency, seconds, warmup), seconds)


def _client_proc(target: str, method: str, req_type: str, reqs: list[bytes], timeout: float, threads: int,
                 seconds: float, warmup: float, ready, go, out) -> None:
    """One load-generating process: its own channel, ``threads`` closed-loop threads (see --client-procs)."""
    import grpc

    from retromem.service.v1 import retrieval_pb2 as pb
    from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(ch).result(timeout=30)
    call = getattr(pb_grpc.RetrievalStub(ch), method)
    parsed = [getattr(pb, req_type).FromString(b) for b in reqs]
    call(parsed[0], timeout=timeout)
    ready.put(1)
    start = go.get()
    cpu0 = time.process_time()
    lat, errors = closed_loop_raw(lambda q: call(q, timeout=timeout), lambda r: parsed[int(r.integers(len(parsed)))],
                                  threads, seconds, warmup, start=start)
    out.put((lat, errors, time.process_time() - cpu0))
    ch.close()


def remote_closed_loop(ctx, procs: int, target: str, method: str, reqs: list, timeout: float, concurrency: int,
                       seconds: float, warmup: float = 0.3) -> dict:
    """The closed loop over gRPC spread over ``procs`` client processes (C threads in all), so that
    the load generator's own GIL is not the bottleneck. Adds the client processes' CPU seconds."""
    procs = max(1, min(procs, concurrency))
    per = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
    ready, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    raw = [r.SerializeToString() for r in reqs]
    ps = [ctx.Process(target=_client_proc, args=(target, method, type(reqs[0]).__name__, raw, timeout, n, seconds,
                                                  warmup, ready, go, out), daemon=True) for n in per]
    for p in ps:
        p.start()
    for _ in ps:
        ready.get(timeout=120)
    start = time.perf_counter() + 0.05
    for _ in ps:
        go.put(start)
    lat, errors, cpu = [], 0, 0.0
    for _ in ps:
        l, e, c = out.get(timeout=seconds + warmup + 120)
        lat += l
        errors += e
        cpu += c
    for p in ps:
        p.join(30)
    res = summarize(lat, errors, seconds)
    res["client_cpu_s"] = cpu
    return res


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


def summary(rows: list[dict], only: list[str], conc: list[int]) -> None:
    """Each cell's median [min, max] over the rounds; QPS also as a fraction of the info floor's QPS
    at the same concurrency in the same round."""
    def spread(xs) -> str:
        xs = np.asarray(xs, dtype=float)
        return f"{np.median(xs):,.3g} [{xs.min():,.3g}, {xs.max():,.3g}]"

    from retromem.stats import paired_bootstrap

    cell = {(r["round"], r["workload"], r["concurrency"]): r for r in rows}
    rounds = sorted({r["round"] for r in rows})
    print(f"\nsummary over {len(rounds)} rounds: median [min, max]; / info: geometric mean [95% interval]")
    print(f"{'workload':<8} {'C':>3}  {'gRPC QPS':>26}  {'/ info QPS':>20}  {'gRPC p50 ms':>24}  {'gRPC p99 ms':>24}  "
          f"{'server CPU us/req':>24}")
    for w in only:
        for c in conc:
            rs = [cell[(i, w, c)]["grpc"] for i in rounds]
            ratio = "-"
            if "info" in only and w != "info":
                bs = paired_bootstrap(np.log([r["qps"] for r in rs]),
                                      np.log([cell[(i, "info", c)]["grpc"]["qps"] for i in rounds]))
                ratio = f"{np.exp(bs.mean):.2f} [{np.exp(bs.low):.2f}, {np.exp(bs.high):.2f}]"
            print(f"{w:<8} {c:>3}  {spread([r['qps'] for r in rs]):>26}  {ratio:>20}  "
                  f"{spread([r['p50_ms'] for r in rs]):>24}  {spread([r['p99_ms'] for r in rs]):>24}  "
                  f"{spread([r['server_cpu_us_per_req'] for r in rs]):>24}")


def start_server(args) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "retromem.cli", "serve", "--datastore", args.datastore, "--dense", args.dense,
           "--ngram", args.ngram, "--port", "0", "--workers", str(args.workers), "--max-queue", "256",
           "--torch-threads", "1", "--batch-wait-ms", str(args.batch_wait_ms)] + (["--faiss-threads", str(args.faiss_threads)] if args.faiss_threads else []) + args.server_arg
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
    ap.add_argument("--only", default="", help="comma-separated workloads (count,dense1,dense64,chunks; info: the "
                    "cheapest RPC, to see what the load generator can do)")
    ap.add_argument("--client-procs", type=int, default=0,
                    help="spread the gRPC load over this many client processes, each with its own channel "
                         "(0: client threads in this process sharing one channel)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra `retromem serve` argument (repeat)")
    ap.add_argument("--nprobe", type=int, default=0,
                    help="nprobe of every dense request, in process and over gRPC (0: the index's tuned value)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, interleaved")
    ap.add_argument("--no-local", action="store_true", help="skip the in-process measurement of each cell")
    ap.add_argument("--json", dest="json_out", help="also write the figures here")
    args = ap.parse_args()
    demo = Path(args.demo)
    args.datastore = args.datastore or str(demo / "datastore")
    args.dense = args.dense or str(demo / "dense-index")
    args.ngram = args.ngram or str(demo / "ngram")
    # the server runs from the repository root: relative paths must mean what they meant here
    args.datastore, args.dense, args.ngram = (str(Path(p).resolve()) for p in (args.datastore, args.dense, args.ngram))

    import grpc
    import torch

    torch.set_num_threads(1)
    if args.faiss_threads:
        import faiss

        faiss.omp_set_num_threads(args.faiss_threads)
    from retromem.index.types import fetch_payloads
    from retromem.service.config import ServerConfig
    from retromem.service.servicer import Backend
    from retromem.service.v1 import retrieval_pb2 as pb
    from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

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
    nprobe = args.nprobe or None
    one_reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v))], k=10, nprobe=args.nprobe) for v in vecs]
    batch_reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v)) for v in vecs[i:i + 64]], k=10,
                                   nprobe=args.nprobe) for i in range(0, 192, 8)]
    fetch_all = pb.Fetch(text=True, tokens=True, continuation=True)
    chunk_reqs = [pb.GetChunksRequest(chunk_ids=rng.integers(0, n_chunks, 8).tolist(), fetch=fetch_all)
                  for _ in range(512)]

    def pick(lst):
        return lambda r: lst[int(r.integers(len(lst)))]

    # workload -> (in-process call, its argument maker, RPC method, its requests, timeout)
    workloads = {
        "count": (lambda g: ng.count(g), pick(ngrams), "Count", count_reqs, 10),
        "dense1": (lambda v: dense.search(v[None], 10, nprobe=nprobe), pick(list(vecs)), "Search", one_reqs, 10),
        "dense64": (lambda i: dense.search(vecs[i:i + 64], 10, nprobe=nprobe), lambda r: int(r.integers(0, 24)) * 8, "Search",
                    batch_reqs, 30),
        "chunks": (lambda ids: fetch_payloads(ds, ids), lambda r: r.integers(0, n_chunks, 8), "GetChunks", chunk_reqs, 10),
        # the cheapest RPC there is (a cached message): what the server plus the load generator can do at best
        "info": (lambda _: None, lambda r: None, "Info", [pb.InfoRequest()], 10),
    }
    only = [w for w in args.only.split(",") if w] or ["count", "dense1", "dense64", "chunks"]
    conc = [int(c) for c in args.concurrency.split(",")]
    ctx = mp.get_context("spawn")
    rows = []
    gen = f"{args.client_procs} client processes" if args.client_procs else "client threads in this process, one channel"
    print(f"server {target}, {args.workers} worker threads; {os.cpu_count()} cores; {args.seconds:g}s per cell; "
          f"load generator: {gen}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"datastore {ds.num_chunks:,} chunks, dense {dense.factory} over {dense.ntotal:,}, n-gram {ng.num_tokens:,} tokens")
    print(f"{'workload':<8} {'C':>3}  {'in-process p50/p99 ms':>22} {'QPS':>8}   {'gRPC p50/p99 ms':>17} {'QPS':>8}  "
          f"{'overhead p50':>12}  {'server/client CPU us/req':>24}  errors")
    nan = {"p50_ms": float("nan"), "p99_ms": float("nan"), "qps": float("nan"), "errors": 0}
    cpu_start = proc_cpu(proc.pid)
    try:
        for rnd in range(args.rounds):
            # the workloads of one concurrency back to back: each is compared with the info floor next to it
            for c, w in [(c, w) for c in conc for w in only]:
                local_call, local_make, method, reqs, timeout = workloads[w]
                rpc_call = getattr(stub, method)
                loc = nan if args.no_local or w == "info" else closed_loop(local_call, local_make, c, args.seconds)
                cpu0 = proc_cpu(proc.pid)
                if args.client_procs:
                    rem = remote_closed_loop(ctx, args.client_procs, target, method, reqs, timeout, c, args.seconds)
                else:
                    c_cpu0 = time.process_time()
                    rem = closed_loop(lambda q: rpc_call(q, timeout=timeout), pick(reqs), c, args.seconds)
                    rem["client_cpu_s"] = time.process_time() - c_cpu0
                # the server's CPU over the cell (warm-up included; per request over all requests it answered)
                n_all = rem["n"] * (1 + 0.3 / args.seconds)
                rem["server_cpu_us_per_req"] = (proc_cpu(proc.pid) - cpu0) / max(n_all, 1) * 1e6
                rem["client_cpu_us_per_req"] = rem["client_cpu_s"] / max(n_all, 1) * 1e6
                q_unit = 64 if w == "dense64" else 1
                rows.append({"round": rnd, "workload": w, "concurrency": c, "in_process": loc, "grpc": rem,
                             "overhead_p50_ms": rem["p50_ms"] - loc["p50_ms"], "queries_per_request": q_unit,
                             "loadavg": os.getloadavg()[0]})
                print(f"{w:<8} {c:>3}  {loc['p50_ms']:>9.3f} / {loc['p99_ms']:>8.3f} {loc['qps']:>8,.0f}   "
                      f"{rem['p50_ms']:>7.3f} / {rem['p99_ms']:>7.3f} {rem['qps']:>8,.0f}  "
                      f"{rem['p50_ms'] - loc['p50_ms']:>+9.3f} ms  {rem['server_cpu_us_per_req']:>11,.0f} / "
                      f"{rem['client_cpu_us_per_req']:>10,.0f}  {loc['errors'] + rem['errors']}", flush=True)
    finally:
        server_cpu = proc_cpu(proc.pid) - cpu_start
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        ch.close()
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; server CPU over the cells "
          f"{server_cpu:.1f} s")
    if args.rounds > 1:
        summary(rows, only, conc)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
