"""FAISS factory strings: what they cost, how much they must be trained on, and which to pick.

FAISS names an index by a factory string (``"Flat"``, ``"HNSW32"``, ``"IVF4096,PQ64"``,
``"OPQ64,IVF65536_HNSW32,PQ64"``). This module reads one closely enough to predict the bytes an
index of ``n`` vectors takes (used by the automatic choice and by ``retromem plan``) and the size of
the training sample it needs, and picks a factory from a memory budget the way autofaiss does:
the most accurate index that fits.

The byte model counts what dominates at scale: per-vector codes, the 8-byte id every inverted
list (or ``IndexIDMap``) stores, HNSW's neighbour lists (``2 * M`` int32 links at level 0 plus
about ``M / (M - 1)`` more above), and the fixed parts (coarse centroids, OPQ/PCA matrices, PQ
codebooks). Tests compare it with the size of real built indexes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from retromem.errors import ConfigError

# FAISS clustering warns below 39 training points per centroid and samples down above 256.
MIN_POINTS_PER_CENTROID = 39
MAX_POINTS_PER_CENTROID = 256
TRAIN_CAP = 1_000_000


@dataclass(frozen=True)
class FactorySpec:
    factory: str
    d_in: int
    d: int  # dimension after the pre-transform (OPQ/PCA)
    pretransform_bytes: int
    nlist: int  # 0: not an IVF index
    coarse_hnsw_m: int  # HNSW coarse quantizer (IVF65536_HNSW32) or 0
    hnsw_m: int  # top-level HNSW graph or 0
    code_bytes: float  # per-vector code (storage) bytes
    codebook_bytes: int  # PQ/SQ tables
    pq_ksub: int  # 2**nbits of a PQ, 0 if none
    refine_bytes: float  # per-vector bytes of a refinement stage (RFlat)

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0

    @property
    def needs_training(self) -> bool:
        return self.nlist > 0 or self.pq_ksub > 0 or self.pretransform_bytes > 0 or "SQ" in self.factory

    def bytes_per_vector(self) -> float:
        graph = self.hnsw_m * 2 * 4 * (1 + 1 / max(self.hnsw_m - 1, 1)) if self.hnsw_m else 0.0
        return self.code_bytes + 8 + graph + self.refine_bytes  # 8: the chunk_id

    def fixed_bytes(self) -> int:
        centroids = self.nlist * self.d * 4
        coarse_graph = int(self.nlist * self.coarse_hnsw_m * 2 * 4 * 1.1) if self.coarse_hnsw_m else 0
        invlist_overhead = self.nlist * 48 if self.nlist else 0  # per-list vectors and headers
        return self.pretransform_bytes + centroids + coarse_graph + self.codebook_bytes + invlist_overhead

    def index_bytes(self, n: int) -> int:
        return int(self.fixed_bytes() + n * self.bytes_per_vector())

    def min_train(self) -> int:
        """Fewest training vectors that train every part without FAISS's warnings."""
        need = 0
        if self.nlist:
            need = max(need, MIN_POINTS_PER_CENTROID * self.nlist)
        if self.pq_ksub:
            need = max(need, MIN_POINTS_PER_CENTROID * self.pq_ksub)
        if self.pretransform_bytes:
            need = max(need, 2 * self.d_in)  # a rotation needs more points than dimensions
        return need

    def good_train(self) -> int:
        """A good training sample: 256 points per centroid (where FAISS starts to sample down;
        PQ and OPQ gain little beyond 256 * 2**nbits), but at most a million points for the coarse
        quantizer (the sample is held in RAM as float32) and never below the minimum."""
        want = 0
        if self.nlist:
            want = max(want, min(MAX_POINTS_PER_CENTROID * self.nlist, TRAIN_CAP))
        if self.pq_ksub:
            want = max(want, MAX_POINTS_PER_CENTROID * self.pq_ksub)
        if self.pretransform_bytes or "SQ" in self.factory:
            want = max(want, 65536)
        return max(want, self.min_train())


