"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH kept in Bloom filters).

Near duplicates are found as MassiveDS does (MinHash over word 13-gram shingles, Jaccard 0.8)
but the LSH index is kept as LSHBloom keeps it: one Bloom filter per band instead of a hash
table of buckets, so memory is fixed by the number of documents and the false-positive rate,
not by the corpus text. A document is a duplicate when one of its band keys (or its content
hash, for exact dedup) was already inserted; every document's keys are inserted, which makes
the result that of connected components over LSH collisions: the first document of each
cluster, in corpus order, is kept.

Because every document's keys are inserted (kept or dropped alike), the rule is a property of
each key on its own: a document is dropped when one of its keys (of the same kind: content hash,
or band ``j``'s key) occurs in a document earlier in corpus order. That makes dedup partitionable
(:func:`key_records`, :func:`scatter`, :func:`partition_duplicates`, :func:`reasons_from_marks`):
keys are hash-partitioned, each partition finds its repeated keys exactly (a sort, no Bloom
filter), and a document is dropped if any partition marks it. The build runs it that way
(``datastore/pipeline.py``); :class:`Deduplicator`, the sequential Bloom-filter pass, differs from
it only where one of its filters answers a false positive (at most ``near_fp_rate`` per band
lookup), and stays as the reference and the reader of kept generations.

All hashing is vectorized over a batch of documents (numpy, uint64 arithmetic modulo 2**64):

* word hashes and shingle hashes are polynomial rolling hashes computed from prefix sums;
* the MinHash permutations are ``x -> a*x + b mod 2**64`` with odd ``a`` (bijections of the
  64-bit space, so the minimum is a true MinHash under that permutation family);
* a band key is a mixed hash of its ``r`` signature values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from retromem.config import boolean, integer, non_negative_int, number, positive_int
from retromem.errors import ConfigError

_M64 = (1 << 64) - 1
_B_BYTE = 0x100000001B3  # odd multipliers for the rolling hashes
_B_WORD = 0x9E3779B97F4A7C15
_POWERS_KEPT = 1 << 21  # positions of the rolling-hash powers a MinHasher keeps between batches


# command-line flags of `retromem datastore build` that set these fields, named in error messages
_FLAGS = {"threshold": "--dedup-threshold", "ngram": "--dedup-ngram", "num_perm": "--num-perm",
          "near_fp_rate": "--bloom-fp-rate"}


@dataclass(frozen=True)
class DedupConfig:
    """The ``dedup:`` section of a build config. ``bands`` and ``rows`` left at 0 are chosen from
    ``threshold`` and ``num_perm`` once, here, so that the manifest records the banding used."""

    exact: bool = True
    near: bool = True
    ngram: int = 13  # words per shingle (MassiveDS)
    threshold: float = 0.8  # Jaccard similarity regarded as a near duplicate
    num_perm: int = 128
    bands: int = 0  # 0: chosen from threshold and num_perm (50% detection at threshold; see optimal_bands)
    rows: int = 0
    near_fp_rate: float = 1e-5  # Bloom false-positive rate per band filter
    exact_fp_rate: float = 1e-9  # Bloom false-positive rate of the content-hash filter
    seed: int = 1

    def __post_init__(self) -> None:
        boolean(self.exact, "dedup.exact", flag="--exact-dedup")
        boolean(self.near, "dedup.near", flag="--near-dedup")
        positive_int(self.ngram, "dedup.ngram", flag=_FLAGS["ngram"])
        number(self.threshold, "dedup.threshold", gt=0, lt=1, flag=_FLAGS["threshold"])
        integer(self.num_perm, "dedup.num_perm", ge=2, flag=_FLAGS["num_perm"])
        for name in ("near_fp_rate", "exact_fp_rate"):
            number(getattr(self, name), f"dedup.{name}", gt=0, lt=0.5, flag=_FLAGS.get(name))
        non_negative_int(self.bands, "dedup.bands")
        non_negative_int(self.rows, "dedup.rows")
        integer(self.seed, "dedup.seed")
        if (self.bands == 0) != (self.rows == 0):
            raise ConfigError("`dedup.bands` and `dedup.rows` are set together, or both left at 0")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ConfigError(
                f"`dedup.bands` x `dedup.rows` = {self.bands * self.rows} exceeds "
                f"`dedup.num_perm` = {self.num_perm}"
            )
        if not self.bands:  # 0 means "choose": normalised once so that every reader sees the same banding
            b, r = optimal_bands(self.threshold, self.num_perm)
            object.__setattr__(self, "bands", b)
            object.__setattr__(self, "rows", r)


# How far the chosen banding's 50% detection point may sit from the configured threshold. With
# 128 permutations the closest integer bandings land 0.001-0.005 away; 0.01 is a fifth of the
# spread of a 128-permutation MinHash estimate at Jaccard 0.8 (sd sqrt(0.8 * 0.2 / 128) = 0.035),
# and leaves enough bandings to choose a steep curve among them.
MIDPOINT_TOLERANCE = 0.01


def detection_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(two documents at this shingle Jaccard share at least one band key): 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def detection_midpoint(bands: int, rows: int) -> float:
    """The Jaccard at which the LSH catches a pair half the time: (1 - 0.5^(1/b))^(1/r)."""
    return (1.0 - 0.5 ** (1.0 / bands)) ** (1.0 / rows)


def detection_curve(bands: int, rows: int, points: tuple[float, ...] = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
                    ) -> list[tuple[float, float]]:
    """(Jaccard, probability caught) at ``points``: what ``datastore info`` prints."""
    return [(s, detection_probability(s, bands, rows)) for s in points]


def optimal_bands(threshold: float, num_perm: int, *, fp_weight: float = 0.5, fn_weight: float = 0.5,
                  tolerance: float = MIDPOINT_TOLERANCE) -> tuple[int, int]:
    """(bands, rows) whose detection curve has its 50% point at ``threshold``.

    Among the bandings with ``bands * rows <= num_perm`` whose midpoint lies within ``tolerance``
    of ``threshold``, the one minimising ``fp_weight * FP + fn_weight * FN``, where FP is the area
    under the detection curve below the threshold and FN the area above it (datasketch's
    ``optimal_param``, equal weights, with the midpoint constraint added: unconstrained, the
    minimum for 0.8 and 128 permutations is 9 x 13, whose midpoint 0.82 lets pairs at exactly
    0.8 through 60% of the time). Where no banding comes within ``tolerance`` (few
    permutations), the one whose midpoint is closest.
    """

    def integrate(f, a: float, b: float, n: int = 200) -> float:
        h = (b - a) / n
        return sum(f(a + (i + 0.5) * h) for i in range(n)) * h

    cands = [(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)]
    near = [(b, r) for b, r in cands if abs(detection_midpoint(b, r) - threshold) <= tolerance]
    if not near:
        return min(cands, key=lambda br: abs(detection_midpoint(*br) - threshold))
    best, best_err = near[0], math.inf
    for b, r in near:
        fp = integrate(lambda s: detection_probability(s, b, r), 0.0, threshold)
        fn = integrate(lambda s: 1.0 - detection_probability(s, b, r), threshold, 1.0)
        err = fp_weight * fp + fn_weight * fn
        if err < best_err:
            best, best_err = (b, r), err
    return best


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: decorrelates the linear rolling hashes (uint64 in, uint64 out)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _powers(base: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """base**i and base**-i modulo 2**64 for i < n (base odd)."""
    inv = pow(base, -1, 1 << 64)
    p = np.full(n, base, dtype=np.uint64)
    p[0] = 1
    q = np.full(n, inv, dtype=np.uint64)
    q[0] = 1
    return np.cumprod(p, dtype=np.uint64), np.cumprod(q, dtype=np.uint64)


def _range_hash(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, base: int,
                powers: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Polynomial hash of values[s:e] for each (s, e), position-independent, via prefix sums.
    ``powers``: :func:`_powers` of ``base`` for at least ``len(values) + 1`` positions (else computed)."""
    pw, inv = powers if powers is not None else _powers(base, len(values) + 1)
    prefix = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values * pw[: len(values)], dtype=np.uint64, out=prefix[1:])
    return (prefix[ends] - prefix[starts]) * inv[starts]


@dataclass
class MinHasher:
    """MinHash signatures and LSH band keys for batches of documents."""

    cfg: DedupConfig
    _a: np.ndarray = field(init=False, repr=False)
    _b: np.ndarray = field(init=False, repr=False)
    _pw: dict[int, tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False, default_factory=dict)

    def _powers(self, base: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        # kept between batches, grown to a power of two: recomputing them per batch (two cumprods
        # over every byte) was a third of the shingling's CPU (issue 19). A batch longer than
        # _POWERS_KEPT (one huge document) gets its own, not kept: the cache stays <= 64 MiB.
        if n > _POWERS_KEPT:
            return _powers(base, n)
        have = self._pw.get(base)
        if have is None or len(have[0]) < n:
            have = self._pw[base] = _powers(base, 1 << max(n - 1, 1).bit_length())
        return have

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.cfg.seed)
        n = self.cfg.bands * self.cfg.rows
        self._a = rng.integers(0, 1 << 63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 1 << 63, size=n, dtype=np.uint64)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shingle hashes, owning document index) for a batch; each document gets >= 1 shingle.

        Words are maximal runs of ASCII letters/digits or non-ASCII bytes of the lower-cased
        UTF-8 text; a shingle is ``ngram`` consecutive words (a shorter document is one shingle).
        """
        n = self.cfg.ngram
        joined = "\x00".join(texts)
        if joined.count("\x00") != len(texts) - 1:  # NUL inside a text (control chars kept)
            joined = "\x00".join(t.replace("\x00", " ") for t in texts)
        raw = np.frombuffer(joined.lower().encode("utf-8"), dtype=np.uint8)
        is_word = (raw >= 0x80) | ((raw >= 0x30) & (raw <= 0x39)) | ((raw >= 0x61) & (raw <= 0x7A))
        edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
        w_start, w_end = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        word_hash = _mix64(_range_hash(raw.astype(np.uint64), w_start, w_end, _B_BYTE, self._powers(_B_BYTE, len(raw) + 1)))
        # document of each word: separators are the only NUL bytes
        doc_of_byte_start = np.cumsum(raw == 0)
        doc_of_word = doc_of_byte_start[w_start] if len(w_start) else np.zeros(0, dtype=np.int64)
        n_docs = len(texts)
        first = np.searchsorted(doc_of_word, np.arange(n_docs), side="left")
        last = np.searchsorted(doc_of_word, np.arange(n_docs), side="right")
        counts = last - first
        # full shingles: windows [i, i+n) inside one document
        s_start = np.arange(max(len(word_hash) - n + 1, 0))
        full = s_start[doc_of_word[s_start] == doc_of_word[s_start + n - 1]] if len(s_start) else s_start
        # documents with fewer than n words (including none) get one shingle of all their words
        short = np.flatnonzero(counts < n)
        starts = np.concatenate((full, first[short]))
        ends = np.concatenate((full + n, last[short]))
        owner = np.concatenate((doc_of_word[full] if len(full) else full, short))
        hashes = _mix64(_range_hash(word_hash, starts, ends, _B_WORD, self._powers(_B_WORD, len(word_hash) + 1)))
        order = np.argsort(owner, kind="stable")
        return hashes[order], owner[order]

    def band_keys(self, texts: list[str], block: int = 1 << 16) -> np.ndarray:
        """LSH band keys, shape (len(texts), bands), uint64."""
        hashes, owner = self.shingles(texts)
        seg = np.searchsorted(owner, np.arange(len(texts)))  # every doc has >= 1 shingle
        bounds = np.append(seg, len(hashes))
        sig = np.empty((len(texts), len(self._a)), dtype=np.uint64)
        # Documents in groups of about `block` shingles; each group's 16 permutations at a time are
        # computed into one buffer, reused (fresh temporaries per block were 20-25% of a build's CPU
        # as system time: page faults; issue 19). A document longer than `block` is a group alone.
        buf = np.empty((16, max(block, 1)), dtype=np.uint64)
        d0 = 0
        while d0 < len(texts):
            d1 = max(int(np.searchsorted(bounds, bounds[d0] + block, side="right")) - 1, d0 + 1)
            h0, h1 = int(bounds[d0]), int(bounds[d1])
            m = h1 - h0
            work = buf[:, :m] if m <= buf.shape[1] else np.empty((16, m), dtype=np.uint64)
            local = seg[d0:d1] - h0
            for p0 in range(0, len(self._a), 16):
                a, b = self._a[p0 : p0 + 16, None], self._b[p0 : p0 + 16, None]
                k = len(a)
                np.multiply(a, hashes[None, h0:h1], out=work[:k])
                np.add(work[:k], b, out=work[:k])
                sig[d0:d1, p0 : p0 + k] = np.minimum.reduceat(work[:k], local, axis=1).T
            d0 = d1
        r = self.cfg.rows
        bands = sig[:, : self.cfg.bands * r].reshape(len(texts), self.cfg.bands, r)
        key = np.zeros((len(texts), self.cfg.bands), dtype=np.uint64)
        for j in range(r):
            key = _mix64(key ^ bands[:, :, j])
        return _mix64(key + np.arange(self.cfg.bands, dtype=np.uint64))


def bloom_params(n_items: int, fp_rate: float) -> tuple[int, int]:
    """(bits, hash functions) of a Bloom filter holding n_items at fp_rate."""
    n = max(n_items, 1)
    bits = max(64, math.ceil(-n * math.log(fp_rate) / math.log(2) ** 2))
    k = max(1, round(bits / n * math.log(2)))
    return bits, k


def bloom_bytes_per_billion(cfg: DedupConfig) -> int:
    """Dedup memory for 10**9 documents: what a build of that size holds in RAM."""
    total = 0
    if cfg.near:
        total += cfg.bands * bloom_params(10**9, cfg.near_fp_rate)[0] // 8
    if cfg.exact:
        total += bloom_params(10**9, cfg.exact_fp_rate)[0] // 8
    return total


class BloomFilter:
    """A bit-packed Bloom filter over uint64 keys, with batch query-and-insert."""

    def __init__(self, bits: int, k: int, data: np.ndarray | None = None) -> None:
        self.bits, self.k = bits, k
        self.data = np.zeros((bits + 7) // 8, dtype=np.uint8) if data is None else data

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        h1 = keys
        h2 = _mix64(keys ^ np.uint64(0xA0761D6478BD642F)) | np.uint64(1)
        i = np.arange(self.k, dtype=np.uint64)
        return ((h1[:, None] + i[None, :] * h2[:, None]) % np.uint64(self.bits)).astype(np.int64)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        pos = self._positions(keys)
        hit = (self.data[pos >> 3] >> (pos & 7).astype(np.uint8)) & 1
        return hit.all(axis=1)

    def add(self, keys: np.ndarray) -> None:
        pos = self._positions(keys).ravel()
        np.bitwise_or.at(self.data, pos >> 3, (np.uint8(1) << (pos & 7).astype(np.uint8)))


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """True where keys[i] equals some keys[j], j < i (a duplicate within the batch)."""
    _, first_idx, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first_idx[inverse.ravel()] < np.arange(len(keys))


class Deduplicator:
    """Stateful exact + near dedup over batches of documents in corpus order.

    A datastore keeps the filters of every build and add as *generations* (``dedup/gen-*.npz``,
    each sized for the documents it saw): an add checks its documents against the earlier
    generations (read-only, :meth:`add_prior`) and inserts them into a new one, so adding never
    re-reads old text and never rewrites old filters (a scalable Bloom filter: the false-positive
    rates of the generations add up)."""

    def __init__(self, cfg: DedupConfig, expected_docs: int) -> None:
        self.cfg = cfg
        self.exact = BloomFilter(*bloom_params(expected_docs, cfg.exact_fp_rate)) if cfg.exact else None
        bits, k = bloom_params(expected_docs, cfg.near_fp_rate)
        self.bands = [BloomFilter(bits, k) for _ in range(cfg.bands)] if cfg.near else []
        self.prior: list[tuple[BloomFilter | None, list[BloomFilter]]] = []

    def add_prior(self, state: dict[str, np.ndarray], expected_docs: int) -> None:
        """An earlier generation's filters (its :meth:`state`, sized for ``expected_docs``): checked, never written."""
        cfg = self.cfg
        exact = BloomFilter(*bloom_params(expected_docs, cfg.exact_fp_rate), data=np.asarray(state["exact"])) \
            if cfg.exact and "exact" in state else None
        bits, k = bloom_params(expected_docs, cfg.near_fp_rate)
        bands = [BloomFilter(bits, k, data=np.asarray(state[f"band{j}"])) for j in range(cfg.bands)] \
            if cfg.near and "band0" in state else []
        self.prior.append((exact, bands))

    def nbytes(self) -> int:
        return sum(f.data.nbytes for f in ([self.exact] if self.exact else []) + self.bands)

    def process(self, content_hash: np.ndarray, band_keys: np.ndarray) -> np.ndarray:
        """Reason code per document: 0 keep, 1 exact duplicate, 2 near duplicate.

        content_hash: (n,) uint64; band_keys: (n, bands) uint64.
        """
        n = len(content_hash)
        reason = np.zeros(n, dtype=np.int8)
        if self.exact is not None:
            dup = self.exact.contains(content_hash) | first_occurrence(content_hash)
            for exact, _ in self.prior:
                if exact is not None:
                    dup |= exact.contains(content_hash)
            reason[dup] = 1
            self.exact.add(content_hash)
        if self.bands:
            near = np.zeros(n, dtype=bool)
            for j, bloom in enumerate(self.bands):
                keys = band_keys[:, j]
                near |= bloom.contains(keys) | first_occurrence(keys)
                for _, bands in self.prior:
                    if bands:
                        near |= bands[j].contains(keys)
                bloom.add(keys)
            reason[(reason == 0) & near] = 2
        return reason

    def state(self) -> dict[str, np.ndarray]:
        out = {f"band{j}": f.data for j, f in enumerate(self.bands)}
        if self.exact is not None:
            out["exact"] = self.exact.data
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for j, f in enumerate(self.bands):
            f.data = np.array(state[f"band{j}"])
        if self.exact is not None:
            f = self.exact
            f.data = np.array(state["exact"])


# ---------------------------------------------------------------------------------------------
# partitioned dedup: the same rule, key by key, in independent partitions

# One dedup key of one document: ``kind`` 0 is the content hash, 1 + j band j's LSH key. Keys of
# different kinds never match each other (a band's Bloom filter only ever saw that band's keys).
KEY_RECORD = np.dtype([("key", "<u8"), ("doc", "<i8"), ("kind", "u1")])  # 17 bytes, packed
EXACT_KIND = 0
_PARTITION_SALT = np.uint64(0x2545F4914F6CDD1D)


def key_kinds(cfg: DedupConfig) -> list[int]:
    """The key kinds a config uses: 0 (content hash) when exact, 1 + j for each band when near."""
    return ([EXACT_KIND] if cfg.exact else []) + ([1 + j for j in range(cfg.bands)] if cfg.near else [])


def key_records(content_hash: np.ndarray, band_keys: np.ndarray, first_doc: int, cfg: DedupConfig) -> np.ndarray:
    """Every dedup key of a run of documents numbered from ``first_doc`` (their global position in
    corpus order). content_hash: (n,) uint64; band_keys: (n, bands) uint64 -> (n * kinds,) KEY_RECORD."""
    n = len(content_hash)
    kinds = key_kinds(cfg)
    rec = np.empty(n * len(kinds), dtype=KEY_RECORD)
    for i, kind in enumerate(kinds):
        sl = slice(i * n, (i + 1) * n)
        rec["key"][sl] = content_hash if kind == EXACT_KIND else band_keys[:, kind - 1]
        rec["doc"][sl] = np.arange(first_doc, first_doc + n, dtype=np.int64)
        rec["kind"][sl] = kind
    return rec


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition (0 .. partitions-1) of each uint64 key: equal keys always share one."""
    return (_mix64(keys ^ _PARTITION_SALT) % np.uint64(partitions)).astype(np.int64)


def scatter(records: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """(records grouped by partition, offsets): partition q's records are ``out[offsets[q]:offsets[q + 1]]``,
    in their original order. offsets: (partitions + 1,) int64."""
    q = partition_of(records["key"], partitions)
    order = np.argsort(q, kind="stable")
    offsets = np.searchsorted(q[order], np.arange(partitions + 1)).astype(np.int64)
    return records[order], offsets


def partition_duplicates(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exact, near): sorted unique ``doc`` numbers of the records whose (kind, key) an earlier
    document (lower ``doc``) also has. Exact, not probabilistic: a sort of the partition's keys."""
    order = np.lexsort((records["doc"], records["key"], records["kind"]))
    key, kind, doc = records["key"][order], records["kind"][order], records["doc"][order]
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (key[1:] == key[:-1]) & (kind[1:] == kind[:-1])  # not the first (lowest doc) of its group
    return np.unique(doc[dup & (kind == EXACT_KIND)]), np.unique(doc[dup & (kind != EXACT_KIND)])


def reasons_from_marks(first_doc: int, n_docs: int, exact: list[np.ndarray], near: list[np.ndarray]) -> np.ndarray:
    """Reason codes (0 keep, 1 exact, 2 near) of documents first_doc .. first_doc + n_docs - 1 from the
    doc numbers (inside that range) that partitions or earlier generations marked; exact wins."""
    reason = np.zeros(n_docs, dtype=np.int8)
    for docs in near:
        reason[np.asarray(docs, dtype=np.int64) - first_doc] = 2
    for docs in exact:
        reason[np.asarray(docs, dtype=np.int64) - first_doc] = 1
    return reason


def partitioned_reasons(content_hash: np.ndarray, band_keys: np.ndarray, cfg: DedupConfig, partitions: int) -> np.ndarray:
    """The partitioned rule in one process (tests and benchmarks; the build runs it as tasks)."""
    rec, offsets = scatter(key_records(content_hash, band_keys, 0, cfg), partitions)
    exact, near = [], []
    for q in range(partitions):
        e, nr = partition_duplicates(rec[offsets[q] : offsets[q + 1]])
        exact.append(e)
        near.append(nr)
    return reasons_from_marks(0, len(content_hash), exact, near)
