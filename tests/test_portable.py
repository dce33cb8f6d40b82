"""Portable artifacts (issue 18): a tree of datastore + embeddings + every index kind, copied to a
new place with the original deleted, still opens, searches and serves; manifests record relative
paths; `--datastore` points at a moved datastore and refuses another one by datastore_id; an
older manifest with an absolute path still opens."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import demo_records, write_jsonl

DOCS = [8, 3, 27, 29, 36, 21]


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """(the tree's new root, search answers taken before the move)."""
    from retromem.datastore import BuildConfig, build
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.fm_index import FMIndex, build_fm_index
    from retromem.index.lexical import LexicalIndex, build_lexical_index
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    # "portable" holds "table": the n-gram engine once took every file under such a folder for a suffix array
    base = tmp_path_factory.mktemp("portable")
    root = base / "original" / "tree"
    root.mkdir(parents=True)
    recs = demo_records()
    write_jsonl(base / "docs.jsonl", [{"id": recs[i]["id"], "text": recs[i]["text"]} for i in DOCS])
    build(BuildConfig(inputs=(str(base / "docs.jsonl"),), out=str(root / "ds"), tokenizer="gpt2", workers=1))
    emb = embed_datastore(EmbedConfig(datastore=str(root / "ds"), out=str(root / "emb"), batch_size=64), progress=False)
    build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "indexes" / "dense"), factory="Flat", tune=False),
                progress=False)
    build_ngram_index(root / "ds", root / "indexes" / "ngram", NgramBuildConfig(cpus=1), progress=False)
    build_fm_index(root / "ds", root / "indexes" / "fm", progress=False)
    build_lexical_index(root / "ds", root / "indexes" / "bm25", progress=False)
    before = {
        "dense": DenseIndex.open(root / "indexes" / "dense").search(["read a file"], 5).chunk_ids.tolist(),
        "ngram": NgramIndex(root / "indexes" / "ngram").count("the").count,
        "fm": FMIndex(root / "indexes" / "fm").count("Python"),
        "bm25": LexicalIndex.open(root / "indexes" / "bm25").search(["read a file"], 5).chunk_ids.tolist(),
    }
    new = base / "elsewhere" / "deeper" / "tree"
    shutil.copytree(root, new)
    shutil.rmtree(base / "original")
    return new, before


def test_manifests_record_relative_paths(moved):
    root, _ = moved
    for rel, name in (("emb", "embeddings.json"), ("indexes/dense", "index.json"), ("indexes/ngram", "ngram_index.json"),
                      ("indexes/fm", "fm_index.json"), ("indexes/bm25", "lexical_index.json")):
        m = json.loads((root / rel / name).read_text())
        for key in ("datastore_path", "embeddings_path"):
            if key in m:
                assert not m[key].startswith("/"), (rel, key, m[key])
        assert (root / rel / m["datastore_path"]).resolve() == (root / "ds").resolve()


def test_the_moved_tree_opens_and_answers_as_before(moved):
    from retromem.index.dense import DenseIndex
    from retromem.index.fm_index import FMIndex
    from retromem.index.lexical import LexicalIndex
    from retromem.index.ngram import NgramIndex

    root, before = moved
    dense = DenseIndex.open(root / "indexes" / "dense")
    res = dense.search(["read a file"], 5, fetch=True)
    assert res.chunk_ids.tolist() == before["dense"]
    assert dense.datastore.path.resolve() == (root / "ds").resolve()
    assert all(p.source_id for p in res.payloads[0])  # every hit names its source document
    assert NgramIndex(root / "indexes" / "ngram").count("the").count == before["ngram"]
    assert FMIndex(root / "indexes" / "fm").count("Python") == before["fm"]
    assert LexicalIndex.open(root / "indexes" / "bm25").search(["read a file"], 5).chunk_ids.tolist() == before["bm25"]


def test_the_moved_tree_serves(moved):
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    root, before = moved
    # no --datastore: each index finds the datastore by its recorded relative path
    running = start_server(ServerConfig(dense=str(root / "indexes" / "dense"), ngram=str(root / "indexes" / "ngram"), port=0,
                                        workers=2))
    try:
        with RetrievalClient(running.target, timeout=20) as c:
            res = c.search(["read a file"], 5, fetch=True)
            assert res.chunk_ids.tolist() == before["dense"]
            assert c.count("the").count == before["ngram"]
            assert all(p.source_id for p in res.payloads[0])
    finally:
        running.stop(0)


def test_datastore_flag_points_at_a_moved_datastore_and_refuses_another(moved, tmp_path, service_stores):
    from retromem.cli import main
    from retromem.errors import IndexFormatError, NgramIndexError
    from retromem.index.dense import DenseIndex
    from retromem.index.ngram import NgramIndex

    root, before = moved
    # the datastore moves again, away from the indexes: the recorded path no longer reaches it
    shutil.move(str(root / "ds"), str(tmp_path / "ds-moved"))
    try:
        with pytest.raises(IndexFormatError, match="--datastore"):
            DenseIndex.open(root / "indexes" / "dense").search(["read a file"], 5)
        runner = CliRunner()
        r = runner.invoke(main, ["index", "dense", "search", str(root / "indexes" / "dense"), "read a file", "-k", "5",
                                 "--json", "--datastore", str(tmp_path / "ds-moved")])
        assert r.exit_code == 0, r.output
        assert [h["chunk_id"] for h in json.loads(r.stdout)[0]] == before["dense"][0]
        assert NgramIndex(root / "indexes" / "ngram", tmp_path / "ds-moved").count("the").count == before["ngram"]
        # another datastore (another datastore_id) is refused, naming the flag
        other = service_stores["a"].datastore
        r = runner.invoke(main, ["index", "dense", "search", str(root / "indexes" / "dense"), "read a file",
                                 "--datastore", str(other)])
        assert r.exit_code == 2 and "will not serve another datastore" in r.output and "--datastore" in r.output
        with pytest.raises(NgramIndexError, match="was built from datastore"):
            NgramIndex(root / "indexes" / "ngram", other)
        from retromem.service.config import ServerConfig
        from retromem.service.servicer import Backend

        with pytest.raises(IndexFormatError, match="will not serve another datastore"):
            Backend.open(ServerConfig(datastore=str(other), dense=str(root / "indexes" / "dense")))
        b = Backend.open(ServerConfig(datastore=str(tmp_path / "ds-moved"), dense=str(root / "indexes" / "dense"),
                                      ngram=str(root / "indexes" / "ngram")))
        assert b.ngram.count("the").count == before["ngram"]
    finally:
        shutil.move(str(tmp_path / "ds-moved"), str(root / "ds"))


def test_an_older_manifest_with_an_absolute_path_still_opens(moved, tmp_path):
    from retromem.index.dense import DenseIndex

    root, before = moved
    copy = tmp_path / "dense"
    shutil.copytree(root / "indexes" / "dense", copy)
    m = json.loads((copy / "index.json").read_text())
    m["datastore_path"] = str((root / "ds").resolve())  # as indexes before issue 18 recorded it
    m["embeddings_path"] = str((root / "emb").resolve())
    (copy / "index.json").write_text(json.dumps(m))
    idx = DenseIndex.open(copy)
    assert idx.search(["read a file"], 5).chunk_ids.tolist() == before["dense"]
    assert np.array_equal(idx.datastore.doc_first_chunk_array, DenseIndex.open(root / "indexes" / "dense").datastore.doc_first_chunk_array)
