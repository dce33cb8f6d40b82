"""MinHash LSH band keys (the near-dedup signature) per CPU-second, this code against another version
of datastore/dedup.py (e.g. the one before issue 19's change: ``git show 6b19119:datastore/dedup.py``),
on the same batches of real documents, with the keys checked equal.

    git show 6b19119:datastore/dedup.py > /tmp/dedup_old.py
    .venv/bin/python benchmarks/dedup_minhash.py /tmp/dedup_old.py [--corpus ../shared/corpora/python-docs.jsonl.gz]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", help="another dedup.py to compare with")
    ap.add_argument("--corpus", default="../shared/corpora/python-docs.jsonl.gz")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()

    from retromem.datastore.dedup import DedupConfig, MinHasher

    spec = importlib.util.spec_from_file_location("dedup_reference", args.reference)
    ref = importlib.util.module_from_spec(spec)
    sys.modules["dedup_reference"] = ref  # dataclasses look their module up while it loads
    spec.loader.exec_module(ref)
    with gzip.open(args.corpus, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    batches = [texts[i : i + args.batch] for i in range(0, len(texts), args.batch)]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    hashers = {"reference": ref.MinHasher(ref.DedupConfig()), "this": MinHasher(DedupConfig())}
    for rep in range(2):
        for name, m in hashers.items():
            t0 = os.times()
            for b in batches:
                m.band_keys(b)
            t1 = os.times()
            cpu = (t1.user - t0.user) + (t1.system - t0.system)
            print(f"run {rep + 1} {name:9s}: {mb / cpu:6.2f} MB/CPU-s, system time {(t1.system - t0.system) / cpu:.0%}")
    for b in batches[:5]:
        assert (hashers["reference"].band_keys(b) == hashers["this"].band_keys(b)).all()
    print("band keys equal")


if __name__ == "__main__":
    main()
