"""Datastore benchmarks: build throughput and peak memory, batch vs per-document tokenization,
memory at 1x and 4x the corpus, and random chunk fetch.

    python benchmarks/datastore_build.py [--corpora ../shared/corpora] [--out benchmarks/out]

Prints a Markdown block for BENCHMARKS.md and writes the same figures as JSON.

CPU efficiency (MB of text per CPU-second, driver + workers, from ``getrusage(RUSAGE_CHILDREN)``),
this checkout against another one's code, alternating in the same run (a loaded machine: CPU time,
not wall time, is the figure):

    python benchmarks/datastore_build.py --cpu --base-pythonpath DIR --workers 1 2 --repeats 2

``DIR`` holds a ``retromem`` package laid out from an old commit (``git worktree add``, then
``retromem/{datastore,index,...}`` linked in); without it only this checkout is measured.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
CORPORA = ("python-docs.jsonl.gz", "linux-docs.jsonl.gz", "gcide.jsonl.gz")


class PeakRSS:
    """Samples the summed RSS of a process and all its children (worker processes included)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.proc, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_build(inputs: list[str], out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", "build", *inputs, "--out", str(out),
           "--overwrite", "--json", *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakRSS(proc.pid) as mem:
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"build failed: {stderr}")
    summary = json.loads(stdout)
    return {"wall_s": wall, "peak_rss": mem.peak, **summary}


def input_bytes(paths: list[str]) -> int:
    total = 0
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            total += sum(len(json.loads(line)["text"].encode("utf-8")) for line in fh)
    return total


def repeat_corpus(paths: list[str], times: int, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for rep in range(times):
        for p in paths:
            dst = out_dir / f"rep{rep}-{Path(p).name}"
            if not dst.exists():
                with gzip.open(p, "rt", encoding="utf-8") as src, gzip.open(dst, "wt", encoding="utf-8", compresslevel=1) as fh:
                    for line in src:
                        r = json.loads(line)
                        r["id"] = f"rep{rep}/{r['id']}"
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            outs.append(str(dst))
    return outs


def tokenization_comparison(paths: list[str], tokenizer_dir: Path, limit_bytes: int) -> dict:
    """Batch (Rust, this pipeline's path) vs a per-document `tokenizer.encode` loop, one thread each."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from transformers import AutoTokenizer

    from retromem.datastore.tokenizer import BatchTokenizer

    texts, size = [], 0
    for p in paths:
        with gzip.open(p, "rt", encoding="utf-8") as fh:
            for line in fh:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode("utf-8"))
                if size >= limit_bytes:
                    break
    bt = BatchTokenizer(tokenizer_dir / "tokenizer.json", 64)
    t = time.perf_counter()
    n_batch = sum(len(ids) for b in range(0, len(texts), 512) for ids, _ in bt.encode(texts[b : b + 512]))
    batch_s = time.perf_counter() - t
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    t = time.perf_counter()
    n_loop = sum(len(hf.encode(x, add_special_tokens=False, split_special_tokens=True)) for x in texts)
    loop_s = time.perf_counter() - t
    return {"bytes": size, "docs": len(texts), "tokens": n_batch, "tokens_loop": n_loop,
            "batch_mb_s": size / batch_s / 1e6, "loop_mb_s": size / loop_s / 1e6, "speedup": loop_s / batch_s}


def fetch_benchmark(path: Path, n: int = 200_000) -> dict:
    from retromem.datastore import Datastore

    ds = Datastore.open(path)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ds.num_chunks, size=n)
    out = {}
    for batch in (1, 64, 1024):
        count = min(n, 20_000) if batch == 1 else n
        t = time.perf_counter()
        for s in range(0, count, batch):
            ds.neighbour_tokens(ids[s : s + batch])
        out[f"batch_{batch}_chunks_s"] = count / (time.perf_counter() - t)
    # reference: a plain numpy gather of the same rows (the floor of any memmap design)
    arr = ds.token_array
    t = time.perf_counter()
    for s in range(0, n, 1024):
        b = ids[s : s + 1024]
        arr[b], arr[np.minimum(b + 1, ds.num_chunks - 1)]
    out["numpy_gather_batch_1024_chunks_s"] = n / (time.perf_counter() - t)
    return out


def cpu_build(inputs: list[str], out: Path, workers: int, pythonpath: str | None) -> dict:
    """One build in a fresh process tree; CPU-seconds of the driver and every reaped worker."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", "build", *inputs, "--out", str(out),
           "--overwrite", "--json", "--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/")
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"build failed: {proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall_s": wall, "user_s": user, "sys_s": system, "cpu_s": user + system,
            "datastore_id": summary.get("datastore_id") or summary.get("manifest", {}).get("datastore_id")}


