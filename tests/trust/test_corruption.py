"""Every file of every artifact, damaged three ways (flip, truncate, extend): a clear error naming
the file or a verified-correct answer, never a crash or a silent wrong answer; verify names every
damaged file (issue 15). The probes run in a worker process (:mod:`tests.trust.harness`), so a
segfault in a native library fails the test instead of killing pytest."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from tests.trust import harness as h

FAST = ("datastore", "ngram-index", "fm-index")  # no embedding model needed


@pytest.fixture(scope="module")
def fast_artifacts(tmp_path_factory):
    return h.build_artifacts(tmp_path_factory.mktemp("trust"), FAST)


@pytest.fixture(scope="module")
def fast_outcomes(fast_artifacts, tmp_path_factory) -> list[h.Outcome]:
    """Every case of the three kinds, through one worker process."""
    return h.run_cases(fast_artifacts, tmp_path_factory.mktemp("cases"))


@pytest.fixture(scope="module")
def model_artifacts(tmp_path_factory):
    return h.build_artifacts(tmp_path_factory.mktemp("trust-model"), h.KINDS)


@pytest.fixture(scope="module")
def model_outcomes(model_artifacts, tmp_path_factory) -> list[h.Outcome]:
    arts = model_artifacts
    return h.run_cases(arts, tmp_path_factory.mktemp("cases"), [c for c in h.cases(arts) if c[0] in h.NEEDS_MODEL])


def _assert_all_caught(outcomes: list[h.Outcome], kinds: tuple[str, ...]) -> None:
    assert {o.kind for o in outcomes} == set(kinds)
    assert {o.damage for o in outcomes} == set(h.DAMAGES)
    bad = [o for o in outcomes if o.result not in ("error", "correct") or o.verify != "named"]
    assert not bad, "\n".join(str(o) for o in bad)


@pytest.mark.parametrize("kind", FAST)
def test_every_file_damaged_three_ways_is_caught(fast_outcomes, kind):
    outcomes = [o for o in fast_outcomes if o.kind == kind]
    _assert_all_caught(outcomes, (kind,))
    # the files the answers read all fail loudly; only files no query reads may answer correctly
    files = {o.file for o in outcomes}
    if kind == "datastore":
        assert {"arrays/tokens.npy", "arrays/text.bin", "arrays/chunk_doc_ids.npy", "arrays/chunk_byte_spans.npy",
                "manifest.json", "tokenizer/tokenizer.json"} <= files
        assert all(o.result == "error" for o in outcomes if o.file.startswith("arrays/") or o.file == "manifest.json")
    if kind == "ngram-index":
        assert {o.result for o in outcomes if o.file.endswith(("table.0", "tokenized.0", "offset.0"))} == {"error"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k for k in h.KINDS if k in h.NEEDS_MODEL])
def test_every_file_of_model_artifacts_damaged_three_ways_is_caught(model_outcomes, kind):
    outcomes = [o for o in model_outcomes if o.kind == kind]
    _assert_all_caught(outcomes, (kind,))
    if kind == "dense-index":
        assert {o.result for o in outcomes if o.file.startswith("shard-")} == {"error"}


# -- the command line ---------------------------------------------------------------------------


def _run(*args: str):
    from retromem.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("kind, rel", [("datastore", "arrays/chunk_doc_ids.npy"), ("datastore", "documents/shard-00000.parquet"),
                                       ("ngram-index", "shard-00000/table.0"), ("fm-index", "shard-00000/bwt.zst")])
def test_verify_names_each_damaged_file_and_exits_2(fast_artifacts, tmp_path, kind, rel):
    copy = tmp_path / "copy"
    shutil.copytree(fast_artifacts[kind], copy)
    r = _run("index", "verify", str(copy), "--datastore", str(fast_artifacts["datastore"]))
    assert r.exit_code == 0, r.output
    assert "every checksum matches" in r.output
    h.damage(copy / rel, "flip")
    r = _run("index", "verify", str(copy), "--datastore", str(fast_artifacts["datastore"]))
    assert r.exit_code == 2
    assert f"error: {copy / rel}: " in r.output and "checksum differs" in r.output
    if kind == "datastore":
        r = _run("datastore", "verify", str(copy))
        assert r.exit_code == 2 and f"error: {copy / rel}: " in r.output


def test_verify_names_every_damaged_file_at_once(fast_artifacts, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    for rel in ("chunks/shard-00000.parquet", "removed/shard-00000.parquet", "arrays/text.bin"):
        h.damage(copy / rel, "flip")
    r = _run("datastore", "verify", str(copy))
    assert r.exit_code == 2
    for rel in ("chunks/shard-00000.parquet", "removed/shard-00000.parquet", "arrays/text.bin"):
        assert f"error: {copy / rel}: " in r.output
    # the old spelling still works and now sees the text too
    r = _run("datastore", "info", str(copy), "--verify")
    assert r.exit_code == 1 and "arrays/text.bin" in r.output


def test_serve_verify_refuses_a_damaged_datastore_before_serving(fast_artifacts, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    h.damage(copy / "chunks" / "shard-00000.parquet", "flip")  # a file no query reads: only verify sees it
    r = _run("serve", "--datastore", str(copy), "--ngram", str(fast_artifacts["ngram-index"]), "--port", "0", "--verify")
    assert r.exit_code == 2
    assert f"error: {copy / 'chunks' / 'shard-00000.parquet'}: " in r.output
    assert "serving" not in r.output


def test_artifacts_without_recorded_checksums_verify_structure_only(fast_artifacts, tmp_path):
    from retromem.datastore import Datastore
    from retromem.index.ngram import NgramIndex

    for kind, name in (("datastore", "manifest.json"), ("ngram-index", "ngram_index.json")):
        copy = tmp_path / kind
        shutil.copytree(fast_artifacts[kind], copy)
        m = json.loads((copy / name).read_text())
        del m["integrity"]
        (copy / name).write_text(json.dumps(m))
        r = _run("index", "verify", str(copy), "--datastore", str(fast_artifacts["datastore"]))
        assert r.exit_code == 0, r.output
        assert "records no checksums" in r.output and "structural checks only" in r.output
    ds = Datastore.open(tmp_path / "datastore")
    assert ds.chunk_texts([0]) == Datastore.open(fast_artifacts["datastore"]).chunk_texts([0])
    NgramIndex(tmp_path / "ngram-index", ds).count("the")
    # structure is still checked: a truncated array is refused by name, not a numpy traceback
    h.damage(tmp_path / "datastore" / "arrays" / "tokens.npy", "truncate")
    r = _run("datastore", "show", str(tmp_path / "datastore"), "0")
    assert r.exit_code == 2 and "tokens.npy" in r.output and "truncated" in r.output


def test_large_datastores_check_a_sample_of_rows_and_reads_verify_their_shard(fast_artifacts, tmp_path, monkeypatch):
    """Beyond FULL_CHECK_CHUNKS rows the open checks a sample; a damaged row outside it is still
    refused by the first read of its shard (the shard's recorded checksum), never answered wrongly."""
    import numpy as np

    import retromem.datastore.store as store
    from retromem.datastore import Datastore
    from retromem.errors import ArtifactCorruptError

    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    ds = Datastore.open(copy)
    victim = ds.num_chunks // 2
    arr = np.load(copy / "arrays" / "chunk_doc_ids.npy", mmap_mode="r+")
    arr[victim] = arr[victim] + 1 if arr[victim] + 1 < ds.num_documents else arr[victim] - 1
    arr.flush()
    del arr
    monkeypatch.setattr(store, "FULL_CHECK_CHUNKS", 1)
    monkeypatch.setattr(store, "SAMPLE_ROWS", 2)
    ds = Datastore.open(copy)  # the sample misses the damaged row
    with pytest.raises(ArtifactCorruptError, match="chunk_doc_ids"):
        ds.doc_ids([victim])


@pytest.mark.parametrize("rel, builder", [("arrays/tokens.npy", "ngram"), ("arrays/text.bin", "fm")])
def test_indexes_are_not_built_from_a_damaged_datastore(fast_artifacts, tmp_path, rel, builder):
    from retromem.errors import ArtifactCorruptError
    from retromem.index.fm_index import build_fm_index
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    h.damage(copy / rel, "flip")
    with pytest.raises(ArtifactCorruptError, match=rel.split("/")[1]):
        if builder == "ngram":
            build_ngram_index(copy, tmp_path / "ng", NgramBuildConfig(cpus=1), progress=False)
        else:
            build_fm_index(copy, tmp_path / "fm", progress=False)


@pytest.mark.parametrize("kind, name", [("datastore", "manifest.json"), ("ngram-index", "ngram_index.json"),
                                        ("fm-index", "fm_index.json")])
def test_rerunning_a_build_over_a_damaged_manifest_names_it(fast_artifacts, tmp_path, kind, name):
    from retromem.datastore import BuildConfig, build
    from retromem.errors import ArtifactCorruptError
    from retromem.index.fm_index import build_fm_index
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    copy = tmp_path / h.DIRS[kind]
    shutil.copytree(fast_artifacts[kind], copy)
    h.damage(copy / name, "truncate")
    with pytest.raises(ArtifactCorruptError, match=f"{name}: not valid JSON"):
        if kind == "datastore":
            build(BuildConfig(inputs=(str(fast_artifacts["datastore"].parent / "docs.jsonl"),), out=str(copy), tokenizer="gpt2"))
        elif kind == "ngram-index":
            build_ngram_index(fast_artifacts["datastore"], copy, NgramBuildConfig(cpus=1), progress=False)
        else:
            build_fm_index(fast_artifacts["datastore"], copy, progress=False)


def test_serve_refuses_a_damaged_ngram_shard_without_crashing(fast_artifacts, tmp_path):
    """The issue's segfault: `retromem serve` over a flipped table.0 died with exit 139. Now the
    open's checksum check refuses it with one line, exit 2 (a subprocess: a crash fails the test)."""
    import subprocess
    import sys

    copy = tmp_path / "ngram"
    shutil.copytree(fast_artifacts["ngram-index"], copy)
    h.damage(copy / "shard-00001" / "table.0", "flip")
    r = subprocess.run([sys.executable, "-m", "retromem.cli", "serve", "--datastore", str(fast_artifacts["datastore"]),
                        "--ngram", str(copy), "--port", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: {copy / 'shard-00001' / 'table.0'}: sha256 checksum differs" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("rel, prop", [("arrays/tokens.npy", "token_array"), ("arrays/text.bin", "text_bytes")])
def test_bulk_arrays_are_verified_before_they_are_handed_out(fast_artifacts, tmp_path, rel, prop):
    """Training and index builds read token_array / text_bytes in bulk, past the per-read checks:
    the first access verifies every shard."""
    from retromem.datastore import Datastore
    from retromem.errors import ArtifactCorruptError

    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    assert getattr(Datastore.open(copy), prop).shape[0] > 0
    h.damage(copy / rel, "flip")
    ds = Datastore.open(copy)  # same size, offsets intact: the open's structural checks pass
    with pytest.raises(ArtifactCorruptError, match=rel.split("/")[1]):
        getattr(ds, prop)


def test_sampled_document_checks_still_refuse_broken_ends(fast_artifacts, tmp_path, monkeypatch):
    """Beyond FULL_CHECK_DOCS documents the open samples consecutive pairs; the ends are always checked."""
    import numpy as np

    import retromem.datastore.store as store
    from retromem.datastore import Datastore
    from retromem.errors import ArtifactCorruptError

    monkeypatch.setattr(store, "FULL_CHECK_DOCS", 1)
    monkeypatch.setattr(store, "FULL_CHECK_CHUNKS", 1)
    monkeypatch.setattr(store, "SAMPLE_ROWS", 2)
    copy = tmp_path / "ds"
    shutil.copytree(fast_artifacts["datastore"], copy)
    assert Datastore.open(copy).chunk_texts([0]) == Datastore.open(fast_artifacts["datastore"]).chunk_texts([0])
    arr = np.load(copy / "arrays" / "doc_byte_offsets.npy", mmap_mode="r+")
    arr[-1] += 1
    arr.flush()
    del arr
    with pytest.raises(ArtifactCorruptError, match="doc_byte_offsets.npy: offsets are not monotone"):
        Datastore.open(copy)
