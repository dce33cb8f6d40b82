"""Partitioned dedup (issue 19): keys hash-partitioned, one task per partition, marks combined.

The rule equals the sequential Bloom-filter pass (every document's keys inserted, so a document
is dropped when an earlier one shares a key of the same kind) wherever that pass's filters give
no false positive; the number of partitions and the executor never change a byte; planted exact
and near duplicates whose keys fall in different partitions are dropped; the Bloom filters kept
for ``datastore add`` still drop a re-added document; a dedup killed part-way resumes to the
same bytes. Real text from the shared corpora, the GPT-2 tokenizer.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from retromem.datastore import BuildConfig, Datastore, build
from retromem.datastore.dedup import (DedupConfig, Deduplicator, MinHasher, key_records, partition_duplicates,
                                      partition_of, partitioned_reasons, scatter)
from retromem.datastore.executors import LocalExecutor
from retromem.datastore.job import open_job
from retromem.datastore.pipeline import Layout, _read_hashes, add, run_dedup
from tests.conftest import shared_records, write_jsonl


def shared_docs(name: str, n: int, lo: int, hi: int) -> list[dict]:
    """The first ``n`` documents of a shared corpus with lo < len(text) < hi, id and text only."""
    return [{"id": r["id"], "text": r["text"]} for r in shared_records(name, n, lo, hi)]


def near_copy(text: str) -> str:
    """One word in the middle changed: shingle Jaccard about 1 - 26 / words, caught almost surely."""
    words = text.split(" ")
    words[len(words) // 2] += "x"
    return " ".join(words)


def same_datastore(a: dict, b: dict) -> None:
    """Identical content: datastore id, counts, every shard file's checksum, tokens and text."""
    assert a["datastore_id"] == b["datastore_id"] and a["counts"] == b["counts"] and a["dedup"] == b["dedup"]
    keys = ("documents_file", "chunks_file", "removed_file")
    assert [[s[k]["sha256"] for k in keys] + [s["tokens_sha256"], s["text_sha256"]] for s in a["shards"]] == \
           [[s[k]["sha256"] for k in keys] + [s["tokens_sha256"], s["text_sha256"]] for s in b["shards"]]


PLANTED = {"again-py-0": "exact_duplicate", "again-gcide-3": "exact_duplicate",
           "near-linux-1": "near_duplicate", "near-py-4": "near_duplicate"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict], list[dict], list[dict]]:
    """Three files from the three shared corpora; repeats and near copies planted in later files,
    so each pair spans parts."""
    py = shared_docs("python-docs", 10, 2_000, 12_000)
    lx = shared_docs("linux-docs", 10, 2_000, 12_000)
    gc = shared_docs("gcide", 60, 200, 5_000)
    d = tmp_path_factory.mktemp("pcorpus")
    write_jsonl(d / "1-python.jsonl", py)
    write_jsonl(d / "2-linux.jsonl", lx + [{"id": "again-py-0", "text": py[0]["text"]},
                                           {"id": "near-py-4", "text": near_copy(py[4]["text"])}])
    write_jsonl(d / "3-gcide.jsonl", gc + [{"id": "again-gcide-3", "text": gc[3]["text"]},
                                           {"id": "near-linux-1", "text": near_copy(lx[1]["text"])}])
    return d, py, lx, gc


@pytest.fixture(scope="module")
def built4(tmp_path_factory, corpus):
    """A build with 4 dedup partitions, its _work/ kept (staged parts, reasons)."""
    cfg = BuildConfig(inputs=(str(corpus[0]),), out=str(tmp_path_factory.mktemp("p4") / "ds"), tokenizer="gpt2",
                      shard_bytes=40_000, workers=1, keep_work=True, dedup_partitions=4)
    return build(cfg), cfg


def _staged_hashes(cfg: BuildConfig, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    lay = Layout(cfg.out)
    parts = sorted(lay.work.glob("ingest/part-*.parquet"))
    assert len(parts) == manifest["counts"]["shards"] > 2
    hashes = [_read_hashes(p, cfg.dedup.bands) for p in parts]
    return np.concatenate([h[0] for h in hashes]), np.concatenate([h[1] for h in hashes])


def test_partitioned_rule_equals_the_sequential_pass_on_real_text(corpus):
    """Band keys of real documents (plus planted copies); the sequential Deduplicator, fed in
    batches, and the partitioned rule at several partition counts drop the same documents."""
    _, py, lx, gc = corpus
    texts = [r["text"] for r in py + lx + gc]
    texts += [texts[2], near_copy(texts[12]), texts[40], near_copy(texts[5])]
    cfg = DedupConfig()
    keys = MinHasher(cfg).band_keys(texts)
    content = np.array([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=16).digest()[:8], "little")
                        for t in texts], dtype=np.uint64)
    dd = Deduplicator(cfg, len(texts))
    seq = np.concatenate([dd.process(content[i : i + 17], keys[i : i + 17]) for i in range(0, len(texts), 17)])
    n = len(texts)
    assert list(seq[n - 4 :]) == [1, 2, 1, 2]
    for partitions in (1, 2, 4, 7):
        np.testing.assert_array_equal(partitioned_reasons(content, keys, cfg, partitions), seq)


