"""Building the exact n-gram index: a datastore's token streams in the ``infini-gram`` package's
on-disk layout, and the suffix array built by that package's own Rust indexer.

Layout, per shard directory (``shard-00000``, ...): ``tokenized.0`` holds each document as a
``0xFF..FF`` separator followed by its token ids, little-endian, 2 or 4 bytes per token;
``offset.0`` the byte offset of each document's separator as uint64; ``table.0`` the suffix array
(``ptr_size`` little-endian bytes per entry), built with ``rust_indexing make-part | merge | concat``.
``ngram_index.json`` records the datastore the index came from, each shard and its file sizes.

Large datastores are cut into shards of whole documents; every shard is written atomically and
marked done, so a killed build re-run continues where it stopped. The query engine over this
layout is :class:`retromem.index.ngram.NgramIndex`.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retromem.config import fail, is_int, non_negative_int, one_of, positive_int
from retromem.datastore.atomic import sha256_file
from retromem.diskspace import preflight
from retromem.datastore.job import Job, open_job
from retromem.errors import ConfigError, NgramIndexError
from retromem.index.types import NgramBuildResult, record_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "ngram_index.json"
ENGINE_VERSION = 4  # infini-gram index layout v4: tokens in reading order, one suffix array per shard
# The package's indexer lets each make-part job read this many bytes past its end so that suffixes
# starting near a part boundary sort correctly; the merge step must be told the same number.
_HACK = 100_000


# ---------------------------------------------------------------------------------------------
# layout


def token_width_for(vocab_size: int) -> int:
    """Bytes per token in the infini-gram layout; the all-ones id is the document separator, so
    the vocabulary must leave it free."""
    if vocab_size < 0xFFFF:
        return 2
    if vocab_size < 0xFFFFFFFF:
        return 4
    raise ConfigError(f"vocabulary of {vocab_size} ids is too large for an n-gram index (at most {0xFFFFFFFF - 1})")


def token_dtype(width: int) -> np.dtype:
    """The little-endian numpy dtype of ``width``-byte tokens in ``tokenized.0``."""
    return np.dtype("<u2") if width == 2 else np.dtype("<u4")


def _exit_text(code: int) -> str:
    """How the indexer ended: ``exit 1``, or the signal that killed it (SIGXFSZ: a file-size limit)."""
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        return f"killed by {name}" + (": a file reached the file size limit, as on a full disk" if name == "SIGXFSZ" else "")
    return f"exit {code}"


def _ptr_size(ds_bytes: int) -> int:
    # bytes per suffix-array entry, as the package's indexer and engine compute it
    return max(1, int(math.ceil(math.log2(max(ds_bytes, 2)) / 8)))


def _indexer_binary() -> Path:
    import infini_gram

    exe = Path(infini_gram.__file__).parent / "rust_indexing"
    if not exe.is_file():
        raise NgramIndexError(f"the infini-gram package has no indexer at {exe}; reinstall `infini-gram`")
    return exe


def _shard_dir(out: Path, s: int) -> Path:
    return out / f"shard-{s:05d}"


# ---------------------------------------------------------------------------------------------
# build


@dataclass(frozen=True)
class NgramBuildConfig:
    """How to build: ``shard_tokens`` bounds each shard (whole documents; a single longer document
    gets a shard of its own), ``cpus`` and ``mem_bytes`` are what the Rust indexer may use."""

    shard_tokens: int = 1_000_000_000
    cpus: int = 0  # 0: every core (divided between shards built at once)
    mem_bytes: int = 4 << 30
    executor: str = "local"  # where shards are built: local processes, or one Ray task per shard
    workers: int = 1  # shards built at once (local); Ray: CPUs of a local Ray (0: all)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        positive_int(self.shard_tokens, "shard_tokens", flag="--shard-tokens")
        non_negative_int(self.cpus, "cpus", flag="--cpus")  # 0: every core
        one_of(self.executor, "executor", ("local", "ray"), flag="--executor")
        non_negative_int(self.workers, "workers", flag="--workers")
        if not is_int(self.mem_bytes) or self.mem_bytes < 16 << 20:
            fail("mem_bytes", "be at least 16 MiB", self.mem_bytes, flag="--mem")


def _doc_token_counts(ds, d0: int = 0, d1: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(first chunk_id of documents d0..d1 and then d1's (d1 - d0 + 1,), tokens per document (d1 - d0,)),
    reading only those documents' rows: a shard's task must not pay for the whole datastore."""
    first = np.asarray(ds.doc_first_chunk_array[d0 : (None if d1 is None else d1 + 1)], dtype=np.int64)
    c0, c1 = int(first[0]), int(first[-1])
    ntok = np.asarray(ds.chunk_ntokens_array[c0:c1]).astype(np.int64)
    csum = np.concatenate(([0], np.cumsum(ntok)))
    return first, csum[first[1:] - c0] - csum[first[:-1] - c0]


