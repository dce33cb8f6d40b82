"""Random chunk + continuation fetch (``Datastore.neighbour_tokens``, RETRO's retrieved unit) against a
bare numpy gather of the same rows (``token_array[ids]`` and ``token_array[ids + 1]``), same ids,
same run, repeated (issue 19).

    .venv/bin/python benchmarks/datastore_fetch.py DATASTORE [--ids 200000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datastore")
    ap.add_argument("--ids", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from retromem.datastore import Datastore

    ds = Datastore.open(args.datastore)
    ids = np.random.default_rng(0).integers(0, ds.num_chunks, size=args.ids)
    ds.neighbour_tokens(ids[:10])  # first reads verify the shards' checksums: not timed
    arr = ds.token_array
    last = ds.num_chunks - 1
    for rep in range(args.repeats):
        rates = {}
        for batch in (64, 1024):
            t = time.perf_counter()
            for s in range(0, len(ids), batch):
                ds.neighbour_tokens(ids[s : s + batch])
            rates[f"neighbour_tokens b{batch}"] = len(ids) / (time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, len(ids), 1024):
            b = ids[s : s + 1024]
            arr[b], arr[np.minimum(b + 1, last)]
        rates["numpy gather b1024"] = len(ids) / (time.perf_counter() - t)
        print(f"run {rep + 1}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in rates.items())
              + f"; ratio at b1024 {rates['neighbour_tokens b1024'] / rates['numpy gather b1024']:.2f}")


if __name__ == "__main__":
    main()
