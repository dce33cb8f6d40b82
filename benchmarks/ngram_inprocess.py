"""n-gram `prob`, infini-gram probability and document search (CNF) answered by this process's own
suffix-array search against the infini-gram engine called directly, on the same queries, interleaved
(issue 19).

    .venv/bin/python benchmarks/ngram_inprocess.py DATASTORE NGRAM_INDEX [--queries 1000]

Queries: random (prompt of 1-11 tokens, next token) drawn from the index's first shard's token stream;
document search: two clauses, the query's first two tokens and its last two, within 100 tokens.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datastore")
    ap.add_argument("ngram_index")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from retromem.datastore import Datastore
    from retromem.index.ngram import NgramIndex

    idx = NgramIndex(args.ngram_index, Datastore.open(args.datastore))
    dtype = "<u2" if idx.manifest["token_width"] == 2 else "<u4"
    stream = np.fromfile(Path(args.ngram_index) / idx.manifest["shards"][0]["dir"] / "tokenized.0", dtype=dtype)
    sep = np.iinfo(stream.dtype).max
    rng = np.random.default_rng(args.seed)
    qs: list[tuple[list[int], int]] = []
    while len(qs) < args.queries:
        n = int(rng.integers(1, 12))
        s = int(rng.integers(0, len(stream) - n - 1))
        g = stream[s : s + n + 1]
        if not (g == sep).any():
            qs.append((g[:-1].astype(int).tolist(), int(g[-1])))
    def cnf(p: list[int], t: int) -> list[list[list[int]]]:
        g = p + [t]
        return [[g[:2]], [g[-2:]]] if len(g) >= 4 else [[g]]

    calls = {
        "prob, in process": lambda p, t: idx.prob(p, t),
        "prob, engine": lambda p, t: idx.engine.prob(prompt_ids=p, cont_id=t),
        "infgram_prob, in process": lambda p, t: idx.infgram_prob(p, t),
        "infgram_prob, engine": lambda p, t: idx.engine.infgram_prob(prompt_ids=p, cont_id=t),
        "find_cnf, in process": lambda p, t: idx._find_cnf(cnf(p, t), 100),
        "find_cnf, engine": lambda p, t: idx.engine.find_cnf(cnf=cnf(p, t), max_clause_freq=idx.limits.max_clause_freq,
                                                             max_diff_tokens=100),
    }
    sampled = [q for q in qs if idx._find_cnf(cnf(*q), 100) is None]  # left to the engine's sampling: not compared
    qs = [q for q in qs if q not in sampled]
    print(f"{len(qs)} queries ({len(sampled)} whose document search samples a clause left out)")
    for f in calls.values():
        f(*qs[0])
    times: dict[str, list[int]] = {k: [] for k in calls}
    for p, t in qs:  # interleaved, so that machine noise hits every column alike
        for name, f in calls.items():
            a = time.perf_counter_ns()
            f(p, t)
            times[name].append(time.perf_counter_ns() - a)
    for name, v in times.items():
        ms = np.asarray(v) / 1e6
        print(f"{name:26s} p50 {np.percentile(ms, 50):.3f} ms  p99 {np.percentile(ms, 99):.3f} ms")


if __name__ == "__main__":
    main()
