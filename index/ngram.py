"""Exact n-gram search over a datastore: the query engine over an infini-gram suffix array.

:class:`NgramIndex` opens the shards written by :func:`retromem.index.ngram_build.build_ngram_index`
with the package's engine (``InfiniGramEngine``, which queries several shards together) and exposes
a few verbs (``count``, ``prob``, ``next_token_distribution``, ``infgram_prob``,
``infgram_next_token_distribution``, ``find``, ``search_documents``, ``score``). Queries are text
(tokenized with the datastore's tokenizer) or token ids. Results are the frozen dataclasses of
:mod:`retromem.index.types`; every occurrence maps back to the datastore as ``doc_id``,
``chunk_id`` and token offset and can be fetched as a chunk with its continuation
(:meth:`NgramIndex.fetch`), like a dense hit. The engine's ``{'error': ...}`` dictionaries are
turned into exceptions and never returned.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from retromem.datastore.integrity import check_size, check_sizes, read_manifest, recorded_files, verify_files
from retromem import storage
from retromem.errors import ConfigError, NgramIndexCorruptError, NgramQueryError
from retromem.index.ngram_build import ENGINE_VERSION, FORMAT_VERSION, MANIFEST_NAME, NgramIndexError, token_dtype
from retromem.index.types import (ChunkPayload, Count, DocumentSearch, FindResult, InfgramProb, NextTokenDistribution,
                                  Occurrence, Prob, TokenCount, TokenScore, deleted_doc_ids, fetch_payloads,
                                  open_bound_datastore)

Query = Union[str, Sequence[int], np.ndarray]
logger = logging.getLogger(__name__)



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


# The native engine picks a shard's files by substring of their whole path ("table" -> suffix array),
# so a shard under a folder whose path holds one of these (".../portable/...", ".../stable/...")
# got every file taken for a suffix array and crashed the process on open.
_ENGINE_NAME_PARTS = ("tokenized", "table", "offset", "metadata", "metaoff", "unigram")


@contextlib.contextmanager
def _engine_dirs(dirs: list[Path]):
    """Shard directories as the engine may be given them: as they are, or, where a parent's name holds
    one of its file-name keys, through symlinks in a fresh temporary folder (removed once the engine
    has opened and mapped the files)."""
    if not any(part in str(d.parent.resolve()) for d in dirs for part in _ENGINE_NAME_PARTS):
        yield [str(d) for d in dirs]
        return
    tmp = Path(tempfile.mkdtemp(prefix="retromem-ngram-"))
    try:
        if any(part in str(tmp) for part in _ENGINE_NAME_PARTS):
            raise NgramIndexError(f"the n-gram engine cannot open shards under {tmp.parent}: its path holds one of "
                                  f"{', '.join(_ENGINE_NAME_PARTS)}; set TMPDIR to another folder")
        links = []
        for i, d in enumerate(dirs):
            link = tmp / f"s{i:05d}"
            link.symlink_to(d.resolve(), target_is_directory=True)
            links.append(str(link))
        yield links
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_engine(result: Any, verb: str) -> Any:
    # the package signals bad arguments with a dict; we check arguments first, so this is a bug
    if isinstance(result, dict) and "error" in result:
        raise NgramQueryError(f"infini-gram engine refused {verb}: {result['error']}")
    return result


class _Deleted:
    """The deleted documents an n-gram index still holds (until it is rebuilt after compaction),
    read from the index's own token streams: a small "subtraction" index whose n-gram counts are
    taken off the main index's, so every count equals a count over the live documents only.

    ``stream`` has the main index's layout (each document: the separator, then its tokens), so an
    n-gram (which never holds the separator) occurs in it exactly as often as in those documents
    in the main index. Lookups go through a 1-gram index (positions sorted by token), then check
    the following tokens: cost in proportion to the occurrences of the n-gram's first token among
    the deleted documents, not to the main index."""

    def __init__(self, index: "NgramIndex", deleted: np.ndarray) -> None:
        parts, docs = [], []
        for s, sh in enumerate(index._shards):
            first, n = int(sh["first_doc_id"]), int(sh["documents"])
            mine = deleted[(deleted >= first) & (deleted < first + n)]
            offs = index._doc_offsets[s]
            size = int(sh["tokenized_bytes"])
            data = index._ds_maps[s]
            for d in mine.tolist():
                a = int(offs[d - first])
                b = int(offs[d - first + 1]) if d - first + 1 < n else size
                parts.append(np.frombuffer(bytes(data[a:b]), dtype=index._dtype))
                docs.append(d)
        self.doc_ids = np.asarray(docs, dtype=np.int64)  # sorted: shards and ids ascend
        self.stream = np.concatenate(parts) if parts else np.zeros(0, dtype=index._dtype)
        self._order = np.argsort(self.stream, kind="stable")
        self._sorted = self.stream[self._order]

    def __len__(self) -> int:
        return len(self.stream)  # positions, separators included: what the engine counts for an empty prompt

    def positions(self, ids: list[int]) -> np.ndarray:
        """Start positions in ``stream`` of every occurrence of ``ids`` (non-empty)."""
        lo, hi = np.searchsorted(self._sorted, ids[0], "left"), np.searchsorted(self._sorted, ids[0], "right")
        cand = np.sort(self._order[lo:hi])
        for j, t in enumerate(ids[1:], 1):
            cand = cand[cand + j < len(self.stream)]
            cand = cand[self.stream[cand + j] == t]
        return cand

    def count(self, ids: list[int]) -> int:
        return len(self.stream) if not ids else len(self.positions(ids))


class NgramIndex:
    """A finished suffix-array index, opened with the infini-gram engine over all its shards.

    Deleted documents (the datastore's tombstones) are honoured by every verb: counts,
    probabilities and distributions are over the live documents exactly (the deleted ones'
    counts are subtracted, :class:`_Deleted`), and no occurrence in a deleted document is returned."""

    def __init__(self, path: str | Path, datastore=None, limits: QueryLimits | None = None, *, verify: bool = True) -> None:
        """``verify``: check the recorded checksums of every shard's files before the native engine
        maps them (a full read: 0.6 s for a 129 MB index on a loaded 2-core machine, BENCHMARKS.md);
        the engine trusts their bytes and crashes the process on damaged ones (a flipped ``table.0``
        or ``tokenized.0`` segfaulted it). Sizes and the document offsets are always checked."""
        self.path = storage.local_dir(path)  # a URL: its local mirror (mmap needs files)
        self.limits = limits or QueryLimits()
        mp = self.path / MANIFEST_NAME
        if not mp.exists():
            hint = " (an unfinished build: re-run `retromem index build-ngram` to finish it)" if (self.path / "_work").exists() else ""
            raise NgramIndexError(f"{self.path} is not an n-gram index: no {MANIFEST_NAME}{hint}")
        self.manifest = m = read_manifest(mp, error=NgramIndexCorruptError)
        if m.get("format_version") != FORMAT_VERSION:
            raise NgramIndexError(f"{self.path} has n-gram index format {m.get('format_version')}; this retromem reads "
                                  f"{FORMAT_VERSION}. Rebuild it with `retromem index build-ngram --overwrite`.")
        try:
            self._check_files(verify)
        except (KeyError, TypeError, ValueError) as exc:
            raise NgramIndexCorruptError(mp, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                             "the manifest is damaged; rebuild the index") from None
        # the datastore given (open, or a directory: a moved copy) or the recorded one, checked by id
        self.datastore = open_bound_datastore(self.path, m, datastore, error=NgramIndexError, what="n-gram index")
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
        self._dtype = token_dtype(self.width)
        self._doc_first_chunk = self.datastore.doc_first_chunk_array
        from infini_gram.engine import InfiniGramEngine

        with _engine_dirs([self.path / s["dir"] for s in self._shards]) as dirs:
            self.engine = InfiniGramEngine(
                index_dir=dirs, eos_token_id=int(m["eos_token_id"]),
                vocab_size=self.vocab_size, version=ENGINE_VERSION, token_dtype=m["token_dtype"],
                max_support=self.limits.max_support, max_clause_freq=self.limits.max_clause_freq,
                max_diff_tokens=self.limits.max_diff_tokens,
            )
        dead = deleted_doc_ids(self.datastore)
        self._deleted = _Deleted(self, dead) if len(dead) else None
        if self._deleted is not None and not len(self._deleted.doc_ids):
            self._deleted = None  # none of them is in this index (compacted away, or added after it)

    def _check_files(self, verify: bool) -> None:
        """Everything the native engine would trust, checked before it maps a byte: sizes (it reads
        past a short file), checksums (``verify``; it crashes on damaged ones), and the document
        offsets (monotone from 0, each at a document separator)."""
        m = self.manifest
        width = int(m["token_width"])
        check_sizes(self.path, m, error=NgramIndexCorruptError)
        for s in m["shards"]:
            for name, key in (("tokenized.0", "tokenized_bytes"), ("offset.0", "offset_bytes"), ("table.0", "table_bytes")):
                check_size(self.path / s["dir"] / name, int(s[key]), error=NgramIndexCorruptError)
            if int(s["tokenized_bytes"]) != int(s["tokens"]) * width or int(s["table_bytes"]) != int(s["tokens"]) * int(s["ptr_size"]):
                raise NgramIndexCorruptError(self.path / MANIFEST_NAME, f"shard {s['dir']}: file sizes disagree with its "
                                             "token count: the manifest is damaged; rebuild the index")
        if verify and recorded_files(m) is not None:
            bad = verify_files(self.path, m)
            if bad:
                raise NgramIndexCorruptError(self.path / bad[0][0], bad[0][1] + "; rebuild the index with "
                                             "`retromem index build-ngram --overwrite`")
        elif recorded_files(m) is None:
            logger.warning("%s records no checksums (built before retromem recorded them): damaged shards would reach "
                           "the native engine, which may crash on them; rebuild it to get checksums", self.path)
        sep = np.frombuffer(b"\xff" * width, dtype=token_dtype(width))[0]
        for s in m["shards"]:
            f = self.path / s["dir"] / "offset.0"
            offs = np.fromfile(f, dtype="<u8").astype(np.int64)
            size = int(s["tokenized_bytes"])
            if len(offs) != int(s["documents"]) or (len(offs) and (offs[0] != 0 or (np.diff(offs) <= 0).any()
                                                                   or offs[-1] >= size or (offs % width).any())):
                raise NgramIndexCorruptError(f, "document offsets are not increasing from 0 within tokenized.0: "
                                                "the file is damaged; rebuild the index")
            toks = np.memmap(self.path / s["dir"] / "tokenized.0", dtype=token_dtype(width), mode="r") if size else np.zeros(0)
            if len(offs) and (np.asarray(toks[offs // width]) != sep).any():
                raise NgramIndexCorruptError(f, "a document offset does not point at a document separator in tokenized.0: "
                                                "one of the two files is damaged; rebuild the index")
            del toks

    @classmethod
    def open(cls, path: str | Path, datastore=None, limits: QueryLimits | None = None, *, verify: bool = True) -> "NgramIndex":
        return cls(path, datastore, limits, verify=verify)

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
        return Count(self._count(self.ids(ngram, "ngram")), False)

    def _count(self, ids: list[int]) -> int:
        """Occurrences of ``ids`` in the live documents (an empty ``ids``: every position, as the engine counts)."""
        n = self._positions if not ids else sum(hi - lo for lo, hi in self._segments(ids))
        return n - self._deleted.count(ids) if self._deleted is not None else n

    def _dead_ptrs(self, s: int, ptrs: np.ndarray) -> np.ndarray:
        """(n,) bool: which byte pointers into shard ``s`` fall in deleted documents."""
        if self._deleted is None or len(ptrs) == 0:
            return np.zeros(len(ptrs), dtype=bool)
        doc = np.searchsorted(self._doc_offsets[s], ptrs, side="right") - 1 + int(self._shards[s]["first_doc_id"])
        return np.isin(doc, self._deleted.doc_ids)

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

    @functools.cached_property
    def _positions(self) -> int:
        """What the engine counts for the empty n-gram (every position), asked once."""
        return int(_check_engine(self.engine.count(input_ids=[]), "count")["count"])

    def prob(self, prompt: Query, next_token: int | str) -> Prob:
        """count(prompt + token) / count(prompt) over the live documents, from this process's own
        suffix-array search (issue 19: the engine started an OS thread per shard per query and its p99
        reached 38-111 ms under load); equal to the engine's answer (tested)."""
        ids, t = self.ids(prompt, "prompt", allow_empty=True), self.token(next_token)
        pc, cc = self._count(ids), self._count(ids + [t])
        return Prob(pc, cc, cc / pc if pc > 0 else None)

    def next_token_distribution(self, prompt: Query) -> NextTokenDistribution:
        """The tokens that follow ``prompt`` in the datastore, with their counts.

        At most ``max_support`` occurrences are read: below that the distribution is complete; above
        it (``approx``) the occurrences are sampled at even steps through the suffix-array range,
        every sampled token is then counted exactly by its own binary search, and a token missing
        from the list occurs fewer than ``prompt_count / max_support`` times. The package engine's
        sampled answer is not used: on these indexes it reported a single wrong token carrying the
        whole count (a suffix seen 1,163 times came back as ``{2: 1163}``; 6 was right)."""
        return self._next_tokens(self.ids(prompt, "prompt", allow_empty=True))

    def _next_tokens(self, ids: list[int], suffix_len: int | None = None) -> NextTokenDistribution:
        cap = self.limits.max_support
        total, _, follows = self._follows(ids, cap, 1)
        seen: dict[int, int] = {}
        for f in follows:
            if f:  # () where the prompt ends a document: no next token there
                seen[f[0]] = seen.get(f[0], 0) + 1
        approx = total > cap
        if approx:  # exact counts for the sampled tokens: the followers of one token are contiguous in the suffix array
            seen = {t: self._count(ids + [t]) for t in seen}
        return NextTokenDistribution(total, {t: TokenCount(c, c / total) for t, c in seen.items()}, approx, suffix_len)

    def _follows(self, ids: list[int], cap: int, depth: int) -> tuple[int, int, list[tuple[int, ...]]]:
        """(occurrences of ``ids``, occurrences read, the up-to-``depth`` tokens after each one read,
        cut at the end of its document). All occurrences are read up to ``cap``; beyond it ``cap`` of
        them at even steps through the suffix-array ranges of all shards together, which are sorted
        by what follows, so the sample keeps every frequent continuation in proportion."""
        segments = self._segments(ids)
        total = sum(hi - lo for lo, hi in segments)
        live = total - (self._deleted.count(ids) if self._deleted is not None else 0)
        # sampled over every occurrence, deleted ones then skipped (all are read while total <= cap: exact)
        picks = np.arange(total, dtype=np.int64) if total <= cap else (np.arange(cap, dtype=np.int64) * total) // cap
        sep = (1 << (8 * self.width)) - 1  # a document's separator: not a token
        out: list[tuple[int, ...]] = []
        start = 0
        for s, (lo, hi) in enumerate(segments):
            mine = picks[(picks >= start) & (picks < start + hi - lo)] - start + lo
            start += hi - lo
            if len(mine) == 0:
                continue
            data = self._ds_maps[s]
            ptrs = self._ranks_to_ptrs(s, mine)
            ptrs = ptrs[~self._dead_ptrs(s, ptrs)]
            for a in (ptrs + len(ids) * self.width).tolist():
                raw = data[a:min(a + depth * self.width, len(data))]
                toks = np.frombuffer(raw[:len(raw) - len(raw) % self.width], dtype=self._dtype).tolist()
                if sep in toks:
                    toks = toks[:toks.index(sep)]
                out.append(tuple(toks))
        return live, len(out), out

    def infgram_prob(self, prompt: Query, next_token: int | str) -> InfgramProb:
        return self._infgram(self.ids(prompt, "prompt", allow_empty=True), self.token(next_token))

    def _infgram(self, ids: list[int], t: int) -> InfgramProb:
        # the engine's definition, over the live documents and searched here (as prob): the longest
        # suffix that occurs in them
        n = self._longest_live_suffix(ids)
        suffix = ids[len(ids) - n:]
        pc, cc = self._count(suffix), self._count(suffix + [t])
        return InfgramProb(pc, cc, cc / pc if pc > 0 else 0.0, n)

    def _longest_live_suffix(self, ids: list[int]) -> int:
        """Tokens of the longest suffix of ``ids`` that occurs in the live documents (binary search:
        if a suffix occurs, every shorter one does)."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self._count(ids[len(ids) - mid:]) > 0:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def infgram_next_token_distribution(self, prompt: Query) -> NextTokenDistribution:
        """The next-token distribution after the longest suffix of ``prompt`` that occurs in the
        datastore (``suffix_len`` tokens; 0 means the unigram distribution), read as
        :meth:`next_token_distribution` reads it."""
        ids = self.ids(prompt, "prompt", allow_empty=True)
        lo = self._longest_live_suffix(ids)
        return self._next_tokens(ids[len(ids) - lo:], suffix_len=lo)

    def find(self, ngram: Query, limit: int = 100) -> FindResult:
        """Occurrences of ``ngram`` (the first ``limit`` in suffix-array order) and their total count."""
        if not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"`limit` must be a non-negative integer, got {limit!r}")
        ids = self.ids(ngram, "ngram")
        segments = self._segments(ids)
        occ: list[Occurrence] = []
        for s, (lo, hi) in enumerate(segments):
            while lo < hi and len(occ) < limit:  # occurrences in deleted documents are skipped
                take = min(hi - lo, max(limit - len(occ), 64))
                ptrs = self._ranks_to_ptrs(s, np.arange(lo, lo + take, dtype=np.int64))
                ptrs = ptrs[~self._dead_ptrs(s, ptrs)][:limit - len(occ)]
                occ.extend(self._locate(s, ptrs))
                lo += take
        return FindResult(self._count(ids), tuple(occ))

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
        r = self._find_cnf(ids_cnf, diff)
        sampled = r is None
        if sampled:  # a clause must be sampled: the engine's own sample, so the estimate stays the engine's
            r = _check_engine(self.engine.find_cnf(cnf=ids_cnf, max_clause_freq=self.limits.max_clause_freq,
                                                   max_diff_tokens=diff), "find_cnf")
        hits: list[Occurrence] = []
        dead = 0
        for s, ptrs in enumerate(r["ptrs_by_shard"]):
            ptrs = np.sort(np.asarray(ptrs, dtype=np.int64))
            gone = self._dead_ptrs(s, ptrs)  # matches in deleted documents are neither counted nor returned
            dead += int(gone.sum())
            ptrs = ptrs[~gone]
            take = max_hits - len(hits)
            if take > 0:
                hits.extend(self._locate(s, ptrs[:take]))
        # the engine returns every match unless it sampled (approx): then the count is scaled, and so the estimate
        count = int(r["cnt"]) - dead if not r["approx"] else int(round(int(r["cnt"]) * (1 - dead / max(1, sum(
            len(p) for p in r["ptrs_by_shard"])))))
        # approx also when the engine sampled a clause but left its flag unset (a count below the exact one)
        return DocumentSearch(count, bool(r["approx"]) or sampled, tuple(hits))

    def _find_cnf(self, cnf: list[list[list[int]]], diff: int) -> dict[str, Any] | None:
        """The engine's ``find_cnf``, answered from this process's suffix-array search (issue 19: the
        engine starts OS threads per clause, term and shard for every query). The same matches, in
        the engine's own way (tested against it): per shard, the pointers of the rarest clause seed
        ranges; each further clause's sorted pointers widen a range to its nearest match on either
        side within ``diff`` tokens (keeping one range per side that fits); ranges that span a
        document separator are dropped. None when, in a shard where every clause occurs, a clause
        occurs more than its per-shard share of ``max_clause_freq`` times: the engine samples such
        clauses at random and answers those (a shard missing a clause has no match either way)."""
        n_shards = len(self._shards)
        cap = -(-self.limits.max_clause_freq // n_shards)
        segs = [[self._segments(term) for term in clause] for clause in cnf]  # clause -> term -> shard -> ranks
        counts = [[sum(t[s][1] - t[s][0] for t in clause) for s in range(n_shards)] for clause in segs]
        if any(sum(c) == 0 for c in counts):
            return {"cnt": 0, "approx": False, "ptrs_by_shard": []}
        live = [all(per_shard[s] > 0 for per_shard in counts) for s in range(n_shards)]
        if any(per_shard[s] > cap for per_shard in counts for s in range(n_shards) if live[s]):
            return None
        reach = diff * self.width
        sep = b"\xff" * self.width
        out: list[np.ndarray] = []
        for s in range(n_shards):
            if not live[s]:  # a clause with no occurrence here: no match in this shard
                out.append(np.zeros(0, dtype=np.int64))
                continue

            def ptrs(c: int) -> np.ndarray:
                parts = [self._ranks_to_ptrs(s, np.arange(t[s][0], t[s][1], dtype=np.int64)) for t in segs[c]]
                return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

            order = sorted(range(len(cnf)), key=lambda c: counts[c][s])  # stable, as the engine's sort of a few
            left = ptrs(order[0])
            right = left.copy()
            for c in order[1:]:
                p = np.sort(ptrs(c))
                if len(p) == 0:
                    left = right = np.zeros(0, dtype=np.int64)
                    break
                before = np.searchsorted(p, right, side="left") - 1  # the last match < right
                after = np.searchsorted(p, left, side="left")  # the first match >= left
                has_l, has_r = before >= 0, after < len(p)
                new_l = np.minimum(left, p[np.clip(before, 0, None)])
                new_r = np.maximum(right, p[np.clip(after, None, len(p) - 1)])
                ok_l = has_l & (new_l + reach >= left)
                ok_r = has_r & (new_r <= right + reach)
                both = ok_l & ok_r
                only_l, only_r = ok_l & ~both, ok_r & ~both
                left = np.concatenate([new_l[both], new_l[only_l], left[only_r]])
                right = np.concatenate([new_r[both], right[only_l], new_r[only_r]])
            data = self._ds_maps[s]
            keep = [i for i, (a, b) in enumerate(zip(left.tolist(), right.tolist())) if data.find(sep, a, b) < 0]
            out.append(left[keep])
        return {"cnt": sum(len(p) for p in out), "approx": False, "ptrs_by_shard": out}

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
            r = self._infgram(ids[i - k : i], t)
            longest = r.suffix_len
            out.append(TokenScore(t, r.prob, longest, r.prompt_count, r.cont_count))
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

    def continuations(self, prompt: Query, depth: int, max_occurrences: int | None = None) -> "Continuations":
        """The token sequences (up to ``depth`` tokens, cut at the end of a document) that follow the
        occurrences of ``prompt``, with how many of the read occurrences each follows: the drafts of
        retrieval-based speculative decoding (REST), read straight from the suffix array.

        At most ``max_occurrences`` occurrences (default and ceiling: ``max_support``) are read, at
        even steps through the suffix-array range of all shards together; the range is sorted by
        what follows, so the sample keeps every frequent continuation in proportion (``approx``
        when sampled). ``sequences`` is ordered by count, most frequent first."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"`depth` must be a positive integer, got {depth!r}")
        cap = self.limits.max_support if max_occurrences is None else max_occurrences
        if isinstance(cap, bool) or not isinstance(cap, int) or not 1 <= cap <= self.limits.max_support:
            raise ConfigError(f"`max_occurrences` must be an integer in 1..max_support={self.limits.max_support}, "
                              f"got {max_occurrences!r}")
        total, read, follows = self._follows(self.ids(prompt, "prompt"), cap, depth)
        seen: dict[tuple[int, ...], int] = {}
        for toks in follows:
            if toks:
                seen[toks] = seen.get(toks, 0) + 1
        ranked = sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
        return Continuations(total, read, tuple(ranked), total > cap)

    def draft_continuations(self, contexts: Sequence[Sequence[int]], depth: int, max_occurrences: int | None = None,
                            min_suffix: int = 2, max_suffix: int = 16) -> list[tuple[int, "Continuations | None"]]:
        """REST's lookup for many contexts in one call: per context, the longest suffix (``min_suffix``
        to ``max_suffix`` tokens; binary search, since a suffix occurs whenever a longer one does) that
        occurs with a continuation, and its :meth:`continuations`; ``(0, None)`` when none does."""
        out: list[tuple[int, Continuations | None]] = []
        for context in contexts:
            ctx = [int(t) for t in context]
            lo, hi = min_suffix - 1, min(max_suffix, len(ctx))
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if self.count(ctx[len(ctx) - mid:]).count > 0:
                    lo = mid
                else:
                    hi = mid - 1
            found: tuple[int, Continuations | None] = (0, None)
            for n in range(lo, min_suffix - 1, -1):  # all occurrences may end a document: try shorter
                cont = self.continuations(ctx[len(ctx) - n:], depth, max_occurrences)
                if cont.sequences:
                    found = (n, cont)
                    break
            out.append(found)
        return out


@dataclass(frozen=True)
class Continuations:
    """What follows an n-gram: ``sequences`` holds (tokens, occurrences followed by them) among the
    ``read`` occurrences of the ``count`` there are (``approx`` when ``read < count``)."""

    count: int
    read: int
    sequences: tuple[tuple[tuple[int, ...], int], ...]
    approx: bool


def open_ngram_index(path: str | Path, datastore=None, limits: QueryLimits | None = None, *,
                     verify: bool = True) -> NgramIndex:
    return NgramIndex(path, datastore, limits, verify=verify)



__all__ = ["Continuations", "NgramIndex", "NgramQueryError", "Query", "QueryLimits", "open_ngram_index"]
