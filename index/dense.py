"""Dense indexes: FAISS over a datastore's chunk embeddings, built resumably, searched in batches.

``build_dense`` reads the float16 embeddings written by :mod:`retromem.index.embed`, trains the index
given by a FAISS factory string (or one chosen from a memory budget) on a sample sized for it,
and adds the vectors in batches with ``chunk_id`` as the FAISS id. The vectors are split into
index shards of contiguous chunk ranges, each written atomically and recorded, so a killed build
re-run continues with the next shard. Shards are searched together and merged by score (as
MassiveDS does); IVF shards share one trained quantizer and can instead be merged on disk into
one index (``faiss.contrib.ondisk``), whose inverted lists are memory-mapped.

``DenseIndex.open(path).search(...)`` takes texts (embedded with the recorded model) or vectors,
excludes given documents per query while still returning ``k`` hits, and can fetch each hit's
text, tokens and continuation from the datastore. The index directory records the datastore and
the embedder it was built from, and refuses to serve another.

Metric: inner product over L2-normalised vectors, i.e. cosine similarity.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retromem.datastore.atomic import atomic_path, read_json, write_json
from retromem.index.embed import Embedder, Embeddings
from retromem.index.factory import AutoChoice, choose_factory, parse_factory
from retromem.index.types import ChunkPayload, fetch_payloads
from retromem.errors import ConfigError, DatastoreError, IndexFormatError, QueryError

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
MAX_K = 4096


def _faiss():
    import faiss

    return faiss


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


# ---------------------------------------------------------------------------------------------
# build


@dataclass
class DenseBuildConfig:
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

    def __post_init__(self) -> None:
        if self.add_batch <= 0:
            raise ConfigError(f"`add_batch` must be positive, got {self.add_batch}")
        if self.shard_vectors <= 0:
            raise ConfigError(f"`--shard-vectors` must be positive, got {self.shard_vectors}")
        if self.merge not in ("none", "ondisk"):
            raise ConfigError(f"`--merge` must be none or ondisk, got {self.merge!r}")
        if not 0 < self.target_recall <= 1:
            raise ConfigError(f"`--target-recall` must be in (0, 1], got {self.target_recall}")
        if self.train_size is not None and self.train_size <= 0:
            raise ConfigError(f"`--train-size` must be positive, got {self.train_size}")


@dataclass(frozen=True)
class DenseBuildResult:
    out: Path
    meta: dict[str, Any]
    seconds: dict[str, float]


def _use_gpu(flag: bool | None) -> bool:
    n = gpu_count()
    if flag and n == 0:
        raise ConfigError("`--gpu` was asked for but FAISS sees no GPU (install faiss-gpu on a CUDA machine)")
    return n > 0 if flag is None else bool(flag)


def _new_index(factory: str, d: int):
    faiss = _faiss()
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build factory {factory!r} for dimension {d}: {str(exc).splitlines()[-1]}") from exc
    if _has_ivf(index):
        return index  # inverted lists store the ids themselves
    return faiss.IndexIDMap(index)  # flat and graph indexes keep chunk_ids in an id map


def _has_ivf(index) -> bool:
    faiss = _faiss()
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def _train(index, xt: np.ndarray, gpu: bool) -> None:
    faiss = _faiss()
    if gpu and _has_ivf(index):
        # the FAISS recipe (bench_gpu_1bn): k-means of the coarse quantizer on the GPU(s)
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(xt)


def _write_index(index, path: Path) -> None:
    faiss = _faiss()
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _read_index(path: Path, mmap: bool = False):
    faiss = _faiss()
    if not path.is_file():
        raise IndexFormatError(f"index file {path} is missing: rebuild with `retromem index build-dense`")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as exc:
        raise IndexFormatError(f"index file {path} is truncated or corrupt ({str(exc).splitlines()[0][:200]}): "
                               "rebuild it with `retromem index build-dense`") from exc


def build_dense(cfg: DenseBuildConfig, *, overwrite: bool = False, progress: bool = True) -> DenseBuildResult:
    """Build (or resume building) the dense index ``cfg.out`` from the embeddings ``cfg.embeddings``."""
    from tqdm.auto import tqdm

    faiss = _faiss()
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    emb = Embeddings(cfg.embeddings)
    n, d = emb.num_vectors, emb.dim
    out = Path(cfg.out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    if (out / "index.json").exists():
        meta = read_json(out / "index.json")
        if meta.get("complete") and meta.get("datastore_id") == emb.datastore_id and meta.get("build", {}).get("requested_factory") == cfg.factory:
            return DenseBuildResult(out, meta, {"total": 0.0})
        raise IndexFormatError(f"{out} already holds a dense index ({meta.get('factory')}); pass --overwrite or another --out")

    # 1. the factory and the plan, fixed on the first run so a resumed run continues the same build
    work = out / "_work"
    plan_path = work / "plan.json"
    if plan_path.exists():
        plan = read_json(plan_path)
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
        work.mkdir(parents=True, exist_ok=True)
        write_json(plan_path, plan)
    factory = plan["factory"]
    logger.info("build-dense: %s for %d vectors of dimension %d: %s", factory, n, d, plan["reason"])
    gpu = _use_gpu(cfg.gpu)

    # 2. train once (IVF centroids, PQ codebooks, OPQ rotation) on a uniform sample
    trained_path = out / "trained.index"
    train_info = read_json(work / "trained.json") if (work / "trained.json").exists() else None
    if train_info is None or not trained_path.exists():
        t0 = time.perf_counter()
        index = _new_index(factory, d)
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
        _write_index(index, trained_path)
        train_info = {"train_size": size, "seconds": time.perf_counter() - t0}
        write_json(work / "trained.json", train_info)
    seconds["train"] = train_info["seconds"]

    # 3. add, shard by shard; each shard file is written atomically and recorded as done
    t0 = time.perf_counter()
    shard_recs: list[dict[str, Any]] = []
    todo = sum(hi - lo for i, (lo, hi) in enumerate(plan["shards"]) if not (work / f"shard-{i:05d}.done.json").exists())
    bar = tqdm(total=todo, unit="vec", desc="add", disable=not progress or todo == 0)
    for i, (lo, hi) in enumerate(plan["shards"]):
        done = work / f"shard-{i:05d}.done.json"
        path = out / f"shard-{i:05d}.index"
        if done.exists() and path.exists():
            shard_recs.append(read_json(done))
            continue
        index = _read_index(trained_path)
        gindex = _to_gpu(index) if gpu else None
        target = gindex if gindex is not None else index
        for start, block in emb.iter_blocks(lo, hi, cfg.add_batch):
            ids = np.arange(start, start + len(block), dtype=np.int64)
            target.add_with_ids(block, ids)
            bar.update(len(block))
        if gindex is not None:
            index = faiss.index_gpu_to_cpu(gindex)
        _write_index(index, path)
        rec = {"shard": i, "file": path.name, "first_chunk_id": lo, "ntotal": int(index.ntotal), "bytes": path.stat().st_size}
        write_json(done, rec)
        shard_recs.append(rec)
    bar.close()
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
        "metric": "inner_product",
        "dim": d,
        "ntotal": n,
        "estimated_bytes": plan["estimated_bytes"],
        "index_bytes": sum(r["bytes"] for r in shard_recs) if merged is None else merged["bytes"],
        "datastore_id": emb.datastore_id,
        "datastore_path": emb.manifest["datastore_path"],
        "embedder": emb.manifest["embedder"],
        "embeddings_path": str(Path(cfg.embeddings).resolve()),
        "shards": shard_recs,
        "merged": merged,
        "search_defaults": _default_params(factory, d),
        "build": {"requested_factory": cfg.factory, "memory_budget": cfg.memory_budget, "train_size": train_info["train_size"],
                  "gpu": gpu, "candidates": plan["candidates"], "target_recall": cfg.target_recall},
        "tuning": None,
    }
    write_json(out / "index.json", meta)
    if cfg.tune and (_has_param(factory, "nprobe", d) or _has_param(factory, "efSearch", d)):
        t0 = time.perf_counter()
        report = tune(out, target_recall=cfg.target_recall, n_queries=cfg.tune_queries, seed=cfg.seed + 1)
        meta = report.meta
        seconds["tune"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    meta["build"]["seconds"] = seconds
    write_json(out / "index.json", meta)
    shutil.rmtree(work, ignore_errors=True)
    return DenseBuildResult(out, meta, seconds)


def _to_gpu(index):
    """A GPU copy of ``index`` for adding/searching, or None where FAISS has no GPU version (HNSW)."""
    faiss = _faiss()
    try:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True
        return faiss.index_cpu_to_all_gpus(index, co)
    except (RuntimeError, AttributeError) as exc:
        logger.info("no GPU version of this index (%s); staying on CPU", str(exc).splitlines()[0][:120])
        return None


def _merge_ondisk(out: Path, trained_path: Path, shard_recs: list[dict], factory: str, d: int) -> dict[str, Any]:
    from faiss.contrib.ondisk import merge_ondisk

    if parse_factory(factory, d).nlist == 0:
        raise ConfigError(f"`--merge ondisk` works for IVF indexes only, not {factory!r}")
    index = _read_index(trained_path)
    ivfdata = out / "merged.ivfdata"
    merge_ondisk(index, [str(out / r["file"]) for r in shard_recs], str(ivfdata))
    path = out / "merged.index"
    _write_index(index, path)
    for r in shard_recs:  # the shards' lists now live in merged.ivfdata
        (out / r["file"]).unlink(missing_ok=True)
    return {"file": path.name, "ivfdata": ivfdata.name, "bytes": path.stat().st_size + ivfdata.stat().st_size,
            "ivfdata_bytes": ivfdata.stat().st_size}


# ---------------------------------------------------------------------------------------------
# search parameters


def _has_param(factory: str, name: str, d: int) -> bool:
    spec = parse_factory(factory, d)
    if name == "nprobe":
        return spec.nlist > 0
    return spec.hnsw_m > 0 or spec.coarse_hnsw_m > 0


def _default_params(factory: str, d: int) -> dict[str, int]:
    params = {}
    if _has_param(factory, "nprobe", d):
        params["nprobe"] = 16
    if _has_param(factory, "efSearch", d):
        params["efSearch"] = 64
    return params


def search_parameters(index, nprobe: int | None, ef_search: int | None):
    """A FAISS ``SearchParameters`` tree for ``index`` (IDMap, pre-transform, IVF with an HNSW
    quantizer, HNSW), so parameters travel with the call and threads never share mutable state."""
    faiss = _faiss()
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return search_parameters(index.index, nprobe, ef_search)
    if isinstance(index, faiss.IndexPreTransform):
        inner = search_parameters(index.index, nprobe, ef_search)
        if inner is None:
            return None
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        p._keep = inner  # keep the inner object alive as long as the outer one
        return p
    if isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        if nprobe is not None:
            p.nprobe = int(min(nprobe, index.nlist))
        else:
            p.nprobe = int(index.nprobe)
        q = faiss.downcast_index(index.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            # the coarse graph must return nprobe lists: efSearch below nprobe would starve it
            qp.efSearch = int(max(ef_search or 0, p.nprobe, q.hnsw.efSearch))
            p.quantizer_params = qp
            p._keep = qp
        return p
    if isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(ef_search if ef_search is not None else index.hnsw.efSearch)
        return p
    return None


# ---------------------------------------------------------------------------------------------
# search


@dataclass(frozen=True)
class SearchResult:
    """``chunk_ids`` (n, k) int64 and ``scores`` (n, k) float32 (cosine), best first. A row holds
    -1 / -inf only where the index has fewer than k eligible vectors under the search parameters.
    ``payloads[i][j]`` is hit (i, j) fetched from the datastore when asked for."""

    chunk_ids: np.ndarray
    scores: np.ndarray
    payloads: list[list[ChunkPayload]] | None = None


class DenseIndex:
    """A built dense index, opened for search (see the module docstring)."""

    def __init__(self, path: str | Path, *, datastore=None, mmap: bool = False, gpu: bool | None = False) -> None:
        self.path = Path(path)
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            hint = " (an unfinished build: re-run `retromem index build-dense`)" if (self.path / "_work").exists() else ""
            raise IndexFormatError(f"{self.path} is not a dense index: no index.json{hint}")
        try:
            self.meta = read_json(meta_path)
        except ValueError as exc:
            raise IndexFormatError(f"{meta_path} is corrupt: {exc}") from exc
        if self.meta.get("format_version") != INDEX_FORMAT or self.meta.get("kind") != "dense":
            raise IndexFormatError(f"{self.path} holds index format {self.meta.get('format_version')} "
                                   f"({self.meta.get('kind')}); this retromem reads dense format {INDEX_FORMAT}")
        self.dim = int(self.meta["dim"])
        self.ntotal = int(self.meta["ntotal"])
        self.factory = self.meta["factory"]
        self.defaults = dict(self.meta.get("search_defaults") or {})
        self._lock = threading.Lock()
        merged = self.meta.get("merged")
        files = [merged["file"]] if merged else [r["file"] for r in self.meta["shards"]]
        if merged and not (self.path / merged["ivfdata"]).is_file():
            raise IndexFormatError(f"{self.path / merged['ivfdata']} is missing: rebuild with `retromem index build-dense --merge ondisk`")
        if merged and (self.path / merged["ivfdata"]).stat().st_size != merged["ivfdata_bytes"]:
            raise IndexFormatError(f"{self.path / merged['ivfdata']} is truncated: expected {merged['ivfdata_bytes']} bytes")
        expect = {r["file"]: r["bytes"] for r in self.meta["shards"]}
        self._indexes = []
        for f in files:
            p = self.path / f
            if f in expect and p.is_file() and p.stat().st_size != expect[f]:
                raise IndexFormatError(f"index file {p} is {p.stat().st_size} bytes, expected {expect[f]}: "
                                       "truncated or replaced; rebuild with `retromem index build-dense`")
            if merged:
                # the merged index points at its .ivfdata by absolute path; read it from here
                idx = self._read_merged(p, self.path / merged["ivfdata"])
            else:
                idx = _read_index(p, mmap=mmap)
            self._indexes.append(idx)
        if sum(int(i.ntotal) for i in self._indexes) != self.ntotal:
            raise IndexFormatError(f"{self.path}: index files hold {sum(int(i.ntotal) for i in self._indexes)} vectors, "
                                   f"index.json says {self.ntotal}")
        self.gpu = _use_gpu(gpu)
        if self.gpu:
            self._indexes = [(_to_gpu(i) or i) for i in self._indexes]
        self._datastore = None
        if datastore is not None:
            self.attach_datastore(datastore)
        self._embedder: Embedder | None = None

    @staticmethod
    def _read_merged(path: Path, ivfdata: Path):
        faiss = _faiss()
        index = _read_index(path)  # its OnDiskInvertedLists memory-map the .ivfdata themselves
        ivf = faiss.extract_index_ivf(index)
        invlists = faiss.downcast_InvertedLists(ivf.invlists)
        if hasattr(invlists, "filename") and Path(invlists.filename).resolve() != ivfdata.resolve():
            # FAISS stores the absolute path of the on-disk lists in the index file
            raise IndexFormatError(f"{path} refers to {invlists.filename}, not {ivfdata}: an index merged on disk "
                                   "cannot be moved; re-run the build with --merge ondisk where it will live")
        return index

    @classmethod
    def open(cls, path: str | Path, **kwargs) -> "DenseIndex":
        return cls(path, **kwargs)

    # -- what it was built from ------------------------------------------------------------

    @property
    def datastore_id(self) -> str:
        return self.meta["datastore_id"]

    @property
    def datastore(self):
        """The datastore this index was built from (opened from the recorded path on first use)."""
        if self._datastore is None:
            from retromem.datastore import Datastore

            try:
                self.attach_datastore(Datastore.open(self.meta["datastore_path"]))
            except DatastoreError as exc:
                raise IndexFormatError(f"{self.path} was built from the datastore at {self.meta['datastore_path']}, "
                                       f"which cannot be opened ({exc}); pass datastore= to DenseIndex.open") from exc
        return self._datastore

    def attach_datastore(self, ds) -> None:
        if ds.datastore_id != self.datastore_id:
            raise IndexFormatError(f"{self.path} was built from datastore {self.datastore_id[:16]}, "
                                   f"not {ds.datastore_id[:16]} ({ds.path}): it will not serve another datastore")
        self._datastore = ds

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self.attach_embedder(Embedder(self.meta["embedder"]["name"]))
        return self._embedder

    def attach_embedder(self, embedder: Embedder) -> None:
        want = self.meta["embedder"]
        if embedder.info.weights_sha256 != want["weights_sha256"] or embedder.dim != want["dim"]:
            raise IndexFormatError(f"{self.path} was built with embedder {want['name']} "
                                   f"(sha256 {want['weights_sha256'][:12]}, {want['dim']} dims), not {embedder.info.name} "
                                   f"(sha256 {embedder.info.weights_sha256[:12]}, {embedder.dim} dims)")
        self._embedder = embedder

    # -- search --------------------------------------------------------------------------

    def _queries(self, queries) -> np.ndarray:
        if isinstance(queries, str):
            raise QueryError("`queries` must be a batch: a list of texts or an (n, dim) array, not one string")
        if isinstance(queries, np.ndarray) or (len(queries) and not isinstance(queries[0], str)):
            x = np.asarray(queries, dtype=np.float32)
            if x.ndim == 1:
                raise QueryError(f"query vectors must be 2-D (n, {self.dim}); got shape {x.shape}: wrap one vector as x[None]")
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise QueryError(f"query vectors have shape {x.shape}; this index takes (n, {self.dim})")
            if x.shape[0] == 0:
                raise QueryError("the query batch is empty")
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                raise QueryError(f"query vector {int(np.flatnonzero(bad)[0])} holds NaN or infinity")
            return np.ascontiguousarray(x)
        if len(queries) == 0:
            raise QueryError("the query batch is empty")
        return self.embedder.encode(list(queries))

    def _check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise QueryError(f"k must be an integer, got {k!r}")
        limit = min(MAX_K, self.ntotal)
        if not 1 <= k <= limit:
            raise QueryError(f"k must be in 1..{limit}, got {k}")
        return int(k)

    def _raw_search(self, x: np.ndarray, k: int, nprobe: int | None, ef_search: int | None) -> tuple[np.ndarray, np.ndarray]:
        nprobe = self.defaults.get("nprobe") if nprobe is None else nprobe
        ef_search = self.defaults.get("efSearch") if ef_search is None else ef_search
        Ds, Is = [], []
        for index in self._indexes:
            kk = min(k, int(index.ntotal))
            if kk == 0:
                continue
            if self.gpu:
                with self._lock:  # GPU indexes take parameters by mutation, not per call
                    _set_gpu_params(index, nprobe)
                    D, I = index.search(x, kk)
            else:
                params = search_parameters(index, nprobe, ef_search)
                D, I = index.search(x, kk, params=params)
            Ds.append(D)
            Is.append(I)
        D = np.concatenate(Ds, axis=1)
        I = np.concatenate(Is, axis=1)
        D = np.where(I < 0, -np.inf, D).astype(np.float32)
        if len(self._indexes) > 1:  # merge shards by score
            order = np.argsort(-D, axis=1, kind="stable")[:, :k]
            D = np.take_along_axis(D, order, axis=1)
            I = np.take_along_axis(I, order, axis=1)
        return D, I.astype(np.int64)

    def search(self, queries, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               exclude_doc_ids: Sequence[Iterable[int] | int | None] | None = None,
               fetch: bool | str | Sequence[str] = False) -> SearchResult:
        """Top-k chunks for each query (texts or an (n, dim) float array).

        ``exclude_doc_ids[i]`` (an int or ints) are documents query i must not retrieve from (RETRO
        excludes the document being predicted); row i still has k hits. ``fetch`` adds payloads:
        True for everything, or any of "text", "tokens", "continuation".
        """
        x = self._queries(queries)
        k = self._check_k(k)
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
                raise QueryError(f"{name} must be a positive integer, got {v!r}")
        want = _fetch_flags(fetch)
        excl = self._exclusions(exclude_doc_ids, len(x))
        if excl is None:
            D, I = self._raw_search(x, k, nprobe, ef_search)
        else:
            D, I = self._search_excluding(x, k, nprobe, ef_search, excl)
        payloads = None
        if want:
            payloads = []
            for row in I:
                ok = row[row >= 0]
                payloads.append(fetch_payloads(self.datastore, ok, text="text" in want, tokens="tokens" in want,
                                               continuation="continuation" in want))
        return SearchResult(I, D, payloads)

    def _exclusions(self, exclude_doc_ids, n: int) -> list[np.ndarray] | None:
        if exclude_doc_ids is None:
            return None
        if len(exclude_doc_ids) != n:
            raise QueryError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {n} queries: give one (or None) per query")
        ndocs = self.datastore.num_documents
        out = []
        for i, e in enumerate(exclude_doc_ids):
            arr = np.zeros(0, np.int64) if e is None else np.atleast_1d(np.asarray(e, dtype=np.int64)).reshape(-1)
            if len(arr) and (arr.min() < 0 or arr.max() >= ndocs):
                raise QueryError(f"exclude_doc_ids[{i}] holds doc_id {int(arr[(arr < 0) | (arr >= ndocs)][0])}, "
                                 f"outside 0..{ndocs - 1}")
            out.append(np.unique(arr))
        return out

    def _search_excluding(self, x, k, nprobe, ef_search, excl: list[np.ndarray]):
        ds = self.datastore
        first = ds.doc_first_chunk_array
        # how many hits each query can lose: the chunks of its excluded documents
        lost = np.array([int((first[e + 1] - first[e]).sum()) if len(e) else 0 for e in excl])
        outD = np.full((len(x), k), -np.inf, np.float32)
        outI = np.full((len(x), k), -1, np.int64)
        pending = np.arange(len(x))
        kk = min(k + int(min(lost.max(), 4 * k)), self.ntotal)
        while len(pending):
            D, I = self._raw_search(x[pending], min(kk, MAX_K * 4, self.ntotal), nprobe, ef_search)
            docs = np.where(I >= 0, ds.chunk_doc_array[np.maximum(I, 0)], -1)
            still = []
            for r, q in enumerate(pending):
                keep = (I[r] >= 0) & ~np.isin(docs[r], excl[q])
                got = int(keep.sum())
                # enough hits, or the search already returned every vector it could reach
                if got >= k or kk >= self.ntotal or (I[r] < 0).any():
                    m = min(got, k)
                    outI[q, :m] = I[r][keep][:m]
                    outD[q, :m] = D[r][keep][:m]
                else:
                    still.append(q)
            pending = np.array(still, dtype=np.int64)
            kk = min(self.ntotal, kk * 4)
        return outD, outI


def _set_gpu_params(index, nprobe: int | None) -> None:
    faiss = _faiss()
    if nprobe is not None:
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        except RuntimeError:
            pass  # not an IVF index


def _fetch_flags(fetch) -> set[str]:
    allowed = {"text", "tokens", "continuation"}
    if fetch is False or fetch is None:
        return set()
    if fetch is True:
        return allowed
    items = {fetch} if isinstance(fetch, str) else set(fetch)
    bad = items - allowed
    if bad:
        raise QueryError(f"fetch must be True or some of {sorted(allowed)}, got {sorted(bad)}")
    return items


# ---------------------------------------------------------------------------------------------
# exact search (the reference), tuning and evaluation


def exact_search(emb: Embeddings, queries: np.ndarray, k: int, exclude_docs: list[np.ndarray] | None = None,
                 chunk_doc: np.ndarray | None = None, block: int = 262144) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over every stored embedding, blockwise (memory bounded by
    ``block`` vectors), optionally excluding documents per query. The reference for recall."""
    faiss = _faiss()
    n = len(queries)
    extra = 0
    if exclude_docs is not None:
        assert chunk_doc is not None
        extra = int(max((np.isin(chunk_doc, e).sum() if len(e) else 0) for e in exclude_docs)) if n else 0
    kk = min(k + extra, emb.num_vectors)
    bestD = np.full((n, 0), -np.inf, np.float32)
    bestI = np.full((n, 0), -1, np.int64)
    for start, xb in emb.iter_blocks(block=block):
        D, I = faiss.knn(queries, xb, min(kk, len(xb)), metric=faiss.METRIC_INNER_PRODUCT)
        D = np.asarray(D, np.float32)
        I = np.asarray(I, np.int64) + start
        bestD = np.concatenate([bestD, D], axis=1)
        bestI = np.concatenate([bestI, I], axis=1)
        order = np.argsort(-bestD, axis=1, kind="stable")[:, :kk]
        bestD = np.take_along_axis(bestD, order, axis=1)
        bestI = np.take_along_axis(bestI, order, axis=1)
    if exclude_docs is None:
        return bestD[:, :k], bestI[:, :k]
    outD = np.full((n, k), -np.inf, np.float32)
    outI = np.full((n, k), -1, np.int64)
    for q in range(n):
        keep = ~np.isin(chunk_doc[bestI[q]], exclude_docs[q])
        m = min(int(keep.sum()), k)
        outD[q, :m] = bestD[q][keep][:m]
        outI[q, :m] = bestI[q][keep][:m]
    return outD, outI


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean |approx[:, :k] ∩ exact[:, :k]| / k (the "k-recall@k" FAISS benchmarks report)."""
    hits = 0
    for a, e in zip(approx[:, :k], exact[:, :k]):
        hits += len(np.intersect1d(a[a >= 0], e[e >= 0]))
    return hits / (k * len(exact))


@dataclass(frozen=True)
class QuerySet:
    chunk_ids: np.ndarray
    vectors: np.ndarray
    exclude: list[np.ndarray]  # each query's own document


def sample_queries(index: DenseIndex, n: int, seed: int, exclude_own_doc: bool = True) -> QuerySet:
    """Datastore chunks as queries, each excluding its own document (as RETRO retrieves): the
    query's own vector is in the index, so without exclusion rank 1 would be trivially itself."""
    emb = Embeddings(index.meta["embeddings_path"])
    if emb.datastore_id != index.datastore_id:
        raise IndexFormatError(f"the embeddings at {emb.path} are not those of {index.path}")
    ids, vecs = emb.sample(n, seed=seed)
    docs = index.datastore.doc_ids(ids)
    excl = [np.array([d]) for d in docs] if exclude_own_doc else [np.zeros(0, np.int64) for _ in docs]
    return QuerySet(ids, vecs, excl)


