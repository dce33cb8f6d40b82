"""Squeezed Attention (Hooper et al. 2024, "Squeezed Attention: Accelerating Long Context Length LLM
Inference") for any RoPE decoder from Hugging Face, with no weight changed.

For a long fixed context reused across many queries (a manual, a code base):

1. offline, the context is run once with full attention (:meth:`SqueezedAttention.prefill`) and
   its keys, per layer and KV head, are clustered with k-means (``cluster_size`` keys per
   centroid on average; :func:`kmeans`);
2. online, each query token compares itself with the centroids (q · c), takes clusters from the
   most to the least relevant until they hold ``fraction`` of the context's keys, and attends
   exactly to those keys only, plus every token after the context (the question and what is
   generated), causally.

Who selects (``heads``): ``query`` is the paper's, each query head compares itself with the
centroids of its own KV head's keys and takes its own clusters (with grouped-query attention the
query heads that share a KV head attend different keys); ``kv`` takes one set of clusters per KV
head, ranked by the largest q · c over the query heads that share it.

Hierarchical centroids (``coarse_size`` > 0, the paper's for very long contexts): the fine
centroids of each KV head are clustered again into coarse centroids of about ``coarse_size`` keys;
a query first ranks the coarse centroids and keeps the best until they hold ``coarse_keep`` times
the keys it may take, then ranks only the fine clusters inside those. Here the fine scores are
still computed for every cluster and masked (the same selection as a two-stage lookup; the
comparisons a two-stage lookup would make are counted in :attr:`SqueezedAttention.compared`).

Beyond the paper, the context's first ``n_sink`` keys (attention sinks: they draw a large share
of every softmax, and dropping them from a head distorts the whole distribution) and its last
``n_tail`` keys (the text just before the question) are always attended; they count towards the
fraction, which clusters fill up. With ``fraction = 1`` there is no selection: plain full attention
over the context (the reference the time saved is measured against).

Two ways to pick clusters (``selection``): ``fraction`` takes clusters by q · centroid until each
query and KV head holds ``fraction`` of the keys; ``threshold`` is the paper's: each cluster's share
of the attention is estimated as softmax_c(q · c_c * scaling + log N_c) (N_c keys in it; the
largest over the query heads sharing the KV head), clusters above a per-layer threshold are kept,
and each layer's threshold is calibrated at :meth:`freeze` on the queries of the context's last
``n_calib`` tokens so that they would attend ``fraction`` of the keys on average (questions then
attend more or less; :meth:`attended_fraction` counts what they did).

A single query token (decoding) copies out its selected keys (stored by cluster at freeze, so the
cost follows the keys taken) and attends per KV head over exactly those and the later tokens;
several query tokens at once use a mask over all keys (same result, no time saved). On a CPU the
copy costs about what attending in place would, so decoding saves time only when few keys of a
long context are taken (BENCHMARKS.md: 1.2x at 1/4 of 32K keys, none at 2K-8K). The context's
keys and values stay in memory (the method saves attention work, not storage); the keys of the
tokens after the context grow with them.

The threshold calibration queries are the context's last ``n_calib`` tokens unless
:meth:`SqueezedAttention.calibrate` is given prompts like the ones to come (the paper calibrates
on sample queries of the task); :attr:`SqueezedAttention.probe` records, for one query token, the
share of a span of context keys each layer selected (which questions are lost, and where).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from retromem.config import fail, number, one_of
from retromem.errors import ConfigError
from retromem.memory.kv_budget import KVMemory, cat, check_budget, group_attention, stream


@dataclass(frozen=True)
class SqueezedConfig:
    """fraction: share of the context's keys each query attends; cluster_size: mean keys per
    centroid; kmeans_iters: Lloyd iterations; seed: k-means initialisation; n_sink / n_tail: the
    context's first / last keys, always attended (part of the fraction); selection: ``fraction`` or
    ``threshold``; n_calib: calibration queries; heads: ``kv`` or ``query`` (who selects);
    coarse_size: keys per coarse centroid (0 = one level); coarse_keep: coarse clusters kept, as a
    multiple of the keys a query may take (0: the coarse level is skipped)."""

    fraction: float = 0.25
    cluster_size: int = 16
    kmeans_iters: int = 10
    seed: int = 0
    n_sink: int = 4
    n_tail: int = 32
    selection: str = "fraction"
    n_calib: int = 64
    heads: str = "kv"
    coarse_size: int = 0
    coarse_keep: float = 2.0

    def __post_init__(self) -> None:
        number(self.fraction, "squeezed.fraction", gt=0, le=1, flag="--fraction")
        check_budget(self.cluster_size, "squeezed.cluster_size", "--cluster-size")
        check_budget(self.kmeans_iters, "squeezed.kmeans_iters", "--kmeans-iters")
        check_budget(self.n_sink, "squeezed.n_sink", "--n-sink", minimum=0)
        check_budget(self.n_tail, "squeezed.n_tail", "--n-tail", minimum=0)
        one_of(self.selection, "squeezed.selection", ("fraction", "threshold"), flag="--selection")
        check_budget(self.n_calib, "squeezed.n_calib", "--n-calib")
        one_of(self.heads, "squeezed.heads", ("kv", "query"), flag="--heads")
        check_budget(self.coarse_size, "squeezed.coarse_size", "--coarse-size", minimum=0)
        if 0 < self.coarse_size <= self.cluster_size:
            fail("squeezed.coarse_size", f"be 0 or larger than squeezed.cluster_size ({self.cluster_size})",
                 self.coarse_size, flag="--coarse-size")
        if number(self.coarse_keep, "squeezed.coarse_keep", ge=0, flag="--coarse-keep") and self.coarse_keep < 1:
            fail("squeezed.coarse_keep", "be 0 (no coarse level) or >= 1", self.coarse_keep, flag="--coarse-keep")


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of x (n, D) into k clusters, k-means++ seeding: (centroids (k, D), assignment (n,))."""
    n = x.shape[0]
    k = min(k, n)
    x = x.float()
    # k-means++: each next seed drawn with probability proportional to its squared distance to the
    # nearest seed so far (random seeding can put two seeds in one cluster and never recover)
    first = int(torch.randint(n, (1,), generator=generator))
    c = x.new_empty(k, x.shape[1])
    c[0] = x[first]
    nearest = ((x - c[0]) ** 2).sum(1)
    for j in range(1, k):
        p = nearest.clamp(min=0)
        idx = int(torch.multinomial(p / p.sum(), 1, generator=generator)) if float(p.sum()) > 0 else j % n
        c[j] = x[idx]
        nearest = torch.minimum(nearest, ((x - c[j]) ** 2).sum(1))
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]  # (n, k) squared distances
        assign = d.argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp(min=1)[:, None])  # an empty cluster keeps its centroid
    return c, assign


