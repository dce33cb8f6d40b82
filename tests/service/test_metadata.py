"""source_id and metadata on every hit, GetDocument, and Search metadata filters (issue 18), over a
real server on loopback: filters are enforced inside the FAISS search, so k hits still come back
when the filter keeps a small part of the datastore."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tests.conftest import demo_records, write_jsonl

DOCS = [8, 3, 27, 29, 36, 21, 20, 30]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    root = tmp_path_factory.mktemp("meta")
    recs = demo_records()
    # one document in eight is "rare": a filter on it keeps about an eighth of the chunks
    write_jsonl(root / "docs.jsonl", [{"id": f"src-{i}", "text": recs[i]["text"], "year": 2000 + j,
                                       "licence": "rare" if j == 5 else ("cc-by" if j % 2 else "mit")}
                                      for j, i in enumerate(DOCS)])
    ds = root / "ds"
    build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(root / "emb"), batch_size=64), progress=False)
    dense = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "dense"), factory="Flat", tune=False),
                        progress=False)
    running = start_server(ServerConfig(datastore=str(ds), dense=str(dense.out), port=0, workers=2))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def client(server):
    from retromem.service.client import RetrievalClient

    with RetrievalClient(server.target, timeout=30) as c:
        yield c


def test_hits_carry_source_id_and_metadata(client, server):
    res = client.search(["how to read a file"], 5, fetch=True)
    ds = server.servicer.b.datastore
    for p in res.payloads[0]:
        assert p.source_id == ds.source_ids([p.doc_id])[0] and p.source_id.startswith("src-")
        assert p.metadata == ds.metadata([p.doc_id])[0] and set(p.metadata) == {"year", "licence"}
    got = client.get_chunks([0, 1])
    assert got[0].source_id == "src-8" and got[0].metadata["year"] == 2000


def test_filters_keep_k_hits_inside_the_search(client, server):
    ds = server.servicer.b.datastore
    rare = set(ds.docs_matching({"licence": "rare"}).tolist())
    n_rare_chunks = len(ds.chunk_ids_of_docs(sorted(rare)))
    k = min(10, n_rare_chunks)
    res = client.search(["how to read a file", "sorting lists"], k, fetch=True, filters={"licence": "rare"})
    assert (res.chunk_ids >= 0).all()  # k hits although most of the nearest chunks are filtered out
    assert {p.doc_id for row in res.payloads for p in row} <= rare
    plain = client.search(["how to read a file"], k)
    assert set(plain.chunk_ids[0].tolist()) != set(res.chunk_ids[0].tolist())
    # set membership and two fields ANDed
    res = client.search(["how to read a file"], 5, fetch=True, filters={"licence": ["mit", "rare"], "year": [2000, 2005]})
    docs = {p.doc_id for p in res.payloads[0]}
    assert docs and all(ds.metadata([d])[0]["year"] in (2000, 2005) for d in docs)
    # the same in process
    idx = server.servicer.b.dense
    assert np.array_equal(idx.search(["sorting lists"], k, filters={"licence": "rare"}).chunk_ids,
                          client.search(["sorting lists"], k, filters={"licence": "rare"}).chunk_ids)


def test_bad_filters_are_invalid_argument(client):
    from retromem.service.client import ServiceCallError

    for flt, text in (({"colour": "red"}, "colour"), ({"year": "not a year"}, "year")):
        with pytest.raises(ServiceCallError) as e:
            client.search(["x"], 3, filters=flt)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in e.value.details


def test_get_document_and_info(client, server):
    from retromem.service.client import ServiceCallError

    ds = server.servicer.b.datastore
    d = client.get_document(2)
    assert d["source_id"] == "src-27" and d["text"] == ds.document_text(2) and d["metadata"]["licence"] == "mit"
    first = ds.doc_first_chunk_array
    assert (d["first_chunk_id"], d["num_chunks"]) == (int(first[2]), int(first[3] - first[2]))
    assert client.get_document(2, text=False)["text"] is None
    with pytest.raises(ServiceCallError) as e:
        client.get_document(ds.num_documents)
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE
    info = client.info().datastore
    assert dict(info.metadata_fields) == {"year": "int64", "licence": "string"} and info.version == 1
