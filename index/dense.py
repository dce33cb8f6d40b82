"""Searching a built dense index: ``DenseIndex.open(path).search(...)``.

Opening checks what was built (format, file sizes, the checksums of the index files before FAISS
parses a byte of them, the shards' vector count) and what it was built from: the index refuses to serve another datastore or another embedder than the ones its
``index.json`` records. ``search`` takes texts (embedded with the recorded model) or vectors,
searches every shard and merges them by score (as MassiveDS does), excludes given documents per
query while still returning ``k`` hits, and can fetch each hit's text, tokens and continuation from
the datastore. ``knn`` is the bare batched top-k, for measurements (:mod:`retromem.index.dense_eval`).

Metric: the embedder's similarity as recorded (cosine: inner product over L2-normalised vectors, the
default of older indexes; dot; euclidean, scored as minus the distance), and text queries embedded
with the recorded query prompt (:meth:`retromem.index.embed.Embedder.from_info`).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retromem.datastore.integrity import check_sizes, read_manifest, recorded_files, verify_files
from retromem import storage
from retromem.errors import ArtifactCorruptError, IndexFormatError, QueryError
from retromem.index.dense_faiss import (INDEX_FORMAT, id_selector, read_index, search_parameters, set_gpu_params, to_gpu,
                                        use_gpu)
from retromem.index.embed import Embedder, EmbedderInfo, faiss_scores, index_similarity
from retromem.index.types import (MAX_K, BoundToDatastore, SearchResult, check_k, chunks_matching, deleted_chunk_ids,
                                  fetch_payloads, resolved_meta)

# nprobe / efSearch above this buy no recall and cost memory (efSearch about 8 bytes per unit), and
# FAISS's C++ int would overflow at 2^31: a caller's mistake, refused before FAISS sees it
MAX_SEARCH_PARAM = 1 << 20


class DenseIndex(BoundToDatastore):
    """A built dense index, opened for search (see the module docstring)."""

    def __init__(self, path: str | Path, *, datastore=None, mmap: bool = False, gpu: bool | None = False,
                 verify: bool = True) -> None:
        """``verify``: check the recorded checksums of the index files before FAISS reads them (a full
        read of each file, which FAISS does anyway unless ``mmap``): damaged bytes never reach FAISS,
        which would crash or answer wrongly. Sizes are always checked."""
        self.path = storage.local_dir(path)  # a URL: its local mirror (mmap needs files)
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            hint = " (an unfinished build: re-run `retromem index build-dense`)" if (self.path / "_work").exists() else ""
            raise IndexFormatError(f"{self.path} is not a dense index: no index.json{hint}")
        # paths in index.json are relative to the index (absolute in older ones): made absolute here
        self.meta = resolved_meta(read_manifest(meta_path), self.path)
        if self.meta.get("format_version") != INDEX_FORMAT or self.meta.get("kind") != "dense":
            raise IndexFormatError(f"{self.path} holds index format {self.meta.get('format_version')} "
                                   f"({self.meta.get('kind')}); this retromem reads dense format {INDEX_FORMAT}")
        try:
            self.dim = int(self.meta["dim"])
            self.ntotal = int(self.meta["ntotal"])
            self.factory = self.meta["factory"]
            self.defaults = dict(self.meta.get("search_defaults") or {})
            merged = self.meta.get("merged")
            files = [merged["file"]] if merged else [r["file"] for r in self.meta["shards"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactCorruptError(meta_path, f"a field is missing or malformed ({type(exc).__name__}: {exc}): "
                                                  "the manifest is damaged; rebuild the index") from None
        self._lock = threading.Lock()
        check_sizes(self.path, self.meta)
        if verify and recorded_files(self.meta) is not None:
            needed = files + ([merged["ivfdata"]] if merged else [])
            bad = verify_files(self.path, self.meta, names=needed)
            if bad:
                raise ArtifactCorruptError(self.path / bad[0][0], bad[0][1] + "; rebuild with `retromem index build-dense`")
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
                idx = read_index(p, mmap=mmap)
            self._indexes.append(idx)
        if sum(int(i.ntotal) for i in self._indexes) != self.ntotal:
            raise IndexFormatError(f"{self.path}: index files hold {sum(int(i.ntotal) for i in self._indexes)} vectors, "
                                   f"index.json says {self.ntotal}")
        self.gpu = use_gpu(gpu)
        if self.gpu:
            self._indexes = [(to_gpu(i) or i) for i in self._indexes]
        self._datastore = None
        self._tomb_sel = None  # (datastore key, faiss selector of its deleted chunks)
        self._params_cache: dict = {}  # (shard, nprobe, efSearch) -> FAISS SearchParameters, without a selector
        self._deleted = None  # (datastore, its deleted chunk ids)
        if datastore is not None:
            self.attach_datastore(datastore)
        self._embedder: Embedder | None = None

    @staticmethod
    def _read_merged(path: Path, ivfdata: Path):
        import faiss

        index = read_index(path)  # its OnDiskInvertedLists memory-map the .ivfdata themselves
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

    # -- what it was built from (datastore: BoundToDatastore) ----------------------------------

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self.attach_embedder(Embedder.from_info(self.meta["embedder"]))  # the recorded prompts and similarity
        return self._embedder

    def attach_embedder(self, embedder: Embedder) -> None:
        want = self.meta["embedder"]
        if embedder.info.weights_sha256 != want["weights_sha256"] or embedder.dim != want["dim"]:
            raise IndexFormatError(f"{self.path} was built with embedder {want['name']} "
                                   f"(sha256 {want['weights_sha256'][:12]}, {want['dim']} dims), not {embedder.info.name} "
                                   f"(sha256 {embedder.info.weights_sha256[:12]}, {embedder.dim} dims)")
        if embedder.info.query_encoding != EmbedderInfo.from_dict(want).query_encoding:
            raise IndexFormatError(f"{self.path} embeds queries as (similarity, normalized, query prompt) "
                                   f"{EmbedderInfo.from_dict(want).query_encoding}, not {embedder.info.query_encoding}: "
                                   "use Embedder.from_info(index.meta['embedder'])")
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

    def check_k(self, k: int) -> int:
        """``k`` as an int, or a :class:`QueryError` unless it is in 1..min(MAX_K, ntotal)."""
        return check_k(k, self.ntotal)

    def knn(self, x: np.ndarray, k: int, *, nprobe: int | None = None,
            ef_search: int | None = None, sel=None) -> tuple[np.ndarray, np.ndarray]:
        """Bare batched top-k over every shard, merged by score: (scores (n, k) float32, chunk ids
        (n, k) int64), -inf / -1 where fewer are reachable. No checks, no exclusion, no payloads:
        ``x`` must already be a C-contiguous (n, dim) float32 array and ``k`` checked (:meth:`check_k`).
        ``nprobe`` / ``ef_search`` default to the index's tuned values; ``sel`` (a ``faiss.IDSelector``,
        CPU only) restricts the search to the chunk ids it accepts."""
        nprobe = self.defaults.get("nprobe") if nprobe is None else nprobe
        ef_search = self.defaults.get("efSearch") if ef_search is None else ef_search
        Ds, Is = [], []
        for i, index in enumerate(self._indexes):
            kk = min(k, int(index.ntotal))
            if kk == 0:
                continue
            if self.gpu:
                with self._lock:  # GPU indexes take parameters by mutation, not per call
                    set_gpu_params(index, nprobe)
                    D, I = index.search(x, kk)
            else:
                D, I = index.search(x, kk, params=self._params(i, nprobe, ef_search, sel))
            Ds.append(D)
            Is.append(I)
        D = Ds[0] if len(Ds) == 1 else np.concatenate(Ds, axis=1)
        I = Is[0] if len(Is) == 1 else np.concatenate(Is, axis=1)
        D = faiss_scores(D, index_similarity(self.meta))  # higher is better, any metric
        D = np.where(I < 0, np.float32(-np.inf), D).astype(np.float32, copy=False)
        if len(self._indexes) > 1:  # merge shards by score
            order = np.argsort(-D, axis=1, kind="stable")[:, :k]
            D = np.take_along_axis(D, order, axis=1)
            I = np.take_along_axis(I, order, axis=1)
        return D, I.astype(np.int64)

    def _params(self, i: int, nprobe: int | None, ef_search: int | None, sel):
        """Shard i's FAISS search parameters; without a selector they are built once per (shard,
        nprobe, efSearch) and shared by every call (FAISS only reads them): building the tree
        through SWIG costs more than a small index's search."""
        if sel is not None:
            return search_parameters(self._indexes[i], nprobe, ef_search, sel)
        key = (i, nprobe, ef_search)
        cache = self._params_cache
        if key not in cache:
            if len(cache) >= 64:  # nprobe / efSearch come from requests: keep the cache small
                cache.clear()
            cache[key] = search_parameters(self._indexes[i], nprobe, ef_search)
        return cache[key]

    def search(self, queries, k: int = 10, *, nprobe: int | None = None, ef_search: int | None = None,
               exclude_doc_ids: Sequence[Iterable[int] | int | None] | None = None,
               filters: dict[str, Any] | None = None,
               fetch: bool | str | Sequence[str] = False) -> SearchResult:
        """Top-k chunks for each query (texts or an (n, dim) float array).

        ``exclude_doc_ids[i]`` (an int or ints) are documents query i must not retrieve from (RETRO
        excludes the document being predicted); row i still has k hits. ``filters`` (``{field: value
        or [values]}``, AND over fields, equality or set membership on the datastore's declared
        metadata fields) keeps the documents that match, enforced inside the FAISS search by an id
        selector so that k hits still come back. Deleted documents (the datastore's tombstones) are
        never returned, by the same selector. ``fetch`` adds payloads: True for everything, or any
        of "text", "tokens", "continuation" (each with the chunk's ``source_id`` and metadata).
        """
        x = self._queries(queries)
        k = self.check_k(k)
        for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 < v <= MAX_SEARCH_PARAM):
                raise QueryError(f"{name} must be an integer in 1..{MAX_SEARCH_PARAM}, got {v!r}")
        want = _fetch_flags(fetch)
        excl = self._exclusions(exclude_doc_ids, len(x))
        allowed, deleted = self._eligible(filters)
        sel = None if self.gpu else id_selector(allowed, deleted) if allowed is not None else self._tombstone_selector(deleted)
        post = None
        if self.gpu and (allowed is not None or len(deleted)):  # GPU indexes take no selector: filter what comes back
            post = (allowed, deleted)
        if excl is None and post is None:
            D, I = self.knn(x, k, nprobe=nprobe, ef_search=ef_search, sel=sel)
        else:
            D, I = self._search_excluding(x, k, nprobe, ef_search, excl, sel, post)
        payloads = None
        if want:
            payloads = []
            for row in I:
                ok = row[row >= 0]
                payloads.append(fetch_payloads(self.datastore, ok, text="text" in want, tokens="tokens" in want,
                                               continuation="continuation" in want))
        return SearchResult(I, D, payloads)

    def _eligible(self, filters: dict[str, Any] | None) -> tuple[np.ndarray | None, np.ndarray]:
        """(chunk ids the filters allow, None for all; deleted chunk ids of the datastore's version)."""
        ds = self.datastore
        cached = self._deleted
        if cached is None or cached[0] is not ds:  # a datastore object is one version: its tombstones are fixed
            cached = (ds, deleted_chunk_ids(ds))
            self._deleted = cached
        deleted = cached[1]
        if not filters:
            return None, deleted
        allowed = chunks_matching(ds, filters)
        if len(deleted):
            allowed = np.setdiff1d(allowed, deleted, assume_unique=True)
        return allowed, np.zeros(0, np.int64)

    def _tombstone_selector(self, deleted: np.ndarray):
        """The selector leaving out ``deleted`` chunk ids, built once per datastore version."""
        if not len(deleted):
            return None
        key = (id(self._datastore), len(deleted), int(deleted[-1]))
        cached = self._tomb_sel
        if cached is None or cached[0] != key:
            cached = (key, id_selector(None, deleted))
            self._tomb_sel = cached  # one tuple assignment: a concurrent reader sees the old or the new pair
        return cached[1]

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

    def _search_excluding(self, x, k, nprobe, ef_search, excl: list[np.ndarray] | None, sel=None, post=None):
        """Top-k over-fetching until k hits survive the per-query document exclusions (and, on a GPU,
        ``post`` = (allowed chunk ids or None, deleted chunk ids), which a CPU search enforces by ``sel``)."""
        ds = self.datastore
        first = ds.doc_first_chunk_array
        if excl is None:
            excl = [np.zeros(0, np.int64)] * len(x)
        # how many hits each query can lose: the chunks of its excluded documents
        lost = np.array([int((first[e + 1] - first[e]).sum()) if len(e) else 0 for e in excl])
        if post is not None:
            lost = lost + (len(post[1]) if post[0] is None else self.ntotal - len(post[0]))
        outD = np.full((len(x), k), -np.inf, np.float32)
        outI = np.full((len(x), k), -1, np.int64)
        pending = np.arange(len(x))
        kk = min(k + int(min(lost.max(), 4 * k)), self.ntotal)
        while len(pending):
            D, I = self.knn(x[pending], min(kk, MAX_K * 4, self.ntotal), nprobe=nprobe, ef_search=ef_search, sel=sel)
            docs = np.where(I >= 0, ds.doc_ids(np.maximum(I, 0)).reshape(I.shape), -1)  # read through the verified API
            ok = I >= 0
            if post is not None:
                if post[0] is not None:
                    ok &= np.isin(I, post[0])
                ok &= ~np.isin(I, post[1])
            still = []
            for r, q in enumerate(pending):
                keep = ok[r] & ~np.isin(docs[r], excl[q])
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


