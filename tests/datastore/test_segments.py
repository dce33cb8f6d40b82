"""Segments and versions (issue 18): add continues ids and dedups against the old segments, every
version stays readable until compaction, deletes are refused reads with an audit entry, a moved
datastore opens, a failed or killed add leaves the previous version as it was. Real text from the
shared corpora, the GPT-2 tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from retromem.datastore import BuildConfig, Datastore, build
from retromem.datastore.pipeline import add
from retromem.datastore.tombstones import delete
from retromem.errors import ConfigError, DocumentDeletedError, InputError
from tests.conftest import near_duplicate, shared_records, write_jsonl


def shared_docs(n: int, name: str = "python-docs") -> list[dict]:
    return shared_records(name, n, 2_000, 20_000)


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return shared_docs(36)


@pytest.fixture(scope="module")
def base(tmp_path_factory, docs) -> Path:
    """Version 1: 24 documents (one segment)."""
    d = tmp_path_factory.mktemp("seg")
    write_jsonl(d / "first.jsonl", docs[:24])
    out = d / "ds"
    build(BuildConfig(inputs=(str(d / "first.jsonl"),), out=str(out), tokenizer="gpt2", workers=1))
    return out


@pytest.fixture(scope="module")
def grown(tmp_path_factory, base, docs) -> Path:
    """Version 2: base + 12 new documents, an exact repeat of document 0 and a near duplicate of 5."""
    d = tmp_path_factory.mktemp("grown")
    out = d / "ds"
    shutil.copytree(base, out)
    extra = docs[24:] + [dict(docs[0], id="again-0"), dict(docs[5], id="near-5", text=near_duplicate(docs[5]["text"], 200))]
    write_jsonl(d / "more.jsonl", extra)
    add(out, [str(d / "more.jsonl")], workers=1)
    return out


def test_add_continues_ids_and_dedups_against_the_old_segment(base, grown, docs):
    old, ds = Datastore.open(base), Datastore.open(grown)
    assert (old.version, ds.version) == (1, 2)
    assert ds.datastore_id == old.datastore_id  # one lineage
    assert [s.name for s in ds.segments] == ["seg-00001", "seg-00002"]
    s1, s2 = ds.segments
    assert (s2.first_doc_id, s2.first_chunk_id, s2.version_added) == (old.num_documents, old.num_chunks, 2)
    assert s2.n_docs == 12 and ds.num_documents == 36 and ds.num_chunks == s1.n_chunks + s2.n_chunks
    # the repeat and the near duplicate were dropped by the kept filters (no old text re-read), and reported
    removed = pq.read_table(grown / "segments" / "seg-00002" / "removed").to_pydict()
    assert sorted(zip(removed["source_id"], removed["reason"])) == [("again-0", "exact_duplicate"), ("near-5", "near_duplicate")]
    # new documents read back by their global ids, across the segment boundary
    for i, rec in enumerate(docs[24:]):
        d = ds.document(24 + i)
        assert d.source_id == rec["id"] and d.text == ds.document_text(24 + i)
    last_old = ds.document_chunk_ids(23)[-1]
    assert ds.continuation_ids([last_old])[0] == -1  # a segment boundary is a document boundary
    chunks = ds.chunks([last_old, last_old + 1])
    assert chunks[1].doc_id == 24 and chunks[1].position == 0 and chunks[1].source_id == docs[24]["id"]
    # whole-datastore arrays are the segments', with global ids and offsets
    np.testing.assert_array_equal(ds.chunk_doc_array[ds.doc_first_chunk_array[:-1]], np.arange(36))
    spans = ds.chunk_byte_spans_array[ds.document_chunk_ids(30)]
    assert ds.text_bytes[spans[0, 0]:spans[-1, 1]].tobytes().decode() == ds.document_text(30)
    np.testing.assert_array_equal(ds.token_array[last_old + 1], ds.tokens([last_old + 1])[0][0])
    assert ds.verify() == []


def test_old_versions_stay_readable_after_add_and_delete(tmp_path, grown):
    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    delete(ds_path, doc_ids=[3, 30], reason="test", who="pytest")
    v1, v2, v3 = (Datastore.open(ds_path, version=v) for v in (1, 2, 3))
    assert (v1.num_documents, v2.num_documents, v3.num_documents) == (24, 36, 36)
    assert v2.document(30).doc_id == 30 and len(v2.deleted_doc_ids) == 0  # v2 predates the delete
    with pytest.raises(DocumentDeletedError):
        v3.document(30)
    assert Datastore.open(ds_path).version == 3
    assert v1.verify() == [] and v3.verify() == []
    with pytest.raises(Exception, match="no version 9"):
        Datastore.open(ds_path, version=9)


def test_deleted_ids_are_refused_and_audited(tmp_path, grown):
    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    before = Datastore.open(ds_path)
    src = before.source_ids([26])[0]
    entry = delete(ds_path, doc_ids=[2], source_ids=[src], reason="privacy request #7", who="alice")
    ds = Datastore.open(ds_path)
    assert ds.deleted_doc_ids.tolist() == [2, 26]
    dead_chunks = np.concatenate([before.document_chunk_ids(2), before.document_chunk_ids(26)])
    np.testing.assert_array_equal(ds.deleted_chunk_ids(), dead_chunks)
    assert ds.live_chunks(dead_chunks).sum() == 0 and ds.live_chunks([0, dead_chunks[-1] + 1]).all()
    assert ds.is_live_doc([1, 2, 26, 27]).tolist() == [True, False, False, True]
    assert [r["doc_id"] for r in ds.iter_documents(["doc_id"], include_deleted=False)] == [d for d in range(36) if d not in (2, 26)]
    live_ids = np.concatenate([ids for ids, _ in ds.iter_chunk_batches(500, include_deleted=False)])
    assert len(live_ids) == ds.num_chunks - len(dead_chunks) and not np.isin(dead_chunks, live_ids).any()
    for read in (lambda: ds.chunks([dead_chunks[0]]), lambda: ds.document(26), lambda: ds.tokens(dead_chunks[:2]),
                 lambda: ds.chunk_texts([int(dead_chunks[-1])]), lambda: ds.neighbour_tokens([dead_chunks[0]]),
                 lambda: ds.doc_token_ids(2)):
        with pytest.raises(DocumentDeletedError, match=r"doc_id 2|doc_id 26") as exc:
            read()
        assert set(exc.value.doc_ids) <= {2, 26}
    # internal reads still get them until compaction
    assert ds.document(26, include_deleted=True).text == before.document_text(26)
    np.testing.assert_array_equal(ds.doc_token_ids(2, include_deleted=True), before.doc_token_ids(2))
    # the audit log: who, when, why, which
    (log,) = ds.audit_log()
    assert log == entry
    assert (log["who"], log["why"], log["doc_ids"], log["version"]) == ("alice", "privacy request #7", [2, 26], 3)
    assert log["source_ids"] == before.source_ids([2, 26]) and log["time"].endswith("+00:00")
    # unknown ids are errors naming them; nothing is written
    with pytest.raises(ConfigError, match=r"unknown doc id\(s\) 99, 1000"):
        delete(ds_path, doc_ids=[1000, 99, 5], reason="x")
    with pytest.raises(ConfigError, match="no-such-source"):
        delete(ds_path, source_ids=["no-such-source"], reason="x")
    with pytest.raises(ConfigError, match="already deleted"):
        delete(ds_path, doc_ids=[2], reason="x")
    with pytest.raises(ConfigError, match="--reason"):
        delete(ds_path, doc_ids=[5], reason="  ")
    assert Datastore.open(ds_path).version == 3


def test_delete_log_and_ids_file_on_the_command_line(tmp_path, grown):
    from click.testing import CliRunner

    from retromem.cli import main

    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    src = Datastore.open(ds_path).source_ids([7])[0]
    ids = tmp_path / "ids.txt"
    ids.write_text(f"# takedown list\n4\nsource:{src}\n")
    r = CliRunner().invoke(main, ["datastore", "delete", str(ds_path), "--ids-file", str(ids), "--doc-id", "31",
                                  "--reason", "copyright notice 12", "--who", "bob"])
    assert r.exit_code == 0, r.output
    assert "deleted 3 document(s) (4, 7, 31)" in r.output
    r = CliRunner().invoke(main, ["datastore", "log", str(ds_path)])
    assert r.exit_code == 0, r.output
    assert "delete" in r.output and "by bob: copyright notice 12" in r.output and "doc ids 4, 7, 31" in r.output
    r = CliRunner().invoke(main, ["datastore", "delete", str(ds_path), "--doc-id", "77", "--reason", "x"])
    assert r.exit_code == 2 and "unknown doc id(s) 77" in r.output


def test_a_moved_datastore_opens(tmp_path, grown):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(grown, tmp_path / "copy")
    delete(tmp_path / "copy", doc_ids=[1], reason="x")
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "copy"), moved)
    ds = Datastore.open(moved)
    assert ds.version == 3 and ds.verify() == [] and ds.document(30).source_id
    assert str(tmp_path) not in "".join(p.read_text() for p in moved.rglob("*.json"))


def test_a_failed_add_leaves_the_old_version_and_a_retry_finishes(tmp_path, grown, docs):
    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "ok", "text": docs[0]["text"][::-1]}) + "\n{not json\n")
    with pytest.raises(InputError, match="invalid_json"):
        add(ds_path, [str(bad)], workers=1)
    ds = Datastore.open(ds_path)
    assert ds.version == 2 and ds.verify() == []
    good = write_jsonl(tmp_path / "good.jsonl", [{"id": "new", "text": docs[0]["text"][::-1]}])
    res = add(ds_path, [str(good)], workers=1)  # the unfinished segment of the failed add is discarded
    ds = Datastore.open(ds_path)
    assert res.version == 3 and ds.num_documents == 37 and ds.document(36).source_id == "new"
    assert ds.verify() == []


@pytest.mark.slow
def test_a_killed_add_leaves_the_old_version_readable_and_resumes(tmp_path, grown):
    ds_path = tmp_path / "ds"
    shutil.copytree(grown, ds_path)
    more = write_jsonl(tmp_path / "more.jsonl", shared_docs(80, "linux-docs")[40:])
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", "add", str(ds_path), str(more), "--workers", "1",
           "--shard-size", "64KiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    work = ds_path / "segments" / "seg-00003" / "_work"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((work / "tokenize").glob("part-*.json"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the add finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ds = Datastore.open(ds_path)
    assert ds.version == 2 and ds.num_documents == 36 and ds.verify() == []
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ds = Datastore.open(ds_path)
    assert ds.version == 3 and ds.num_documents == 76 and ds.verify() == []


def test_neighbour_units_of_every_chunk_across_segments(grown):
    """The chunk + continuation unit (one gather of each row and its successor) equals one built from
    chunk records, for every chunk of a two-segment datastore: documents' last chunks and each
    segment's last chunk have no continuation, mixed batches from both segments keep their order."""
    ds = Datastore.open(grown)
    assert len(ds.segments) == 2
    L, pad = ds.chunk_length, ds.pad_token_id
    ids = np.arange(ds.num_chunks)
    rng = np.random.default_rng(0)
    for batch in (ids, rng.permutation(ids)[:300], ids[-3:], np.array([ds.segments[0].n_chunks - 1, 0, ds.num_chunks - 1])):
        got, lens = ds.neighbour_tokens(batch)
        for row, c in enumerate(batch.tolist()):
            rec = ds.chunks([c])[0]
            want = list(rec.tokens) + ([] if rec.continuation_id is None else list(ds.chunks([rec.continuation_id])[0].tokens))
            assert lens[row] == len(want), c
            assert got[row, : len(want)].tolist() == want, c
            if rec.continuation_id is None:
                assert (got[row, L:] == pad).all(), c
