"""InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory") for any RoPE decoder from Hugging Face, with no weight changed.

Each layer keeps:
- the first ``n_init`` tokens and a local window of ``n_local`` tokens, attended exactly (true
  distances inside the window);
- a context memory: tokens leaving the window are grouped into blocks of ``block_size`` tokens;
  each block is represented by ``n_repr`` representative keys per KV head, the tokens that
  received the most attention while they were in the window (the paper's representative score).
  Blocks live in a store on ``store_device`` (CPU by default) that grows with the input.

For each call (a segment, or one generated token) and KV head, a block's relevance is the
attention its representatives draw: Σ_t Σ_r softmax_{all representatives}(q_t · k / √D)_r over the
call's queries t (all query heads sharing the KV head) and the block's representatives r (the
paper sums raw dot products q_t · k_r; on SmolLM2-135M that picked the passkey's block in fewer
layers, see BENCHMARKS.md); the ``topk`` most relevant blocks are fetched (through an LRU cache of
``cache_blocks`` blocks per layer in front of the store) and attended exactly, together with the
initial tokens, as the paper does: all memory tokens at one distance, the window size (query
rotated to position ``n_local``, memory keys to position 0). One softmax covers the window and
the memory (:class:`~retromem.memory.kv_budget.TwoBranchMemory`).

Memory held for attention per layer: n_init + n_local + block_size - 1 pending tokens + the
cached blocks (at most ``cache_blocks`` per KV head, >= topk). The block store and the
representative keys grow with the input and are reported apart (:meth:`InfLLM.store_bytes`).
Batches hold one sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from retromem.config import fail, one_of
from retromem.memory.kv_budget import TwoBranchMemory, cat, check_budget, tensors_bytes


@dataclass(frozen=True)
class InfLLMConfig:
    """n_init / n_local: initial tokens and local window; block_size: tokens per memory block;
    n_repr: representative keys per block and KV head; topk: blocks attended per call;
    cache_blocks: blocks per layer kept on the compute device (>= topk); store_device: where the
    block store lives."""

    n_init: int = 128
    n_local: int = 1024
    block_size: int = 128
    n_repr: int = 8
    topk: int = 8
    cache_blocks: int = 32
    store_device: str = "cpu"

    def __post_init__(self) -> None:
        check_budget(self.n_init, "infllm.n_init", "--n-init", minimum=0)
        check_budget(self.n_local, "infllm.n_local", "--n-local")
        check_budget(self.block_size, "infllm.block_size", "--block-size")
        check_budget(self.n_repr, "infllm.n_repr", "--n-repr")
        check_budget(self.topk, "infllm.topk", "--topk")
        check_budget(self.cache_blocks, "infllm.cache_blocks", "--cache-blocks")
        if self.n_repr > self.block_size:
            fail("infllm.n_repr", f"be <= block_size ({self.block_size})", self.n_repr, flag="--n-repr")
        if self.cache_blocks < self.topk:
            fail("infllm.cache_blocks", f"be >= topk ({self.topk}): the selected blocks pass through the cache",
                 self.cache_blocks, flag="--cache-blocks")
        one_of(self.store_device.split(":")[0], "infllm.store_device", ("cpu", "cuda", "mps"), flag="--store-device")

    @property
    def budget_tokens(self) -> int:
        """Tokens attended per query at most: initial + window + pending + selected blocks."""
        return self.n_init + self.n_local + self.block_size - 1 + self.topk * self.block_size


class BlockStore:
    """One layer's memory blocks: raw keys/values (Hkv, n, block_size, D) on the store device in a
    buffer that doubles when full, and representative keys (Hkv, n, n_repr, D) on the compute device."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.repr: torch.Tensor | None = None
        self.n = 0

    def add(self, k: torch.Tensor, v: torch.Tensor, rep: torch.Tensor) -> None:
        """k, v (Hkv, block_size, D); rep (Hkv, n_repr, D)."""
        if self.k is None or self.n == self.k.shape[1]:
            cap = max(4, 2 * self.n)
            grow = lambda old, x: torch.cat([old[:, :self.n], x.new_zeros(x.shape[0], cap - self.n, *x.shape[1:])], 1) \
                if old is not None else x.new_zeros(x.shape[0], cap, *x.shape[1:])  # noqa: E731
            self.k = grow(self.k, k.to(self.device))
            self.v = grow(self.v, v.to(self.device))
        self.k[:, self.n] = k.to(self.device)
        self.v[:, self.n] = v.to(self.device)
        self.repr = cat(self.repr, rep[:, None], dim=1)
        self.n += 1

    def nbytes(self) -> int:
        """Bytes of the blocks stored (the buffer's spare capacity not counted)."""
        return 0 if self.k is None else 2 * self.n * self.k[:, 0].numel() * self.k.element_size()


