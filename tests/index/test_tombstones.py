"""Tombstones on every query path (issue 18): after a takedown, every index answers as if the
deleted documents were not there. N-gram counts, probabilities and distributions equal a brute-force
count over the live documents' tokens (random n-grams of real text); no verb returns an occurrence
in a deleted document; dense search never returns a deleted chunk and still returns k hits;
BM25 and the FM-index likewise."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import demo_records, write_jsonl

DOCS = [8, 3, 27, 29, 36, 21, 20, 30, 35, 0]
DELETED = [1, 4, 7]


@pytest.fixture(scope="module")
def taken_down(tmp_path_factory):
    """A datastore of ten documents with every index kind built on version 1, then documents
    DELETED taken down in version 2."""
    from retromem.datastore import BuildConfig, build
    from retromem.datastore.tombstones import delete
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.fm_index import build_fm_index
    from retromem.index.lexical import build_lexical_index
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    root = tmp_path_factory.mktemp("tomb")
    recs = demo_records()
    write_jsonl(root / "docs.jsonl", [{"id": f"doc-{i}", "text": recs[i]["text"], "kind": "a" if i % 2 else "b"}
                                      for i in DOCS])
    ds = root / "ds"
    build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(ds), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(ds), out=str(root / "emb"), batch_size=64), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "dense"), factory="Flat", tune=False), progress=False)
    build_ngram_index(ds, root / "ngram", NgramBuildConfig(cpus=1, shard_tokens=6000), progress=False)  # several shards
    build_fm_index(ds, root / "fm", progress=False)
    build_lexical_index(ds, root / "bm25", progress=False)
    delete(ds, doc_ids=DELETED, reason="test takedown")
    return root


@pytest.fixture(scope="module")
def live_tokens(taken_down):
    from retromem.datastore import Datastore

    ds = Datastore.open(taken_down / "ds")
    assert ds.version == 2 and ds.deleted_doc_ids.tolist() == DELETED
    live = [np.asarray(ds.doc_token_ids(d), dtype=np.int64) for d in range(ds.num_documents) if d not in DELETED]
    dead = [np.asarray(ds.doc_token_ids(d, include_deleted=True), dtype=np.int64) for d in DELETED]
    return live, dead


def brute_count(docs: list[np.ndarray], ids: list[int]) -> int:
    n = len(ids)
    q = np.asarray(ids)
    return sum(int((np.lib.stride_tricks.sliding_window_view(d, n) == q).all(axis=1).sum()) for d in docs if len(d) >= n)


def sample_ngrams(docs: list[np.ndarray], rng, n_max: int = 4, per: int = 40) -> list[list[int]]:
    out = []
    for _ in range(per):
        d = docs[rng.integers(len(docs))]
        n = int(rng.integers(1, n_max + 1))
        i = int(rng.integers(0, len(d) - n))
        out.append(d[i:i + n].tolist())
    return out


def test_ngram_counts_equal_brute_force_over_live_documents(taken_down, live_tokens):
    from retromem.index.ngram import NgramIndex

    live, dead = live_tokens
    idx = NgramIndex(taken_down / "ngram")
    assert len(idx.manifest["shards"]) > 1
    rng = np.random.default_rng(0)
    # n-grams drawn from deleted documents (most have fewer live occurrences) and from live ones
    grams = sample_ngrams(dead, rng) + sample_ngrams(live, rng)
    changed = 0
    for g in grams:
        want = brute_count(live, g)
        assert idx.count(g).count == want, g
        changed += brute_count(dead, g) > 0
        f = idx.find(g, limit=1000)
        assert f.count == want and len(f.occurrences) == want
        assert not {o.doc_id for o in f.occurrences} & set(DELETED)
    assert changed > 20  # the deletions did change these counts
    only_dead = [g for g in sample_ngrams(dead, rng, n_max=8, per=60) if brute_count(live, g) == 0]
    assert only_dead, "some long n-grams occur only in deleted documents"
    for g in only_dead[:10]:
        assert idx.count(g).count == 0 and idx.find(g).occurrences == ()


def test_ngram_probabilities_and_distributions_over_live_documents(taken_down, live_tokens):
    from retromem.index.ngram import NgramIndex

    live, dead = live_tokens
    idx = NgramIndex(taken_down / "ngram")
    total = sum(len(d) + 1 for d in live)  # positions, one separator per document
    rng = np.random.default_rng(1)
    for g in sample_ngrams(dead, rng, n_max=3, per=25):
        prompt, nxt = g[:-1], g[-1]
        p = idx.prob(prompt, nxt)
        pc = brute_count(live, prompt) if prompt else total
        assert (p.prompt_count, p.cont_count) == (pc, brute_count(live, prompt + [nxt]))
        if prompt:
            d = idx.next_token_distribution(prompt)
            assert d.prompt_count == pc and not d.approx
            want: dict[int, int] = {}
            for doc in live:
                for i in range(len(doc) - len(prompt)):
                    if doc[i:i + len(prompt)].tolist() == prompt:
                        want[int(doc[i + len(prompt)])] = want.get(int(doc[i + len(prompt)]), 0) + 1
            assert {t: c.count for t, c in d.tokens.items()} == want
        # infini-gram: the longest suffix occurring in the live documents
        ip = idx.infgram_prob(g[:-1] or [nxt], nxt)
        ids = g[:-1] or [nxt]
        n = max([k for k in range(len(ids) + 1) if k == 0 or brute_count(live, ids[len(ids) - k:]) > 0])
        assert ip.suffix_len == n
        suffix = ids[len(ids) - n:]
        assert ip.prompt_count == (brute_count(live, suffix) if n else total)
        assert ip.cont_count == brute_count(live, suffix + [nxt])


def test_the_subtraction_path_agrees_with_the_engine_without_deletions(taken_down):
    """Where nothing is deleted the engine answers; the live-count path must give the same answers."""
    from retromem.index.ngram import NgramIndex, _Deleted

    idx = NgramIndex(taken_down / "ngram")
    plain = NgramIndex(taken_down / "ngram")
    plain._deleted = None
    empty = NgramIndex(taken_down / "ngram")
    empty._deleted = _Deleted(empty, np.zeros(0, np.int64))  # forces the live-count path with nothing subtracted
    for prompt, t in (([464], 262), ([262, 1332], 286), ([], 13), ([50000, 262], 262)):
        assert empty.prob(prompt, t) == plain.prob(prompt, t)
        assert empty.infgram_prob(prompt, t) == plain.infgram_prob(prompt, t)
    assert idx.count([262]).count <= plain.count([262]).count


def test_document_search_and_continuations_skip_deleted_documents(taken_down, live_tokens):
    from retromem.index.ngram import NgramIndex

    live, dead = live_tokens
    idx = NgramIndex(taken_down / "ngram")
    g = dead[0][10:12].tolist()
    r = idx.search_documents([[g]], max_hits=1000)
    assert not set(r.doc_ids) & set(DELETED)
    assert r.count == brute_count(live, g)
    c = idx.continuations(g, depth=3)
    assert c.count == brute_count(live, g)


def test_dense_never_returns_a_deleted_chunk_and_still_returns_k(taken_down):
    from retromem.datastore import Datastore
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    ds = Datastore.open(taken_down / "ds")
    dead = set(ds.deleted_chunk_ids().tolist())
    idx = DenseIndex.open(taken_down / "dense")
    emb = Embeddings(idx.meta["embeddings_path"])
    x = emb.get(np.asarray(sorted(dead), dtype=np.int64)).astype(np.float32)  # the deleted chunks themselves as queries
    k = 10
    res = idx.search(x, k)
    assert (res.chunk_ids >= 0).all()  # k hits each
    assert not set(res.chunk_ids.reshape(-1).tolist()) & dead
    res = idx.search(x[:3], k, exclude_doc_ids=[[0], [2], None])  # exclusions and tombstones together
    assert (res.chunk_ids >= 0).all() and not set(res.chunk_ids.reshape(-1).tolist()) & dead
    # with a metadata filter too, still k hits, all matching and live
    res = idx.search(x[:3], k, filters={"kind": "a"}, fetch=True)
    assert (res.chunk_ids >= 0).all() and not set(res.chunk_ids.reshape(-1).tolist()) & dead
    assert all(p.metadata["kind"] == "a" for row in res.payloads for p in row)


def test_bm25_and_fm_index_honour_tombstones(taken_down, live_tokens):
    from retromem.datastore import Datastore
    from retromem.index.fm_index import FMIndex
    from retromem.index.lexical import LexicalIndex

    ds = Datastore.open(taken_down / "ds")
    dead = set(ds.deleted_chunk_ids().tolist())
    bm = LexicalIndex.open(taken_down / "bm25")
    texts = ds.chunk_texts(sorted(dead)[:5], include_deleted=True)
    res = bm.search(texts, 10)
    assert not set(res.chunk_ids.reshape(-1).tolist()) & dead
    fm = FMIndex(taken_down / "fm")
    for d in DELETED:
        word = ds.document_text(d, include_deleted=True)[200:230]
        want = sum(ds.document_text(e).count(word) for e in range(ds.num_documents) if e not in DELETED)
        # overlapping occurrences are rare in 30 characters of prose: str.count agrees here
        assert fm.count(word) == want
        hits = fm.find(word, limit=100)
        assert hits.count == want and not {h.doc_id for h in hits.hits} & set(DELETED)