def test_partition_marks_match_a_brute_force_rule():
    """Random keys with planted repeats, across kinds: marked exactly when an earlier document has the
    same key of the same kind (a key equal to another kind's key is not a match); more partitions than keys."""
    rng = np.random.default_rng(3)
    cfg = DedupConfig(num_perm=8, bands=4, rows=2)
    n = 300
    content = rng.integers(0, 50, n).astype(np.uint64)  # small alphabet: many exact repeats
    bands = rng.integers(0, 10**6, (n, 4)).astype(np.uint64)
    bands[rng.integers(0, n, 40), rng.integers(0, 4, 40)] = 7  # one shared band key across bands
    bands[:, 0][5] = content[9]  # equal values of different kinds never match
    want = np.zeros(n, np.int8)
    for i in range(n):
        if any(content[j] == content[i] for j in range(i)):
            want[i] = 1
        elif any(bands[j, b] == bands[i, b] for j in range(i) for b in range(4)):
            want[i] = 2
    for partitions in (1, 3, 1000):
        np.testing.assert_array_equal(partitioned_reasons(content, bands, cfg, partitions), want)
    rec, offsets = scatter(key_records(content, bands, 100, cfg), 3)
    assert offsets[0] == 0 and offsets[-1] == len(rec) == 5 * n
    for q in range(3):  # every record sits in its key's partition
        assert (partition_of(rec["key"][offsets[q] : offsets[q + 1]], 3) == q).all()
    exact, near = partition_duplicates(rec)
    assert exact.min() >= 100 and list(exact) == sorted(set(exact))  # global numbering kept


def test_planted_duplicates_dropped_across_partitions_and_equal_to_the_sequential_pass(built4, corpus):
    result, cfg = built4
    m = result.manifest
    removed = pq.read_table(Path(cfg.out) / "removed").to_pydict()
    assert dict(zip(removed["source_id"], removed["reason"])) == PLANTED
    assert (m["dedup"]["removed_exact"], m["dedup"]["removed_near"]) == (2, 2)
    # the keys that give the planted pairs away fall in more than one of the 4 partitions
    content, keys = _staged_hashes(cfg, m)
    rec = key_records(content, keys, 0, cfg.dedup)
    first = {}
    culprits = set()
    for r in rec[np.lexsort((rec["doc"], rec["key"], rec["kind"]))]:
        k = (int(r["kind"]), int(r["key"]))
        if k in first:
            culprits.add(int(partition_of(np.array([r["key"]], np.uint64), 4)[0]))
        first.setdefault(k, int(r["doc"]))
    assert len(culprits) > 1
    # the sequential Bloom pass over the same staged keys drops the same documents
    dd = Deduplicator(cfg.dedup, len(content))
    seq = dd.process(content, keys)
    lay = Layout(cfg.out)
    got = np.concatenate([np.load(lay.reasons(p)) for p in range(m["counts"]["shards"])])
    np.testing.assert_array_equal(got, seq)
    # and the generation kept for `datastore add` holds the same filter bits the sequential pass inserted
    with np.load(Path(cfg.out) / m["dedup"]["generations"][0]["file"]) as gen:
        state = dd.state()
        assert sorted(gen.files) == sorted(state)
        for name in state:
            np.testing.assert_array_equal(gen[name], state[name])


@pytest.mark.slow
def test_partition_count_changes_no_byte(built4, tmp_path):
    result, cfg = built4
    one = build(replace(cfg, out=str(tmp_path / "p1"), dedup_partitions=1, keep_work=False))
    same_datastore(one.manifest, result.manifest)
    assert (Path(cfg.out) / "dedup" / "gen-v00001.npz").read_bytes() == (tmp_path / "p1" / "dedup" / "gen-v00001.npz").read_bytes()


def test_add_after_a_partitioned_build_drops_a_re_added_document(built4, corpus, tmp_path):
    result, cfg = built4
    _, py, lx, gc = corpus
    ds_path = tmp_path / "ds"
    shutil.copytree(cfg.out, ds_path, ignore=shutil.ignore_patterns("_work"))
    more = tmp_path / "more.jsonl"
    fresh = shared_docs("gcide", 70, 200, 5_000)[60:]
    write_jsonl(more, fresh + [dict(lx[2], id="readd-linux-2"), {"id": "renear-py-6", "text": near_copy(py[6]["text"])},
                               {"id": "twice-in-add", "text": fresh[0]["text"]}])
    res = add(ds_path, [str(more)], workers=1)
    removed = pq.read_table(ds_path / res.segment["dir"] / "removed").to_pydict()
    assert dict(zip(removed["source_id"], removed["reason"])) == {
        "readd-linux-2": "exact_duplicate", "renear-py-6": "near_duplicate", "twice-in-add": "exact_duplicate"}
    assert res.segment["n_docs"] == len(fresh)
    assert Datastore.open(ds_path).verify() == []