def _plan_shards(doc_tokens: np.ndarray, shard_tokens: int) -> list[tuple[int, int]]:
    """[first_doc, end_doc) ranges of whole documents, each at most ``shard_tokens`` (+ separators)
    unless one document alone is longer."""
    plan, start, size = [], 0, 0
    for d, n in enumerate((doc_tokens + 1).tolist()):
        if size and size + n > shard_tokens:
            plan.append((start, d))
            start, size = d, 0
        size += n
    if start < len(doc_tokens) or not plan:
        plan.append((start, len(doc_tokens)))
    return plan


def _write_token_stream(ds, first_chunk: np.ndarray, doc_tokens: np.ndarray, d0: int, d1: int,
                        width: int, work: Path, shard: Path, block_tokens: int = 1 << 24,
                        chunk_ntok: np.ndarray | None = None) -> None:
    """tokenized.0 and offset.0 of documents [d0, d1), written through temporary files in
    ``work`` (the engine reads every file named *tokenized* in a shard directory). ``chunk_ntok``
    overrides the datastore's tokens per chunk (0 for the chunks of deleted documents, written
    empty), and must agree with ``doc_tokens``."""
    dt = token_dtype(width)
    sep = np.iinfo(dt).max
    base = int(first_chunk[d0])
    toks = ds.token_rows(base, int(first_chunk[d1]))  # rows [base, ..): only their datastore shards are verified
    ntok = ds.chunk_ntokens_array if chunk_ntok is None else chunk_ntok
    L = ds.chunk_length
    lens = doc_tokens[d0:d1] + 1  # each document is its separator, then its tokens
    offsets = (np.concatenate(([0], np.cumsum(lens)[:-1])) * width).astype(np.uint64)
    tmp_ds, tmp_od = work / f"{shard.name}.tokenized.tmp", work / f"{shard.name}.offset.tmp"
    with open(tmp_ds, "wb") as fh:
        d = d0
        while d < d1:
            # a block of whole documents of about block_tokens tokens
            e = d + 1
            acc = int(lens[d - d0])
            while e < d1 and acc + int(lens[e - d0]) <= block_tokens:
                acc += int(lens[e - d0])
                e += 1
            c0, c1 = int(first_chunk[d]), int(first_chunk[e])
            rows = np.asarray(toks[c0 - base : c1 - base])
            valid = np.arange(L)[None, :] < np.asarray(ntok[c0:c1])[:, None]
            flat = rows[valid].astype(dt)  # row-major: each document's tokens in reading order
            blens = lens[d - d0 : e - d0]
            out = np.empty(int(blens.sum()), dtype=dt)
            starts = np.concatenate(([0], np.cumsum(blens)[:-1]))
            is_sep = np.zeros(len(out), dtype=bool)
            is_sep[starts] = True
            out[is_sep] = sep
            out[~is_sep] = flat
            fh.write(out.tobytes())
            d = e
        fh.flush()
        os.fsync(fh.fileno())
    with open(tmp_od, "wb") as fh:
        fh.write(offsets.tobytes())
        fh.flush()
        os.fsync(fh.fileno())
    shard.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_od, shard / "offset.0")
    os.replace(tmp_ds, shard / "tokenized.0")


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise NgramIndexError(f"infini-gram indexer failed at {what} ({_exit_text(proc.returncode)}): {proc.stdout[-2000:]}")


