"""Benchmark of the infini-gram suffix-array index: build throughput and peak memory, index bytes per
token, and in-process latency (p50/p99) of count, prob, next_token_distribution and infgram_prob over
random n-grams (lengths 1..20) drawn from the corpus plus unseen ones.

References measured in the same run, reported as ratios: the engine called directly (the cost of our
checks and typed results), and a brute-force numpy scan of the token streams for count.

    .venv/bin/python benchmarks/ngram_bench.py DATASTORE --out INDEX_DIR [--queries 1000] [--unseen 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datastore")
    ap.add_argument("--out", required=True, help="index directory (rebuilt)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--unseen", type=int, default=200)
    ap.add_argument("--brute", type=int, default=20, help="queries also timed with a brute-force numpy scan")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-tokens", type=int, default=1_000_000_000, help="tokens per index shard")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()

    import os

    import psutil

    from retromem.datastore import Datastore
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    ds = Datastore.open(args.datastore)
    figures: dict = {"machine": f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, no GPU, "
                                f"{platform.processor() or platform.machine()}"}

    # -- build -------------------------------------------------------------------------
    t0 = time.perf_counter()
    r = build_ngram_index(args.datastore, args.out, NgramBuildConfig(shard_tokens=args.shard_tokens), overwrite=True, progress=False)
    build_s = time.perf_counter() - t0
    m = r.manifest
    tokens = m["counts"]["tokens"]
    files: dict[str, int] = {}  # summed over shards, by file name
    for p in Path(args.out).rglob("*"):
        if p.is_file():
            files[p.name] = files.get(p.name, 0) + p.stat().st_size
    index_bytes = sum(files.values())
    figures["build"] = {
        "documents": m["counts"]["documents"], "tokens": tokens, "shards": m["counts"]["shards"],
        "seconds": round(build_s, 2), "tokens_per_s": round(tokens / build_s), "peak_rss_mib": round(r.peak_rss_bytes / 2**20, 1),
        "index_bytes": index_bytes, "bytes_per_token": round(index_bytes / tokens, 3),
        "by_file_bytes_per_token": {k: round(v / tokens, 3) for k, v in sorted(files.items()) if k != "ngram_index.json"},
        "datastore_token_array_bytes_per_token": round(ds.token_array.nbytes / tokens, 3),
    }
    print(f"build: {tokens:,} tokens, {m['counts']['documents']:,} documents, {build_s:.1f}s "
          f"({tokens / build_s:,.0f} tokens/s), peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB (this process or an indexer child)")
    print(f"index: {index_bytes / 2**20:.1f} MiB = {index_bytes / tokens:.2f} bytes per token "
          f"({', '.join(f'{k} {v / tokens:.2f}' for k, v in sorted(files.items()) if k != 'ngram_index.json')})")

    # -- queries -----------------------------------------------------------------------
    idx = NgramIndex(args.out, ds)
    # every shard's token stream, each document behind its separator: n-grams are drawn from it
    stream = np.concatenate([np.fromfile(Path(args.out) / sh["dir"] / "tokenized.0", dtype="<u2" if m["token_width"] == 2 else "<u4")
                             for sh in m["shards"]])
    sep = np.iinfo(stream.dtype).max
    rng = np.random.default_rng(args.seed)
    seen: list[list[int]] = []
    while len(seen) < args.queries:
        n = int(rng.integers(1, 21))
        s = int(rng.integers(0, len(stream) - n))
        q = stream[s : s + n]
        if (q == sep).any():
            continue
        seen.append(q.astype(int).tolist())
    unseen = [rng.integers(0, idx.vocab_size, size=int(rng.integers(2, 21))).tolist() for _ in range(args.unseen)]
    queries = seen + unseen
    eng = idx.engine
    verbs = {
        "count": (lambda q: idx.count(q), lambda q: eng.count(input_ids=q)),
        "prob": (lambda q: idx.prob(q[:-1], q[-1]), lambda q: eng.prob(prompt_ids=q[:-1], cont_id=q[-1])),
        "next_token_distribution": (lambda q: idx.next_token_distribution(q[:-1]), lambda q: eng.ntd(prompt_ids=q[:-1])),
        "infgram_prob": (lambda q: idx.infgram_prob(q[:-1], q[-1]), lambda q: eng.infgram_prob(prompt_ids=q[:-1], cont_id=q[-1])),
    }
    figures["latency_ms"] = {}
    print(f"\nlatency over {len(seen)} corpus n-grams (lengths 1..20) + {len(unseen)} unseen ones, in-process, token ids in "
          f"(prob/ntd/infgram use the n-gram's last token as the next token and the rest as prompt)")
    print(f"{'verb':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}   engine direct p50 / p99   ours/engine (p50)")
    for name, (ours, direct) in verbs.items():
        # interleave ours and the engine per query so that machine noise hits both alike
        t_ours, t_eng = [], []
        for q in queries:
            t = time.perf_counter_ns(); direct(q); t_eng.append((time.perf_counter_ns() - t) / 1e6)
            t = time.perf_counter_ns(); ours(q); t_ours.append((time.perf_counter_ns() - t) / 1e6)
        f = {"p50": pct(t_ours, 50), "p99": pct(t_ours, 99), "mean": float(np.mean(t_ours)),
             "engine_p50": pct(t_eng, 50), "engine_p99": pct(t_eng, 99)}
        figures["latency_ms"][name] = {k: round(v, 4) for k, v in f.items()}
        print(f"{name:<26}{f['p50']:>9.3f}{f['p99']:>9.3f}{f['mean']:>9.3f}   {f['engine_p50']:>8.3f} / {f['engine_p99']:<8.3f}"
              f"   {f['p50'] / f['engine_p50']:.2f}x")
    # count, seen n-grams only / unseen only
    for label, qs in (("count (corpus n-grams)", seen), ("count (unseen)", unseen)):
        ts = []
        for q in qs:
            t = time.perf_counter_ns(); idx.count(q); ts.append((time.perf_counter_ns() - t) / 1e6)
        figures["latency_ms"][label] = {"p50": round(pct(ts, 50), 4), "p99": round(pct(ts, 99), 4)}
        print(f"{label:<26}{pct(ts, 50):>9.3f}{pct(ts, 99):>9.3f}")

    # brute-force reference for count: one pass over the token stream per query
    t_sa, t_bf = [], []
    for q in seen[: args.brute]:
        t = time.perf_counter_ns(); c = idx.count(q).count; t_sa.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        hits = stream[: len(stream) - len(q) + 1] == q[0]
        for k in range(1, len(q)):
            hits &= stream[k : len(stream) - len(q) + 1 + k] == q[k]
        bf = int(hits.sum())
        t_bf.append(time.perf_counter_ns() - t)
        assert bf == c, (q, bf, c)
    ratio = float(np.median(t_bf) / np.median(t_sa))
    figures["count_vs_brute_force"] = {"queries": len(t_sa), "sa_p50_ms": np.median(t_sa) / 1e6, "brute_p50_ms": np.median(t_bf) / 1e6,
                                       "speedup_p50": round(ratio)}
    print(f"\ncount vs brute-force numpy scan ({len(t_sa)} queries, counts equal): suffix array {np.median(t_sa) / 1e6:.3f} ms, "
          f"scan {np.median(t_bf) / 1e6:.1f} ms p50 -> {ratio:,.0f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