_TOKEN_RES = {
    "opq": re.compile(r"^OPQ(\d+)(?:_(\d+))?$"),
    "pca": re.compile(r"^PCAR?(\d+)$"),
    "ivf": re.compile(r"^IVF(\d+)(?:_HNSW(\d+))?$"),
    "hnsw": re.compile(r"^HNSW(\d+)(?:_(.*))?$"),
    "pq": re.compile(r"^PQ(\d+)(?:x(\d+))?(fs|np)?$"),
    "sq": re.compile(r"^SQ(4|6|8|fp16|bf16)$"),
}


def parse_factory(factory: str, d: int) -> FactorySpec:
    """Read ``factory`` for dimension ``d``; raises ConfigError naming the part it cannot read."""
    if not isinstance(factory, str) or not factory.strip():
        raise ConfigError("`--factory` must be a FAISS factory string such as Flat, HNSW32 or IVF4096,PQ64")
    parts = [p.strip() for p in factory.split(",")]
    d_cur, pre_bytes = d, 0
    nlist = coarse_m = hnsw_m = ksub = 0
    code = codebook = 0.0
    refine = 0.0
    have_storage = False
    for i, p in enumerate(parts):
        if m := _TOKEN_RES["opq"].match(p):
            msub, d_out = int(m.group(1)), int(m.group(2) or d_cur)
            if d_out % msub:
                raise ConfigError(f"factory {factory!r}: OPQ{msub}_{d_out} needs the output dimension to be a multiple of {msub}")
            pre_bytes += d_cur * d_out * 4
            d_cur = d_out
        elif m := _TOKEN_RES["pca"].match(p):
            d_out = int(m.group(1))
            pre_bytes += d_cur * d_out * 4 + d_cur * 4
            d_cur = d_out
        elif m := _TOKEN_RES["ivf"].match(p):
            nlist, coarse_m = int(m.group(1)), int(m.group(2) or 0)
        elif (m := _TOKEN_RES["hnsw"].match(p)) and nlist == 0:
            hnsw_m = int(m.group(1))
            tail = m.group(2)
            if tail is None:
                code, have_storage = 4.0 * d_cur, True
            elif tail.startswith("SQ8"):
                code, have_storage = float(d_cur), True
            elif tail.startswith("PQ"):
                mm = re.match(r"PQ(\d+)", tail)
                code, ksub, have_storage = float(mm.group(1)), 256, True
            else:
                code, have_storage = 4.0 * d_cur, True
        elif p == "Flat":
            code, have_storage = 4.0 * d_cur, True
        elif m := _TOKEN_RES["pq"].match(p):
            msub, nbits = int(m.group(1)), int(m.group(2) or 8)
            if d_cur % msub:
                raise ConfigError(f"factory {factory!r}: PQ{msub} needs the dimension ({d_cur}) to be a multiple of {msub}")
            code = msub * nbits / 8
            ksub = 2 ** nbits
            codebook = d_cur * ksub * 4
            have_storage = True
        elif m := _TOKEN_RES["sq"].match(p):
            bits = {"4": 4, "6": 6, "8": 8, "fp16": 16, "bf16": 16}[m.group(1)]
            code, codebook, have_storage = d_cur * bits / 8, d_cur * 8, True
        elif p in ("RFlat", "Refine(Flat)"):
            refine = 4.0 * d_cur
        elif p.startswith("IDMap"):
            continue
        else:
            raise ConfigError(f"factory {factory!r}: part {i + 1} ({p!r}) is not one retromem can size; "
                              "use Flat, HNSW<M>, IVF<n>[_HNSW<M>], PQ<m>[x<bits>], SQ8/SQ4/SQfp16, OPQ<m>[_<d>], PCA<d>, RFlat")
    if not have_storage:
        raise ConfigError(f"factory {factory!r} has no storage part (Flat, PQ<m>, SQ8, ...)")
    return FactorySpec(factory=factory, d_in=d, d=d_cur, pretransform_bytes=pre_bytes, nlist=nlist,
                       coarse_hnsw_m=coarse_m, hnsw_m=hnsw_m, code_bytes=code, codebook_bytes=int(codebook),
                       pq_ksub=ksub, refine_bytes=refine)


