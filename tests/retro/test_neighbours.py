"""The neighbours job on a real Flat index: own document never retrieved, explicit schema, a duck-typed
retriever, the leakage filter, and resume after an interrupted run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from retromem.retro.splits import SplitSpec
from retromem.retro.neighbours import NEIGHBOURS_SCHEMA, NeighbourTable, NeighboursConfig, compute_neighbours, ngram_hashes, read_manifest
from retromem.errors import ConfigError

from tests.retro.conftest import SPLIT


def _all_rows(out) -> dict:
    m = read_manifest(out)
    tables = [pq.read_table(out / s["file"]) for s in m["shards"]]
    for t in tables:
        assert t.schema.equals(NEIGHBOURS_SCHEMA)
    return {name: sum((t.column(name).to_pylist() for t in tables), []) for name in NEIGHBOURS_SCHEMA.names}


def test_every_chunk_gets_k_neighbours_never_from_its_own_document(retro_ds, retro_index, tmp_path):
    cfg = NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "nb"), k=3, split="all", shard_chunks=50)
    res = compute_neighbours(cfg, retro_index, progress=False)
    assert res.manifest["complete"] and res.manifest["query"] == "embeddings"
    rows = _all_rows(res.out)
    assert rows["chunk_id"] == list(range(retro_ds.num_chunks))
    nbr = np.array(rows["neighbour_ids"])
    assert nbr.shape == (retro_ds.num_chunks, 3) and (nbr >= 0).all()
    own = retro_ds.chunk_doc_array[np.array(rows["chunk_id"])]
    got = retro_ds.chunk_doc_array[nbr]
    assert (got != own[:, None]).all()  # the paper's rule
    assert (got == np.array(rows["neighbour_doc_ids"])).all()
    # and they are the nearest such chunks: exact search with the same exclusion
    from retromem.index.embed import Embeddings

    emb = Embeddings(retro_index.meta["embeddings_path"]).get(np.arange(retro_ds.num_chunks))
    for c in (0, 40, retro_ds.num_chunks - 1):
        scores = emb @ emb[c]
        scores[retro_ds.chunk_doc_array[:] == own[c]] = -np.inf
        assert set(np.argsort(-scores)[:3]) == set(nbr[c])


class TextOnlyRetriever:
    """What the service client offers: search() and nothing else (no stored embeddings)."""

    def __init__(self, index, fail_after: int | None = None) -> None:
        self.index, self.calls, self.fail_after = index, 0, fail_after

    def search(self, queries, k, *, exclude_doc_ids=None, **kw):
        assert isinstance(queries[0], str)
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        return self.index.search(queries, k, exclude_doc_ids=exclude_doc_ids, **kw)


def test_a_duck_typed_retriever_gets_text_queries(retro_ds, retro_index, tmp_path):
    cfg = NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "nb"), k=2, split="all", max_chunks=24,
                           batch_size=8)
    res = compute_neighbours(cfg, TextOnlyRetriever(retro_index), progress=False)
    assert res.manifest["query"] == "text" and res.chunks == 24
    rows = _all_rows(res.out)
    own = retro_ds.chunk_doc_array[np.array(rows["chunk_id"])]
    assert (np.array(rows["neighbour_doc_ids"]) != own[:, None]).all()


def test_interrupted_job_resumes_and_matches_an_uninterrupted_run(retro_ds, retro_index, tmp_path):
    kw = dict(datastore=str(retro_ds.path), k=2, split="train", shard_chunks=16, batch_size=8, **SPLIT)
    ref = compute_neighbours(NeighboursConfig(out=str(tmp_path / "ref"), **kw), retro_index, progress=False)
    out = tmp_path / "nb"
    with pytest.raises(KeyboardInterrupt):
        compute_neighbours(NeighboursConfig(out=str(out), **kw), TextOnlyRetriever(retro_index, fail_after=5),
                           progress=False)
    partial = read_manifest(out)
    assert not partial["complete"] and 1 <= len(partial["shards"]) < ref.manifest["shards"][-1]["shard"] + 1
    assert not list(out.glob(".*tmp*"))  # no half-written shard left behind
    with pytest.raises(ConfigError, match="other settings"):  # resuming needs the same settings
        compute_neighbours(NeighboursConfig(out=str(out), **{**kw, "k": 3}), retro_index, progress=False)
    res = compute_neighbours(NeighboursConfig(out=str(out), **kw), retro_index, progress=False)
    assert res.shards_skipped == len(partial["shards"]) and res.manifest["complete"]
    assert _all_rows(out)["neighbour_ids"] == _all_rows(ref.out)["neighbour_ids"]
    # the split held out whole documents
    held = SplitSpec(SPLIT["eval_fraction"], SPLIT["split_seed"]).is_eval(retro_ds.chunk_doc_array[np.array(_all_rows(out)["chunk_id"])])
    assert not held.any()


def test_leakage_filter_drops_neighbours_sharing_ngrams_with_held_out_documents(retro_ds, retro_index, tmp_path):
    n = 6
    spec = SplitSpec(SPLIT["eval_fraction"], SPLIT["split_seed"])
    cfg = NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "nb"), k=2, split="train", leakage_ngram=n,
                           candidates=40, **SPLIT)
    res = compute_neighbours(cfg, retro_index, progress=False)
    held = set()
    for d in spec.doc_ids(retro_ds.num_documents, "eval"):
        ids = retro_ds.document_chunk_ids(int(d))
        toks, lens = retro_ds.tokens(ids)
        held |= set(ngram_hashes(np.concatenate([toks[i, :lens[i]] for i in range(len(ids))]), n).tolist())
    nbr = np.array(_all_rows(res.out)["neighbour_ids"]).reshape(-1)
    nbr = nbr[nbr >= 0]
    toks, lens = retro_ds.neighbour_tokens(nbr)
    for t, l in zip(toks, lens):
        assert not set(ngram_hashes(t[:l], n).tolist()) & held
    assert res.dropped_for_leakage > 0  # the documents share boilerplate (">>> ", "the")
    assert NeighbourTable(res.out, retro_ds).k == 2


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="`split`"):
        NeighboursConfig(datastore="x", out="y", split="test")
    with pytest.raises(ConfigError, match="`k`"):
        NeighboursConfig(datastore="x", out="y", k=0)
    with pytest.raises(ConfigError, match="`candidates`"):
        NeighboursConfig(datastore="x", out="y", k=4, candidates=2)


def test_neighbours_through_a_running_server_equal_text_queries_in_process(retro_ds, retro_index, tmp_path):
    """`retromem retro neighbours --server`: a real server on loopback, chunk texts embedded there as
    queries; the table equals the in-process job with text queries. A server over another datastore is
    refused (its chunk ids are not this datastore's)."""
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    local = compute_neighbours(NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "local"), k=2,
                                                split="all", query="text", max_chunks=60), retro_index, progress=False)
    running = start_server(ServerConfig(datastore=str(retro_ds.path), dense=str(retro_index.path), port=0, workers=2))
    try:
        r = CliRunner().invoke(main, ["retro", "neighbours", str(retro_ds.path), "--server", running.target, "-k", "2",
                                      "--split", "all", "--query", "text", "--max-chunks", "60", "--out", str(tmp_path / "remote")])
        assert r.exit_code == 0, r.output
        remote = _all_rows(tmp_path / "remote")
        want = _all_rows(local.out)
        assert remote["chunk_id"] == want["chunk_id"] and remote["neighbour_ids"] == want["neighbour_ids"]
        np.testing.assert_allclose(np.array(remote["scores"]), np.array(want["scores"]), rtol=1e-4)
        r = CliRunner().invoke(main, ["retro", "neighbours", str(retro_ds.path), "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and "exactly one of --index" in r.output
    finally:
        running.stop(0)
    from retromem.datastore import BuildConfig, build

    other = tmp_path / "other-ds"
    build(BuildConfig(inputs=(str(retro_ds.path / "manifest.json"),), out=str(other), tokenizer="gpt2", workers=1,
                      format="text"))
    running = start_server(ServerConfig(datastore=str(other), port=0, workers=2))
    try:
        from retromem.service.client import RetrievalClient

        with RetrievalClient(running.target) as client, pytest.raises(ConfigError, match="its chunk ids would not be this datastore's"):
            compute_neighbours(NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "y")), client, progress=False)
    finally:
        running.stop(0)


