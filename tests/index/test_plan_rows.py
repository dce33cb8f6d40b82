"""`retromem plan` from the rows of benchmarks/scale_curve.py (issue 19): rates pooled over the scales,
memory per task fitted as fixed + per shard unit, a plan fitted on small scales checked on a larger one,
the IVF list count inside FAISS's guideline by default, and the bytes a query reads from on-disk lists."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from retromem.index.factory import parse_factory
from retromem.index.plan import StackCosts, auto_factory, predict, predict_stack, stack_costs_from_rows

MiB = 2**20


def _rows(scale: int) -> list[dict]:
    """The rows one scale of the curve writes (figures in the proportions of the shared corpora)."""
    t, text, docs = 21_000_000 * scale, 72_000_000 * scale, 130_000 * scale
    shards = math.ceil(t / 64_000_000)
    return [
        {"stage": "datastore", "scale": scale, "tokens": t, "text_bytes": text, "documents": docs, "cpu_s": 32.0 * scale,
         "disk_bytes": int(9.7 * t), "peak_rss_driver": 600 * MiB, "peak_rss_max_child": 400 * MiB, "peak_rss_sum": 1300 * MiB},
        {"stage": "ngram", "scale": scale, "tokens": t, "text_bytes": text, "documents": docs, "cpu_s": 12.0 * scale,
         "disk_bytes": int(6.1 * t), "peak_rss_driver": 200 * MiB + 4 * min(t, 64_000_000),
         "peak_rss_max_child": 100 * MiB, "peak_rss_sum": 900 * MiB},
        {"stage": "fm", "scale": scale, "tokens": t, "text_bytes": text, "documents": docs, "cpu_s": 11.0 * scale,
         "disk_bytes": int(0.42 * text), "peak_rss_driver": 300 * MiB + 15 * min(text, 128 * MiB),
         "peak_rss_max_child": 0, "peak_rss_sum": 2000 * MiB},
        {"stage": "query", "scale": scale, "tokens": t, "text_bytes": text, "documents": docs, "ngram_shards": shards,
         "ngram_count": {"p50_ms": 0.04 * shards}, "fm_shards": 1, "fm_count": {"p50_ms": 0.25}},
    ]


@pytest.fixture()
def rows(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for s in (1, 4, 16) for r in _rows(s)))
    return p


def test_costs_from_rows_pool_rates_and_fit_memory(rows):
    c = stack_costs_from_rows(rows)
    assert c.datastore_text_mb_per_cpu_s == pytest.approx(72 / 32)
    assert c.ngram_tokens_per_cpu_s == pytest.approx(21e6 / 12)
    assert c.fm_text_mb_per_cpu_s == pytest.approx(72 / 11)
    assert c.datastore_bytes_per_token == pytest.approx(9.7, rel=1e-6)
    assert c.fm_bytes_per_text_byte == pytest.approx(0.42, rel=1e-6)
    # the n-gram task's peak: 200 MiB + 4 bytes per shard token, the shard capped at 64 M tokens
    assert c.ngram_build_fixed_bytes == pytest.approx(200 * MiB, rel=1e-3)
    assert c.ngram_build_bytes_per_shard_token == pytest.approx(4, rel=1e-3)
    assert c.fm_build_bytes_per_text_byte == pytest.approx(15, rel=1e-3)
    assert c.ngram_count_ms_per_shard == pytest.approx(0.04) and c.fm_count_ms == pytest.approx(0.25)
    assert c.datastore_build_peak_bytes == 600 * MiB


def test_count_latency_is_fitted_on_cpu_time_where_the_rows_have_it(tmp_path):
    # on a loaded machine the wall p50 adds the waits for a core; the plan fits a query's CPU time
    rows = [r for s in (1, 4) for r in _rows(s)]
    for r in rows:
        if r["stage"] == "query":
            r["ngram_count"] = {"p50_ms": 1.0 * r["ngram_shards"], "cpu_p50_ms": 0.05 * r["ngram_shards"]}
            r["fm_count"] = {"p50_ms": 3.0, "cpu_p50_ms": 0.3}
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = stack_costs_from_rows(p)
    assert c.ngram_count_ms_per_shard == pytest.approx(0.05) and c.fm_count_ms == pytest.approx(0.3)
    # the per-shard cost comes from the scales whose shards are full (4x: 84 M tokens, shards of 64 M) where
    # there are any; a 1x row's small shard searches faster
    for r in rows:
        if r["stage"] == "query" and r["scale"] == 1:
            r["ngram_count"]["cpu_p50_ms"] = 0.01
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert stack_costs_from_rows(p).ngram_count_ms_per_shard == pytest.approx(0.05)


def test_a_plan_fitted_on_small_scales_predicts_the_large_one(rows):
    c = stack_costs_from_rows(rows, max_tokens=4 * 21_000_000)  # 1x and 4x only
    big = {r["stage"]: r for r in _rows(16)}
    s = predict_stack(predict(big["datastore"]["tokens"]), costs=c)
    assert s.datastore_bytes == pytest.approx(big["datastore"]["disk_bytes"], rel=1e-3)
    assert s.datastore_cpu_core_hours * 3600 == pytest.approx(big["datastore"]["cpu_s"], rel=0.02)  # text per token rounds
    assert s.ngram_cpu_core_hours * 3600 == pytest.approx(big["ngram"]["cpu_s"], rel=1e-6)
    assert s.ngram_shards == 6 and s.ngram_build_peak_bytes == pytest.approx(big["ngram"]["peak_rss_driver"], rel=0.01)
    assert s.fm_bytes == pytest.approx(big["fm"]["disk_bytes"], rel=1e-3)
    assert s.ngram_count_ms == pytest.approx(6 * 0.04)
    with pytest.raises(Exception, match="no datastore rows"):
        stack_costs_from_rows(rows, max_tokens=1e6)


def test_auto_factory_keeps_nlist_in_faiss_range():
    for tokens in (1e8, 1e9, 6.4e8, 1e12):
        p = predict(int(tokens), factory="auto")
        nlist = parse_factory(p.factory, 384).nlist
        assert 4 * math.isqrt(p.chunks) <= nlist <= 16 * math.isqrt(p.chunks), (tokens, nlist)
        assert predict_stack(p).ivf_nlist_ok
    assert auto_factory(10_000_000, "PQ32") == "IVF32768_HNSW32,PQ32"  # 8 sqrt(1e7) = 25,298: 2**15 in log scale


def test_bytes_read_per_query_follow_the_probed_lists():
    p = predict(640_000_000, factory="IVF16384_HNSW32,PQ32")  # 10 M vectors, 610 per list
    even = predict_stack(p, nprobe=32, costs=StackCosts(**{**StackCosts.load().__dict__, "ivf_probed_list_ratio": 1.0}))
    full = predict_stack(p, nprobe=32, costs=StackCosts(**{**StackCosts.load().__dict__, "ivf_probed_list_ratio": 1.5}))
    assert even.ivf_bytes_read_per_query == int(32 * 10_000_000 / 16384 * (32 + 8))
    assert full.ivf_bytes_read_per_query == pytest.approx(1.5 * even.ivf_bytes_read_per_query, rel=1e-6)


def test_cli_plan_from_rows(rows):
    from retromem.cli import main

    r = CliRunner().invoke(main, ["plan", "--tokens", "1e9", "--json", "--measure-from", str(rows), "--fit-up-to", "1e8"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["stack"]["costs"]["machine"].startswith("scale-curve rows") and plan["stack"]["ivf_nlist_ok"]
    assert plan["stack"]["ngram_shards"] == math.ceil(1e9 / 64e6)
    r = CliRunner().invoke(main, ["plan", "--tokens", "1e9", "--measure-from", str(rows), "--ngram-shard-tokens", "1G"])
    assert r.exit_code == 0 and "suffix arr. 1 shard(s)" in r.output
    r = CliRunner().invoke(main, ["plan", "--fit-up-to", "1e8"])
    assert r.exit_code == 2 and "--fit-up-to needs --measure-from" in r.output


def test_a_dense_row_missing_a_field_is_named(tmp_path):
    from retromem.errors import ConfigError
    from retromem.index.plan import dense_costs_from_rows

    p = tmp_path / "rows.jsonl"
    p.write_text(json.dumps({"stage": "dense", "n": 100000, "tokens": 6_400_000, "nlist": 2048, "pq_bytes": 32,
                             "train_points": 79872, "add_cpu_s": 6.3, "peak_rss": 2**29}) + "\n")
    with pytest.raises(ConfigError, match=r"--measure-from .*100000 vectors.*lacks train_cpu_s"):
        dense_costs_from_rows(p)
