"""The compressed variant of exact search (infini-gram mini's idea): an FM-index over the
datastore's normalized document text, answering ``count`` and ``find`` of any substring and fetching
the document around a hit.

Two backends, chosen at build time and recorded in ``fm_index.json`` with the datastore it came from:

- ``compact`` (default): our own FM-index over the UTF-8 bytes of all documents, each followed by a
  NUL separator. The suffix array is built with ``pydivsufsort`` (libdivsufsort) and kept only as
  samples (every ``sample_rate``-th rank); the Burrows-Wheeler transform is stored in blocks of
  ``block_size`` bytes, each compressed with zstd, with cumulative symbol counts at every block
  boundary. ``count`` is a backward search (two rank queries per pattern byte, each a block
  decompression, cached, and a count inside it); ``find`` walks LF from each hit to a sampled rank.
  About 40% of the corpus bytes on the shared corpora.
- ``fm-index``: the ``fm-index`` package's ``FMIndex`` (Rust) over the NUL-joined text. Measured at
  153% of the corpus bytes on the shared corpora (its ``MultiFMIndex`` at 359% on a 3,000-document
  slice), so it misses the issue's target of at most 50%; kept for comparison (BENCHMARKS.md).

The datastore's normalizer removes control characters, so NUL never occurs in a document, and a
pattern (which may not contain it) never matches across a document boundary. Hits are character
offsets into a document; they map to the datastore chunk that holds them.
"""

from __future__ import annotations

import array
import functools
import logging
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from retromem.datastore.atomic import atomic_path
from retromem.datastore.job import Job
from retromem.datastore.integrity import check_size, check_sizes, load_npy, read_manifest, recorded_files, verify_files
from retromem import storage
from retromem.errors import ConfigError, FMIndexCorruptError, FMIndexError, FMQueryError
from retromem.index.types import (FMBuildResult, FMContext, FMFindResult, FMHit, deleted_doc_ids, open_bound_datastore,
                                  record_path)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: documents in shards, each its own FM-index (1: one FM-index at the top, still read)
READABLE_VERSIONS = (1, 2)
SHARD_BYTES = 512 << 20  # text bytes per shard: the build holds ~14 bytes per text byte of its shard
MANIFEST_NAME = "fm_index.json"
DATA_NAME = "fm_index.bin"
STARTS_NAME = "doc_starts.npy"
SEP = "\x00"
BACKENDS = ("compact", "fm-index")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr)


