"""FAISS plumbing shared by the dense index's build, search and evaluation: the on-disk format
version, index files read and written safely, GPU placement, training (two-level k-means for many
IVF lists, and its FLOP count for ``retromem plan``), and per-call search parameters.

FAISS is imported inside each function (``faiss-gpu`` replaces ``faiss-cpu`` where present), so
importing this module costs nothing. Metric: inner product over L2-normalised vectors.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from retromem.datastore.atomic import atomic_path
from retromem.errors import ConfigError, IndexFormatError
from retromem.index.factory import parse_factory

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1  # format_version of index.json


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def use_gpu(flag: bool | None) -> bool:
    """Whether to use GPUs: ``None`` means when FAISS sees one; ``True`` without one is an error."""
    n = gpu_count()
    if flag and n == 0:
        raise ConfigError("`--gpu` was asked for but FAISS sees no GPU (install faiss-gpu on a CUDA machine)")
    return n > 0 if flag is None else bool(flag)


def to_gpu(index):
    """A GPU copy of ``index`` for adding/searching, or None where FAISS has no GPU version (HNSW)."""
    import faiss

    try:
        co = faiss.GpuMultipleClonerOptions()
        co.useFloat16 = True
        co.shard = True
        return faiss.index_cpu_to_all_gpus(index, co)
    except (RuntimeError, AttributeError) as exc:
        logger.info("no GPU version of this index (%s); staying on CPU", str(exc).splitlines()[0][:120])
        return None


def write_index(index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (a killed write leaves no half file)."""
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def read_index(path: Path, mmap: bool = False):
    """Read an index file, turning a missing or damaged one into an :class:`IndexFormatError`."""
    import faiss

    if not path.is_file():
        raise IndexFormatError(f"index file {path} is missing: rebuild with `retromem index build-dense`")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    except RuntimeError as exc:
        raise IndexFormatError(f"index file {path} is truncated or corrupt ({str(exc).splitlines()[0][:200]}): "
                               "rebuild it with `retromem index build-dense`") from exc


# ---------------------------------------------------------------------------------------------
# training

# From this many IVF lists on, the coarse k-means runs in two levels (FAISS's recipe for large nlist,
# faiss.contrib.clustering): sqrt(nlist) clusters, then each split into lists in proportion to its
# points. Flat k-means compares every training point with every list (points x nlist x d per iteration);
# two levels compare it with ~2 sqrt(nlist), level 1 on a sample: 34x fewer FLOPs at nlist 4,096, 131x at
# 32,768 (10^7 vectors), for recall within a few points of flat k-means (tests/index/test_dense_train.py).
TWO_LEVEL_MIN_NLIST = 4096
KMEANS_NITER = 10  # FAISS's default for IVF training, at both levels
LEVEL1_POINTS_PER_CENTROID = 2000  # level 1 samples the training set down to this (as faiss.contrib does)
PQ_TRAIN_POINTS_PER_CENTROID = 256  # FAISS samples PQ training down to 256 x 2**nbits points
PQ_NITER = 25  # FAISS's ProductQuantizer k-means iterations


def kmeans_flops(nlist: int, points: int, d: int, *, two_level: bool | None = None, pq_m: int = 0,
                 pq_ksub: int = 0) -> float:
    """FLOPs of training an IVF(-PQ) index as :func:`train_ivf` does: the coarse k-means (flat, or two
    levels from ``TWO_LEVEL_MIN_NLIST`` lists on, balanced sub-clusters assumed) over ``points`` vectors of
    dimension ``d``, plus the PQ codebooks (``pq_m`` sub-quantizers of ``pq_ksub`` centroids over
    d / pq_m dimensions each, on at most 256 x ksub points). Two FLOPs per multiply-add."""
    flops = 0.0
    if nlist:
        if two_level if two_level is not None else nlist >= TWO_LEVEL_MIN_NLIST:
            nc1 = max(1, math.isqrt(nlist))
            level1 = min(points, LEVEL1_POINTS_PER_CENTROID * nc1) * nc1 * KMEANS_NITER
            assign = points * nc1  # every training point to its coarse cluster, once
            level2 = points * (nlist / nc1) * KMEANS_NITER  # each point against its cluster's lists
            flops += 2.0 * d * (level1 + assign + level2)
        else:
            flops += 2.0 * d * points * nlist * KMEANS_NITER
    if pq_m and pq_ksub:
        flops += 2.0 * d * min(points, PQ_TRAIN_POINTS_PER_CENTROID * pq_ksub) * pq_ksub * PQ_NITER
    return flops


