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

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.peak: dict[int, tuple[str, int]] = {}  # pid -> (name, peak RSS)
        self.peak_sum = 0
        self.peak_anon: dict[int, int] = {}  # pid -> peak of RSS less its file-backed shared pages (memory maps)
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
                    mi = p.memory_info()
                    rss = mi.rss
                    self.peak_anon[p.pid] = max(self.peak_anon.get(p.pid, 0), mi.rss - mi.shared)
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
            # RSS counts the pages of memory-mapped files a process touched (the datastore, a token stream):
            # the kernel can drop those, so the anonymous part is the memory a job really needs
            "peak_anon_driver": self.peak_anon.get(root, 0),
            "peak_anon_max_child": max((v for k, v in self.peak_anon.items() if k != root), default=0),
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


def percentiles(ns: list[int], cpu_ns: list[int] | None = None) -> dict:
    """p50/p99 of wall times (ns), and of the querying thread's CPU time where given: on a loaded machine
    the wall time adds the waits for a core, the CPU time is what one query costs on an idle one."""
    ms = np.asarray(ns) / 1e6
    out = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}
    if cpu_ns is not None:
        cpu = np.asarray(cpu_ns) / 1e6
        out.update(cpu_p50_ms=float(np.percentile(cpu, 50)), cpu_p99_ms=float(np.percentile(cpu, 99)))
    return out


def timed(fn, args: list) -> dict:
    """Wall and thread-CPU time of ``fn(a)`` for each ``a``, as :func:`percentiles`."""
    ns, cpu = [], []
    for q in args:
        a, c = time.perf_counter_ns(), time.thread_time_ns()
        fn(q)
        cpu.append(time.thread_time_ns() - c)
        ns.append(time.perf_counter_ns() - a)
    return percentiles(ns, cpu)


def query_latency(d: Path, n: int, seed: int = 0) -> dict:
    """count p50/p99 over every shard: n-grams of 1-8 tokens from the token streams (suffix array),
    substrings of 4-32 bytes of the text (FM-index), each drawn at a random place in a random shard;
    ``n`` timed queries after ``n`` untimed ones (warm page tables, as in a serving process)."""
    from retromem.datastore import Datastore
    from retromem.index.fm_index import FMIndex
    from retromem.index.ngram import NgramIndex

    rng = np.random.default_rng(seed)
    warmup, n = n, 2 * n  # draw a warm-up round, then the n timed queries
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
    # one untimed round first: the first touches of a memory-mapped index's pages are minor/major faults (94
    # a query over 17 shards at 1 B tokens, none by the second round); a serving process is past them
    for q in qs[: warmup]:
        idx.count(q)
    out["ngram_shards"] = len(streams)
    out["ngram_count"] = timed(idx.count, qs[warmup:])
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
        for p in pats[:warmup]:
            fm.count(p)
        out["fm_shards"] = len(fm.manifest.get("shards", [])) or 1
        out["fm_count"] = timed(fm.count, pats[warmup:])
    return out


# ---------------------------------------------------------------------------------------------
# dense: FAISS IVF-PQ with on-disk (memory-mapped) inverted lists, 1e5 .. 1e7 vectors

REAL_EMBEDDINGS = ("/work/scratch/retro2/real/emb", "/work/scratch/qa/gcide/emb")  # MiniLM, python-docs + gcide chunks


