"""The scale curve of issue 19: `retromem datastore build` (with dedup), `retromem index build-ngram`
(sharded, one task per shard) and `retromem index build-fm` (sharded) at 1x, 4x, 16x and 50x the shared
corpora (copies made distinct by ``benchmarks/scale_corpus.py``), then query latency over every shard.

Every build runs as a child process (at ``nice``) watched by a sampler thread: wall time, CPU time of the
whole process tree (``RUSAGE_CHILDREN``: the command and every worker or indexer it waited for), peak RSS
of every process in the tree (the driver, and the largest child), the peak of their sum, the machine's
load, and the disk bytes of the output. Resumable: a (scale, stage) that already has a row in ``--rows``
is skipped, and the builds themselves resume. Query rows: n-gram ``count`` p50/p99 over all shards of
the suffix array and of the FM-index, in this process, random n-grams / substrings of the corpus.

    nice -n 10 .venv/bin/python benchmarks/scale_curve.py --corpus /work/scratch/h19billion/corpus \\
        --work /work/scratch/h19billion/runs --rows /work/scratch/h19billion/rows.jsonl --scales 1,4,16

``--plot-only`` redraws ``benchmarks/scale_curve.png`` from the rows (dense rows from
``benchmarks/dense_scale.py`` in the same file are drawn too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

STAGES = ("datastore", "ngram", "fm", "query")
REPO = Path(__file__).resolve().parents[1]
RETROMEM = str(Path(sys.executable).parent / "retromem")


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class Watch:
    """Samples the RSS of a process and all its descendants every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 0.2) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS)
        self.peak_sum = 0
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        import psutil

        n = 0
        while not self._stop.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = self.peak.get(p.pid, (None, 0))[0] or " ".join(p.cmdline()[:3])[-80:]
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peak.get(p.pid, ("", 0))[1]:
                    self.peak[p.pid] = (name, rss)
            self.peak_sum = max(self.peak_sum, total)
            if n % 25 == 0:
                self.loads.append(os.getloadavg()[0])
            n += 1
            self._stop.wait(self.period)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        root = self.root.pid
        kids = sorted(((v[1], v[0]) for k, v in self.peak.items() if k != root), reverse=True)
        return {
            "peak_rss_driver": self.peak.get(root, ("", 0))[1],
            "peak_rss_max_child": kids[0][0] if kids else 0,
            "peak_rss_max_child_cmd": kids[0][1] if kids else "",
            "peak_rss_sum": self.peak_sum,
            "processes": len(self.peak),
            "load_mean": float(np.mean(self.loads)) if self.loads else None,
        }


