"""Bounded requests (issue 15), on a real server on loopback over the real tiny stores: every
per-request knob refused beyond its cap with the right status and the field named (2^31 never
reaches FAISS), answers too big for one message refused before any work with a pointer to
SearchStream, streams on threads of their own (silent streams leave health checks and Search
alone), idle and too-old streams ended, a stop that a silent stream does not hold, SIGTERM of
`retromem serve` within its grace period, and the metrics endpoint on loopback."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from retromem.service.client import RetrievalClient, ServiceCallError
from retromem.service.config import ServerConfig, ServiceLimits
from retromem.service.server import is_loopback, start_server
from retromem.service.servicer import Backend
from retromem.service.v1 import retrieval_pb2 as pb

FETCH_ALL = pb.Fetch(text=True, tokens=True, continuation=True)


@pytest.fixture(scope="module")
def hnsw(union, tmp_path_factory):
    """An HNSW index over the union's embeddings: the index type where ef_search reaches FAISS."""
    from retromem.index.dense_build import DenseBuildConfig, build_dense

    out = tmp_path_factory.mktemp("hnsw") / "dense"
    build_dense(DenseBuildConfig(embeddings=str(union.dense.parent / "emb"), out=str(out), factory="HNSW8", tune=False),
                progress=False)
    return out


@pytest.fixture(scope="module")
def backend(union, hnsw) -> Backend:
    return Backend.open(ServerConfig(datastore=str(union.datastore), dense=str(hnsw), ngram=str(union.ngram)))


LIMITS = ServiceLimits(max_batch=8, max_k=50, max_nprobe=8, max_ef_search=64, max_exclude_doc_ids=2, max_diff_tokens=10,
                       max_chunks=4096, max_message_bytes=256 * 1024)


@pytest.fixture(scope="module")
def server(union, hnsw, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), dense=str(hnsw), ngram=str(union.ngram), port=0,
                                        workers=2, limits=LIMITS), backend)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.target, timeout=20, retries=0) as c:
        yield c


def refused(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ServiceCallError) as e:
        fn()
    return e.value.code, e.value.details


def vectors(backend, n: int) -> np.ndarray:
    return backend.dense.embedder.encode([f"python topic number {i}" for i in range(n)])


def search_req(x: np.ndarray, k: int, **kw) -> pb.SearchRequest:
    return pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v)) for v in x], k=k, **kw)


def batches(server) -> float:
    """FAISS searches the server has run (the dense batcher's histogram count)."""
    line = next(ln for ln in server.metrics.text().splitlines() if ln.startswith("retromem_dense_batch_queries_count"))
    return float(line.split()[1])


# -- every knob capped ----------------------------------------------------------------------


def test_info_shows_every_limit(client):
    lim = client.info().limits
    assert (lim.max_nprobe, lim.max_ef_search, lim.max_exclude_doc_ids, lim.max_diff_tokens) == (8, 64, 2, 10)
    assert lim.max_streams == 4 and lim.stream_idle_s == 30.0 and lim.stream_max_s == 3600.0
    assert lim.max_message_bytes == 256 * 1024 and lim.max_batch == 8 and lim.max_k == 50


