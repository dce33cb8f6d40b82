"""Dense retrieval on real text: the demo corpus embedded with the offline all-MiniLM-L6-v2, real
FAISS indexes, recall against exact search, ids back to chunks, exclusion, resume, bad input."""

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
import pytest

from tests.conftest import demo_records, write_jsonl

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    """Six real documents (about 800 chunks), GPT-2 tokens, several datastore shards."""
    from retromem.datastore import BuildConfig, Datastore, build

    d = tmp_path_factory.mktemp("dense")
    recs = [{"id": r["id"], "text": r["text"]} for r in demo_records()[:6]]
    write_jsonl(d / "docs.jsonl", recs)
    cfg = BuildConfig(inputs=(str(d / "docs.jsonl"),), out=str(d / "ds"), tokenizer="gpt2", shard_bytes=60_000, workers=1)
    build(cfg)
    return Datastore.open(cfg.out)


@pytest.fixture(scope="module")
def emb_dir(small_ds, tmp_path_factory):
    from retromem.index.embed import EmbedConfig, embed_datastore

    out = tmp_path_factory.mktemp("emb") / "emb"
    res = embed_datastore(EmbedConfig(datastore=str(small_ds.path), out=str(out), batch_size=64), progress=False)
    assert res.embedded_shards == len(small_ds.manifest["shards"])
    return out


def _build(emb_dir, out, factory, **kw):
    from retromem.index.dense_build import DenseBuildConfig, build_dense

    kw.setdefault("tune_queries", 150)
    overwrite = kw.pop("overwrite", False)
    return build_dense(DenseBuildConfig(embeddings=str(emb_dir), out=str(out), factory=factory, **kw),
                      overwrite=overwrite, progress=False)


@pytest.fixture(scope="module")
def flat_index(emb_dir, tmp_path_factory):
    from retromem.index.dense import DenseIndex

    res = _build(emb_dir, tmp_path_factory.mktemp("flat") / "idx", "Flat")
    return DenseIndex.open(res.out)


@pytest.fixture(scope="module")
def ivf_index(emb_dir, tmp_path_factory):
    from retromem.index.dense import DenseIndex

    res = _build(emb_dir, tmp_path_factory.mktemp("ivf") / "idx", "IVF16,SQ8", target_recall=0.95)
    return DenseIndex.open(res.out)


# -- the embedding job -----------------------------------------------------------------------


