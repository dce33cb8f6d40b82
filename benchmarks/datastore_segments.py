"""A datastore that grows and forgets (issue 18): what `add` and `delete` cost against a rebuild.

    python benchmarks/datastore_segments.py [--corpora ../shared/corpora] [--work DIR] [--reps 3] [--workers 1]

Splits the shared corpora (python-docs, linux-docs, gcide) into a base (9 of every 10 documents)
and the held-out 10%. Builds the base once; then, ``--reps`` times each, on fresh copies of the
base:

- ``retromem datastore add BASE held-out`` (new segment and version, dedup against the kept filters);
- the control: ``retromem datastore build`` of base + held-out from scratch (what an add replaces);
- ``retromem datastore delete`` of 1,000 documents (random doc ids) from the grown datastore;

and once: ``compact`` after that delete and ``check-takedown`` before and after it. Every command
runs as its own process (process start and tokenizer load included, as a user sees it). Bytes
written: the bytes of the files the command adds to the datastore (for the rebuild, the whole
datastore; intermediates under ``_work/`` are deleted by every command and not counted).
Prints a Markdown table (mean and min..max over the repetitions) and writes JSON next to the work
directory.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CORPORA = ("python-docs.jsonl.gz", "linux-docs.jsonl.gz", "gcide.jsonl.gz")


def tree_bytes(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*")
            if p.is_file() and not p.name.startswith(".")}


def written(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes of files that are new or changed (by size or name) after a command."""
    return sum(size for name, size in after.items() if before.get(name) != size or name == "manifest.json")


def cli(*args: str, workers: int) -> tuple[float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return wall, r.stdout + r.stderr


def split(corpora: Path, work: Path) -> tuple[Path, Path, int, int]:
    base, held = work / "base.jsonl", work / "held.jsonl"
    nb = nh = 0
    if not (base.exists() and held.exists()):
        with open(base, "w") as fb, open(held, "w") as fh:
            for name in CORPORA:
                with gzip.open(corpora / name, "rt", encoding="utf-8") as src:
                    for i, line in enumerate(src):
                        (fh if i % 10 == 9 else fb).write(line)
    nb = sum(1 for _ in open(base))
    nh = sum(1 for _ in open(held))
    return base, held, nb, nh


def stats(xs: list[float]) -> str:
    return f"{np.mean(xs):.2f} ({min(xs):.2f}..{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", type=Path, default=REPO.parent / "shared" / "corpora")
    ap.add_argument("--work", type=Path, default=Path("/tmp/retromem-segments-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--deletes", type=int, default=1000)
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    w = ["--workers", str(args.workers)]
    base_in, held_in, nb, nh = split(args.corpora, work)
    print(f"base {nb:,} documents, held out {nh:,} ({nh / (nb + nh):.1%})", flush=True)

    base = work / "base-ds"
    if not (base / "manifest.json").exists():
        t, _ = cli("build", str(base_in), "--out", str(base), "--overwrite", *w, workers=args.workers)
        print(f"base build {t:.1f}s", flush=True)
    res: dict[str, list[float]] = {k: [] for k in ("add_s", "add_bytes", "rebuild_s", "rebuild_bytes", "delete_s", "delete_bytes")}
    rng = np.random.default_rng(0)
    for rep in range(args.reps):
        grown = work / f"grown-{rep}"
        shutil.rmtree(grown, ignore_errors=True)
        shutil.copytree(base, grown)
        before = tree_bytes(grown)
        t, out = cli("add", str(grown), str(held_in), *w, workers=args.workers)
        res["add_s"].append(t)
        res["add_bytes"].append(written(before, tree_bytes(grown)))
        print(f"rep {rep}: add {t:.1f}s {res['add_bytes'][-1] / 2**20:.1f} MiB  | {out.strip().splitlines()[0]}", flush=True)

        full = work / f"full-{rep}"
        t, _ = cli("build", str(base_in), str(held_in), "--out", str(full), "--overwrite", *w, workers=args.workers)
        res["rebuild_s"].append(t)
        res["rebuild_bytes"].append(sum(tree_bytes(full).values()))
        print(f"rep {rep}: rebuild {t:.1f}s {res['rebuild_bytes'][-1] / 2**20:.1f} MiB", flush=True)
        shutil.rmtree(full)

        from retromem.datastore import Datastore

        n_docs = Datastore.open(grown).num_documents
        ids = work / f"ids-{rep}.txt"
        ids.write_text("\n".join(map(str, sorted(rng.choice(n_docs, args.deletes, replace=False).tolist()))) + "\n")
        before = tree_bytes(grown)
        t, out = cli("delete", str(grown), "--ids-file", str(ids), "--reason", "benchmark", "--who", "bench",
                     workers=args.workers)
        res["delete_s"].append(t)
        res["delete_bytes"].append(written(before, tree_bytes(grown)))
        print(f"rep {rep}: delete {args.deletes} {t:.2f}s {res['delete_bytes'][-1] / 2**10:.1f} KiB", flush=True)

    # once: the takedown proof before and after compaction, on the last grown copy
    grown = work / f"grown-{args.reps - 1}"
    t_check_before, out_before = cli("check-takedown", str(grown), workers=args.workers)
    before = tree_bytes(grown)
    t_compact, out_compact = cli("compact", str(grown), workers=args.workers)
    compact_bytes = written(before, tree_bytes(grown))
    t_check_after, out_after = cli("check-takedown", str(grown), workers=args.workers)
    once = {"check_before_s": t_check_before, "check_before": out_before.strip().splitlines()[-1],
            "compact_s": t_compact, "compact": out_compact.strip().splitlines()[-1], "compact_bytes": compact_bytes,
            "check_after_s": t_check_after, "check_after": out_after.strip().splitlines()[-1]}

    ratio_t = [a / b for a, b in zip(res["add_s"], res["rebuild_s"])]
    ratio_b = [a / b for a, b in zip(res["add_bytes"], res["rebuild_bytes"])]
    mib = lambda xs: [x / 2**20 for x in xs]  # noqa: E731
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs, loaded), "
          f"workers={args.workers}, OMP_NUM_THREADS=1; {time.strftime('%Y-%m-%d')}\n")
    print("| figure | mean (min..max) over %d runs |" % args.reps)
    print("| --- | --- |")
    print(f"| `add` of the held-out 10% ({nh:,} documents): wall s | {stats(res['add_s'])} |")
    print(f"| rebuild of base + held-out from scratch: wall s | {stats(res['rebuild_s'])} |")
    print(f"| add / rebuild time | **{stats(ratio_t)}** |")
    print(f"| `add`: MiB written | {stats(mib(res['add_bytes']))} |")
    print(f"| rebuild: MiB written (the datastore) | {stats(mib(res['rebuild_bytes']))} |")
    print(f"| add / rebuild bytes | **{stats(ratio_b)}** |")
    print(f"| `delete` of {args.deletes:,} documents (tombstone version): wall s | {stats(res['delete_s'])} |")
    print(f"| `delete`: KiB written | {stats([b / 1024 for b in res['delete_bytes']])} |")
    print(f"\nOnce: check-takedown before compaction {t_check_before:.1f}s ({once['check_before']}); compact "
          f"{t_compact:.1f}s, {compact_bytes / 2**20:.1f} MiB written ({once['compact']}); check-takedown after "
          f"{t_check_after:.1f}s ({once['check_after']})")
    (work / "datastore_segments.json").write_text(json.dumps({"runs": res, "once": once, "base_docs": nb, "held_docs": nh}, indent=2))


if __name__ == "__main__":
    main()
