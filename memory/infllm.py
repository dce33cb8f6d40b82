"""InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an
Efficient Context Memory") for any RoPE decoder from Hugging Face, with no weight changed.

Each layer keeps, as the paper's reference code (thunlp/InfLLM ``context_manager.py``) does:
- the first ``n_init`` tokens and a local window of the ``n_local`` most recent tokens, attended
  exactly (true distances inside the window);
- a context memory: tokens leaving the window are grouped into blocks of ``block_size`` tokens.
  Each block is represented, per query head, by the mean key of its ``n_repr`` representative
  tokens: those that received the most attention from that head while they were in the window
  (the paper's representative score; with grouped-query attention the key is the head's KV head's). Blocks live in a store on ``store_device`` (CPU by default) that grows
  with the input; the representatives sit in one contiguous (n_blocks, H * D) tensor.

Lookup (one per layer and chunk, shared by all heads, as the paper): a call is cut into chunks of
``chunk`` queries (the paper's ``exc_block_size``, 512; one generated token is a chunk of one);
with q̄_h the mean query of head h over the chunk, rotated to position ``n_local``, and r̄_{b,h}
block b's mean representative key (at position 0) for head h, block b's relevance is the raw
dot product Σ_h q̄_h · r̄_{b,h}, i.e. Σ_t Σ_r Σ_h q_{t,h} · k_{r,h} up to the constant T · n_repr:
one matrix-vector product over all stored blocks. With ``lookup="keys"`` a short call (at most
``keys_upto`` queries: a question, a generated token) scores every stored key instead: block b's
relevance is the attention it would get, max over query heads h and queries t of
Σ_{j in b} softmax_j(q_{t,h} · k_{j,h} · scaling) with the softmax over every stored key. One head
of one query that attends the block (an induction head finding the key it copies) is enough to
fetch it, where the mean over heads, queries and representatives dilutes it, and the softmax puts
heads with large and small logits on one scale. A run of short calls (a question, then the tokens
generated after it) also looks up with the last ``recent_queries`` queries of the run's earlier
calls, so a generated token keeps what the question found (on SmolLM2-135M a lookup by a lone
digit's query loses the passkey's block). Of the ``topk`` best blocks, the key lookup fetches only
those scoring at least ``min_share`` (0.5) of the best block's score: blocks far below it add text
the model may copy instead of what it looked for (on SmolLM2-135M at 32K tokens, the passkey's
block is found, yet the answer is right only when the weakly scored blocks around it are left
out). Longer calls (prefill chunks) use the representatives and end the run. This reads the whole block store (all its keys, on the store's device) once per
short call, O(stored tokens), and is not the paper's. The ``topk`` most relevant blocks (all of them
while there are at most ``topk``) are fetched, through an LRU cache of ``cache_blocks`` blocks per
layer in front of the store, and attended exactly together with the initial tokens and the tokens
that left the window but do not fill a block yet, all at one distance, the window size (query
rotated to position ``n_local``, memory keys to position 0). One softmax covers the window and the
memory (:class:`~retromem.memory.kv_budget.TwoBranchMemory`).

Memory held for attention per layer: n_init + n_local + block_size - 1 pending tokens + the
cached blocks (at most ``cache_blocks``, >= topk); a query attends to at most
``budget_tokens`` = n_init + n_local + block_size - 1 + topk * block_size keys. The paper's
configuration (:meth:`InfLLMConfig.paper`): 128 initial tokens, a 4,096-token window, 16 blocks
of 128 tokens with 4 representatives, chunks of 512: 6,399 keys per query at most. The block
store and the representatives grow with the input and are reported apart
(:meth:`InfLLM.store_bytes`). Batches hold one sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch

from retromem.config import fail, one_of
from retromem.memory.kv_budget import TwoBranchMemory, cat, check_budget, tensors_bytes

LOOKUPS = ("repr", "keys")


@dataclass(frozen=True)
class InfLLMConfig:
    """n_init / n_local: initial tokens and local window; block_size: tokens per memory block;
    n_repr: representative tokens per block and query head (their keys averaged); topk: blocks
    attended per chunk; chunk: queries per lookup (a longer call is attended chunk by chunk);
    cache_blocks: blocks per layer kept on the compute device (>= topk); store_device: where the
    block store lives; lookup: "repr" (the paper's: mean representatives) or "keys" (calls of at
    most ``keys_upto`` queries score each block by the attention its keys would get among all
    stored keys, max over heads and queries, together with the last ``recent_queries`` queries of
    the short calls just before; longer calls use the representatives); min_share: with the key
    lookup, a block of the top ``topk`` is fetched only if its score is at least this share of the
    best block's (0: always ``topk`` blocks). Defaults: the paper's configuration."""

    n_init: int = 128
    n_local: int = 4096
    block_size: int = 128
    n_repr: int = 4
    topk: int = 16
    chunk: int = 512
    cache_blocks: int = 32
    store_device: str = "cpu"
    lookup: str = "repr"
    keys_upto: int = 64
    recent_queries: int = 16
    min_share: float = 0.5

    def __post_init__(self) -> None:
        check_budget(self.n_init, "infllm.n_init", "--n-init", minimum=0)
        check_budget(self.n_local, "infllm.n_local", "--n-local")
        check_budget(self.block_size, "infllm.block_size", "--block-size")
        check_budget(self.n_repr, "infllm.n_repr", "--n-repr")
        check_budget(self.topk, "infllm.topk", "--topk")
        check_budget(self.chunk, "infllm.chunk", "--chunk")
        check_budget(self.cache_blocks, "infllm.cache_blocks", "--cache-blocks")
        if self.n_repr > self.block_size:
            fail("infllm.n_repr", f"be <= block_size ({self.block_size})", self.n_repr, flag="--n-repr")
        if self.cache_blocks < self.topk:
            fail("infllm.cache_blocks", f"be >= topk ({self.topk}): the selected blocks pass through the cache",
                 self.cache_blocks, flag="--cache-blocks")
        one_of(self.store_device.split(":")[0], "infllm.store_device", ("cpu", "cuda", "mps"), flag="--store-device")
        one_of(self.lookup, "infllm.lookup", LOOKUPS, flag="--lookup")
        check_budget(self.keys_upto, "infllm.keys_upto", "--keys-upto")
        check_budget(self.recent_queries, "infllm.recent_queries", "--recent-queries", minimum=0)
        if not 0.0 <= self.min_share <= 1.0:
            fail("infllm.min_share", "be in [0, 1]", self.min_share, flag="--min-share")

    @property
    def budget_tokens(self) -> int:
        """Keys attended per query at most: initial + window + pending + selected blocks."""
        return self.n_init + self.n_local + self.block_size - 1 + self.topk * self.block_size

    def short_lookup(self, n: int) -> bool:
        """Does a call of ``n`` queries have a chunk of at most ``keys_upto`` queries, i.e. a lookup
        that depends on ``lookup`` / ``min_share``? Memories that differ only in those fields and
        have seen only calls for which this is False hold the same state (one prefill serves them all)."""
        sizes = [n] if n <= self.chunk else [self.chunk] * (n // self.chunk) + [n % self.chunk]
        return any(0 < s <= self.keys_upto for s in sizes)

    @classmethod
    def paper(cls) -> "InfLLMConfig":
        """The paper's configuration (Mistral / Llama-3 configs of thunlp/InfLLM)."""
        return cls()

    @classmethod
    def for_budget(cls, budget: int, lookup: str = "repr") -> "InfLLMConfig":
        """The paper's proportions within ``budget`` keys per query: blocks of 128 tokens (4
        representatives) and 128 initial tokens (both scaled down below a budget of 1,024), then
        the window and the selected blocks 2 : 1 (the paper's 4,096 : 2,048); the pending partial
        block counts against the budget. ``for_budget(6399)`` is :meth:`paper`."""
        check_budget(budget, "budget", "--budget", minimum=64)
        block = 128 if budget >= 1024 else max(8, budget // 8)
        n_init = block
        rest = budget - n_init - (block - 1)
        topk = max(1, rest // (3 * block))
        n_local = rest - topk * block
        return cls(n_init=n_init, n_local=n_local, block_size=block, n_repr=min(4, block), topk=topk,
                   chunk=min(512, n_local), cache_blocks=2 * topk, lookup=lookup)


class BlockStore:
    """One layer's memory blocks: each block's keys and values (Hkv, block_size, D) on the store
    device, never changed once written (so a copy of the memory shares them: see
    :meth:`__deepcopy__`), and the blocks' mean representative keys (n, H * D) on the compute
    device in a buffer that doubles when full; ``repr_index`` (n, Hkv, n_repr): which tokens of
    each block they average. The keys are written into pages of ``PAGE`` blocks, (Hkv, PAGE *
    block_size, D) each, and ``k[b]`` is a view of its page, so :meth:`key_scores` scans the store
    page by page without copying it."""

    PAGE = 64

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.pages: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.repr: torch.Tensor | None = None
        self.repr_index: torch.Tensor | None = None
        self.n = 0

    def __deepcopy__(self, memo: dict) -> "BlockStore":
        # a copy of the memory (a shared prefix branching) shares the written blocks and copies
        # only the representatives' buffer: the store is most of the memory's bytes at 32K tokens
        new = BlockStore.__new__(BlockStore)
        new.device, new.n, new.k, new.v = self.device, self.n, list(self.k), list(self.v)
        new.pages = list(self.pages)
        full = self.n - self.n % self.PAGE
        if full < self.n:  # the last page is still being written: the copy writes its own
            new.pages[-1] = self.pages[-1].clone()
            bs = self.k[0].shape[1]
            new.k[full:] = [new.pages[-1][:, j * bs:(j + 1) * bs] for j in range(self.n - full)]
        new.repr = None if self.repr is None else self.repr.clone()
        new.repr_index = None if self.repr_index is None else self.repr_index.clone()
        return new

    @staticmethod
    def _grow(old: torch.Tensor | None, x: torch.Tensor, n: int) -> torch.Tensor:
        """A buffer holding the first n rows of ``old``, with room for 2n (>= 4) rows like x."""
        new = x.new_zeros(max(4, 2 * n), *x.shape)
        if old is not None:
            new[:n] = old[:n]
        return new

    def add(self, k: torch.Tensor, v: torch.Tensor, rep: torch.Tensor, index: torch.Tensor) -> None:
        """k, v (Hkv, block_size, D); rep (H * D,) the mean representative key of each query head; index (H, n_repr)."""
        if self.repr is None or self.n == self.repr.shape[0]:
            self.repr = self._grow(self.repr, rep, self.n)
            self.repr_index = self._grow(self.repr_index, index, self.n)
        j, bs = self.n % self.PAGE, k.shape[1]
        if j == 0:
            self.pages.append(k.new_empty(k.shape[0], self.PAGE * bs, k.shape[2], device=self.device))
        page = self.pages[-1][:, j * bs:(j + 1) * bs]
        page.copy_(k)
        self.k.append(page)
        self.v.append(v.to(self.device, copy=True))
        self.repr[self.n] = rep
        self.repr_index[self.n] = index
        self.n += 1

    def key_scores(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """q (H, T, D) queries at the memory's distance; returns (n,): for each block, max over
        query heads and queries of the softmax attention mass its keys get among every stored key
        (logits q · k · scaling), scanning the store page by page on the store's device."""
        if not self.n:
            return q.new_zeros(0)
        return block_mass(self.block_lse(q, scaling)).to(q.device)

    def block_lse(self, q: torch.Tensor, scaling: float, start: int = 0) -> torch.Tensor:
        """q (H, T, D); returns (Hkv, G, T, n - start) float32: each block's log-sum-exp of the
        logits q · k · scaling of its keys, for blocks start..n-1 (query heads grouped by KV head)."""
        Hkv, bs = self.k[0].shape[0], self.k[0].shape[1]
        H, T, D = q.shape
        qg = q.to(self.device, torch.float32).reshape(Hkv, H // Hkv * T, D) * scaling  # query heads by KV head
        lse = []
        for i, page in enumerate(self.pages):
            lo, hi = max(start - i * self.PAGE, 0), min(self.PAGE, self.n - i * self.PAGE)
            if hi <= lo:
                continue
            logits = qg @ page[:, lo * bs:hi * bs].float().transpose(1, 2)  # (Hkv, G * T, (hi - lo) * bs)
            lse.append(logits.reshape(Hkv, -1, hi - lo, bs).logsumexp(-1))  # each block's log-mass, unnormalized
        return torch.cat(lse, -1).reshape(Hkv, H // Hkv, T, -1)

    def reprs(self) -> torch.Tensor:
        """(n, H * D): the stored blocks' mean representative keys, per query head."""
        return self.repr[:self.n]

    def nbytes(self) -> int:
        """Bytes of the blocks and their representatives (the buffer's spare capacity not counted)."""
        if not self.n:
            return 0
        return self.n * (2 * self.k[0].numel() * self.k[0].element_size() + self.repr[0].numel() * self.repr.element_size()
                         + self.repr_index[0].numel() * self.repr_index.element_size())


def block_mass(lse: torch.Tensor) -> torch.Tensor:
    """lse (Hkv, G, T, n) per-block log-sum-exps (:meth:`BlockStore.block_lse`) -> (n,): the
    softmax mass of each block among all n, max over query heads and queries."""
    return (lse - lse.logsumexp(-1, keepdim=True)).exp().amax((0, 1, 2))


def block_scores(q_far: torch.Tensor, reprs: torch.Tensor) -> torch.Tensor:
    """The paper's block relevance: q_far (1, H, T, D) queries at position n_local, reprs (n, H * D)
    mean representative keys per query head; returns (n,) = Σ_h mean_t q_{t,h} · r̄_{b,h}, one
    matrix-vector product over all stored blocks."""
    return reprs.float() @ q_far[0].float().mean(1).reshape(-1)  # (n,)


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
        self.cache: list[OrderedDict] = [OrderedDict() for _ in range(L)]  # block -> (k, v) (Hkv, block_size, D) on device
        self.selected: list[list[int]] = [[] for _ in range(L)]  # the blocks the last lookup chose, per layer
        self.recent_q: list[torch.Tensor | None] = [None] * L  # (1, H, <= recent_queries, D): this run of short calls
        self.recent_lse: list[torch.Tensor | None] = [None] * L  # their per-block log-sum-exps (Hkv, G, T, blocks then)
        self.hits = self.misses = 0
        self._scaling = (2 * self.rope.inv_freq.numel()) ** -0.5  # head_dim ** -0.5 (RoPE spans the head) until a call brings the model's own

    def wants_scores(self) -> bool:
        return True

    @property
    def budget_tokens(self) -> int:
        return self.config.budget_tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        # chunked prefill: each chunk of queries does its own lookup and is stored before the next
        # attends, exactly as if the call had come in chunks (every layer's attention depends only
        # on that layer's memory and the chunk's queries, keys and values)
        self._scaling = scaling  # the key lookup's softmax uses the model's own
        T, n = q.shape[2], self.config.chunk
        if T <= n:
            return super().attend(layer, q, k, v, positions, scaling)
        return torch.cat([super(InfLLM, self).attend(layer, q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n],
                                                     positions[s:s + n], scaling) for s in range(0, T, n)], 2)

    def evict(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> None:
        bs = self.config.block_size
        self.pend_k[layer] = cat(self.pend_k[layer], self.rope.shift(k, -pos))
        self.pend_v[layer] = cat(self.pend_v[layer], v)
        self.pend_score[layer] = cat(self.pend_score[layer], score, dim=-1)
        while self.pend_k[layer].shape[-2] >= bs:
            bk, bv, bsc = self.pend_k[layer][0, :, :bs], self.pend_v[layer][0, :, :bs], self.pend_score[layer][0, :, :bs]
            top = bsc.topk(self.config.n_repr, dim=-1).indices  # (H, n_repr): the tokens each query head attended most
            bkh = bk.repeat_interleave(bsc.shape[0] // bk.shape[0], 0)  # (H, block_size, D): each query head's keys
            rep = torch.gather(bkh, 1, top[..., None].expand(-1, -1, bk.shape[-1])).mean(1)  # (H, D)
            self.blocks[layer].add(bk, bv, rep.reshape(-1), top)
            self.pend_k[layer] = self.pend_k[layer][:, :, bs:]
            self.pend_v[layer] = self.pend_v[layer][:, :, bs:]
            self.pend_score[layer] = self.pend_score[layer][..., bs:]

    def short_lookup(self, n: int) -> bool:
        """:meth:`InfLLMConfig.short_lookup` of this memory's config."""
        return self.config.short_lookup(n)

    def relookup(self, **fields: Any) -> None:
        """Switch this memory to another lookup (``lookup``, ``keys_upto``, ``recent_queries``,
        ``min_share``) from the next call on; the blocks, window and cache stay."""
        bad = set(fields) - {"lookup", "keys_upto", "recent_queries", "min_share"}
        if bad:
            raise ValueError(f"relookup changes the lookup only, not {', '.join(sorted(bad))}")
        self.config = replace(self.config, **fields)
        self.recent_q = [None] * self.num_layers
        self.recent_lse = [None] * self.num_layers

    def _fetch(self, layer: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache[layer]
        if block in cache:
            self.hits += 1
            cache.move_to_end(block)
            return cache[block]
        self.misses += 1
        store = self.blocks[layer]
        kv = (store.k[block].to(device), store.v[block].to(device))  # (Hkv, block_size, D)
        cache[block] = kv
        while len(cache) > self.config.cache_blocks:
            cache.popitem(last=False)
        return kv

    def lookup(self, layer: int, q_far: torch.Tensor) -> list[int]:
        """The blocks (in stream order) the queries q_far (1, H, T, D), at position n_local, attend."""
        store, c = self.blocks[layer], self.config
        if c.lookup == "keys" and q_far.shape[2] <= c.keys_upto:
            # the key lookup's scores are attention masses: blocks far below the best are left out
            # (min_share), since on SmolLM2-135M the blocks filling up the top-k carry text the
            # model copies instead of the needle (passkey at 32K: BENCHMARKS.md)
            scores = self._run_scores(layer, q_far)
            if not store.n:
                return []
            top = scores.topk(min(c.topk, store.n))
            keep = top.values >= c.min_share * top.values[0]
            return sorted(top.indices[keep].tolist())
        self.recent_q[layer] = self.recent_lse[layer] = None  # a long call ends a run of short calls
        if store.n <= c.topk:
            return list(range(store.n))
        return sorted(block_scores(q_far, store.reprs()).topk(c.topk).indices.tolist())

    def _run_scores(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The key lookup's block scores for a short call's queries q (1, H, T, D) together with the
        last ``recent_queries`` queries of the run so far. The recent queries' per-block
        log-sum-exps are kept (``recent_lse``, for the blocks stored when they were computed): a
        call computes its own queries' over every block and the recent ones' over new blocks only."""
        store, R = self.blocks[layer], self.config.recent_queries
        new = store.block_lse(q[0], self._scaling)  # (Hkv, G, T, n)
        prev_q, prev = self.recent_q[layer], self.recent_lse[layer]
        if prev_q is not None:
            if prev is None:
                prev = store.block_lse(prev_q[0], self._scaling)
            elif prev.shape[-1] < store.n:  # blocks written since
                prev = torch.cat([prev, store.block_lse(prev_q[0], self._scaling, start=prev.shape[-1])], -1)
            new = torch.cat([prev, new], 2)
            q = torch.cat([prev_q, q], 2)
        keep = max(0, q.shape[2] - R)
        self.recent_q[layer] = q[:, :, keep:] if R else None
        self.recent_lse[layer] = new[:, :, keep:] if R else None
        return block_mass(new).to(q.device)

    def far_memory(self, layer: int, q_far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        parts_k, parts_v = [], []
        chosen = self.lookup(layer, q_far) if self.blocks[layer].n else []
        self.selected[layer] = chosen
        if chosen:
            kv = [self._fetch(layer, b, q_far.device) for b in chosen]
            parts_k.append(torch.cat([x[0] for x in kv], 1)[None])  # (1, Hkv, k * block_size, D)
            parts_v.append(torch.cat([x[1] for x in kv], 1)[None])
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
        representatives stay on the compute device for the lookup (one vector per block and query head)."""
        return sum(b.nbytes() for b in self.blocks)

    def cache_bytes(self) -> int:
        return sum(tensors_bytes(kv) for c in self.cache for kv in c.values())

    def held_tokens(self, layer: int = 0) -> int:
        pend = 0 if self.pend_k[layer] is None else self.pend_k[layer].shape[-2]
        return super().held_tokens(layer) + pend