def _build_compact(out: Path, text: np.ndarray, doc_bytes: np.ndarray, sample_rate: int, block_size: int) -> dict:
    """Files of the compact backend from the datastore's text (uint8) and document byte offsets."""
    import pydivsufsort
    import zstandard

    n_docs = len(doc_bytes) - 1
    # T: every document followed by NUL, so that no pattern matches across documents
    T = np.zeros(len(text) + n_docs, dtype=np.uint8)
    is_sep = np.zeros(len(T), dtype=bool)
    is_sep[doc_bytes[1:] + np.arange(n_docs)] = True
    T[~is_sep] = text
    del is_sep
    starts = doc_bytes[:-1] + np.arange(n_docs)  # byte offset of each document in T
    n = len(T)
    sa = pydivsufsort.divsufsort(T)  # (n,) int32/int64 suffix array of T
    # The FM-index of T$ with a unique smallest terminator $: row 0 is the suffix "$" (whose
    # predecessor is T[-1]); row r + 1 is sa[r]. The row of suffix 0 has $ as its predecessor: a
    # NUL placeholder there, which rank() discounts, so LF is exact for every byte, NUL included.
    dollar_row = int(np.flatnonzero(sa == 0)[0]) + 1
    bwt = np.empty(n + 1, dtype=np.uint8)
    bwt[0] = T[n - 1]
    bwt[1:] = T[(sa - 1) % n]
    bwt[dollar_row] = 0
    full_ranks = np.arange(0, n + 1, sample_rate)
    samples = np.where(full_ranks == 0, n, sa[np.maximum(full_ranks - 1, 0)]).astype(np.uint32 if n < 2**32 else np.uint64)
    del sa
    counts = np.bincount(T, minlength=256).astype(np.int64)
    C = np.concatenate(([0], np.cumsum(counts))) + 1  # C[c]: rows before the suffixes starting with c ($ first)
    alphabet = np.flatnonzero(counts)
    col = np.full(256, -1, dtype=np.int16)
    col[alphabet] = np.arange(len(alphabet))
    nblocks = -(-(n + 1) // block_size)
    occ = np.zeros((nblocks + 1, len(alphabet)), dtype=np.uint32 if n < 2**32 else np.uint64)
    offsets = np.zeros(nblocks + 1, dtype=np.int64)
    comp = zstandard.ZstdCompressor(level=9)
    with atomic_path(out / "bwt.zst") as tmp:
        with open(tmp, "wb") as fh:
            for b in range(nblocks):
                blk = bwt[b * block_size : (b + 1) * block_size]
                occ[b + 1] = occ[b] + np.bincount(blk, minlength=256)[alphabet]
                z = comp.compress(blk.tobytes())
                fh.write(z)
                offsets[b + 1] = offsets[b] + len(z)
    for name, arr in (("occ.npy", occ), ("block_offsets.npy", offsets), ("sa_samples.npy", samples),
                      ("C.npy", C), ("alphabet_col.npy", col), (STARTS_NAME, starts)):
        _save_npy(out / name, arr)
    return {"n": n, "dollar_row": dollar_row, "sample_rate": sample_rate, "block_size": block_size,
            "files": ["bwt.zst", "occ.npy", "block_offsets.npy", "sa_samples.npy", "C.npy", "alphabet_col.npy", STARTS_NAME]}


def _build_library(out: Path, texts: list[str]) -> dict:
    from fm_index import FMIndex as _FMIndex

    lens = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])) if len(texts) else np.zeros(0, np.int64)
    fm = _FMIndex(SEP.join(texts))
    _save_npy(out / STARTS_NAME, starts)  # character offset of each document in the joined text
    with atomic_path(out / DATA_NAME) as tmp:
        tmp.write_bytes(fm.__getstate__())
    return {"files": [DATA_NAME, STARTS_NAME]}


def build_fm_index(datastore_path: str | Path, out: str | Path, *, backend: str = "compact", sample_rate: int = 32,
                   block_size: int = 32768, shard_bytes: int = SHARD_BYTES, executor: str = "local", workers: int = 1,
                   ray_address: str | None = None, overwrite: bool = False, progress: bool = True) -> FMBuildResult:
    """Build the FM-index of the datastore's documents in ``out`` (files are written atomically and the
    manifest last, so a killed build leaves no index; re-run to carry on: finished shards are kept).
    ``overwrite`` deletes an FM-index at ``out`` first (only ever an FM-index: anything else there is
    refused).

    The compact backend cuts the documents into shards of at most ``shard_bytes`` of text (whole
    documents; a longer document is a shard of its own), each its own FM-index built as one task of
    ``executor`` (``local`` with ``workers`` processes, or ``ray``: every task opens the datastore
    and writes its shard under ``out``, so both must be on storage that every node sees). Peak memory
    is that of one shard's build per worker, ~14 bytes per text byte, instead of the whole text's."""
    from retromem.datastore import Datastore
    from retromem.datastore.job import open_job

    if backend not in BACKENDS:
        raise ConfigError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ConfigError(f"`sample_rate` must be a positive integer, got {sample_rate!r}")
    if not isinstance(block_size, int) or block_size < 256:
        raise ConfigError(f"`block_size` must be an integer of at least 256, got {block_size!r}")
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise ConfigError(f"`shard_bytes` (--shard-size) must be a positive number of bytes, got {shard_bytes!r}")
    t0 = time.perf_counter()
    ds = Datastore.open(datastore_path)
    with open_job(out, "fm-index", overwrite=overwrite, legacy=(MANIFEST_NAME,)) as job:
        plan = _Plan(backend, sample_rate, block_size, shard_bytes, executor, workers, ray_address)
        return _build(job, ds, datastore_path, plan, progress, t0)


