"""A real server on loopback over a real datastore, dense index and n-gram index: every RPC
against the same call in process, every bad input's status code, health, reflection, auth, TLS,
the bounded queue, deadlines, a client that leaves mid-stream, metrics."""

from __future__ import annotations

import datetime
import threading
import time

import grpc
import numpy as np
import pytest

from retromem.service.client import RemoteQueryError, RetrievalClient, ServiceCallError
from retromem.service.config import ServerConfig, ServiceLimits
from retromem.service.server import start_server
from retromem.service.servicer import Backend
from retromem.service.v1 import retrieval_pb2 as pb

QUERIES = ["How do I read a file line by line?", "sort a list of dictionaries by a key", "porting extension modules"]


@pytest.fixture(scope="module")
def backend(union) -> Backend:
    return Backend.open(ServerConfig(datastore=str(union.datastore), dense=str(union.dense), ngram=str(union.ngram)))


@pytest.fixture(scope="module")
def server(union, backend):
    cfg = ServerConfig(datastore=str(union.datastore), dense=str(union.dense), ngram=str(union.ngram), port=0, workers=4,
                       limits=ServiceLimits(max_batch=8, max_k=50, max_query_bytes=2000, max_chunks=16, max_find_limit=100,
                                            max_message_bytes=256 * 1024))
    running = start_server(cfg, backend)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with RetrievalClient(server.target, timeout=20) as c:
        yield c


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(ServiceCallError) as e:
        fn()
    return e.value.code, e.value.details


# -- every RPC equals the library call ------------------------------------------------------


def test_info_names_datastore_indexes_and_limits(client, backend):
    info = client.info()
    ds = backend.datastore
    assert info.role == "server" and info.datastore.datastore_id == ds.datastore_id
    assert info.datastore.num_chunks == ds.num_chunks and info.datastore.tokenizer == "gpt2"
    assert info.dense.factory == "Flat" and info.dense.dim == 384 and info.dense.embedder == "all-minilm-l6-v2"
    assert info.ngram.num_tokens == backend.ngram.num_tokens
    assert info.limits.max_batch == 8 and info.limits.max_k == 50 and not info.auth_required


def test_search_texts_and_vectors_match_in_process(client, backend):
    want = backend.dense.search(QUERIES, 5, fetch=True)
    got = client.search(QUERIES, 5, fetch=True)
    np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
    for rg, rw in zip(got.payloads, want.payloads):
        for pg, pw in zip(rg, rw):
            assert (pg.chunk_id, pg.doc_id, pg.text, pg.continuation_id, pg.continuation_text) == \
                   (pw.chunk_id, pw.doc_id, pw.text, pw.continuation_id, pw.continuation_text)
            np.testing.assert_array_equal(pg.tokens, pw.tokens)
    x = backend.dense.embedder.encode(QUERIES)
    byvec = client.search(x, 5)
    np.testing.assert_array_equal(byvec.chunk_ids, want.chunk_ids)
    assert byvec.payloads is None


def test_search_excludes_documents_and_still_returns_k(client, backend):
    top_doc = int(backend.datastore.doc_ids(client.search(QUERIES[:1], 1).chunk_ids[0])[0])
    got = client.search(QUERIES[:1], 5, exclude_doc_ids=[[top_doc]])
    want = backend.dense.search(QUERIES[:1], 5, exclude_doc_ids=[[top_doc]])
    np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)
    assert (got.chunk_ids >= 0).all() and top_doc not in set(backend.datastore.doc_ids(got.chunk_ids[0]).tolist())