def _shard_bytes(out) -> dict:
    m = read_manifest(out)
    return {s["file"]: (out / s["file"]).read_bytes() for s in m["shards"]}


@pytest.mark.slow  # spawns two worker processes, then a local Ray
def test_shards_as_tasks_locally_and_on_ray_write_the_in_process_files(retro_ds, retro_index, tmp_path):
    """One task per output shard, on two local worker processes and on a local Ray, each task opening
    the datastore and the index itself: the same shard files, byte for byte, and the same manifest
    rows as the in-process job (leakage filter on, so the tasks build the held-out n-grams too); a
    killed task-run resumes. Tasks need a retriever they can open: an object alone is refused."""
    from retromem.datastore.executors import make_executor
    from retromem.retro.neighbours import RetrieverSpec

    kw = dict(datastore=str(retro_ds.path), k=2, split="train", shard_chunks=20, leakage_ngram=6, candidates=12,
              index=str(retro_index.path), **SPLIT)
    ref = compute_neighbours(NeighboursConfig(out=str(tmp_path / "ref"), **kw), progress=False)
    want = _shard_bytes(ref.out)
    assert len(want) >= 4 and ref.dropped_for_leakage > 0
    local = compute_neighbours(NeighboursConfig(out=str(tmp_path / "local"), **kw), progress=False,
                               executor=make_executor("local", 2))
    assert _shard_bytes(local.out) == want
    strip = lambda m: [{k: v for k, v in s.items() if k not in ("sha256", "bytes", "size")} for s in m["shards"]]
    assert strip(local.manifest) == strip(ref.manifest) and local.dropped_for_leakage == ref.dropped_for_leakage
    ray_run = compute_neighbours(NeighboursConfig(out=str(tmp_path / "ray"), **kw), progress=False,
                                 executor=make_executor("ray", 2))
    assert _shard_bytes(ray_run.out) == want and ray_run.manifest["complete"]
    # resume: drop two shards from a finished task-run's record; a re-run computes only those
    m = read_manifest(local.out)
    for s in m["shards"][1:3]:
        (local.out / s["file"]).unlink()
    again = compute_neighbours(NeighboursConfig(out=str(tmp_path / "local"), **kw), progress=False,
                               executor=make_executor("local", 2))
    assert again.shards_done == 2 and _shard_bytes(again.out) == want
    with pytest.raises(ConfigError, match="exactly one of `index`"):
        RetrieverSpec()
    with pytest.raises(ConfigError, match="tasks open their own retriever"):
        compute_neighbours(NeighboursConfig(out=str(tmp_path / "x"), **{**kw, "index": None}), retro_index,
                           progress=False, executor=make_executor("local", 1))


