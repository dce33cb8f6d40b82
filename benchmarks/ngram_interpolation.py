"""Data for the ∞-gram + LM interpolation benchmark (BENCHMARKS.md, "∞-gram + SmolLM2-135M interpolation").

``split``: every 25th document of python-docs and linux-docs (line ``i % 25 == 7`` of each file) is
held out; the rest, with gcide, is what the datastore is built from. The held-out documents are
then shuffled with a fixed seed and cut into a validation half (where the two interpolation
weights are tuned) and a test half (where they are applied), so the weights never see a test
document::

    python benchmarks/ngram_interpolation.py --corpora ../shared/corpora --out /work/scratch/ngi
    retromem datastore build OUT/train-docs.jsonl.gz ../shared/corpora/gcide.jsonl.gz --out OUT/ds-train
    retromem index ngram build OUT/ds-train --out OUT/ng-train
    retromem index ngram eval-interpolation OUT/ng-train --heldout OUT/test.jsonl --validation OUT/validation.jsonl ...
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpora", default="../shared/corpora")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held, train = [], []
    for name in ("python-docs", "linux-docs"):
        with gzip.open(Path(args.corpora) / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                (held if i % 25 == 7 else train).append(line)
    with gzip.open(out / "train-docs.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(train)
    (out / "heldout.jsonl").write_text("".join(held), encoding="utf-8")
    random.Random(args.seed).shuffle(held)
    half = len(held) // 2
    (out / "validation.jsonl").write_text("".join(held[:half]), encoding="utf-8")
    (out / "test.jsonl").write_text("".join(held[half:]), encoding="utf-8")
    print(json.dumps({"train": len(train), "heldout": len(held), "validation": half, "test": len(held) - half}))


if __name__ == "__main__":
    main()
