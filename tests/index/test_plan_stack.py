"""`retromem plan` over the whole stack: its size models against real artifacts built from a real
(small) datastore, FAISS's nlist guideline, and the CLI's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from retromem.index.plan import StackCosts, predict, predict_stack, stack_costs_from_artifacts


def tree_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def artifacts(built, tmp_path_factory):
    from retromem.index.fm_index import build_fm_index
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    ds = built[1].out
    root = tmp_path_factory.mktemp("plan")
    build_ngram_index(ds, root / "ng", NgramBuildConfig(), progress=False)
    build_fm_index(ds, root / "fm", progress=False)
    return ds, root / "ng", root / "fm"


def test_sizes_predicted_at_the_datastores_own_size_match_what_was_built(artifacts):
    from retromem.datastore import Datastore

    ds_dir, ng_dir, fm_dir = artifacts
    tokens = int(Datastore.open(ds_dir).manifest["counts"]["tokens"])
    costs = stack_costs_from_artifacts(ds_dir, fm_dir)
    s = predict_stack(predict(tokens, factory="IVF64,SQ8"), costs=costs)
    assert s.datastore_bytes == pytest.approx(tree_bytes(ds_dir), rel=1e-3)
    assert s.fm_bytes == pytest.approx(tree_bytes(fm_dir), rel=1e-3)
    # the suffix array's model is not fitted to this index: token width + pointer bytes per token
    sa_bytes = sum(f.stat().st_size for f in ng_dir.rglob("*") if f.is_file() and f.name.startswith(("tokenized", "table")))
    assert s.ngram_bytes == pytest.approx(sa_bytes, rel=0.05)


def test_shards_fan_out_and_pointer_width_grows_with_the_shard():
    costs = StackCosts.load()
    small = predict_stack(predict(int(1e8)), costs=costs)
    big = predict_stack(predict(int(1e12)), costs=costs)
    assert small.ngram_shards == 1 and big.ngram_shards == 1000
    assert big.ngram_count_ms == pytest.approx(1000 * small.ngram_count_ms)
    assert small.ngram_bytes / 1e8 == pytest.approx(2 + 4, rel=0.01)  # u16 tokens, 4-byte pointers (2e8 bytes)
    assert big.ngram_bytes / 1e12 == pytest.approx(2 + 4, rel=0.01)  # still 1e9-token shards


def test_ivf_list_count_is_checked_against_faiss_guideline():
    ok = predict_stack(predict(int(1e12), factory="OPQ64_384,IVF1048576_HNSW32,PQ64"))
    assert ok.ivf_nlist_ok and ok.ivf_nlist_range == (500_000, 2_000_000)  # 15.6 G vectors: sqrt = 125,000
    bad = predict_stack(predict(int(1e12), factory="OPQ64_384,IVF262144_HNSW32,PQ64"))
    assert not bad.ivf_nlist_ok and bad.ivf_nlist_suggested == 2**20
    # bytes read per query: nprobe lists of (codes + ids), the probed lists fuller than the mean one (measured ratio)
    ratio = StackCosts.load().ivf_probed_list_ratio
    assert bad.ivf_bytes_read_per_query == int(64 * (1e12 / 64 / 262144) * ratio * (64 + 8))


def test_cli_plan_prints_the_stack_and_refuses_fm_without_datastore(artifacts):
    from retromem.cli import main

    ds_dir, _, fm_dir = artifacts
    r = CliRunner().invoke(main, ["plan", "--tokens", "1e9", "--json", "--measure-from", str(ds_dir), "--fm", str(fm_dir)])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["stack"]["ngram_shards"] == 1 and plan["stack"]["fm_bytes"] > 0
    r = CliRunner().invoke(main, ["plan", "--tokens", "1e9"])
    assert r.exit_code == 0 and "suffix arr." in r.output and "FM-index" in r.output
    r = CliRunner().invoke(main, ["plan", "--fm", str(fm_dir)])
    assert r.exit_code == 2 and "--fm needs --measure-from" in r.output
    r = CliRunner().invoke(main, ["plan", "--nprobe", "0"])
    assert r.exit_code == 2 and "--nprobe" in r.output