def test_embeddings_record_model_and_match_a_fresh_encode(small_ds, emb_dir):
    from retromem.index.embed import Embedder, Embeddings

    emb = Embeddings(emb_dir)
    e = Embedder("all-minilm-l6-v2")
    assert emb.embedder.name == "all-minilm-l6-v2" and emb.dim == 384 == e.dim
    assert emb.embedder.weights_sha256 == e.info.weights_sha256 and len(emb.embedder.weights_sha256) == 64
    assert emb.num_vectors == small_ds.num_chunks and emb.datastore_id == small_ds.datastore_id
    ids = np.array([0, 5, small_ds.num_chunks // 2, small_ds.num_chunks - 2])
    fresh = e.encode(small_ds.chunk_texts(ids))
    stored = emb.get(ids)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)  # unit norm: inner product = cosine
    np.testing.assert_allclose(stored, fresh, atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_killed_embedding_job_resumes(small_ds, emb_dir, tmp_path):
    """kill -9 the real job after its first shard, re-run it: done shards are kept, the rest are
    embedded, and the result equals an uninterrupted run."""
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "index", "embed", str(small_ds.path), "--out", str(out), "--batch-size", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / "_work").glob("shard-*.done.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "embeddings.json").exists()
    first = sorted(out.glob("shard-*.npy"))[0]
    mtime = first.stat().st_mtime_ns
    from retromem.index.embed import EmbedConfig, embed_datastore

    res = embed_datastore(EmbedConfig(datastore=str(small_ds.path), out=str(out), batch_size=64), progress=False)
    n_shards = len(small_ds.manifest["shards"])
    assert 0 < res.embedded_shards < n_shards
    assert first.stat().st_mtime_ns == mtime  # not embedded again
    ref = json.loads((emb_dir / "embeddings.json").read_text())
    for a, b in zip(res.manifest["shards"], ref["shards"]):
        x, y = np.load(out / a["file"]), np.load(emb_dir / b["file"])
        np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3)
    # a finished job re-run does nothing
    assert embed_datastore(EmbedConfig(datastore=str(small_ds.path), out=str(out)), progress=False).embedded_shards == 0


# -- search ----------------------------------------------------------------------------------


def test_flat_equals_exact_search_and_ids_map_back(small_ds, emb_dir, flat_index):
    from retromem.index.dense_eval import exact_search
    from retromem.index.embed import Embeddings

    emb = Embeddings(emb_dir)
    ids, q = emb.sample(40, seed=3)
    res = flat_index.search(q, 10, fetch=True)
    _, truth = exact_search(emb, q, 10)
    assert (res.chunk_ids == truth).mean() > 0.97  # ties may swap
    assert (res.chunk_ids[:, 0] == ids).all()  # each chunk finds itself first
    assert np.all(np.diff(res.scores, axis=1) <= 1e-6)
    for row, pays in zip(res.chunk_ids, res.payloads):
        for cid, p in zip(row, pays):
            assert p.chunk_id == cid and p.doc_id == int(small_ds.doc_ids([cid])[0])
            assert p.text == small_ds.chunk_texts([cid])[0]
            assert p.tokens.tolist() == small_ds.chunks([cid])[0].tokens.tolist()
            nxt = small_ds.continuation_ids([cid])[0]
            assert p.continuation_id == (int(nxt) if nxt >= 0 else None)
            if p.continuation_id is not None:
                assert p.continuation_text == small_ds.chunk_texts([nxt])[0]


def test_text_queries_find_their_chunk(small_ds, flat_index):
    cids = [3, small_ds.num_chunks // 3, small_ds.num_chunks - 2]
    texts = small_ds.chunk_texts(cids)
    res = flat_index.search(texts, 3)
    assert res.chunk_ids[:, 0].tolist() == cids
    assert (res.scores[:, 0] > 0.99).all()


def test_compressed_index_recall_against_exact_on_real_text(emb_dir, ivf_index):
    from retromem.index.dense_eval import evaluate

    t = ivf_index.meta["tuning"]
    assert t["param"] == "nprobe" and t["reached"], t
    assert ivf_index.meta["index_bytes"] / ivf_index.ntotal < 0.3 * 4 * 384  # SQ8: about 4x smaller than float32
    rep = evaluate(ivf_index.path, n_queries=150, ks=(1, 10))
    assert rep.recall[10] >= 0.9, rep.recall
    # too few probes must cost recall: the tuning is doing something
    low = evaluate(ivf_index.path, n_queries=150, ks=(10,), nprobe=1)
    assert low.recall[10] < rep.recall[10]


def test_hnsw_tuning_reaches_target(emb_dir, tmp_path):
    from retromem.index.dense import DenseIndex

    res = _build(emb_dir, tmp_path / "hnsw", "HNSW32", target_recall=0.9)
    t = res.meta["tuning"]
    assert t["param"] == "efSearch" and t["reached"] and t["curve"][-1]["recall"] >= 0.9
    idx = DenseIndex.open(res.out)
    assert idx.defaults["efSearch"] == t["value"]


def test_exclusion_keeps_k_hits_from_other_documents(small_ds, flat_index, ivf_index):
    from retromem.index.embed import Embeddings

    emb = Embeddings(flat_index.meta["embeddings_path"])
    ids, q = emb.sample(20, seed=5)
    own = small_ds.doc_ids(ids)
    for idx in (flat_index, ivf_index):
        res = idx.search(q, 10, exclude_doc_ids=[[d] for d in own])
        assert (res.chunk_ids >= 0).all()
        docs = small_ds.doc_ids(res.chunk_ids.reshape(-1)).reshape(res.chunk_ids.shape)
        assert not (docs == own[:, None]).any()
    # exclude every document but one: all k hits come from the one left
    keep = 2
    others = [d for d in range(small_ds.num_documents) if d != keep]
    res = flat_index.search(q[:3], 10, exclude_doc_ids=[others] * 3)
    assert set(small_ds.doc_ids(res.chunk_ids.reshape(-1)).tolist()) == {keep}
    # None and a bare int work per query
    res = flat_index.search(q[:2], 5, exclude_doc_ids=[None, int(own[1])])
    assert res.chunk_ids[0, 0] == ids[0] and int(own[1]) not in small_ds.doc_ids(res.chunk_ids[1]).tolist()


def test_shards_merged_by_score_and_on_disk_equal_one_index(emb_dir, tmp_path):
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    one = DenseIndex.open(_build(emb_dir, tmp_path / "one", "IVF16,Flat", tune=False).out)
    sharded = DenseIndex.open(_build(emb_dir, tmp_path / "sharded", "IVF16,Flat", tune=False, shard_vectors=300).out)
    ondisk = DenseIndex.open(_build(emb_dir, tmp_path / "ondisk", "IVF16,Flat", tune=False, shard_vectors=300, merge="ondisk").out)
    assert len(sharded.meta["shards"]) >= 3 and ondisk.meta["merged"] is not None
    _, q = Embeddings(emb_dir).sample(30, seed=7)
    a, b, c = (i.search(q, 10, nprobe=4) for i in (one, sharded, ondisk))
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.scores, c.scores, rtol=1e-5, atol=1e-5)
    assert (a.chunk_ids == c.chunk_ids).mean() > 0.97


def test_search_parameters_reused_across_calls_answer_as_fresh_ones(ivf_index, emb_dir):
    """Parameters without a selector are built once per (shard, nprobe, efSearch) and reused: calls
    alternating nprobe answer as a freshly opened index does, and the cache stays bounded."""
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    _, q = Embeddings(emb_dir).sample(20, seed=11)
    idx = DenseIndex.open(ivf_index.path)
    got = [idx.search(q, 10, nprobe=n) for n in (1, 8, 1, 8)]
    for n, res in zip((1, 8, 1, 8), got):
        ref = DenseIndex.open(ivf_index.path).search(q, 10, nprobe=n)
        np.testing.assert_array_equal(res.chunk_ids, ref.chunk_ids)
        np.testing.assert_array_equal(res.scores, ref.scores)
    assert (got[0].chunk_ids != got[1].chunk_ids).any()  # nprobe reached FAISS through the cached parameters
    for n in range(1, 80):
        idx.knn(q[:1], 5, nprobe=n)
    assert len(idx._params_cache) <= 64


@pytest.mark.slow  # starts a local Ray
def test_shards_added_at_once_locally_and_on_ray_equal_the_sequential_build(emb_dir, tmp_path):
    """Train once, then one task per shard: two local processes, and Ray tasks, write shard files
    byte-identical to the one-at-a-time build (the integrity section holds every file's sha256)."""
    kw = dict(tune=False, shard_vectors=300)
    one = _build(emb_dir, tmp_path / "one", "IVF16,Flat", **kw)
    two = _build(emb_dir, tmp_path / "two", "IVF16,Flat", workers=2, **kw)
    assert len(one.meta["shards"]) >= 3
    shard_files = lambda m: {k: v for k, v in m["integrity"]["files"].items() if k.startswith("shard-")}  # noqa: E731
    assert shard_files(two.meta) == shard_files(one.meta)
    ray = pytest.importorskip("ray")
    try:
        via_ray = _build(emb_dir, tmp_path / "ray", "IVF16,Flat", executor="ray", workers=2, **kw)
    finally:
        ray.shutdown()
    assert shard_files(via_ray.meta) == shard_files(one.meta)


def test_killed_build_resumes(emb_dir, tmp_path):
    """kill -9 a real build between shards; the re-run keeps finished shards and completes."""
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "index", "build-dense", str(emb_dir), "--out", str(out),
           "--factory", "HNSW32", "--shard-vectors", "60", "--no-tune"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((out / "_work").glob("shard-*.done.json"))) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "index.json").exists()
    first = out / "shard-00000.index"
    mtime = first.stat().st_mtime_ns
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert first.stat().st_mtime_ns == mtime
    idx = DenseIndex.open(out)
    emb = Embeddings(emb_dir)
    assert idx.ntotal == emb.num_vectors and sum(s["ntotal"] for s in idx.meta["shards"]) == emb.num_vectors
    ids, q = emb.sample(50, seed=11)
    assert (idx.search(q, 1).chunk_ids[:, 0] == ids).mean() >= 0.98