def test_large_batch_streams_past_the_message_cap(client, backend):
    # 40 queries > max_batch 8: the client streams; fetched payloads (> 256 KiB in all) come back sliced
    x = backend.dense.embedder.encode([f"python topic number {i}" for i in range(40)])
    got = client.search(x, 20, fetch=True)
    want = backend.dense.search(x, 20)
    np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)
    assert all(len(r) == 20 for r in got.payloads)
    raw = list(client.stub.SearchStream(iter([pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v)) for v in x[:8]],
                                                               k=50, fetch=pb.Fetch(text=True, tokens=True, continuation=True))]),
                                        timeout=20))
    assert len(raw) > 1 and all(m.ByteSize() < 256 * 1024 for m in raw)
    assert [m.query_offset for m in raw] == sorted(m.query_offset for m in raw)


def test_get_chunks_with_continuation(client, backend):
    from retromem.index.types import fetch_payloads

    ds = backend.datastore
    c = int(ds.doc_first_chunk_array[9])  # the first chunk of the longest document
    last = int(ds.doc_first_chunk_array[1]) - 1  # the last chunk of document 0: no continuation
    got = client.get_chunks([c, last])
    want = fetch_payloads(ds, [c, last])
    assert got[0].continuation_id == c + 1 == want[0].continuation_id and got[0].continuation_text == want[0].continuation_text
    np.testing.assert_array_equal(got[0].continuation_tokens, want[0].continuation_tokens)
    assert got[1].continuation_id is None and got[0].text == ds.chunk_texts([c])[0]
    only_ids = client.get_chunks([c], fetch=False)[0]
    assert only_ids.text is None and only_ids.tokens is None and only_ids.doc_id == want[0].doc_id


def test_ngram_verbs_match_in_process(client, backend):
    g = backend.ngram
    assert client.count(" list comprehension") == g.count(" list comprehension")
    ids = g.encode(" the Python")
    assert client.count(ids) == g.count(ids)
    assert client.prob(" the", " Python") == g.prob(" the", " Python")
    assert client.prob(" zzqx unseen", " the").prob is None
    prompt = "Nobody wrote this before, so the Python"
    assert client.infgram_prob(prompt, " interpreter") == g.infgram_prob(prompt, " interpreter")
    assert client.next_token_distribution(" the") == g.next_token_distribution(" the")
    assert client.infgram_next_token_distribution(prompt) == g.infgram_next_token_distribution(prompt)
    top = client.next_token_distribution(" the", top_k=3)
    assert list(top.tokens) == [t for t, _ in g.next_token_distribution(" the").top(3)]
    f = client.find(" the", 7)
    fw = g.find(" the", 7)
    assert f.count == fw.count and [(o.doc_id, o.chunk_id, o.offset) for o in f.occurrences] == \
           [(o.doc_id, o.chunk_id, o.offset) for o in fw.occurrences]
    cnf = [[" file", " files"], [" open"]]
    d, dw = client.search_documents(cnf, 5), g.search_documents(cnf, 5)
    assert d.count == dw.count and d.doc_ids == dw.doc_ids


def test_find_can_fetch_the_chunks(client, backend):
    r = client.raw("Find", pb.FindRequest(query=pb.NgramQuery(text=b" the"), limit=3,
                                          fetch=pb.Fetch(text=True)))
    assert len(r.chunks) == len(r.occurrences) == 3
    assert all(c.chunk_id == o.chunk_id for c, o in zip(r.chunks, r.occurrences))


# -- bad input: the right code, the field named, the server keeps serving ---------------------


