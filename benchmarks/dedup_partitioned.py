"""Dedup stage: the sequential Bloom-filter pass on the driver against the partitioned dedup (issue 19).

Ingests the inputs once (the build's own ingest step: normalize, content hash, MinHash band
keys, staged parts under ``--work``), then runs the dedup stage on those staged parts:

* ``sequential``: the pass the build ran before issue 19 (every part's keys through one
  Deduplicator in corpus order on the driver, a reasons file per part, the filters saved);
* ``partitioned P``: :func:`retromem.datastore.pipeline.run_dedup` with P partitions on the local
  executor (``--workers`` processes; 1 runs the tasks in the driver's process) and, with
  ``--ray``, on a local Ray.

For each it prints wall seconds, the driver's CPU seconds (user + system of this process), the
workers' CPU seconds (reaped child processes; Ray workers are not children and are not counted),
the largest partition's key bytes, and the keep / exact / near counts; then how many documents
the two rules decide differently (the sequential pass's Bloom false positives).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/dedup_partitioned.py \\
        ../shared/corpora/python-docs.jsonl.gz ../shared/corpora/linux-docs.jsonl.gz \\
        ../shared/corpora/gcide.jsonl.gz --work /work/scratch/h19dedup/work --partitions 1 2 4
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from retromem.datastore.dedup import Deduplicator
from retromem.datastore.executors import LocalExecutor, RayExecutor
from retromem.datastore.job import open_job
from retromem.datastore.pipeline import (REASONS, BuildConfig, BuildContext, Layout, _plan_units, _read_hashes,
                                         _run_step, _ingest_marker, ingest_unit, run_dedup)
from retromem.datastore.readers import expand_inputs


def cpu() -> tuple[float, float, int]:
    """(driver CPU s, reaped children's CPU s, children's peak RSS KiB)."""
    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime, ch.ru_maxrss


def ingest(cfg: BuildConfig, workers: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The build's ingest step into cfg.out/_work (done-markers make a re-run free): (parts, docs per part)."""
    files = expand_inputs(list(cfg.inputs), cfg.format)
    units = tuple(tuple(u) for u in _plan_units(files, cfg.shard_bytes))
    ctx = BuildContext(config=cfg, files=tuple(files), units=units, token_dtype="uint16", pad_token_id=0)
    with open_job(cfg.out, "datastore") as job:
        ing = _run_step(job, LocalExecutor(workers), "ingest", ingest_unit, ctx, list(range(len(units))), _ingest_marker, "unit")
    parts = [(u, k) for u in range(len(units)) for k in range(len(ing[u]["parts"]))]
    return parts, [ing[u]["parts"][k]["docs"] for u, k in parts]


def sequential(cfg: BuildConfig, parts: list[tuple[int, int]], total: int) -> np.ndarray:
    """The pre-issue-19 dedup stage: one Deduplicator over the parts in order, reasons and filters written."""
    lay = Layout(cfg.out)
    out = lay.work / "dedup-sequential"
    out.mkdir(parents=True, exist_ok=True)
    dd = Deduplicator(cfg.dedup, total)
    reasons = []
    for p, part in enumerate(parts):
        content, keys = _read_hashes(lay.staged(*part), cfg.dedup.bands)
        r = dd.process(content, keys)
        np.save(out / f"reasons-{p:05d}.npy", r)
        reasons.append(r)
    with open(out / "checkpoint.npz", "wb") as fh:
        np.savez(fh, parts_done=np.int64(len(parts)), **dd.state())
    return np.concatenate(reasons)


def counts(r: np.ndarray) -> dict[str, int]:
    return {name: int((r == code).sum()) for code, name in REASONS.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--work", required=True, help="Scratch directory (staged parts are kept there between runs).")
    ap.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-bytes", type=int, default=16 << 20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ray", action="store_true", help="Also run the partitioned dedup on a local Ray.")
    ap.add_argument("--json", help="Write the rows here too.")
    args = ap.parse_args()

    cfg = BuildConfig(inputs=tuple(args.inputs), out=str(Path(args.work) / "ds"), tokenizer="gpt2",
                      shard_bytes=args.shard_bytes, workers=args.workers)
    t = time.perf_counter()
    parts, part_docs = ingest(cfg, args.workers)
    total = sum(part_docs)
    print(f"ingest (or reuse): {time.perf_counter() - t:.1f} s, {len(parts)} parts, {total:,} documents")
    lay = Layout(cfg.out)
    rows = []

    for rep in range(args.repeats):
        c0, t0 = cpu(), time.perf_counter()
        seq = sequential(cfg, parts, total)
        c1, wall = cpu(), time.perf_counter() - t0
        rows.append({"method": "sequential", "partitions": None, "workers": 0, "repeat": rep, "wall_s": wall,
                     "driver_cpu_s": c1[0] - c0[0], "worker_cpu_s": 0.0, **counts(seq)})
        print(rows[-1], flush=True)

        runs = [("local", p, args.workers) for p in args.partitions] + [("local", args.partitions[-1], 1)]
        if args.ray:
            runs.append(("ray", args.partitions[-1], args.workers))
        for kind, P, workers in runs:
            shutil.rmtree(lay.work / "dedup", ignore_errors=True)  # outputs and done-markers of the last run
            executor = LocalExecutor(workers) if kind == "local" else RayExecutor(None, workers)
            c0, t0 = cpu(), time.perf_counter()
            with open_job(cfg.out, "datastore") as job:
                from dataclasses import replace

                stats = run_dedup(job, executor, replace(cfg, dedup_partitions=P), parts, part_docs)
                part_keys = [job.done(f"dedup/partition-{q:05d}")["keys"] for q in range(P)]
            c1, wall = cpu(), time.perf_counter() - t0
            got = np.concatenate([np.load(lay.reasons(p)) for p in range(len(parts))])
            diff = np.flatnonzero(got != seq)
            rows.append({"method": f"partitioned ({kind})", "partitions": P, "workers": workers, "repeat": rep,
                         "wall_s": wall, "driver_cpu_s": c1[0] - c0[0], "worker_cpu_s": c1[1] - c0[1],
                         "max_partition_key_bytes": max(part_keys) * 17, "bloom_bytes": stats["bloom_bytes"],
                         **counts(got), "differs_from_sequential": len(diff),
                         "differing": [[int(d), int(seq[d]), int(got[d])] for d in diff[:20]]})
            print(rows[-1], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