def test_each_cap_refused_naming_the_field_and_the_limit(client, backend):
    x = vectors(backend, 1)
    V = backend.ngram.vocab_size
    OOR, INV = grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (lambda: client.raw("Search", search_req(x, 5, ef_search=65)), OOR, "`ef_search` is 65", "max_ef_search"),
        (lambda: client.raw("Search", search_req(x, 5, ef_search=2**31)), OOR, "`ef_search` is 2,147,483,648", "1..64"),
        (lambda: client.raw("Search", search_req(x, 5, ef_search=2**32 - 1)), OOR, "`ef_search`", "max_ef_search"),
        (lambda: client.raw("Search", search_req(x, 5, nprobe=2**31)), OOR, "`nprobe` is 2,147,483,648", "max_nprobe"),
        (lambda: client.search(x, 5, exclude_doc_ids=[[0, 1, 2]]), INV, "queries[0].exclude_doc_ids` has 3 ids",
         "max_exclude_doc_ids=2"),
        (lambda: client.raw("SearchDocuments", pb.SearchDocumentsRequest(
            clauses=[pb.Clause(terms=[pb.NgramQuery(text=b" the")])], max_diff_tokens=11)), OOR, "`max_diff_tokens` is 11",
         "max_diff_tokens"),
        (lambda: client.raw("SearchDocuments", pb.SearchDocumentsRequest(
            clauses=[pb.Clause(terms=[pb.NgramQuery(text=b" the")])], max_diff_tokens=2**31)), OOR, "`max_diff_tokens`",
         "1..10"),
        (lambda: client.raw("NextTokenDistribution", pb.NgramRequest(query=pb.NgramQuery(text=b" the"), top_k=V + 1)),
         OOR, f"`top_k` is {V + 1:,}", "vocabulary"),
        (lambda: client.raw("Find", pb.FindRequest(query=pb.NgramQuery(text=b" the"), limit=2**31)), OOR, "`limit`",
         "max_find_limit"),
    ]
    for fn, code, field, limit in cases:
        got, details = refused(fn)
        assert got == code and field in details and limit in details, (field, got, details)
    # SearchStream: the same cap, the request named
    stream = client.stub.SearchStream(iter([search_req(x, 5), search_req(x, 5, ef_search=2**31)]), timeout=20)
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == OOR and "`requests[1].ef_search`" in e.value.details()
    # at the caps: served, and as in process
    got = client.search(x, 5, ef_search=64, nprobe=8, exclude_doc_ids=[[0, 1]])
    want = backend.dense.search(x, 5, ef_search=64, nprobe=8, exclude_doc_ids=[[0, 1]])
    np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)


# -- answers too big for one message ----------------------------------------------------------


def test_oversize_search_refused_before_any_work_and_streamed_instead(client, server, backend):
    x = vectors(backend, 8)
    before = batches(server)
    got, details = refused(lambda: client.raw("Search", search_req(x, 50, fetch=FETCH_ALL)))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "SearchStream" in details and "max_message_bytes=262,144" in details and "8 queries x 50 hits" in details
    assert batches(server) == before  # refused before FAISS ran
    # the same request over SearchStream: sliced, and the answer of the library
    want = backend.dense.search(x, 50)
    msgs = list(client.stub.SearchStream(iter([search_req(x, 50, fetch=FETCH_ALL)]), timeout=20))
    assert len(msgs) > 1 and all(m.ByteSize() < 256 * 1024 for m in msgs)
    ids = np.array([list(r.chunk_ids) for m in msgs for r in m.results])
    np.testing.assert_array_equal(ids, want.chunk_ids)
    assert all(len(r.chunks) == 50 for m in msgs for r in m.results)
    # the Python client takes the refusal as its cue to stream
    res = client.search(x, 50, fetch=True)
    np.testing.assert_array_equal(res.chunk_ids, want.chunk_ids)
    assert all(len(p) == 50 and p[0].text for p in res.payloads)
    # what fits is served
    assert client.search(x, 50).chunk_ids.shape == (8, 50)


def test_oversize_chunks_and_find_refused(union, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), ngram=str(union.ngram), port=0,
                                        limits=ServiceLimits(max_message_bytes=64 * 1024)),
                           Backend(backend.datastore, None, backend.ngram))
    try:
        with RetrievalClient(running.target, retries=0) as c:
            n = backend.datastore.num_chunks
            got, details = refused(lambda: c.get_chunks(list(range(n))))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and f"{n:,} chunks" in details and "fewer chunks" in details
            assert len(c.get_chunks(list(range(n)), fetch=False)) == n  # ids only: fits
            got, details = refused(lambda: c.raw("Find", pb.FindRequest(query=pb.NgramQuery(text=b" the"), limit=1000,
                                                                       fetch=FETCH_ALL)))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and "`limit`" in details
            assert c.find(" the", 1000).count > 0
    finally:
        running.stop(0)