def test_bad_dense_input(client, server):
    stub = client
    cases = [
        (lambda: stub.search([], 5), grpc.StatusCode.INVALID_ARGUMENT, "queries` is empty"),
        (lambda: stub.search([" "], 5), grpc.StatusCode.INVALID_ARGUMENT, "queries[0].text` is empty"),
        (lambda: stub.search(["x" * 3000], 5), grpc.StatusCode.INVALID_ARGUMENT, "max_query_bytes"),
        (lambda: stub.search([b"ok", b"bad \xff\xfe utf-8"], 5), grpc.StatusCode.INVALID_ARGUMENT, "queries[1].text` is not valid UTF-8"),
        (lambda: stub.raw("Search", pb.SearchRequest(queries=[pb.Query(text=b"a")], k=0)), grpc.StatusCode.INVALID_ARGUMENT, "`k` must be positive"),
        (lambda: stub.search(["a file"], 51), grpc.StatusCode.OUT_OF_RANGE, "`k` is 51"),
        (lambda: stub.search(np.ones((1, 3), np.float32), 5), grpc.StatusCode.INVALID_ARGUMENT, "queries[0].vector` has 3 values"),
        (lambda: stub.search(np.full((2, 384), np.nan, np.float32), 5), grpc.StatusCode.INVALID_ARGUMENT, "queries[0].vector` holds NaN"),
        (lambda: stub.search(["a file"], 5, exclude_doc_ids=[[99]]), grpc.StatusCode.OUT_OF_RANGE, "queries[0].exclude_doc_ids"),
        (lambda: stub.raw("Search", pb.SearchRequest(queries=[pb.Query(text=b"a")] * 9, k=1)), grpc.StatusCode.INVALID_ARGUMENT, "max_batch=8"),
        (lambda: stub.raw("Search", pb.SearchRequest(queries=[pb.Query()], k=1)), grpc.StatusCode.INVALID_ARGUMENT, "neither text nor vector"),
    ]
    for fn, code, text in cases:
        got, details = code_of(fn)
        assert got == code and text in details, (code, text, got, details)
    assert client.search(["a file"], 1).chunk_ids.shape == (1, 1)  # still serving
    with pytest.raises(RemoteQueryError):  # a QueryError, as the in-process index raises
        client.search(["a"], 51)


def test_bad_chunk_and_ngram_input(client, backend):
    n = backend.datastore.num_chunks
    V = backend.ngram.vocab_size
    cases = [
        (lambda: client.get_chunks([1, n]), grpc.StatusCode.NOT_FOUND, f"chunk_ids[1]` = {n}"),
        (lambda: client.get_chunks([-1]), grpc.StatusCode.NOT_FOUND, "chunk_ids[0]"),
        (lambda: client.get_chunks(list(range(17))), grpc.StatusCode.INVALID_ARGUMENT, "max_chunks=16"),
        (lambda: client.count([1, V]), grpc.StatusCode.OUT_OF_RANGE, f"token id {V} outside the vocabulary"),
        (lambda: client.count(""), grpc.StatusCode.INVALID_ARGUMENT, "query.text` is empty"),
        (lambda: client.count(b"\xc3\x28"), grpc.StatusCode.INVALID_ARGUMENT, "query.text` is not valid UTF-8"),
        (lambda: client.count([1] * 1001), grpc.StatusCode.INVALID_ARGUMENT, "max_query_tokens"),
        (lambda: client.prob(" the", " two tokens"), grpc.StatusCode.INVALID_ARGUMENT, "next_token.text` must be a single token"),
        (lambda: client.prob(" the", V + 5), grpc.StatusCode.OUT_OF_RANGE, "next_token.id"),
        (lambda: client.find(" the", 101), grpc.StatusCode.OUT_OF_RANGE, "`limit` is 101"),
        (lambda: client.search_documents([[" a"]] * 9), grpc.StatusCode.INVALID_ARGUMENT, "9 clauses, more than max_clauses=8"),
        (lambda: client.search_documents([[" a"] * 17]), grpc.StatusCode.INVALID_ARGUMENT, "clauses[0].terms` has 17 terms"),
        (lambda: client.search_documents([[" a"], []]), grpc.StatusCode.INVALID_ARGUMENT, "clauses[1].terms` is empty"),
        (lambda: client.raw("Count", pb.NgramRequest()), grpc.StatusCode.INVALID_ARGUMENT, "`query` is not set"),
    ]
    for fn, code, text in cases:
        got, details = code_of(fn)
        assert got == code and text in details, (code, text, got, details)
    assert client.count(" the").count > 0


def test_oversized_message_is_refused_and_server_survives(client):
    big = pb.SearchRequest(queries=[pb.Query(text=b"a" * 300_000)], k=1)  # > max_message_bytes 256 KiB
    got, _ = code_of(lambda: client.raw("Search", big))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.count(" the").count > 0


