"""Building a dense index: FAISS over a datastore's chunk embeddings, resumably, shard by shard.

``build_dense`` reads the float16 embeddings written by :mod:`retromem.index.embed`, trains the index
given by a FAISS factory string (or one chosen from a memory budget) on a sample sized for it,
and adds the vectors in batches with ``chunk_id`` as the FAISS id. The vectors are split into
index shards of contiguous chunk ranges, each written atomically and recorded, so a killed build
re-run continues with the next shard; the output directory is a job of
:mod:`retromem.datastore.job` (locked, done-markers, never deleting what is not a dense index). IVF shards share one trained quantizer and can instead be
merged on disk into one index (``faiss.contrib.ondisk``), whose inverted lists are memory-mapped.
After the build, :func:`retromem.index.dense_eval.tune` picks the search parameter for a target
recall. ``index.json`` records the datastore and the embedder the index was built from.

Metric: the embedder's recorded similarity (cosine: inner product over L2-normalised vectors; dot:
inner product; euclidean: L2), :func:`retromem.index.embed.faiss_metric`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retromem.config import boolean, fail, integer, number, one_of, optional_positive_int, positive_int
from retromem.datastore.atomic import write_json
from retromem.datastore.integrity import read_manifest
from retromem.datastore.job import Job, open_job
from retromem.diskspace import preflight
from retromem.errors import ConfigError, IndexFormatError
from retromem.index.dense_eval import tune
from retromem.index.dense_faiss import (INDEX_FORMAT, default_search_params, has_search_param, no_polysemous_training,
                                        read_index, to_gpu, train_ivf, use_gpu, write_index)
from retromem.index.embed import Embeddings, faiss_metric, index_similarity
from retromem.index.factory import AutoChoice, choose_factory, parse_factory
from retromem.index.types import DenseBuildResult, portable_meta, record_path, resolve_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseBuildConfig:
    """What to build: the index over ``embeddings`` in ``out``, its FAISS ``factory`` (or ``auto``
    within ``memory_budget``), shard size, optional on-disk merge, and the tuning after the build."""

    embeddings: str
    out: str
    factory: str = "auto"
    memory_budget: int | None = None  # bytes; the auto choice must fit it
    target_recall: float = 0.95
    train_size: int | None = None  # default: what the factory needs (256 points per centroid)
    add_batch: int = 65536
    shard_vectors: int = 50_000_000  # vectors per index shard
    merge: str = "none"  # none | ondisk  (IVF only: merge shards into one on-disk index)
    gpu: bool | None = None  # None: use a GPU when faiss-gpu sees one
    tune: bool = True  # find nprobe/efSearch for target_recall after the build
    tune_queries: int = 500
    seed: int = 0
    executor: str = "local"  # where shards are added: local processes, or one Ray task per shard
    workers: int = 1  # shards added at once (local); Ray: CPUs of a local Ray (0: all)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory:
            fail("factory", "be a FAISS factory string or auto", self.factory, flag="--factory")
        optional_positive_int(self.memory_budget, "memory_budget", flag="--memory-budget")
        number(self.target_recall, "target_recall", gt=0, le=1, flag="--target-recall")
        optional_positive_int(self.train_size, "train_size", flag="--train-size")
        positive_int(self.add_batch, "add_batch")
        positive_int(self.shard_vectors, "shard_vectors", flag="--shard-vectors")
        one_of(self.merge, "merge", ("none", "ondisk"), flag="--merge")
        if self.gpu is not None:
            boolean(self.gpu, "gpu", flag="--gpu")
        boolean(self.tune, "tune", flag="--tune")
        positive_int(self.tune_queries, "tune_queries")
        integer(self.seed, "seed")
        one_of(self.executor, "executor", ("local", "ray"), flag="--executor")
        integer(self.workers, "workers", ge=0, flag="--workers")


def _new_index(factory: str, d: int, similarity: str = "cosine"):
    import faiss

    try:
        index = faiss.index_factory(d, factory, faiss_metric(similarity))
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build factory {factory!r} for dimension {d}: {str(exc).splitlines()[-1]}") from exc
    if _has_ivf(index):
        no_polysemous_training(index)  # a fixed ~55 CPU-s for codes no search here reads as Hamming codes
        return index  # inverted lists store the ids themselves
    return faiss.IndexIDMap(index)  # flat and graph indexes keep chunk_ids in an id map


def _has_ivf(index) -> bool:
    import faiss

    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _train(index, xt: np.ndarray, gpu: bool) -> None:
    import faiss

    if gpu and _has_ivf(index):
        # the FAISS recipe (bench_gpu_1bn): k-means of the coarse quantizer on the GPU(s)
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        index.train(xt)
        return
    # on CPU, two-level k-means from TWO_LEVEL_MIN_NLIST lists on (flat k-means there is ~sqrt(nlist)/2 x the FLOPs)
    train_ivf(index, xt)


def _shard_marker(i: int) -> str:
    return f"shard-{i:05d}.done"  # _work/shard-00000.done.json


# ---------------------------------------------------------------------------------------------
# build


def _add_shard(ctx: tuple, item: tuple[int, int, int]) -> dict[str, Any]:
    """One shard: the trained index with vectors [lo, hi) added, written to ``shard-NNNNN.index`` (a step
    of ``Job.map``: any process, or any Ray node)."""
    import faiss

    emb_path, out, trained_path, add_batch, gpu = ctx
    i, lo, hi = item
    emb = Embeddings(emb_path)
    index = read_index(Path(trained_path))
    gindex = to_gpu(index) if gpu else None
    target = gindex if gindex is not None else index
    for start, block in emb.iter_blocks(lo, hi, add_batch):
        target.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
    if gindex is not None:
        index = faiss.index_gpu_to_cpu(gindex)
    path = Path(out) / f"shard-{i:05d}.index"
    write_index(index, path)
    return {"shard": i, "file": path.name, "first_chunk_id": lo, "ntotal": int(index.ntotal), "bytes": path.stat().st_size}


def build_dense(cfg: DenseBuildConfig, *, overwrite: bool = False, progress: bool = True) -> DenseBuildResult:
    """Build (or resume building) the dense index ``cfg.out`` from the embeddings ``cfg.embeddings``.

    The output directory is a job (:func:`retromem.datastore.job.open_job`, kind ``dense-index``):
    locked while the build runs, and ``overwrite`` only ever empties a dense index.
    """
    t_all = time.perf_counter()
    emb = Embeddings(cfg.embeddings)
    with open_job(cfg.out, "dense-index", overwrite=overwrite, legacy=("index.json", "_work/plan.json")) as job:
        return _build(cfg, emb, job, t_all, progress)


def _build(cfg: DenseBuildConfig, emb: Embeddings, job: Job, t_all: float, progress: bool) -> DenseBuildResult:
    import faiss
    from tqdm.auto import tqdm

    seconds: dict[str, float] = {}
    n, d = emb.num_vectors, emb.dim
    out = job.path
    if (out / "index.json").exists():
        meta = read_manifest(out / "index.json")
        if meta.get("complete") and meta.get("datastore_id") == emb.datastore_id and meta.get("build", {}).get("requested_factory") == cfg.factory:
            return DenseBuildResult(out, meta, {"total": 0.0})
        raise IndexFormatError(f"{out} already holds a dense index ({meta.get('factory')}); pass --overwrite or another --out")

    # 1. the factory and the plan, fixed on the first run so a resumed run continues the same build
    plan = job.done("plan")
    if plan is not None:
        if plan["embeddings_datastore_id"] != emb.datastore_id or plan["requested_factory"] != cfg.factory:
            raise IndexFormatError(f"{out} holds an unfinished build of another index ({plan['factory']} over "
                                   f"{plan['embeddings_datastore_id'][:16]}); pass --overwrite or another --out")
        logger.info("build-dense: resuming %s", plan["factory"])
    else:
        if cfg.factory == "auto":
            if cfg.memory_budget is None:
                raise ConfigError("`--factory auto` needs `--memory-budget` (for example 2GiB)")
            choice = choose_factory(n, d, cfg.memory_budget, cfg.target_recall)
        else:
            spec = parse_factory(cfg.factory, d)
            choice = AutoChoice(cfg.factory, "given by --factory", spec.index_bytes(n), ())
        spec = parse_factory(choice.factory, d)
        n_shards = max(1, math.ceil(n / cfg.shard_vectors))
        bounds = np.linspace(0, n, n_shards + 1).astype(np.int64).tolist()
        plan = {"factory": choice.factory, "requested_factory": cfg.factory, "reason": choice.reason,
                "estimated_bytes": choice.estimated_bytes, "candidates": [list(c) for c in choice.candidates],
                "embeddings_datastore_id": emb.datastore_id, "shards": [[bounds[i], bounds[i + 1]] for i in range(n_shards)],
                "needs_training": spec.needs_training, "min_train": spec.min_train(), "good_train": spec.good_train()}
        job.mark_done("plan", plan)
    factory = plan["factory"]
    logger.info("build-dense: %s for %d vectors of dimension %d: %s", factory, n, d, plan["reason"])
    # the shards, and with an on-disk merge the merged lists beside them
    preflight(out, int(plan["estimated_bytes"]) * (2 if cfg.merge == "ondisk" else 1) + 2**20, "the dense index build")
    gpu = use_gpu(cfg.gpu)

    # 2. train once (IVF centroids, PQ codebooks, OPQ rotation) on a uniform sample
    trained_path = out / "trained.index"
    train_info = job.done("trained")
    if train_info is None or not trained_path.exists():
        t0 = time.perf_counter()
        index = _new_index(factory, d, index_similarity(emb.manifest))
        size = 0
        if plan["needs_training"]:
            size = min(n, cfg.train_size or plan["good_train"])
            if size < plan["min_train"]:
                raise ConfigError(
                    f"factory {factory!r} needs at least {plan['min_train']:,} training vectors "
                    f"(39 per centroid) but {'--train-size is' if cfg.train_size else 'the datastore has'} {size:,}: "
                    "use fewer IVF lists / PQ bits, a bigger datastore, or --factory auto")
            _, xt = emb.sample(size, seed=cfg.seed)
            logger.info("build-dense: training on %d vectors", size)
            _train(index, xt, gpu)
        write_index(index, trained_path)
        train_info = {"train_size": size, "seconds": time.perf_counter() - t0}
        job.mark_done("trained", train_info)
    seconds["train"] = train_info["seconds"]

    # 3. add, one task per shard (local processes or Ray: each reads the trained index and its range of
    # the embeddings and writes its shard file, atomically; on Ray both must be on storage every node
    # sees); the driver records each shard done as it arrives, so a killed build resumes
    from retromem.datastore.executors import make_executor

    t0 = time.perf_counter()
    items = [(i, lo, hi) for i, (lo, hi) in enumerate(plan["shards"])
             if job.done(_shard_marker(i)) is None or not (out / f"shard-{i:05d}.index").exists()]
    for i, _, _ in items:  # a marker without its file (deleted by hand): redo the shard
        job.marker(_shard_marker(i)).unlink(missing_ok=True)
    bar = tqdm(total=sum(hi - lo for _, lo, hi in items), unit="vec", desc="add", disable=not progress or not items)
    ctx = (str(emb.path), str(out), str(trained_path), cfg.add_batch, bool(gpu))
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    recs = {}
    for item, rec in job.map(executor, _add_shard, ctx, [(i, lo, hi) for i, (lo, hi) in enumerate(plan["shards"])],
                             marker=lambda it: _shard_marker(it[0])):
        recs[item[0]] = rec
        if item in items:
            bar.update(item[2] - item[1])
    bar.close()
    shard_recs = [recs[i] for i in range(len(plan["shards"]))]
    seconds["add"] = time.perf_counter() - t0

    # 4. optional on-disk merge of IVF shards into one index with memory-mapped inverted lists
    merged = None
    if cfg.merge == "ondisk":
        t0 = time.perf_counter()
        merged = _merge_ondisk(out, trained_path, shard_recs, factory, d)
        seconds["merge"] = time.perf_counter() - t0

    meta = {
        "format_version": INDEX_FORMAT,
        "complete": True,
        "kind": "dense",
        "factory": factory,
        "reason": plan["reason"],
        "metric": "l2" if index_similarity(emb.manifest) == "euclidean" else "inner_product",
        "dim": d,
        "ntotal": n,
        "estimated_bytes": plan["estimated_bytes"],
        "index_bytes": sum(r["bytes"] for r in shard_recs) if merged is None else merged["bytes"],
        "datastore_id": emb.datastore_id,
        # relative to the index, so that a moved tree of datastore + indexes still opens
        "datastore_path": record_path(resolve_path(emb.path, emb.manifest["datastore_path"]), out),
        "embedder": emb.manifest["embedder"],
        "embeddings_path": record_path(cfg.embeddings, out),
        "shards": shard_recs,
        "merged": merged,
        "search_defaults": default_search_params(factory, d),
        "build": {"requested_factory": cfg.factory, "memory_budget": cfg.memory_budget, "train_size": train_info["train_size"],
                  "gpu": gpu, "candidates": plan["candidates"], "target_recall": cfg.target_recall},
        "tuning": None,
    }
    meta = job.seal("index.json", meta)  # with every file's size and checksum (tuning rewrites only index.json)
    if cfg.tune and (has_search_param(factory, "nprobe", d) or has_search_param(factory, "efSearch", d)):
        t0 = time.perf_counter()
        report = tune(out, target_recall=cfg.target_recall, n_queries=cfg.tune_queries, seed=cfg.seed + 1)
        meta = report.meta
        seconds["tune"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    meta["build"]["seconds"] = seconds
    meta = portable_meta(meta, out)  # tuning returns the in-process meta, with absolute paths
    write_json(out / "index.json", meta)
    job.clear_work()
    return DenseBuildResult(out, meta, seconds)


def _merge_ondisk(out: Path, trained_path: Path, shard_recs: list[dict], factory: str, d: int) -> dict[str, Any]:
    from faiss.contrib.ondisk import merge_ondisk

    if parse_factory(factory, d).nlist == 0:
        raise ConfigError(f"`--merge ondisk` works for IVF indexes only, not {factory!r}")
    index = read_index(trained_path)
    ivfdata = out / "merged.ivfdata"
    merge_ondisk(index, [str(out / r["file"]) for r in shard_recs], str(ivfdata))
    path = out / "merged.index"
    write_index(index, path)
    for r in shard_recs:  # the shards' lists now live in merged.ivfdata
        (out / r["file"]).unlink(missing_ok=True)
    return {"file": path.name, "ivfdata": ivfdata.name, "bytes": path.stat().st_size + ivfdata.stat().st_size,
            "ivfdata_bytes": ivfdata.stat().st_size}