class SqueezedAttention(KVMemory):
    """A fixed context's clustered keys as a transformers Cache (batch of one, no padding).

    Before :meth:`freeze` it is plain full attention that records the context; after it, queries
    select clusters."""

    max_batch = 1

    def __init__(self, model: Any, config: SqueezedConfig | None = None) -> None:
        super().__init__(model)
        self.config = config or SqueezedConfig()
        L = self.num_layers
        self.ctx_k: list[torch.Tensor | None] = [None] * L  # (1, Hkv, n, D) rotated at true positions
        self.ctx_v: list[torch.Tensor | None] = [None] * L
        self.centroids: list[torch.Tensor | None] = [None] * L  # (Hkv, C, D)
        self.assign: list[torch.Tensor | None] = [None] * L  # (Hkv, n) cluster of each key
        self.sizes: list[torch.Tensor | None] = [None] * L  # (Hkv, C) keys per cluster
        self.by_cluster: list[torch.Tensor | None] = [None] * L  # (Hkv, n) key indices sorted by cluster
        self.starts: list[torch.Tensor | None] = [None] * L  # (Hkv, C) where each cluster starts in by_cluster
        self.coarse: list[torch.Tensor | None] = [None] * L  # (Hkv, Cc, D) coarse centroids (hierarchical)
        self.parent: list[torch.Tensor | None] = [None] * L  # (Hkv, C) coarse cluster of each fine one
        self.coarse_sizes: list[torch.Tensor | None] = [None] * L  # (Hkv, Cc) keys per coarse cluster
        self.new_k: list[torch.Tensor | None] = [None] * L  # tokens after the context
        self.new_v: list[torch.Tensor | None] = [None] * L
        self.frozen = False
        self.attended = 0  # context keys attended, summed over layers, query tokens and selecting heads
        self.offered = 0  # context keys there were
        self.compared = 0  # centroid comparisons made (a two-level lookup's count with coarse_size)
        self.decode_seconds = 0.0  # time in attention for single-token calls, all layers
        self.decode_cpu_seconds = 0.0  # the same in CPU time of this process (steadier on a shared machine)
        self.decode_tokens = 0
        self.calib_q: list[torch.Tensor | None] = [None] * L  # (1, H, <=n_calib, D) calibration queries
        self.calib_mass: list[torch.Tensor | None] = [None] * L  # (S, Tc, C) their cluster shares, config's heads
        self._mass: dict[tuple[int, str], torch.Tensor] = {}  # (layer, heads) -> calibration cluster shares
        self.thresholds: dict[tuple[int, float, str], float] = {}  # (layer, fraction, heads) -> threshold
        self.scaling: float | None = None
        self._recording: list[list[torch.Tensor]] | None = None  # queries kept by :meth:`calibrate`
        # probe = (first key, end key, query index in the call): each masked-path call records, per
        # layer, the share of those context keys that query token selected, per selecting head
        self.probe: tuple[int, int, int] | None = None
        self.probe_hits: list[torch.Tensor | None] = [None] * L  # (S,) per layer

    @classmethod
    def prefill(cls, model: Any, context_ids: torch.Tensor, config: SqueezedConfig | None = None,
                segment: int = 1024) -> "SqueezedAttention":
        """Run the fixed context through ``model`` (full attention) and cluster its keys."""
        mem = cls(model, config)
        stream(model, context_ids, mem, segment=segment)
        mem.freeze()
        return mem

    def reclustered(self, model: Any, config: SqueezedConfig) -> "SqueezedAttention":
        """A new memory over the same prefilled context of ``model`` (keys, values and calibration
        queries shared, not copied), clustered under ``config``: several settings on one prefill."""
        if not self.frozen:
            raise ConfigError("Squeezed Attention reclusters after freeze: prefill the context first")
        mem = type(self)(model, config)
        mem.ctx_k, mem.ctx_v, mem.calib_q = list(self.ctx_k), list(self.ctx_v), list(self.calib_q)
        mem.scaling = self.scaling
        mem.reset_queries()
        mem.freeze()
        return mem

    @property
    def context_length(self) -> int:
        return 0 if self.ctx_k[0] is None else self.ctx_k[0].shape[-2]

    @property
    def budget_tokens(self) -> int:
        return math.ceil(self.config.fraction * self.context_length)

    def freeze(self) -> None:
        """Cluster the context's keys (per layer and KV head; coarse centroids over the fine ones
        with ``coarse_size``); later tokens select clusters."""
        if self.ctx_k[0] is None:
            raise ConfigError("Squeezed Attention needs a context: prefill it before freezing")
        g = torch.Generator().manual_seed(self.config.seed)
        n = self.context_length
        n_clusters = max(1, math.ceil(n / self.config.cluster_size))
        for layer in range(self.num_layers):
            cs, assigns = [], []
            for h in range(self.ctx_k[layer].shape[1]):
                c, a = kmeans(self.ctx_k[layer][0, h], n_clusters, self.config.kmeans_iters, g)
                cs.append(c)
                assigns.append(a)
            dev = self.ctx_k[layer].device
            self.centroids[layer] = torch.stack(cs).to(dev)
            self.assign[layer] = torch.stack(assigns).to(dev)
            self.sizes[layer] = torch.stack([torch.bincount(a, minlength=c.shape[0]) for a, c in zip(assigns, cs)]).to(dev)
            self.by_cluster[layer] = self.assign[layer].argsort(dim=-1, stable=True)
            self.starts[layer] = self.sizes[layer].cumsum(-1) - self.sizes[layer]
            if self.config.coarse_size:
                self._build_coarse(layer, g)
        self.frozen = True
        self._calibrated()

    def _build_coarse(self, layer: int, g: torch.Generator) -> None:
        """Coarse centroids: k-means of the layer's fine centroids (per KV head); each coarse
        centroid is the mean of the keys under it."""
        c, sizes = self.centroids[layer], self.sizes[layer]  # (Hkv, C, D), (Hkv, C)
        n_coarse = max(1, math.ceil(self.context_length / self.config.coarse_size))
        parents, coarse = [], []
        for h in range(c.shape[0]):
            _, a = kmeans(c[h], n_coarse, self.config.kmeans_iters, g)
            w = sizes[h].float()[:, None]
            sums = torch.zeros(n_coarse, c.shape[-1], device=c.device).index_add_(0, a, c[h].float() * w)
            cnt = torch.zeros(n_coarse, device=c.device).index_add_(0, a, w[:, 0])
            coarse.append(sums / cnt.clamp(min=1)[:, None])
            parents.append(a)
        self.coarse[layer], self.parent[layer] = torch.stack(coarse), torch.stack(parents)
        self.coarse_sizes[layer] = torch.zeros(c.shape[0], n_coarse, dtype=sizes.dtype, device=c.device).scatter_add_(
            1, self.parent[layer], sizes)

    def _calibrated(self) -> None:
        """Drop thresholds and cluster shares computed from earlier calibration queries."""
        self._mass.clear()
        self.thresholds.clear()
        self.calib_mass = [self._calib_mass(layer, self.config.heads) for layer in range(self.num_layers)]

    def calibrate(self, model: Any, prompts: list[torch.Tensor]) -> None:
        """Calibrate the thresholds on the queries of ``prompts`` (each (1, L), asked after the context
        like the questions to come, attending to all of it) instead of the context's last tokens."""
        if not self.frozen:
            raise ConfigError("Squeezed Attention calibrates after freeze: prefill the context first")
        saved = self.config
        self.config = replace(saved, fraction=1.0)
        self._recording = [[] for _ in range(self.num_layers)]
        try:
            for ids in prompts:
                self.reset_queries()
                stream(model, ids, self, segment=ids.shape[1])
            self.calib_q = [torch.cat(qs, 2) for qs in self._recording]
        finally:
            self._recording = None
            self.config = saved
            self.reset_queries()
            self.set_fraction(saved.fraction)
        self._calibrated()

    def _selectors(self, H: int, Hkv: int, heads: str | None = None) -> int:
        """How many heads select clusters: every query head (``query``) or every KV head (``kv``)."""
        return H if (heads or self.config.heads) == "query" else Hkv

    def _per_selector(self, t: torch.Tensor, S: int) -> torch.Tensor:
        """(Hkv, ...) -> (S, ...): a KV head's tensor for each selecting head."""
        return t if S == t.shape[0] else t.repeat_interleave(S // t.shape[0], 0)

    def _scores(self, q: torch.Tensor, c: torch.Tensor, heads: str) -> torch.Tensor:
        """q (1, H, T, D) against centroids c (Hkv, C, D): (S, T, C) dot products, per query head
        (``query``) or the largest over the query heads sharing a KV head (``kv``)."""
        H, T, D = q.shape[1:]
        Hkv = c.shape[0]
        rel = torch.einsum("hgtd,hcd->hgtc", q[0].float().reshape(Hkv, H // Hkv, T, D), c.float())  # (Hkv, G, T, C)
        return rel.reshape(H, T, -1) if heads == "query" else rel.amax(1)

    def cluster_mass(self, layer: int, q: torch.Tensor, heads: str | None = None) -> torch.Tensor:
        """(S, T, C): each cluster's estimated share of the attention of the query tokens q
        (1, H, T, D), softmax_c(q · c_c * scaling + log N_c), per selecting head (for ``kv`` the
        largest over the query heads that share the KV head)."""
        heads = heads or self.config.heads
        scaling = self.scaling if self.scaling is not None else q.shape[-1] ** -0.5
        c = self.centroids[layer]
        H, Hkv = q.shape[1], c.shape[0]
        logits = torch.einsum("hgtd,hcd->hgtc", q[0].float().reshape(Hkv, H // Hkv, q.shape[2], -1), c.float()) * scaling
        logits = logits + self.sizes[layer].to(q.device).float().clamp(min=1).log()[:, None, None, :]
        mass = logits.softmax(-1)  # (Hkv, G, T, C)
        return mass.reshape(H, q.shape[2], -1) if heads == "query" else mass.amax(1)

    def _calib_mass(self, layer: int, heads: str) -> torch.Tensor | None:
        if self.calib_q[layer] is None:
            return None
        if (layer, heads) not in self._mass:
            self._mass[(layer, heads)] = self.cluster_mass(layer, self.calib_q[layer], heads)
        return self._mass[(layer, heads)]

    def threshold(self, layer: int) -> float:
        """The layer's threshold on :meth:`cluster_mass` at which the calibration queries take
        ``fraction`` of the keys on average (the fixed keys included)."""
        f, heads = self.config.fraction, self.config.heads
        if (layer, f, heads) not in self.thresholds:
            m = self._calib_mass(layer, heads)  # (S, Tc, C)
            S, Tc, C = m.shape
            w = self._per_selector(self.sizes[layer], S).to(m.device)[:, None, :].expand(S, Tc, C).flatten().float()
            vals, order = m.flatten().sort(descending=True)
            share = w[order].cumsum(0) / (S * Tc * self.context_length)  # keys taken down to each value
            target = f - float(self.fixed_keys().float().mean())
            i = int(torch.searchsorted(share, torch.tensor([target])).clamp(max=vals.numel() - 1))
            self.thresholds[(layer, f, heads)] = float(vals[i]) if target > 0 else math.inf
        return self.thresholds[(layer, f, heads)]

    def _by_key(self, take: torch.Tensor, layer: int) -> torch.Tensor:
        """(S, T, C) per cluster -> (S, T, n) per key, through each key's cluster."""
        a = self._per_selector(self.assign[layer], take.shape[0])  # (S, n)
        return take.gather(-1, a[:, None, :].expand(a.shape[0], take.shape[1], -1))

    def fixed_keys(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) bool: the context keys every query attends (the first n_sink and the last n_tail)."""
        n = self.context_length
        i = torch.arange(n, device=device)
        return (i < self.config.n_sink) | (i >= n - self.config.n_tail)

    def set_fraction(self, fraction: float, selection: str | None = None, heads: str | None = None,
                     coarse_keep: float | None = None) -> None:
        """Ask later queries at another ``fraction`` (and ``selection``, ``heads``, ``coarse_keep``);
        the clusters and the calibration stay, the counters restart."""
        c = self.config
        self.config = replace(c, fraction=fraction, selection=selection or c.selection, heads=heads or c.heads,
                              coarse_keep=c.coarse_keep if coarse_keep is None else coarse_keep)
        self.attended = self.offered = self.decode_tokens = self.compared = 0
        self.decode_seconds = self.decode_cpu_seconds = 0.0

    def select(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(S, T, n) mask of the context keys each selecting head (``heads``) and query token attends
        to: the fixed keys, then whole clusters from the most relevant (q · centroid) until
        ``fraction`` of the context's keys are taken."""
        return self._by_key(self.select_clusters(layer, q), layer) | self.fixed_keys(q.device)

    def _take_until(self, rel: torch.Tensor, sizes: torch.Tensor, budget: float) -> torch.Tensor:
        """(S, T, C) bool: clusters in order of ``rel`` (descending; -inf never taken) while the keys
        taken before each are under ``budget``."""
        order = rel.argsort(-1, descending=True)
        sz = sizes[:, None, :].expand_as(rel).gather(-1, order)  # (S, T, C) sorted
        take_sorted = ((sz.cumsum(-1) - sz) < budget) & (rel.gather(-1, order) > -math.inf)
        return torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)  # by cluster id

    def select_clusters(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(S, T, C): the clusters each selecting head and query token takes (see :meth:`select`)."""
        cfg = self.config
        H, T = q.shape[1], q.shape[2]
        Hkv, C = self.centroids[layer].shape[:2]
        S = self._selectors(H, Hkv)
        if cfg.selection == "threshold":
            self.compared += S * T * C
            return self.cluster_mass(layer, q) >= self.threshold(layer)  # (S, T, C)
        budget = cfg.fraction * self.context_length - int(self.fixed_keys().sum())
        sizes = self._per_selector(self.sizes[layer], S).to(q.device)
        rel = self._scores(q, self.centroids[layer], cfg.heads)  # (S, T, C)
        if self.coarse[layer] is None or not cfg.coarse_keep:
            self.compared += S * T * C
            return self._take_until(rel, sizes, budget)
        # two levels: coarse clusters holding coarse_keep x the budget, then fine clusters inside them
        coarse_take = self._take_until(self._scores(q, self.coarse[layer], cfg.heads),
                                       self._per_selector(self.coarse_sizes[layer], S).to(q.device),
                                       cfg.coarse_keep * budget)  # (S, T, Cc)
        parent = self._per_selector(self.parent[layer], S).to(q.device)  # (S, C)
        inside = coarse_take.gather(-1, parent[:, None, :].expand(S, T, C))  # (S, T, C)
        self.compared += S * T * self.coarse[layer].shape[1] + int(inside.sum())
        return self._take_until(rel.masked_fill(~inside, -math.inf), sizes, budget)

    def _decode_keys(self, layer: int, take: torch.Tensor) -> list[torch.Tensor]:
        """Per selecting head, the indices of the keys of the taken clusters ``take`` (S, C) and of
        the fixed keys, each once. Keys are stored by cluster (``by_cluster``), so this costs the
        number of keys taken, not the context's length."""
        fixed = self.fixed_keys(take.device)
        fixed_idx = fixed.nonzero().flatten()
        Hkv = self.sizes[layer].shape[0]
        per = take.shape[0] // Hkv  # selecting heads per KV head
        out = []
        for s in range(take.shape[0]):
            h = s // per
            chosen = take[s].nonzero().flatten()
            lens = self.sizes[layer][h][chosen]
            total = int(lens.sum())
            offs = torch.repeat_interleave(self.starts[layer][h][chosen] - (lens.cumsum(0) - lens), lens)
            idx = self.by_cluster[layer][h][torch.arange(total, device=take.device) + offs]
            out.append(torch.cat([idx[~fixed[idx]], fixed_idx]))
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        self.check_batch(q)
        T = q.shape[2]
        if self._recording is not None:
            self._recording[layer].append(q)
        if T == 1 and self.frozen:
            t0, c0 = time.perf_counter(), time.process_time()
            out = self._attend_frozen(layer, q, k, v, scaling)
            self.decode_seconds += time.perf_counter() - t0
            self.decode_cpu_seconds += time.process_time() - c0
            self.decode_tokens += layer == 0
            return out
        self.scaling = scaling
        if not self.frozen:  # recording the context: full causal attention
            self.ctx_k[layer], self.ctx_v[layer] = cat(self.ctx_k[layer], k), cat(self.ctx_v[layer], v)
            self.calib_q[layer] = cat(self.calib_q[layer], q)[:, :, -self.config.n_calib:]
            n = self.ctx_k[layer].shape[-2]
            mask = torch.ones(T, n, dtype=torch.bool, device=q.device).tril(n - T)
            return group_attention([(q, self.ctx_k[layer], self.ctx_v[layer], mask)], scaling)[0]
        return self._attend_frozen(layer, q, k, v, scaling)

    def _attend_frozen(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        T, H = q.shape[2], q.shape[1]
        self.new_k[layer], self.new_v[layer] = cat(self.new_k[layer], k), cat(self.new_v[layer], v)
        m = self.new_k[layer].shape[-2]
        Hkv = k.shape[1]
        after = torch.ones(T, m, dtype=torch.bool, device=q.device).tril(m - T)  # causal over the later tokens
        if self.config.fraction >= 1:  # no selection: full attention over the context
            n = self.context_length
            self.attended += Hkv * T * n
            self.offered += Hkv * T * n
            # two groups with masks shared by all heads: no copy of the context's keys into one tensor
            # (the fastest full attention this module has: the reference the time saved is measured against)
            ctx = (q, self.ctx_k[layer], self.ctx_v[layer], torch.ones(T, n, dtype=torch.bool, device=q.device))
            return group_attention([ctx, (q, self.new_k[layer], self.new_v[layer], after)], scaling)[0]
        if T == 1:  # decoding: copy out the selected keys so the work shrinks with the fraction
            idx = self._decode_keys(layer, self.select_clusters(layer, q)[:, 0])
            S = len(idx)
            self.attended += sum(i.numel() for i in idx)
            self.offered += S * self.context_length
            # one attention call per selecting head over exactly its keys (selected + every later
            # token, all visible to the newest query): no padding, no mask (a padded call with
            # per-head masks was slower than attending to all keys); index_select copies whole
            # rows, ~6x faster on CPU than gather with an index expanded over D
            qh = H // S  # query heads per selecting head
            outs = []
            for s in range(S):
                h = s * qh * Hkv // H  # its KV head
                kh = torch.cat([self.ctx_k[layer][0, h].index_select(0, idx[s]), self.new_k[layer][0, h]])  # (N_s, D)
                vh = torch.cat([self.ctx_v[layer][0, h].index_select(0, idx[s]), self.new_v[layer][0, h]])
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    q[:, s * qh:(s + 1) * qh], kh[None, None], vh[None, None], scale=scaling))  # (1, qh, 1, D)
            return torch.cat(outs, 1)  # (1, H, 1, D)
        sel = self.select(layer, q)  # (S, T, n)
        self.attended += int(sel.sum())
        self.offered += sel.numel()
        if self.probe is not None:
            a, b, t = self.probe
            self.probe_hits[layer] = sel[:, t, a:b].float().mean(-1)
        # every key sits at its true position and every query is rotated at its own, so the context
        # and the later tokens are one group: a single attention call, keys shared by the query
        # heads of a KV head (enable_gqa), the mask per query head
        mask = torch.cat([sel, after[None].expand(sel.shape[0], T, m)], -1)  # (S, T, n + m)
        mask = mask.repeat_interleave(H // sel.shape[0], 0)[None]  # (1, H, T, n + m)
        keys, values = torch.cat([self.ctx_k[layer], self.new_k[layer]], -2), torch.cat([self.ctx_v[layer], self.new_v[layer]], -2)
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling,
                                                                enable_gqa=True)

    def reset_queries(self) -> None:
        """Drop every token after the context (ask the next question against the context alone)."""
        n = self.context_length
        self.new_k = [None] * self.num_layers
        self.new_v = [None] * self.num_layers
        for layer in self.layers:
            layer.seen = n

    def decode_attention_ms(self, cpu: bool = False) -> float:
        """Milliseconds of attention (all layers) per single-token call after the context: wall
        time, or with ``cpu`` this process's CPU time."""
        spent = self.decode_cpu_seconds if cpu else self.decode_seconds
        return 1000 * spent / self.decode_tokens if self.decode_tokens else float("nan")

    def attended_fraction(self) -> float:
        """Share of the context's keys attended by the query tokens so far (per selecting head)."""
        return self.attended / self.offered if self.offered else float("nan")

    def held_tensors(self) -> Iterable[torch.Tensor]:
        for group in (self.ctx_k, self.ctx_v, self.new_k, self.new_v, self.centroids, self.coarse):
            yield from (t for t in group if t is not None)

    def held_tokens(self, layer: int = 0) -> int:
        return self.context_length + (0 if self.new_k[layer] is None else self.new_k[layer].shape[-2])
