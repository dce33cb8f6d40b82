"""The LlamaIndex retriever against a real Flat index in process and a real server on loopback over
it: nodes with the index's hits, ids, scores, texts, source ids, metadata and relationships; the
ids kept out of what an LLM reads; async; excluded documents; bad searchers refused."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.schema import MetadataMode, NodeRelationship, QueryBundle  # noqa: E402

from retromem.errors import ConfigError  # noqa: E402
from retromem.index.dense import DenseIndex  # noqa: E402
from retromem.service.config import ServerConfig  # noqa: E402
from retromem.service.llamaindex import RetromemRetriever  # noqa: E402
from retromem.service.server import start_server  # noqa: E402
from retromem.service.servicer import Backend  # noqa: E402

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


def check_against_index(nodes, index: DenseIndex, query: str, k: int, **search) -> None:
    ref = index.search([query], k, fetch=True, **search)
    assert [n.node.metadata["chunk_id"] for n in nodes] == ref.chunk_ids[0].tolist()
    np.testing.assert_allclose([n.score for n in nodes], ref.scores[0], atol=1e-4)
    for n, p in zip(nodes, ref.payloads[0]):
        node = n.node
        assert node.node_id == f"chunk-{p.chunk_id}" and node.text == p.text and node.metadata["doc_id"] == p.doc_id
        assert node.metadata["source_id"] == getattr(p, "source_id", None)
        assert node.metadata["metadata"] == (getattr(p, "metadata", None) or {})
        assert node.metadata["score"] == pytest.approx(n.score)
        src = node.relationships[NodeRelationship.SOURCE]
        assert src.node_id == (getattr(p, "source_id", None) or f"doc-{p.doc_id}") and src.metadata["doc_id"] == p.doc_id
        # the ids are for the program, not for the LLM or an embedder: the text is the chunk alone
        assert node.get_content(metadata_mode=MetadataMode.LLM) == p.text
        assert node.get_content(metadata_mode=MetadataMode.EMBED) == p.text


def test_in_process_retrieve_and_aretrieve(union, index):
    r = RetromemRetriever.from_index(union.dense, k=3)
    for q in QUERIES:
        check_against_index(r.retrieve(q), index, q, 3)
    check_against_index(r.retrieve(QueryBundle(QUERIES[0])), index, QUERIES[0], 3)

    async def all_at_once():
        return await asyncio.gather(*(r.aretrieve(q) for q in QUERIES))

    for q, nodes in zip(QUERIES, asyncio.run(all_at_once())):
        check_against_index(nodes, index, q, 3)


def test_exclusion_and_continuation(union, index):
    top_doc = index.search([QUERIES[1]], 1).chunk_ids[0][0]
    top_doc = int(index.datastore.doc_ids([top_doc])[0])
    nodes = RetromemRetriever.from_index(union.dense, k=4, exclude_doc_ids=[top_doc]).retrieve(QUERIES[1])
    assert len(nodes) == 4 and top_doc not in {n.node.metadata["doc_id"] for n in nodes}
    check_against_index(nodes, index, QUERIES[1], 4, exclude_doc_ids=[[top_doc]])
    nodes = RetromemRetriever.from_index(union.dense, k=3, with_continuation=True).retrieve(QUERIES[2])
    ref = index.search([QUERIES[2]], 3, fetch=True).payloads[0]
    for n, p in zip(nodes, ref):
        nxt = n.node.relationships.get(NodeRelationship.NEXT)
        assert (nxt.node_id if nxt else None) == (f"chunk-{p.continuation_id}" if p.continuation_id is not None else None)
        assert n.node.metadata.get("continuation") == p.continuation_text


def test_over_grpc_equals_in_process(server, index):
    remote = RetromemRetriever.from_server(server.target, k=5, timeout=60)
    try:
        for q in QUERIES:
            check_against_index(remote.retrieve(q), index, q, 5)
        check_against_index(asyncio.run(remote.aretrieve(QUERIES[1])), index, QUERIES[1], 5)
    finally:
        remote.searcher.close()


def test_bad_arguments_are_refused(union):
    with pytest.raises(ConfigError, match="`k` must be"):
        RetromemRetriever.from_index(union.dense, k=-2)
    with pytest.raises(TypeError, match="search"):
        RetromemRetriever(object())
