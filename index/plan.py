"""Capacity planning for dense retrieval: what a datastore of N tokens costs to embed, index and serve.

``predict`` turns a token count into chunks, float16 embedding bytes, index bytes (from the
factory-string byte model in :mod:`retromem.index.factory`), search RAM, and build time, using unit costs:
embedding chunks/s, FAISS add vectors/s and k-means seconds per (point x centroid x dimension).
The shipped unit costs were measured on the development machine (see ``UNIT_COSTS_MEASURED``
and BENCHMARKS.md); ``measure_unit_costs`` re-measures them on the machine at hand.

Assumptions, stated so a reader can disagree with them:
- embedding time scales linearly in chunks (fixed-length 64-token chunks, so it does);
- FAISS add time scales linearly in vectors for IVF (each vector is assigned to one list);
- training costs the FLOPs of the k-means the build runs (:func:`retromem.index.dense_faiss.kmeans_flops`)
  over the training sample it would draw (256 points per centroid, at most 1M points, at least 39
  per centroid; ``--train-size`` overrides): the coarse quantizer's k-means, 10 iterations (FAISS's
  default for IVF training), flat below 4,096 lists and in two levels from there on as
  ``index build-dense`` trains on CPU (sqrt(nlist) clusters, each split: ~2 sqrt(nlist) instead of
  nlist distances per point), plus the PQ codebooks (25 iterations on at most 256 x 2**nbits
  points); GPU training is flat k-means (FAISS's GPU recipe);
- search RAM is the whole index in memory; with ``--merge ondisk`` only the fixed part
  (centroids, rotations, codebooks) must be resident and the inverted lists are paged;
- GPU figures: the shipped embedding rate on a GPU is the issue's H100 target (5,000 chunks/s with
  MiniLM in fp16) until a GPU measurement replaces it; FAISS GPU k-means runs at 20 TFLOP/s (a
  fraction of an H100's FP32 GEMM rate) and GPU add at 20x the measured CPU machine. All three are
  labelled as assumptions in the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retromem.index.dense_faiss import kmeans_flops
from retromem.index.factory import parse_factory
from retromem.errors import ConfigError

# Measured on the development machine (2 cores, no GPU, shared with other jobs while measured, so
# conservative): embedding from `retromem index embed` over the whole python-docs corpus (36,446
# chunks in 1,266 s, model load excluded; the earlier, more loaded 14k-chunk run gave 13.4/s),
# FAISS add and k-means from `retromem plan --measure` (IVF1024,PQ64). See BENCHMARKS.md.
UNIT_COSTS_MEASURED: dict[str, Any] = {
    "machine": "2-core x86_64 VM, 24 GiB, no GPU (retromem development machine, under load)",
    "embed_chunks_per_s_cpu": 28.8,
    "embed_chunks_per_s_gpu": 5000.0,
    "embed_gpu_measured": False,
    "add_vectors_per_s_cpu": 18860.0,
    "kmeans_flops_per_s_cpu": 5.6e9,
    "kmeans_flops_per_s_gpu": 2.0e13,
    "gpu_speedup_faiss": 20.0,
    "gpu_speedup_measured": False,
    "cpu_cores": 2,
}


@dataclass(frozen=True)
class UnitCosts:
    machine: str
    embed_chunks_per_s_cpu: float
    embed_chunks_per_s_gpu: float
    embed_gpu_measured: bool
    add_vectors_per_s_cpu: float
    kmeans_flops_per_s_cpu: float
    kmeans_flops_per_s_gpu: float
    gpu_speedup_faiss: float
    gpu_speedup_measured: bool
    cpu_cores: int
    # a build's largest process: fixed bytes (interpreter, FAISS, the quantizer) + bytes per byte of its float32
    # training sample (k-means copies part of it: level 1 samples it down); fitted from scale-curve rows
    # (dense_costs_from_rows), the sample alone until then
    build_fixed_bytes: int = 0
    build_bytes_per_train_byte: float = 1.0
    # adding a vector costs more as nlist grows (its HNSW coarse assignment): CPU-s per vector per doubling of
    # nlist, from add_log2_nlist (where add_vectors_per_s_cpu holds) on; 0: no such term (fitted from rows)
    add_cpu_s_per_log2_nlist: float = 0.0
    add_log2_nlist: float = 0.0

    @classmethod
    def load(cls, path: str | None = None) -> "UnitCosts":
        if path is None:
            return cls(**UNIT_COSTS_MEASURED)
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: data[k] for k in UNIT_COSTS_MEASURED}, build_fixed_bytes=int(data.get("build_fixed_bytes", 0)),
                       build_bytes_per_train_byte=float(data.get("build_bytes_per_train_byte", 1.0)),
                       add_cpu_s_per_log2_nlist=float(data.get("add_cpu_s_per_log2_nlist", 0.0)),
                       add_log2_nlist=float(data.get("add_log2_nlist", 0.0)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--unit-costs {path}: cannot read unit costs ({exc}); expected keys {sorted(UNIT_COSTS_MEASURED)}") from exc


@dataclass(frozen=True)
class Prediction:
    tokens: int
    chunks: int
    factory: str
    dim: int
    embedding_bytes: int
    index_bytes: int
    search_ram_bytes: int
    search_ram_ondisk_bytes: int
    embed_gpu_hours: float
    embed_cpu_core_hours: float
    train_cpu_core_hours: float
    add_cpu_core_hours: float
    faiss_gpu_hours: float
    train_points: int  # the training sample the build draws
    train_flops: float  # its k-means on CPU (two levels from TWO_LEVEL_MIN_NLIST lists on)
    build_peak_bytes: int  # the build's largest process: a fixed part + a multiple of the float32 training sample
    costs: UnitCosts

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["costs"] = asdict(self.costs)
        d["total_gpu_hours"] = self.embed_gpu_hours + self.faiss_gpu_hours
        return d

    def describe(self) -> list[str]:
        c = self.costs
        gb = lambda b: f"{b / 2**30:,.1f} GiB" if b < 2**40 else f"{b / 2**40:,.2f} TiB"  # noqa: E731
        return [
            f"datastore   {self.tokens:.3g} tokens -> {self.chunks:,} chunks",
            f"embeddings  {gb(self.embedding_bytes)} (float16, {self.dim} dims)",
            f"index       {self.factory}: {gb(self.index_bytes)} ({self.index_bytes / max(self.chunks, 1):.1f} bytes/vector)",
            f"search RAM  {gb(self.search_ram_bytes)} in memory; {gb(self.search_ram_ondisk_bytes)} resident with --merge ondisk",
            f"build       embed {self.embed_gpu_hours:,.1f} GPU-hours ({'measured' if c.embed_gpu_measured else 'assumed'} "
            f"{c.embed_chunks_per_s_gpu:,.0f} chunks/s/GPU) or {self.embed_cpu_core_hours:,.0f} CPU core-hours "
            f"(measured {c.embed_chunks_per_s_cpu / c.cpu_cores:,.1f} chunks/s/core)",
            f"            FAISS train {self.train_cpu_core_hours:,.2f} ({self.train_points:,} points, {self.train_flops:.2g} k-means "
            f"FLOPs, peak {gb(self.build_peak_bytes)}) + add {self.add_cpu_core_hours:,.2f} CPU core-hours (measured), "
            f"or {self.faiss_gpu_hours:,.2f} GPU-hours ({'measured' if c.gpu_speedup_measured else 'assumed'} "
            f"k-means {c.kmeans_flops_per_s_gpu / 1e12:.0f} TFLOP/s, add {c.gpu_speedup_faiss:.0f}x this machine)",
            f"            total on GPUs: {self.embed_gpu_hours + self.faiss_gpu_hours:,.1f} GPU-hours",
            f"unit costs  {c.machine}",
        ]


def auto_factory(chunks: int, code: str = "PQ64") -> str:
    """The IVF factory for ``chunks`` vectors with nlist inside FAISS's guideline (4..16 sqrt(n)): the power
    of two nearest 8 sqrt(n), an HNSW coarse quantizer, ``code`` codes."""
    nlist = 2 ** max(0, round(math.log2(max(8 * math.isqrt(max(chunks, 1)), 1))))
    return f"OPQ64_384,IVF{nlist}_HNSW32,{code}" if code == "PQ64" else f"IVF{nlist}_HNSW32,{code}"


def _train_flops(spec, points: int, *, two_level: bool | None = None) -> float:
    pq_m = round(spec.code_bytes * 8 / math.log2(spec.pq_ksub)) if spec.pq_ksub > 1 else 0
    return kmeans_flops(spec.nlist, points, spec.d, two_level=two_level, pq_m=pq_m, pq_ksub=spec.pq_ksub)


def predict(tokens: int, *, chunk_length: int = 64, dim: int = 384, factory: str = "OPQ64_384,IVF262144_HNSW32,PQ64",
            costs: UnitCosts | None = None, train_size: int | None = None) -> Prediction:
    """``factory`` ``auto``: :func:`auto_factory` for the datastore's chunk count; ``train_size``: the
    training sample (``build-dense --train-size``), by default what the factory needs (``good_train``)."""
    if tokens <= 0:
        raise ConfigError(f"`--tokens` must be positive, got {tokens}")
    if chunk_length <= 0:
        raise ConfigError(f"`--chunk-length` must be positive, got {chunk_length}")
    if dim <= 0:
        raise ConfigError(f"`--dim` must be positive, got {dim}")
    costs = costs or UnitCosts.load()
    chunks = -(-int(tokens) // chunk_length)
    if factory == "auto":
        factory = auto_factory(chunks)
    spec = parse_factory(factory, dim)
    index_bytes = spec.index_bytes(chunks)
    if train_size is not None and train_size <= 0:
        raise ConfigError(f"`--train-size` must be positive, got {train_size}")
    train_points = min(chunks, train_size or spec.good_train()) if spec.needs_training else 0
    flops = _train_flops(spec, train_points)  # CPU: two-level k-means from TWO_LEVEL_MIN_NLIST lists on
    gpu_flops = _train_flops(spec, train_points, two_level=False)  # GPU: flat k-means
    cores = max(costs.cpu_cores, 1)
    # measured rates are for the whole machine: per core-hour, multiply by its cores
    train_core_h = flops / costs.kmeans_flops_per_s_cpu * cores / 3600
    per_vector = cores / costs.add_vectors_per_s_cpu  # CPU-s, at add_log2_nlist lists
    if costs.add_cpu_s_per_log2_nlist and spec.nlist:
        per_vector = max(0.0, per_vector + costs.add_cpu_s_per_log2_nlist * (math.log2(spec.nlist) - costs.add_log2_nlist))
    add_core_h = chunks * per_vector / 3600
    return Prediction(
        tokens=int(tokens), chunks=chunks, factory=factory, dim=dim,
        embedding_bytes=chunks * dim * 2, index_bytes=index_bytes, search_ram_bytes=index_bytes,
        search_ram_ondisk_bytes=spec.fixed_bytes(),
        embed_gpu_hours=chunks / costs.embed_chunks_per_s_gpu / 3600,
        embed_cpu_core_hours=chunks / costs.embed_chunks_per_s_cpu * cores / 3600,
        train_cpu_core_hours=train_core_h, add_cpu_core_hours=add_core_h,
        faiss_gpu_hours=gpu_flops / costs.kmeans_flops_per_s_gpu / 3600 + add_core_h / cores / costs.gpu_speedup_faiss,
        train_points=train_points, train_flops=flops,
        build_peak_bytes=int(costs.build_fixed_bytes + costs.build_bytes_per_train_byte * train_points * spec.d_in * 4),
        costs=costs,
    )


# The rest of the stack (issue 19): datastore, dedup, suffix array, FM-index, the dense search of the
# neighbours job. Sizes are ratios measured on the shared corpora (python-docs + linux-docs + gcide,
# 72.1 MB of text) and re-derived from any built artifacts by ``stack_costs_from_artifacts``; rates
# are CPU-seconds measured on the development machine (BENCHMARKS.md, "Whole-stack plan").
STACK_COSTS_MEASURED: dict[str, Any] = {
    "machine": "2-core x86_64 VM, 24 GiB, no GPU (retromem development machine, under load)",
    "text_bytes_per_token": 3.60,  # normalized UTF-8 text per SmolLM2 token
    "datastore_bytes_per_token": 9.47,  # all files; scale curve 1x..16x (9.71, 9.50, 9.45: the fixed part shrinks)
    "documents_per_million_tokens": 371.0,
    "bloom_bytes_per_document": 35.3,  # LSHBloom (10 bands, fp 1e-5) + exact hashes (fp 1e-9)
    # build with dedup, whole process tree, pooled over the scale curve 1x, 4x, 16x (2.23, 2.22, 2.68 MB/CPU-s)
    "datastore_text_mb_per_cpu_s": 2.55,
    # the build's largest process (the driver: dedup's Bloom filters, one shard's arrays) and all of them together
    # (2 workers), shared corpora x1 (benchmarks/scale_curve.py); bounded by the shard size, not the datastore
    "datastore_build_peak_bytes": 643 * 2**20,  # largest at 1x; 418 MiB at 4x, 511 MiB at 16x
    "datastore_build_peak_all_bytes": 1234 * 2**20,
    # token streams + suffix array: 1.67 M tokens/CPU-s at 1x (21 M tokens, one shard), 1.30 M at 16x (six 64 M-token
    # shards); the indexer's make-part holds ~20 bytes per token of its part (1,221 MiB anonymous for a 64 M-token
    # shard at 16x, 230 MiB RSS for a 10.6 M-token part at 1x), the driver ~0.4 GiB anonymous
    "ngram_tokens_per_cpu_s": 1.4e6,
    "ngram_shard_tokens": 1_000_000_000,  # the build's default shard size
    "ngram_build_fixed_bytes": 0,
    "ngram_build_bytes_per_shard_token": 20.0,
    "ngram_count_ms_per_shard": 0.062,  # in-process binary search, p50, one shard
    "fm_bytes_per_text_byte": 0.402,  # zstd BWT blocks + checkpoints + 1/32 suffix-array samples
    "fm_text_mb_per_cpu_s": 4.6,
    "fm_build_bytes_per_text_byte": 14.4,  # divsufsort's suffix array + BWT in RAM (1,040 MiB for 72 MB)
    "fm_build_fixed_bytes": 0,  # the task's process before its shard: interpreter, datastore maps
    "fm_shard_text_bytes": 512 * 2**20,  # the build's default --shard-size
    "fm_count_ms": 0.07,  # p50, warm block tables
    # IVF list scanning: 2.2e7 PQ64 codes per CPU-second one query a call (IVF1024,PQ64, 200k vectors,
    # nprobe 64, 1 thread, loaded machine), i.e. 1.4 GB of codes; ADC cost grows with the code bytes
    "dense_code_bytes_per_cpu_s": 1.4e9,
    # on-disk lists: a query's probed lists hold this many times the mean list (queries fall where the data is
    # dense, and k-means lists there are fuller); measured by benchmarks/scale_curve.py --dense
    # real MiniLM vectors (18.7k, IVF1024, nprobe 32): 1.30 (1.57 at nprobe 1); stand-ins at 1e5 (IVF2048): 1.49
    "ivf_probed_list_ratio": 1.3,
}


@dataclass(frozen=True)
class StackCosts:
    machine: str
    text_bytes_per_token: float
    datastore_bytes_per_token: float
    documents_per_million_tokens: float
    bloom_bytes_per_document: float
    datastore_text_mb_per_cpu_s: float
    ngram_tokens_per_cpu_s: float
    ngram_shard_tokens: int
    ngram_build_fixed_bytes: int
    ngram_build_bytes_per_shard_token: float
    ngram_count_ms_per_shard: float
    fm_bytes_per_text_byte: float
    fm_text_mb_per_cpu_s: float
    fm_build_bytes_per_text_byte: float
    fm_shard_text_bytes: int
    fm_count_ms: float
    dense_code_bytes_per_cpu_s: float
    datastore_build_peak_bytes: int = STACK_COSTS_MEASURED["datastore_build_peak_bytes"]
    datastore_build_peak_all_bytes: int = STACK_COSTS_MEASURED["datastore_build_peak_all_bytes"]
    fm_build_fixed_bytes: int = 0
    ivf_probed_list_ratio: float = STACK_COSTS_MEASURED["ivf_probed_list_ratio"]

    @classmethod
    def load(cls, path: str | None = None) -> "StackCosts":
        """The shipped costs, overridden by the ``stack`` object of a unit-costs JSON file if it has one."""
        data = dict(STACK_COSTS_MEASURED)
        if path is not None:
            try:
                data.update(json.loads(Path(path).read_text()).get("stack", {}))
                return cls(**{k: data[k] for k in STACK_COSTS_MEASURED})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"--unit-costs {path}: cannot read its `stack` costs ({exc}); "
                                  f"expected keys {sorted(STACK_COSTS_MEASURED)}") from exc
        return cls(**data)


def stack_costs_from_artifacts(datastore: str | Path, fm: str | Path | None = None,
                               base: StackCosts | None = None) -> StackCosts:
    """Size ratios re-measured from built artifacts (every file's bytes), rates kept from ``base``. The
    suffix array needs no measuring: its bytes per token follow from the token width and the pointer
    size (``_ptr_bytes``), within 1% of built indexes."""
    from retromem.datastore import Datastore

    def tree_bytes(path: str | Path) -> int:
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())

    base = base or StackCosts.load()
    ds = Datastore.open(datastore)
    counts = ds.manifest["counts"]
    tokens, text, docs = int(counts["tokens"]), int(counts["text_bytes"]), int(counts["documents"])
    if tokens <= 0:
        raise ConfigError(f"{datastore} holds no tokens: nothing to measure")
    changes: dict[str, Any] = {
        "machine": f"sizes from {Path(datastore).name}" + (f", {Path(fm).name}" if fm else "")
                   + f"; rates from {base.machine}",
        "text_bytes_per_token": text / tokens, "datastore_bytes_per_token": tree_bytes(datastore) / tokens,
        "documents_per_million_tokens": docs / tokens * 1e6,
    }
    bloom = (ds.manifest.get("dedup") or {}).get("bloom_bytes_per_billion_documents")
    if bloom:
        changes["bloom_bytes_per_document"] = bloom / 1e9
    if fm is not None:
        changes["fm_bytes_per_text_byte"] = tree_bytes(fm) / max(text, 1)
    return StackCosts(**{**asdict(base), **changes})


def _fit_peak(shard_sizes: list[float], peaks: list[float], default_slope: float) -> tuple[int, float]:
    """(fixed bytes, bytes per unit of shard) of a build's peak memory against its shard size; with
    one shard size seen, the per-unit cost stays ``default_slope`` and the rest is fixed."""
    icpt, slope = _fit_line(shard_sizes, peaks)
    if slope == 0:
        slope = default_slope
        icpt = max(0.0, icpt - slope * float(np.mean(shard_sizes)))
    return int(icpt), slope


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through the points (slope 0 through their mean
    when every x is the same); never a negative intercept or slope."""
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        return float(y.mean()), 0.0
    slope, icpt = np.polyfit(x, y, 1)
    if icpt < 0:
        return 0.0, float((x * y).sum() / (x * x).sum())
    if slope < 0:
        return float(y.mean()), 0.0
    return float(icpt), float(slope)


def stack_costs_from_rows(rows_path: str | Path, base: StackCosts | None = None, *, max_tokens: float | None = None,
                          ngram_shard_tokens: int = 64_000_000, fm_shard_bytes: int = 128 * 2**20) -> StackCosts:
    """Unit costs measured by ``benchmarks/scale_curve.py`` (its rows JSONL): CPU rates pooled over every
    scale (total work / total CPU-seconds), bytes per token and per text byte likewise, peak memory per
    task fitted as fixed + per shard unit, count latency per shard from the query rows. ``max_tokens``
    keeps only the rows of scales up to that size, so a plan can be checked on a scale it did not see.
    The shard sizes are the ones the rows were built with (the script's defaults)."""
    base = base or StackCosts.load()
    try:
        rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--measure-from {rows_path}: cannot read the scale-curve rows ({exc})") from exc
    rows = [r for r in rows if r.get("stage") != "dense" and (max_tokens is None or r["tokens"] <= max_tokens)]
    by = {st: [r for r in rows if r.get("stage") == st] for st in ("datastore", "ngram", "fm", "query")}
    if not by["datastore"]:
        raise ConfigError(f"--measure-from {rows_path}: no datastore rows" + (f" up to {max_tokens:g} tokens" if max_tokens else ""))
    tot = lambda rs, k: float(sum(r[k] for r in rs))  # noqa: E731
    # a task's memory: its largest process, anonymous memory where the rows have it (RSS also counts the pages of
    # memory-mapped files, which the kernel drops: a driver that hashed a 3 GB datastore shows 2.2 GB of RSS, 0.4 anonymous)
    biggest = lambda r: (max(r["peak_anon_max_child"], r.get("peak_anon_driver", 0)) if r.get("peak_anon_max_child")  # noqa: E731
                         else max(r.get("peak_rss_max_child", 0), r.get("peak_rss_driver", 0)))
    ds, ng, fm, q = by["datastore"], by["ngram"], by["fm"], by["query"]
    ch: dict[str, Any] = {
        "machine": f"scale-curve rows {Path(rows_path).name} ({len(ds)} scale(s) up to {max(r['tokens'] for r in ds):,} tokens)",
        "text_bytes_per_token": tot(ds, "text_bytes") / tot(ds, "tokens"),
        "datastore_bytes_per_token": tot(ds, "disk_bytes") / tot(ds, "tokens"),
        "documents_per_million_tokens": tot(ds, "documents") / tot(ds, "tokens") * 1e6,
        "datastore_text_mb_per_cpu_s": tot(ds, "text_bytes") / 1e6 / tot(ds, "cpu_s"),
        "datastore_build_peak_bytes": int(max(biggest(r) for r in ds)),
        "datastore_build_peak_all_bytes": int(max(r["peak_rss_sum"] for r in ds)),
    }
    if ng:
        ch["ngram_tokens_per_cpu_s"] = tot(ng, "tokens") / tot(ng, "cpu_s")
        ch["ngram_shard_tokens"] = ngram_shard_tokens
        ch["ngram_build_fixed_bytes"], ch["ngram_build_bytes_per_shard_token"] = _fit_peak(
            [min(r["tokens"], ngram_shard_tokens) for r in ng], [biggest(r) for r in ng],
            base.ngram_build_bytes_per_shard_token)
    if fm:
        ch["fm_bytes_per_text_byte"] = tot(fm, "disk_bytes") / tot(fm, "text_bytes")
        ch["fm_text_mb_per_cpu_s"] = tot(fm, "text_bytes") / 1e6 / tot(fm, "cpu_s")
        ch["fm_shard_text_bytes"] = fm_shard_bytes
        ch["fm_build_fixed_bytes"], ch["fm_build_bytes_per_text_byte"] = _fit_peak(
            [min(r["text_bytes"], fm_shard_bytes) for r in fm], [biggest(r) for r in fm], base.fm_build_bytes_per_text_byte)
    if q:
        # a query's CPU time where the rows have it: its wall time on a loaded machine adds the waits for a core
        p50 = lambda t: t.get("cpu_p50_ms", t["p50_ms"])  # noqa: E731
        # and from the scales whose shards are full where there are any: a search in a 64 M-token suffix array
        # misses the caches more than one in a 21 M-token one (0.06 against 0.04 ms a shard, warm)
        full = [r for r in q if r["tokens"] >= ngram_shard_tokens] or q
        ch["ngram_count_ms_per_shard"] = float(np.median([p50(r["ngram_count"]) / r["ngram_shards"] for r in full]))
        fq = [r for r in q if "fm_count" in r]
        fq = [r for r in fq if r["text_bytes"] >= fm_shard_bytes] or fq
        if fq:
            ch["fm_count_ms"] = float(np.median([p50(r["fm_count"]) / r["fm_shards"] for r in fq]))
    return StackCosts(**{**asdict(base), **ch})


def dense_costs_from_rows(rows_path: str | Path, base: UnitCosts | None = None, *,
                          max_tokens: float | None = None) -> UnitCosts:
    """FAISS's build costs from the dense rows of ``benchmarks/scale_curve.py --dense`` (IVF<nlist>_HNSW32,PQ<m>
    over n vectors, trained as ``index build-dense`` trains): vectors added and k-means FLOPs (as
    :func:`retromem.index.dense_faiss.kmeans_flops` counts them) per CPU-second, pooled over the rows
    (total work / total CPU-seconds; the add cost per vector as a line in log2(nlist) where the rows have
    several list counts and it rises with them), and the build's peak memory fitted as fixed + per byte of the float32
    training sample (the largest step of a build is its training). The rows ran at one thread; the shipped rates are for the whole machine, so
    they are multiplied by its cores. ``max_tokens`` keeps the rows of up to that many tokens (64 per
    vector); without dense rows the costs are ``base``."""
    base = base or UnitCosts.load()
    try:
        rows = [json.loads(line) for line in Path(rows_path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--measure-from {rows_path}: cannot read the scale-curve rows ({exc})") from exc
    dense = [r for r in rows if r.get("stage") == "dense" and (max_tokens is None or r["tokens"] <= max_tokens)]
    if not dense:
        return base
    need = ("n", "nlist", "pq_bytes", "train_points", "train_cpu_s", "add_cpu_s")
    for r in dense:
        missing = [k for k in need if k not in r] + ([] if "build_maxrss" in r or "peak_rss" in r else ["peak_rss"])
        if missing:
            raise ConfigError(f"--measure-from {rows_path}: a dense row ({r.get('n', '?')} vectors) lacks {', '.join(missing)}")
    cores = max(base.cpu_cores, 1)
    spec = lambda r: parse_factory(f"IVF{r['nlist']}_HNSW32,PQ{r['pq_bytes']}", int(r.get("dim", 384)))  # noqa: E731
    flops = sum(_train_flops(spec(r), int(r["train_points"])) for r in dense)
    # CPU-s per vector added against log2(nlist): the coarse assignment searches an HNSW graph over the lists
    x = [math.log2(r["nlist"]) for r in dense]
    slope, icpt = (np.polyfit(x, [r["add_cpu_s"] / r["n"] for r in dense], 1) if len(set(x)) > 1 else (0.0, 0.0))
    add_rate = sum(r["n"] for r in dense) / sum(r["add_cpu_s"] for r in dense) * cores  # pooled, without an nlist term
    ref = 0.0
    if slope > 0:
        ref = max(x)
        add_rate = cores / (icpt + slope * ref)
    fixed, per_byte = _fit_peak([int(r["train_points"]) * spec(r).d_in * 4 for r in dense],
                                [int(r["build_maxrss"] if "build_maxrss" in r else r["peak_rss"]) for r in dense], 1.0)
    return dataclasses.replace(
        base, machine=f"{base.machine}; FAISS from {len(dense)} dense row(s) of {Path(rows_path).name} "
                      f"(up to {max(r['n'] for r in dense):,} vectors, 1 thread)",
        add_vectors_per_s_cpu=add_rate, add_cpu_s_per_log2_nlist=slope if ref else 0.0, add_log2_nlist=ref,
        kmeans_flops_per_s_cpu=flops / sum(r["train_cpu_s"] for r in dense) * cores,
        build_fixed_bytes=fixed, build_bytes_per_train_byte=per_byte)


def _ptr_bytes(tokens: int, width: int) -> int:
    """infini-gram's suffix-array pointer size: bytes enough to address the shard's token stream."""
    return max(1, math.ceil(math.log2(max(tokens * width, 2)) / 8))


@dataclass(frozen=True)
class StackPrediction:
    tokens: int
    documents: int
    text_bytes: int
    datastore_bytes: int
    datastore_cpu_core_hours: float
    datastore_build_peak_bytes: int  # the largest process of the build
    bloom_ram_bytes: int
    ngram_shards: int
    ngram_bytes: int
    ngram_cpu_core_hours: float
    ngram_build_peak_bytes: int
    ngram_count_ms: float  # every shard searched in turn by one query
    fm_bytes: int
    fm_shards: int
    fm_cpu_core_hours: float
    fm_build_peak_bytes: int
    ivf_nlist_range: tuple[int, int]  # FAISS's guideline, 4 sqrt(n) .. 16 sqrt(n)
    ivf_nlist_ok: bool
    ivf_bytes_read_per_query: int  # inverted-list bytes one query scans at --nprobe (on-disk lists)
    ivf_nlist_suggested: int  # the power of two nearest 8 sqrt(n)
    dense_query_cpu_ms: float  # list scanning alone, one query
    neighbours_cpu_core_hours: float
    total_cpu_core_hours: float
    costs: StackCosts


def predict_stack(dense: Prediction, *, nprobe: int = 64, costs: StackCosts | None = None,
                  token_width: int = 2) -> StackPrediction:
    """Every part of the stack for the datastore of ``dense``; CPU core-hours at the measured rates."""
    if nprobe <= 0:
        raise ConfigError(f"`--nprobe` must be positive, got {nprobe}")
    c = costs or StackCosts.load()
    t = dense.tokens
    text = int(t * c.text_bytes_per_token)
    docs = max(1, int(t * c.documents_per_million_tokens / 1e6))
    shards = max(1, math.ceil(t / c.ngram_shard_tokens))
    shard_tokens = min(t, c.ngram_shard_tokens)  # the build fills each shard to the limit: the largest one sets the peak
    ngram_bytes = int(t * (token_width + _ptr_bytes(shard_tokens, token_width)) + docs * 8)
    spec = parse_factory(dense.factory, dense.dim)
    chunks = dense.chunks
    lo, hi = 4 * math.isqrt(chunks), 16 * math.isqrt(chunks)
    per_list = chunks / spec.nlist if spec.nlist else chunks
    # codes one query compares: its probed lists are fuller than the mean list (measured ratio)
    scanned = min(nprobe, spec.nlist) * per_list * c.ivf_probed_list_ratio if spec.nlist else chunks
    read = int(scanned * (spec.code_bytes + 8))  # codes and their ids
    query_s = scanned * spec.code_bytes / c.dense_code_bytes_per_cpu_s
    ds_h = text / 1e6 / c.datastore_text_mb_per_cpu_s / 3600
    ng_h = t / c.ngram_tokens_per_cpu_s / 3600
    fm_h = text / 1e6 / c.fm_text_mb_per_cpu_s / 3600
    fm_shards = max(1, math.ceil(text / c.fm_shard_text_bytes))
    nb_h = chunks * query_s / 3600  # one search per chunk
    total = ds_h + ng_h + fm_h + nb_h + dense.embed_cpu_core_hours + dense.train_cpu_core_hours + dense.add_cpu_core_hours
    return StackPrediction(
        tokens=t, documents=docs, text_bytes=text, datastore_bytes=int(t * c.datastore_bytes_per_token),
        datastore_cpu_core_hours=ds_h, datastore_build_peak_bytes=int(c.datastore_build_peak_bytes), bloom_ram_bytes=int(docs * c.bloom_bytes_per_document),
        ngram_shards=shards, ngram_bytes=ngram_bytes, ngram_cpu_core_hours=ng_h,
        ngram_build_peak_bytes=int(c.ngram_build_fixed_bytes + shard_tokens * c.ngram_build_bytes_per_shard_token),
        ngram_count_ms=shards * c.ngram_count_ms_per_shard,
        fm_bytes=int(text * c.fm_bytes_per_text_byte), fm_shards=fm_shards, fm_cpu_core_hours=fm_h,
        fm_build_peak_bytes=int(c.fm_build_fixed_bytes + math.ceil(text / fm_shards) * c.fm_build_bytes_per_text_byte),
        ivf_nlist_range=(lo, hi), ivf_nlist_ok=bool(spec.nlist) and lo <= spec.nlist <= hi,
        ivf_bytes_read_per_query=read, ivf_nlist_suggested=2 ** round(math.log2(max(8 * math.isqrt(chunks), 1))),
        dense_query_cpu_ms=query_s * 1e3, neighbours_cpu_core_hours=nb_h, total_cpu_core_hours=total, costs=c,
    )


def gb(b: float) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{int(b)} B"


def describe_stack(p: StackPrediction, dense: Prediction, nprobe: int) -> list[str]:
    spec = parse_factory(dense.factory, dense.dim)
    lo, hi = p.ivf_nlist_range
    nlist_note = (f"nlist {spec.nlist:,} is inside FAISS's range {lo:,}..{hi:,}" if p.ivf_nlist_ok
                  else f"nlist {spec.nlist:,} is OUTSIDE FAISS's range {lo:,}..{hi:,} (4..16 sqrt(n)) for {dense.chunks:,} "
                  f"vectors: use IVF{p.ivf_nlist_suggested}" if spec.nlist else "not an IVF index")
    return [
        f"text        {gb(p.text_bytes)} normalized, {p.documents:,} documents; datastore on disk {gb(p.datastore_bytes)}, "
        f"build {p.datastore_cpu_core_hours:,.1f} CPU core-hours, peak {gb(p.datastore_build_peak_bytes)} (largest process)",
        f"dedup       Bloom filters {gb(p.bloom_ram_bytes)} of RAM for the whole build",
        f"suffix arr. {p.ngram_shards:,} shard(s), {gb(p.ngram_bytes)}, build {p.ngram_cpu_core_hours:,.1f} CPU core-hours, "
        f"peak {gb(p.ngram_build_peak_bytes)} per shard; count fans out to every shard: ~{p.ngram_count_ms:.2f} ms",
        f"FM-index    {p.fm_shards:,} shard(s), {gb(p.fm_bytes)}, build {p.fm_cpu_core_hours:,.1f} CPU core-hours, "
        f"peak {gb(p.fm_build_peak_bytes)} per shard; count fans out to every shard: ~{p.fm_shards * p.costs.fm_count_ms:.2f} ms",
        f"dense IVF   {nlist_note}; on-disk lists: {gb(p.ivf_bytes_read_per_query)} read per query at nprobe={nprobe} "
        f"(~{p.dense_query_cpu_ms:,.2f} CPU-ms scanning)",
        f"neighbours  {p.neighbours_cpu_core_hours:,.1f} CPU core-hours (one search per chunk at nprobe={nprobe})",
        f"total       {p.total_cpu_core_hours:,.0f} CPU core-hours for datastore, embeddings, dense, n-gram, FM and neighbours",
        f"stack costs {p.costs.machine}",
    ]


def plot_plan(path: str, *, chunk_length: int, dim: int, factory: str, costs: UnitCosts | None = None) -> None:
    """Predicted bytes and GPU-hours from 1e6 to 1e13 tokens, log-log, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toks = np.logspace(6, 13, 29)
    preds = [predict(int(t), chunk_length=chunk_length, dim=dim, factory=factory, costs=costs) for t in toks]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.loglog(toks, [p.embedding_bytes for p in preds], label="embeddings (float16)")
    a.loglog(toks, [p.index_bytes for p in preds], label=f"index {factory}")
    a.loglog(toks, [p.search_ram_ondisk_bytes for p in preds], "--", label="search RAM, on-disk lists")
    a.set_xlabel("datastore tokens")
    a.set_ylabel("bytes")
    a.set_title(f"size ({chunk_length}-token chunks, {dim} dims)")
    a.grid(True, which="both", alpha=0.3)
    a.legend()
    b.loglog(toks, [p.embed_gpu_hours for p in preds], label="embed, GPU-hours")
    b.loglog(toks, [p.faiss_gpu_hours for p in preds], label="FAISS train+add, GPU-hours")
    b.loglog(toks, [p.embed_cpu_core_hours for p in preds], "--", label="embed, CPU core-hours (measured)")
    b.set_xlabel("datastore tokens")
    b.set_ylabel("hours")
    b.set_title("build time")
    b.grid(True, which="both", alpha=0.3)
    b.legend()
    fig.suptitle(f"retromem plan: unit costs from {costs.machine if costs else UNIT_COSTS_MEASURED['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure_unit_costs(embedder: str = "all-minilm-l6-v2", n_embed: int = 256, n_add: int = 200_000) -> UnitCosts:
    """Measure embedding chunks/s (real demo text), FAISS IVF add vectors/s and k-means FLOP/s here."""
    import faiss

    from retromem.index.embed import Embedder, cpu_count
    from retromem.assets import demo_corpus
    import gzip

    with gzip.open(demo_corpus(), "rt", encoding="utf-8") as fh:
        text = " ".join(json.loads(line)["text"] for line in fh)
    words = text.split()
    texts = [" ".join(words[i : i + 48]) for i in range(0, 48 * n_embed, 48)]
    emb = Embedder(embedder)
    emb.encode(texts[:16])
    t0 = time.perf_counter()
    emb.encode(texts)
    embed_rate = len(texts) / (time.perf_counter() - t0)
    gpu = emb.device.startswith("cuda")

    d, nlist = 384, 1024
    rng = np.random.default_rng(0)
    xt = rng.standard_normal((nlist * 39, d)).astype(np.float32)
    index = faiss.index_factory(d, f"IVF{nlist},PQ64", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.train(xt)
    train_s = time.perf_counter() - t0
    # IVF k-means (10 iterations) plus PQ training (64 sub-quantizers x 256 centroids x 6 dims, 25 iterations)
    flops = 10 * len(xt) * nlist * d * 2 + 25 * min(len(xt), 65536) * 256 * d * 2
    xb = rng.standard_normal((n_add, d)).astype(np.float32)
    t0 = time.perf_counter()
    index.add(xb)
    add_rate = n_add / (time.perf_counter() - t0)
    return UnitCosts(
        machine=f"{platform.machine()} {platform.node()}, {cpu_count()} cores" + (", GPU" if gpu else ", no GPU"),
        embed_chunks_per_s_cpu=embed_rate if not gpu else UNIT_COSTS_MEASURED["embed_chunks_per_s_cpu"],
        embed_chunks_per_s_gpu=embed_rate if gpu else UNIT_COSTS_MEASURED["embed_chunks_per_s_gpu"],
        embed_gpu_measured=gpu, add_vectors_per_s_cpu=add_rate, kmeans_flops_per_s_cpu=flops / train_s,
        kmeans_flops_per_s_gpu=UNIT_COSTS_MEASURED["kmeans_flops_per_s_gpu"],
        gpu_speedup_faiss=UNIT_COSTS_MEASURED["gpu_speedup_faiss"], gpu_speedup_measured=False, cpu_cores=cpu_count(),
    )
