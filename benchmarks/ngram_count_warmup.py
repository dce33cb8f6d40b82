"""Page faults and CPU time of suffix-array count over every shard, round after round of 1,000 random
n-grams (issue 19): the first touches of a memory-mapped index's pages are faults, which is why
``benchmarks/scale_curve.py`` times count after an untimed round.

    python benchmarks/ngram_count_warmup.py /work/scratch/h19billion/runs/x50 4   # a scale_curve work dir, rounds
"""

import sys, time, resource, numpy as np
sys.path.insert(0, "benchmarks")
from pathlib import Path
from retromem.datastore import Datastore
from retromem.index.ngram import NgramIndex
d = Path(sys.argv[1]); rounds = int(sys.argv[2])
ds = Datastore.open(d / "ds"); idx = NgramIndex(d / "ngram", ds, verify=False)
dt = np.dtype("<u2") if idx.manifest["token_width"] == 2 else np.dtype("<u4")
streams = [np.memmap(d / "ngram" / s["dir"] / "tokenized.0", dtype=dt, mode="r") for s in idx.manifest["shards"]]
sep = np.iinfo(dt).max; rng = np.random.default_rng(1)
def draw(n):
    qs = []
    while len(qs) < n:
        st = streams[int(rng.integers(len(streams)))]; k = int(rng.integers(1, 9)); i = int(rng.integers(0, len(st) - k))
        g = np.asarray(st[i:i+k])
        if not (g == sep).any(): qs.append(g.astype(int).tolist())
    return qs
for r in range(rounds):
    qs = draw(1000); cpu = []; f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; m0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for q in qs:
        c = time.thread_time_ns(); idx.count(q); cpu.append(time.thread_time_ns() - c)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{d.name} round {r}: {len(streams)} shards, CPU p50 {np.percentile(cpu,50)/1e6:.3f} ms ({np.percentile(cpu,50)/1e6/len(streams):.4f}/shard), minor faults/query {(ru.ru_minflt-f0)/1000:.1f}, major {(ru.ru_majflt-m0)/1000:.2f}", flush=True)
