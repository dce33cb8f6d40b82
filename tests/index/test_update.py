"""`retromem index update` (issue 18): indexes built on version 1 follow the datastore through an
added segment, a takedown and a compaction. The dense index takes the new chunks without
retraining (an IVF index keeps its centroids) and finds them; the n-gram index gets a shard per
new segment and its counts equal a brute-force count over the live documents; after compaction
and an update the takedown check passes over the datastore and every index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import demo_records, write_jsonl
from tests.index.test_tombstones import brute_count, sample_ngrams

FIRST = [8, 3, 27, 29, 36, 21, 20, 30]
LATER = [35, 0, 12]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """(root, reports of the first update): indexes of version 1, then a segment added and indexed."""
    from retromem.datastore import BuildConfig, build
    from retromem.datastore.pipeline import add
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.fm_index import build_fm_index
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    root = tmp_path_factory.mktemp("update")
    recs = demo_records()
    write_jsonl(root / "first.jsonl", [{"id": f"d{i}", "text": recs[i]["text"]} for i in FIRST])
    write_jsonl(root / "later.jsonl", [{"id": f"d{i}", "text": recs[i]["text"]} for i in LATER])
    ds = root / "ds"
    build(BuildConfig(inputs=(str(root / "first.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(root / "emb"), batch_size=64), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "dense"), factory="IVF2,Flat", tune=False),
                progress=False)
    build_ngram_index(ds, root / "ngram", NgramBuildConfig(cpus=1), progress=False)
    build_fm_index(ds, root / "fm", progress=False)
    trained = (root / "dense" / "trained.index").read_bytes()
    add(ds, [str(root / "later.jsonl")], workers=1)
    r = CliRunner().invoke(__import__("retromem.cli", fromlist=["main"]).main,
                           ["index", "update", str(root / "dense"), str(root / "ngram"), str(root / "fm"), "--json"])
    assert r.exit_code == 0, r.output
    assert (root / "dense" / "trained.index").read_bytes() == trained  # no retraining
    return root, json.loads(r.stdout)


def _live_tokens(ds):
    dead = set(ds.deleted_doc_ids.tolist())
    return [np.asarray(ds.doc_token_ids(d), dtype=np.int64) for d in range(ds.num_documents) if d not in dead]


def test_update_adds_only_the_new_segment(grown):
    from retromem.datastore import Datastore
    from retromem.index.dense import DenseIndex
    from retromem.index.ngram import NgramIndex

    root, reports = grown
    ds = Datastore.open(root / "ds")
    assert ds.version == 2 and len(ds.segments) == 2
    new = ds.segments[1]
    dense, ngram, fm = reports
    assert dense["kind"] == "dense" and dense["added"] == new.n_chunks and len(dense["shards_written"]) == 2
    assert dense["recall_new_at_10"] is not None and dense["recall_new_at_10"] > 0.5
    assert ngram["kind"] == "ngram" and ngram["added"] == new.n_docs and len(ngram["shards_written"]) == 1
    idx = DenseIndex.open(root / "dense")
    assert idx.ntotal == ds.num_chunks
    # a new chunk's own text finds it
    cid = new.first_chunk_id + 1
    res = idx.search(ds.chunk_texts([cid]), 3)
    assert cid in res.chunk_ids[0].tolist()
    g = NgramIndex(root / "ngram")
    assert len(g.manifest["shards"]) == 2 and g.manifest["counts"]["documents"] == ds.num_documents
    live = _live_tokens(ds)
    for gram in sample_ngrams(live[-len(LATER):], np.random.default_rng(2), per=20):
        assert g.count(gram).count == brute_count(live, gram), gram
    from retromem.index.fm_index import FMIndex

    later_text = ds.document_text(new.first_doc_id)[100:140]
    assert FMIndex(root / "fm").count(later_text) >= 1
    # a second update has nothing to do
    from retromem.index.update import update_index

    assert update_index(root / "ngram").note == "up to date"
    assert update_index(root / "dense").added == 0


def test_takedown_compaction_and_update_leave_no_deleted_bytes(grown):
    from retromem.datastore import Datastore
    from retromem.datastore.takedown import check, compact
    from retromem.datastore.tombstones import delete
    from retromem.index.dense import DenseIndex
    from retromem.index.ngram import NgramIndex
    from retromem.index.update import update_index

    root, _ = grown
    ds_path = root / "ds"
    victims = [1, 9]  # one in each segment
    dead_tokens = [Datastore.open(ds_path).doc_token_ids(d) for d in victims]
    delete(ds_path, doc_ids=victims, reason="takedown test")
    ds = Datastore.open(ds_path)
    dirs = [root / "dense", root / "ngram", root / "fm"]
    assert not check([ds_path, *dirs], ds).ok  # the indexes (and the datastore) still hold the text
    compact(ds_path)
    ds = Datastore.open(ds_path)
    reports = [update_index(d) for d in dirs]
    assert reports[0].removed == len(ds.deleted_chunk_ids()) and reports[1].removed == len(victims)
    rep = check([ds_path, *dirs], ds)
    assert rep.ok, rep.found[:5]
    # the indexes still answer, over the live documents only
    live = _live_tokens(ds)
    g = NgramIndex(root / "ngram")
    for gram in sample_ngrams([t.astype(np.int64) for t in dead_tokens], np.random.default_rng(3), per=20):
        assert g.count(gram).count == brute_count(live, gram), gram
    idx = DenseIndex.open(root / "dense")
    res = idx.search(["read a file", "sorting"], 10)
    assert (res.chunk_ids >= 0).all() and not set(res.chunk_ids.reshape(-1).tolist()) & set(ds.deleted_chunk_ids().tolist())
