"""Exact n-gram search over a datastore with the infini-gram suffix array.

:func:`build_ngram_index` writes the datastore's token streams in the on-disk layout of the
``infini-gram`` package (``tokenized.0``: each document as a ``0xFF..FF`` separator followed by its
token ids, little-endian, 2 or 4 bytes per token; ``offset.0``: the byte offset of each document's
separator as uint64) and builds the suffix array (``table.0``) with that package's own Rust indexer
(``rust_indexing make-part | merge | concat``). Large datastores are cut into shards of whole
documents, one directory per shard; every shard is written atomically and marked done, so a killed
build re-run continues where it stopped. ``ngram_index.json`` records the datastore it came from.

:class:`NgramIndex` opens the shards with the package's engine (``InfiniGramEngine``, which queries
several shards together) and exposes a few verbs (``count``, ``prob``, ``next_token_distribution``,
``infgram_prob``, ``infgram_next_token_distribution``, ``find``, ``search_documents``, ``score``).
Queries are text (tokenized with the datastore's tokenizer) or token ids. Results are frozen
dataclasses; every occurrence maps back to the datastore as ``doc_id``, ``chunk_id`` and token offset
and can be fetched as a chunk with its continuation (:meth:`NgramIndex.fetch`), like a dense hit.
The engine's ``{'error': ...}`` dictionaries are turned into exceptions and never returned.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from retromem.datastore.atomic import read_json, sha256_file, write_json
from retromem.index.types import ChunkPayload, fetch_payloads
from retromem.errors import ConfigError, IndexFormatError, QueryError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "ngram_index.json"
ENGINE_VERSION = 4  # infini-gram index layout v4: tokens in reading order, one suffix array per shard
# The package's indexer lets each make-part job read this many bytes past its end so that suffixes
# starting near a part boundary sort correctly; the merge step must be told the same number.
_HACK = 100_000

Query = Union[str, Sequence[int], np.ndarray]


class NgramIndexError(IndexFormatError):
    """An n-gram index directory is missing, truncated, unfinished, or built from another datastore."""


class NgramQueryError(QueryError):
    """A query is empty, too long, has token ids outside the vocabulary, or a CNF is too large."""


# ---------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Count:
    count: int
    approx: bool = False


@dataclass(frozen=True)
class Prob:
    """P(next_token | prompt) from counts; ``prob`` is ``None`` when the prompt never occurs."""

    prompt_count: int
    cont_count: int
    prob: float | None


@dataclass(frozen=True)
class InfgramProb:
    """∞-gram probability: the prompt is cut to its longest suffix that occurs in the corpus
    (``suffix_len`` tokens, 0 for the unigram distribution) and P(next_token | that suffix)."""

    prompt_count: int
    cont_count: int
    prob: float
    suffix_len: int


@dataclass(frozen=True)
class TokenCount:
    count: int
    prob: float


@dataclass(frozen=True)
class NextTokenDistribution:
    """Next-token counts after the prompt (or after its longest occurring suffix, when
    ``suffix_len`` is set). ``approx`` when the engine sampled ``max_support`` occurrences."""

    prompt_count: int
    tokens: dict[int, TokenCount]
    approx: bool
    suffix_len: int | None = None

    def top(self, k: int = 10) -> list[tuple[int, TokenCount]]:
        return sorted(self.tokens.items(), key=lambda kv: (-kv[1].count, kv[0]))[:k]


@dataclass(frozen=True)
class Occurrence:
    """One place an n-gram occurs: token ``offset`` into document ``doc_id``, which falls in chunk
    ``chunk_id`` at ``chunk_offset`` (an n-gram may run on into the next chunk)."""

    doc_id: int
    chunk_id: int
    offset: int
    chunk_offset: int
    shard: int


@dataclass(frozen=True)
class FindResult:
    count: int
    occurrences: tuple[Occurrence, ...]  # at most ``limit``, in suffix-array order


@dataclass(frozen=True)
class DocumentSearch:
    """Matches of a CNF (AND of ORs of n-grams) and where they are."""

    count: int
    approx: bool
    hits: tuple[Occurrence, ...]

    @property
    def doc_ids(self) -> list[int]:
        return sorted({h.doc_id for h in self.hits})


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    prob: float
    suffix_len: int
    prompt_count: int
    cont_count: int


@dataclass(frozen=True)
class NgramBuildResult:
    path: Path
    manifest: dict[str, Any]
    already_complete: bool
    seconds: float
    peak_rss_bytes: int  # largest resident set of this process or any indexer child


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


def _dtype(width: int) -> np.dtype:
    return np.dtype("<u2") if width == 2 else np.dtype("<u4")


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


@dataclass(frozen=True)
class NgramBuildConfig:
    """How to build: ``shard_tokens`` bounds each shard (whole documents; a single longer document
    gets a shard of its own), ``cpus`` and ``mem_bytes`` are what the Rust indexer may use."""

    shard_tokens: int = 1_000_000_000
    cpus: int = 0  # 0: every core
    mem_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise ConfigError(f"`shard_tokens` must be at least 1, got {self.shard_tokens}")
        if self.cpus < 0:
            raise ConfigError(f"`cpus` must be 0 (all cores) or positive, got {self.cpus}")
        if self.mem_bytes < 16 << 20:
            raise ConfigError(f"`mem_bytes` must be at least 16 MiB, got {self.mem_bytes}")


def _doc_token_counts(ds) -> tuple[np.ndarray, np.ndarray]:
    """(doc_first_chunk (n_docs + 1,), tokens per document (n_docs,))."""
    first = ds.doc_first_chunk_array
    ntok = ds.chunk_ntokens_array.astype(np.int64)
    csum = np.concatenate(([0], np.cumsum(ntok)))
    first = np.asarray(first, dtype=np.int64)
    return first, csum[first[1:]] - csum[first[:-1]]


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
                        width: int, work: Path, shard: Path, block_tokens: int = 1 << 24) -> None:
    """tokenized.0 and offset.0 of documents [d0, d1), written through temporary files in
    ``work`` (the engine reads every file named *tokenized* in a shard directory)."""
    dt = _dtype(width)
    sep = np.iinfo(dt).max
    toks = ds.token_array
    ntok = ds.chunk_ntokens_array
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
            rows = np.asarray(toks[c0:c1])
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
        raise NgramIndexError(f"infini-gram indexer failed at {what} (exit {proc.returncode}): {proc.stdout[-2000:]}")


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
                raise NgramIndexError(f"infini-gram indexer failed at make-part of {shard.name} (exit {p.returncode}): "
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
    """Build (or finish building) the suffix-array index of the datastore at ``datastore_path`` in ``out``."""
    from tqdm.auto import tqdm

    from retromem.datastore import Datastore

    import infini_gram  # noqa: F401  (fail early with a clear message when it is missing)

    cfg = config or NgramBuildConfig()
    t0 = time.perf_counter()
    ds = Datastore.open(datastore_path)
    out = Path(out)
    identity = {"datastore_id": ds.datastore_id, "shard_tokens": cfg.shard_tokens, "format_version": FORMAT_VERSION}
    manifest_path = out / MANIFEST_NAME
    work = out / "_work"
    if overwrite and out.exists():
        shutil.rmtree(out)
    if manifest_path.exists():
        m = read_json(manifest_path)
        if m.get("datastore_id") != ds.datastore_id:
            raise NgramIndexError(f"{out} holds an n-gram index of datastore {m.get('datastore_id', '?')[:16]}, not of "
                                  f"{ds.datastore_id[:16]} at {datastore_path}; pass --overwrite or another --out")
        return NgramBuildResult(out, m, True, time.perf_counter() - t0, _peak_rss())
    if out.exists() and any(out.iterdir()):
        if not (work / "build.json").exists():
            raise NgramIndexError(f"{out} exists and is not an n-gram index; pass --overwrite or another --out")
        if read_json(work / "build.json") != identity:
            raise NgramIndexError(f"{out} holds an unfinished n-gram build of another datastore or other settings; "
                                  f"pass --overwrite or another --out")
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "build.json", identity)

    tok = ds.manifest["tokenizer"]
    vocab = int(tok["vocab_size"])
    width = token_width_for(vocab)
    cpus = cfg.cpus or os.cpu_count() or 1
    first_chunk, doc_tokens = _doc_token_counts(ds)
    plan = _plan_shards(doc_tokens, cfg.shard_tokens)
    total = int(doc_tokens.sum()) + len(doc_tokens)
    logger.info("n-gram index of %s: %d documents, %d tokens, %d shard(s), %d bytes per token",
                datastore_path, len(doc_tokens), total, len(plan), width)
    shards = []
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc="n-gram index", disable=not progress)
    for s, (d0, d1) in enumerate(plan):
        sd = _shard_dir(out, s)
        n = int(doc_tokens[d0:d1].sum()) + (d1 - d0)
        if not (work / f"{sd.name}.tokenized.done").exists():
            bar.set_postfix_str(f"{sd.name} tokens")
            _write_token_stream(ds, first_chunk, doc_tokens, d0, d1, width, work, sd)
            write_json(work / f"{sd.name}.tokenized.done", {"docs": d1 - d0, "tokens": n})
        if not (work / f"{sd.name}.table.done").exists():
            bar.set_postfix_str(f"{sd.name} suffix array")
            _build_suffix_array(sd, work, width, cpus, cfg.mem_bytes)
            write_json(work / f"{sd.name}.table.done", {"docs": d1 - d0, "tokens": n})
        ds_bytes = n * width
        shards.append({
            "shard": s, "dir": sd.name, "first_doc_id": d0, "documents": d1 - d0, "tokens": n,
            "tokenized_bytes": ds_bytes, "offset_bytes": (d1 - d0) * 8,
            "table_bytes": n * _ptr_size(ds_bytes), "ptr_size": _ptr_size(ds_bytes),
        })
        bar.update(n)
    bar.close()
    import importlib.metadata as md

    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "infini-gram suffix array",
        "engine": {"package": "infini-gram", "version": md.version("infini-gram"), "index_version": ENGINE_VERSION},
        "datastore_id": ds.datastore_id,
        "datastore_path": str(Path(datastore_path).resolve()),
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
    write_json(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return NgramBuildResult(out, manifest, False, time.perf_counter() - t0, _peak_rss())


# ---------------------------------------------------------------------------------------------
# queries


@dataclass(frozen=True)
class QueryLimits:
    """Caps on what one query may ask for; each is a caller's mistake to exceed."""

    max_query_tokens: int = 1000
    max_clauses: int = 8
    max_terms_per_clause: int = 16
    max_support: int = 1000  # occurrences sampled for a next-token distribution
    max_clause_freq: int = 50_000  # a CNF clause more frequent than this is sampled (approx)
    max_diff_tokens: int = 100

    def __post_init__(self) -> None:
        for f in ("max_query_tokens", "max_clauses", "max_terms_per_clause", "max_support", "max_clause_freq", "max_diff_tokens"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"`{f}` must be a positive integer, got {v!r}")


