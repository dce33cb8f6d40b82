"""FAISS plumbing shared by the dense index's build, search and evaluation: the on-disk format
version, index files read and written safely, GPU placement, and per-call search parameters.

FAISS is imported inside each function (``faiss-gpu`` replaces ``faiss-cpu`` where present), so
importing this module costs nothing. Metric: inner product over L2-normalised vectors.
"""

from __future__ import annotations

import logging
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
