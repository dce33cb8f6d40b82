import numpy as np
import pytest

from retromem.datastore import Datastore
from retromem.errors import DatastoreError


def test_chunk_records_and_neighbour_units(built):
    _, cfg = built
    ds = Datastore.open(cfg.out)
    doc = ds.document(3)
    ids = ds.document_chunk_ids(3)
    chunks = ds.chunks(ids)
    assert [c.position for c in chunks] == list(range(len(ids)))
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(doc.text)
    assert all(doc.text[c.char_start : c.char_end] == c.text for c in chunks)
    assert [c.continuation_id for c in chunks] == [int(i) for i in ids[1:]] + [None]
    unit, lens = ds.neighbour_tokens(ids[:2])
    L = ds.chunk_length
    np.testing.assert_array_equal(unit[0, :L], ds.token_array[ids[0]])
    np.testing.assert_array_equal(unit[0, L:], ds.token_array[ids[1]])
    assert lens[0] == L + min(L, int(ds.tokens([ids[1]])[1][0]))
    # the last chunk of a document has no continuation: padding after its own tokens
    last_unit, last_len = ds.neighbour_tokens([ids[-1]])
    assert last_len[0] == len(chunks[-1].tokens)
    assert (last_unit[0, last_len[0]:] == ds.pad_token_id).all()


def test_document_metadata(built):
    _, cfg = built
    ds = Datastore.open(cfg.out)
    rows = list(ds.iter_documents(["doc_id", "source_id", "n_chunks"]))
    assert [r["doc_id"] for r in rows] == list(range(ds.num_documents))
    for r in rows[::3]:
        d = ds.document(r["doc_id"])
        assert d.source_id == r["source_id"] and d.n_chunks == r["n_chunks"]


def test_bad_ids_and_paths_are_clear_errors(built, tmp_path):
    _, cfg = built
    ds = Datastore.open(cfg.out)
    with pytest.raises(IndexError, match="chunk_id .* out of range"):
        ds.tokens([0, ds.num_chunks])
    with pytest.raises(IndexError, match="doc_id -1 out of range"):
        ds.document(-1)
    with pytest.raises(DatastoreError, match="no manifest.json"):
        Datastore.open(tmp_path)


def test_verify_detects_a_changed_token(built, tmp_path):
    import shutil

    _, cfg = built
    copy = tmp_path / "copy"
    shutil.copytree(cfg.out, copy)
    arr = np.load(copy / "arrays" / "tokens.npy", mmap_mode="r+")
    arr[5, 3] = arr[5, 3] + 1
    arr.flush()
    assert any("tokens.npy" in p for p in Datastore.open(copy).verify())
