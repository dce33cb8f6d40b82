"""Dense retrieval benchmark: embedding throughput, index build time and peak memory per stage,
and a tuned compressed index against exact flat search in one run (recall@k, QPS, bytes/vector).

    python benchmarks/dense_retrieval.py --docs 200 --out benchmarks/out/dense

Builds a datastore from the first --docs documents of ../shared/corpora/python-docs.jsonl.gz
(SmolLM2 tokenizer, 64-token chunks), embeds it with all-MiniLM-L6-v2, then builds an exact
``Flat`` index and each compressed index given by --factory, each stage a separate process
whose peak RSS (process tree) is sampled. Prints a table and writes results.json and a plot.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


def run_stage(name: str, cmd: list[str]) -> dict:
    """Run ``cmd``; return wall seconds and the peak RSS of its process tree (sampled every 50 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    secs = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"stage {name} failed:\n{out[-3000:]}")
    print(f"  {name:<22} {secs:8.1f} s   peak RSS {peak / 2**20:8.0f} MiB", flush=True)
    return {"stage": name, "seconds": secs, "peak_rss_bytes": peak, "output": out[-2000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=200, help="first N documents of python-docs")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "dense"))
    ap.add_argument("--factory", action="append", default=None, help="compressed factories (default: IVF,SQ8 at two list counts, HNSW32_SQ8, IVF,PQ48)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--target-recall", type=float, default=0.95)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    cli = [py, "-m", "retromem.cli", "-q"]

    src = CORPORA / "python-docs.jsonl.gz"
    sub = out / "python-docs-subset.jsonl"
    if not sub.exists():
        with gzip.open(src, "rt", encoding="utf-8") as fh, open(sub, "w", encoding="utf-8") as w:
            for i, line in enumerate(fh):
                if i >= args.docs:
                    break
                w.write(line)
    stages = []
    print(f"dense retrieval benchmark: first {args.docs} documents of {src.name}")
    stages.append(run_stage("datastore build", cli + ["datastore", "build", str(sub), "--out", str(out / "ds"), "--shard-size", "1MiB"]))
    reused = (out / "emb" / "embeddings.json").exists()
    emb_stage = run_stage("embed (CPU)", cli + ["index", "dense", "embed", str(out / "ds"), "--out", str(out / "emb"), "--batch-size", "64"])
    if reused and (out / "results.json").exists():  # the embeddings of an earlier run: keep its timing
        emb_stage = next(s for s in json.loads((out / "results.json").read_text())["stages"] if s["stage"] == "embed (CPU)")
        print(f"  (embeddings reused from the earlier run: {emb_stage['seconds']:.1f} s, peak {emb_stage['peak_rss_bytes'] / 2**20:.0f} MiB)")
    stages.append(emb_stage)
    emb_meta = json.loads((out / "emb" / "embeddings.json").read_text())
    n = emb_meta["num_vectors"]

    factories = args.factory or ["IVF{nlist},SQ8", "IVF{nlist2},SQ8", "HNSW32_SQ8", "IVF{nlist},PQ48"]
    from retromem.index.factory import _pow2_nlist

    nlist = _pow2_nlist(n)
    results = []
    for f in ["Flat"] + [f.format(nlist=nlist, nlist2=2 * nlist) for f in factories]:
        d = out / ("idx-" + f.replace(",", "_"))
        stages.append(run_stage(f"build {f}", cli + ["index", "dense", "build", str(out / "emb"), "--out", str(d), "--factory", f,
                                                      "--target-recall", str(args.target_recall), "--overwrite"]))
        ev = subprocess.run(cli + ["index", "dense", "eval", str(d), "--queries", str(args.queries), "--json"],
                            capture_output=True, text=True, check=True)
        rep = json.loads(ev.stdout)
        meta = json.loads((d / "index.json").read_text())
        rep["tuning"] = meta.get("tuning")
        rep["build_seconds"] = meta["build"]["seconds"]
        results.append(rep)

    print(f"\n{n:,} chunks, {emb_meta['dim']} dims; embedding {n / emb_stage['seconds']:.1f} chunks/s on CPU "
          f"(whole job including model load)")
    print(f"{'index':<20}{'params':<13}{'R@1':>6}{'R@10':>6}{'R@100':>6}{'QPS':>8}{'exact':>8}{'ratio':>7}"
          f"{'1-QPS':>8}{'exact':>7}{'ratio':>7}{'B/vec':>8}{'vs f32':>7}")
    for r in results:
        p = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        rc = r["recall"]
        print(f"{r['factory']:<20}{p:<13}{rc.get('1', 0):6.3f}{rc.get('10', 0):6.3f}{rc.get('100', 0):6.3f}"
              f"{r['qps']:8.0f}{r['exact_qps']:8.0f}{r['speedup']:6.1f}x{r['single_qps']:8.0f}{r['exact_single_qps']:7.0f}"
              f"{r['single_speedup']:6.1f}x{r['bytes_per_vector']:8.1f}{r['float32_bytes_per_vector'] / r['bytes_per_vector']:6.1f}x")
    (out / "results.json").write_text(json.dumps({"chunks": n, "stages": [{k: v for k, v in s.items() if k != "output"} for s in stages],
                                                  "indexes": results}, indent=2))
    _plot(results, out / "recall_qps.png")
    print(f"\nresults: {out / 'results.json'}  plot: {out / 'recall_qps.png'}")


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        t = r.get("tuning")
        if t and t.get("curve"):
            xs = [c["recall"] for c in t["curve"]]
            ys = [c["qps"] for c in t["curve"]]
            ax.plot(xs, ys, "o-", label=f"{r['factory']} ({t['param']} sweep)")
        else:
            ax.plot([r["recall"].get("10", 0)], [r["qps"]], "s", label=f"{r['factory']}")
    ax.axvline(0.95, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("recall@10 against exact search (own document excluded)")
    ax.set_ylabel("queries/s (batch, 2 cores)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