def cpu_compare(args, paths: list[str]) -> None:
    raw = input_bytes(paths)
    variants = [("before", args.base_pythonpath)] if args.base_pythonpath else []
    variants.append(("after", args.after_pythonpath))
    rows = []
    out = Path(args.out)
    for rep in range(args.repeats):
        for workers in args.workers:
            for name, pp in variants:
                r = cpu_build(paths, out / f"cpu-{name}-w{workers}", workers, pp)
                r.update(variant=name, workers=workers, repeat=rep, mb_per_cpu_s=raw / r["cpu_s"] / 1e6,
                         load=os.getloadavg()[0])
                rows.append(r)
                print(json.dumps(r), flush=True)
    (out / "datastore_build_cpu.json").write_text(json.dumps({"input_bytes": raw, "runs": rows}, indent=2))
    print(f"\ninputs: {raw / 1e6:.1f} MB of UTF-8 text; one datastore_id over every run (same bytes): "
          f"{len({r['datastore_id'] for r in rows}) == 1}")
    print("| variant | workers | repeat | CPU s (user + sys) | MB/CPU-s | wall s | load |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['workers']} | {r['repeat'] + 1} | {r['cpu_s']:.2f} ({r['user_s']:.2f} + {r['sys_s']:.2f}) "
              f"| {r['mb_per_cpu_s']:.2f} | {r['wall_s']:.1f} | {r['load']:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", default=str(REPO.parent / "shared" / "corpora"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out"))
    ap.add_argument("--tokenizer", default="smollm2-135m")
    ap.add_argument("--skip-4x", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="only the CPU-efficiency comparison (see the module docstring)")
    ap.add_argument("--base-pythonpath", default=None, help="--cpu: PYTHONPATH of the old code to compare with")
    ap.add_argument("--after-pythonpath", default=None, help="--cpu: PYTHONPATH of the new code (default: this checkout)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--cpu: worker counts")
    ap.add_argument("--repeats", type=int, default=2, help="--cpu: rounds (each runs every variant once)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(Path(args.corpora).resolve() / c) for c in CORPORA]
    if args.cpu:
        cpu_compare(args, paths)
        return
    raw = input_bytes(paths)
    res: dict = {"machine": f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
                 "input_bytes": raw}

    b1 = run_build(paths, out / "ds-1x", ["--tokenizer", args.tokenizer])
    res["build_1x"] = {k: b1[k] for k in ("wall_s", "peak_rss", "counts", "dedup")}
    res["build_1x"]["mb_s"] = raw / b1["wall_s"] / 1e6
    res["build_1x"]["mb_s_per_core"] = res["build_1x"]["mb_s"] / psutil.cpu_count()
    res["build_1x"]["tokens_s"] = b1["counts"]["tokens"] / b1["wall_s"]
    print(json.dumps(res["build_1x"], indent=1)[:2000], flush=True)

    if not args.skip_4x:
        rep = repeat_corpus(paths, 4, out / "corpus-4x")
        b4 = run_build(rep, out / "ds-4x", ["--tokenizer", args.tokenizer])
        res["build_4x"] = {k: b4[k] for k in ("wall_s", "peak_rss", "counts", "dedup")}
        res["peak_ratio_4x_over_1x"] = b4["peak_rss"] / b1["peak_rss"]

    res["tokenization"] = tokenization_comparison(paths, out / "ds-1x" / "tokenizer", limit_bytes=1 << 62)
    res["fetch"] = fetch_benchmark(out / "ds-1x")
    (out / "datastore_build.json").write_text(json.dumps(res, indent=2))

    b = res["build_1x"]
    lines = [
        f"machine: {res['machine']}; inputs: {', '.join(CORPORA)} ({raw / 1e6:.1f} MB of UTF-8 text)",
        f"- end-to-end build: {b['wall_s']:.1f} s wall -> {b['mb_s']:.2f} MB/s ({b['mb_s_per_core']:.2f} MB/s per core), "
        f"{b['tokens_s']:,.0f} tokens/s; peak RSS (driver + workers) {b['peak_rss'] / 2**20:.0f} MiB",
        f"  documents {b['dedup']['input_documents']:,}, exact dups {b['dedup']['removed_exact']}, near dups "
        f"{b['dedup']['removed_near']}, chunks {b['counts']['chunks']:,}, tokens {b['counts']['tokens']:,}",
    ]
    if "build_4x" in res:
        b4 = res["build_4x"]
        lines.append(f"- 4x corpus (different ids): {b4['wall_s']:.1f} s, peak RSS {b4['peak_rss'] / 2**20:.0f} MiB "
                     f"= {res['peak_ratio_4x_over_1x']:.2f}x the 1x peak; removed {b4['dedup']['removed_exact']:,} exact + "
                     f"{b4['dedup']['removed_near']:,} near duplicates")
    t = res["tokenization"]
    lines.append(f"- tokenization, one thread: batch {t['batch_mb_s']:.2f} MB/s vs per-document encode loop "
                 f"{t['loop_mb_s']:.2f} MB/s = {t['speedup']:.2f}x ({t['tokens']:,} tokens, identical counts: {t['tokens'] == t['tokens_loop']})")
    f = res["fetch"]
    lines.append(f"- random chunk + continuation fetch: {f['batch_1_chunks_s']:,.0f}/s one id per call, "
                 f"{f['batch_64_chunks_s']:,.0f}/s in batches of 64, {f['batch_1024_chunks_s']:,.0f}/s in batches of 1024 "
                 f"(plain numpy gather of the same rows: {f['numpy_gather_batch_1024_chunks_s']:,.0f}/s)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
