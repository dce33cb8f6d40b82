"""Squeezed Attention (Hooper et al. 2024, "Squeezed Attention: Accelerating Long Context Length LLM
Inference") for any RoPE decoder from Hugging Face, with no weight changed.

For a long fixed context reused across many queries (a manual, a code base):

1. offline, the context is run once with full attention (:meth:`SqueezedAttention.prefill`) and
   its keys, per layer and KV head, are clustered with k-means (``cluster_size`` keys per
   centroid on average; :func:`kmeans`);
2. online, each query token compares itself with the centroids (q · c, the largest over the query
   heads that share the KV head), takes clusters from the most to the least relevant until they
   hold ``fraction`` of the context's keys, and attends exactly to those keys only, plus every
   token after the context (the question and what is generated), causally.

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
tokens after the context grow with them. Hierarchical centroids are not implemented.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from retromem.config import number, one_of
from retromem.errors import ConfigError
from retromem.memory.kv_budget import KVMemory, cat, check_budget, group_attention, stream


@dataclass(frozen=True)
class SqueezedConfig:
    """fraction: share of the context's keys each query attends; cluster_size: mean keys per
    centroid; kmeans_iters: Lloyd iterations; seed: k-means initialisation; n_sink / n_tail: the
    context's first / last keys, always attended (part of the fraction)."""

    fraction: float = 0.25
    cluster_size: int = 16
    kmeans_iters: int = 10
    seed: int = 0
    n_sink: int = 4
    n_tail: int = 32
    selection: str = "fraction"
    n_calib: int = 64

    def __post_init__(self) -> None:
        number(self.fraction, "squeezed.fraction", gt=0, le=1, flag="--fraction")
        check_budget(self.cluster_size, "squeezed.cluster_size", "--cluster-size")
        check_budget(self.kmeans_iters, "squeezed.kmeans_iters", "--kmeans-iters")
        check_budget(self.n_sink, "squeezed.n_sink", "--n-sink", minimum=0)
        check_budget(self.n_tail, "squeezed.n_tail", "--n-tail", minimum=0)
        one_of(self.selection, "squeezed.selection", ("fraction", "threshold"), flag="--selection")
        check_budget(self.n_calib, "squeezed.n_calib", "--n-calib")


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
        self.new_k: list[torch.Tensor | None] = [None] * L  # tokens after the context
        self.new_v: list[torch.Tensor | None] = [None] * L
        self.frozen = False
        self.attended = 0  # context keys attended, summed over layers, query tokens and KV heads
        self.offered = 0  # context keys there were
        self.decode_seconds = 0.0  # time in attention for single-token calls, all layers
        self.decode_cpu_seconds = 0.0  # the same in CPU time of this process (steadier on a shared machine)
        self.decode_tokens = 0
        self.calib_q: list[torch.Tensor | None] = [None] * L  # (1, H, <=n_calib, D) the context's last queries
        self.calib_mass: list[torch.Tensor | None] = [None] * L  # (Hkv, n_calib, C) their estimated cluster shares
        self.thresholds: dict[tuple[int, float], float] = {}  # (layer, fraction) -> threshold
        self.scaling: float | None = None

    @classmethod
    def prefill(cls, model: Any, context_ids: torch.Tensor, config: SqueezedConfig | None = None,
                segment: int = 1024) -> "SqueezedAttention":
        """Run the fixed context through ``model`` (full attention) and cluster its keys."""
        mem = cls(model, config)
        stream(model, context_ids, mem, segment=segment)
        mem.freeze()
        return mem

    @property
    def context_length(self) -> int:
        return 0 if self.ctx_k[0] is None else self.ctx_k[0].shape[-2]

    @property
    def budget_tokens(self) -> int:
        return math.ceil(self.config.fraction * self.context_length)

    def freeze(self) -> None:
        """Cluster the context's keys (per layer and KV head); later tokens select clusters."""
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
            self.centroids[layer] = torch.stack(cs).to(self.ctx_k[layer].device)
            self.assign[layer] = torch.stack(assigns).to(self.ctx_k[layer].device)
            self.sizes[layer] = torch.stack([torch.bincount(a, minlength=c.shape[0]) for a, c in zip(assigns, cs)])
            self.by_cluster[layer] = self.assign[layer].argsort(dim=-1, stable=True)
            self.starts[layer] = (self.sizes[layer].cumsum(-1) - self.sizes[layer]).to(self.ctx_k[layer].device)
            self.calib_mass[layer] = self.cluster_mass(layer, self.calib_q[layer])
            self.calib_q[layer] = None  # the masses are all calibration needs
        self.frozen = True

    def cluster_mass(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(Hkv, T, C): each cluster's estimated share of the attention of the query tokens q
        (1, H, T, D), softmax_c(q · c_c * scaling + log N_c), the largest over the query heads that
        share the KV head."""
        B, H, T, D = q.shape
        c = self.centroids[layer]  # (Hkv, C, D)
        Hkv = c.shape[0]
        scaling = self.scaling if self.scaling is not None else D ** -0.5
        logits = torch.einsum("hgtd,hcd->hgtc", q[0].float().reshape(Hkv, H // Hkv, T, D), c.float()) * scaling
        logits = logits + self.sizes[layer].to(q.device).float().clamp(min=1).log()[:, None, None, :]
        return logits.softmax(-1).amax(1)  # (Hkv, T, C)

    def threshold(self, layer: int) -> float:
        """The layer's threshold on :meth:`cluster_mass` at which the calibration queries take
        ``fraction`` of the keys on average (the fixed keys included)."""
        f = self.config.fraction
        if (layer, f) not in self.thresholds:
            m = self.calib_mass[layer]  # (Hkv, Tc, C)
            Hkv, Tc, C = m.shape
            w = self.sizes[layer].to(m.device)[:, None, :].expand(Hkv, Tc, C).flatten().float()
            vals, order = m.flatten().sort(descending=True)
            share = w[order].cumsum(0) / (Hkv * Tc * self.context_length)  # keys taken down to each value
            target = f - float(self.fixed_keys().float().mean())
            i = int(torch.searchsorted(share, torch.tensor([target])).clamp(max=vals.numel() - 1))
            self.thresholds[(layer, f)] = float(vals[i]) if target > 0 else math.inf
        return self.thresholds[(layer, f)]

    def _by_key(self, take: torch.Tensor, layer: int) -> torch.Tensor:
        """(Hkv, T, C) per cluster -> (Hkv, T, n) per key, through each key's cluster."""
        a = self.assign[layer]  # (Hkv, n)
        return take.gather(-1, a[:, None, :].expand(a.shape[0], take.shape[1], -1))

    def fixed_keys(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """(n,) bool: the context keys every query attends (the first n_sink and the last n_tail)."""
        n = self.context_length
        i = torch.arange(n, device=device)
        return (i < self.config.n_sink) | (i >= n - self.config.n_tail)

    def set_fraction(self, fraction: float, selection: str | None = None) -> None:
        """Ask later queries at another ``fraction`` (and ``selection``); the clusters and the
        calibration stay, the counters restart."""
        self.config = replace(self.config, fraction=fraction, selection=selection or self.config.selection)
        self.attended = self.offered = self.decode_tokens = 0
        self.decode_seconds = self.decode_cpu_seconds = 0.0

    def select(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(Hkv, T, n) mask of the context keys each query token attends to: the fixed keys, then
        whole clusters from the most relevant (q · centroid, the largest over the query heads that
        share the KV head) until ``fraction`` of the context's keys are taken."""
        return self._by_key(self.select_clusters(layer, q), layer) | self.fixed_keys(q.device)

    def select_clusters(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """(Hkv, T, C): the clusters each query token takes (see :meth:`select`)."""
        B, H, T, D = q.shape
        c = self.centroids[layer]  # (Hkv, C, D)
        Hkv, C = c.shape[:2]
        fixed = self.fixed_keys(q.device)
        if self.config.selection == "threshold":
            return self.cluster_mass(layer, q) >= self.threshold(layer)  # (Hkv, T, C)
        rel = torch.einsum("hgtd,hcd->hgtc", q[0].float().reshape(Hkv, H // Hkv, T, D), c.float()).amax(1)  # (Hkv, T, C)
        order = rel.argsort(-1, descending=True)
        sizes = self.sizes[layer].to(q.device)[:, None, :].expand(Hkv, T, C).gather(-1, order)  # (Hkv, T, C) sorted
        before = sizes.cumsum(-1) - sizes  # keys already taken when reaching each cluster
        take_sorted = before < self.config.fraction * self.context_length - int(fixed.sum())
        return torch.zeros_like(take_sorted).scatter(-1, order, take_sorted)  # (Hkv, T, C) by cluster id

    def _decode_keys(self, layer: int, take: torch.Tensor) -> list[torch.Tensor]:
        """Per KV head, the indices of the keys of the taken clusters ``take`` (Hkv, C) and of the
        fixed keys, each once. Keys are stored by cluster (``by_cluster``), so this costs the
        number of keys taken, not the context's length."""
        fixed = self.fixed_keys(take.device)
        fixed_idx = fixed.nonzero().flatten()
        out = []
        for h in range(take.shape[0]):
            chosen = take[h].nonzero().flatten()
            lens = self.sizes[layer][h].to(take.device)[chosen]
            total = int(lens.sum())
            offs = torch.repeat_interleave(self.starts[layer][h][chosen] - (lens.cumsum(0) - lens), lens)
            idx = self.by_cluster[layer][h][torch.arange(total, device=take.device) + offs]
            out.append(torch.cat([idx[~fixed[idx]], fixed_idx]))
        return out

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        self.check_batch(q)
        T = q.shape[2]
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
        T = q.shape[2]
        self.new_k[layer], self.new_v[layer] = cat(self.new_k[layer], k), cat(self.new_v[layer], v)
        m = self.new_k[layer].shape[-2]
        Hkv = k.shape[1]
        after = torch.ones(T, m, dtype=torch.bool, device=q.device).tril(m - T)[None].expand(Hkv, T, m)  # causal
        if self.config.fraction >= 1:  # no selection: full attention over the context
            n = self.context_length
            self.attended += Hkv * T * n
            self.offered += Hkv * T * n
            # two groups with masks shared by all heads: no copy of the context's keys into one tensor
            # (the fastest full attention this module has: the reference the time saved is measured against)
            ctx = (q, self.ctx_k[layer], self.ctx_v[layer], torch.ones(T, n, dtype=torch.bool, device=q.device))
            return group_attention([ctx, (q, self.new_k[layer], self.new_v[layer], after[0])], scaling)[0]
        elif T == 1:  # decoding: copy out the selected keys so the work shrinks with the fraction
            idx = self._decode_keys(layer, self.select_clusters(layer, q)[:, 0])
            self.attended += sum(i.numel() for i in idx)
            self.offered += Hkv * self.context_length
            # one attention call per KV head over exactly its keys (selected + every later token, all
            # visible to the newest query): no padding, no mask (a padded call with per-head masks
            # was slower than attending to all keys); index_select copies whole rows, ~6x faster on
            # CPU than gather with an index expanded over D
            G = q.shape[1] // Hkv
            outs = []
            for h in range(Hkv):
                kh = torch.cat([self.ctx_k[layer][0, h].index_select(0, idx[h]), self.new_k[layer][0, h]])  # (N_h, D)
                vh = torch.cat([self.ctx_v[layer][0, h].index_select(0, idx[h]), self.new_v[layer][0, h]])
                outs.append(torch.nn.functional.scaled_dot_product_attention(
                    q[:, h * G:(h + 1) * G], kh[None, None], vh[None, None], scale=scaling))  # (1, G, 1, D)
            return torch.cat(outs, 1)  # (1, H, 1, D)
        else:
            sel = self.select(layer, q)  # (Hkv, T, n)
            self.attended += int(sel.sum())
            self.offered += sel.numel()
            ck, cv, cmask = self.ctx_k[layer], self.ctx_v[layer], sel
        # every key sits at its true position and every query is rotated at its own, so the context
        # and the later tokens are one group: a single attention call (group_attention's fused path
        # for two groups with per-head masks was ~35x slower on CPU)
        keys, values = torch.cat([ck, self.new_k[layer]], -2), torch.cat([cv, self.new_v[layer]], -2)
        return group_attention([(q, keys, values, torch.cat([cmask, after], -1)[None])], scaling)[0]

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
        """Share of the context's keys attended by the query tokens so far."""
        return self.attended / self.offered if self.offered else float("nan")

    def held_tensors(self) -> Iterable[torch.Tensor]:
        for group in (self.ctx_k, self.ctx_v, self.new_k, self.new_v, self.centroids):
            yield from (t for t in group if t is not None)

    def held_tokens(self, layer: int = 0) -> int:
        return self.context_length + (0 if self.new_k[layer] is None else self.new_k[layer].shape[-2])
