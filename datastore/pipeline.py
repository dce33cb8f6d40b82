"""The datastore build: normalize -> dedup -> tokenize -> chunk -> Parquet shards + manifest.

The job is four steps over shards, each resumable:

1. ``ingest`` (parallel, one work unit per input file or group of small files): read records,
   normalize, apply the error policy, hash the content and compute MinHash band keys; write
   staged parts of about ``shard_bytes`` of text each.
2. ``dedup`` (partitioned, no serial pass on the driver; :func:`run_dedup`): every document's
   keys (content hash, LSH band keys) are hash-partitioned, one task per partition finds the
   keys an earlier document already had, one task per Bloom filter builds the filter kept for
   ``datastore add`` (and checks an add's documents against the datastore's earlier filters),
   and one task per part combines the marks into a keep/drop reason per document.
3. ``tokenize`` (parallel, one part each): batch-tokenize the kept documents with the fast
   tokenizer and find each chunk's character and byte span.
4. ``finalize`` (parallel, one part each): with every part's counts known, assign dense global
   ``doc_id``s and ``chunk_id``s, write the Parquet shards and each part's slice of the
   memory-mapped arrays; then the manifest.

On the local executor one pool of worker processes runs every step (each worker starts and imports
once per build); a worker loads the tokenizer on its first tokenize task. Tokenization is
pipelined behind dedup as far as the partitioned dedup allows: the task that writes a part's
keep/drop reasons tokenizes that part next, while the Bloom filter tasks still run. It still waits
for the dedup's partitions: each partition task reads every part's keys, so no part's decision is
known before all of them have run (part p's depends only on parts <= p: partitions fed part by
part in corpus order would let tokenization follow dedup part by part).

The output directory is a job of :mod:`retromem.datastore.job` (kind ``datastore``): locked
while the build runs, never deleted on ``--overwrite`` unless it is a datastore. Every output is
written atomically and every finished item leaves a done-marker in ``_work/``; the job helper
hands each step only the items not yet done, so a killed build re-run with the same command
skips finished items and ends with the same bytes. The steps read one frozen
:class:`BuildContext` (dedup tasks a :class:`DedupContext`). The final part index is the shard
index; memory is bounded by the shard size, a dedup partition's keys, and one Bloom filter per
filter task (whose size depends only on the number of documents).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import shutil
import time
import zipfile
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from retromem.datastore import schema
from retromem.datastore.atomic import atomic_dir, atomic_path, read_json, sha256_file, write_json
from retromem.datastore.dedup import (EXACT_KIND, KEY_RECORD, BloomFilter, DedupConfig, MinHasher, bloom_bytes_per_billion,
                                      bloom_params, key_kinds, key_records, partition_duplicates, reasons_from_marks,
                                      scatter)
from retromem.datastore.executors import EXECUTORS, make_executor
from retromem.datastore.integrity import SECTION, read_manifest, record_files
from retromem.datastore.job import Job, open_job
from retromem.datastore.normalize import NormalizeConfig, normalize
from retromem.datastore.readers import FORMATS, InputFile, Record, expand_inputs, iter_records
from retromem.datastore.segments import (CHUNK_ARRAYS, DOC_ARRAYS, ensure_version_file, file_records, next_integrity,
                                         publish_version, shard_arrays_sha256, version_file)
from retromem.datastore.tokenizer import DEFAULT_TOKENIZER, BatchTokenizer, save_datastore_tokenizer
from retromem import __version__
from retromem.config import boolean, from_dict, integer, non_negative_int, one_of
from retromem.diskspace import preflight
from retromem.errors import DatastoreError, InputError

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
REASONS = {0: "kept", 1: "exact_duplicate", 2: "near_duplicate"}
_HASH_BATCH_BYTES = 256 << 10  # text per MinHash batch: its temporaries (~40 bytes a byte) stay small enough to be reused, not page-faulted in afresh (4 MiB cost 2x the CPU; issue 19)
_TOKENIZE_BATCH_DOCS = 512
MAX_DEDUP_PARTITIONS = 4096  # every part's scatter file is read once per partition: keep the fan-in sane


@dataclass(frozen=True)
class BuildConfig:
    """Everything that defines a datastore build. Fields marked ``run`` do not change the output."""

    inputs: tuple[str, ...]
    out: str
    format: str = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: str = DEFAULT_TOKENIZER
    chunk_length: int = 64
    shard_bytes: int = 16 << 20  # normalized text per shard (also the unit of parallel work)
    on_error: str = "raise"
    # run settings
    workers: int = 0  # 0: one per core
    executor: str = "local"
    ray_address: str | None = None
    keep_work: bool = False
    dedup_partitions: int = 0  # 0: from the number of keys and workers (the output never depends on it)

    RUN_FIELDS = ("out", "workers", "executor", "ray_address", "keep_work", "dedup_partitions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        one_of(self.format, "format", FORMATS, flag="--format")
        integer(self.chunk_length, "chunk_length", ge=1, le=4096, flag="--chunk-length")
        integer(self.shard_bytes, "shard_bytes", ge=1024, flag="--shard-size")
        one_of(self.on_error, "on_error", ON_ERROR, flag="--on-error")
        one_of(self.executor, "executor", EXECUTORS, flag="--executor")
        non_negative_int(self.workers, "workers", flag="--workers")
        boolean(self.keep_work, "keep_work", flag="--keep-work")
        integer(self.dedup_partitions, "dedup_partitions", ge=0, le=MAX_DEDUP_PARTITIONS, flag="--dedup-partitions")
        # sections given as mappings (a caller's dict) become their configs, unknown keys refused
        if isinstance(self.normalize, Mapping):
            object.__setattr__(self, "normalize", from_dict(NormalizeConfig, self.normalize, prefix="normalize."))
        if isinstance(self.dedup, Mapping):
            object.__setattr__(self, "dedup", from_dict(DedupConfig, self.dedup, prefix="dedup."))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> "BuildConfig":
        """From a mapping (a ``--config`` file's); unknown keys are refused at every level."""
        return from_dict(cls, data, where=where)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the output (recorded in the manifest)."""
        d = asdict(self)
        for name in self.RUN_FIELDS:
            d.pop(name)
        d["inputs"] = list(self.inputs)
        return d


# ---------------------------------------------------------------------------------------------
# work directory layout and the build context


class Layout:
    """Where a build (or an add's new segment) writes. ``tokenizer_root``: the datastore holding the
    tokenizer, when ``out`` is a segment of it."""

    def __init__(self, out: str | Path, tokenizer_root: str | Path | None = None) -> None:
        self.out = Path(out)
        self.work = self.out / "_work"
        self.tok_root = Path(tokenizer_root) if tokenizer_root else self.out

    manifest = property(lambda s: s.out / "manifest.json")
    plan = property(lambda s: s.work / "plan.json")
    tokenizer_dir = property(lambda s: s.tok_root / "tokenizer")
    tokenizer_json = property(lambda s: s.tok_root / "tokenizer" / "tokenizer.json")
    arrays = property(lambda s: s.out / "arrays")

    def staged(self, u: int, k: int) -> Path:
        return self.work / "ingest" / f"part-{u:05d}-{k:05d}.parquet"

    def skips(self, u: int) -> Path:
        return self.work / "ingest" / f"unit-{u:05d}.skips.jsonl"

    def reasons(self, p: int) -> Path:
        return self.work / "dedup" / f"reasons-{p:05d}.npy"

    checkpoint = property(lambda s: s.work / "dedup" / "checkpoint.npz")  # this run's Bloom filters (the generation)

    def dedup_scatter(self, p: int) -> Path:
        return self.work / "dedup" / f"scatter-{p:05d}.npy"

    def dedup_scatter_offsets(self, p: int) -> Path:
        return self.work / "dedup" / f"scatter-{p:05d}-offsets.npy"

    def dedup_marks(self, q: int) -> Path:
        return self.work / "dedup" / f"marks-{q:05d}.npy"

    def dedup_filter(self, kind: int) -> Path:
        return self.work / "dedup" / f"filter-{kind:03d}.npy"

    def dedup_prior_hits(self, kind: int) -> Path:
        return self.work / "dedup" / f"prior-{kind:03d}.npy"

    def tokenized(self, p: int) -> Path:
        return self.work / "tokenize" / f"part-{p:05d}.npz"

    def shard(self, kind: str, p: int) -> Path:
        return self.out / kind / f"shard-{p:05d}.parquet"


# done-marker names (``_work/NAME.json``, see retromem.datastore.job) of each step's work items
def _ingest_marker(u: int) -> str:
    return f"ingest/unit-{u:05d}"


def _tokenize_marker(p: int) -> str:
    return f"tokenize/part-{p:05d}"


def _finalize_marker(p: int) -> str:
    return f"finalize/part-{p:05d}"


@dataclass(frozen=True)
class BuildContext:
    """What the steps of one build read. Frozen and picklable: it travels to worker processes and
    Ray tasks. Each step's driver makes the next context with ``dataclasses.replace``."""

    config: BuildConfig
    files: tuple[InputFile, ...]
    units: tuple[tuple[int, ...], ...]  # indices into files, per ingest unit
    token_dtype: str  # of the token array: uint16 or uint32, from the tokenizer's vocabulary
    pad_token_id: int
    parts: tuple[tuple[int, int], ...] = ()  # (unit, k) of every staged part, in shard order (after ingest)
    offsets: tuple[dict[str, int], ...] = ()  # per part: first doc id, chunk id, text byte (after tokenize)
    array_shapes: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)
    meta_types: dict[str, str] = field(default_factory=dict)  # metadata field -> type name (after ingest)
    id_base: tuple[int, int] = (0, 0)  # (first doc id, first chunk id) of this segment: Parquet ids are global
    tokenizer_root: str = ""  # the datastore whose tokenizer/ to use ("" : config.out)

    @property
    def layout(self) -> Layout:
        return Layout(self.config.out, self.tokenizer_root or None)


# ---------------------------------------------------------------------------------------------
# step 1: ingest


def _plan_units(files: list[InputFile], shard_bytes: int) -> list[list[int]]:
    """Group consecutive input files into work units of about shard_bytes on disk."""
    units: list[list[int]] = []
    size = 0
    for i, f in enumerate(files):
        if units and size + f.size <= shard_bytes:
            units[-1].append(i)
            size += f.size
        else:
            units.append([i])
            size = f.size
    return units


@lru_cache(maxsize=2)
def _minhasher(dedup: DedupConfig) -> MinHasher:
    return MinHasher(dedup)


def _content_hashes(texts: list[str]) -> list[bytes]:
    return [hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest() for t in texts]


def _write_staged(path: Path, cfg: BuildConfig, sources: list[str], ids: list[str], texts: list[str],
                  metas: list[str | None]) -> None:
    keys = np.zeros((len(texts), cfg.dedup.bands), dtype=np.uint64)
    if cfg.dedup.near:
        mh = _minhasher(cfg.dedup)
        start, size = 0, 0
        for i, t in enumerate(texts):
            size += len(t)
            if size >= _HASH_BATCH_BYTES or i == len(texts) - 1:
                keys[start : i + 1] = mh.band_keys(texts[start : i + 1])
                start, size = i + 1, 0
    band_keys = pa.FixedSizeListArray.from_arrays(pa.array(keys.ravel(), pa.uint64()), cfg.dedup.bands)
    table = pa.table(
        [
            pa.array(sources, pa.string()),
            pa.array(ids, pa.string()),
            pa.array(texts, pa.large_string()),
            pa.array(_content_hashes(texts), pa.binary(16)),
            band_keys.cast(pa.list_(pa.uint64())),
            pa.array(metas, pa.large_string()),
        ],
        schema=schema.STAGED_SCHEMA,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="lz4")


def ingest_unit(ctx: BuildContext, u: int) -> dict:
    """Read, validate and normalize one unit's files; write staged parts. Returns its counts."""
    cfg = ctx.config
    lay = ctx.layout
    files = [ctx.files[i] for i in ctx.units[u]]
    parts: list[dict] = []
    skips: dict[str, int] = {}
    skip_lines: list[str] = []
    sources: list[str] = []
    ids: list[str] = []
    texts: list[str] = []
    metas: list[str | None] = []
    types: dict[str, list[str]] = {}  # metadata field -> [type, where first seen]
    size = 0
    records = 0
    raw_bytes = 0

    def flush() -> None:
        nonlocal sources, ids, texts, metas, size
        if not texts:
            return
        _write_staged(lay.staged(u, len(parts)), cfg, sources, ids, texts, metas)
        parts.append({"docs": len(texts), "text_chars": size})
        sources, ids, texts, metas, size = [], [], [], [], 0

    for f in files:
        for rec in iter_records(f, cfg.text_field, cfg.id_field):
            if isinstance(rec, Record):
                records += 1
                raw_bytes += len(rec.text)
                text = normalize(rec.text, cfg.normalize)
                if not text.strip():
                    rec = InputError(f.path, rec.line, "empty_document",
                                     f"document {rec.source_id!r} is empty after normalization")
                else:
                    if rec.metadata:
                        for name, value in rec.metadata.items():
                            typ = meta_type(value)
                            if typ is not None and types.get(name, (None,))[0] != typ:  # new field or type: record where
                                merge_meta_type(types, name, typ, f"{f.path}:{rec.line}")
                    sources.append(f.path)
                    ids.append(rec.source_id)
                    texts.append(text)
                    metas.append(orjson.dumps(rec.metadata).decode() if rec.metadata else None)
                    size += len(text)
                    if size >= cfg.shard_bytes:
                        flush()
                    continue
            if cfg.on_error == "raise":
                raise rec
            skips[rec.kind] = skips.get(rec.kind, 0) + 1
            skip_lines.append(str(rec))
    flush()
    if skip_lines:
        with atomic_path(lay.skips(u)) as tmp:
            tmp.write_text("\n".join(skip_lines) + "\n")
    return {"parts": parts, "records": records, "chars": raw_bytes, "skipped": skips, "meta_types": types}


def meta_type(value: Any) -> str | None:
    """The metadata type of one JSON value (None for null: it fits every type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(1 << 63) <= value < (1 << 63) else "double"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "json"  # lists and objects, kept as JSON text


def merge_meta_type(types: dict[str, list[str]], name: str, typ: str | None, where: str) -> None:
    """Record that field ``name`` has a ``typ`` value at ``where``. int64 and double widen to double
    (documented); any other mix is an InputError naming the field and both places."""
    if typ is None:
        return
    seen = types.get(name)
    if seen is None or seen[0] == typ:
        if seen is None:
            types[name] = [typ, where]
        return
    if {seen[0], typ} == {"int64", "double"}:
        types[name] = ["double", seen[1] if seen[0] == "double" else where]
        return
    path, _, line = where.rpartition(":")
    raise InputError(path or where, int(line) if line.isdigit() else None, "mixed_metadata_type",
                     f"metadata field {name!r} is {typ} here but {seen[0]} at {seen[1]}: one field holds one type "
                     "(int64 and double widen to double); fix the input or drop the field")


# ---------------------------------------------------------------------------------------------
# step 2: dedup


def _read_hashes(path: Path, bands: int) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path, columns=["content_hash", "band_keys"])
    ch = t.column("content_hash").combine_chunks()
    content = np.frombuffer(ch.buffers()[1], dtype=np.uint64, count=2 * len(ch)).reshape(-1, 2)[:, 0]
    bk = t.column("band_keys").combine_chunks().flatten()
    keys = np.asarray(bk.to_numpy(zero_copy_only=False), dtype=np.uint64).reshape(len(ch), bands)
    return content.copy(), keys


def _read_key_column(path: Path, kind: int, bands: int) -> np.ndarray:
    """One kind of key of a staged part: its content hashes (kind 0) or band ``kind - 1``'s keys. (n,) uint64."""
    if kind == EXACT_KIND:
        ch = pq.read_table(path, columns=["content_hash"]).column("content_hash").combine_chunks()
        return np.frombuffer(ch.buffers()[1], dtype=np.uint64, count=2 * len(ch)).reshape(-1, 2)[:, 0].copy()
    return _read_hashes(path, bands)[1][:, kind - 1].copy()


def _filter_name(kind: int) -> str:
    """The member of a dedup generation file (``dedup/gen-*.npz``) holding this kind's Bloom filter."""
    return "exact" if kind == EXACT_KIND else f"band{kind - 1}"


@dataclass(frozen=True)
class DedupContext:
    """What the dedup tasks read; frozen and picklable like :class:`BuildContext`. Documents are
    numbered from 0 in corpus order over the run's parts (part ``p`` holds ``first_doc[p]`` to
    ``first_doc[p + 1] - 1``)."""

    out: str  # the build's (or the add's segment's) directory: staged parts and dedup files in its _work/
    dedup: DedupConfig
    parts: tuple[tuple[int, int], ...]
    first_doc: tuple[int, ...]  # len(parts) + 1
    partitions: int
    prior: tuple[tuple[str, int], ...] = ()  # an add's earlier generations: (file, expected docs), checked only
    tokenize: Any = None  # the build's BuildContext: each reasons task then tokenizes its part (pipelined)

    @property
    def layout(self) -> Layout:
        return Layout(self.out)


def dedup_scatter_part(ctx: DedupContext, p: int) -> dict:
    """Every key of part ``p``'s documents, grouped by partition, into one memory-mappable file, and
    where each partition starts in it (a file too: partitions x parts offsets would not travel well
    with every task's context)."""
    lay = ctx.layout
    content, keys = _read_hashes(lay.staged(*ctx.parts[p]), ctx.dedup.bands)
    rec, offsets = scatter(key_records(content, keys, ctx.first_doc[p], ctx.dedup), ctx.partitions)
    for path, array in ((lay.dedup_scatter(p), rec), (lay.dedup_scatter_offsets(p), offsets)):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
    return {"keys": len(rec)}


def dedup_partition(ctx: DedupContext, q: int) -> dict:
    """Partition ``q``: its keys from every part's scatter file; the documents whose key an earlier
    document had (exact marks from content hashes, near marks from band keys). Memory: the partition."""
    lay = ctx.layout
    pieces = []
    for p in range(len(ctx.parts)):
        lo, hi = (int(x) for x in np.load(lay.dedup_scatter_offsets(p), mmap_mode="r")[q : q + 2])
        if hi > lo:
            pieces.append(np.load(lay.dedup_scatter(p), mmap_mode="r")[lo:hi])
    rec = np.concatenate(pieces) if pieces else np.zeros(0, dtype=KEY_RECORD)
    exact, near = partition_duplicates(rec)
    marks = np.sort(np.concatenate((exact * 2, near * 2 + 1)))  # one sorted file: doc * 2 (+ 1 for near)
    with atomic_path(lay.dedup_marks(q)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, marks)
    return {"keys": len(rec), "exact": len(exact), "near": len(near)}


def dedup_filter(ctx: DedupContext, kind: int) -> dict:
    """One Bloom filter of this run's generation (every document's keys of that kind, as the
    sequential pass inserted them, so ``datastore add`` later finds them), sized for all of the
    run's documents; for an add, the documents whose key the datastore's earlier generations hold.
    Memory: the filter (and the earlier generations' filters of this kind) plus one part's keys."""
    cfg, lay = ctx.dedup, ctx.layout
    rate = cfg.exact_fp_rate if kind == EXACT_KIND else cfg.near_fp_rate
    bloom = BloomFilter(*bloom_params(ctx.first_doc[-1], rate))
    priors = []
    for path, expected in ctx.prior:
        with np.load(path) as st:
            if _filter_name(kind) in st.files:
                priors.append(BloomFilter(*bloom_params(expected, rate), data=st[_filter_name(kind)]))
    hits = []
    for p, part in enumerate(ctx.parts):
        keys = _read_key_column(lay.staged(*part), kind, cfg.bands)
        if priors:
            hit = np.zeros(len(keys), dtype=bool)
            for old in priors:
                hit |= old.contains(keys)
            hits.append(ctx.first_doc[p] + np.flatnonzero(hit))
        bloom.add(keys)
    with atomic_path(lay.dedup_filter(kind)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, bloom.data)
    hit_docs = np.concatenate(hits).astype(np.int64) if hits else np.zeros(0, np.int64)  # ascending: parts in order
    if ctx.prior:
        with atomic_path(lay.dedup_prior_hits(kind)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, hit_docs)
    return {"bytes": int(bloom.data.nbytes), "prior_hits": len(hit_docs)}


def dedup_generation(ctx: DedupContext, _: int = 0) -> dict:
    """The run's generation file (``np.load``-able, one member per filter, as ``Deduplicator.state``
    names them), streamed filter by filter; fixed zip timestamps so equal filters give equal bytes."""
    lay = ctx.layout
    with atomic_path(lay.checkpoint) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for kind in sorted(key_kinds(ctx.dedup), key=lambda k: (k == EXACT_KIND, k)):  # band0.., exact
                info = zipfile.ZipInfo(_filter_name(kind) + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.load(lay.dedup_filter(kind), mmap_mode="r"))
    return {"bytes": lay.checkpoint.stat().st_size}


def dedup_reasons(ctx: DedupContext, p: int) -> dict:
    """Part ``p``'s keep/drop reason per document: dropped when any partition (or an earlier
    generation) marked it; exact beats near. Reads only its range of each mark file."""
    lay = ctx.layout
    first, end = ctx.first_doc[p], ctx.first_doc[p + 1]

    def within(path: Path, scale: int = 1) -> np.ndarray:
        docs = np.load(path, mmap_mode="r")
        lo, hi = np.searchsorted(docs, [first * scale, end * scale])
        return np.array(docs[lo:hi])

    exact, near = [], []
    for q in range(ctx.partitions):
        marks = within(lay.dedup_marks(q), 2)
        exact.append(marks[marks % 2 == 0] // 2)
        near.append(marks[marks % 2 == 1] // 2)
    if ctx.prior:
        for kind in key_kinds(ctx.dedup):
            (exact if kind == EXACT_KIND else near).append(within(lay.dedup_prior_hits(kind)))
    reasons = reasons_from_marks(first, end - first, exact, near)
    with atomic_path(lay.reasons(p)) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, reasons)
    return {name: int((reasons == code).sum()) for code, name in REASONS.items()}


def dedup_task(ctx: DedupContext, item: tuple[str, int]) -> dict:
    """One dedup work item, ``(step, index)``: the executors run a single function per map."""
    step, i = item
    if step == "scatter":
        return dedup_scatter_part(ctx, i)
    if step == "filter":
        return dedup_filter(ctx, i)
    if step == "partition":
        return dedup_partition(ctx, i)
    if step == "generation":
        return dedup_generation(ctx, i)
    if step == "reasons":
        res = dedup_reasons(ctx, i)
        if ctx.tokenize is not None:  # the part's decision is final: tokenize it while other tasks run
            res = {**res, "tokenized": tokenize_part(ctx.tokenize, i)}
        return res
    raise AssertionError(f"unknown dedup step {step!r}")


def dedup_partitions(total_keys: int, shard_bytes: int, parallelism: int) -> int:
    """Partitions of a run with ``total_keys`` keys: enough that one partition's records fit in a
    shard's worth of memory, and at least one per worker. Only speed depends on it."""
    by_memory = math.ceil(total_keys * KEY_RECORD.itemsize / shard_bytes)
    return int(min(MAX_DEDUP_PARTITIONS, max(1, parallelism, by_memory)))


def run_dedup(job: Job, executor, cfg: BuildConfig, parts: list[tuple[int, int]], part_docs: list[int],
              prior: list[tuple[Path, int]] = (), tokenize: BuildContext | None = None) -> dict:
    """Dedup the staged parts as tasks (see the module docstring); ``prior``: (state file, expected
    docs) of the datastore's earlier dedup generations, checked but not written (an add). Writes a
    reasons file per part and this run's generation (``Layout.checkpoint``), which the caller keeps
    with the datastore. Returns the counts and the Bloom bytes.

    ``tokenize``: the build's context; each part is then tokenized by the task that decides it,
    while the Bloom filter tasks still run, and its tokenize done-marker written (a part whose
    marker is missing, after a kill, is left to the tokenize step)."""
    first_doc = tuple(int(x) for x in np.concatenate(([0], np.cumsum(part_docs, dtype=np.int64))))
    kinds = key_kinds(cfg.dedup)
    plan = job.done("dedup/plan")  # a resumed run keeps its partitioning: the scatter files depend on it
    lay = Layout(cfg.out)
    if plan is None and lay.checkpoint.exists():
        # a build begun before dedup was partitioned (its sequential pass's checkpoint, no plan): later
        # steps may have read that pass's reasons, which a Bloom false positive can make differ; redo them
        logger.info("redoing the dedup of a build begun by an earlier version, and the steps after it")
        for step in ("dedup", "tokenize", "finalize"):
            shutil.rmtree(lay.work / step, ignore_errors=True)
    if plan is None:
        partitions = cfg.dedup_partitions or dedup_partitions(first_doc[-1] * len(kinds), cfg.shard_bytes,
                                                              getattr(executor, "parallelism", 1))
        job.mark_done("dedup/plan", {"partitions": partitions})
    else:
        partitions = int(plan["partitions"])
    ctx = DedupContext(out=cfg.out, dedup=cfg.dedup, parts=tuple(parts), first_doc=first_doc, partitions=partitions,
                       prior=tuple((str(path), int(n)) for path, n in prior), tokenize=tokenize)

    def run(items: list[tuple[str, int]]) -> dict[tuple[str, int], dict]:
        out = {}
        with tqdm(total=len(items), desc="dedup", unit="task", disable=None) as bar:
            for item, res in job.map(executor, dedup_task, ctx, items, lambda it: f"dedup/{it[0]}-{it[1]:05d}"):
                out[tuple(item)] = res
                if "tokenized" in res and job.done(_tokenize_marker(item[1])) is None \
                        and tokenize.layout.tokenized(item[1]).exists():  # (a resumed run's stored result: check)
                    job.mark_done(_tokenize_marker(item[1]), res["tokenized"])
                bar.update(1)
        return out

    # scatter and filters read only staged parts; partitions need every scatter file; reasons every
    # mark (and, in an add, the filter tasks' hits against the earlier generations); the generation
    # every filter. In a build the filters (needed only by the generation, kept for `datastore add`)
    # run beside the reasons tasks, so tokenization (``tokenize``) overlaps them. One pool of local
    # workers for the maps (each is short).
    filters = [("filter", k) for k in kinds]
    with executor.pooled() if hasattr(executor, "pooled") else nullcontext():
        done = run([("scatter", p) for p in range(len(parts))] + (filters if prior else []))
        run([("partition", q) for q in range(partitions)])
        done |= run([("reasons", p) for p in range(len(parts))] + ([] if prior else filters))
        run([("generation", 0)])
    counts = {name: sum(done[("reasons", p)][name] for p in range(len(parts))) for name in REASONS.values()}
    bloom_bytes = sum(done[("filter", k)]["bytes"] for k in kinds)
    logger.info("dedup: %d shards, %d partitions, Bloom filters %.1f MiB", len(parts), partitions, bloom_bytes / 2**20)
    return {"bloom_bytes": bloom_bytes, "partitions": partitions, **counts}


# ---------------------------------------------------------------------------------------------
# step 3: tokenize


@lru_cache(maxsize=2)
def _batch_tokenizer(path: str, chunk_length: int) -> BatchTokenizer:
    return BatchTokenizer(path, chunk_length)


def tokenize_part(ctx: BuildContext, p: int) -> dict:
    """Tokenize one part's kept documents; write their ids and chunk spans. Returns its counts."""
    cfg = ctx.config
    lay = ctx.layout
    tok = _batch_tokenizer(str(lay.tokenizer_json), cfg.chunk_length)
    keep = np.load(lay.reasons(p)) == 0
    texts = pq.read_table(lay.staged(*ctx.parts[p]), columns=["text"]).column("text").to_pylist()
    texts = [t for t, k in zip(texts, keep) if k]
    batches = [tok.encode_flat(texts[b : b + _TOKENIZE_BATCH_DOCS]) for b in range(0, len(texts), _TOKENIZE_BATCH_DOCS)]
    dtype = np.dtype(ctx.token_dtype)
    cat = lambda name, dt: np.concatenate([getattr(x, name) for x in batches]).astype(dt) if batches else np.zeros(0, dt)  # noqa: E731
    ntok, doc_bytes = cat("ntok", np.int64), cat("doc_bytes", np.int64)
    with atomic_path(lay.tokenized(p)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=cat("ids", dtype), ntok=ntok, char_starts=cat("char_starts", np.int64),
                     byte_starts=cat("byte_starts", np.int64), doc_bytes=doc_bytes)
    L = cfg.chunk_length
    return {
        "docs": len(texts),
        "tokens": int(ntok.sum()),
        "chunks": int((-(-ntok // L)).sum()),
        "text_bytes": int(doc_bytes.sum()),
    }


# ---------------------------------------------------------------------------------------------
# step 4: finalize


def _open_array(lay: Layout, name: str, mode: str, shapes: Mapping[str, tuple]) -> np.ndarray:
    shape, dtype = shapes[name]
    return np.lib.format.open_memmap(lay.arrays / f"{name}.npy", mode=mode, dtype=dtype, shape=tuple(shape))


def finalize_part(ctx: BuildContext, p: int) -> dict:
    """Give one part its global ids; write its Parquet shards and its slice of the arrays."""
    cfg = ctx.config
    lay = ctx.layout
    L = cfg.chunk_length
    off = ctx.offsets[p]  # {doc, chunk, byte}
    staged = pq.read_table(lay.staged(*ctx.parts[p]), columns=["source", "source_id", "text", "content_hash", "metadata"])
    reasons = np.load(lay.reasons(p))
    keep = reasons == 0
    with np.load(lay.tokenized(p)) as z:
        ids, ntok, cstarts, bstarts, doc_bytes = (z[k] for k in ("ids", "ntok", "char_starts", "byte_starts", "doc_bytes"))
    n_docs = int(keep.sum())
    n_chunks_doc = -(-ntok // L)
    n_chunks = int(n_chunks_doc.sum())
    kept = staged.filter(pa.array(keep))
    # the kept texts stay Arrow: their UTF-8 bytes, one after the other, are text.bin's slice (no
    # round trip through Python strings; issue 19)
    text_col = kept.column("text").combine_chunks()
    text_bytes = _large_string_bytes(text_col)
    hashes = [h.hex() for h in kept.column("content_hash").to_pylist()]

    doc_ids = np.arange(off["doc"], off["doc"] + n_docs, dtype=np.int64)
    first_chunk = off["chunk"] + np.concatenate(([0], np.cumsum(n_chunks_doc)[:-1])).astype(np.int64) if n_docs else np.zeros(0, np.int64)
    doc_byte_start = off["byte"] + np.concatenate(([0], np.cumsum(doc_bytes)[:-1])).astype(np.int64) if n_docs else np.zeros(0, np.int64)

    # per chunk
    chunk_doc = np.repeat(doc_ids, n_chunks_doc)
    chunk_pos = np.concatenate([np.arange(n, dtype=np.int32) for n in n_chunks_doc]) if n_docs else np.zeros(0, np.int32)
    doc_chars = pc.utf8_length(text_col).to_numpy(zero_copy_only=False).astype(np.int64)
    local_doc = np.repeat(np.arange(n_docs), n_chunks_doc)
    last = np.zeros(n_chunks, dtype=bool)
    if n_chunks:
        last[np.cumsum(n_chunks_doc) - 1] = True
    char_end = np.where(last, doc_chars[local_doc], np.roll(cstarts, -1))
    byte_end = np.where(last, doc_bytes[local_doc], np.roll(bstarts, -1))
    chunk_tok_start = np.concatenate(([0], np.cumsum(ntok)[:-1]))[local_doc] + chunk_pos.astype(np.int64) * L if n_docs else np.zeros(0, np.int64)
    chunk_ntok = np.minimum(L, ntok[local_doc] - chunk_pos.astype(np.int64) * L) if n_docs else np.zeros(0, np.int64)

    # token slice (n_chunks, L), padded with the pad id
    shapes = ctx.array_shapes
    tokens = _open_array(lay, "tokens", "r+", shapes)
    block = np.full((n_chunks, L), ctx.pad_token_id, dtype=tokens.dtype)
    col = np.arange(L)[None, :]
    valid = col < chunk_ntok[:, None]
    src = (chunk_tok_start[:, None] + col)[valid]
    block[valid] = ids[src]
    tokens[off["chunk"] : off["chunk"] + n_chunks] = block
    tokens.flush()
    del tokens
    for name, values in (
        ("chunk_doc_ids", chunk_doc),
        ("chunk_ntokens", chunk_ntok),
        ("chunk_byte_spans", np.stack([bstarts, byte_end], axis=1) + doc_byte_start[local_doc][:, None] if n_chunks else np.zeros((0, 2), np.int64)),
    ):
        arr = _open_array(lay, name, "r+", shapes)
        arr[off["chunk"] : off["chunk"] + n_chunks] = values
        arr.flush()
    for name, values in (("doc_first_chunk", first_chunk), ("doc_byte_offsets", doc_byte_start)):
        arr = _open_array(lay, name, "r+", shapes)
        arr[off["doc"] : off["doc"] + n_docs] = values
        arr.flush()
    with open(lay.arrays / "text.bin", "r+b") as fh:
        fh.seek(off["byte"])
        fh.write(text_bytes)

    # Parquet shards: ids global (the arrays above are local to the segment)
    base_doc, base_chunk = ctx.id_base
    documents = pa.table(
        [
            pa.array(doc_ids + base_doc, pa.int64()),
            kept.column("source").combine_chunks().cast(pa.string()),
            kept.column("source_id").combine_chunks().cast(pa.string()),
            text_col,
            pa.array(hashes, pa.string()),
            pa.array(ntok, pa.int64()),
            pa.array(first_chunk + base_chunk, pa.int64()),
            pa.array(n_chunks_doc, pa.int64()),
            *metadata_columns(kept.column("metadata").to_pylist(), ctx.meta_types),
        ],
        schema=documents_schema(ctx.meta_types),
    )
    tok_lists = pa.ListArray.from_arrays(
        pa.array(np.concatenate(([0], np.cumsum(chunk_ntok))).astype(np.int32)),
        pa.array(block[valid].astype(np.uint32), pa.uint32()),
    )
    chunks = pa.table(
        [
            pa.array(np.arange(off["chunk"], off["chunk"] + n_chunks, dtype=np.int64) + base_chunk, pa.int64()),
            pa.array(chunk_doc + base_doc, pa.int64()),
            pa.array(chunk_pos, pa.int32()),
            pa.array(cstarts, pa.int64()),
            pa.array(char_end, pa.int64()),
            tok_lists,
        ],
        schema=schema.CHUNKS_SCHEMA,
    )
    dropped = staged.filter(pa.array(~keep))
    removed = pa.table(
        [
            dropped.column("source").combine_chunks().cast(pa.string()),
            dropped.column("source_id").combine_chunks().cast(pa.string()),
            pa.array([REASONS[int(r)] for r in reasons[~keep]], pa.string()),
            pa.array([h.hex() for h in dropped.column("content_hash").to_pylist()], pa.string()),
        ],
        schema=schema.REMOVED_SCHEMA,
    )
    result: dict[str, Any] = {"shard": p, "documents": n_docs, "chunks": n_chunks, "tokens": int(ntok.sum()),
                              "text_bytes": len(text_bytes), "removed": int((~keep).sum()),
                              "first_doc_id": off["doc"], "first_chunk_id": off["chunk"]}
    for kind, table in (("documents", documents), ("chunks", chunks), ("removed", removed)):
        path = lay.shard(kind, p)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", row_group_size=8192)
        result[kind + "_file"] = {"path": str(path.relative_to(lay.out)), "sha256": sha256_file(path),
                                  "rows": table.num_rows, "bytes": path.stat().st_size}
    result["tokens_sha256"] = hashlib.sha256(block.tobytes()).hexdigest()
    result["text_sha256"] = hashlib.sha256(text_bytes).hexdigest()
    return result


def _large_string_bytes(col: pa.LargeStringArray) -> bytes:
    """The UTF-8 bytes of every value of a (null-free) large_string array, one after the other."""
    if len(col) == 0:
        return b""
    offsets = np.frombuffer(col.buffers()[1], dtype=np.int64, count=len(col) + 1, offset=col.offset * 8)
    return col.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_pybytes()


def documents_schema(meta_types: Mapping[str, str]) -> pa.Schema:
    """The documents Parquet schema: the fixed columns, then one typed column per metadata field."""
    extra = [pa.field(schema.METADATA_PREFIX + name, schema.metadata_arrow_type(meta_types[name]), nullable=True)
             for name in sorted(meta_types)]
    return pa.schema(list(schema.DOCUMENTS_SCHEMA) + extra)


def metadata_columns(staged: list[str | None], meta_types: Mapping[str, str]) -> list[pa.Array]:
    """The typed metadata columns (fields sorted by name) of documents whose extra fields were
    staged as JSON objects (or null)."""
    rows = [orjson.loads(m) if m else {} for m in staged]
    cols = []
    for name in sorted(meta_types):
        typ = meta_types[name]
        vals = [r.get(name) for r in rows]
        if typ == "json":
            vals = [None if v is None else orjson.dumps(v).decode() for v in vals]
        elif typ == "double":
            vals = [None if v is None else float(v) for v in vals]
        cols.append(pa.array(vals, schema.metadata_arrow_type(typ)))
    return cols


def merge_unit_types(ing: Mapping[int, dict], base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Metadata types over every ingest unit in order (and the datastore's declared ones, for an
    add): int64 and double widen to double; any other mix is an InputError naming the field."""
    types: dict[str, list[str]] = {name: [typ, "the existing datastore"] for name, typ in (base or {}).items()}
    for u in sorted(ing):
        for name, (typ, where) in ing[u].get("meta_types", {}).items():
            merge_meta_type(types, name, typ, where)
    return {name: t[0] for name, t in sorted(types.items())}


# ---------------------------------------------------------------------------------------------
# driver


def _fingerprint(files: list[InputFile]) -> list[dict]:
    return [{"path": f.path, "format": f.format, "size": f.size, "mtime_ns": f.mtime_ns} for f in files]


def _run_step(job: Job, executor, name: str, fn: Callable[[BuildContext, int], dict], ctx: BuildContext,
              items: list[int], marker: Callable[[int], str], unit: str,
              weights: list[int] | None = None) -> dict[int, Any]:
    """``fn`` over the items not yet done (the job skips the rest); every item's result."""
    results: dict[int, Any] = {}
    total = sum(weights) if weights else len(items)
    t = time.perf_counter()
    # the bar shows on a terminal; the log line below is the record in batch logs
    with tqdm(total=total, desc=name, unit="B" if weights else unit, unit_scale=bool(weights), disable=None) as bar:
        for item, res in job.map(executor, fn, ctx, items, marker):
            results[item] = res
            bar.update(weights[item] if weights else 1)
    logger.info("%s: %d %ss done in %.1f s", name, len(items), unit, time.perf_counter() - t)
    return results


@dataclass
class BuildResult:
    manifest: dict[str, Any]
    seconds: dict[str, float]
    already_complete: bool = False


def estimated_bytes(files: list[InputFile]) -> int:
    """Disk a build of ``files`` writes, from their sizes: the normalized text once, 2-4 bytes per
    token (about 0.65x the text), the chunk table (about 0.45x), plus the tokenizer's files; compressed
    inputs count at a typical text ratio (gzip 4x, zstd 5x). Measured on python-docs: 2.3x the text."""
    ratio = {".gz": 4.0, ".zst": 5.0}
    text = sum(f.size * ratio.get(Path(f.path).suffix, 1.0) for f in files)
    return int(2.5 * text) + 8 * 2**20



def build(cfg: BuildConfig, overwrite: bool = False) -> BuildResult:
    """Build (or resume building) the datastore described by ``cfg``: version 1, one segment.

    ``overwrite``: delete the datastore at ``cfg.out`` first (only ever a datastore: anything else
    there is refused, as is a directory another job is writing).
    """
    files = expand_inputs(list(cfg.inputs), cfg.format)
    plan = {"config": cfg.identity(), "files": _fingerprint(files)}
    preflight(cfg.out, estimated_bytes(files), "the datastore build")
    with open_job(cfg.out, "datastore", overwrite=overwrite, legacy=("manifest.json", "_work/plan.json")) as job:
        return _build(job, cfg, files, plan)


def _build(job: Job, cfg: BuildConfig, files: list[InputFile], plan: dict[str, Any]) -> BuildResult:
    lay = Layout(job.path)
    if lay.manifest.exists():
        manifest = read_manifest(lay.manifest)
        if manifest.get("build_config") != plan["config"] or manifest.get("inputs") != plan["files"]:
            raise DatastoreError(
                f"{cfg.out} holds a finished datastore built with other inputs or settings; "
                "use another --out, or --overwrite to replace it"
            )
        return BuildResult(manifest, {}, already_complete=True)
    if lay.plan.exists():
        old = read_json(lay.plan)
        if old["config"] != plan["config"] or old["files"] != plan["files"]:
            raise DatastoreError(
                f"{cfg.out} holds an unfinished build with other inputs or settings "
                f"(see {lay.plan}); re-run that build, use another --out, or --overwrite"
            )
        logger.info("resuming the build in %s", cfg.out)
    else:
        write_json(lay.plan, plan)

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    # the tokenizer, saved into the datastore so every reader decodes with exactly it
    if not lay.tokenizer_json.exists():
        with atomic_dir(lay.tokenizer_dir) as tmp:
            save_datastore_tokenizer(cfg.tokenizer, tmp)
    tok_info = read_json(lay.tokenizer_dir / "retromem_tokenizer.json")
    seconds["tokenizer"] = time.perf_counter() - t0

    steps = _run_steps(job, cfg, files, tok_info, seconds)
    gen = _keep_dedup_generation(lay, lay.out, 1)
    manifest = _manifest(cfg, plan, tok_info, steps, gen)
    # last: version 1 (versions/v00001.json, then manifest.json), with every file's size and checksum
    (lay.out / version_file(1)).unlink(missing_ok=True)  # a publish killed before manifest.json: redo it
    manifest = {**manifest, SECTION: record_files(lay.out, exclude=(lay.manifest.name,))}
    publish_version(lay.out, manifest)
    if not cfg.keep_work:
        job.clear_work()
    seconds["total"] = time.perf_counter() - t0
    return BuildResult(manifest, seconds)


def _keep_dedup_generation(lay: Layout, root: Path, version: int) -> str:
    """Copy this run's final dedup filters (the last checkpoint) into the datastore, where the next
    ``add`` finds them; returns the file's path relative to ``root``."""
    rel = f"dedup/gen-v{version:05d}.npz"
    with atomic_path(root / rel) as tmp:
        shutil.copyfile(lay.checkpoint, tmp)
    return rel


def _run_steps(job: Job, cfg: BuildConfig, files: list[InputFile], tok_info: dict[str, Any], seconds: dict[str, float], *,
               tokenizer_root: str = "", id_base: tuple[int, int] = (0, 0), prior: list[tuple[Path, int]] = (),
               base_types: Mapping[str, str] | None = None) -> dict[str, Any]:
    """ingest -> dedup -> tokenize -> finalize into ``cfg.out`` (a datastore, or a new segment of
    one: ids in its Parquet files start at ``id_base``). Returns what the manifest records."""
    lay = Layout(cfg.out, tokenizer_root or None)
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    units = tuple(tuple(u) for u in _plan_units(files, cfg.shard_bytes))
    ctx = BuildContext(config=cfg, files=tuple(files), units=units, token_dtype=tok_info["token_dtype"],
                       pad_token_id=tok_info["pad_token_id"], id_base=tuple(id_base), tokenizer_root=tokenizer_root)

    # One pool of workers for every step (local executor): each worker process starts and imports
    # once per build, not once per step (4 steps x workers process starts, about 0.5-1 CPU-s each
    # on this machine; issue 19). A worker loads the tokenizer on its first tokenize task and keeps
    # it; ingest, dedup and finalize tasks never load it.
    with executor.pooled():
        t = time.perf_counter()
        unit_sizes = [sum(files[i].size for i in u) for u in units]
        ing = _run_step(job, executor, "ingest", ingest_unit, ctx, list(range(len(units))), _ingest_marker, "unit", unit_sizes)
        seconds["ingest"] = time.perf_counter() - t
        parts = tuple((u, k) for u in range(len(units)) for k in range(len(ing[u]["parts"])))
        ctx = replace(ctx, parts=parts, meta_types=merge_unit_types(ing, base_types))
        total_docs = sum(pt["docs"] for u in range(len(units)) for pt in ing[u]["parts"])
        if total_docs == 0:
            raise DatastoreError("the inputs hold no usable document" + (" (all were skipped)" if cfg.on_error == "skip" else ""))

        t = time.perf_counter()
        part_docs = [ing[u]["parts"][k]["docs"] for u, k in parts]
        dedup_stats = run_dedup(job, executor, cfg, list(parts), part_docs, list(prior), tokenize=ctx)
        seconds["dedup"] = time.perf_counter() - t

        t = time.perf_counter()
        tok = _run_step(job, executor, "tokenize", tokenize_part, ctx, list(range(len(parts))), _tokenize_marker, "shard")
        seconds["tokenize"] = time.perf_counter() - t

        # offsets of every part inside this segment, then the arrays at their final size
        offsets, d, c, b = [], 0, 0, 0
        for p in range(len(parts)):
            offsets.append({"doc": d, "chunk": c, "byte": b})
            d, c, b = d + tok[p]["docs"], c + tok[p]["chunks"], b + tok[p]["text_bytes"]
        L = cfg.chunk_length
        shapes = {
            "tokens": ((c, L), tok_info["token_dtype"]),
            "chunk_doc_ids": ((c,), "int64"),
            "chunk_ntokens": ((c,), "int32"),
            "chunk_byte_spans": ((c, 2), "int64"),
            "doc_first_chunk": ((d + 1,), "int64"),
            "doc_byte_offsets": ((d + 1,), "int64"),
        }
        ctx = replace(ctx, offsets=tuple(offsets), array_shapes=shapes)
        if job.done("finalize/arrays") is None:
            lay.arrays.mkdir(parents=True, exist_ok=True)
            for name in shapes:
                _open_array(lay, name, "w+", shapes).flush()
            with open(lay.arrays / "text.bin", "wb") as fh:
                fh.truncate(b)
            ends = _open_array(lay, "doc_first_chunk", "r+", shapes)
            ends[d] = c
            ends.flush()
            ends = _open_array(lay, "doc_byte_offsets", "r+", shapes)
            ends[d] = b
            ends.flush()
            job.mark_done("finalize/arrays", {k: [list(v[0]), v[1]] for k, v in shapes.items()})

        t = time.perf_counter()
        fin = _run_step(job, executor, "finalize", finalize_part, ctx, list(range(len(parts))), _finalize_marker, "shard")
        seconds["finalize"] = time.perf_counter() - t

    skipped: dict[str, int] = {}
    for u in range(len(units)):
        for k, v in ing[u]["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    if skipped:
        with atomic_path(lay.out / "skipped.txt") as tmp:
            with open(tmp, "w") as out:
                for u in range(len(units)):
                    if lay.skips(u).exists():
                        out.write(lay.skips(u).read_text())
    shards = [fin[p] for p in range(len(parts))]
    # per-shard checksums of the chunk and document arrays (rows local to the segment): reads verify the shard they touch
    arrays = {name: np.load(lay.arrays / f"{name}.npy", mmap_mode="r") for name in CHUNK_ARRAYS + DOC_ARRAYS}
    for s in shards:
        s["arrays_sha256"] = shard_arrays_sha256(arrays, s["first_chunk_id"], s["chunks"], s["first_doc_id"], s["documents"])
    del arrays
    return {"shards": shards, "shapes": shapes, "ing": ing, "dedup": dedup_stats, "skipped": skipped,
            "total_docs": total_docs, "meta_types": dict(ctx.meta_types)}


def _dedup_stats(cfg: BuildConfig, steps: dict[str, Any]) -> dict[str, Any]:
    dedup_stats, skipped = steps["dedup"], steps["skipped"]
    return {
        "input_documents": steps["total_docs"] + sum(skipped.values()),
        "skipped": skipped,
        "removed_exact": dedup_stats["exact_duplicate"],
        "removed_near": dedup_stats["near_duplicate"],
        "kept": dedup_stats["kept"],
        "method": "exact content hash (blake2b-128) + MinHash LSH in Bloom filters (LSHBloom)",
        "ngram": cfg.dedup.ngram, "threshold": cfg.dedup.threshold, "num_perm": cfg.dedup.num_perm,
        "bands": cfg.dedup.bands, "rows": cfg.dedup.rows,
        "near_fp_rate": cfg.dedup.near_fp_rate, "exact_fp_rate": cfg.dedup.exact_fp_rate,
        "bloom_bytes_this_build": dedup_stats["bloom_bytes"],
        "bloom_bytes_per_billion_documents": bloom_bytes_per_billion(cfg.dedup),
    }


def _segment_record(name: str, rel: str, version: int, id_base: tuple[int, int], steps: dict[str, Any],
                    first_shard: int, inputs: list[dict]) -> dict[str, Any]:
    """A version's record of one segment written at ``rel`` (root-relative; "." for a fresh build)."""
    shards = steps["shards"]
    prefix = "" if rel == "." else rel + "/"
    text_bytes = sum(s["text_bytes"] for s in shards)
    return {
        "name": name, "dir": rel, "version_added": version,
        "first_doc_id": id_base[0], "n_docs": sum(s["documents"] for s in shards),
        "first_chunk_id": id_base[1], "n_chunks": sum(s["chunks"] for s in shards),
        "n_tokens": sum(s["tokens"] for s in shards), "text_bytes": text_bytes,
        "arrays": {n: {"file": f"{prefix}arrays/{n}.npy", "shape": list(sh[0]), "dtype": sh[1]} for n, sh in steps["shapes"].items()}
        | {"text": {"file": f"{prefix}arrays/text.bin", "bytes": text_bytes}},
        "first_shard": first_shard, "n_shards": len(shards), "purged_doc_ids": [],
        "metadata_fields": steps["meta_types"], "inputs": inputs,
    }


def _manifest(cfg: BuildConfig, plan: dict[str, Any], tok_info: dict[str, Any], steps: dict[str, Any], gen: str) -> dict:
    shards, ing = steps["shards"], steps["ing"]
    stats = _dedup_stats(cfg, steps)
    stats["generations"] = [{"file": gen, "expected_docs": steps["total_docs"], "version": 1}]
    fingerprint = hashlib.sha256()
    fingerprint.update(tok_info["vocab_hash"].encode())
    fingerprint.update(str(cfg.chunk_length).encode())
    for s in shards:
        for key in ("documents_file", "chunks_file"):
            fingerprint.update(s[key]["sha256"].encode())
        fingerprint.update(s["tokens_sha256"].encode())
    seg = _segment_record("seg-00001", ".", 1, (0, 0), steps, 0, plan["files"])
    return {
        "format_version": schema.FORMAT_VERSION,
        "created_by": f"retromem {__version__}",
        "datastore_id": fingerprint.hexdigest(),  # the lineage's id: kept by every later version
        "version": 1,
        "parent_version": None,
        "operation": "build",
        "tokenizer": tok_info,
        "chunk_length": cfg.chunk_length,
        "counts": {
            "documents": seg["n_docs"],
            "chunks": seg["n_chunks"],
            "tokens": seg["n_tokens"],
            "text_bytes": seg["text_bytes"],
            "input_chars": sum(r["chars"] for r in ing.values()),
            "shards": len(shards),
            "segments": 1,
            "deleted_documents": 0,
        },
        "shards": shards,
        "segments": [seg],
        "arrays": seg["arrays"],  # the one segment's, as datastores of one segment always recorded
        "metadata_fields": steps["meta_types"],
        "tombstones": None,
        "audit": [],
        "dedup": stats,
        "inputs": plan["files"],
        "build_config": plan["config"],
    }


# ---------------------------------------------------------------------------------------------
# add: a new segment


@dataclass
class AddResult:
    manifest: dict[str, Any]  # of the new version
    version: int
    segment: dict[str, Any]  # its record in the manifest
    seconds: dict[str, float]
    bytes_written: int  # every file the add wrote (the segment, its dedup generation, the version files)


def add(path: str | Path, inputs: list[str] | tuple[str, ...], *, format: str = "auto", text_field: str = "text",
        id_field: str | None = "id", on_error: str = "raise", shard_bytes: int | None = None, workers: int = 0,
        executor: str = "local", ray_address: str | None = None) -> AddResult:
    """Append ``inputs`` to the datastore at ``path`` as a new immutable segment and version.

    Ids continue where the datastore ends; documents are deduplicated against everything already in
    it through its kept dedup generations (no old text is read) and against each other; the
    normalization, dedup settings, tokenizer and chunk length are the datastore's. Metadata fields
    must agree in type with the declared ones (int64 widens to double). Nothing the current
    version reads is touched: a killed add leaves it as the newest version, and the same command
    re-run resumes the segment (another command, or a version published meanwhile, starts it over).
    """
    from retromem.datastore.store import Datastore  # the read side: floor-internal, no circle (store never imports pipeline)

    path = Path(path)
    files = expand_inputs(list(inputs), format)
    t0 = time.perf_counter()
    with open_job(path, "datastore", legacy=("manifest.json",)) as job:
        ensure_version_file(path)
        base = Datastore.open(path)
        bm = base.manifest
        v = base.version + 1
        name = f"seg-{v:05d}"
        rel = f"segments/{name}"
        segdir = path / rel
        orig = bm["build_config"]
        cfg = BuildConfig(inputs=tuple(inputs), out=str(segdir), format=format, text_field=text_field,
                          id_field=id_field or None, normalize=orig["normalize"], dedup=orig["dedup"],
                          tokenizer=orig["tokenizer"], chunk_length=base.chunk_length,
                          shard_bytes=shard_bytes or int(orig["shard_bytes"]), on_error=on_error,
                          workers=workers, executor=executor, ray_address=ray_address)
        plan = {"config": cfg.identity(), "files": _fingerprint(files), "base_version": base.version,
                "base_version_id": base.version_id}
        preflight(path, estimated_bytes(files), "the datastore add")
        lay = Layout(segdir, path)
        if segdir.exists() and (not lay.plan.exists() or read_json(lay.plan) != plan):
            # an add that never published (killed, with other inputs, or overtaken by another version): start over
            logger.info("discarding the unfinished segment %s", segdir)
            shutil.rmtree(segdir)
        if lay.plan.exists():
            logger.info("resuming the add in %s", segdir)
        else:
            write_json(lay.plan, plan)
        job.work = lay.work  # done-markers of this add live in its segment's _work/
        seconds: dict[str, float] = {}
        prior = [(path / g["file"], int(g["expected_docs"])) for g in bm["dedup"].get("generations", [])]
        if not prior:
            logger.warning("%s keeps no dedup filters (built before they were kept): the add is deduplicated "
                           "only within itself", path)
        id_base = (base.num_documents, base.num_chunks)
        steps = _run_steps(job, cfg, files, bm["tokenizer"], seconds, tokenizer_root=str(path), id_base=id_base,
                           prior=prior, base_types=bm.get("metadata_fields", {}))
        gen = _keep_dedup_generation(lay, path, v)
        job.clear_work()
        shards = []
        for s in steps["shards"]:  # root-relative paths, global ids
            s = dict(s, first_doc_id=s["first_doc_id"] + id_base[0], first_chunk_id=s["first_chunk_id"] + id_base[1])
            for key in ("documents_file", "chunks_file", "removed_file"):
                s[key] = dict(s[key], path=f"{rel}/{s[key]['path']}")
            shards.append(s)
        seg = _segment_record(name, rel, v, id_base, {**steps, "shards": shards}, len(bm["shards"]), plan["files"])
        new_files = file_records(path, rel)
        new_files[gen] = {"bytes": (path / gen).stat().st_size, "sha256": sha256_file(path / gen)}
        m = {k: val for k, val in bm.items() if k != SECTION}
        added = _dedup_stats(cfg, steps)
        old = bm["dedup"]
        m.update({
            "version": v, "parent_version": base.version, "operation": "add", "created": _now(),
            "segments": bm["segments"] + [seg], "shards": bm["shards"] + shards,
            "metadata_fields": steps["meta_types"],
            "counts": {**bm["counts"],
                       "documents": bm["counts"]["documents"] + seg["n_docs"],
                       "chunks": bm["counts"]["chunks"] + seg["n_chunks"],
                       "tokens": bm["counts"]["tokens"] + seg["n_tokens"],
                       "text_bytes": bm["counts"]["text_bytes"] + seg["text_bytes"],
                       "input_chars": bm["counts"]["input_chars"] + sum(r["chars"] for r in steps["ing"].values()),
                       "shards": len(bm["shards"]) + len(shards), "segments": len(bm["segments"]) + 1},
            "dedup": {**old,
                      "input_documents": old["input_documents"] + added["input_documents"],
                      "skipped": {k: old["skipped"].get(k, 0) + added["skipped"].get(k, 0) for k in {*old["skipped"], *added["skipped"]}},
                      "removed_exact": old["removed_exact"] + added["removed_exact"],
                      "removed_near": old["removed_near"] + added["removed_near"],
                      "kept": old["kept"] + added["kept"],
                      "generations": old.get("generations", []) + [{"file": gen, "expected_docs": steps["total_docs"], "version": v}]},
        })
        m.pop("arrays", None)  # several segments: each records its own
        m[SECTION] = next_integrity(bm, new_files)
        publish_version(path, m)
        written = sum(int(r["bytes"]) for r in new_files.values()) + 2 * (path / "manifest.json").stat().st_size
        seconds["total"] = time.perf_counter() - t0
        return AddResult(m, v, seg, seconds, written)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