class _DiesAfter:
    """A local executor whose driver is stopped after ``n`` finished items of the map over ``step``
    items (a killed dedup); maps over other steps run through."""

    def __init__(self, step: str, n: int) -> None:
        self.step, self.n, self.inner = step, n, LocalExecutor(1)
        self.parallelism = 1

    def map(self, fn, ctx, items):
        for i, out in enumerate(self.inner.map(fn, ctx, items)):
            if items[0][0] == self.step and i == self.n:
                raise KeyboardInterrupt("killed")
            yield out


def test_a_killed_dedup_resumes_to_the_same_reasons_and_filters(built4):
    """Kill the dedup while it scatters and builds filters, while it decides partitions, while it
    writes reasons; run it again each time: it resumes from its done-markers and ends with the
    uninterrupted build's reasons and generation file, byte for byte."""
    result, cfg = built4
    lay = Layout(cfg.out)
    shards = result.manifest["counts"]["shards"]
    parts = sorted((int(p.stem.split("-")[1]), int(p.stem.split("-")[2])) for p in lay.work.glob("ingest/part-*.parquet"))
    part_docs = [pq.read_metadata(lay.staged(*pt)).num_rows for pt in parts]
    want = [np.load(lay.reasons(p)).tobytes() for p in range(shards)]
    gen = lay.checkpoint.read_bytes()
    shutil.rmtree(lay.work / "dedup")  # reasons, filters, markers
    with open_job(cfg.out, "datastore") as job:
        for step, n in (("scatter", 3), ("partition", 2), ("reasons", 1)):
            with pytest.raises(KeyboardInterrupt):
                run_dedup(job, _DiesAfter(step, n), cfg, parts, part_docs)
            assert job.done(f"dedup/{step}-00000") is not None  # it got that far
        stats = run_dedup(job, LocalExecutor(1), cfg, parts, part_docs)
    assert stats["partitions"] == 4 and stats["exact_duplicate"] == 2 and stats["near_duplicate"] == 2
    assert [np.load(lay.reasons(p)).tobytes() for p in range(shards)] == want
    assert lay.checkpoint.read_bytes() == gen


def test_parts_are_tokenized_by_their_dedup_task_and_a_missing_one_by_the_tokenize_step(built4, tmp_path):
    """Pipelining: the task that decides a part tokenizes it (its reasons marker carries the
    tokenize marker's result). A part whose tokenize marker is lost (a kill between the two
    markers) is tokenized again by the tokenize step on resume, to the same datastore."""
    _, cfg4 = built4
    cfg = replace(cfg4, out=str(tmp_path / "built"))  # its own build: other tests rewrite built4's dedup markers
    result = build(cfg)
    with open_job(cfg.out, "datastore") as job:
        for p in range(result.manifest["counts"]["shards"]):
            assert job.done(f"dedup/reasons-{p:05d}")["tokenized"] == job.done(f"tokenize/part-{p:05d}")
    out = tmp_path / "ds"
    shutil.copytree(cfg.out, out)
    for rel in ("manifest.json", "versions", "_work/tokenize/part-00001.json", "_work/tokenize/part-00001.npz", "_work/finalize"):
        path = out / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = build(replace(cfg, out=str(out)))
    assert not resumed.already_complete
    assert resumed.manifest["datastore_id"] == result.manifest["datastore_id"]
    assert [s["tokens_sha256"] for s in resumed.manifest["shards"]] == [s["tokens_sha256"] for s in result.manifest["shards"]]


@pytest.mark.slow
def test_ray_gives_the_same_bytes_as_local(built4, tmp_path):
    pytest.importorskip("ray")
    import ray

    result, cfg = built4
    try:
        via_ray = build(replace(cfg, out=str(tmp_path / "ray"), executor="ray", workers=2, keep_work=False))
    finally:
        ray.shutdown()
    same_datastore(via_ray.manifest, result.manifest)
    for s in result.manifest["shards"]:  # the shard files themselves, byte for byte
        for key in ("documents_file", "chunks_file", "removed_file"):
            rel = s[key]["path"]
            assert (tmp_path / "ray" / rel).read_bytes() == (Path(cfg.out) / rel).read_bytes()
    assert (tmp_path / "ray" / "dedup" / "gen-v00001.npz").read_bytes() == \
           (Path(cfg.out) / "dedup" / "gen-v00001.npz").read_bytes()


def test_a_build_begun_before_partitioned_dedup_redoes_dedup_and_later_steps(built4, tmp_path):
    """An unfinished build whose dedup ran as the old sequential pass (its checkpoint, no dedup plan):
    dedup, tokenize and finalize run again (their old results may rest on a Bloom false positive)."""
    result, cfg = built4
    out = tmp_path / "old"
    shutil.copytree(cfg.out, out)
    (out / "manifest.json").unlink()  # killed before publishing
    for marker in (out / "_work" / "dedup").glob("*.json"):
        marker.unlink()  # the old pass left reasons and checkpoint.npz, no done-markers
    stale = out / "_work" / "tokenize" / "stale.txt"
    stale.write_text("from the earlier version")
    again = build(replace(cfg, out=str(out)))
    assert not again.already_complete and not stale.exists()
    same_datastore(again.manifest, result.manifest)
