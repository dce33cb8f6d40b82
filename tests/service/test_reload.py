"""Reload without downtime (issue 18): a real server on loopback, hammered by concurrent calls
while the datastore gains a version (an added segment, a takedown) and the server reloads by RPC
and by SIGHUP; every call succeeds, and after the reload the new version is served: new ids
fetchable, deleted ones refused."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from tests.conftest import demo_records, write_jsonl

DOCS = [8, 3, 27, 29]
NEW = [36, 21]


def _records(idx):
    recs = demo_records()
    return [{"id": f"doc-{i}", "text": recs[i]["text"], "lang": "en" if i % 2 else "fr"} for i in idx]


@pytest.fixture()
def store(tmp_path):
    """(datastore dir, Flat dense index dir, n-gram index dir): four documents, one version."""
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    write_jsonl(tmp_path / "docs.jsonl", _records(DOCS))
    write_jsonl(tmp_path / "new.jsonl", _records(NEW))
    ds = tmp_path / "ds"
    build(BuildConfig(inputs=(str(tmp_path / "docs.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(tmp_path / "emb"), batch_size=64), progress=False)
    dense = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(tmp_path / "dense"), factory="Flat", tune=False),
                        progress=False)
    build_ngram_index(ds, tmp_path / "ngram", NgramBuildConfig(cpus=1), progress=False)
    return ds, dense.out, tmp_path / "ngram"


def test_reload_rpc_while_calls_run(store, tmp_path):
    from retromem.datastore import Datastore
    from retromem.datastore.pipeline import add
    from retromem.datastore.tombstones import delete
    from retromem.service.client import RetrievalClient, ServiceCallError
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    ds_path, dense, ngram = store
    old = Datastore.open(ds_path)
    n_chunks, n_docs = old.num_chunks, old.num_documents
    probe = old.doc_token_ids(0)[5:15].tolist()  # ten tokens of the document taken down below
    running = start_server(ServerConfig(datastore=str(ds_path), dense=str(dense), ngram=str(ngram), port=0, workers=4))
    errors: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def hammer():
        with RetrievalClient(running.target, timeout=30) as c:
            while not stop.is_set():
                try:
                    res = c.search(["how to read a file"], 3, fetch=True)
                    assert (res.chunk_ids[0] >= 0).all()
                    c.get_chunks([n_chunks - 1])  # a chunk of a document that stays
                    c.info()
                    calls[0] += 1
                except BaseException as exc:  # noqa: BLE001 - every failure is reported
                    errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        with RetrievalClient(running.target, timeout=60) as c:
            with pytest.raises(ServiceCallError) as e:
                c.get_chunks([n_chunks])  # not there yet
            assert e.value.code == grpc.StatusCode.NOT_FOUND
            add(ds_path, [str(tmp_path / "new.jsonl")], workers=1)
            before = calls[0]
            r = c.reload()
            assert r.version == 2 and r.num_documents == n_docs + len(NEW) and r.num_chunks > n_chunks
            got = c.get_chunks([n_chunks])  # the added segment's first chunk, served now
            assert got[0].doc_id == n_docs and got[0].source_id == f"doc-{NEW[0]}"
            assert c.info().datastore.version == 2
            doc = c.get_document(n_docs)
            assert doc["source_id"] == f"doc-{NEW[0]}" and doc["first_chunk_id"] == n_chunks and doc["text"]
            # a takedown: the next reload stops serving it at once
            delete(ds_path, doc_ids=[0], reason="test takedown")
            r = c.reload()
            assert r.version == 3 and r.deleted_documents == 1
            first = Datastore.open(ds_path).doc_first_chunk_array
            with pytest.raises(ServiceCallError) as e:
                c.get_chunks([int(first[0])])
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and str(int(first[0])) in e.value.details
            with pytest.raises(ServiceCallError) as e:
                c.get_document(0)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
            res = c.search(["how to read a file", "sorting lists"], 5)
            assert not set(res.chunk_ids.reshape(-1).tolist()) & set(range(int(first[0]), int(first[1])))
            assert (res.chunk_ids >= 0).all()  # still k hits
            # the n-gram verbs: no occurrence in the deleted document is counted or returned
            live = [Datastore.open(ds_path).doc_token_ids(d).tolist() for d in range(1, n_docs)]
            want = sum(1 for t in live for i in range(len(t) - 1) if t[i:i + 2] == probe[:2])
            assert c.count(probe[:2]).count == want
            assert c.count(probe).count == sum(1 for t in live for i in range(len(t)) if t[i:i + 10] == probe)
            assert 0 not in {o.doc_id for o in c.find(probe[:2], limit=100).occurrences}
            assert 0 not in set(c.search_documents([[probe[:3]]], max_hits=100).doc_ids)
        time.sleep(0.5)
        assert calls[0] > before  # calls kept flowing through both reloads
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        running.stop(0)
    assert not errors, errors[:3]


def test_sighup_reloads_a_running_server(tmp_path):
    """`retromem serve` reloads on SIGHUP (a datastore-only server: no model to load)."""
    from retromem.datastore import BuildConfig, build
    from retromem.datastore.pipeline import add
    from retromem.service.client import RetrievalClient

    write_jsonl(tmp_path / "docs.jsonl", _records(DOCS))
    write_jsonl(tmp_path / "new.jsonl", _records(NEW))
    ds = tmp_path / "ds"
    build(BuildConfig(inputs=(str(tmp_path / "docs.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", "--datastore", str(ds), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        port = int(re.search(r"on [^ ]+:(\d+)", line).group(1))
        with RetrievalClient(f"127.0.0.1:{port}", timeout=30) as c:
            n = c.info().datastore.num_documents
            add(ds, [str(tmp_path / "new.jsonl")], workers=1)
            assert c.info().datastore.num_documents == n  # nothing changes until asked
            proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while c.info().datastore.num_documents == n and time.monotonic() < deadline:
                time.sleep(0.1)
            info = c.info().datastore
            assert info.num_documents == n + len(NEW) and info.version == 2
    finally:
        proc.terminate()
        proc.wait(30)


def test_ray_serve_health_probe_reads_a_live_chunk(store):
    """A Ray Serve shard replica's health check (run here in process: the same object Serve calls)
    stays healthy when document 0 is taken down: it probes the first live document's chunk, not
    chunk 0, which the servicer refuses (FAILED_PRECONDITION) once its document is deleted."""
    from retromem.datastore import Datastore
    from retromem.datastore.tombstones import delete
    from retromem.service.config import ServerConfig
    from retromem.service.ray_serve import ShardReplica, _first_live_chunk

    ds_path, dense, ngram = store
    cfg = ServerConfig(datastore=str(ds_path), dense=str(dense), ngram=str(ngram), port=0, workers=1)
    ShardReplica(cfg).check_health()
    delete(ds_path, doc_ids=[0, 1], reason="test", who="test")
    ds = Datastore.open(ds_path)
    assert _first_live_chunk(ds) == int(ds.doc_first_chunk_array[2])
    ShardReplica(cfg).check_health()  # probed chunk 0 before: refused, and Serve restarted the replica forever
    delete(ds_path, doc_ids=[2, 3], reason="test", who="test")
    assert _first_live_chunk(Datastore.open(ds_path)) is None