@dataclass
class TuneReport:
    param: str | None
    value: int | None
    target_recall: float
    k: int
    reached: bool
    curve: list[dict[str, float]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _timed_search(index: DenseIndex, qs: QuerySet, k: int, **params) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    res = index.search(qs.vectors, k, exclude_doc_ids=qs.exclude, **params)
    dt = time.perf_counter() - t0
    return res.chunk_ids, len(qs.vectors) / dt


def tune(path: str | Path, *, target_recall: float = 0.95, k: int = 10, n_queries: int = 500, seed: int = 1,
         exclude_own_doc: bool = True) -> TuneReport:
    """Smallest nprobe (IVF) or efSearch (HNSW) whose recall@k against exact search reaches
    ``target_recall`` on sampled chunks; stored in index.json as the default."""
    if not 0 < target_recall <= 1:
        raise ConfigError(f"`--target-recall` must be in (0, 1], got {target_recall}")
    index = DenseIndex.open(path)
    k = index._check_k(k)
    emb = Embeddings(index.meta["embeddings_path"])
    qs = sample_queries(index, n_queries, seed, exclude_own_doc)
    _, truth = exact_search(emb, qs.vectors, k, qs.exclude, np.asarray(index.datastore.chunk_doc_array))
    if _has_param(index.factory, "nprobe", index.dim):
        param, key = "nprobe", "nprobe"
        nlist = parse_factory(index.factory, index.dim).nlist
        values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v <= nlist] or [nlist]
    elif _has_param(index.factory, "efSearch", index.dim):
        param, key = "efSearch", "ef_search"
        values = [v for v in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048) if v >= k]
    else:
        return TuneReport(None, None, target_recall, k, True, [], index.meta)
    curve = []
    chosen = None
    for v in values:
        got, qps = _timed_search(index, qs, k, **{key: v})
        r = recall_at(got, truth, k)
        curve.append({param: v, "recall": r, "qps": qps})
        logger.info("tune: %s=%d recall@%d=%.4f %.0f q/s", param, v, k, r, qps)
        if r >= target_recall:
            chosen = v
            break
    reached = chosen is not None
    if not reached:
        best = max(curve, key=lambda c: c["recall"])
        chosen = int(best[param])
        logger.warning("tune: %s reaches recall@%d %.4f at most (%s=%d), short of %.2f: the codes are too coarse; "
                       "use more PQ bytes, SQ8, or add RFlat", index.factory, k, best["recall"], param, chosen, target_recall)
    meta = dict(index.meta)
    meta["search_defaults"] = {**meta.get("search_defaults", {}), param: int(chosen)}
    meta["tuning"] = {"param": param, "value": int(chosen), "target_recall": target_recall, "k": k, "reached": reached,
                      "queries": len(qs.vectors), "exclude_own_doc": exclude_own_doc, "curve": curve}
    write_json(Path(path) / "index.json", meta)
    return TuneReport(param, int(chosen), target_recall, k, reached, curve, meta)


