"""Metadata and source ids through both framework retrievers (LangChain and LlamaIndex), in process and
over a real server on loopback: a small datastore whose records carry their own fields (``lang``,
``year``) and ids; every hit names its input record and carries that record's fields, and a metadata
filter is enforced by the search (k hits, all matching), in process and remotely alike."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from tests.conftest import demo_records, write_jsonl  # noqa: E402

QUERY = "How do I read a file line by line?"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Six short documents, each with `lang` and `year`, embedded and indexed (Flat)."""
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    root = tmp_path_factory.mktemp("meta")
    recs = demo_records()
    docs = [{"id": f"doc-{i}", "text": recs[i]["text"], "lang": "fr" if j % 2 else "en", "year": 2000 + j}
            for j, i in enumerate((8, 3, 27, 29, 36, 21))]
    write_jsonl(root / "docs.jsonl", docs)
    build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(root / "ds"), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(root / "ds"), out=str(root / "emb"), batch_size=64), progress=False)
    dense = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "dense"), factory="Flat", tune=False),
                        progress=False)
    return {"dense": dense.out, "docs": {d["id"]: d for d in docs}}


@pytest.fixture(scope="module")
def server(store):
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server
    from retromem.service.servicer import Backend

    cfg = ServerConfig(dense=str(store["dense"]), port=0, workers=2)
    running = start_server(cfg, Backend.open(cfg))
    yield running
    running.stop(0)


def _langchain(store, server, remote: bool, **kw):
    from retromem.service.langchain import RetromemRetriever

    r = (RetromemRetriever.from_server(server.target, timeout=60, **kw) if remote
         else RetromemRetriever.from_index(store["dense"], **kw))
    return [d.metadata for d in r.invoke(QUERY)]


def _llamaindex(store, server, remote: bool, **kw):
    from retromem.service.llamaindex import RetromemRetriever

    r = (RetromemRetriever.from_server(server.target, timeout=60, **kw) if remote
         else RetromemRetriever.from_index(store["dense"], **kw))
    return [n.node.metadata for n in r.retrieve(QUERY)]


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "grpc"])
@pytest.mark.parametrize("retrieve", [_langchain, _llamaindex], ids=["langchain", "llamaindex"])
def test_hits_name_their_record_and_carry_its_fields(store, server, retrieve, remote):
    hits = retrieve(store, server, remote, k=6)
    assert len(hits) == 6
    for h in hits:
        rec = store["docs"][h["source_id"]]  # the input record's own id
        assert h["metadata"] == {"lang": rec["lang"], "year": rec["year"]}
    assert len({h["source_id"] for h in hits}) > 1


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "grpc"])
@pytest.mark.parametrize("retrieve", [_langchain, _llamaindex], ids=["langchain", "llamaindex"])
def test_filters_are_enforced_by_the_search(store, server, retrieve, remote):
    hits = retrieve(store, server, remote, k=5, filters={"lang": "fr"})
    assert len(hits) == 5 and all(h["metadata"]["lang"] == "fr" for h in hits)
    both = retrieve(store, server, remote, k=5, filters={"lang": "fr", "year": [2001, 2005]})
    assert {h["metadata"]["year"] for h in both} <= {2001, 2005} and len(both) == 5