class InfLLM(TwoBranchMemory):
    """The InfLLM cache: a transformers Cache for one stream (batch of one, no padding)."""

    max_batch = 1
    far_window = True

    def __init__(self, model: Any, config: InfLLMConfig | None = None) -> None:
        self.config = c = config or InfLLMConfig()
        super().__init__(model, c.n_init, c.n_local, far_distance=c.n_local)
        L = self.num_layers
        self.pend_k: list[torch.Tensor | None] = [None] * L  # (1, Hkv, <block_size, D) at position 0
        self.pend_v: list[torch.Tensor | None] = [None] * L
        self.pend_score: list[torch.Tensor | None] = [None] * L
        self.blocks = [BlockStore(c.store_device) for _ in range(L)]
        self.cache: list[OrderedDict] = [OrderedDict() for _ in range(L)]  # (head, block) -> (k, v) on device
        self.hits = self.misses = 0

    def wants_scores(self) -> bool:
        return True

    @property
    def budget_tokens(self) -> int:
        return self.config.budget_tokens

    def evict(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> None:
        bs = self.config.block_size
        self.pend_k[layer] = cat(self.pend_k[layer], self.rope.shift(k, -pos))
        self.pend_v[layer] = cat(self.pend_v[layer], v)
        self.pend_score[layer] = cat(self.pend_score[layer], score, dim=-1)
        while self.pend_k[layer].shape[-2] >= bs:
            bk, bv, bsc = self.pend_k[layer][0, :, :bs], self.pend_v[layer][0, :, :bs], self.pend_score[layer][0, :, :bs]
            top = bsc.topk(self.config.n_repr, dim=-1).indices  # (Hkv, n_repr): the most-attended tokens
            rep = torch.gather(bk, 1, top[..., None].expand(-1, -1, bk.shape[-1]))  # (Hkv, n_repr, D)
            self.blocks[layer].add(bk, bv, rep)
            self.pend_k[layer] = self.pend_k[layer][:, :, bs:]
            self.pend_v[layer] = self.pend_v[layer][:, :, bs:]
            self.pend_score[layer] = self.pend_score[layer][..., bs:]

    def _fetch(self, layer: int, head: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache[layer]
        key = (head, block)
        if key in cache:
            self.hits += 1
            cache.move_to_end(key)
            return cache[key]
        self.misses += 1
        store = self.blocks[layer]
        kv = (store.k[head, block].to(device), store.v[head, block].to(device))
        cache[key] = kv
        Hkv = store.k.shape[0]
        while len(cache) > self.config.cache_blocks * Hkv:
            cache.popitem(last=False)
        return kv

    def far_memory(self, layer: int, q_far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        store = self.blocks[layer]
        parts_k, parts_v = [], []
        if store.n:
            Hkv = store.repr.shape[0]
            B, H, T, D = q_far.shape
            q = q_far[0].float().reshape(Hkv, H // Hkv, T, D)
            s = torch.einsum("hnrd,hgtd->hgtnr", store.repr.float(), q) * D ** -0.5  # (Hkv, G, T, n_blocks, n_repr)
            # each query's attention over all representatives, summed per block: a block wins by the
            # attention mass its representatives would draw, not by raw dot products (which favour
            # blocks whose representatives are sink-like tokens every query scores high)
            p = torch.softmax(s.flatten(3), dim=-1).reshape(s.shape)
            rel = p.sum((1, 2, 4))  # (Hkv, n_blocks)
            top = rel.topk(min(self.config.topk, store.n), dim=-1).indices.sort(-1).values  # (Hkv, k) in stream order
            ks, vs = [], []
            for h in range(Hkv):
                kv = [self._fetch(layer, h, int(b), q_far.device) for b in top[h]]
                ks.append(torch.cat([x[0] for x in kv], 0))  # (k * block_size, D)
                vs.append(torch.cat([x[1] for x in kv], 0))
            parts_k.append(torch.stack(ks)[None])
            parts_v.append(torch.stack(vs)[None])
        if self.pend_k[layer] is not None and self.pend_k[layer].shape[-2]:
            parts_k.append(self.pend_k[layer])
            parts_v.append(self.pend_v[layer])
        if not parts_k:
            return None
        return torch.cat(parts_k, -2), torch.cat(parts_v, -2)

    def held_tensors(self) -> Iterable[torch.Tensor]:
        yield from super().held_tensors()
        yield from (t for t in self.pend_k + self.pend_v if t is not None)
        for c in self.cache:
            for k, v in c.values():
                yield k
                yield v

    def store_bytes(self) -> int:
        """The block store and the representative keys: both grow with the input. The
        representatives stay on the compute device for the lookup (n_repr / block_size of the blocks)."""
        return sum(b.nbytes() + tensors_bytes([b.repr]) for b in self.blocks)

    def cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for c in self.cache for k, v in c.values())

    def held_tokens(self, layer: int = 0) -> int:
        pend = 0 if self.pend_k[layer] is None else self.pend_k[layer].shape[-2]
        return super().held_tokens(layer) + pend
