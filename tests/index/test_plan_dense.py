"""`retromem plan`'s dense build costs (issue 19): training modelled as the k-means the build runs
(two levels from TWO_LEVEL_MIN_NLIST lists on, flat on a GPU), and FAISS's rates fitted from the dense
rows of benchmarks/scale_curve.py, checked on a size the fit did not see."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from retromem.index.dense_faiss import TWO_LEVEL_MIN_NLIST, kmeans_flops
from retromem.index.plan import UnitCosts, dense_costs_from_rows, predict

MiB = 2**20
KMEANS_RATE = 2.0e10  # FLOPs per CPU-second in the made-up rows
ADD_RATE = 10_000.0  # vectors per CPU-second
FIXED = 300 * MiB


def _nlist(n: int) -> int:
    return {10**5: 2048, 10**6: 8192, 10**7: 32768}[n]


def _dense_row(n: int) -> dict:
    """What ``scale_curve.py --dense`` writes for n vectors, with costs exactly linear in the work."""
    nlist = _nlist(n)
    points = min(n, 39 * nlist)
    flops = kmeans_flops(nlist, points, 384, pq_m=32, pq_ksub=256)
    return {"stage": "dense", "scale": None, "tokens": n * 64, "n": n, "dim": 384, "nlist": nlist, "pq_bytes": 32,
            "train_points": points, "train_cpu_s": flops / KMEANS_RATE, "add_cpu_s": n / ADD_RATE,
            "build_maxrss": FIXED + int(1.5 * points * 384 * 4), "peak_rss": FIXED, "index_bytes": n * 40,
            "tuned": {"nprobe": 16, "bytes_read_per_query": 1e5, "p50_ms": 1.0}}


@pytest.fixture()
def rows(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text("".join(json.dumps(_dense_row(n)) + "\n" for n in (10**5, 10**6, 10**7)))
    return p


def test_training_modelled_as_the_build_trains():
    costs = UnitCosts.load()
    flat = predict(64 * 10**7, factory="IVF32768_HNSW32,PQ32", train_size=39 * 32768, costs=costs)
    assert flat.train_points == 39 * 32768
    # two levels on CPU: ~100x fewer FLOPs than the flat k-means a GPU runs at nlist 32,768
    assert flat.train_flops == pytest.approx(kmeans_flops(32768, 39 * 32768, 384, pq_m=32, pq_ksub=256))
    assert flat.train_flops < kmeans_flops(32768, 39 * 32768, 384, two_level=False) / 50
    small = predict(64 * 10**5, factory="IVF1024,PQ32", train_size=39 * 1024, costs=costs)
    assert 1024 < TWO_LEVEL_MIN_NLIST
    assert small.train_flops == pytest.approx(kmeans_flops(1024, 39 * 1024, 384, two_level=False, pq_m=32, pq_ksub=256))
    with pytest.raises(ValueError, match="`--train-size` must be positive, got 0"):
        predict(10**9, train_size=0)


def test_rates_from_dense_rows(rows):
    base = UnitCosts.load()
    c = dense_costs_from_rows(rows, base)
    assert c.add_vectors_per_s_cpu == pytest.approx(ADD_RATE * base.cpu_cores)  # whole-machine rates
    assert c.kmeans_flops_per_s_cpu == pytest.approx(KMEANS_RATE * base.cpu_cores)
    assert c.build_fixed_bytes == pytest.approx(FIXED, rel=1e-3)  # + 1.5 bytes per byte of the training sample
    assert c.build_bytes_per_train_byte == pytest.approx(1.5, rel=1e-3)
    assert "3 dense row(s)" in c.machine
    # rows without dense rows leave the costs as they were
    empty = rows.parent / "none.jsonl"
    empty.write_text(json.dumps({"stage": "datastore", "tokens": 1}) + "\n")
    assert dense_costs_from_rows(empty, base) == base


def test_fit_on_small_rows_predicts_the_large_one(rows):
    c = dense_costs_from_rows(rows, max_tokens=64 * 10**6)  # 1e5 and 1e6 vectors only
    big = _dense_row(10**7)
    p = predict(big["tokens"], factory="IVF32768_HNSW32,PQ32", costs=c, train_size=big["train_points"])
    assert p.train_cpu_core_hours * 3600 == pytest.approx(big["train_cpu_s"], rel=1e-6)
    assert p.add_cpu_core_hours * 3600 == pytest.approx(big["add_cpu_s"], rel=1e-6)
    assert p.build_peak_bytes == pytest.approx(big["build_maxrss"], rel=1e-3)


def test_cli_plan_takes_faiss_rates_from_dense_rows(rows):
    from retromem.cli import main

    ds = {"stage": "datastore", "scale": 1, "tokens": 21_000_000, "text_bytes": 72_000_000, "documents": 130_000,
          "cpu_s": 32.0, "disk_bytes": 200_000_000, "peak_rss_driver": 600 * MiB, "peak_rss_max_child": 400 * MiB,
          "peak_rss_sum": 1300 * MiB}
    with open(rows, "a") as fh:  # the plan needs the rest of the stack's rows too
        fh.write(json.dumps(ds) + "\n")
    r = CliRunner().invoke(main, ["plan", "--tokens", "6.4e8", "--factory", "IVF32768_HNSW32,PQ32", "--json",
                                  "--measure-from", str(rows)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["costs"]["add_vectors_per_s_cpu"] == pytest.approx(ADD_RATE * out["costs"]["cpu_cores"])
    assert out["add_cpu_core_hours"] * 3600 == pytest.approx(10**7 / ADD_RATE, rel=1e-6)


def test_add_cost_grows_with_log_nlist(rows):
    """Measured: 63, 93 and 121 µs per vector at 2,048, 8,192 and 32,768 lists (the HNSW coarse assignment);
    a line in log2(nlist) fitted on the two smaller rows predicts the third."""
    rs = [json.loads(line) for line in rows.read_text().splitlines()]
    for r in rs:
        r["add_cpu_s"] = r["n"] * (63e-6 + 15e-6 * (math.log2(r["nlist"]) - 11))
    rows.write_text("".join(json.dumps(r) + "\n" for r in rs))
    c = dense_costs_from_rows(rows, max_tokens=64 * 10**6)
    assert c.add_cpu_s_per_log2_nlist == pytest.approx(15e-6)
    big = rs[-1]
    p = predict(big["tokens"], factory="IVF32768_HNSW32,PQ32", costs=c, train_size=big["train_points"])
    assert p.add_cpu_core_hours * 3600 == pytest.approx(big["add_cpu_s"], rel=1e-6)
    # where every row has the same per-vector cost there is no nlist term
    assert dense_costs_from_rows(rows.parent / "rows.jsonl", max_tokens=64 * 10**5).add_cpu_s_per_log2_nlist == 0.0