def _build_suffix_array(shard: Path, work: Path, width: int, cpus: int, mem_bytes: int) -> None:
    """table.0 of a shard with the package's indexer: sorted parts in parallel, merged, concatenated."""
    exe = str(_indexer_binary())
    data = shard / "tokenized.0"
    ds_size = data.stat().st_size
    ratio = _ptr_size(ds_size)
    # as the package's own driver does: enough batches that each job's part fits in memory
    batches = 1
    while batches * (mem_bytes // (12 if width == 1 else 8)) < ds_size:
        batches *= 2
    # Every part but the last must have its full _HACK bytes of look-ahead inside the file: the
    # merge step takes a clipped look-ahead for the end of the file and drops suffixes (the package's
    # own driver loses ~10% of a small corpus that way). So parts are at least _HACK bytes long.
    jobs = max(1, min(batches * cpus, ds_size // (_HACK + width)))
    S = max(ds_size // jobs, width)
    S += (-S) % width  # parts hold whole tokens
    parts = work / f"{shard.name}.parts"
    merged = work / f"{shard.name}.merged"
    tmp_table = work / f"{shard.name}.table.tmp"
    for d in (parts, merged):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    ranges = [(i * S, min((i + 1) * S + _HACK, ds_size)) for i in range(jobs) if i * S < ds_size]
    for b in range(0, len(ranges), cpus):
        procs = [subprocess.Popen([exe, "make-part", "--data-file", str(data), "--parts-dir", str(parts),
                                   "--start-byte", str(s), "--end-byte", str(e), "--ratio", str(ratio),
                                   "--token-width", str(width)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for s, e in ranges[b : b + cpus]]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise NgramIndexError(f"infini-gram indexer failed at make-part of {shard.name} ({_exit_text(p.returncode)}): "
                                      f"{out.decode(errors='replace')[-2000:]}")
    _run([exe, "merge", "--data-file", str(data), "--parts-dir", str(parts), "--merged-dir", str(merged),
          "--num-threads", str(cpus), "--hacksize", str(_HACK), "--ratio", str(ratio), "--token-width", str(width)],
         f"merge of {shard.name}")
    shutil.rmtree(parts)
    _run([exe, "concat", "--data-file", str(data), "--merged-dir", str(merged), "--merged-file", str(tmp_table),
          "--num-threads", str(cpus), "--ratio", str(ratio), "--token-width", str(width)], f"concat of {shard.name}")
    shutil.rmtree(merged)
    expected = ds_size // width * ratio
    if tmp_table.stat().st_size != expected:
        raise NgramIndexError(f"infini-gram indexer wrote {tmp_table.stat().st_size} bytes of suffix array for "
                              f"{shard.name}, expected {expected}")
    with open(tmp_table, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp_table, shard / "table.0")


def _peak_rss() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024  # Linux reports KiB


def build_ngram_index(datastore_path: str | Path, out: str | Path, config: NgramBuildConfig | None = None,
                      *, overwrite: bool = False, progress: bool = True) -> NgramBuildResult:
    """Build (or finish building) the suffix-array index of the datastore at ``datastore_path`` in ``out``.

    The output directory is a job (:func:`retromem.datastore.job.open_job`, kind ``ngram-index``):
    locked while the build runs, and ``overwrite`` only ever empties an n-gram index.
    """
    from retromem.datastore import Datastore

    import infini_gram  # noqa: F401  (fail early with a clear message when it is missing)

    cfg = config or NgramBuildConfig()
    t0 = time.perf_counter()
    ds = Datastore.open(datastore_path)
    with open_job(out, "ngram-index", overwrite=overwrite, legacy=(MANIFEST_NAME, "_work/build.json")) as job:
        return _build(ds, datastore_path, cfg, job, t0, progress)


def _shard_marker(shard: Path, step: str) -> str:
    return f"{shard.name}.{step}.done"  # _work/shard-00000.table.done.json


def _ngram_shard(ctx: tuple, item: tuple[int, int, int]) -> dict:
    """One shard: its token stream (kept if a killed run finished it: tokenized.0 is renamed into
    place last), then its suffix array. A step of ``Job.map``: any process, or any Ray node."""
    from retromem.datastore import Datastore

    datastore_path, out, work, width, cpus, mem_bytes = ctx
    s, d0, d1 = item
    ds = Datastore.open(datastore_path)
    # this shard's documents only (local indices 0..d1-d0): its time and memory follow the shard, not the datastore
    first_chunk, doc_tokens = _doc_token_counts(ds, d0, d1)
    sd = _shard_dir(Path(out), s)
    Path(work).mkdir(parents=True, exist_ok=True)
    if not (sd / "tokenized.0").is_file():
        _write_token_stream(ds, first_chunk, doc_tokens, 0, d1 - d0, width, Path(work), sd)
    _build_suffix_array(sd, Path(work), width, cpus, mem_bytes)
    return {"docs": d1 - d0, "tokens": int(doc_tokens.sum()) + (d1 - d0)}


def _build(ds, datastore_path: str | Path, cfg: NgramBuildConfig, job: Job, t0: float, progress: bool) -> NgramBuildResult:
    from tqdm.auto import tqdm

    out, work = job.path, job.work
    identity = {"datastore_id": ds.datastore_id, "shard_tokens": cfg.shard_tokens, "format_version": FORMAT_VERSION}
    m = job.finished(MANIFEST_NAME, ds.datastore_id, what="an n-gram index", error=NgramIndexError)
    if m is not None:
        return NgramBuildResult(out, m, True, time.perf_counter() - t0, _peak_rss())
    recorded = job.done("build")
    if recorded is not None and recorded != identity:
        raise NgramIndexError(f"{out} holds an unfinished n-gram build of another datastore or other settings; "
                              f"pass --overwrite or another --out")
    job.mark_done("build", identity)
    ds.verify_reads()  # the token streams read the whole token array: check every shard's checksums first

    tok = ds.manifest["tokenizer"]
    vocab = int(tok["vocab_size"])
    width = token_width_for(vocab)
    cpus = cfg.cpus or os.cpu_count() or 1
    first_chunk, doc_tokens = _doc_token_counts(ds)
    plan = _plan_shards(doc_tokens, cfg.shard_tokens)
    total = int(doc_tokens.sum()) + len(doc_tokens)
    logger.info("n-gram index of %s: %d documents, %d tokens, %d shard(s), %d bytes per token",
                datastore_path, len(doc_tokens), total, len(plan), width)
    # the token stream, then the suffix array written as parts and merged: about 2x its final size at the peak
    preflight(out, total * width + 3 * total * _ptr_size(total * width) + 8 * len(doc_tokens), "the n-gram index build")
    from retromem.datastore.executors import make_executor

    # One task per shard (token stream, then suffix array), on local processes or Ray: every task opens
    # the datastore and writes its shard under `out`, so on Ray both must be on storage every node sees.
    # Indexer processes per task: `cpus` shared by the shards built at once (one each on Ray).
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    at_once = 1 if cfg.executor == "local" and cfg.workers == 1 else (cfg.workers or os.cpu_count() or 1)
    task_cpus = 1 if cfg.executor == "ray" else max(1, cpus // min(at_once, len(plan)))
    ctx = (str(ds.path), str(out), str(work), width, task_cpus, cfg.mem_bytes)
    items = [(s, d0, d1) for s, (d0, d1) in enumerate(plan)]
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="n-gram index", disable=not progress)
    for _item, rec in job.map(executor, _ngram_shard, ctx, items, marker=lambda it: _shard_marker(_shard_dir(out, it[0]), "table")):
        bar.update(int(rec["tokens"]))
    bar.close()
    shards = []
    for s, (d0, d1) in enumerate(plan):
        n = int(doc_tokens[d0:d1].sum()) + (d1 - d0)
        sd = _shard_dir(out, s)
        ds_bytes = n * width
        shards.append({
            "shard": s, "dir": sd.name, "first_doc_id": d0, "documents": d1 - d0, "tokens": n,
            "tokenized_bytes": ds_bytes, "offset_bytes": (d1 - d0) * 8,
            "table_bytes": n * _ptr_size(ds_bytes), "ptr_size": _ptr_size(ds_bytes),
        })
    import importlib.metadata as md

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "infini-gram suffix array",
        "engine": {"package": "infini-gram", "version": md.version("infini-gram"), "index_version": ENGINE_VERSION},
        "datastore_id": ds.datastore_id,
        "datastore_path": record_path(datastore_path, out),  # relative: the tree may move
        "datastore_manifest_sha256": sha256_file(ds.path / "manifest.json"),
        "tokenizer": {k: tok[k] for k in ("name", "vocab_hash", "vocab_size") if k in tok},
        "vocab_size": vocab,
        "eos_token_id": int(tok.get("eos_token_id") if tok.get("eos_token_id") is not None else tok["pad_token_id"]),
        "token_width": width,
        "token_dtype": "u16" if width == 2 else "u32",
        "chunk_length": ds.chunk_length,
        "counts": {"documents": len(doc_tokens), "tokens": int(doc_tokens.sum()), "shards": len(plan)},
        "shards": shards,
        "build": {"shard_tokens": cfg.shard_tokens, "cpus": cpus, "mem_bytes": cfg.mem_bytes},
    }
    manifest = job.seal(MANIFEST_NAME, manifest)  # last, with every file's size and checksum
    job.clear_work()
    return NgramBuildResult(out, manifest, False, time.perf_counter() - t0, _peak_rss())


__all__ = [
    "ENGINE_VERSION", "FORMAT_VERSION", "MANIFEST_NAME", "NgramBuildConfig", "NgramIndexError", "build_ngram_index",
    "token_dtype", "token_width_for",
]