def run_measured(cmd: list[str], log: Path, nice: int) -> dict:
    """Run ``cmd`` at ``nice``, return wall, CPU (the whole tree) and memory figures; raise if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(["nice", "-n", str(nice), *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        w = Watch(p.pid)
        rc = p.wait()
    wall = time.perf_counter() - t0
    mem = w.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall_s": wall, "cpu_s": user + sys_, "user_s": user, "sys_s": sys_,
            "ru_maxrss_children": after.ru_maxrss * 1024, **mem}


def corpus_files(corpus: Path, scale: int) -> list[str]:
    files = [corpus / f"copy-{k:03d}.jsonl" for k in range(scale)]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise SystemExit(f"missing corpus copies (run benchmarks/scale_corpus.py --copies {scale}): {missing[:3]}")
    return [str(f) for f in files]


def stage_cmd(stage: str, scale: int, d: Path, a: argparse.Namespace) -> tuple[list[str], Path]:
    if stage == "datastore":
        return [RETROMEM, "datastore", "build", *corpus_files(Path(a.corpus), scale), "-o", str(d / "ds"),
                "--workers", str(a.workers)], d / "ds"
    if stage == "ngram":
        return [RETROMEM, "index", "build-ngram", str(d / "ds"), "-o", str(d / "ngram"), "--shard-tokens",
                a.ngram_shard_tokens, "--workers", str(a.workers), "--cpus", str(a.workers)], d / "ngram"
    if stage == "fm":
        return [RETROMEM, "index", "build-fm", str(d / "ds"), "-o", str(d / "fm"), "--shard-size", a.fm_shard_size,
                "--workers", str(a.workers)], d / "fm"
    raise ValueError(stage)


def percentiles(ns: list[int]) -> dict:
    ms = np.asarray(ns) / 1e6
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def query_latency(d: Path, n: int, seed: int = 0) -> dict:
    """count p50/p99 over every shard: n-grams of 1-8 tokens from the token streams (suffix array),
    substrings of 4-32 bytes of the text (FM-index), each drawn at a random place in a random shard."""
    from retromem.datastore import Datastore
    from retromem.index.fm_index import FMIndex
    from retromem.index.ngram import NgramIndex

    rng = np.random.default_rng(seed)
    ds = Datastore.open(d / "ds")
    out: dict = {}
    t0 = time.perf_counter()
    idx = NgramIndex(d / "ngram", ds, verify=False)
    out["ngram_open_s"] = time.perf_counter() - t0
    dt = np.dtype("<u2") if idx.manifest["token_width"] == 2 else np.dtype("<u4")
    streams = [np.memmap(d / "ngram" / s["dir"] / "tokenized.0", dtype=dt, mode="r") for s in idx.manifest["shards"]]
    sep = np.iinfo(dt).max
    qs: list[list[int]] = []
    while len(qs) < n:
        st = streams[int(rng.integers(len(streams)))]
        k = int(rng.integers(1, 9))
        i = int(rng.integers(0, len(st) - k))
        g = np.asarray(st[i : i + k])
        if not (g == sep).any():
            qs.append(g.astype(int).tolist())
    idx.count(qs[0])
    ns = []
    for q in qs:
        a = time.perf_counter_ns()
        idx.count(q)
        ns.append(time.perf_counter_ns() - a)
    out["ngram_shards"] = len(streams)
    out["ngram_count"] = percentiles(ns)
    if (d / "fm").exists():
        t0 = time.perf_counter()
        fm = FMIndex(d / "fm", ds, verify=False)
        out["fm_open_s"] = time.perf_counter() - t0
        text = ds.text_bytes
        pats: list[str] = []
        while len(pats) < n:
            k = int(rng.integers(4, 33))
            i = int(rng.integers(0, len(text) - k))
            p = bytes(text[i : i + k]).decode("utf-8", errors="ignore")
            if p.strip() and "\x00" not in p:
                pats.append(p)
        fm.count(pats[0])
        ns = []
        for p in pats:
            a = time.perf_counter_ns()
            fm.count(p)
            ns.append(time.perf_counter_ns() - a)
        out["fm_shards"] = len(fm.manifest.get("shards", [])) or 1
        out["fm_count"] = percentiles(ns)
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for stage, colour in (("datastore", "C0"), ("ngram", "C1"), ("fm", "C2")):
        rs = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["tokens"])
        if not rs:
            continue
        t = [r["tokens"] for r in rs]
        a.loglog(t, [r["cpu_s"] for r in rs], "o-", color=colour, label=f"{stage} CPU-s")
        a.loglog(t, [r["wall_s"] for r in rs], "o--", color=colour, alpha=0.6, label=f"{stage} wall s")
        b.semilogx(t, [r["peak_rss_max_child"] / 2**20 for r in rs], "o-", color=colour, label=f"{stage} largest process")
        b.semilogx(t, [r["peak_rss_sum"] / 2**20 for r in rs], "o:", color=colour, alpha=0.6, label=f"{stage} all processes")
        b.semilogx(t, [r["peak_rss_driver"] / 2**20 for r in rs], "x--", color=colour, alpha=0.6, label=f"{stage} driver")
    rs = [r for r in rows if r["stage"] == "datastore"]
    if rs:
        t = np.array(sorted(r["tokens"] for r in rs), dtype=float)
        base = min(rs, key=lambda r: r["tokens"])
        a.loglog(t, base["cpu_s"] * t / base["tokens"], "k:", lw=0.8, label="linear (from 1x datastore)")
    a.set_xlabel("tokens")
    a.set_ylabel("seconds")
    a.set_title("time")
    a.grid(True, which="both", alpha=0.3)
    a.legend(fontsize=7)
    b.set_xlabel("tokens")
    b.set_ylabel("peak RSS, MiB")
    b.set_title("peak memory")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=7)
    fig.suptitle("retromem scale curve (issue 19): shared corpora x1..x50, 2-core VM shared with other jobs", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="/work/scratch/h19billion/corpus")
    ap.add_argument("--work", default="/work/scratch/h19billion/runs")
    ap.add_argument("--rows", default="/work/scratch/h19billion/rows.jsonl")
    ap.add_argument("--scales", default="1,4,16,50")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ngram-shard-tokens", default="64M")
    ap.add_argument("--fm-shard-size", default="128MiB")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--nice", type=int, default=10)
    ap.add_argument("--plot", default=str(REPO / "benchmarks" / "scale_curve.png"))
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    rows_path = Path(a.rows)
    if a.plot_only:
        plot(read_rows(rows_path), Path(a.plot))
        return
    stages = a.stages.split(",")
    for scale in [int(s) for s in a.scales.split(",")]:
        d = Path(a.work) / f"x{scale}"
        d.mkdir(parents=True, exist_ok=True)
        for stage in stages:
            if any(r["scale"] == scale and r["stage"] == stage for r in read_rows(rows_path)):
                print(f"x{scale} {stage}: done", flush=True)
                continue
            meta = json.loads((d / "ds" / "manifest.json").read_text())["counts"] if stage != "datastore" else None
            load0 = os.getloadavg()[0]
            if stage == "query":
                t0 = time.perf_counter()
                c0 = time.process_time()
                row = {"wall_s": time.perf_counter() - t0, **query_latency(d, a.queries), "cpu_s": time.process_time() - c0}
                row["wall_s"] = time.perf_counter() - t0
            else:
                cmd, out = stage_cmd(stage, scale, d, a)
                print(f"x{scale} {stage}: {' '.join(cmd[:4])} ...", flush=True)
                row = run_measured(cmd, d / f"{stage}.log", a.nice)
                row["disk_bytes"] = tree_bytes(out)
            counts = meta or json.loads((d / "ds" / "manifest.json").read_text())["counts"]
            row = {"scale": scale, "stage": stage, "tokens": int(counts["tokens"]), "documents": int(counts["documents"]),
                   "text_bytes": int(counts["text_bytes"]), "load_start": load0, "load_end": os.getloadavg()[0],
                   "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **row}
            if "disk_bytes" in row:
                row["disk_bytes_per_token"] = row["disk_bytes"] / row["tokens"]
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            if a.plot:  # '' when several drivers run at once (one scale each); redraw with --plot-only
                plot(read_rows(rows_path), Path(a.plot))


if __name__ == "__main__":
    main()
