"""Autoscaling of a shard deployment on Ray Serve, exercised: replica counts over time under load.

Deploys one shard (a datastore and its n-gram index; default: what `retromem demo` built) with
``autoscaling: {min_replicas: 1, max_replicas: M, target_ongoing_requests: T, ...}`` on a new local
Ray, behind the gRPC front (the router in the front's process, so that the shard's handle sees every
call in flight), then runs three phases: idle, a closed-loop load of C client threads sending
n-gram calls through the front, idle again. Every ``--sample`` seconds it records the shard
deployment's replicas by state (RUNNING, STARTING, STOPPING) from ``serve.status()``, and the calls
answered and their median latency in that interval. Prints the time line and a summary: when the
first extra replica started and was running after the load began, the most replicas running, and
when the deployment was back at its minimum after the load ended.

    python benchmarks/ray_serve_autoscale.py --demo retromem-demo --max-replicas 3 --target 1 \\
        --concurrency 8 --load-seconds 60 --idle-seconds 45 --out autoscale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np


def replica_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return {}
    return {str(getattr(k, "value", k)): int(v) for k, v in st.deployments[deployment].replica_states.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="retromem-demo", help="directory `retromem demo` wrote")
    ap.add_argument("--datastore"), ap.add_argument("--ngram")
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--target", type=float, default=1.0, help="target_ongoing_requests per replica")
    ap.add_argument("--upscale-delay", type=float, default=5.0, help="upscale_delay_s (Serve's default: 30)")
    ap.add_argument("--downscale-delay", type=float, default=20.0, help="downscale_delay_s (Serve's default: 600)")
    ap.add_argument("--look-back", type=float, default=5.0, help="look_back_period_s (Serve's default: 30)")
    ap.add_argument("--concurrency", type=int, default=8, help="client threads during the load phase")
    ap.add_argument("--workload", choices=["count", "find"], default="find",
                    help="count: Count of 2-4 tokens; find: Find of one common token, 200 occurrences")
    ap.add_argument("--warm-seconds", type=float, default=10.0, help="idle before the load")
    ap.add_argument("--load-seconds", type=float, default=60.0)
    ap.add_argument("--idle-seconds", type=float, default=45.0, help="idle after the load")
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray (replicas reserve 0)")
    ap.add_argument("--out", default=None, help="write the time line and summary as JSON here")
    args = ap.parse_args()

    import ray
    from ray import serve

    from retromem.index.ngram import NgramIndex
    from retromem.service.client import RetrievalClient
    from retromem.service.ray_serve import parse_ray_deployment, start_ray_service
    from retromem.service.v1 import retrieval_pb2 as pb

    demo = Path(args.demo)
    ds_path = Path(args.datastore or demo / "datastore").resolve()
    ng_path = Path(args.ngram or demo / "ngram").resolve()
    ngram = NgramIndex(ng_path)
    app = f"autoscale-{uuid.uuid4().hex[:6]}"
    auto = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target,
            "upscale_delay_s": args.upscale_delay, "downscale_delay_s": args.downscale_delay,
            "look_back_period_s": args.look_back}
    dep = parse_ray_deployment({"app": app, "fanout": {"in_front": True}, "shards": [
        {"name": "a", "datastore": str(ds_path), "ngram": str(ng_path), "datastore_id": ngram.datastore.datastore_id,
         "first_doc": 0, "first_chunk": 0, "num_cpus": 0, "max_ongoing_requests": 4, "autoscaling": auto}]})
    deployment = dep.shards[0].deployment
    # calls that do a little work in the replica: common tokens of the datastore (ids, no tokenizer)
    rng = np.random.default_rng(0)
    chunks = ngram.datastore.chunks(list(range(min(64, ngram.datastore.num_chunks))))
    toks = np.concatenate([np.asarray(c.tokens, dtype=np.int64) for c in chunks])

    def make() -> tuple[str, object]:
        i = int(rng.integers(0, len(toks) - 4))
        if args.workload == "count":
            n = int(rng.integers(2, 5))
            return "Count", pb.NgramRequest(query=pb.NgramQuery(ids=pb.TokenIds(ids=toks[i:i + n].tolist())))
        return "Find", pb.FindRequest(query=pb.NgramQuery(ids=pb.TokenIds(ids=[int(toks[i])])), limit=200)

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    t_start = time.perf_counter()
    svc = start_ray_service(dep, dep.server_config(port=0, workers=max(16, 2 * args.concurrency), shard_timeout_s=60),
                            health_check_period_s=5)
    print(f"deployed {app} in {time.perf_counter() - t_start:.1f}s: {deployment} autoscaling {auto}", flush=True)

    done: list[tuple[float, float]] = []  # (completion time, latency) of every answered call
    errors = [0]
    lock = threading.Lock()
    stop_load = threading.Event()

    def client() -> None:
        with RetrievalClient(svc.target, timeout=60, retries=2) as c:
            while not stop_load.is_set():
                method, req = make()
                t0 = time.perf_counter()
                try:
                    c.raw(method, req)
                except Exception:
                    with lock:
                        errors[0] += 1
                    continue
                t1 = time.perf_counter()
                with lock:
                    done.append((t1, t1 - t0))

    timeline = []
    t0 = time.perf_counter()
    phases = [("warm", args.warm_seconds), ("load", args.load_seconds), ("idle", args.idle_seconds)]
    threads: list[threading.Thread] = []
    last = t0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for phase, seconds in phases:
        if phase == "load":
            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
        phase_start = time.perf_counter()
        if phase == "idle":
            stop_load.set()
            for t in threads:
                t.join(120)
        while time.perf_counter() - phase_start < seconds:
            time.sleep(max(0.0, args.sample - (time.perf_counter() - last)))
            now = time.perf_counter()
            with lock:
                window = [lat for (tc, lat) in done if last <= tc < now]
            states = replica_states(app, deployment)
            row = {"t": round(now - t0, 2), "phase": phase, "running": states.get("RUNNING", 0),
                   "starting": states.get("STARTING", 0), "stopping": states.get("STOPPING", 0),
                   "qps": round(len(window) / (now - last), 1),
                   "p50_ms": round(float(np.median(window)) * 1e3, 2) if window else None}
            timeline.append(row)
            print(f"t={row['t']:7.1f}s  {phase:<5} replicas running {row['running']} starting {row['starting']} "
                  f"stopping {row['stopping']}   {row['qps']:7.1f} calls/s  p50 {row['p50_ms']} ms", flush=True)
            last = now
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    load_start = args.warm_seconds
    load_end = args.warm_seconds + args.load_seconds
    first_start = next((r["t"] - load_start for r in timeline if r["phase"] == "load" and r["starting"] + r["running"] > 1), None)
    first_run = next((r["t"] - load_start for r in timeline if r["phase"] == "load" and r["running"] > 1), None)
    most = max(r["running"] for r in timeline)
    at_most = next((r["t"] - load_start for r in timeline if r["running"] == most and r["phase"] != "warm"), None)
    back = next((r["t"] - load_end for r in timeline if r["phase"] == "idle" and r["running"] == 1
                 and r["starting"] == 0 and r["stopping"] == 0), None)
    load_rows = [r for r in timeline if r["phase"] == "load"]
    by_replicas = {}  # steady samples only: a replica starting takes CPU from the ones that answer
    for r in load_rows:
        if r["starting"] == 0 and r["stopping"] == 0:
            by_replicas.setdefault(r["running"], []).append(r["qps"])
    summary = {
        "app": app, "autoscaling": auto, "concurrency": args.concurrency, "workload": args.workload,
        "errors": errors[0], "calls": len(done),
        "first_extra_replica_starting_s_after_load": first_start, "first_extra_replica_running_s_after_load": first_run,
        "most_replicas_running": most, "most_reached_s_after_load": at_most,
        "back_to_min_s_after_load_end": back,
        "qps_by_running_replicas": {k: {"samples": len(v), "median_qps": float(np.median(v)),
                                        "q25_q75": [float(np.percentile(v, 25)), float(np.percentile(v, 75))]}
                                    for k, v in sorted(by_replicas.items())},
        "qps_while_starting": [r["qps"] for r in load_rows if r["starting"]],
        "driver_cpu_s": round((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime), 1),
        "wall_s": round(time.perf_counter() - t0, 1), "loadavg": os.getloadavg(),
    }
    print(json.dumps(summary, indent=2), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "timeline": timeline}, indent=2))
    svc.stop(0)
    serve.shutdown()
    ray.shutdown()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