# -- the automatic choice --------------------------------------------------------------------


def test_auto_choice_respects_the_memory_budget(emb_dir, tmp_path):
    from retromem.index.factory import choose_factory, parse_factory

    n, d = 10_000_000, 384
    for budget in (64 * 2**30, 8 * 2**30, 2 * 2**30, 600 * 2**20):
        c = choose_factory(n, d, budget)
        assert c.estimated_bytes <= budget
        assert parse_factory(c.factory, d).index_bytes(n) == c.estimated_bytes
    assert choose_factory(n, d, 64 * 2**30).factory == "HNSW32"
    assert "PQ" in choose_factory(n, d, 600 * 2**20).factory
    with pytest.raises(ValueError, match="budget"):
        choose_factory(n, d, 10 * 2**20)
    # built for real: the index on disk fits the budget and the reason is recorded
    from retromem.index.embed import Embeddings

    nvec = Embeddings(emb_dir).num_vectors
    budget = 460 * nvec  # room for SQ8 codes (392 B/vector + centroids), not for float32 vectors or a graph
    res = _build(emb_dir, tmp_path / "auto", "auto", memory_budget=budget)
    assert "SQ8" in res.meta["factory"] and res.meta["index_bytes"] <= budget
    assert "budget" in res.meta["reason"] and res.meta["build"]["candidates"]