def no_polysemous_training(index) -> None:
    """Turn off FAISS's polysemous training of an IVF-PQ index's codes (on by default in ``index_factory``).
    It re-orders each sub-quantizer's centroids so that Hamming distances between codes approximate
    theirs, which only polysemous search (``polysemous_ht``) uses and nothing here does; the ADC
    distances, hence every search result, are the same without it, and it costs a fixed ~55 CPU-s per
    training of 8-bit PQ32 on the development machine (~95% of training at 10^5 vectors)."""
    import faiss

    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False


def train_ivf(index, xt, *, two_level: bool | None = None, seed: int = 1234) -> None:
    """Train ``index`` on ``xt`` (n, d) float32: an IVF index (possibly behind pre-transforms such as OPQ)
    gets its coarse centroids from two-level k-means when it has ``TWO_LEVEL_MIN_NLIST`` lists or more
    (``two_level`` forces either way), then its codes trained on the residuals as FAISS does; any other
    index is trained by FAISS as it is. Spherical k-means for an inner-product index, as FAISS's own."""
    import faiss
    import numpy as np

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        # the coarse centroids live in the transformed space: train and apply the chain first
        x = xt
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            vt.train(x)
            x = vt.apply(x)
        train_ivf(index.index, np.ascontiguousarray(x, dtype=np.float32), two_level=two_level, seed=seed)
        index.is_trained = True
        return
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        index.train(xt)
        return
    if two_level is None:
        two_level = ivf.nlist >= TWO_LEVEL_MIN_NLIST
    if two_level and not (ivf.quantizer.is_trained and ivf.quantizer.ntotal == ivf.nlist):
        centroids = two_level_centroids(xt, int(ivf.nlist), spherical=bool(ivf.cp.spherical), seed=seed)
        ivf.quantizer.train(centroids)
        ivf.quantizer.add(centroids)
    index.train(xt)  # with a full quantizer FAISS trains only the codes (PQ on the residuals)