# -- streams ----------------------------------------------------------------------------------


def silent_stream(c: RetrievalClient, gate: threading.Event, first: pb.SearchRequest | None = None):
    """A SearchStream whose client sends ``first`` (if given), then nothing until ``gate`` opens."""
    def requests():
        if first is not None:
            yield first
        gate.wait(30)

    return c.stub.SearchStream(requests(), timeout=30)


def wait_for(cond, seconds: float = 10) -> bool:
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.01)
    return cond()


def test_silent_streams_leave_health_and_search_alone(union, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), dense=str(union.dense), port=0, workers=1,
                                        max_streams=2, max_queue=0), Backend(backend.datastore, backend.dense, None))
    gate = threading.Event()
    try:
        with RetrievalClient(running.target, retries=0) as c:
            streams = [silent_stream(c, gate) for _ in range(2)]
            assert wait_for(lambda: running.streams.open_streams == 2)
            assert c.health(timeout=2) == "SERVING"
            assert c.search(["a file"], 3, timeout=2).chunk_ids.shape == (1, 3)
            third = silent_stream(c, gate)
            with pytest.raises(grpc.RpcError) as e:
                next(third)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in e.value.details()
            gate.set()
            assert all(list(s) == [] for s in streams)
            assert wait_for(lambda: running.streams.open_streams == 0)
    finally:
        gate.set()
        running.stop(0)


def test_idle_and_old_streams_are_ended(union, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), dense=str(union.dense), port=0,
                                        stream_idle_s=0.3, stream_max_s=1.5), Backend(backend.datastore, backend.dense, None))
    x = vectors(backend, 1)
    gate = threading.Event()
    try:
        with RetrievalClient(running.target, retries=0) as c:
            # silent from the start, and silent after one answered request
            for first in (None, search_req(x, 3)):
                stream = silent_stream(c, gate, first)
                got = []
                with pytest.raises(grpc.RpcError) as e:
                    for m in stream:
                        got.append(m)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle" in e.value.details()
                assert len(got) == (first is not None) and not gate.is_set()

            def chatty():  # never idle, but open longer than stream_max_s
                for _ in range(200):
                    yield search_req(x, 3)
                    time.sleep(0.05)

            with pytest.raises(grpc.RpcError) as e:
                list(c.stub.SearchStream(chatty(), timeout=30))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-max" in e.value.details()
            assert 'retromem_stream_ended_total{method="SearchStream",reason="timeout"} 3.0' in running.metrics.text()
            assert c.search(x, 3).chunk_ids.shape == (1, 3)
            assert wait_for(lambda: running.streams.open_streams == 0)
    finally:
        gate.set()
        running.stop(0)


def test_reflection_and_health_watch_streams_are_bounded_too(union, backend):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2_grpc

    running = start_server(ServerConfig(datastore=str(union.datastore), port=0, stream_idle_s=0.3, stream_max_s=1.0),
                           Backend(backend.datastore, None, None))
    gate = threading.Event()
    try:
        with grpc.insecure_channel(running.target) as ch:
            def nothing():
                gate.wait(30)
                return
                yield

            with pytest.raises(grpc.RpcError) as e:  # a silent reflection stream: ended when idle
                list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(nothing(), timeout=30))
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "--stream-idle" in e.value.details()
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as e:  # a health watch: ended at the streams' lifetime
                list(watch)
            assert e.value.code() == grpc.StatusCode.CANCELLED
            assert wait_for(lambda: running.streams.open_streams == 0)
    finally:
        gate.set()
        running.stop(0)