def test_missing_index_is_failed_precondition(union):
    running = start_server(ServerConfig(datastore=str(union.datastore), port=0, workers=2))
    try:
        with RetrievalClient(running.target) as c:
            got, details = code_of(lambda: c.search(["a"], 1))
            assert got == grpc.StatusCode.FAILED_PRECONDITION and "--dense" in details
            assert c.get_chunks([0])[0].chunk_id == 0
    finally:
        running.stop(0)


# -- deadlines, overload, a client that leaves -------------------------------------------------


def test_deadline_exceeded_and_server_keeps_serving(client):
    # k=20: 8 x 50 fetched hits would not fit in the 256 KiB answer (refused before any work, see below)
    got, _ = code_of(lambda: client.search(["a long query " * 50] * 8, 20, fetch=True, timeout=0.0005))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.search(["a file"], 1).chunk_ids.shape == (1, 1)


class GatedNgram:
    """The real n-gram index, except that ``count`` waits for a gate: a unary call that holds its
    worker thread for as long as a test needs (streams no longer can: they have threads of their own)."""

    def __init__(self, ngram) -> None:
        self._ngram = ngram
        self.gate = threading.Event()
        self.entered = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self._ngram, name)

    def count(self, ids):
        self.entered.release()
        self.gate.wait(10)
        return self._ngram.count(ids)


def _hold(c: RetrievalClient, gated: GatedNgram, n: int) -> list:
    """``n`` Count calls, each holding a worker thread until the gate opens."""
    calls = [c.stub.Count.future(pb.NgramRequest(query=pb.NgramQuery(text=b" the")), timeout=20) for _ in range(n)]
    for _ in range(n):
        assert gated.entered.acquire(timeout=10)
    return calls


def test_bounded_queue_answers_resource_exhausted_at_once(union, backend):
    gated = GatedNgram(backend.ngram)
    cfg = ServerConfig(datastore=str(union.datastore), ngram=str(union.ngram), port=0, workers=1, max_streams=1, max_queue=0)
    running = start_server(cfg, Backend(backend.datastore, None, gated))
    try:
        with RetrievalClient(running.target, retries=0) as c:
            held = _hold(c, gated, cfg.threads)  # every thread (unary and stream ones) holds a call
            # refused while the held calls still hold every slot (the gate is still shut): a call
            # that was queued instead would sit out its 30 s deadline and end DEADLINE_EXCEEDED
            got, details = code_of(lambda: c.get_chunks([0], timeout=30))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED and not gated.gate.is_set()
            gated.gate.set()
            assert all(h.result(10).count > 0 for h in held)
            assert c.get_chunks([0])[0].chunk_id == 0
    finally:
        gated.gate.set()
        running.stop(0)


def test_metrics_show_the_queue_and_count_refusals(union, backend):
    """Two threads (one unary worker, one stream thread), one queue slot: two held calls run, the
    next call waits (queue depth 1), the one after is refused at once and counted; then everything
    drains."""
    gated = GatedNgram(backend.ngram)
    cfg = ServerConfig(datastore=str(union.datastore), ngram=str(union.ngram), port=0, workers=1, max_streams=1,
                       max_queue=1)
    running = start_server(cfg, Backend(backend.datastore, None, gated))

    def gauge(name: str) -> float:
        line = next(ln for ln in running.metrics.text().splitlines() if ln.startswith(name + " "))
        return float(line.split()[1])

    try:
        with RetrievalClient(running.target, retries=0) as c:
            held = _hold(c, gated, 2)
            waiting = c.stub.GetChunks.future(pb.GetChunksRequest(chunk_ids=[0]), timeout=20)
            deadline = time.time() + 5
            while gauge("retromem_rpc_queued") < 1 and time.time() < deadline:
                time.sleep(0.01)
            assert gauge("retromem_rpc_queued") == 1 and gauge("retromem_rpc_in_flight") == 2
            got, _ = code_of(lambda: c.get_chunks([1]))
            assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert 'retromem_rpc_refused_total{method="GetChunks"} 1.0' in running.metrics.text()
            gated.gate.set()
            assert all(h.result(10).count > 0 for h in held) and len(waiting.result(10).chunks) == 1
            deadline = time.time() + 5
            # grpc releases a call's admission just after its response is sent: poll until both drain
            while (gauge("retromem_rpc_in_flight") > 0 or gauge("retromem_rpc_queued") > 0) and time.time() < deadline:
                time.sleep(0.01)
            assert gauge("retromem_rpc_queued") == 0 and gauge("retromem_rpc_in_flight") == 0
    finally:
        gated.gate.set()
        running.stop(0)