def real_vectors(dirs: tuple[str, ...] = REAL_EMBEDDINGS) -> np.ndarray:
    """(n, 384) float32 unit vectors: real all-MiniLM-L6-v2 embeddings of chunks of the shared corpora
    (embedding jobs of other issues, `retromem index embed`), duplicates dropped."""
    xs = []
    for d in dirs:
        m = json.loads((Path(d) / "embeddings.json").read_text())
        for sh in m["shards"]:
            xs.append(np.load(Path(d) / sh["file"]).astype(np.float32))
    x = np.unique(np.concatenate(xs), axis=0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stand_ins(real: np.ndarray, start: int, n: int, noise: float = 0.3, block: int = 65536) -> np.ndarray:
    """Vectors [start, start + n) of the stand-in database: the real vectors, then real vectors plus
    isotropic noise of norm ~``noise`` (cosine ~0.96 to their origin), renormalized; deterministic in
    ``start``. Real neighbourhoods, repeated: time and memory behave as with real data; recall is not claimed.

    Filled ``block`` rows at a time, in place: the only array of size n is the output (the noise drawn
    block by block is the same stream as one draw, so the values do not depend on ``block``)."""
    d = real.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(start)
    scale = np.float32(noise / np.sqrt(d))
    for b0 in range(0, n, block):
        i = np.arange(start + b0, start + min(n, b0 + block))
        o = out[b0 : b0 + len(i)]
        o[:] = real[i % len(real)]
        fresh = i >= len(real)
        k = int(fresh.sum())
        if k:
            o[fresh] += rng.standard_normal((k, d), dtype=np.float32) * scale
        o /= np.linalg.norm(o, axis=1, keepdims=True)
    return out


def nlist_for(n: int) -> int:
    """The power of two nearest 8 sqrt(n), inside FAISS's guideline 4 sqrt(n) .. 16 sqrt(n)."""
    return 2 ** int(round(np.log2(8 * np.sqrt(n))))


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _step(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _save_step(path: Path, rec: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(path)


def dense_one(n: int, work: Path, pq: int, queries: int, out_json: Path, shard: int = 2_000_000,
              batch: int = 50_000) -> None:
    """Build IVF{nlist}_HNSW32,PQ{pq} over n vectors (real ones first, then stand-ins) as the dense build
    does at scale, then search it memory-mapped with real held-out queries; recall@10 against exact search
    over the same n vectors, at nprobe 1..nlist/4.

    Build: train once on a sample (39 points per list) as ``index build-dense`` does (two-level k-means from
    4,096 lists on, no polysemous training of the codes); add ``shard``
    vectors at a time to a copy of the trained index, in batches of ``batch`` generated on the fly, and
    write each shard; merge the shards' lists into one on-disk ``.ivfdata`` (``faiss.contrib.ondisk``).
    No step holds more than the training sample or one shard, so memory does not grow with n. Every step
    is written to ``work/ivf-<n>/`` as it finishes with its CPU and wall time: a killed run resumes."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    from retromem.index.dense_faiss import no_polysemous_training, train_ivf

    faiss.omp_set_num_threads(1)
    wd = work / f"ivf-{n}"
    wd.mkdir(parents=True, exist_ok=True)
    real = real_vectors()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(real))
    q, base = real[perm[:queries]], real[perm[queries:]]
    d = base.shape[1]
    nlist = nlist_for(n)
    res: dict = {"n": n, "dim": d, "nlist": nlist, "nlist_range": [4 * int(np.sqrt(n)), 16 * int(np.sqrt(n))], "pq_bytes": pq,
                 "real_base": len(base), "queries": queries, "shard_vectors": shard, "add_batch": batch}

    # 1. train
    trained = wd / "trained.index"
    tr = _step(wd / "train.json")
    if tr is None or not trained.exists():
        c0, w0 = time.process_time(), time.perf_counter()
        ntrain = min(n, 39 * nlist)
        xt = stand_ins(base, 0, ntrain) if ntrain <= len(base) else stand_ins(base, n - ntrain, ntrain)
        gen = time.process_time() - c0
        c1, w1 = time.process_time(), time.perf_counter()
        index = faiss.index_factory(d, f"IVF{nlist}_HNSW32,PQ{pq}")
        # as `index build-dense` trains: two-level k-means from TWO_LEVEL_MIN_NLIST lists on, no polysemous codes
        no_polysemous_training(index)
        train_ivf(index, xt)
        tr = {"train_cpu_s": time.process_time() - c1, "train_wall_s": time.perf_counter() - w1, "train_points": ntrain,
              "train_standin_cpu_s": gen, "train_maxrss": _maxrss()}
        del xt
        faiss.write_index(index, str(trained))
        _save_step(wd / "train.json", tr)
        del index
    res.update(tr)

    # 2. add, shard by shard; the exact top-10 of the queries merged batch by batch as the vectors go by
    shard_files = []
    for k, s0 in enumerate(range(0, n, shard)):
        s1 = min(n, s0 + shard)
        f = wd / f"shard-{k:04d}.index"
        shard_files.append(f)
        if _step(wd / f"shard-{k:04d}.json") is not None and (f.exists() or (wd / "merge.json").exists()):
            continue
        index = faiss.read_index(str(trained))
        top_d = np.full((queries, 10), np.inf, dtype=np.float32)
        top_i = np.zeros((queries, 10), dtype=np.int64)
        gen = gt = add = 0.0
        w0 = time.perf_counter()
        for b0 in range(s0, s1, batch):
            c = time.process_time()
            x = stand_ins(base, b0, min(batch, s1 - b0))
            c2 = time.process_time()
            dist = q @ x.T  # unit vectors: the smallest L2 is the largest inner product
            np.multiply(dist, -2, out=dist)
            dist += 2
            kk = np.argpartition(dist, 10, axis=1)[:, :10] if x.shape[0] > 10 else np.tile(np.arange(x.shape[0]), (queries, 1))
            cd = np.concatenate([top_d, np.take_along_axis(dist, kk, 1)], 1)
            ci = np.concatenate([top_i, kk + b0], 1)
            o = np.argsort(cd, 1)[:, :10]
            top_d, top_i = np.take_along_axis(cd, o, 1), np.take_along_axis(ci, o, 1)
            del dist
            c3 = time.process_time()
            index.add_with_ids(x, np.arange(b0, b0 + len(x), dtype=np.int64))
            c4 = time.process_time()
            gen, gt, add = gen + c2 - c, gt + c3 - c2, add + c4 - c3
        faiss.write_index(index, str(f))
        del index
        _save_step(wd / f"shard-{k:04d}.json", {"lo": s0, "hi": s1, "add_cpu_s": add, "standin_cpu_s": gen, "exact_cpu_s": gt,
                                                 "wall_s": time.perf_counter() - w0, "maxrss": _maxrss(),
                                                 "top_d": top_d.tolist(), "top_i": top_i.tolist()})
    shards = [_step(wd / f"shard-{k:04d}.json") for k in range(len(shard_files))]
    res["add_cpu_s"] = sum(s["add_cpu_s"] for s in shards)
    res["add_wall_s"] = sum(s["wall_s"] for s in shards)
    res["standin_cpu_s"] = sum(s["standin_cpu_s"] for s in shards)
    res["exact_cpu_s"] = sum(s["exact_cpu_s"] for s in shards)
    cd = np.concatenate([np.array(s["top_d"], dtype=np.float32) for s in shards], 1)
    ci = np.concatenate([np.array(s["top_i"], dtype=np.int64) for s in shards], 1)
    top_i = np.take_along_axis(ci, np.argsort(cd, 1)[:, :10], 1)

    # 3. merge the shards' lists into one on-disk file; the index file keeps only the quantizer + list offsets
    path, ivfdata = wd / "merged.index", wd / "merged.ivfdata"
    mg = _step(wd / "merge.json")
    if mg is None or not path.exists():
        c0, w0 = time.process_time(), time.perf_counter()
        index = faiss.read_index(str(trained))
        ivfdata.unlink(missing_ok=True)
        merge_ondisk(index, [str(f) for f in shard_files], str(ivfdata))
        faiss.write_index(index, str(path))
        del index
        mg = {"merge_cpu_s": time.process_time() - c0, "merge_wall_s": time.perf_counter() - w0, "merge_maxrss": _maxrss()}
        _save_step(wd / "merge.json", mg)
        for f in shard_files:
            f.unlink(missing_ok=True)
    res.update(mg)
    res["index_bytes"] = path.stat().st_size + ivfdata.stat().st_size
    res["ivfdata_bytes"] = ivfdata.stat().st_size
    res["build_maxrss"] = max([tr["train_maxrss"], mg["merge_maxrss"]] + [s["maxrss"] for s in shards])

    # 4. search: only the quantizer and the list offsets are read in; the lists are mapped from disk
    res["rss_before_open"] = _maxrss()
    t = time.perf_counter()
    rss0 = _rss_now()
    # OnDiskInvertedLists map their .ivfdata themselves (IO_FLAG_MMAP on top of them crashes FAISS 1.15's search)
    index = faiss.read_index(str(path))
    res["open_s"] = time.perf_counter() - t
    # what opening holds in RAM: the quantizer, the list offsets and, for an L2 IVF-PQ under FAISS's 2 GiB cap,
    # the precomputed tables (nlist x M x 256 floats: 1 GiB at 32,768 lists x PQ32); inner-product indexes have none
    res["open_rss_bytes"] = _rss_now() - rss0
    ivfpq = faiss.downcast_index(faiss.extract_index_ivf(index))
    res["precomputed_table_bytes"] = int(ivfpq.precomputed_table.size()) * 4 if hasattr(ivfpq, "precomputed_table") else 0
    ivf = faiss.extract_index_ivf(index)
    sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
    res["list_size_max_over_mean"] = float(sizes.max() / max(sizes.mean(), 1))
    # which lists each query probes: bytes read from the on-disk lists = their codes + ids
    _, probed = ivf.quantizer.search(q, min(nlist, 1024))
    rows = []
    for nprobe in [p for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if p <= nlist // 4]:
        ivf.nprobe = nprobe
        faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(16, nprobe)  # the graph must return nprobe lists
        index.search(q[:10], 10)  # warm the quantizer
        ns, cpu = [], []
        found = np.zeros((queries, 10), dtype=np.int64)
        for j in range(queries):
            a, c = time.perf_counter_ns(), time.thread_time_ns()
            _, found[j : j + 1] = index.search(q[j : j + 1], 10)
            ns.append(time.perf_counter_ns() - a)
            cpu.append(time.thread_time_ns() - c)  # on a loaded machine wall time adds the waits for a core
        recall = float(np.mean([len(set(found[j]) & set(top_i[j])) / 10 for j in range(queries)]))
        read = float(np.mean(sizes[probed[:, :nprobe]].sum(1))) * (pq + 8)
        pc = percentiles(cpu)
        rows.append({"nprobe": nprobe, "recall_at_10": recall, "bytes_read_per_query": read, **percentiles(ns),
                     "p50_cpu_ms": pc["p50_ms"], "p99_cpu_ms": pc["p99_ms"]})
    best = max(r["recall_at_10"] for r in rows)
    tuned = next(r for r in rows if r["recall_at_10"] >= best - 0.02)
    res.update(sweep=rows, tuned=tuned, peak_rss=_maxrss())
    out_json.write_text(json.dumps(res))


def dense_rows(a: argparse.Namespace, rows_path: Path) -> None:
    work = Path(a.work) / "dense"
    work.mkdir(parents=True, exist_ok=True)
    for n in [int(float(x)) for x in a.dense.split(",")]:
        if any(r["stage"] == "dense" and r["n"] == n for r in read_rows(rows_path)):
            print(f"dense {n}: done", flush=True)
            continue
        out = work / f"dense-{n}.json"
        load0 = os.getloadavg()[0]
        row = run_measured([sys.executable, __file__, "--dense-one", str(n), "--work", a.work, "--pq", str(a.pq),
                            "--dense-queries", str(a.dense_queries), "--dense-out", str(out)], work / f"dense-{n}.log", a.nice)
        row = {"stage": "dense", "scale": None, "tokens": n * 64, "load_start": load0, "load_end": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), **row, **json.loads(out.read_text())}
        with open(rows_path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        if not a.keep_index:
            for f in ("merged.index", "merged.ivfdata", "trained.index"):
                (work / f"ivf-{n}" / f).unlink(missing_ok=True)


def compare(rows_path: Path, fit_up_to: float) -> list[dict]:
    """`retromem plan` fitted on the scales up to ``fit_up_to`` tokens against every larger measured scale,
    per component: disk bytes, CPU-seconds, peak of the largest process, count p50."""
    from retromem.index.plan import predict, predict_stack, stack_costs_from_rows

    costs = stack_costs_from_rows(rows_path, max_tokens=fit_up_to)
    rows = read_rows(rows_path)
    out = []
    for scale in sorted({r["scale"] for r in rows if r.get("scale") and r["tokens"] > fit_up_to}):
        by = {r["stage"]: r for r in rows if r.get("scale") == scale}
        t = by["datastore"]["tokens"]
        sp = predict_stack(predict(t, factory="auto"), costs=costs)
        # the largest process, anonymous memory where measured (as the plan's fit): RSS adds dropped file pages
        big = lambda r: (max(r["peak_anon_max_child"], r.get("peak_anon_driver", 0)) if r.get("peak_anon_max_child")  # noqa: E731
                         else max(r.get("peak_rss_max_child", 0), r.get("peak_rss_driver", 0)))
        pairs = [("datastore", "disk bytes", sp.datastore_bytes, "disk_bytes"),
                 ("datastore", "CPU-s", sp.datastore_cpu_core_hours * 3600, "cpu_s"),
                 ("datastore", "peak RSS", sp.datastore_build_peak_bytes, big),
                 ("ngram", "disk bytes", sp.ngram_bytes, "disk_bytes"),
                 ("ngram", "CPU-s", sp.ngram_cpu_core_hours * 3600, "cpu_s"),
                 ("ngram", "peak RSS", sp.ngram_build_peak_bytes, big),
                 ("fm", "disk bytes", sp.fm_bytes, "disk_bytes"),
                 ("fm", "CPU-s", sp.fm_cpu_core_hours * 3600, "cpu_s"),
                 ("fm", "peak RSS", sp.fm_build_peak_bytes, big)]
        for stage, what, pred, key in pairs:
            if stage in by:
                m = key(by[stage]) if callable(key) else by[stage][key]
                out.append({"scale": scale, "tokens": t, "component": f"{stage} {what}", "predicted": pred, "measured": m,
                            "error": pred / m - 1 if m else None})
        if "query" in by:
            q = by["query"]
            for name, pred, lat in (("ngram", sp.ngram_count_ms, q["ngram_count"]),
                                    ("fm", sp.fm_shards * costs.fm_count_ms, q.get("fm_count"))):
                if lat is None:
                    continue
                cpu = "cpu_p50_ms" in lat  # CPU time where measured, as the plan's fit
                m = lat["cpu_p50_ms" if cpu else "p50_ms"]
                out.append({"scale": scale, "tokens": t, "component": f"{name} count p50 {'CPU-ms' if cpu else 'ms'}",
                            "predicted": pred, "measured": m, "error": pred / m - 1})
    return out


def compare_dense(rows_path: Path, fit_up_to: float) -> list[dict]:
    """`retromem plan`'s dense costs fitted on the dense rows up to ``fit_up_to`` tokens (64 per vector)
    against every larger dense row: train and add CPU-seconds, index bytes on disk, the build's peak, and
    at the row's tuned nprobe the bytes a query reads from the on-disk lists and its scanning time."""
    from retromem.index.plan import dense_costs_from_rows, predict, predict_stack

    costs = dense_costs_from_rows(rows_path, max_tokens=fit_up_to)
    out = []
    for r in sorted((r for r in read_rows(rows_path) if r["stage"] == "dense" and r["tokens"] > fit_up_to), key=lambda r: r["n"]):
        p = predict(r["tokens"], dim=r.get("dim", 384), factory=f"IVF{r['nlist']}_HNSW32,PQ{r['pq_bytes']}", costs=costs,
                    train_size=r["train_points"])
        sp = predict_stack(p, nprobe=r["tuned"]["nprobe"])
        pairs = [("dense train CPU-s", p.train_cpu_core_hours * 3600, r["train_cpu_s"]),
                 ("dense add CPU-s", p.add_cpu_core_hours * 3600, r["add_cpu_s"]),
                 ("dense index disk bytes", p.index_bytes, r["index_bytes"]),
                 ("dense build peak RSS", p.build_peak_bytes, r.get("build_maxrss", r["peak_rss"])),
                 (f"dense bytes read / query (nprobe {r['tuned']['nprobe']})", sp.ivf_bytes_read_per_query,
                  r["tuned"]["bytes_read_per_query"]),
                 ("dense query p50 " + ("CPU-ms" if "p50_cpu_ms" in r["tuned"] else "ms") + " (plan: list scan only)",
                  sp.dense_query_cpu_ms, r["tuned"].get("p50_cpu_ms", r["tuned"]["p50_ms"]))]
        for what, pred, m in pairs:
            out.append({"scale": f"{r['n']:.0e} vectors", "tokens": r["tokens"], "component": what, "predicted": pred,
                        "measured": m, "error": pred / m - 1 if m else None})
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
        b.semilogx(t, [max(r["peak_rss_max_child"], r["peak_rss_driver"]) / 2**20 for r in rs], "o-", color=colour,
                   label=f"{stage} largest process (RSS)")
        an = [(r["tokens"], max(r["peak_anon_max_child"], r.get("peak_anon_driver", 0)) / 2**20) for r in rs if r.get("peak_anon_max_child")]
        if an:  # RSS less the pages of mapped files, which the kernel drops
            b.semilogx(*zip(*an), "s", color=colour, ms=9, mfc="none", label=f"{stage} largest process, anonymous")
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
    ap.add_argument("--dense", default=None, help="dense rows instead: vector counts, e.g. 1e5,1e6,1e7")
    ap.add_argument("--pq", type=int, default=32)
    ap.add_argument("--dense-queries", type=int, default=200)
    ap.add_argument("--keep-index", action="store_true")
    ap.add_argument("--compare", type=float, default=None, metavar="TOKENS",
                    help="print `retromem plan` fitted on the scales up to TOKENS against every larger scale measured")
    ap.add_argument("--compare-dense", type=float, default=None, metavar="VECTORS",
                    help="only the dense rows: `retromem plan` fitted on the rows up to VECTORS against the larger ones")
    ap.add_argument("--table", action="store_true", help="print the rows as a markdown table")
    ap.add_argument("--dense-one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dense-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    rows_path = Path(a.rows)
    if a.dense_one is not None:
        dense_one(a.dense_one, Path(a.work) / "dense", a.pq, a.dense_queries, Path(a.dense_out))
        return
    if a.dense:
        dense_rows(a, rows_path)
        return
    if a.table:
        print("| scale | stage | tokens | CPU-s | wall s | load | text MB / CPU-s | largest process | all processes | "
              "disk bytes / token |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in sorted((r for r in read_rows(rows_path) if r.get("scale") and r["stage"] != "query"),
                        key=lambda r: (STAGES.index(r["stage"]), r["scale"])):
            big = max(r["peak_rss_max_child"], r["peak_rss_driver"])
            anon = max(r.get("peak_anon_max_child", 0), r.get("peak_anon_driver", 0))
            print(f"| x{r['scale']} | {r['stage']} | {r['tokens']:,} | {r['cpu_s']:,.1f} | {r['wall_s']:,.0f} | "
                  f"{r['load_mean']:.0f} | {r['text_bytes'] / 1e6 / r['cpu_s']:.2f} | {big / 2**20:,.0f} MiB"
                  + (f" ({anon / 2**20:,.0f} anon)" if anon else "") + f" | {r['peak_rss_sum'] / 2**20:,.0f} MiB | "
                  f"{r['disk_bytes_per_token']:.2f} |")
        for r in sorted((r for r in read_rows(rows_path) if r["stage"] == "query"), key=lambda r: r["scale"]):
            c, f = r["ngram_count"], r.get("fm_count", {})
            print(f"\nx{r['scale']} count over {r['ngram_shards']} suffix-array shard(s): p50 {c['p50_ms']:.3f} ms, p99 "
                  f"{c['p99_ms']:.2f} ms; FM-index, {r.get('fm_shards')} shard(s): p50 {f.get('p50_ms', 0):.3f} ms, "
                  f"p99 {f.get('p99_ms', 0):.2f} ms")
        return
    if a.compare is not None or a.compare_dense is not None:
        print("| scale | tokens | component | plan | measured | error |\n| --- | ---: | --- | ---: | ---: | ---: |")
        for c in (compare(rows_path, a.compare) if a.compare else []) + compare_dense(rows_path, a.compare or a.compare_dense * 64):
            f = (lambda v: f"{v / 2**20:,.0f} MiB") if "bytes" in c["component"] or "RSS" in c["component"] else (lambda v: f"{v:,.2f}")
            if "/ query" in c["component"]:
                f = lambda v: f"{v / 1e3:,.0f} KB"  # noqa: E731
            print(f"| {'x' if isinstance(c['scale'], int) else ''}{c['scale']} | {c['tokens']:,} | {c['component']} | {f(c['predicted'])} | {f(c['measured'])} | "
                  f"{c['error']:+.1%} |")
        return
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
