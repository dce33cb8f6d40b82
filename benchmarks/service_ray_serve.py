"""The service on Ray Serve against `retromem serve`: the same shard, the same calls, the same run.

Starts two servers over one shard (a datastore with its dense and n-gram index; default: what
`retromem demo` built): `retromem serve` (one process answering in process) and `retromem serve
--engine ray` (a local Ray; the gRPC front, the fan-out deployment and the shard's replicas, each
its own process), both as child processes. Then, in rounds that alternate between the two, a
closed-loop load of C client threads (each sending its next request as soon as the last one
returned) measures QPS and p50/p99 latency per workload and concurrency. Prints each cell and the
Serve / direct ratios (QPS, p50, p99) with their range over the rounds.

Workloads: n-gram Count (2-4 token ids of the datastore), dense Search of one vector (k=10),
GetChunks of 8 ids with text, tokens and continuation; Info (on Serve answered by the fan-out
itself: one Ray hop, where the others take two).

    python benchmarks/service_ray_serve.py --demo retromem-demo --seconds 5 --rounds 3 --concurrency 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from service_load import closed_loop  # noqa: E402  (the same closed loop as the service load test)


def start(cmd: list[str], log: Path, timeout: float = 600.0) -> tuple[subprocess.Popen, str]:
    """Run a `retromem serve` command; its target once it prints "serving ... on host:port". Its
    output goes on to ``log`` (drained by a thread: a chatty child would block on a full pipe)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    f = log.open("w")

    def drain() -> None:
        for line in proc.stdout:
            f.write(line)
            f.flush()

    t0 = time.monotonic()
    for line in proc.stdout:
        f.write(line)
        if line.startswith("serving"):
            threading.Thread(target=drain, daemon=True).start()
            return proc, "127.0.0.1:" + line.split(" on ")[1].split()[0].rsplit(":", 1)[1]
        if time.monotonic() - t0 > timeout:
            break
    proc.kill()
    raise SystemExit(f"`retromem serve {' '.join(cmd)}` did not start; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="retromem-demo", help="directory `retromem demo` wrote")
    ap.add_argument("--datastore"), ap.add_argument("--dense"), ap.add_argument("--ngram")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (Serve, direct) per cell")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--workers", type=int, default=8, help="worker threads of each gRPC server")
    ap.add_argument("--replicas", type=int, default=1, help="replicas of the shard on Serve")
    ap.add_argument("--in-front", action="store_true", help="the router in the front's process (fanout.in_front): "
                    "one Ray hop per call instead of two")
    ap.add_argument("--only", default="count,dense1,chunks")
    ap.add_argument("--logs", default=None, help="directory for the servers' output (default: a temporary one)")
    ap.add_argument("--json", dest="json_out", help="also write the figures here")
    args = ap.parse_args()
    demo = Path(args.demo)
    paths = {k: str(Path(getattr(args, k) or demo / d).resolve())
             for k, d in (("datastore", "datastore"), ("dense", "dense-index"), ("ngram", "ngram"))}

    import grpc

    from retromem.datastore import Datastore
    from retromem.service.v1 import retrieval_pb2 as pb
    from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

    ds = Datastore.open(paths["datastore"])
    rng = np.random.default_rng(0)
    toks, lens = ds.tokens(rng.integers(0, ds.num_chunks, 512))
    count_reqs = []
    for row, n in zip(toks, lens):
        m = int(rng.integers(2, 5))
        s = int(rng.integers(0, max(1, n - m)))
        count_reqs.append(pb.NgramRequest(query=pb.NgramQuery(ids=pb.TokenIds(ids=[int(t) for t in row[s:s + m]]))))
    fetch_all = pb.Fetch(text=True, tokens=True, continuation=True)
    chunk_reqs = [pb.GetChunksRequest(chunk_ids=rng.integers(0, ds.num_chunks, 8).tolist(), fetch=fetch_all)
                  for _ in range(512)]

    logs = Path(args.logs or tempfile.mkdtemp(prefix="ray_serve_bench_"))
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--port", "0", "--workers", str(args.workers), "--max-queue", "256", "--torch-threads", "1"]
    t0 = time.perf_counter()
    direct, direct_target = start(["--datastore", paths["datastore"], "--dense", paths["dense"], "--ngram", paths["ngram"],
                                   *common], logs / "direct.log")
    t_direct = time.perf_counter() - t0
    ch = grpc.insecure_channel(direct_target)
    info = pb_grpc.RetrievalStub(ch).Info(pb.InfoRequest(), timeout=30)
    ch.close()
    dep = logs / "deployment.yaml"
    dep.write_text(json.dumps({"shards": [{"name": "demo", **paths, "datastore_id": info.datastore.datastore_id,
                                           "first_doc": 0, "first_chunk": 0, "replicas": args.replicas,
                                           "num_cpus": 0}], "fanout": {"in_front": args.in_front}}))
    t0 = time.perf_counter()
    serve, serve_target = start(["--engine", "ray", "--deployment", str(dep), *common], logs / "ray.log")
    t_serve = time.perf_counter() - t0
    vecs = np.random.default_rng(1).standard_normal((256, info.dense.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    one_reqs = [pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v))], k=10) for v in vecs]
    # info: answered by the fan-out from its cache, one Ray hop fewer than the others (front -> fan-out -> shard)
    workloads = {"count": ("Count", count_reqs), "dense1": ("Search", one_reqs), "chunks": ("GetChunks", chunk_reqs),
                 "info": ("Info", [pb.InfoRequest()])}

    stubs = {}
    for name, target in (("serve", serve_target), ("direct", direct_target)):
        c = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        grpc.channel_ready_future(c).result(timeout=30)
        stubs[name] = (c, pb_grpc.RetrievalStub(c))
    print(f"shard {ds.num_chunks:,} chunks, dense {info.dense.factory} over {info.dense.ntotal:,}, n-gram "
          f"{info.ngram.num_tokens:,} tokens; Serve: {args.replicas} replica(s), fan-out "
          f"{'in the front' if args.in_front else 'deployment'}; {os.cpu_count()} cores; "
          f"{args.seconds:g}s per cell x {args.rounds} rounds; started in {t_direct:.1f}s (direct) and {t_serve:.1f}s "
          f"(Ray Serve, a new local Ray); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"{'workload':<8} {'C':>3}  {'direct p50/p99 ms':>18} {'QPS':>7}   {'Serve p50/p99 ms':>17} {'QPS':>7}   "
          f"{'QPS ratio':>17} {'p50 ratio':>17} {'p99 ratio':>17}  errors", flush=True)
    rows = []
    try:
        for w in [x for x in args.only.split(",") if x]:
            method, reqs = workloads[w]
            for conc in [int(c) for c in args.concurrency.split(",")]:
                cells = {"serve": [], "direct": []}
                for r in range(args.rounds):
                    for name in (("serve", "direct") if r % 2 == 0 else ("direct", "serve")):
                        call = getattr(stubs[name][1], method)
                        res = closed_loop(lambda q: call(q, timeout=30), lambda g: reqs[int(g.integers(len(reqs)))],
                                          conc, args.seconds, warmup=0.5)
                        res["loadavg"] = os.getloadavg()[0]
                        cells[name].append(res)
                ratio = {k: [s[k] / d[k] for s, d in zip(cells["serve"], cells["direct"])] for k in ("qps", "p50_ms", "p99_ms")}
                med = {n: {k: float(np.median([c[k] for c in cs])) for k in ("qps", "p50_ms", "p99_ms")}
                       for n, cs in cells.items()}
                errors = sum(c["errors"] for cs in cells.values() for c in cs)
                rows.append({"workload": w, "concurrency": conc, "cells": cells, "median": med, "ratios": ratio,
                             "errors": errors})
                rs = "  ".join(f"{np.median(v):>5.2f} [{min(v):.2f}, {max(v):.2f}]" for v in ratio.values())
                print(f"{w:<8} {conc:>3}  {med['direct']['p50_ms']:>8.2f} / {med['direct']['p99_ms']:>7.2f} "
                      f"{med['direct']['qps']:>7,.0f}   {med['serve']['p50_ms']:>7.2f} / {med['serve']['p99_ms']:>7.2f} "
                      f"{med['serve']['qps']:>7,.0f}   {rs}  {errors}", flush=True)
    finally:
        for c, _ in stubs.values():
            c.close()
        stop(serve)
        stop(direct)
    print(f"ratios are Serve / direct per round (median [min, max] over {args.rounds}); load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