def test_client_disconnecting_mid_stream(client, server, backend):
    x = backend.dense.embedder.encode(["a file"])
    req = pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=x[0]))] * 8, k=50,
                           fetch=pb.Fetch(text=True, tokens=True, continuation=True))

    def many():
        for _ in range(200):
            yield req

    before = server.metrics.cancelled._value.get()
    stream = client.stub.SearchStream(many(), timeout=20)
    next(stream)
    stream.cancel()
    deadline = time.time() + 10
    while server.metrics.cancelled._value.get() == before and time.time() < deadline:
        time.sleep(0.05)
    assert server.metrics.cancelled._value.get() == before + 1
    assert client.count(" the").count > 0


def test_concurrent_dense_queries_are_batched(client, server, backend):
    x = backend.dense.embedder.encode([f"query {i}" for i in range(32)])
    want = backend.dense.search(x, 3).chunk_ids
    out = [None] * 32

    def one(i):
        out[i] = client.search(x[i:i + 1], 3).chunk_ids[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(np.stack(out), want)
    text = server.metrics.text()
    assert "retromem_dense_batch_queries_count" in text


def test_metrics_count_requests_errors_and_latency(client, server):
    client.count(" the")
    code_of(lambda: client.count(""))
    text = server.metrics.text()
    assert 'retromem_rpc_requests_total{method="Count"}' in text
    assert 'retromem_rpc_errors_total{code="INVALID_ARGUMENT",method="Count"}' in text
    assert 'retromem_rpc_latency_seconds_bucket{le="0.001",method="Count"}' in text
    assert "retromem_rpc_in_flight" in text and "retromem_dense_queue_depth" in text


def test_metrics_over_http(union, backend):
    import urllib.request

    running = start_server(ServerConfig(datastore=str(union.datastore), port=0, metrics_port=0),
                           Backend(backend.datastore, None, None))
    try:
        with RetrievalClient(running.target) as c:
            c.get_chunks([0])
        body = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5).read().decode()
        assert 'retromem_rpc_requests_total{method="GetChunks"} 1.0' in body
    finally:
        running.stop(0)


# -- health, reflection ---------------------------------------------------------------------