class _Plan(NamedTuple):
    """The build's settings."""

    backend: str
    sample_rate: int
    block_size: int
    shard_bytes: int
    executor: str
    workers: int
    ray_address: str | None


def _shard_ranges(doc_bytes: np.ndarray, shard_bytes: int) -> list[tuple[int, int]]:
    """[first_doc, end_doc) of each shard: whole documents, at most ``shard_bytes`` of text each
    (a longer document alone)."""
    n = len(doc_bytes) - 1
    out, d0 = [], 0
    while d0 < n:
        # the last document that still ends within shard_bytes of this shard's start, and at least one
        d1 = int(np.searchsorted(doc_bytes, doc_bytes[d0] + shard_bytes, side="right")) - 1
        d1 = min(max(d1, d0 + 1), n)
        out.append((d0, d1))
        d0 = d1
    return out


def _fm_shard(ctx: tuple, item: tuple[int, int, int]) -> dict:
    """One shard's FM-index, built in ``out/shard-NNNNN`` (a step of ``Job.map``: any process or node)."""
    from retromem.datastore import Datastore

    datastore_path, out, sample_rate, block_size = ctx
    k, d0, d1 = item
    ds = Datastore.open(datastore_path)
    doc_bytes = np.asarray(ds.doc_byte_offsets_array[d0 : d1 + 1], dtype=np.int64)
    text = np.array(ds.text_bytes[int(doc_bytes[0]) : int(doc_bytes[-1])])
    if (text == 0).any():
        raise FMIndexError("a document contains NUL, the FM-index's document separator; rebuild the datastore "
                           "(its normalizer removes control characters)")
    name = f"shard-{k:05d}"
    (Path(out) / name).mkdir(parents=True, exist_ok=True)
    info = _build_compact(Path(out) / name, text, doc_bytes - doc_bytes[0], sample_rate, block_size)
    info["files"] = [f"{name}/{f}" for f in info["files"]]
    return {"dir": name, "first_doc": d0, "documents": d1 - d0, "text_bytes": int(doc_bytes[-1] - doc_bytes[0]), **info}


def _build(job: Job, ds, datastore_path: str | Path, plan: _Plan, progress: bool, t0: float) -> FMBuildResult:
    backend, sample_rate, block_size = plan.backend, plan.sample_rate, plan.block_size
    out = job.path
    import importlib.metadata as md

    from tqdm.auto import tqdm

    m = job.finished(MANIFEST_NAME, ds.datastore_id, what="an FM-index", error=FMIndexError)
    if m is not None:
        return FMBuildResult(out, m, True, time.perf_counter() - t0)
    ds.verify_reads()  # the index reads the whole text: check every shard's checksums first
    text_bytes = int(ds.manifest["counts"]["text_bytes"])
    logger.info("building the %s FM-index of %d documents (%d bytes)", backend, ds.num_documents, text_bytes)
    if backend == "compact":
        from retromem.datastore.executors import make_executor

        doc_bytes = np.asarray(ds.doc_byte_offsets_array, dtype=np.int64)
        ranges = _shard_ranges(doc_bytes, plan.shard_bytes)
        items = [(k, d0, d1) for k, (d0, d1) in enumerate(ranges)]
        ctx = (str(ds.path), str(out), sample_rate, block_size)
        executor = make_executor(plan.executor, plan.workers, plan.ray_address)
        shards = {}
        bar = tqdm(total=len(items), desc="FM-index: shards", disable=not progress)
        for item, rec in job.map(executor, _fm_shard, ctx, items, marker=lambda it: f"shard-{it[0]:05d}"):
            if (rec["first_doc"], rec["first_doc"] + rec["documents"]) != (item[1], item[2]):
                raise FMIndexError(f"{out / rec['dir']} was built for other documents (a build with another "
                                   "--shard-size was interrupted here): pass --overwrite")
            shards[item[0]] = rec
            bar.update(1)
        bar.close()
        shard_list = [shards[k] for k in range(len(items))]
        info = {"sample_rate": sample_rate, "block_size": block_size, "shard_bytes": plan.shard_bytes,
                "shards": [{k: v for k, v in r.items() if k != "files"} for r in shard_list],
                "files": [f for r in shard_list for f in r["files"]]}
        library = {"package": "pydivsufsort + zstandard", "version": f"{md.version('pydivsufsort')} + {md.version('zstandard')}"}
    else:
        texts = [ds.document_text(d) for d in tqdm(range(ds.num_documents), desc="FM-index: documents", disable=not progress)]
        if any(SEP in t for t in texts):
            raise FMIndexError("a document contains NUL, the FM-index's document separator; rebuild the datastore")
        info = _build_library(out, texts)
        library = {"package": "fm-index", "version": md.version("fm-index")}
    file_bytes = {f: (out / f).stat().st_size for f in info.pop("files")}
    size = sum(file_bytes.values())
    m = {
        "format_version": FORMAT_VERSION, "backend": backend, "library": library, **info,
        "datastore_id": ds.datastore_id, "datastore_path": record_path(datastore_path, job.path),
        "documents": ds.num_documents, "text_bytes": text_bytes, "index_bytes": size, "file_bytes": file_bytes,
        "size_ratio": size / max(text_bytes, 1),
    }
    job.clear_work()
    m = job.seal(MANIFEST_NAME, m)  # last, with every file's size and checksum
    return FMBuildResult(out, m, False, time.perf_counter() - t0)