def test_byte_model_matches_built_indexes(emb_dir, flat_index, ivf_index):
    for idx in (flat_index, ivf_index):
        est, real = idx.meta["estimated_bytes"], idx.meta["index_bytes"]
        assert abs(est - real) / real < 0.05, (idx.factory, est, real)


# -- bad input -------------------------------------------------------------------------------


def test_bad_queries_get_clear_errors(flat_index):
    from retromem.errors import QueryError

    good = np.ones((1, 384), np.float32) / np.sqrt(384)
    with pytest.raises(QueryError, match=r"shape \(2, 100\).*\(n, 384\)"):
        flat_index.search(np.zeros((2, 100), np.float32), 5)
    with pytest.raises(QueryError, match="2-D"):
        flat_index.search(good[0], 5)
    nan = good.copy()
    nan[0, 7] = np.nan
    with pytest.raises(QueryError, match="query vector 0 holds NaN"):
        flat_index.search(nan, 5)
    for k in (0, -1, 10**6):
        with pytest.raises(QueryError, match="k must be in 1.."):
            flat_index.search(good, k)
    with pytest.raises(QueryError, match="empty"):
        flat_index.search([], 5)
    with pytest.raises(QueryError, match="empty"):
        flat_index.search(np.zeros((0, 384), np.float32), 5)
    with pytest.raises(QueryError, match="query text 1 is empty"):
        flat_index.search(["fine", "   "], 5)
    with pytest.raises(QueryError, match="a batch"):
        flat_index.search("one string", 5)
    with pytest.raises(QueryError, match="exclude_doc_ids has 2 entries for 1 queries"):
        flat_index.search(good, 5, exclude_doc_ids=[[0], [1]])
    with pytest.raises(QueryError, match="doc_id 999999"):
        flat_index.search(good, 5, exclude_doc_ids=[[999999]])
    with pytest.raises(QueryError, match="nprobe"):
        flat_index.search(good, 5, nprobe=0)
    for huge in (2**31, 10**8):  # refused before FAISS (2^31 was a SWIG OverflowError, 1e8 gigabytes of memory)
        with pytest.raises(QueryError, match=r"ef_search must be an integer in 1\.\.1048576"):
            flat_index.search(good, 5, ef_search=huge)
    assert flat_index.search(good, 5).chunk_ids.shape == (1, 5)  # still serving


