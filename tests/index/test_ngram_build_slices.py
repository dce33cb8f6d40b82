"""An n-gram shard's task reads only its own documents (issue 19): its token counts are its slice of
the whole datastore's, and it neither hashes nor reads the datastore shards outside its range, so a
shard's time and memory follow the shard, not the datastore. Real datastore, real indexer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from retromem.errors import ArtifactCorruptError
from retromem.index.ngram_build import _doc_token_counts, _ngram_shard, _plan_shards, token_dtype


def _whole_counts(ds) -> tuple[np.ndarray, np.ndarray]:
    # the whole-datastore computation the tasks used to repeat for every shard
    first = np.asarray(ds.doc_first_chunk_array, dtype=np.int64)
    csum = np.concatenate(([0], np.cumsum(ds.chunk_ntokens_array.astype(np.int64))))
    return first, csum[first[1:]] - csum[first[:-1]]


@pytest.fixture()
def damaged_tail(built, tmp_path):
    """A copy of the shared datastore whose last shard's tokens are damaged (one byte flipped)."""
    from retromem.datastore import Datastore

    src = built[1].out
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    ds = Datastore.open(dst)
    seg = ds._segs[0]
    assert len(seg.shards) >= 3, "the fixture datastore should have several shards"
    last = max(i for i, rec in enumerate(seg.shards) if int(rec["chunks"]))  # the last shard that holds chunks
    tokens = next(dst.rglob("tokens.npy"))
    data = bytearray(tokens.read_bytes())
    data[-3] ^= 0x01  # a token of the last chunk, which the last shard holds
    tokens.write_bytes(bytes(data))
    return dst, int(seg.shard_first_chunk[last]), int(seg.shard_first_doc[last])


def test_slice_counts_equal_the_whole_datastores(built):
    from retromem.datastore import Datastore

    ds = Datastore.open(built[1].out)
    first, counts = _whole_counts(ds)
    n = ds.num_documents
    for d0, d1 in [(0, n), (0, 1), (3, 7), (n - 2, n)] + _plan_shards(counts, 60_000):
        f, c = _doc_token_counts(ds, d0, d1)
        np.testing.assert_array_equal(f, first[d0 : d1 + 1])
        np.testing.assert_array_equal(c, counts[d0:d1])


def test_a_shard_task_reads_only_its_own_datastore_shards(damaged_tail, tmp_path):
    from retromem.datastore import Datastore

    dst, tail_chunk, tail_doc = damaged_tail
    ds = Datastore.open(dst)
    # the damage is found by a read of the whole datastore, and by a read of the damaged range
    with pytest.raises(ArtifactCorruptError):
        Datastore.open(dst).token_rows(0, ds.num_chunks)
    with pytest.raises(ArtifactCorruptError):
        Datastore.open(dst).token_rows(ds.num_chunks - 1, ds.num_chunks)
    rows = Datastore.open(dst).token_rows(1, tail_chunk)  # not the damaged shard: read and verified
    assert rows.shape == (tail_chunk - 1, ds.chunk_length)

    # the task of documents [1, tail_doc) writes their stream without touching the damaged shard
    width = 2
    out, work = tmp_path / "ng", tmp_path / "work"
    rec = _ngram_shard((str(dst), str(out), str(work), width, 1, 64 << 20), (0, 1, tail_doc))
    stream = np.fromfile(out / "shard-00000" / "tokenized.0", dtype=token_dtype(width))
    sep = np.iinfo(stream.dtype).max
    expected = []
    for d in range(1, tail_doc):
        toks, lens = ds.tokens(ds.document_chunk_ids(d))
        expected += [sep] + np.concatenate([t[:k] for t, k in zip(toks, lens)]).tolist()
    np.testing.assert_array_equal(stream, np.asarray(expected, dtype=stream.dtype))
    assert rec == {"docs": tail_doc - 1, "tokens": len(expected)}
    assert (out / "shard-00000" / "table.0").stat().st_size > 0