_BYTES = [bytes([c]) for c in range(256)]
SUB = 512  # in a decompressed block, a byte's cumulative counts every SUB bytes
CACHE_BYTES = 256 << 20  # decompressed BWT blocks kept in memory (the whole BWT of up to 256 MiB of text)
COUNT_CACHE = 1 << 17  # (block, byte) count arrays kept (~0.3 KiB each: at most ~45 MiB)


class _CompactEngine:
    """Backward search and locate over the compact backend's files (positions are byte offsets in T)."""

    def __init__(self, path: Path, m: dict, cache_bytes: int = CACHE_BYTES) -> None:
        self.rows, self.dollar_row = int(m["n"]) + 1, int(m["dollar_row"])
        self.k, self.B = int(m["sample_rate"]), int(m["block_size"])
        def load(name: str) -> np.ndarray:
            return load_npy(path / name, mmap=False, error=FMIndexCorruptError)

        self.occ, self.offsets, self.samples = load("occ.npy"), load("block_offsets.npy"), load("sa_samples.npy")
        self.C, self.col = load("C.npy"), load("alphabet_col.npy")
        # The backward search runs two ranks per pattern byte, so a rank must cost a few Python
        # operations: plain ints for the small tables, a typed memoryview (indexing gives an int, not a
        # numpy scalar) for the checkpoints, and inside a block a byte's cached step counts plus
        # bytes.count over the rest (issue 19, BENCHMARKS.md).
        self._C, self._col = [int(x) for x in self.C], [int(x) for x in self.col]
        occ = np.ascontiguousarray(self.occ)
        self._occ = memoryview(occ).cast("B").cast("Q" if occ.dtype == np.uint64 else "I", occ.shape) if occ.size else None
        size = (path / "bwt.zst").stat().st_size
        if len(self.offsets) == 0 or self.offsets[0] != 0 or self.offsets[-1] != size or (np.diff(self.offsets) < 0).any():
            raise FMIndexCorruptError(path / "block_offsets.npy", f"block offsets are not monotone from 0 to {size:,} "
                                      "(the size of bwt.zst): one of the two files is damaged; rebuild the index")
        self.data = np.memmap(path / "bwt.zst", dtype=np.uint8, mode="r") if self.offsets[-1] else np.zeros(0, np.uint8)
        import zstandard

        self._dec = zstandard.ZstdDecompressor()
        self.block = functools.lru_cache(maxsize=max(1, cache_bytes // self.B))(self._block)
        # Per (block, byte), the byte's counts at every SUB step of the block: one scan of the block
        # (what a rank cost before) builds it, and every later rank of that byte in that block costs a
        # lookup plus a count over < SUB bytes. 65 ints each; the backward search of common text
        # keeps asking the same few bytes of the same blocks, so most ranks hit.
        self.counts = functools.lru_cache(maxsize=COUNT_CACHE)(self._counts)

    def _block(self, b: int) -> bytes:
        return self._dec.decompress(self.data[self.offsets[b] : self.offsets[b + 1]].tobytes())

    def _counts(self, b: int, c: int) -> array.array:
        """Occurrences of byte c in block b before each SUB-byte step of it (one scan of the block)."""
        blk = np.frombuffer(self.block(b), dtype=np.uint8)
        out = np.zeros(-(-len(blk) // SUB) + 1, dtype=np.int32)
        if len(blk):
            np.cumsum(np.add.reduceat(blk == c, np.arange(0, len(blk), SUB), dtype=np.int32), out=out[1:])
        return array.array("i", out.tobytes())  # indexing gives a Python int, unlike a numpy array

    def rank(self, c: int, i: int) -> int:
        """Occurrences of byte c in BWT[0:i]."""
        j = self._col[c]
        if j < 0:
            return 0
        b, off = divmod(i, self.B)
        r = self._occ[b, j]
        if off:
            s, rest = divmod(off, SUB)
            r += self.counts(b, c)[s]
            if rest:
                r += self.block(b).count(_BYTES[c], off - rest, off)
        if c == 0 and i > self.dollar_row:
            r -= 1  # the $ placeholder is not a NUL
        return r

    def range(self, pattern: bytes) -> tuple[int, int]:
        lo, hi = 0, self.rows
        C, rank = self._C, self.rank
        for c in reversed(pattern):
            base = C[c]
            lo, hi = base + rank(c, lo), base + rank(c, hi)
            if lo >= hi:
                return 0, 0
        return lo, hi

    def locate(self, i: int) -> int:
        steps = 0
        while i % self.k:
            if i == self.dollar_row:  # the suffix starting at 0: its predecessor is $
                return steps
            c = self.block(i // self.B)[i % self.B]
            i = self._C[c] + self.rank(c, i)
            steps += 1
        return int(self.samples[i // self.k]) + steps


def _overlapping(text: bytes, pattern: bytes) -> int:
    """Occurrences of ``pattern`` in ``text``, overlapping ones included (as a suffix array counts them)."""
    n, i = 0, text.find(pattern)
    while i >= 0:
        n += 1
        i = text.find(pattern, i + 1)
    return n


class FMIndex:
    """A finished FM-index with its datastore, for mapping hits to chunks."""

    def __init__(self, path: str | Path, datastore=None, max_query_chars: int = 10_000, *, verify: bool = True) -> None:
        """``verify``: check every file's recorded checksum first (a full read of the index, about 40%
        of the text's size; its arrays are read whole anyway). Sizes are always checked."""
        self.path = storage.local_dir(path)  # a URL: its local mirror (mmap needs files)
        self.max_query_chars = max_query_chars
        mpath = self.path / MANIFEST_NAME
        if not mpath.exists():
            raise FMIndexError(f"{self.path} is not an FM-index: no {MANIFEST_NAME}")
        self.manifest = m = read_manifest(mpath, error=FMIndexCorruptError)
        if m.get("format_version") not in READABLE_VERSIONS:
            raise FMIndexError(f"{self.path} has FM-index format {m.get('format_version')}; rebuild it with this version")
        try:
            check_sizes(self.path, m, error=FMIndexCorruptError)
            for name, size in m["file_bytes"].items():
                check_size(self.path / name, int(size), error=FMIndexCorruptError)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FMIndexCorruptError(mpath, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                             "the manifest is damaged; rebuild the index") from None
        if verify and recorded_files(m) is not None:
            bad = verify_files(self.path, m)
            if bad:
                raise FMIndexCorruptError(self.path / bad[0][0], bad[0][1] + "; rebuild with `retromem index build-fm --overwrite`")
        self.datastore = open_bound_datastore(self.path, m, datastore, error=FMIndexError, what="FM-index")
        self.backend = m["backend"]
        # one (first document, document starts, engine) per shard; format 1 is one shard at the top
        shards = m.get("shards") or [{"dir": ".", "first_doc": 0, "n": m.get("n"), "dollar_row": m.get("dollar_row")}]
        self._shards: list[tuple[int, np.ndarray, _CompactEngine | None]] = []
        for sh in shards:
            starts = load_npy(self.path / sh["dir"] / STARTS_NAME, mmap=False, error=FMIndexCorruptError)
            if len(starts) and (starts[0] != 0 or (np.diff(starts) <= 0).any()):
                raise FMIndexCorruptError(self.path / sh["dir"] / STARTS_NAME, "document starts are not increasing from 0: "
                                          "the file is damaged; rebuild the index")
            engine = _CompactEngine(self.path / sh["dir"], {**m, **sh}) if self.backend == "compact" else None
            self._shards.append((int(sh["first_doc"]), starts, engine))
        self.num_documents = sum(len(st) for _, st, _ in self._shards)
        # more documents in the datastore than here: documents added since the build (not searched)
        if self.num_documents > self.datastore.num_documents:
            raise FMIndexCorruptError(self.path / MANIFEST_NAME, f"the index holds {self.num_documents:,} documents, the "
                                      f"datastore {self.datastore.num_documents:,}: rebuild the index")
        self._starts = self._shards[0][1] if self._shards else np.zeros(0, np.int64)  # the fm-index backend: one piece
        if self.backend != "compact":
            from fm_index import FMIndex as _FMIndex

            self.fm = _FMIndex("")
            try:
                self.fm.__setstate__((self.path / DATA_NAME).read_bytes())
            except Exception as exc:  # the library raises its own error types on bad bytes
                raise FMIndexError(f"{self.path / DATA_NAME} cannot be read as an FM-index: {exc}") from exc
        self._spans = self.datastore.chunk_byte_spans_array
        self._doc_first_chunk = self.datastore.doc_first_chunk_array
        self._doc_bytes = self.datastore.doc_byte_offsets_array

    def _check(self, pattern: str) -> str:
        if not isinstance(pattern, str):
            raise TypeError(f"`pattern` must be text, got {type(pattern).__name__}")
        if not pattern:
            raise FMQueryError("`pattern` is empty; give at least one character")
        if SEP in pattern:
            raise FMQueryError("`pattern` contains NUL, which no document contains (it separates documents)")
        if len(pattern) > self.max_query_chars:
            raise FMQueryError(f"`pattern` has {len(pattern)} characters, more than max_query_chars={self.max_query_chars}")
        return pattern

    def count(self, pattern: str) -> int:
        """Occurrences of ``pattern`` in the live documents (those in deleted documents are subtracted)."""
        pattern = self._check(pattern)
        if self.backend == "compact":
            p = pattern.encode("utf-8")
            n = sum(hi - lo for lo, hi in (e.range(p) for _, _, e in self._shards))
        else:
            n = int(self.fm.count(pattern))
        return n - sum(_overlapping(t, pattern.encode("utf-8")) for t in self._dead_texts().values())

    def _dead_texts(self) -> dict[int, bytes]:
        """UTF-8 text of each deleted document this index holds (the datastore's tombstones), read once.
        After compaction their text is gone from the datastore: this index must then be rebuilt."""
        cached = getattr(self, "_dead", None)
        if cached is not None:
            return cached
        dead = deleted_doc_ids(self.datastore)
        dead = dead[dead < self.num_documents]
        out = {}
        for d in dead.tolist():
            try:
                text = self.datastore.document_text(d, include_deleted=True)
            except Exception as exc:  # noqa: BLE001 - any failure means the text is not there to subtract
                raise FMIndexError(f"{self.path} holds deleted document {d}, whose text the datastore no longer has "
                                   f"(compacted): rebuild the FM-index (`retromem index fm build --overwrite`)") from exc
            out[d] = text.encode("utf-8")
        self._dead = out
        return out

    def find(self, pattern: str, limit: int = 100) -> FMFindResult:
        """Occurrences (document, character offset, chunk): the first ``limit`` by document and offset
        (compact backend: the first ``limit`` in suffix-array order, then sorted)."""
        if not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"`limit` must be a non-negative integer, got {limit!r}")
        pattern = self._check(pattern)
        p = pattern.encode("utf-8")
        dead = self._dead_texts()
        if self.backend == "compact":
            # shard by shard (document order), each shard's first live hits in suffix-array order
            total, found = 0, []
            for first, starts, engine in self._shards:
                lo, hi = engine.range(p)
                total += hi - lo
                pos = []
                for i in range(lo, hi):
                    if len(found) + len(pos) >= limit:
                        break
                    at = engine.locate(i)
                    if dead and first + int(np.searchsorted(starts, at, side="right")) - 1 in dead:
                        continue  # a hit in a deleted document: dropped, and not counted below
                    pos.append(at)
                pos = np.sort(np.asarray(pos, dtype=np.int64))
                local = np.searchsorted(starts, pos, side="right") - 1
                found.extend(zip((local + first).tolist(), (pos - starts[local]).tolist()))
            docs = np.asarray([d for d, _ in found], dtype=np.int64)
            offs = np.asarray([o for _, o in found], dtype=np.int64)
        else:
            pos = np.sort(np.asarray(self.fm.locate(pattern), dtype=np.int64))
            total = len(pos)
            docs = np.searchsorted(self._starts, pos, side="right") - 1
            if dead:
                keep = ~np.isin(docs, list(dead))
                pos, docs = pos[keep], docs[keep]
            pos, docs = pos[:limit], docs[:limit]
            offs = pos - self._starts[docs]
        if dead:
            total -= sum(_overlapping(t, p) for t in dead.values())
        hits = []
        for d, o in zip(docs.tolist(), offs.tolist()):
            if self.backend == "compact":  # a byte offset: the character offset is what callers index text with
                raw = self._doc_text_bytes(d)
                hits.append(FMHit(d, len(raw[:o].decode("utf-8")), self._chunk_of_byte(d, o)))
            else:
                hits.append(FMHit(d, o, self._chunk_of(d, o)))
        return FMFindResult(int(total), tuple(hits))

    def _doc_text_bytes(self, doc_id: int) -> bytes:
        return self.datastore.document_text(doc_id).encode("utf-8")

    def _chunk_of_byte(self, doc_id: int, byte_offset: int) -> int:
        byte = int(self._doc_bytes[doc_id]) + byte_offset
        c0, c1 = int(self._doc_first_chunk[doc_id]), int(self._doc_first_chunk[doc_id + 1])
        return c0 + int(np.searchsorted(np.asarray(self._spans[c0:c1, 0]), byte, side="right")) - 1

    def _chunk_of(self, doc_id: int, char_offset: int) -> int:
        text = self.datastore.document_text(doc_id)
        return self._chunk_of_byte(doc_id, len(text[:char_offset].encode("utf-8")))

    def context(self, hit: FMHit, pattern_chars: int, window: int = 200) -> FMContext:
        """The document around ``hit``: ``window`` characters either side of the match."""
        text = self.datastore.document_text(hit.doc_id)
        s, e = max(0, hit.offset - window), min(len(text), hit.offset + pattern_chars + window)
        return FMContext(hit.doc_id, hit.chunk_id, text[s:e], hit.offset - s, hit.offset - s + pattern_chars, len(text))

    def contexts(self, hits: Sequence[FMHit], pattern_chars: int, window: int = 200) -> list[FMContext]:
        return [self.context(h, pattern_chars, window) for h in hits]