def test_tasks_open_a_datastore_given_as_a_url_by_its_url(retro_ds, retro_index, tmp_path, monkeypatch):
    """A datastore named by a URL reaches each task as that URL (each node mirrors it), never folded
    into a local path (``Path('memory://b/ds').resolve()`` is ``<cwd>/memory:/b/ds``): the task-run
    (one in-process worker, so it sees this process's ``memory://``) writes the in-process files."""
    import uuid

    import fsspec

    from retromem.datastore.executors import make_executor

    monkeypatch.setenv("RETROMEM_CACHE", str(tmp_path / "cache"))
    fs, root = fsspec.filesystem("memory"), f"nb{uuid.uuid4().hex[:8]}"
    fs.put(str(retro_ds.path), f"/{root}/ds", recursive=True)
    try:
        kw = dict(k=2, split="train", shard_chunks=40, index=str(retro_index.path), **SPLIT)
        ref = compute_neighbours(NeighboursConfig(datastore=str(retro_ds.path), out=str(tmp_path / "ref"), **kw),
                                 progress=False)
        got = compute_neighbours(NeighboursConfig(datastore=f"memory://{root}/ds", out=str(tmp_path / "url"), **kw),
                                 progress=False, executor=make_executor("local", 1))
        assert got.manifest["complete"] and got.manifest["datastore_path"] == f"memory://{root}/ds"
        assert _shard_bytes(got.out) == _shard_bytes(ref.out)
    finally:
        fs.rm(f"/{root}", recursive=True)


def test_retriever_spec_paths_are_absolute_before_they_reach_a_task(tmp_path, monkeypatch):
    """A relative --tls-ca (or index) is resolved in the driver, where it was given: a Ray worker's
    working directory is another one. URLs stay URLs."""
    from retromem.retro.neighbours import RetrieverSpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ca.pem").write_text("x")
    (tmp_path / "idx").mkdir()
    assert RetrieverSpec(server="host:1", tls_ca="ca.pem").tls_ca == str(tmp_path / "ca.pem")
    assert RetrieverSpec(index="idx").index == str(tmp_path / "idx")
    assert RetrieverSpec(index="s3://b/idx").index == "s3://b/idx"