def two_level_centroids(xt, nlist: int, *, spherical: bool = False, seed: int = 1234):
    """(nlist, d) centroids: k-means into sqrt(nlist) clusters, then each cluster's points into a share
    of the lists proportional to its size (FAISS's rebalanced two-level clustering). Needs at least
    ``nlist`` points, so that no cluster gets more lists than points."""
    import faiss
    import numpy as np

    n, d = xt.shape
    if n < nlist:
        raise ConfigError(f"two-level k-means into {nlist:,} lists needs at least {nlist:,} training vectors, got {n:,} "
                          "(build-dense --train-size, or fewer lists)")
    nc1 = max(1, math.isqrt(nlist))
    km = faiss.Kmeans(d, nc1, niter=KMEANS_NITER, max_points_per_centroid=LEVEL1_POINTS_PER_CENTROID,
                      spherical=spherical, seed=seed)
    km.train(xt)
    _, a1 = km.assign(xt)
    counts = np.bincount(a1, minlength=nc1)
    cum = np.cumsum(counts)
    share = cum * nlist // cum[-1]  # lists of clusters 0..c together; each cluster's share <= its points (n >= nlist)
    share[1:] -= share[:-1].copy()
    order = np.argsort(a1, kind="stable")
    out, i0 = [], 0
    for c in range(nc1):
        i1 = i0 + int(counts[c])
        k = int(share[c])
        if k:
            sub = xt[order[i0:i1]]  # (counts[c], d)
            km2 = faiss.Kmeans(d, k, niter=KMEANS_NITER, spherical=spherical, seed=seed + 1 + c)
            km2.train(sub)
            out.append(km2.centroids)
        i0 = i1
    return np.ascontiguousarray(np.vstack(out), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# search parameters


def has_search_param(factory: str, name: str, d: int) -> bool:
    """Whether indexes of ``factory`` take search parameter ``name`` ("nprobe" or "efSearch")."""
    spec = parse_factory(factory, d)
    if name == "nprobe":
        return spec.nlist > 0
    return spec.hnsw_m > 0 or spec.coarse_hnsw_m > 0


def default_search_params(factory: str, d: int) -> dict[str, int]:
    """The search parameters a freshly built index starts with (before tuning)."""
    params = {}
    if has_search_param(factory, "nprobe", d):
        params["nprobe"] = 16
    if has_search_param(factory, "efSearch", d):
        params["efSearch"] = 64
    return params


def search_parameters(index, nprobe: int | None, ef_search: int | None, sel=None):
    """A FAISS ``SearchParameters`` tree for ``index`` (IDMap, pre-transform, IVF with an HNSW
    quantizer, HNSW), so parameters travel with the call and threads never share mutable state.

    ``sel`` (a ``faiss.IDSelector`` over chunk ids) restricts the search to the ids it accepts,
    inside FAISS, so a search still returns k eligible hits (metadata filters, tombstones); it is
    set at every level of the tree (the IDMap translates it to its internal ids)."""
    import faiss

    p = _search_parameters(index, nprobe, ef_search)
    if sel is None:
        return p
    if p is None:
        p = faiss.SearchParameters()
    q = p
    while q is not None:
        q.sel = sel
        q = getattr(q, "index_params", None)
    p._keep_sel = sel  # the selector must live as long as the parameters
    return p


def _search_parameters(index, nprobe: int | None, ef_search: int | None):
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return _search_parameters(index.index, nprobe, ef_search)
    if isinstance(index, faiss.IndexPreTransform):
        inner = _search_parameters(index.index, nprobe, ef_search)
        if inner is None:
            return None
        p = faiss.SearchParametersPreTransform()
        p.index_params = inner
        p._keep = inner  # keep the inner object alive as long as the outer one
        return p
    if isinstance(index, faiss.IndexIVF):
        p = faiss.SearchParametersIVF()
        if nprobe is not None:
            p.nprobe = int(min(nprobe, index.nlist))
        else:
            p.nprobe = int(index.nprobe)
        q = faiss.downcast_index(index.quantizer)
        if isinstance(q, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW()
            # the coarse graph must return nprobe lists: efSearch below nprobe would starve it
            qp.efSearch = int(max(ef_search or 0, p.nprobe, q.hnsw.efSearch))
            p.quantizer_params = qp
            p._keep = qp
        return p
    if isinstance(index, faiss.IndexHNSW):
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(ef_search if ef_search is not None else index.hnsw.efSearch)
        return p
    return None


def id_selector(allowed=None, excluded=None):
    """A ``faiss.IDSelector`` accepting the ids in ``allowed`` (None: every id) that are not in
    ``excluded`` (None or empty: none), or None when it would accept everything. Hash-set batches
    (``IDSelectorBatch``): the cost is per id named, not per id in the index."""
    import faiss
    import numpy as np

    parts = []
    if allowed is not None:
        a = np.ascontiguousarray(allowed, dtype=np.int64)
        parts.append(faiss.IDSelectorBatch(len(a), faiss.swig_ptr(a)))
    if excluded is not None and len(excluded):
        e = np.ascontiguousarray(excluded, dtype=np.int64)
        inner = faiss.IDSelectorBatch(len(e), faiss.swig_ptr(e))  # copies the ids into its hash set
        parts.append(faiss.IDSelectorNot(inner))
        parts[-1]._keep = inner  # IDSelectorNot holds a bare pointer to it
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    sel = faiss.IDSelectorAnd(parts[0], parts[1])
    sel._keep = parts
    return sel


def set_gpu_params(index, nprobe: int | None) -> None:
    """Set ``nprobe`` on a GPU index, which takes parameters by mutation, not per call."""
    import faiss

    if nprobe is not None:
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
        except RuntimeError:
            pass  # not an IVF index
