"""Corruption of every artifact file type, and the cost of checking (issue 15).

Part 1 builds small real artifacts (datastore, embeddings, dense, n-gram and FM indexes, neighbour
table; :mod:`tests.trust.harness`), damages every file three ways (flip 64 bytes, truncate to half,
extend by 64 bytes), probes each damaged copy in a worker process and runs verify on it; it prints
the count table (clear error / verified-correct / crash / silent wrong / other) per file type.

It then feeds the n-gram engine shards with 64 bytes flipped at random places, opened without the
checksum check, to count what that check prevents (crashes, wrong answers).

Part 2 measures on a real datastore (built here from the shared corpora, python-docs, linux-docs
and gcide by default, with its n-gram index) what the checks cost: opening (sizes, headers, offsets), the first read of every
shard (each shard's checksums), a full ``verify``, and opening the n-gram index with and without
its checksum check.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/trust_corruption.py --out /work/scratch/trustA/bench
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def file_type(kind: str, rel: str) -> str:
    return f"{kind}: " + re.sub(r"\d{5}", "N", rel)


def corruption_table(out: Path) -> dict:
    from tests.trust import harness as h

    t0 = time.perf_counter()
    arts = h.build_artifacts(out / "small")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcomes = h.run_cases(arts, out / "cases")
    t_cases = time.perf_counter() - t0
    rows: dict[str, dict[str, int]] = {}
    for o in outcomes:
        r = rows.setdefault(file_type(o.kind, o.file), {})
        r[o.result] = r.get(o.result, 0) + 1
        r["verify " + o.verify] = r.get("verify " + o.verify, 0) + 1
    cols = ["error", "correct", "crash", "wrong", "vague", "traceback", "verify named"]
    print(f"\n{len(outcomes)} cases over {len(rows)} file types (build {t_build:.0f}s, cases {t_cases:.0f}s)")
    print("| file type | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in sorted(rows):
        print(f"| {name} | " + " | ".join(str(rows[name].get(c, 0)) for c in cols) + " |")
    totals = {c: sum(r.get(c, 0) for r in rows.values()) for c in cols}
    print("| **all** | " + " | ".join(f"**{totals[c]}**" for c in cols) + " |")
    return {"cases": len(outcomes), "file_types": len(rows), "totals": totals, "rows": rows,
            "outcomes": h.as_dicts(outcomes)}


def unchecked_engine(out: Path, trials: int) -> dict:
    """What the n-gram open's checksum check prevents: 64 flipped bytes at random places of
    ``table.0`` / ``tokenized.0``, queried with ``verify=False`` (the engine sees the damage)."""
    import numpy as np

    from tests.trust import harness as h

    arts = {k: out / "small" / h.DIRS[k] for k in ("datastore", "ngram-index")}
    rng = np.random.default_rng(0)
    worker = h.Worker()
    counts: dict[str, dict[str, int]] = {}
    examples: dict[str, str] = {}
    try:
        ref = worker.ask({"kind": "ngram-index", "path": str(arts["ngram-index"]), "datastore": str(arts["datastore"])})["answer"]
        for name in ("table.0", "tokenized.0"):
            for t in range(trials):
                copy = out / "unchecked" / f"{name}-{t}"
                if copy.exists():
                    shutil.rmtree(copy)
                shutil.copytree(arts["ngram-index"], copy)
                f = copy / "shard-00001" / name
                data = bytearray(f.read_bytes())
                at = int(rng.integers(0, len(data) - 64))
                for i in range(at, at + 64):
                    data[i] ^= 0xFF
                f.write_bytes(bytes(data))
                for verify in (False, True):
                    r = worker.ask({"kind": "ngram-index", "path": str(copy), "datastore": str(arts["datastore"]), "verify": verify})
                    what = ("crash" if "crash" in r else "traceback" if "traceback" in r else "error" if "error" in r
                            else "correct" if r["answer"] == ref else "wrong")
                    key = f"{name} verify={verify}"
                    counts.setdefault(key, {})[what] = counts.setdefault(key, {}).get(what, 0) + 1
                    if what == "traceback":
                        examples.setdefault(key, f"{r['traceback']}: {r['message'][:200]}")
                shutil.rmtree(copy)
    finally:
        worker.close()
    print("\nn-gram engine fed damaged shards (64 flipped bytes at a random place, shard-00001):")
    for key, c in counts.items():
        print(f"  {key}: {c}" + (f"  (traceback: {examples[key]})" if key in examples else ""))
    return {"counts": counts, "traceback_examples": examples}


def cost(out: Path, corpora: list[Path]) -> dict:
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.datastore.integrity import verify_artifact
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    ds_dir, ng_dir = out / "real-ds", out / "real-ngram"
    t0 = time.perf_counter()
    build(BuildConfig(inputs=tuple(str(c) for c in corpora), out=str(ds_dir), workers=1))
    build_ngram_index(ds_dir, ng_dir, NgramBuildConfig(cpus=1), progress=False)
    res = {"build_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    ds = Datastore.open(ds_dir)
    res["open_s"] = time.perf_counter() - t0
    m = ds.manifest
    res["tokens"], res["chunks"], res["shards"] = m["counts"]["tokens"], m["counts"]["chunks"], len(m["shards"])
    res["datastore_bytes"] = sum(int(r["bytes"]) for r in m["integrity"]["files"].values())
    t0 = time.perf_counter()
    for s in m["shards"]:  # the first read of each shard verifies it
        ds.chunk_texts([s["first_chunk_id"]])
    res["first_reads_all_shards_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    problems = Datastore.open(ds_dir).verify()
    res["verify_s"] = time.perf_counter() - t0
    res["verify_problems"] = len(problems)
    rep = verify_artifact(ng_dir)
    res["ngram_bytes"], res["ngram_verify_s"] = rep.bytes, rep.seconds
    for verify in (False, True, False, True):
        t0 = time.perf_counter()
        NgramIndex(ng_dir, ds, verify=verify)
        res[f"ngram_open_verify_{verify}_s"] = time.perf_counter() - t0  # the second of each pair, warm cache
    print("\n" + json.dumps(res, indent=1))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, action="append",
                    help="Corpus of the real datastore (repeat; default: the three shared corpora).")
    ap.add_argument("--skip-table", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--unchecked-trials", type=int, default=20, help="Random flips per n-gram file fed to the unchecked engine.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if not args.skip_table:
        results["table"] = corruption_table(args.out)
    if args.unchecked_trials:
        if not (args.out / "small" / "ngram").is_dir():
            from tests.trust import harness as h

            h.build_artifacts(args.out / "small", ("datastore", "ngram-index"))
        results["unchecked_engine"] = unchecked_engine(args.out, args.unchecked_trials)
    if not args.skip_cost:
        shared = REPO.parent / "shared" / "corpora"
        corpora = args.corpus or [shared / f"{n}.jsonl.gz" for n in ("python-docs", "linux-docs", "gcide")]
        results["cost"] = cost(args.out, corpora)
    name = "trust_corruption" + "".join(f"-{k}" for k in results) + ".json"
    (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
