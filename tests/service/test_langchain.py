"""The LangChain retriever against a real Flat index in process and a real server on loopback over
it: the same hits, ids, scores, texts, source ids and metadata as the index's own search; async and
batch; excluded documents; inside a chain; bad options refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from retromem.errors import ConfigError  # noqa: E402
from retromem.index.dense import DenseIndex  # noqa: E402
from retromem.service.config import ServerConfig  # noqa: E402
from retromem.service.langchain import RetromemRetriever  # noqa: E402
from retromem.service.retrievers import SearchOptions  # noqa: E402
from retromem.service.server import start_server  # noqa: E402
from retromem.service.servicer import Backend  # noqa: E402
from tests.conftest import demo_records  # noqa: E402
from tests.service.conftest import DOCS  # noqa: E402

QUERIES = ["How do I read a file line by line?", "sort a list of dictionaries by a key", "porting extension modules"]


@pytest.fixture(scope="module")
def index(union) -> DenseIndex:
    return DenseIndex.open(union.dense)


@pytest.fixture(scope="module")
def server(union):
    cfg = ServerConfig(datastore=str(union.datastore), dense=str(union.dense), port=0, workers=4)
    running = start_server(cfg, Backend.open(cfg))
    yield running
    running.stop(0)


def check_against_index(docs, index: DenseIndex, query: str, k: int, **search) -> None:
    ref = index.search([query], k, fetch=True, **search)
    assert len(docs) == k
    assert [d.metadata["chunk_id"] for d in docs] == ref.chunk_ids[0].tolist()
    np.testing.assert_allclose([d.metadata["score"] for d in docs], ref.scores[0], atol=1e-4)
    for d, p in zip(docs, ref.payloads[0]):
        assert d.page_content == p.text and d.metadata["doc_id"] == p.doc_id and d.id == f"chunk-{p.chunk_id}"
        assert d.metadata["source_id"] == getattr(p, "source_id", None)
        assert d.metadata["metadata"] == (getattr(p, "metadata", None) or {})
    if hasattr(ref.payloads[0][0], "source_id"):  # the input's own ids, where payloads carry them
        ids = [demo_records()[i]["id"] for i in DOCS]
        assert [d.metadata["source_id"] for d in docs] == [str(ids[d.metadata["doc_id"]]) for d in docs]


def test_in_process_retriever_returns_the_index_hits_as_documents(index):
    r = RetromemRetriever(searcher=index, options=SearchOptions(k=3))
    for q in QUERIES:
        check_against_index(r.invoke(q), index, q, 3)


def test_from_index_async_batch_and_exclusion(union, index):
    r = RetromemRetriever.from_index(union.dense, k=4)
    sync = [r.invoke(q) for q in QUERIES]

    async def all_at_once():
        return await asyncio.gather(*(r.ainvoke(q) for q in QUERIES))

    got = asyncio.run(all_at_once())
    assert [[d.metadata["chunk_id"] for d in ds] for ds in got] == [[d.metadata["chunk_id"] for d in ds] for ds in sync]
    assert [[d.metadata["chunk_id"] for d in ds] for ds in r.batch(QUERIES)] == \
        [[d.metadata["chunk_id"] for d in ds] for ds in sync]
    top_doc = sync[0][0].metadata["doc_id"]
    ex = RetromemRetriever.from_index(union.dense, k=4, exclude_doc_ids=[top_doc])
    docs = ex.invoke(QUERIES[0])
    assert len(docs) == 4 and top_doc not in {d.metadata["doc_id"] for d in docs}
    check_against_index(docs, index, QUERIES[0], 4, exclude_doc_ids=[[top_doc]])
    cont = RetromemRetriever.from_index(union.dense, k=2, with_continuation=True).invoke(QUERIES[1])
    ref = index.search([QUERIES[1]], 2, fetch=True).payloads[0]
    assert [d.metadata["continuation_id"] for d in cont] == [p.continuation_id for p in ref]
    assert [d.metadata.get("continuation") for d in cont] == [p.continuation_text for p in ref]


def test_in_a_chain(union):
    from langchain_core.runnables import RunnableLambda

    r = RetromemRetriever.from_index(union.dense, k=2)
    chain = r | RunnableLambda(lambda docs: [d.metadata["chunk_id"] for d in docs])
    assert chain.invoke(QUERIES[2]) == [d.metadata["chunk_id"] for d in r.invoke(QUERIES[2])]


def test_over_grpc_equals_in_process(server, union, index):
    remote = RetromemRetriever.from_server(server.target, k=5, timeout=60)
    try:
        for q in QUERIES:
            check_against_index(remote.invoke(q), index, q, 5)
        got = asyncio.run(remote.ainvoke(QUERIES[0]))
        assert [d.metadata["chunk_id"] for d in got] == index.search([QUERIES[0]], 5).chunk_ids[0].tolist()
    finally:
        remote.searcher.close()


def test_bad_options_are_refused(union):
    with pytest.raises(ConfigError, match="`k` must be"):
        RetromemRetriever.from_index(union.dense, k=0)
    with pytest.raises(ConfigError, match="`nprobe` must be"):
        RetromemRetriever.from_index(union.dense, nprobe=-1)
