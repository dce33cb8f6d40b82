"""Compaction and the takedown check (issue 18): before compaction the deleted documents' text and
tokens are found in named files (exit 1); after it none remain in any file, ids are stable, live
documents read back unchanged, and the superseded files and versions are gone."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from retromem.cli import main
from retromem.datastore import Datastore
from retromem.datastore.pipeline import add
from retromem.datastore.takedown import check, compact
from retromem.datastore.tombstones import delete
from retromem.errors import DatastoreError, DocumentDeletedError
from tests.conftest import write_jsonl
from tests.datastore.test_segments import base, docs, grown  # noqa: F401  (module fixtures: a two-segment datastore)


@pytest.fixture()
def deleted(tmp_path, grown) -> tuple[Path, Datastore]:  # noqa: F811
    """A copy of the two-segment datastore with doc 2 (segment 1) and doc 30 (segment 2) deleted."""
    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    before = Datastore.open(ds_path)
    delete(ds_path, doc_ids=[2, 30], reason="takedown test", who="pytest")
    return ds_path, before


def test_check_finds_deleted_bytes_before_compaction_and_none_after(deleted, tmp_path):
    ds_path, before = deleted
    rep = check([ds_path], Datastore.open(ds_path))
    assert not rep.ok and rep.probes > 0 and rep.deleted_docs == 2
    found = {(Path(f).relative_to(ds_path).as_posix(), d, kind) for f, d, kind in rep.found}
    assert ("arrays/text.bin", 2, "text") in found and ("arrays/tokens.npy", 2, "tokens-uint16") in found
    assert ("documents/shard-00000.parquet", 2, "text") in found  # inside zstd-compressed Parquet pages
    assert ("chunks/shard-00000.parquet", 2, "tokens-uint32") in found
    assert any(f.startswith("segments/seg-00002/") and d == 30 for f, d, _ in found)
    # a copy of the deleted text anywhere else (an index directory, gzipped) is found too
    leak = tmp_path / "index"
    leak.mkdir()
    (leak / "cache.txt.gz").write_bytes(gzip.compress(before.document_text(30).encode()[100:2000]))
    rep = check([leak], Datastore.open(ds_path))
    assert {(Path(f).name, d) for f, d, _ in rep.found} == {("cache.txt.gz", 30)}

    res = compact(ds_path)
    assert res.version == 4 and sorted(res.segments) == ["seg-00001", "seg-00002"] and res.purged_docs == 2
    ds = Datastore.open(ds_path)
    rep = check([ds_path], ds)
    assert rep.ok, rep.found
    assert rep.files > 10 and rep.probes > 0
    # the CLI: exit 1 naming file and doc before (on the leak), 0 after
    r = CliRunner().invoke(main, ["datastore", "check-takedown", str(ds_path), "--index", str(leak)])
    assert r.exit_code == 1 and "cache.txt.gz: doc_id 30" in r.output
    r = CliRunner().invoke(main, ["datastore", "check-takedown", str(ds_path)])
    assert r.exit_code == 0 and "no deleted text or tokens remain" in r.output


def test_compaction_keeps_ids_and_live_documents_and_removes_superseded_files(deleted):
    ds_path, before = deleted
    compact(ds_path)
    ds = Datastore.open(ds_path)
    assert (ds.num_documents, ds.num_chunks, ds.datastore_id) == (before.num_documents, before.num_chunks, before.datastore_id)
    assert ds.deleted_doc_ids.tolist() == [2, 30] and ds.verify() == []
    for d in (0, 1, 3, 23, 24, 29, 31, 35):  # live documents unchanged, at the same ids, in both segments
        assert ds.document_text(d) == before.document_text(d)
        np.testing.assert_array_equal(ds.document_chunk_ids(d), before.document_chunk_ids(d))
        np.testing.assert_array_equal(ds.tokens(ds.document_chunk_ids(d))[0], before.tokens(before.document_chunk_ids(d))[0])
    # deleted documents: still refused; read anyway, nothing is left
    with pytest.raises(DocumentDeletedError):
        ds.document(30)
    assert ds.document_text(30, include_deleted=True) == "" and len(ds.doc_token_ids(2, include_deleted=True)) == 0
    assert (ds.tokens(ds.document_chunk_ids(2, include_deleted=True), include_deleted=True)[1] == 0).all()
    # the root segment's files and the second segment's old directory are gone; older versions with them
    assert not (ds_path / "arrays").exists() and not (ds_path / "documents").exists()
    assert not (ds_path / "segments" / "seg-00002").exists()
    with pytest.raises(DatastoreError, match="no longer readable"):
        Datastore.open(ds_path, version=2)
    r = CliRunner().invoke(main, ["datastore", "log", str(ds_path)])
    assert r.exit_code == 0 and "compact" in r.output and "(compacted away)" in r.output
    r = CliRunner().invoke(main, ["datastore", "verify", str(ds_path), "--all-versions"])
    assert r.exit_code == 0, r.output
    # nothing left to compact: no new version
    assert compact(ds_path).version is None


def test_delete_and_add_after_compaction(deleted, docs, tmp_path):  # noqa: F811
    ds_path, before = deleted
    compact(ds_path)
    delete(ds_path, doc_ids=[5], reason="second request")
    res = compact(ds_path)
    assert res.segments == ["seg-00001"] and res.purged_docs == 1  # only the new one; seg-00002 untouched
    ds = Datastore.open(ds_path)
    assert check([ds_path], ds).ok and ds.verify() == []
    assert [e["why"] for e in ds.audit_log()] == ["takedown test", "second request"]
    # the deleted documents' own text added again is refused by the kept dedup filters
    again = write_jsonl(tmp_path / "again.jsonl", [{"id": "again-30", "text": before.document_text(30)},
                                                   {"id": "fresh", "text": docs[1]["text"][::-1]}])
    res = add(ds_path, [str(again)], workers=1)
    assert res.segment["n_docs"] == 1 and Datastore.open(ds_path).document(36).source_id == "fresh"


def test_probes_are_windows_of_each_chunk_of_the_documents(grown):  # noqa: F811
    from retromem.datastore.takedown import doc_probes, window_hashes

    ds = Datastore.open(grown)
    p = doc_probes(ds, [2, 30])
    for d in (2, 30):
        toks = ds.doc_token_ids(d)
        pools = {0: window_hashes(ds.document_text(d).encode()), 1: window_hashes(toks.astype(np.uint16).tobytes()),
                 2: window_hashes(toks.astype(np.uint32).tobytes())}
        n_chunks = len(ds.document_chunk_ids(d))
        for kind, pool in pools.items():
            mine = p["hash"][(p["doc_id"] == d) & (p["kind"] == kind)]
            assert n_chunks - 1 <= len(mine) <= n_chunks  # one per chunk (the last may coincide)
            assert np.isin(mine, pool).all()
