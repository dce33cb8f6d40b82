"""End-to-end datastore builds on real text: round trip, ids, dedup, bad input, resume, executors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from retromem.datastore import BuildConfig, Datastore, build
from retromem.datastore.normalize import normalize
from retromem.errors import DatastoreError, InputError
from tests.conftest import SHARED_CORPORA, demo_records, write_jsonl


def same_datastore(a: dict, b: dict) -> None:
    """Two manifests describe identical content: ids, tokens, checksums."""
    assert a["datastore_id"] == b["datastore_id"]
    assert a["counts"] == b["counts"]
    keys = ("documents_file", "chunks_file", "removed_file")
    assert [[s[k]["sha256"] for k in keys] + [s["tokens_sha256"], s["text_sha256"]] for s in a["shards"]] == \
           [[s[k]["sha256"] for k in keys] + [s["tokens_sha256"], s["text_sha256"]] for s in b["shards"]]


def test_round_trip_ids_and_continuations(built):
    result, cfg = built
    ds = Datastore.open(cfg.out)
    m = ds.manifest
    assert m["counts"]["shards"] > 1  # several shards, so ids cross shard boundaries
    tok = ds.tokenizer
    # dense global chunk ids in document order, continuations within a document only
    chunk_ids = np.concatenate([pq.read_table(Path(cfg.out) / s["chunks_file"]["path"]).column("chunk_id").to_numpy()
                                for s in m["shards"]])
    np.testing.assert_array_equal(chunk_ids, np.arange(ds.num_chunks))
    expected_cont = []
    for d in range(ds.num_documents):
        ids = ds.document_chunk_ids(d)
        expected_cont += list(ids[1:]) + [-1]
        toks, lens = ds.tokens(ids)
        flat = np.concatenate([t[:n] for t, n in zip(toks, lens)]).tolist()
        text = ds.document_text(d)
        assert tok.decode(flat) == text  # decoding a document's chunks gives back the document
        assert "".join(ds.chunk_texts(ids)) == text  # character spans tile it
        assert (lens[:-1] == ds.chunk_length).all() and 0 < lens[-1] <= ds.chunk_length
    np.testing.assert_array_equal(ds.continuation_ids(np.arange(ds.num_chunks)), expected_cont)


def test_stored_text_is_the_normalized_input(built, corpus_dir):
    _, cfg = built
    ds = Datastore.open(cfg.out)
    by_id = {r["source_id"]: r["text"] for r in ds.iter_documents(["source_id", "text"])}
    for r in demo_records()[:12]:
        assert by_id[r["id"]] == normalize(r["text"])


def test_planted_duplicates_removed_and_reported(built):
    result, cfg = built
    d = result.manifest["dedup"]
    assert (d["input_documents"], d["removed_exact"], d["removed_near"], d["kept"]) == (16, 2, 2, 12)
    removed = pq.read_table(Path(cfg.out) / "removed").to_pydict()
    assert sorted(zip(removed["source_id"], removed["reason"])) == [
        ("dup-exact-1", "exact_duplicate"), ("dup-exact-2", "exact_duplicate"),
        ("dup-near-1", "near_duplicate"), ("dup-near-2", "near_duplicate")]
    assert d["bloom_bytes_per_billion_documents"] > 0


def test_parquet_shards_match_arrays_and_manifest(built):
    _, cfg = built
    ds = Datastore.open(cfg.out)
    assert ds.verify() == []
    m = ds.manifest
    for s in m["shards"]:
        t = pq.read_table(Path(cfg.out) / s["chunks_file"]["path"])
        assert t.schema.equals(__import__("retromem.datastore.schema", fromlist=["CHUNKS_SCHEMA"]).CHUNKS_SCHEMA)
        ids = t.column("chunk_id").to_numpy()
        toks, lens = ds.tokens(ids)
        for row, tk, n in zip(t.column("tokens").to_pylist(), toks, lens):
            assert row == tk[:n].tolist()
        np.testing.assert_array_equal(t.column("doc_id").to_numpy(), ds.doc_ids(ids))
    assert m["tokenizer"]["name"] == "gpt2" and m["tokenizer"]["vocab_size"] == 50257
    assert m["chunk_length"] == 64 and m["format_version"] == 1


def test_rerun_of_a_finished_build_is_a_no_op_and_other_settings_are_refused(built):
    result, cfg = built
    again = build(cfg)
    assert again.already_complete
    same_datastore(again.manifest, result.manifest)
    from dataclasses import replace

    with pytest.raises(DatastoreError, match="other inputs or settings"):
        build(replace(cfg, chunk_length=32))


def test_one_worker_and_two_workers_give_the_same_datastore(tmp_path, corpus_dir, built):
    result, cfg = built
    from dataclasses import replace

    one = build(replace(cfg, out=str(tmp_path / "one"), workers=1))
    same_datastore(one.manifest, result.manifest)


@pytest.mark.slow
def test_ray_executor_gives_the_same_datastore(tmp_path, built):
    pytest.importorskip("ray")
    result, cfg = built
    from dataclasses import replace

    import ray

    try:
        via_ray = build(replace(cfg, out=str(tmp_path / "ray"), executor="ray", workers=2))
    finally:
        ray.shutdown()
    same_datastore(via_ray.manifest, result.manifest)


BAD_LINES = {
    "invalid_json": b'{"text": oops}\n',
    "invalid_utf8": b'{"text": "caf\xe9"}\n',
    "missing_field": b'{"body": "no text field"}\n',
    "empty_document": b'{"text": " \\u0007 \\r\\n "}\n',
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_bad_record_stops_the_build_naming_file_and_line(tmp_path, kind):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"text": "a fine first document"}\n' + BAD_LINES[kind] + b'{"text": "third"}\n')
    with pytest.raises(InputError) as err:
        build(BuildConfig(inputs=(str(p),), out=str(tmp_path / "out"), tokenizer="gpt2", workers=1))
    assert err.value.kind == kind and err.value.line == 2 and str(p) in str(err.value)


def test_skip_policy_counts_and_logs_every_bad_record(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": f"document number {i}"} for i in range(5)])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok one"}\n' + b"".join(BAD_LINES[k] for k in sorted(BAD_LINES)))
    corrupt = tmp_path / "broken.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    res = build(BuildConfig(inputs=(str(good), str(bad), str(corrupt)), out=str(tmp_path / "out"),
                            tokenizer="gpt2", on_error="skip", workers=1))
    d = res.manifest["dedup"]
    assert d["skipped"] == {"corrupt_file": 1, "empty_document": 1, "invalid_json": 1, "invalid_utf8": 1, "missing_field": 1}
    assert res.manifest["counts"]["documents"] == 6
    log = (tmp_path / "out" / "skipped.txt").read_text().splitlines()
    assert len(log) == 5 and any(f"{bad}:4: invalid_utf8" in line for line in log)


def _shared_inputs() -> list[str]:
    files = [SHARED_CORPORA / "python-docs.jsonl.gz"]
    if not files[0].exists():
        pytest.skip(f"shared corpora not found at {SHARED_CORPORA} (set RETROMEM_SHARED)")
    return [str(f) for f in files]


@pytest.mark.slow
def test_killed_build_resumes_to_the_same_datastore(tmp_path):
    """kill -9 a real build mid-run (several times), re-run it, compare with an uninterrupted build."""
    inputs = _shared_inputs()
    args = ["--tokenizer", "gpt2", "--shard-size", "1MB", "--workers", "2"]
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", "build", *inputs]
    ref = subprocess.run(cmd + ["--out", str(tmp_path / "ref"), *args], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "resumed"
    work = out / "_work"
    # kill at three points: during ingest, during tokenize, during finalize
    for marker_dir, pattern in (("ingest", "part-*.parquet"), ("tokenize", "part-*.json"), ("finalize", "part-*.json")):
        proc = subprocess.Popen(cmd + ["--out", str(out), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((work / marker_dir).glob(pattern))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
        proc.wait()
        assert not (out / "manifest.json").exists()
    done = subprocess.run(cmd + ["--out", str(out), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    same_datastore(Datastore.open(out).manifest, Datastore.open(tmp_path / "ref").manifest)
    assert Datastore.open(out).verify() == []


def test_config_mistakes_are_config_errors_naming_key_and_flag(tmp_path):
    """An unknown key under `dedup:` used to end in a bare TypeError traceback (exit 1)."""
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.errors import ConfigError

    base = {"inputs": ["in.jsonl"], "out": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match=r"unknown keys \['dedup.foo'\]; allowed under `dedup`"):
        BuildConfig.from_dict({**base, "dedup": {"foo": 1}})
    with pytest.raises(ConfigError, match=r"unknown keys \['chunk_len'\]"):
        BuildConfig.from_dict({**base, "chunk_len": 32})
    with pytest.raises(ConfigError, match=r"`chunk_length` \(--chunk-length\) must be an integer in 1..4096, got 0"):
        BuildConfig.from_dict({**base, "chunk_length": 0})
    with pytest.raises(ConfigError, match=r"`normalize.nfc` must be true or false"):
        BuildConfig(inputs=("in.jsonl",), out="out", normalize={"nfc": "yes"})
    doc = write_jsonl(tmp_path / "in.jsonl", [{"text": "one short document"}])
    (tmp_path / "build.yaml").write_text("dedup:\n  foo: 1\n")
    r = CliRunner().invoke(main, ["datastore", "build", str(doc), "--out", str(tmp_path / "out"),
                                  "--config", str(tmp_path / "build.yaml")])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)  # an error line, not a traceback
    assert r.output.startswith("error: ") and "unknown keys ['dedup.foo']" in r.output
    assert not (tmp_path / "out").exists()
