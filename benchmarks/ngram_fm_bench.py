"""Benchmark of the FM-index (``--backend compact``: ours; ``fm-index``: the package) over a datastore's normalized text: build time,
peak memory, index size as a share of the corpus bytes, and count latency (p50/p99) over the text of
random token n-grams (lengths 1..20) drawn from the corpus plus unseen strings.

References in the same run, as ratios: the suffix-array index's count of the same token n-grams
(and the check that the FM-index finds at least as many: every token match is a text match), and a
brute-force scan of the text (bytes.count over text.bin) for a few queries.

    .venv/bin/python benchmarks/ngram_fm_bench.py DATASTORE --out FM_DIR --ngram-index SA_DIR [--queries 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datastore")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ngram-index", required=True, help="a suffix-array index of the same datastore")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--unseen", type=int, default=200)
    ap.add_argument("--brute", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="compact", choices=["compact", "fm-index"])
    ap.add_argument("--passes", type=int, default=2, help="passes over the same queries: the first starts cold "
                    "(no block decompressed yet), later ones show a warm server")
    ap.add_argument("--skip-build", action="store_true", help="query the FM-index already at --out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from retromem.datastore import Datastore
    from retromem.index.fm_index import FMIndex, build_fm_index
    from retromem.index.ngram import NgramIndex

    ds = Datastore.open(args.datastore)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    r = build_fm_index(args.datastore, args.out, backend=args.backend, overwrite=not args.skip_build, progress=False)
    build_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = r.manifest
    figures = {"build": {"text_bytes": m["text_bytes"], "index_bytes": m["index_bytes"], "size_ratio": round(m["size_ratio"], 4),
                         "seconds": round(build_s, 2), "mb_per_s": round(m["text_bytes"] / 1e6 / build_s, 2),
                         "peak_rss_mib": round(peak / 2**20, 1), "rss_before_mib": round(rss0 / 1024, 1)}}
    print(f"backend: {args.backend} ({m['library']['package']} {m['library']['version']})")
    print(f"FM-index build: {m['text_bytes'] / 1e6:.1f} MB of text, {build_s:.1f}s ({m['text_bytes'] / 1e6 / build_s:.2f} MB/s), "
          f"peak RSS {peak / 2**20:.0f} MiB")
    print(f"FM-index size: {m['index_bytes'] / 1e6:.1f} MB = {m['size_ratio']:.1%} of the corpus bytes (target: at most 50%)")

    fm = FMIndex(args.out, ds)
    sa = NgramIndex(args.ngram_index, ds)
    tok = ds.tokenizer
    stream = np.fromfile(Path(args.ngram_index) / sa.manifest["shards"][0]["dir"] / "tokenized.0",
                         dtype="<u2" if sa.manifest["token_width"] == 2 else "<u4")
    sep = np.iinfo(stream.dtype).max
    rng = np.random.default_rng(args.seed)
    pairs = []
    while len(pairs) < args.queries:
        n = int(rng.integers(1, 21))
        s = int(rng.integers(0, len(stream) - n))
        q = stream[s : s + n]
        if (q == sep).any():
            continue
        text = tok.decode(q.tolist())
        if "\ufffd" in text or not text:
            continue
        pairs.append((q.astype(int).tolist(), text))
    unseen = ["".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FFF, size=int(rng.integers(2, 10)))) for _ in range(args.unseen)]
    for p in range(args.passes):
        t_fm, t_sa, fewer = [], [], 0
        for ids, text in pairs:  # interleaved so that machine noise hits both alike
            t = time.perf_counter_ns(); c_fm = fm.count(text); t_fm.append((time.perf_counter_ns() - t) / 1e6)
            t = time.perf_counter_ns(); c_sa = sa.count(ids).count; t_sa.append((time.perf_counter_ns() - t) / 1e6)
            fewer += c_fm < c_sa
        figures[f"count_pass{p + 1}_ms"] = {"fm_p50": pct(t_fm, 50), "fm_p99": pct(t_fm, 99), "sa_p50": pct(t_sa, 50),
                                            "sa_p99": pct(t_sa, 99), "fm_over_sa_p50": pct(t_fm, 50) / pct(t_sa, 50)}
        print(f"pass {p + 1} ({'cold' if p == 0 else 'warm'}): FM p50 {pct(t_fm, 50):.3f} ms p99 {pct(t_fm, 99):.3f} ms; "
              f"SA p50 {pct(t_sa, 50):.3f} ms p99 {pct(t_sa, 99):.3f} ms; FM/SA {pct(t_fm, 50) / pct(t_sa, 50):.2f}x at p50")
    t_un = []
    for text in unseen:
        t = time.perf_counter_ns(); fm.count(text); t_un.append((time.perf_counter_ns() - t) / 1e6)
    figures["count_latency_ms"] = {
        "fm_p50": pct(t_fm, 50), "fm_p99": pct(t_fm, 99), "fm_unseen_p50": pct(t_un, 50), "fm_unseen_p99": pct(t_un, 99),
        "sa_p50": pct(t_sa, 50), "sa_p99": pct(t_sa, 99), "fm_over_sa_p50": pct(t_fm, 50) / pct(t_sa, 50),
        "fm_count_below_sa_count": fewer,
    }
    print(f"\ncount latency over {len(pairs)} corpus n-grams (as text for the FM-index, as token ids for the suffix array) "
          f"+ {len(unseen)} unseen strings, in-process")
    print(f"  FM-index       p50 {pct(t_fm, 50):.3f} ms  p99 {pct(t_fm, 99):.3f} ms   (unseen: p50 {pct(t_un, 50):.3f} ms)")
    print(f"  suffix array   p50 {pct(t_sa, 50):.3f} ms  p99 {pct(t_sa, 99):.3f} ms   -> FM/SA {pct(t_fm, 50) / pct(t_sa, 50):.2f}x at p50")
    print(f"  FM count < suffix-array count on {fewer} of {len(pairs)} queries (must be 0)")

    t_find = []
    for _, text in pairs[:200]:
        t = time.perf_counter_ns(); f = fm.find(text, limit=10); fm.contexts(f.hits, len(text), 100)
        t_find.append((time.perf_counter_ns() - t) / 1e6)
    figures["find10_with_context_ms"] = {"p50": pct(t_find, 50), "p99": pct(t_find, 99)}
    print(f"  find (first 10 hits, each mapped to its chunk, with 100 characters of context) over {len(t_find)} queries: "
          f"p50 {pct(t_find, 50):.2f} ms  p99 {pct(t_find, 99):.2f} ms")
    raw = Path(ds.path / "arrays" / "text.bin").read_bytes()
    t_bf, t_fm2 = [], []
    for _, text in pairs[: args.brute]:
        b = text.encode()
        t = time.perf_counter_ns(); c = fm.count(text); t_fm2.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns(); cb = raw.count(b); t_bf.append(time.perf_counter_ns() - t)
        assert cb <= c  # bytes.count does not count overlapping matches
    figures["count_vs_scan"] = {"scan_p50_ms": np.median(t_bf) / 1e6, "fm_p50_ms": np.median(t_fm2) / 1e6,
                                "speedup": float(np.median(t_bf) / np.median(t_fm2))}
    print(f"  bytes.count scan of text.bin p50 {np.median(t_bf) / 1e6:.1f} ms -> FM-index {np.median(t_bf) / np.median(t_fm2):,.0f}x faster")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
