"""BM25 over a real (small) datastore: scores against the Lucene formula computed here, a planted
passage found at rank 1 with its chunk and document ids, exclusion, the job's refusals, and the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from retromem.errors import ConfigError, IndexFormatError, QueryError
from retromem.index.lexical import LexicalBuildConfig, LexicalIndex, build_lexical_index, tokenize

from tests.conftest import demo_records, write_jsonl

PLANTED = ("The quartermaster catalogued seventeen zebrafish aquariums beside the harmonium, "
           "then polished the brass orrery twice before dawn.")


def _store(root, records):
    from retromem.datastore import BuildConfig, Datastore, build

    write_jsonl(root / "docs.jsonl", records)
    cfg = BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(root / "ds"), tokenizer="gpt2", chunk_length=32,
                      workers=1)
    build(cfg)
    return Datastore.open(cfg.out)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    """6 demo documents cut to 1,500 characters, and one with the planted passage in its middle."""
    recs = [{"id": r["id"], "text": r["text"][:1500]} for r in demo_records()[:6]]
    host = demo_records()[7]["text"][:600]
    recs.append({"id": "planted", "text": host[:300] + " " + PLANTED + " " + host[300:]})
    return _store(tmp_path_factory.mktemp("lex-ds"), recs)


@pytest.fixture(scope="module")
def other_ds(built):
    """Another datastore: the session's shared one (tests/conftest.py), built once for every index test."""
    from retromem.datastore import Datastore

    return Datastore.open(built[1].out)


@pytest.fixture(scope="module")
def idx_dir(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("lex") / "bm25"
    res = build_lexical_index(ds.path, out, progress=False)
    assert not res.already_complete and res.manifest["counts"]["chunks"] == ds.num_chunks
    return out


@pytest.fixture(scope="module")
def idx(idx_dir, ds):
    return LexicalIndex.open(idx_dir, datastore=ds)


def test_scores_are_lucene_bm25_over_the_chunks(ds, idx):
    terms = tokenize(ds.chunk_texts(np.arange(ds.num_chunks)), "stopwords-en")
    n, avgdl = len(terms), sum(map(len, terms)) / len(terms)
    df = Counter(t for doc in terms for t in set(doc))
    k1, b = 1.5, 0.75
    query = "Python lists and dictionaries loop"
    q = tokenize([query], "stopwords-en")[0]
    assert q and "and" not in q  # stop words dropped, lowercased
    want = np.zeros(n)
    for c, doc in enumerate(terms):
        tf = Counter(doc)
        for t in set(q):
            if tf[t]:
                idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
                want[c] += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(doc) / avgdl))
    np.testing.assert_allclose(idx.scores(query), want, rtol=1e-4, atol=1e-5)
    res = idx.search([query], 5)
    # the best five by the reference scores (ties may fall either way in float32)
    np.testing.assert_allclose(want[res.chunk_ids[0]], np.sort(want)[::-1][:5], rtol=1e-4)
    np.testing.assert_allclose(res.scores[0], np.sort(want)[::-1][:5], rtol=1e-4)


def test_planted_passage_is_found_at_rank_one_with_its_ids(ds, idx):
    planted_doc = ds.num_documents - 1
    res = idx.search([PLANTED, "zebrafish orrery quartermaster"], 3, fetch=True)
    for row, pays in zip(res.chunk_ids, res.payloads):
        assert ds.doc_ids([row[0]])[0] == planted_doc
        assert pays[0].doc_id == planted_doc and pays[0].chunk_id == row[0]
        assert "zebrafish" in (pays[0].text + (pays[0].continuation_text or ""))
    assert res.scores[0, 0] > res.scores[0, 1] and res.scores.dtype == np.float32
    # excluding its document: no planted chunk, still ranked hits
    ex = idx.search([PLANTED], 3, exclude_doc_ids=[planted_doc])
    assert planted_doc not in ds.doc_ids(ex.chunk_ids[0][ex.chunk_ids[0] >= 0]).tolist()
    # a query of stop words only matches nothing: no hits rather than arbitrary ones
    none = idx.search(["the and of"], 4)
    assert (none.chunk_ids == -1).all() and np.isneginf(none.scores).all()
    with pytest.raises(QueryError, match="k must be in"):
        idx.search(["x"], 0)
    with pytest.raises(QueryError, match="a batch"):
        idx.search("one string", 2)


def test_rerun_returns_the_finished_index_and_other_datastores_are_refused(ds, other_ds, idx_dir, tmp_path):
    before = (idx_dir / "lexical_index.json").read_bytes()
    again = build_lexical_index(ds.path, idx_dir, progress=False)
    assert again.already_complete and (idx_dir / "lexical_index.json").read_bytes() == before
    with pytest.raises(IndexFormatError, match="of datastore"):
        build_lexical_index(other_ds.path, idx_dir, progress=False)
    with pytest.raises(IndexFormatError, match="built with"):
        build_lexical_index(ds.path, idx_dir, LexicalBuildConfig(tokenization="words"), progress=False)
    with pytest.raises(IndexFormatError, match="will not serve another datastore"):
        LexicalIndex.open(idx_dir, datastore=other_ds)
    with pytest.raises(IndexFormatError, match="not a lexical index"):
        LexicalIndex.open(tmp_path)
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(ConfigError, match="refusing"):
        build_lexical_index(ds.path, tmp_path, progress=False)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
    with pytest.raises(ConfigError, match=r"`tokenization` \(--tokenization\)"):
        LexicalBuildConfig(tokenization="porter")


def test_a_truncated_index_file_is_refused(ds, tmp_path):
    out = tmp_path / "bm25"
    build_lexical_index(ds.path, out, progress=False)
    from retromem.cli import main

    assert CliRunner().invoke(main, ["index", "verify", str(out)]).exit_code == 0
    victim = next(p for p in (out / "bm25").iterdir() if p.suffix == ".npy")
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size: only the recorded checksum finds it
    victim.write_bytes(bytes(data))
    r = CliRunner().invoke(main, ["index", "verify", str(out)])
    assert r.exit_code != 0 and victim.name in r.output
    victim.write_bytes(bytes(data[:-8]))
    with pytest.raises(IndexFormatError, match="truncated or replaced"):
        LexicalIndex.open(out, datastore=ds)


def test_cli_build_search_and_errors(ds, other_ds, tmp_path):
    from retromem.cli import main

    out = tmp_path / "bm25"
    r = CliRunner().invoke(main, ["index", "lexical", "build", str(ds.path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "lexical index" in r.output and f"{ds.num_chunks:,} chunks" in r.output
    r = CliRunner().invoke(main, ["index", "lexical", "search", str(out), "zebrafish orrery", "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.output)
    assert hits[0][0]["doc_id"] == ds.num_documents - 1 and "zebrafish" in hits[0][0]["text"] + (hits[0][0]["continuation"] or "")
    r = CliRunner().invoke(main, ["index", "lexical", "search", str(tmp_path), "x"])
    assert r.exit_code == 2 and "not a lexical index" in r.output
    r = CliRunner().invoke(main, ["index", "lexical", "search", str(out), "x", "--datastore", str(other_ds.path)])
    assert r.exit_code == 2 and "will not serve another datastore" in r.output
    r = CliRunner().invoke(main, ["index", "lexical", "build", str(other_ds.path), "--out", str(out)])
    assert r.exit_code == 2 and "pass --overwrite" in r.output
    r = CliRunner().invoke(main, ["index", "lexical", "build", str(other_ds.path), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0, r.output