def test_index_refuses_another_datastore_or_embedder(flat_index, built, tmp_path):
    from retromem.datastore import Datastore
    from retromem.index.dense import DenseIndex
    from retromem.errors import IndexFormatError

    other = Datastore.open(built[1].out)
    with pytest.raises(IndexFormatError, match="built from datastore .* not "):
        DenseIndex.open(flat_index.path, datastore=other)
    copy = tmp_path / "copy"
    shutil.copytree(flat_index.path, copy)
    meta = json.loads((copy / "index.json").read_text())
    meta["embedder"]["weights_sha256"] = "0" * 64
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFormatError, match="built with embedder"):
        DenseIndex.open(copy).search(["a query"], 3)


def test_truncated_or_corrupt_index_files(flat_index, tmp_path):
    from retromem.index.dense import DenseIndex
    from retromem.errors import IndexFormatError

    for damage in ("truncate", "corrupt", "delete"):
        copy = tmp_path / damage
        shutil.copytree(flat_index.path, copy)
        f = copy / "shard-00000.index"
        data = f.read_bytes()
        if damage == "truncate":
            f.write_bytes(data[: len(data) // 2])
        elif damage == "corrupt":
            f.write_bytes(b"\x00" * 16 + data[16:])
        else:
            f.unlink()
        with pytest.raises(IndexFormatError, match="shard-00000.index"):
            DenseIndex.open(copy)
    with pytest.raises(IndexFormatError, match="no index.json"):
        DenseIndex.open(tmp_path)


def test_bad_build_settings(emb_dir, tmp_path):
    from retromem.index.factory import parse_factory
    from retromem.errors import ConfigError

    with pytest.raises(ConfigError, match="part 2"):
        parse_factory("IVF16,Bogus", 384)
    with pytest.raises(ConfigError, match="multiple of 7"):
        parse_factory("IVF16,PQ7", 384)
    with pytest.raises(ConfigError, match="at least 39,000 training vectors"):
        _build(emb_dir, tmp_path / "big", "IVF1000,Flat")
    with pytest.raises(ConfigError, match="needs `--memory-budget`"):
        _build(emb_dir, tmp_path / "auto", "auto")
    with pytest.raises(ConfigError, match=r"`shard_vectors` \(--shard-vectors\) must be a positive integer, got 0"):
        _build(emb_dir, tmp_path / "zero", "Flat", shard_vectors=0)
    with pytest.raises(ConfigError, match=r"`target_recall` \(--target-recall\) must be in \(0, 1\], got 1.5"):
        _build(emb_dir, tmp_path / "recall", "Flat", target_recall=1.5)
    with pytest.raises(ConfigError, match=r"`merge` \(--merge\) must be one of 'none', 'ondisk', got 'x'"):
        _build(emb_dir, tmp_path / "merge", "Flat", merge="x")
    # --overwrite never deletes (nor writes into) a directory that is not a dense index
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="holds no retromem dense-index"):
            _build(emb_dir, mine, "Flat", overwrite=overwrite)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# -- command line ----------------------------------------------------------------------------


def test_cli_search_eval_and_plan(flat_index, ivf_index, small_ds, tmp_path):
    from click.testing import CliRunner

    from retromem.cli import main

    runner = CliRunner()
    text = small_ds.chunk_texts([10])[0]
    r = runner.invoke(main, ["index", "search", str(flat_index.path), text, "-k", "2", "--json"])
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert hits[0][0]["chunk_id"] == 10 and hits[0][0]["text"] == text
    r = runner.invoke(main, ["index", "eval-dense", str(ivf_index.path), "--queries", "50", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["recall"]) == {"1", "10", "100"} and rep["bytes_per_vector"] < 4 * 384
    r = runner.invoke(main, ["index", "search", str(flat_index.path), "x", "-k", "0"])
    assert r.exit_code == 2 and "k must be in 1.." in r.output
    png = tmp_path / "plan.png"
    r = runner.invoke(main, ["plan", "--tokens", "1e12", "--json", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout.split("\nplot")[0])
    assert plan["chunks"] == 15_625_000_000 and plan["embedding_bytes"] == 15_625_000_000 * 384 * 2
    assert png.stat().st_size > 10_000


@pytest.mark.gpu
def test_gpu_build_matches_cpu(emb_dir, flat_index, tmp_path):
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_faiss import gpu_count
    from retromem.index.embed import Embeddings

    if gpu_count() == 0:
        pytest.skip("no GPU visible to FAISS (faiss-gpu on a CUDA machine)")
    res = _build(emb_dir, tmp_path / "gpu", "IVF16,Flat", gpu=True, tune=False)
    gpu_idx = DenseIndex.open(res.out, gpu=True)
    cpu_idx = DenseIndex.open(res.out, gpu=False)
    _, q = Embeddings(emb_dir).sample(30, seed=9)
    a, b = gpu_idx.search(q, 10, nprobe=16), cpu_idx.search(q, 10, nprobe=16)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_ray_executor_embeds_the_same_vectors(tmp_path):
    """One embedder actor per GPU on a cluster; here a local Ray on CPU with two actors."""
    pytest.importorskip("ray")
    from retromem.datastore import BuildConfig, build
    from retromem.index.embed import EmbedConfig, Embeddings, embed_datastore

    recs = [{"id": r["id"], "text": r["text"][:6000]} for r in demo_records()[:4]]
    write_jsonl(tmp_path / "docs.jsonl", recs)
    cfg = BuildConfig(inputs=(str(tmp_path / "docs.jsonl"),), out=str(tmp_path / "ds"), tokenizer="gpt2", shard_bytes=5_000, workers=1)
    build(cfg)
    local = embed_datastore(EmbedConfig(datastore=cfg.out, out=str(tmp_path / "local")), progress=False)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        dist = embed_datastore(EmbedConfig(datastore=cfg.out, out=str(tmp_path / "ray"), executor="ray", ray_actors=2), progress=False)
    finally:
        ray.shutdown()
    assert len(dist.manifest["shards"]) >= 3 and dist.manifest["embedder"] == local.manifest["embedder"]
    a, b = Embeddings(local.out), Embeddings(dist.out)
    ids = np.arange(a.num_vectors)
    np.testing.assert_allclose(a.get(ids), b.get(ids), atol=2e-3)


# -- tuning on real queries (issue 15) -------------------------------------------------------


@pytest.fixture(scope="module")
def outside_queries(tmp_path_factory) -> Path:
    """Passages of demo documents that are not in the datastore (it holds the first six)."""
    texts = []
    for r in demo_records()[6:10]:
        words = r["text"].split()
        texts += [" ".join(words[i:i + 40]) for i in range(0, min(len(words), 1600), 40)]
    path = tmp_path_factory.mktemp("queries") / "queries.jsonl"
    write_jsonl(path, [{"query": t} for t in texts])
    return path


def test_tune_on_a_query_file_reports_held_out_recall(emb_dir, outside_queries, tmp_path):
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_eval import exact_search, load_query_file, recall_at, tune
    from retromem.index.embed import Embeddings

    out = _build(emb_dir, tmp_path / "ivf", "IVF16,Flat", tune=False).out
    rep = tune(out, target_recall=0.9, k=10, n_queries=100, query_file=outside_queries, holdout=0.3)
    t = rep.meta["tuning"]
    src = t["query_source"]
    n = sum(1 for _ in open(outside_queries))
    assert src["file_tuned_on"] + src["file_held_out"] == n and src["file_held_out"] == round(0.3 * n)
    assert len(src["query_file_sha256"]) == 64 and src["chunks"] == 100
    at = next(c for c in rep.curve if c["nprobe"] == rep.value)
    assert rep.reached and at["recall"] >= 0.9 and at["recall_file"] >= 0.9
    # the value chosen is the first one that reaches the target on both query sets
    assert all(min(c["recall"], c["recall_file"]) < 0.9 for c in rep.curve if c["nprobe"] < rep.value)
    # the held-out recall is what a search of those queries with the stored default gets
    index = DenseIndex.open(out)
    assert index.defaults["nprobe"] == rep.value
    x, _ = load_query_file(outside_queries, index)
    held = np.sort(np.random.default_rng(1).permutation(n)[:src["file_held_out"]])
    _, truth = exact_search(Embeddings(index.meta["embeddings_path"]), x[held], 10)
    assert rep.held_out_recall == pytest.approx(recall_at(index.knn(x[held], 10)[1], truth, 10))


def test_query_file_errors_name_the_problem(emb_dir, tmp_path):
    from retromem.errors import ConfigError
    from retromem.index.dense_eval import tune

    out = _build(emb_dir, tmp_path / "ivf", "IVF16,Flat", tune=False).out
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"query": "a fine query"}) + "\n{not json\n")
    wrong_dim = tmp_path / "v.npy"
    np.save(wrong_dim, np.ones((5, 7), np.float32))
    one = tmp_path / "one.txt"
    one.write_text("just one query\n")
    for path, msg in ((tmp_path / "missing.jsonl", "does not exist"), (bad_json, "line 2: not JSON"),
                      (wrong_dim, "(n, 384)"), (one, "holds 1 queries")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            tune(out, query_file=path, n_queries=20)
    with pytest.raises(ConfigError, match="--holdout"):
        tune(out, query_file=one, holdout=1.0)


def test_cli_tune_with_query_file(emb_dir, outside_queries, tmp_path):
    from click.testing import CliRunner

    from retromem.cli import main

    out = _build(emb_dir, tmp_path / "hnsw", "HNSW16", tune=False).out
    r = CliRunner().invoke(main, ["index", "dense", "tune", str(out), "--target-recall", "0.9", "--queries", "60",
                                  "--query-file", str(outside_queries)])
    assert r.exit_code == 0, r.output
    assert "held out" in r.output and "held-out queries: recall@10=" in r.output and "efSearch=" in r.output
    r = CliRunner().invoke(main, ["index", "dense", "tune", str(out), "--query-file", str(tmp_path / "nope.txt")])
    assert r.exit_code == 2 and "--query-file" in r.output and "Traceback" not in r.output


def test_knn_pads_rows_with_fewer_reachable_hits(ivf_index):
    """One probed list holds fewer than k vectors: the row ends in chunk id -1 with score -inf, and
    the hits before the padding are the list's best, as FAISS ranks them."""
    import faiss

    ivf = faiss.extract_index_ivf(ivf_index._indexes[0])
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    k = min(max(sizes) + 1, ivf_index.ntotal)
    x = np.random.default_rng(0).standard_normal((8, ivf_index.dim)).astype(np.float32)
    D, I = ivf_index.knn(x, k, nprobe=1)
    assert D.shape == I.shape == (8, k) and D.dtype == np.float32 and I.dtype == np.int64
    pad = I < 0
    assert pad[:, -1].all()  # one list never holds k vectors here
    assert np.isneginf(D[pad]).all() and np.isfinite(D[~pad]).all()
    for row in range(8):  # the padding is at the end, after scores in order
        n = int((~pad[row]).sum())
        assert not pad[row, :n].any() and (np.diff(D[row, :n]) <= 1e-6).all()
    full = ivf_index.knn(x, k, nprobe=ivf.nlist)[1]  # every list probed: no padding
    assert (full >= 0).all()