def _map(path: Path) -> mmap.mmap | bytes:
    """A read-only memory map of ``path`` (an empty file maps to b"", which mmap refuses)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return b""
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)


def _bound(ds: Any, sa: Any, p: int, q: bytes, lo: int, hi: int, *, upper: bool) -> int:
    """Binary search over suffix-array ranks [lo, hi): the first rank whose suffix, cut to len(q)
    bytes, is >= q (lower bound) or > q (upper bound). Entries are p-byte little-endian pointers."""
    n = len(q)
    while lo < hi:
        mid = (lo + hi) >> 1
        ptr = int.from_bytes(sa[mid * p:mid * p + p], "little")
        head = ds[ptr:ptr + n]
        if head < q or (upper and head == q):
            lo = mid + 1
        else:
            hi = mid
    return lo


def _check_engine(result: Any, verb: str) -> Any:
    # the package signals bad arguments with a dict; we check arguments first, so this is a bug
    if isinstance(result, dict) and "error" in result:
        raise NgramQueryError(f"infini-gram engine refused {verb}: {result['error']}")
    return result


class NgramIndex:
    """A finished suffix-array index, opened with the infini-gram engine over all its shards."""

    def __init__(self, path: str | Path, datastore=None, limits: QueryLimits | None = None) -> None:
        from retromem.datastore import Datastore

        self.path = Path(path)
        self.limits = limits or QueryLimits()
        mp = self.path / MANIFEST_NAME
        if not mp.exists():
            hint = " (an unfinished build: re-run `retromem index build-ngram` to finish it)" if (self.path / "_work").exists() else ""
            raise NgramIndexError(f"{self.path} is not an n-gram index: no {MANIFEST_NAME}{hint}")
        self.manifest = m = read_json(mp)
        if m.get("format_version") != FORMAT_VERSION:
            raise NgramIndexError(f"{self.path} has n-gram index format {m.get('format_version')}; this retromem reads "
                                  f"{FORMAT_VERSION}. Rebuild it with `retromem index build-ngram --overwrite`.")
        self._check_files()
        if datastore is None:
            datastore = m["datastore_path"]
        self.datastore = datastore if isinstance(datastore, Datastore) else Datastore.open(datastore)
        if self.datastore.datastore_id != m["datastore_id"]:
            raise NgramIndexError(f"{self.path} was built from datastore {m['datastore_id'][:16]}, not from "
                                  f"{self.datastore.datastore_id[:16]} at {self.datastore.path}; rebuild the index for it")
        self.vocab_size = int(m["vocab_size"])
        self.width = int(m["token_width"])
        self.chunk_length = int(m["chunk_length"])
        self._shards = m["shards"]
        # byte offsets of each document's separator, per shard, to map suffix-array pointers to documents
        self._doc_offsets = [np.fromfile(self.path / s["dir"] / "offset.0", dtype="<u8").astype(np.int64) for s in self._shards]
        self._tables = [np.memmap(self.path / s["dir"] / "table.0", dtype=np.uint8, mode="r") for s in self._shards]
        # the same files as plain mmaps, for the suffix-array binary search of count and find
        self._ds_maps = [_map(self.path / s["dir"] / "tokenized.0") for s in self._shards]
        self._sa_maps = [_map(self.path / s["dir"] / "table.0") for s in self._shards]
        self._dtype = _dtype(self.width)
        self._doc_first_chunk = self.datastore.doc_first_chunk_array
        from infini_gram.engine import InfiniGramEngine

        self.engine = InfiniGramEngine(
            index_dir=[str(self.path / s["dir"]) for s in self._shards], eos_token_id=int(m["eos_token_id"]),
            vocab_size=self.vocab_size, version=ENGINE_VERSION, token_dtype=m["token_dtype"],
            max_support=self.limits.max_support, max_clause_freq=self.limits.max_clause_freq,
            max_diff_tokens=self.limits.max_diff_tokens,
        )

    def _check_files(self) -> None:
        # the native engine memory-maps these files and would read past a short one: check first
        for s in self.manifest["shards"]:
            for name, key in (("tokenized.0", "tokenized_bytes"), ("offset.0", "offset_bytes"), ("table.0", "table_bytes")):
                f = self.path / s["dir"] / name
                if not f.is_file():
                    raise NgramIndexError(f"{f} is missing; rebuild the index with `retromem index build-ngram --overwrite`")
                size = f.stat().st_size
                if size != s[key]:
                    raise NgramIndexError(f"{f} is truncated or corrupt: {size} bytes, the index records {s[key]}; "
                                          f"rebuild the index with `retromem index build-ngram --overwrite`")

    @classmethod
    def open(cls, path: str | Path, datastore=None, limits: QueryLimits | None = None) -> "NgramIndex":
        return cls(path, datastore, limits)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["counts"]["tokens"])

    # -- argument checks -----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the datastore's tokenizer, without special tokens."""
        return list(self.datastore.tokenizer.encode(text, add_special_tokens=False))

    def ids(self, query: Query, what: str = "query", *, allow_empty: bool = False) -> list[int]:
        """Checked token ids of a text or id query."""
        if isinstance(query, str):
            ids = self.encode(query)
            if not ids and not allow_empty:
                raise NgramQueryError(f"`{what}` is empty: {query!r} has no tokens; give at least one token")
        else:
            if isinstance(query, (bytes, dict)) or not hasattr(query, "__len__"):
                raise TypeError(f"`{what}` must be text or a sequence of token ids, got {type(query).__name__}")
            arr = np.asarray(query)
            if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(f"`{what}` must be text or a flat sequence of integer token ids, got {arr.dtype} of shape {arr.shape}")
            ids = [int(x) for x in arr.reshape(-1)]
            if not ids and not allow_empty:
                raise NgramQueryError(f"`{what}` is empty; give at least one token id")
            bad = [x for x in ids if x < 0 or x >= self.vocab_size]
            if bad:
                raise NgramQueryError(f"`{what}` has token id {bad[0]} outside the vocabulary: ids must be in "
                                      f"0..{self.vocab_size - 1}")
        if len(ids) > self.limits.max_query_tokens:
            raise NgramQueryError(f"`{what}` has {len(ids)} tokens, more than max_query_tokens={self.limits.max_query_tokens}")
        return ids

    def token(self, token: int | str, what: str = "next_token") -> int:
        if isinstance(token, str):
            ids = self.encode(token)
            if len(ids) != 1:
                raise NgramQueryError(f"`{what}` must be a single token; {token!r} is {len(ids)} tokens {ids}")
            return ids[0]
        if isinstance(token, (bool, float)) or not isinstance(token, (int, np.integer)):
            raise TypeError(f"`{what}` must be a token id or a one-token text, got {type(token).__name__}")
        if not 0 <= int(token) < self.vocab_size:
            raise NgramQueryError(f"`{what}` {int(token)} is outside the vocabulary: ids must be in 0..{self.vocab_size - 1}")
        return int(token)

    # -- verbs ---------------------------------------------------------------------------

    def count(self, ngram: Query) -> Count:
        return Count(sum(hi - lo for lo, hi in self._segments(self.ids(ngram, "ngram"))), False)

    def _segments(self, ids: list[int]) -> list[tuple[int, int]]:
        """Per shard, the suffix-array rank range [lo, hi) of the suffixes that start with ``ids``.

        The same binary search as the engine's ``find`` (byte-wise comparison of the little-endian
        token bytes, which is the order the suffix array is sorted in), done here: the engine starts
        and joins an OS thread per shard for every query, which costs ~10x the search itself on a
        small machine (BENCHMARKS.md, "n-gram search"). A test checks both agree."""
        q = np.asarray(ids, dtype=self._dtype).tobytes()
        out = []
        for s, (ds, sa) in enumerate(zip(self._ds_maps, self._sa_maps)):
            p = int(self._shards[s]["ptr_size"])
            start = _bound(ds, sa, p, q, 0, len(sa) // p, upper=False)
            out.append((start, _bound(ds, sa, p, q, start, len(sa) // p, upper=True)))
        return out

    def prob(self, prompt: Query, next_token: int | str) -> Prob:
        r = _check_engine(self.engine.prob(prompt_ids=self.ids(prompt, "prompt", allow_empty=True),
                                           cont_id=self.token(next_token)), "prob")
        pc = int(r["prompt_cnt"])
        return Prob(pc, int(r["cont_cnt"]), float(r["prob"]) if pc > 0 else None)

    def next_token_distribution(self, prompt: Query) -> NextTokenDistribution:
        r = _check_engine(self.engine.ntd(prompt_ids=self.ids(prompt, "prompt", allow_empty=True)), "ntd")
        return NextTokenDistribution(int(r["prompt_cnt"]), self._dist(r), bool(r["approx"]))

    def infgram_prob(self, prompt: Query, next_token: int | str) -> InfgramProb:
        r = _check_engine(self.engine.infgram_prob(prompt_ids=self.ids(prompt, "prompt", allow_empty=True),
                                                   cont_id=self.token(next_token)), "infgram_prob")
        return InfgramProb(int(r["prompt_cnt"]), int(r["cont_cnt"]), float(r["prob"]), int(r["suffix_len"]))

    def infgram_next_token_distribution(self, prompt: Query) -> NextTokenDistribution:
        r = _check_engine(self.engine.infgram_ntd(prompt_ids=self.ids(prompt, "prompt", allow_empty=True)), "infgram_ntd")
        return NextTokenDistribution(int(r["prompt_cnt"]), self._dist(r), bool(r["approx"]), int(r["suffix_len"]))

    def _dist(self, r: dict) -> dict[int, TokenCount]:
        # the document separator is not a token: a prompt that ends a document has no next token there
        sep = (1 << (8 * self.width)) - 1
        return {int(t): TokenCount(int(v["cont_cnt"]), float(v["prob"])) for t, v in r["result_by_token_id"].items() if t != sep}

    def find(self, ngram: Query, limit: int = 100) -> FindResult:
        """Occurrences of ``ngram`` (the first ``limit`` in suffix-array order) and their total count."""
        if not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"`limit` must be a non-negative integer, got {limit!r}")
        segments = self._segments(self.ids(ngram, "ngram"))
        occ: list[Occurrence] = []
        for s, (lo, hi) in enumerate(segments):
            take = min(hi - lo, limit - len(occ))
            if take <= 0:
                continue
            occ.extend(self._locate(s, self._ranks_to_ptrs(s, np.arange(lo, lo + take, dtype=np.int64))))
        return FindResult(sum(hi - lo for lo, hi in segments), tuple(occ))

    def search_documents(self, cnf: Sequence[Sequence[Query]], max_hits: int = 10,
                         max_diff_tokens: int | None = None) -> DocumentSearch:
        """Places where every clause of ``cnf`` (AND of ORs of n-grams) matches, infini-gram's way:
        one n-gram of each clause within ``max_diff_tokens`` tokens of each other, in one document.

        ``count`` is the number of such matches (exact unless ``approx``, when a clause occurs more
        than ``max_clause_freq`` times and the engine samples); ``hits`` holds the first
        ``max_hits``, each located in the datastore (``doc_ids`` lists their documents).
        """
        if not isinstance(max_hits, int) or max_hits < 1:
            raise ConfigError(f"`max_hits` must be a positive integer, got {max_hits!r}")
        diff = self.limits.max_diff_tokens if max_diff_tokens is None else max_diff_tokens
        if not isinstance(diff, int) or diff < 1:
            raise ConfigError(f"`max_diff_tokens` must be a positive integer, got {diff!r}")
        if isinstance(cnf, (str, bytes)) or not isinstance(cnf, Sequence) or not cnf:
            raise NgramQueryError("`cnf` must be a non-empty list of clauses, each a non-empty list of n-grams (text or ids)")
        if len(cnf) > self.limits.max_clauses:
            raise NgramQueryError(f"`cnf` has {len(cnf)} clauses, more than max_clauses={self.limits.max_clauses}")
        ids_cnf: list[list[list[int]]] = []
        for i, clause in enumerate(cnf):
            if isinstance(clause, (str, bytes)) or not isinstance(clause, Sequence) or not clause:
                raise NgramQueryError(f"`cnf[{i}]` must be a non-empty list of n-grams (text or ids), got {clause!r}")
            if len(clause) > self.limits.max_terms_per_clause:
                raise NgramQueryError(f"`cnf[{i}]` has {len(clause)} terms, more than "
                                      f"max_terms_per_clause={self.limits.max_terms_per_clause}")
            ids_cnf.append([self.ids(t, f"cnf[{i}][{j}]") for j, t in enumerate(clause)])
        r = _check_engine(self.engine.find_cnf(cnf=ids_cnf, max_diff_tokens=diff), "find_cnf")
        hits: list[Occurrence] = []
        for s, ptrs in enumerate(r["ptrs_by_shard"]):
            take = max_hits - len(hits)
            if take > 0:
                hits.extend(self._locate(s, np.sort(np.asarray(ptrs, dtype=np.int64))[:take]))
        return DocumentSearch(int(r["cnt"]), bool(r["approx"]), tuple(hits))

    def score(self, text: Query) -> list[TokenScore]:
        """Per-token ∞-gram probabilities of ``text``: token i given tokens 0..i-1 (the first token
        given nothing, i.e. its unigram probability). Prompts longer than ``max_query_tokens`` keep
        their last ``max_query_tokens`` tokens."""
        ids = self.ids(text, "text") if isinstance(text, str) else self._ids_unbounded(text)
        out = []
        cap = self.limits.max_query_tokens
        longest = 0
        for i, t in enumerate(ids):
            # If ids[i-k:i] occurs then so does ids[i-k:i-1], so the longest occurring suffix grows by
            # at most one token per step: the engine need only see the last `longest + 1` tokens,
            # which gives the same answer as the whole prefix and keeps long texts linear.
            k = min(longest + 1, cap, i)
            r = _check_engine(self.engine.infgram_prob(prompt_ids=ids[i - k : i], cont_id=t), "infgram_prob")
            longest = int(r["suffix_len"])
            out.append(TokenScore(t, float(r["prob"]), longest, int(r["prompt_cnt"]), int(r["cont_cnt"])))
        return out

    def _ids_unbounded(self, ids: Query) -> list[int]:
        cap = self.limits.max_query_tokens
        arr = list(ids)
        head = self.ids(arr[:cap], "text")
        return head + [self.token(int(x), "text token") for x in arr[cap:]] if len(arr) > cap else head

    # -- mapping back to the datastore ---------------------------------------------------

    def _ranks_to_ptrs(self, s: int, ranks: np.ndarray) -> np.ndarray:
        """Byte pointers into tokenized.0 of suffix-array ranks (entries are ptr_size little-endian bytes)."""
        p = int(self._shards[s]["ptr_size"])
        raw = np.asarray(self._tables[s][(ranks[:, None] * p + np.arange(p)[None, :]).reshape(-1)]).reshape(-1, p)
        return (raw.astype(np.int64) << (8 * np.arange(p, dtype=np.int64))[None, :]).sum(axis=1)

    def _locate(self, s: int, ptrs: np.ndarray) -> list[Occurrence]:
        if len(ptrs) == 0:
            return []
        offs = self._doc_offsets[s]
        local = np.searchsorted(offs, ptrs, side="right") - 1
        tok_off = (ptrs - offs[local]) // self.width - 1  # skip the document's separator
        doc = local + int(self._shards[s]["first_doc_id"])
        chunk = np.asarray(self._doc_first_chunk[doc], dtype=np.int64) + tok_off // self.chunk_length
        return [Occurrence(int(d), int(c), int(o), int(o % self.chunk_length), s) for d, c, o in zip(doc, chunk, tok_off)]

    def fetch(self, hits: Sequence[Occurrence], **kw: Any) -> list[ChunkPayload]:
        """The chunks the hits fall in, each with its continuation, like a dense hit."""
        return fetch_payloads(self.datastore, [h.chunk_id for h in hits], **kw)


def open_ngram_index(path: str | Path, datastore=None, limits: QueryLimits | None = None) -> NgramIndex:
    return NgramIndex(path, datastore, limits)


__all__ = [
    "Count", "DocumentSearch", "FindResult", "InfgramProb", "NextTokenDistribution", "NgramBuildConfig",
    "NgramBuildResult", "NgramIndex", "NgramIndexError", "NgramQueryError", "Occurrence", "Prob", "QueryLimits",
    "TokenCount", "TokenScore", "build_ngram_index", "open_ngram_index", "token_width_for",
]