@dataclass(frozen=True)
class EvalReport:
    factory: str
    queries: int
    recall: dict[int, float]  # k -> recall@k against exact search
    qps: float  # this index, at its default parameters
    exact_qps: float  # exact search over the stored float32 vectors, same queries, same run
    bytes_per_vector: float
    float32_bytes_per_vector: int
    params: dict[str, int]
    single_qps: float = 0.0  # one query per call
    exact_single_qps: float = 0.0

    @property
    def speedup(self) -> float:
        return self.qps / self.exact_qps if self.exact_qps else float("nan")

    @property
    def single_speedup(self) -> float:
        return self.single_qps / self.exact_single_qps if self.exact_single_qps else float("nan")

    @property
    def compression(self) -> float:
        return self.float32_bytes_per_vector / self.bytes_per_vector


def evaluate(path: str | Path, *, n_queries: int = 1000, ks: Sequence[int] = (1, 10, 100), seed: int = 2,
             exclude_own_doc: bool = True, repeats: int = 5, **params) -> EvalReport:
    """Recall@k of the index against exact inner-product search and queries per second of both,
    on sampled datastore chunks as queries (own document excluded)."""
    faiss = _faiss()
    index = DenseIndex.open(path)
    kmax = index._check_k(max(ks))
    emb = Embeddings(index.meta["embeddings_path"])
    qs = sample_queries(index, n_queries, seed, exclude_own_doc)
    chunk_doc = np.asarray(index.datastore.chunk_doc_array)
    # the exact reference: a flat inner-product index over the same vectors, searched the same way
    # QPS of both is timed on the plain top-k search (without the exclusion step), best of `repeats`
    # interleaved runs so that a busy machine penalises both alike
    flat = faiss.IndexFlatIP(emb.dim)
    for _, xb in emb.iter_blocks():
        flat.add(xb)
    kw = {"nprobe": params.get("nprobe"), "ef_search": params.get("ef_search")}
    t_exact, t_index = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        flat.search(qs.vectors, kmax)
        t_exact.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index._raw_search(qs.vectors, kmax, kw["nprobe"], kw["ef_search"])
        t_index.append(time.perf_counter() - t0)
    # one query per call, as a generation loop retrieves: no batching for BLAS to exploit
    few = qs.vectors[: min(200, len(qs.vectors))]
    t_exact1, t_index1 = [], []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        for row in few:
            flat.search(row[None], kmax)
        t_exact1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for row in few:
            index._raw_search(row[None], kmax, kw["nprobe"], kw["ef_search"])
        t_index1.append(time.perf_counter() - t0)
    del flat
    exact_qps = len(qs.vectors) / min(t_exact)
    qps = len(qs.vectors) / min(t_index)
    single = (len(few) / min(t_index1), len(few) / min(t_exact1))
    _, truth = exact_search(emb, qs.vectors, kmax, qs.exclude, chunk_doc)
    got = index.search(qs.vectors, kmax, exclude_doc_ids=qs.exclude, **kw).chunk_ids
    recall = {k: recall_at(got, truth, k) for k in ks}
    return EvalReport(index.factory, len(qs.vectors), recall, qps, exact_qps, index.meta["index_bytes"] / index.ntotal,
                      4 * index.dim, {**index.defaults, **{k: v for k, v in kw.items() if v is not None}},
                      single_qps=single[0], exact_single_qps=single[1])