def test_health_service(client, server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert client.health() == "SERVING" and client.health("retromem.v1.Retrieval") == "SERVING"
    stub = health_pb2_grpc.HealthStub(client.channel)
    with pytest.raises(grpc.RpcError) as e:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_that_knows_the_api_only_through_reflection(server):
    """Discover services, build message classes from the served descriptors, call Count."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in resp.list_services_response.service}
        assert {"retromem.v1.Retrieval", "grpc.health.v1.Health"} <= names
        (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="retromem.v1.Retrieval")]), timeout=5)
        pool = descriptor_pool.DescriptorPool()
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
        svc = pool.FindServiceByName("retromem.v1.Retrieval")
        method = svc.FindMethodByName("Count")
        Req = message_factory.GetMessageClass(method.input_type)
        Resp = message_factory.GetMessageClass(method.output_type)
        req = Req()
        req.query.text = " the".encode()
        call = ch.unary_unary(f"/{svc.full_name}/{method.name}", request_serializer=Req.SerializeToString,
                              response_deserializer=Resp.FromString)
        assert call(req, timeout=5).count > 0


# -- auth and TLS ---------------------------------------------------------------------------


def test_bearer_token(union, backend):
    running = start_server(ServerConfig(datastore=str(union.datastore), port=0, token="s3cret"),
                           Backend(backend.datastore, None, None))
    try:
        for token in (None, "wrong"):
            with RetrievalClient(running.target, token=token) as c:
                got, details = code_of(lambda: c.get_chunks([0]))
                assert got == grpc.StatusCode.UNAUTHENTICATED and ("authorization" in details)
                assert c.health() == "SERVING"  # probes need no token
        with RetrievalClient(running.target, token="s3cret") as c:
            assert c.get_chunks([0])[0].chunk_id == 0 and c.info().auth_required
    finally:
        running.stop(0)


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls_with_token(tmp_path, union, backend):
    cert, key = _self_signed(tmp_path)
    running = start_server(ServerConfig(datastore=str(union.datastore), port=0, tls_cert=str(cert), tls_key=str(key),
                                        token="t0k"), Backend(backend.datastore, None, None))
    try:
        target = f"localhost:{running.port}"
        with RetrievalClient(target, tls_ca=str(cert), token="t0k") as c:
            assert c.get_chunks([2])[0].chunk_id == 2
        with RetrievalClient(target, retries=0, timeout=3) as plain:  # plaintext to a TLS port fails
            got, _ = code_of(lambda: plain.get_chunks([2]))
            assert got == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_config_errors_name_the_flag():
    from retromem.errors import ConfigError

    with pytest.raises(ConfigError, match="nothing to serve"):
        ServerConfig()
    with pytest.raises(ConfigError, match="--tls-key"):
        ServerConfig(datastore="x", tls_cert="c")
    with pytest.raises(ConfigError, match="--workers"):
        ServerConfig(datastore="x", workers=0)
    with pytest.raises(ConfigError, match="--max-k"):
        ServiceLimits(max_k=0)
    with pytest.raises(ConfigError, match="--shard"):
        ServerConfig(shards=("nohost",))


# -- request bytes that do not parse (issue 15: gRPC answered INTERNAL) ------------------------


@pytest.mark.parametrize("method, streaming", [("Search", False), ("GetChunks", False), ("Count", False),
                                               ("SearchStream", True)])
def test_unparseable_request_bytes_are_invalid_argument_and_the_server_keeps_serving(server, method, streaming):
    garbage = b"\xff\xff\xff\xff\x0f\x00garbage"
    with grpc.insecure_channel(server.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            if streaming:
                list(ch.stream_stream(f"/retromem.v1.Retrieval/{method}")(iter([garbage]), timeout=10))
            else:
                ch.unary_unary(f"/retromem.v1.Retrieval/{method}")(garbage, timeout=10)
        got, details = err.value.code(), err.value.details()
        assert got == grpc.StatusCode.INVALID_ARGUMENT, (got, details)
        assert method in details and "Request" in details and "not a valid" in details
    with RetrievalClient(server.target) as c:
        assert c.health() == "SERVING" and c.count(" the").count > 0


# -- a lone one-vector Search is answered inline (issue 19: the batcher's hand-off cost) ------


def _one(v: np.ndarray, k: int = 5, copies: int = 1) -> pb.SearchRequest:
    return pb.SearchRequest(queries=[pb.Query(vector=pb.Vector(values=v))] * copies, k=k)


def test_lone_one_vector_search_skips_the_queue_and_equals_the_batched_path(client, server, backend, monkeypatch):
    batcher = server.servicer.batcher
    queued: list[int] = []
    orig = batcher.search
    monkeypatch.setattr(batcher, "search", lambda it, timeout=None: (queued.append(len(it.vectors)), orig(it, timeout))[1])
    x = backend.dense.embedder.encode(QUERIES + ["a file"])
    for v in x:
        one = client.stub.Search(_one(v), timeout=20).results[0]
        two = client.stub.Search(_one(v, copies=2), timeout=20).results[0]  # two queries: the batched path
        want = backend.dense.search(v[None], 5)
        assert list(one.chunk_ids) == list(two.chunk_ids) == want.chunk_ids[0].tolist()
        assert list(one.scores) == list(two.scores)  # bit for bit
        np.testing.assert_allclose(one.scores, want.scores[0], rtol=1e-6)
    assert queued == [2] * len(x)  # only the two-query requests went through the queue
    # the same checks as the batched path, with the same codes and messages
    for req, code, text in [(_one(np.ones(3, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "`queries[0].vector` has 3 values"),
                            (_one(np.full(384, np.nan, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "holds NaN"),
                            (_one(x[0], k=51), grpc.StatusCode.OUT_OF_RANGE, "`k` is 51"),
                            (_one(x[0], k=0), grpc.StatusCode.INVALID_ARGUMENT, "`k` must be positive")]:
        for copies in (1, 2):
            with pytest.raises(grpc.RpcError) as e:
                client.stub.Search(pb.SearchRequest(queries=list(req.queries) * copies, k=req.k), timeout=20)
            assert e.value.code() == code and text in e.value.details(), (copies, e.value.details())
    inf = x[0].copy()
    inf[7] = np.inf
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Search(_one(inf), timeout=20)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or infinity at position 7" in e.value.details()
    # finite values whose dot product overflows float32 are still a valid query (no overflow-prone shortcut check)
    big = np.full(384, 1e30, np.float32)
    one = client.stub.Search(_one(big), timeout=20).results[0]
    two = client.stub.Search(_one(big, copies=2), timeout=20).results[0]
    assert list(one.chunk_ids) == list(two.chunk_ids) and list(one.scores) == list(two.scores)


def test_one_vector_search_queues_behind_a_running_batch(client, server, backend):
    batcher = server.servicer.batcher
    v = backend.dense.embedder.encode(["sorting lists"])[0]
    gate, entered = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(10)

    lead = threading.Thread(target=batcher.solo, args=(hold,))
    lead.start()
    try:
        assert entered.wait(10)
        fut = client.stub.Search.future(_one(v), timeout=20)
        deadline = time.time() + 10
        while batcher.depth < 1 and time.time() < deadline:
            time.sleep(0.005)
        assert batcher.depth == 1 and not fut.done()  # queued behind the running search, not run beside it
    finally:
        gate.set()
        lead.join(10)
    got = fut.result(10).results[0]
    assert list(got.chunk_ids) == backend.dense.search(v[None], 5).chunk_ids[0].tolist()


def test_one_vector_search_honours_tombstones(tmp_path, union):
    import shutil

    from retromem.datastore import Datastore
    from retromem.datastore.tombstones import delete

    root = tmp_path / "union"
    shutil.copytree(union.datastore.parent, root)
    ds_path = root / union.datastore.name
    before = Datastore.open(ds_path)
    first = before.doc_first_chunk_array
    text = before.chunk_texts([int(first[0])])  # a chunk of the document taken down below
    delete(ds_path, doc_ids=[0], reason="test takedown")
    cfg = ServerConfig(datastore=str(ds_path), dense=str(root / union.dense.name), port=0, workers=2)
    b = Backend.open(cfg)
    running = start_server(cfg, b)
    try:
        assert not running.servicer.state.bare_knn  # the selector path, not the bare top-k
        v = b.dense.embedder.encode(text)[0]
        with RetrievalClient(running.target, timeout=20) as c:
            got = c.stub.Search(_one(v), timeout=20).results[0]
        want = b.dense.search(v[None], 5).chunk_ids[0].tolist()
        assert list(got.chunk_ids) == want and len(want) == 5
        assert not set(want) & set(range(int(first[0]), int(first[1])))
    finally:
        running.stop(0)
