"""The integrity helpers every artifact uses: recorded sizes and checksums, defensive reads of
manifests and ``.npy`` files, and Job.seal (issue 15)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retromem.datastore.integrity import (artifact_files, artifact_kind, check_sizes, load_npy, read_manifest,
                                          record_files, verify_artifact, verify_files)
from retromem.datastore.job import open_job
from retromem.errors import ArtifactCorruptError, DatastoreError, IndexFormatError


def _sealed(tmp_path):
    with open_job(tmp_path / "emb", "embeddings") as job:
        np.save(job.path / "shard-00000.npy", np.arange(12, dtype=np.float16).reshape(3, 4))
        (job.path / "sub").mkdir()
        (job.path / "sub" / "notes.txt").write_text("hello")
        job.mark_done("unit", {"ok": True})  # _work/ is not part of the artifact
        (job.path / ".shard.tmp-1").write_bytes(b"half")  # nor is a leftover temporary
        m = job.seal("embeddings.json", {"dim": 4})
    return tmp_path / "emb", m


def test_seal_records_every_file_but_the_manifest_marker_lock_work_and_temporaries(tmp_path):
    path, m = _sealed(tmp_path)
    assert m["integrity"]["algorithm"] == "sha256"
    assert sorted(m["integrity"]["files"]) == ["shard-00000.npy", "sub/notes.txt"]
    assert json.loads((path / "embeddings.json").read_text()) == m
    assert m["integrity"]["files"]["sub/notes.txt"] == {
        "bytes": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    assert artifact_kind(path) == "embeddings"
    report = verify_artifact(path)
    assert report.ok and report.recorded and report.files == 2
    assert artifact_files(path) == ["embeddings.json", "shard-00000.npy", "sub/notes.txt"]


@pytest.mark.parametrize("how", ["flip", "truncate", "extend", "delete"])
def test_verify_and_check_sizes_name_the_damaged_file(tmp_path, how):
    path, m = _sealed(tmp_path)
    f = path / "sub" / "notes.txt"
    if how == "flip":
        f.write_text("jello")
    elif how == "truncate":
        f.write_text("hell")
    elif how == "extend":
        f.write_text("hello!")
    else:
        f.unlink()
    problems = verify_files(path, m)
    assert [p[0] for p in problems] == ["sub/notes.txt"]
    assert {"flip": "checksum differs", "truncate": "(truncated)", "extend": "(extended)", "delete": "missing"}[how] in problems[0][1]
    if how == "flip":
        check_sizes(path, m)  # same size: only the checksum sees it
    else:
        with pytest.raises(ArtifactCorruptError, match="notes.txt") as err:
            check_sizes(path, m)
        assert err.value.path == str(f)
        # callers catching either older class still catch it
        assert isinstance(err.value, DatastoreError) and isinstance(err.value, IndexFormatError)


def test_old_artifacts_without_a_section_are_reported_as_unrecorded(tmp_path):
    path, m = _sealed(tmp_path)
    del m["integrity"]
    (path / "embeddings.json").write_text(json.dumps(m))
    report = verify_artifact(path)
    assert report.ok and not report.recorded
    check_sizes(path, m)  # nothing to check, no error


@pytest.mark.parametrize("text", [b"{\"a\": 1", b"\xff\xfe{}", b"[1, 2]", b""])
def test_read_manifest_names_a_damaged_manifest(tmp_path, text):
    p = tmp_path / "manifest.json"
    p.write_bytes(text)
    with pytest.raises(ArtifactCorruptError, match="manifest.json: ") as err:
        read_manifest(p)
    assert "damaged" in err.value.what


def test_load_npy_checks_header_size_shape_and_dtype_before_mapping(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.arange(100, dtype=np.int64))
    assert load_npy(p, shape=(100,), dtype="int64")[7] == 7
    with pytest.raises(ArtifactCorruptError, match="shape"):
        load_npy(p, shape=(99,))
    with pytest.raises(ArtifactCorruptError, match="int32"):
        load_npy(p, dtype="int32")
    data = p.read_bytes()
    p.write_bytes(data[:-8])
    with pytest.raises(ArtifactCorruptError, match="truncated"):
        load_npy(p)
    p.write_bytes(data + b"\0" * 8)
    with pytest.raises(ArtifactCorruptError, match="extended"):
        load_npy(p)
    p.write_bytes(b"NOTNUMPY" + data[8:])
    with pytest.raises(ArtifactCorruptError, match="header does not parse"):
        load_npy(p)
    p.write_bytes(data[:20] + bytes(b ^ 0xFF for b in data[20:60]) + data[60:])
    with pytest.raises(ArtifactCorruptError, match="a.npy"):
        load_npy(p)
    np.save(p, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactCorruptError, match="objects"):
        load_npy(p)


def test_record_files_is_stable(tmp_path):
    path, m = _sealed(tmp_path)
    assert record_files(path, exclude=("embeddings.json",)) == m["integrity"]
