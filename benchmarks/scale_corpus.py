"""Make N distinct copies of the shared corpora (python-docs + linux-docs + gcide) for the scale curve
of issue 19: copy 0 is the corpora as they are, copy k > 0 has the words of every line shuffled with
seed k, so the exact and near (MinHash) dedup of `retromem datastore build` keeps every copy while the
vocabulary, line lengths and token count stay those of real text.

Each copy is one plain JSONL file ``copy-NNN.jsonl`` (plain: the fastest input the readers take), ids
``<original id>#<k>``. Copies already written are skipped, so 1x, 4x, 16x and 50x share their first files.

    python benchmarks/scale_corpus.py --copies 50 --out /work/scratch/h19billion/corpus --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

CORPORA = ("python-docs.jsonl.gz", "linux-docs.jsonl.gz", "gcide.jsonl.gz")


def _shuffle_lines(text: str, rng: random.Random) -> str:
    out = []
    for line in text.split("\n"):
        words = line.split()
        if len(words) > 1:
            rng.shuffle(words)
        out.append(" ".join(words))
    return "\n".join(out)


def write_copy(src: str, out: str, k: int) -> tuple[int, int, float]:
    """copy-k.jsonl under ``out`` (atomically); returns (documents, bytes, seconds)."""
    path = Path(out) / f"copy-{k:03d}.jsonl"
    if path.exists():
        return 0, path.stat().st_size, 0.0
    t0 = time.perf_counter()
    rng = random.Random(k)
    tmp = path.with_suffix(".tmp")
    docs = 0
    with open(tmp, "w", encoding="utf-8") as fo:
        for name in CORPORA:
            with gzip.open(Path(src) / name, "rt", encoding="utf-8") as fi:
                for line in fi:
                    rec = json.loads(line)
                    text = rec["text"] if k == 0 else _shuffle_lines(rec["text"], rng)
                    fo.write(json.dumps({"id": f"{rec['id']}#{k}", "text": text}, ensure_ascii=False) + "\n")
                    docs += 1
    os.replace(tmp, path)
    return docs, path.stat().st_size, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "corpora"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--copies", type=int, default=50)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    ks = list(range(a.first, a.copies))
    with ProcessPoolExecutor(max(1, a.workers)) as pool:
        for k, (docs, size, s) in zip(ks, pool.map(write_copy, [a.src] * len(ks), [a.out] * len(ks), ks)):
            print(f"copy {k:3d}: {docs:,} documents, {size / 1e6:,.1f} MB, {s:.1f} s", flush=True)


if __name__ == "__main__":
    main()
