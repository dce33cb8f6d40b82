"""n-gram counts over gRPC, one per Count call and many per CountBatch call, against the same counts
in process, same n-grams, same run (issue 19). The server runs in this process on loopback.

    .venv/bin/python benchmarks/ngram_batch_rpc.py DATASTORE NGRAM_INDEX [--ngrams 5000] [--batch 256]
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
    ap.add_argument("--ngrams", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    from retromem.datastore import Datastore
    from retromem.index.ngram import NgramIndex
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    idx = NgramIndex(args.ngram_index, Datastore.open(args.datastore))
    dtype = "<u2" if idx.manifest["token_width"] == 2 else "<u4"
    stream = np.fromfile(Path(args.ngram_index) / idx.manifest["shards"][0]["dir"] / "tokenized.0", dtype=dtype)
    rng = np.random.default_rng(0)
    grams: list[list[int]] = []
    while len(grams) < args.ngrams:
        n = int(rng.integers(1, 8))
        s = int(rng.integers(0, len(stream) - n))
        g = stream[s : s + n]
        if not (g == np.iinfo(g.dtype).max).any():
            grams.append(g.astype(int).tolist())
    running = start_server(ServerConfig(datastore=args.datastore, ngram=args.ngram_index, port=0, workers=2))
    try:
        with RetrievalClient(running.target, retries=0) as client:
            [idx.count(g) for g in grams]  # a first pass pages the suffix array in: not timed
            rates = {}
            t = time.perf_counter()
            local = [idx.count(g).count for g in grams]
            rates["in process"] = len(grams) / (time.perf_counter() - t)
            t = time.perf_counter()
            one = [client.count(g).count for g in grams]
            rates["gRPC Count, one per call"] = len(grams) / (time.perf_counter() - t)
            t = time.perf_counter()
            batched = []
            for i in range(0, len(grams), args.batch):
                batched += [c.count for c in client.count_batch(grams[i : i + args.batch])]
            rates[f"gRPC CountBatch, {args.batch} per call"] = len(grams) / (time.perf_counter() - t)
            assert local == one == batched
    finally:
        running.stop(0)
    for name, r in rates.items():
        print(f"{name:34s} {r:10,.0f} n-grams/s  ({r / rates['in process']:.2f}x in process)")


if __name__ == "__main__":
    main()