def _pow2_nlist(n: int) -> int:
    """FAISS's guideline: 4*sqrt(n) to 16*sqrt(n) lists, as a power of two, with at least
    39 training points (and, in practice, ~100 vectors) per list."""
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(max(target, 16))))
    while nlist > 16 and n / nlist < 100:
        nlist //= 2
    return nlist


@dataclass(frozen=True)
class AutoChoice:
    factory: str
    reason: str
    estimated_bytes: int
    candidates: tuple[tuple[str, int, bool], ...]  # (factory, estimated bytes, fits)


def choose_factory(n: int, d: int, memory_budget: int, target_recall: float = 0.95) -> AutoChoice:
    """The most accurate index of ``n`` vectors of dimension ``d`` that fits ``memory_budget`` bytes.

    Order of preference (best recall per query first): exact ``Flat`` while it is small enough to
    scan (n <= 200k); ``HNSW32`` up to 20M vectors; then IVF with codes that shrink until they fit:
    ``SQ8`` (4x smaller than float32), then ``PQ`` with as many sub-quantizers as fit (rotated by
    OPQ, and with an HNSW coarse quantizer from 1M vectors, where scanning the centroids gets
    slow). The search parameters (nprobe / efSearch) that reach ``target_recall`` are found after
    the build by tuning; a PQ too coarse for the target is reported there.
    """
    if n <= 0:
        raise ConfigError(f"cannot choose an index for {n} vectors")
    if memory_budget <= 0:
        raise ConfigError(f"`--memory-budget` must be positive, got {memory_budget}")
    if not 0 < target_recall <= 1:
        raise ConfigError(f"`--target-recall` must be in (0, 1], got {target_recall}")
    nlist = _pow2_nlist(n)
    coarse = f"IVF{nlist}_HNSW32" if n >= 1_000_000 else f"IVF{nlist}"
    cands: list[tuple[str, str]] = []
    if n <= 200_000:
        cands.append(("Flat", "exact search; small enough to scan every vector"))
    if n <= 20_000_000:
        cands.append(("HNSW32", "graph search: near-exact recall, no training, float32 vectors kept"))
        cands.append(("HNSW32_SQ8", "graph search over 8-bit scalar codes: fast, about 2.3x smaller than float32"))
    cands.append((f"{coarse},SQ8", "inverted lists with 8-bit scalar codes (4x smaller than float32), recall near exact"))
    pq_ms = [m for m in (192, 128, 96, 64, 48, 32, 24, 16, 12, 8, 4) if d % m == 0 and m < d]
    for m in pq_ms:
        # OPQ only pays when sub-vectors are short; for a 1-D sub-quantizer there is nothing to rotate
        pre = f"OPQ{m}_{d}," if d // m >= 2 else ""
        cands.append((f"{pre}{coarse},PQ{m}", f"product quantization, {m} bytes a vector"))
    table = []
    for f, _ in cands:
        table.append((f, parse_factory(f, d).index_bytes(n)))
    for (f, why), (_, est) in zip(cands, table):
        if est <= memory_budget:
            fits = tuple((ff, b, b <= memory_budget) for ff, b in table)
            reason = (f"{why}; estimated {est / 2**20:,.1f} MiB for {n:,} vectors of dimension {d}, "
                      f"within the {memory_budget / 2**20:,.1f} MiB budget")
            skipped = [ff for ff, b in table[: table.index((f, est))]]
            if skipped:
                reason += f" (more accurate {', '.join(skipped)} did not fit)"
            return AutoChoice(f, reason, est, fits)
    smallest = table[-1]
    raise ConfigError(f"no index of {n:,} vectors of dimension {d} fits a {memory_budget / 2**20:,.1f} MiB budget: "
                      f"the smallest candidate, {smallest[0]}, needs about {smallest[1] / 2**20:,.1f} MiB. "
                      "Raise --memory-budget, or shard the datastore across machines.")
