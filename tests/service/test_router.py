"""A router over two real shard servers answers as one server over the union of their
datastores; a killed shard fails the answer, or degrades it naming the shard when asked to."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from retromem.service.client import RetrievalClient, ServiceCallError
from retromem.service.config import ServerConfig
from retromem.service.server import start_server

QUERIES = ["How do I read a file line by line?", "sort a list of dictionaries by a key", "porting extension modules",
           "regular expressions match groups"]


def _serve(b, **kw):
    return start_server(ServerConfig(datastore=str(b.datastore), dense=str(b.dense), ngram=str(b.ngram), port=0,
                                     workers=4, **kw))


@pytest.fixture(scope="module")
def cluster(stores):
    union, a, b = _serve(stores["union"]), _serve(stores["a"]), _serve(stores["b"])
    router = start_server(ServerConfig(shards=(a.target, b.target), port=0, workers=4))
    yield union, a, b, router
    for s in (router, union, a, b):
        s.stop(0)


def test_router_info_numbers_shards_consecutively(cluster):
    union, a, b, router = cluster
    with RetrievalClient(router.target) as r, RetrievalClient(union.target) as u:
        ri, ui = r.info(), u.info()
    assert ri.role == "router" and [s.target for s in ri.shards] == [a.target, b.target]
    assert ri.datastore.num_chunks == ui.datastore.num_chunks and ri.datastore.num_documents == ui.datastore.num_documents
    assert ri.shards[1].first_chunk_id == ri.shards[0].num_chunks and ri.dense.ntotal == ui.dense.ntotal
    assert ri.ngram.num_tokens == ui.ngram.num_tokens


def test_router_equals_one_server_over_the_union(cluster):
    union, _, _, router = cluster
    with RetrievalClient(router.target) as r, RetrievalClient(union.target) as u:
        got, want = r.search(QUERIES, 8, fetch=True), u.search(QUERIES, 8, fetch=True)
        np.testing.assert_array_equal(got.chunk_ids, want.chunk_ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5)
        assert [[(p.chunk_id, p.doc_id, p.text, p.continuation_id) for p in row] for row in got.payloads] == \
               [[(p.chunk_id, p.doc_id, p.text, p.continuation_id) for p in row] for row in want.payloads]
        excl = [[int(want.payloads[0][0].doc_id)], None, [0, 9], [5]]
        np.testing.assert_array_equal(r.search(QUERIES, 8, exclude_doc_ids=excl).chunk_ids,
                                      u.search(QUERIES, 8, exclude_doc_ids=excl).chunk_ids)
        ids = [0, 3, 40, 41, 100, int(u.info().datastore.num_chunks) - 1]
        for x, y in zip(r.get_chunks(ids), u.get_chunks(ids), strict=True):
            assert (x.chunk_id, x.doc_id, x.text, x.continuation_id, x.continuation_text) == \
                   (y.chunk_id, y.doc_id, y.text, y.continuation_id, y.continuation_text)
            assert x.tokens.tolist() == y.tokens.tolist()
        for q in (" the", " Python", " file", " import"):
            assert r.count(q) == u.count(q)
            assert r.prob(q, " the") == pytest.approx(u.prob(q, " the"))
            assert r.next_token_distribution(q) == u.next_token_distribution(q)
            f, fu = r.find(q, 1000), u.find(q, 1000)
            assert f.count == fu.count and sorted((o.doc_id, o.chunk_id, o.offset) for o in f.occurrences) == \
                   sorted((o.doc_id, o.chunk_id, o.offset) for o in fu.occurrences)
        for prompt in ("so the Python", "Nobody wrote this, but in the file", "zzqx"):
            assert r.infgram_prob(prompt, " the") == u.infgram_prob(prompt, " the")
            assert r.infgram_next_token_distribution(prompt, top_k=5) == u.infgram_next_token_distribution(prompt, top_k=5)
        cnf = [[" file", " files"], [" open"]]
        assert r.search_documents(cnf, 1000).count == u.search_documents(cnf, 1000).count
        assert r.search_documents(cnf, 1000).doc_ids == u.search_documents(cnf, 1000).doc_ids
        # a k larger than one shard holds still works, as over the union
        big = int(r.info().shards[0].num_chunks) + 5
        np.testing.assert_array_equal(r.search(QUERIES[:1], big).chunk_ids, u.search(QUERIES[:1], big).chunk_ids)


def test_router_passes_query_errors_on(cluster):
    *_, router = cluster
    with RetrievalClient(router.target) as r:
        with pytest.raises(ServiceCallError) as e:
            r.count(b"\xff")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "query.text" in e.value.details
        with pytest.raises(ServiceCallError) as e:
            r.get_chunks([10**6])
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_killed_shard_fails_or_degrades_by_name(stores):
    a, b = _serve(stores["a"]), _serve(stores["b"])
    strict = start_server(ServerConfig(shards=(a.target, b.target), port=0, shard_timeout_s=2))
    partial = start_server(ServerConfig(shards=(a.target, b.target), port=0, shard_timeout_s=2, partial=True))
    try:
        with RetrievalClient(strict.target, retries=0) as s, RetrievalClient(partial.target, retries=0) as p:
            full = p.count(" the").count
            b.stop(0)  # kill shard b
            with pytest.raises(ServiceCallError) as e:
                s.count(" the")
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and b.target in e.value.details
            from retromem.service.v1 import retrieval_pb2 as pb

            resp = p.raw("Count", pb.NgramRequest(query=pb.NgramQuery(text=b" the")))
            assert list(resp.missing_shards) == [b.target] and 0 < resp.count < full
            res = p.raw("Search", pb.SearchRequest(queries=[pb.Query(text=b"a file")], k=3))
            assert list(res.missing_shards) == [b.target] and len(res.results[0].chunk_ids) == 3
    finally:
        for srv in (strict, partial, a):
            srv.stop(0)


def test_router_bounds_requests_as_a_server_does(cluster):
    """Caps and the answer-size estimate hold at the router too (before any shard is asked), and a
    SearchStream through it is asked of the shards in slices that fit their messages."""
    from retromem.service.config import ServiceLimits
    from retromem.service.v1 import retrieval_pb2 as pb

    union, a, b, _ = cluster
    router = start_server(ServerConfig(shards=(a.target, b.target), port=0, workers=2,
                                       limits=ServiceLimits(max_k=50, max_message_bytes=256 * 1024)))
    try:
        with RetrievalClient(router.target, retries=0) as r, RetrievalClient(union.target) as u:
            assert r.info().datastore.text_bytes == u.info().datastore.text_bytes > 0
            x = u.search(QUERIES, 1).chunk_ids  # warm
            vecs = [pb.Query(text=q.encode()) for q in QUERIES * 2]
            fetch = pb.Fetch(text=True, tokens=True, continuation=True)
            with pytest.raises(ServiceCallError) as e:
                r.raw("Search", pb.SearchRequest(queries=vecs, k=50, fetch=fetch))
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "SearchStream" in e.value.details
            with pytest.raises(ServiceCallError) as e:
                r.raw("Search", pb.SearchRequest(queries=vecs[:1], k=5, ef_search=2**31))
            assert e.value.code == grpc.StatusCode.OUT_OF_RANGE and "`ef_search`" in e.value.details
            msgs = list(r.stub.SearchStream(iter([pb.SearchRequest(queries=vecs, k=50, fetch=fetch)]), timeout=30))
            got = [list(res.chunk_ids) for m in msgs for res in m.results]
            assert len(msgs) > 1 and got == u.search(QUERIES * 2, 50).chunk_ids.tolist() and x.shape == (4, 1)
    finally:
        router.stop(0)


def test_deployment_ids_do_not_depend_on_shard_order_and_duplicates_are_refused(cluster, stores, tmp_path):
    """Declared id ranges: shards listed in reverse answer exactly as the ordered router; a shard given
    twice, a datastore served twice, a wrong datastore id and overlapping ranges are all refused; ids
    between two declared ranges are NOT_FOUND, not sent to the wrong shard."""
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.errors import ConfigError

    union, a, b, router = cluster
    with RetrievalClient(router.target) as r:
        info = r.info()
    ia, ib = (s for s in info.shards)
    with RetrievalClient(a.target) as ca, RetrievalClient(b.target) as cb:
        id_a, id_b = ca.info().datastore.datastore_id, cb.info().datastore.datastore_id
    declared = ((id_b, ib.first_doc_id, ib.first_chunk_id), (id_a, 0, 0))
    rev = start_server(ServerConfig(shards=(b.target, a.target), shard_ranges=declared, port=0, workers=4))
    gap = start_server(ServerConfig(shards=(a.target, b.target), port=0, workers=4,
                                    shard_ranges=((id_a, 0, 0), (id_b, ib.first_doc_id + 100, ib.first_chunk_id + 1000))))
    try:
        with RetrievalClient(rev.target) as v, RetrievalClient(router.target) as r:
            assert [s.target for s in v.info().shards] == [a.target, b.target]  # placed by declared range
            np.testing.assert_array_equal(v.search(QUERIES, 8).chunk_ids, r.search(QUERIES, 8).chunk_ids)
            ids = [0, int(ib.first_chunk_id), int(ib.first_chunk_id) + 3]
            assert [c.text for c in v.get_chunks(ids)] == [c.text for c in r.get_chunks(ids)]
        with RetrievalClient(gap.target, retries=0) as g:
            first_b = int(ib.first_chunk_id) + 1000
            assert g.get_chunks([first_b])[0].text == RetrievalClient(router.target).get_chunks([int(ib.first_chunk_id)])[0].text
            with pytest.raises(ServiceCallError) as e:
                g.get_chunks([int(ib.first_chunk_id) + 10])  # between a's end and b's declared start
            assert e.value.code == grpc.StatusCode.NOT_FOUND and "between the deployment's shard ranges" in e.value.details
    finally:
        rev.stop(0)
        gap.stop(0)
    with pytest.raises(ConfigError, match="name each shard server once"):
        ServerConfig(shards=(a.target, a.target))
    a2 = _serve(stores["a"])  # a second server over shard a's datastore
    try:
        with pytest.raises(ConfigError, match="serve the same datastore"):
            start_server(ServerConfig(shards=(a.target, b.target, a2.target), port=0))
    finally:
        a2.stop(0)
    with pytest.raises(ConfigError, match="declares"):
        start_server(ServerConfig(shards=(a.target, b.target), shard_ranges=((id_b, 0, 0), (id_a, 10**6, 10**6)), port=0))
    with pytest.raises(ConfigError, match="overlap"):
        start_server(ServerConfig(shards=(a.target, b.target), shard_ranges=((id_a, 0, 0), (id_b, 1, 1)), port=0))
    bad = tmp_path / "deployment.yaml"
    bad.write_text("shards:\n  - target: x:1\n")
    res = CliRunner().invoke(main, ["serve", "--deployment", str(bad)])
    assert res.exit_code == 2 and "--deployment" in res.output and "datastore_id" in res.output


def test_count_batch_equals_count_on_a_server_and_a_router(cluster):
    """CountBatch: many n-grams in one round trip, each answered as Count answers it, over one server
    and summed over a router's shards; an empty or oversized batch is INVALID_ARGUMENT and the server
    keeps serving."""
    union, _, _, router = cluster
    grams = [" the", " Python", " file", " import", [464, 318], "zzqx unseen words", " open the file"]
    with RetrievalClient(union.target, retries=0) as u, RetrievalClient(router.target, retries=0) as r:
        want = [u.count(g).count for g in grams]
        assert [c.count for c in u.count_batch(grams)] == want
        assert [c.count for c in r.count_batch(grams)] == want
        assert want[0] > 0 and want[5] == 0
        from retromem.service.v1 import retrieval_pb2 as pb

        with pytest.raises(ServiceCallError) as e:
            u.raw("CountBatch", pb.CountBatchRequest())
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.value.details
        big = int(u.info().limits.max_batch) + 1
        with pytest.raises(ServiceCallError) as e:
            u.raw("CountBatch", pb.CountBatchRequest(queries=[pb.NgramQuery(text=b" the")] * big))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch" in e.value.details
        assert len(u.count_batch([" the"] * big)) == big  # the client splits a long list
        assert u.count(" the").count == want[0]


def test_router_reload_reloads_every_shard_and_refuses_moving_ids(cluster):
    """Reload on a router: every shard re-opens its newest version and the router re-reads their sizes
    (same answers after it). A shard before the last that changed size would move later shards' ids
    in --shard order: refused by place checks, the previous placement kept serving."""
    from retromem.service.router import Shard, place_shards
    from retromem.service.v1 import retrieval_pb2 as pb

    _, _, _, router = cluster
    with RetrievalClient(router.target, retries=0) as r:
        before = r.search(QUERIES, 5).chunk_ids
        info = r.info()
        resp = r.reload()
        assert resp.num_chunks == info.datastore.num_chunks and resp.num_documents == info.datastore.num_documents
        np.testing.assert_array_equal(r.search(QUERIES, 5).chunk_ids, before)

    def shard(target, ident, docs, chunks):
        return Shard(target, None, None, pb.InfoResponse(datastore=pb.DatastoreInfo(datastore_id=ident, num_documents=docs,
                                                                                     num_chunks=chunks)))

    placed = place_shards([shard("a:1", "A", 10, 100), shard("b:1", "B", 5, 50)], {})
    assert [(s.first_doc, s.first_chunk) for s in placed] == [(0, 0), (10, 100)]
    declared = {"a:1": ("A", 0, 0), "b:1": ("B", 20, 200)}  # room for a to grow
    grown = place_shards([shard("b:1", "B", 5, 50), shard("a:1", "A", 15, 150)], declared)
    assert [(s.target, s.first_chunk) for s in grown] == [("a:1", 0), ("b:1", 200)]
    with pytest.raises(Exception, match="overlap"):
        place_shards([shard("a:1", "A", 25, 250), shard("b:1", "B", 5, 50)], declared)


def test_router_next_tokens_equal_one_server_over_the_union(cluster):
    """NextTokens through a router: per context the longest suffix any shard matched, with counts and
    continuations summed over the shards that matched it, as one server over the union answers."""
    union, _, _, router = cluster
    with RetrievalClient(union.target, retries=0) as u, RetrievalClient(router.target, retries=0) as r:
        ids = [t for c in u.get_chunks([3, 50, 120]) for t in c.tokens.tolist()]
        contexts = [ids[:20], ids[60:90], ids[130:140], [50_000, 50_001, 50_002]]
        want = u.draft_continuations(contexts, depth=3)
        got = r.draft_continuations(contexts, depth=3)
    assert [n for n, _ in got] == [n for n, _ in want] and any(n for n, _ in want)
    for (_, g), (_, w) in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None and not w.approx:
            assert (g.count, g.read) == (w.count, w.read)
            assert dict(g.sequences) == dict(w.sequences)


def test_router_info_sums_the_shards_takedowns(stores, tmp_path):
    """The router's datastore Info counts the documents taken down in every shard (it said 0)."""
    import shutil

    from retromem.datastore.tombstones import delete

    b = stores["b"]
    for part in ("datastore", "dense", "ngram"):
        shutil.copytree(getattr(b, part), tmp_path / part)
    delete(tmp_path / "datastore", doc_ids=[0, 2], reason="test takedown", who="test")
    a = _serve(stores["a"])
    b2 = start_server(ServerConfig(datastore=str(tmp_path / "datastore"), dense=str(tmp_path / "dense"),
                                   ngram=str(tmp_path / "ngram"), port=0, workers=2))
    router = start_server(ServerConfig(shards=(a.target, b2.target), port=0, workers=2))
    try:
        with RetrievalClient(router.target) as r, RetrievalClient(b2.target) as s:
            assert s.info().datastore.deleted_documents == 2
            assert r.info().datastore.deleted_documents == 2
    finally:
        for srv in (router, a, b2):
            srv.stop(0)
