"""Bounded requests (issue 15): what a loopback `retromem serve` does with requests that ask for too
much, measured from outside the server process.

Builds (once, cached under ``--work``) a datastore of the demo corpus (GPT-2 tokens, about 3,400
chunks of 64 tokens), its embeddings (the offline all-MiniLM-L6-v2) and an HNSW32 index (so that
``ef_search`` means something), then starts `retromem serve` as its own process (2 workers, 1
FAISS and 1 torch thread, ``--grace 5``) and measures, each on a fresh server:

1. ``ef_search``: one Search (1 vector, k=10) with ef_search = 1e8 and with 2^31: status, seconds,
   and the server's peak resident memory during the call (VmHWM after resetting it) above its
   resident memory before;
2. fetch everything: one Search of 1,024 random vectors, k=1000, text, tokens and continuation
   (a 1.6 MB request): status, seconds, peak memory; and (``fetchstream``, not run by default) the
   same request over SearchStream: seconds to the first and the last message, peak memory;
3. two SearchStreams that never send a message, then a health check and a one-vector Search,
   each with a 2 s deadline: status and seconds; and, where the server ends silent streams, when
   and how the first silent stream ended;
4. SIGTERM during a silent stream (``--grace 5``), and 3 s into the fetch-everything request sent
   over SearchStream (a call deep in the library when the grace period ends): seconds from the
   signal to the exit of the process, and its exit status.

Run it against another checkout of retromem by putting that checkout first on PYTHONPATH (the
"before" column of BENCHMARKS.md was measured that way); ``--serve-args`` adds flags the newer
server knows (``--stream-idle 5`` shows silent streams ending within the run).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/service_bounds.py --work /tmp/bounds --label after \
        --serve-args "--stream-idle 5"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def build(work: Path) -> tuple[Path, Path]:
    """The demo corpus as a datastore with an HNSW32 index over its chunks (cached in ``work``)."""
    from retromem.assets import demo_corpus
    from retromem.datastore import BuildConfig, build as build_ds
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    ds, dense = work / "ds", work / "dense"
    if (dense / "index.json").is_file():
        return ds, dense
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_ds(BuildConfig(inputs=(str(demo_corpus()),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(work / "emb"), batch_size=64), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(dense), factory="HNSW32", tune=False), progress=False)
    print(f"built {ds} and {dense} in {time.perf_counter() - t0:.0f}s", flush=True)
    return ds, dense


def _mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of ``pid``, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)


class Server:
    """`retromem serve` in its own process; ``target`` once it said it is serving."""

    def __init__(self, ds: Path, dense: Path, extra: list[str]) -> None:
        cmd = [sys.executable, "-m", "retromem.cli", "serve", "--datastore", str(ds), "--dense", str(dense), "--port", "0",
               "--workers", "2", "--faiss-threads", "1", "--torch-threads", "1", "--grace", "5", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=os.environ | {"OMP_NUM_THREADS": "1"})
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("serving "):
                    self.target = line.split(" on ", 1)[1].split()[0]
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300):
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.lines[-20:]))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _call(fn) -> tuple[str, float, str]:
    import grpc

    t0 = time.perf_counter()
    try:
        fn()
        return "OK", time.perf_counter() - t0, ""
    except grpc.RpcError as exc:
        return exc.code().name, time.perf_counter() - t0, (exc.details() or "")[:160]


def _vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _stub(target: str):
    import grpc

    from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 2**31 - 1),
                                                ("grpc.max_send_message_length", 2**31 - 1)])
    return ch, pb_grpc.RetrievalStub(ch)


def _search(x: np.ndarray, k: int, **kw):
    from retromem.service.v1 import retrieval_pb2 as pb

    return pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v)) for v in x], k=k, **kw)


def case_ef_search(srv: Server) -> list[dict]:
    ch, stub = _stub(srv.target)
    out = []
    for ef in (10**8, 2**31):
        before = _mem(srv.proc.pid)["VmRSS"]
        _reset_peak(srv.proc.pid)
        code, s, msg = _call(lambda: stub.Search(_search(_vectors(1, 384), 10, ef_search=ef), timeout=300))
        m = _mem(srv.proc.pid)
        out.append({"case": f"ef_search={ef}", "status": code, "seconds": round(s, 3), "rss_before_mb": before >> 20,
                    "peak_mb": m["VmHWM"] >> 20, "message": msg})
    ok = _call(lambda: stub.Search(_search(_vectors(1, 384), 10), timeout=30))
    out.append({"case": "then a plain Search", "status": ok[0], "seconds": round(ok[1], 3)})
    ch.close()
    return out


def case_fetch_everything(srv: Server, k: int = 1000) -> list[dict]:
    """``k``: below 1000 for a store of fewer chunks (benchmarks/reliability.py)."""
    from retromem.service.v1 import retrieval_pb2 as pb

    ch, stub = _stub(srv.target)
    req = _search(_vectors(1024, 384, seed=1), k, fetch=pb.Fetch(text=True, tokens=True, continuation=True))
    before = _mem(srv.proc.pid)["VmRSS"]
    _reset_peak(srv.proc.pid)
    code, s, msg = _call(lambda: stub.Search(req, timeout=600))
    m = _mem(srv.proc.pid)
    ok = _call(lambda: stub.Search(_search(_vectors(1, 384), 10), timeout=30))
    ch.close()
    return [{"case": f"Search 1024 x k={k}, fetch all ({req.ByteSize() / 1e6:.1f} MB request)", "status": code,
             "seconds": round(s, 3), "rss_before_mb": before >> 20, "peak_mb": m["VmHWM"] >> 20, "message": msg},
            {"case": "then a plain Search", "status": ok[0], "seconds": round(ok[1], 3)}]


def case_fetch_everything_streamed(srv: Server) -> list[dict]:
    from retromem.service.v1 import retrieval_pb2 as pb

    ch, stub = _stub(srv.target)
    req = _search(_vectors(1024, 384, seed=1), 1000, fetch=pb.Fetch(text=True, tokens=True, continuation=True))
    before = _mem(srv.proc.pid)["VmRSS"]
    _reset_peak(srv.proc.pid)
    t0 = time.perf_counter()
    first, n, hits = None, 0, 0

    def run() -> None:
        nonlocal first, n, hits
        for m in stub.SearchStream(iter([req]), timeout=1200):
            first = first or time.perf_counter() - t0
            n += 1
            hits += sum(len(r.chunk_ids) for r in m.results)

    code, s, msg = _call(run)
    m = _mem(srv.proc.pid)
    ch.close()
    return [{"case": "the same over SearchStream", "status": code, "seconds": round(s, 3),
             "first_message_s": round(first or 0, 3), "messages": n, "hits": hits, "rss_before_mb": before >> 20,
             "peak_mb": m["VmHWM"] >> 20, "message": msg}]


def _silent_stream(stub, gate: threading.Event, ended: dict, name: str):
    def nothing():
        gate.wait()
        return
        yield

    call = stub.SearchStream(nothing(), timeout=600)
    t0 = time.perf_counter()

    def drain() -> None:
        code, _, msg = _call(lambda: list(call))
        ended[name] = {"status": code, "after_s": round(time.perf_counter() - t0, 2), "message": msg}

    threading.Thread(target=drain, daemon=True).start()
    return call


def case_silent_streams(srv: Server) -> list[dict]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch, stub = _stub(srv.target)
    gate, ended = threading.Event(), {}
    calls = [_silent_stream(stub, gate, ended, f"stream {i}") for i in range(2)]
    time.sleep(1.0)  # both streams hold what they hold
    health = health_pb2_grpc.HealthStub(ch)
    out = []
    code, s, msg = _call(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=2))
    out.append({"case": "2 silent streams open: Health.Check (2 s deadline)", "status": code, "seconds": round(s, 3),
                "message": msg})
    code, s, msg = _call(lambda: stub.Search(_search(_vectors(1, 384), 10), timeout=2))
    out.append({"case": "2 silent streams open: Search (2 s deadline)", "status": code, "seconds": round(s, 3),
                "message": msg})
    deadline = time.time() + 20
    while len(ended) < 2 and time.time() < deadline:
        time.sleep(0.1)
    for name in sorted(ended):
        out.append({"case": f"{name} (never sends)", **ended[name]})
    if len(ended) < 2:
        out.append({"case": "silent streams", "status": "still open after 20 s"})
    gate.set()
    for c in calls:
        c.cancel()
    ch.close()
    return out


def case_sigterm(srv: Server) -> list[dict]:
    ch, stub = _stub(srv.target)
    gate, ended = threading.Event(), {}
    _silent_stream(stub, gate, ended, "stream")
    time.sleep(1.0)
    t0 = time.perf_counter()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        rc = None
    s = time.perf_counter() - t0
    gate.set()
    ch.close()
    return [{"case": "SIGTERM during a silent stream, --grace 5", "status": f"exit {rc}" if rc is not None else
             "still running after 60 s", "seconds": round(s, 2)}]


def case_sigterm_busy(srv: Server, k: int = 1000) -> list[dict]:
    """SIGTERM while the server is deep in a long call: the fetch-everything request over
    SearchStream (which takes minutes here), 3 s after it started. ``k``: as in case_fetch_everything."""
    from retromem.service.v1 import retrieval_pb2 as pb

    ch, stub = _stub(srv.target)
    req = _search(_vectors(1024, 384, seed=1), k, fetch=pb.Fetch(text=True, tokens=True, continuation=True))
    ended: dict = {}

    def run() -> None:
        ended["status"] = _call(lambda: list(stub.SearchStream(iter([req]), timeout=1200)))[0]

    threading.Thread(target=run, daemon=True).start()
    time.sleep(3.0)
    t0 = time.perf_counter()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(600)
    except subprocess.TimeoutExpired:
        rc = None
    s = time.perf_counter() - t0
    ch.close()
    return [{"case": "SIGTERM 3 s into the fetch-everything SearchStream, --grace 5",
             "status": f"exit {rc}" if rc is not None else "still running after 600 s", "seconds": round(s, 2),
             "last_line": srv.lines[-1] if srv.lines else ""}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the built datastore and index (reused).")
    ap.add_argument("--label", default="", help="Name of this run in the printed JSON (before/after).")
    ap.add_argument("--serve-args", default="", help="Extra flags for `retromem serve`.")
    ap.add_argument("--cases", default="ef,fetch,streams,sigterm,sigterm_busy",
                    help="Comma-separated, of ef, fetch, fetchstream (the fetch-everything Search over SearchStream: "
                         "minutes), streams, sigterm, sigterm_busy.")
    args = ap.parse_args()
    import retromem

    print(f"retromem from {Path(retromem.__file__).parent}", flush=True)
    ds, dense = build(args.work)
    extra = shlex.split(args.serve_args)
    cases = {"ef": case_ef_search, "fetch": case_fetch_everything, "fetchstream": case_fetch_everything_streamed,
             "streams": case_silent_streams, "sigterm": case_sigterm, "sigterm_busy": case_sigterm_busy}
    rows = []
    for name in args.cases.split(","):
        srv = Server(ds, dense, extra)
        try:
            for row in cases[name](srv):
                row = {"label": args.label, **row}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            srv.close()
    print(json.dumps({"label": args.label, "rows": len(rows)}))


if __name__ == "__main__":
    main()