def test_stop_cancels_a_silent_stream_when_the_grace_period_ends(union, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), dense=str(union.dense), port=0),
                           Backend(backend.datastore, backend.dense, None))
    gate = threading.Event()
    try:
        with RetrievalClient(running.target, retries=0) as c:
            stream = silent_stream(c, gate)
            assert wait_for(lambda: running.streams.open_streams == 1)
            t0 = time.monotonic()
            running.stop(0.5)
            stopped = time.monotonic() - t0
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert stopped < 0.5 + 1, stopped  # the stream did not hold the stop (stream_idle_s is 30 s)
            assert wait_for(lambda: running.streams.open_streams == 0)
    finally:
        gate.set()


def test_stop_does_not_wait_for_a_call_deaf_to_cancellation(union, backend):
    """A call still in the library when the grace period ends (here a count held at a gate) is
    cancelled by gRPC but runs on: the stop returns anyway, and says how many it left."""
    from tests.service.test_server import GatedNgram, _hold

    gated = GatedNgram(backend.ngram)
    running = start_server(ServerConfig(datastore=str(union.datastore), ngram=str(union.ngram), port=0, workers=1),
                           Backend(backend.datastore, None, gated))
    try:
        with RetrievalClient(running.target, retries=0) as c:
            (held,) = _hold(c, gated, 1)
            t0 = time.monotonic()
            running.stop(0.5)
            stopped = time.monotonic() - t0
            assert running.abandoned == 1 and stopped < 0.5 + 1, (running.abandoned, stopped)
            with pytest.raises(grpc.RpcError):
                held.result(10)
    finally:
        gated.gate.set()


@pytest.mark.slow
def test_sigterm_exits_within_the_grace_period(union):
    """`retromem serve --grace 2`, a silent stream open: SIGTERM ends the process within grace + 1 s."""
    grace = 2.0
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", "--datastore", str(union.datastore),
                             "--port", "0", "--workers", "1", "--grace", str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    gate = threading.Event()
    try:
        line = ""
        while not line.startswith("serving "):
            line = proc.stdout.readline()
            assert line, "retromem serve exited before serving"
        port = int(re.search(r":(\d+) \(", line).group(1))
        with RetrievalClient(f"127.0.0.1:{port}", retries=0) as c:
            stream = silent_stream(c, gate)
            assert c.get_chunks([0])[0].chunk_id == 0
            time.sleep(0.3)  # the stream is open and waiting
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - t0
            with pytest.raises(grpc.RpcError):
                list(stream)
        assert rc == 0 and took < grace + 1, (rc, took, proc.stdout.read())
    finally:
        gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- metrics endpoint and plaintext tokens -----------------------------------------------------


def test_metrics_endpoint_on_loopback_by_default(union, backend):
    cfg = ServerConfig(datastore=str(union.datastore), host="0.0.0.0", port=0, metrics_port=0)
    assert cfg.metrics_host == "127.0.0.1"
    running = start_server(cfg, Backend(backend.datastore, None, None))
    try:
        assert running._http.server_address[0] == "127.0.0.1"
    finally:
        running.stop(0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")


def test_token_over_plaintext_on_an_open_address_warns(union, backend, caplog):
    caplog.set_level(logging.WARNING, logger="retromem.service.server")
    for host, warns in (("127.0.0.1", False), ("0.0.0.0", True)):
        caplog.clear()
        running = start_server(ServerConfig(datastore=str(union.datastore), host=host, port=0, token="s3cret"),
                               Backend(backend.datastore, None, None))
        running.stop(0)
        assert any("plaintext" in r.getMessage() for r in caplog.records) == warns, host


def test_stream_limits_are_checked():
    from retromem.errors import ConfigError

    with pytest.raises(ConfigError, match="--max-ef-search"):
        ServiceLimits(max_ef_search=2**31)
    with pytest.raises(ConfigError, match="--stream-idle"):
        ServerConfig(datastore="x", stream_idle_s=0)
    with pytest.raises(ConfigError, match="--max-streams"):
        ServerConfig(datastore="x", max_streams=0)
    assert ServerConfig(datastore="x", workers=3, max_streams=2, max_queue=5).max_concurrent_rpcs == 10
