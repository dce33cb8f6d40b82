"""Bounded KV memory for unmodified Hugging Face decoders: the machinery shared by the training-free
long-context methods (LM-Infinite, InfLLM, SirLLM, Squeezed Attention) and the StreamingLLM baseline.

How it plugs in, with no weight changed:

- :func:`enable` registers one attention function, ``"retromem_kv"``, in transformers'
  ``ALL_ATTENTION_FUNCTIONS`` and switches the model to it (``model.set_attn_implementation``).
  Called without a memory it is plain causal attention (padding and a ``DynamicCache`` honoured),
  so the enabled model still gives the logits it gave before.
- A memory is a transformers :class:`~transformers.Cache` (:class:`KVMemory`). Passed both as the
  model's cache (``model(ids, cache=memory)``, ``model.generate(ids, cache=memory)`` or
  :func:`generate` for prompts longer than the trained context), every attention layer hands its
  new queries, keys and values to ``memory.attend(layer, ...)``; the memory decides which keys each
  query sees, at which rotary positions, and what it keeps. The cache's own ``update`` only counts
  tokens (and names the memory in the attention function's keyword arguments), so ``generate()``
  computes positions and stopping as usual.
- Keys are stored as the model rotated them (RoPE at their absolute position). A method that
  needs another position (LM-Infinite's distance cap, InfLLM's memory units at the window's edge,
  StreamingLLM's positions inside the cache) rotates by the difference: RoPE rotations compose,
  ``R(a) R(b) = R(a + b)``, so ``shift(k, p' - p)`` puts a key stored at ``p`` at ``p'``. This works
  for every decoder whose rotary embedding is the rotate-half form over the whole head
  (Llama, Mistral, Qwen2, Qwen3, ...); others raise :class:`~retromem.errors.UnsupportedModelError`.

Memory held for attention is what :meth:`KVMemory.attention_bytes` counts: the keys and values the
memory keeps between calls. It is bounded by the method's budget (plus the tokens of the call in
flight); InfLLM's off-device block store is reported apart (:meth:`KVMemory.store_bytes`).

Inputs longer than the model's trained context are fed in segments (:func:`stream`): every
segment's queries see the memory plus the segment itself, causally. Batches hold one sequence
unless a method says otherwise; padding is refused (each method's selection is per sequence).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from transformers import Cache

from retromem.errors import ConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)

ATTENTION_NAME = "retromem_kv"
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Registration: one attention function, plain causal attention when no memory is passed
# ----------------------------------------------------------------------------------------------

def _plain_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Causal attention of the T newest queries over all N keys (a DynamicCache's past included).

    query (B, H, T, D); key, value (B, Hkv, N, D); attention_mask: None, a 2-D padding mask (B, N)
    or the 4-D mask transformers built. Returns (B, T, H, D)."""
    T, N = query.shape[2], key.shape[2]
    causal = torch.ones(T, N, dtype=torch.bool, device=query.device).tril(N - T)  # (T, N)
    mask: torch.Tensor = causal[None, None]
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            mask = mask & attention_mask[:, None, None, -N:].bool()
        elif attention_mask.dtype == torch.bool:
            mask = attention_mask[..., -N:]
        else:
            mask = attention_mask[..., -N:] > NEG_INF
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()


def kv_memory_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``retromem_kv`` attention function (transformers' attention-function interface)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    memory = kwargs.get("kv_memory")
    if memory is None:
        return _plain_attention(module, query, key, value, attention_mask, scaling), None
    if attention_mask is not None and not (attention_mask.dtype == torch.bool and bool(attention_mask.all())):
        # the memory's cache reports (query_length, 0) as its mask size, so transformers builds a
        # mask only when the input is padded
        raise ConfigError("a bounded KV memory does not take padded batches: give one unpadded sequence at a time")
    position_ids = kwargs.get("position_ids")
    T = query.shape[2]
    if position_ids is None:
        positions = torch.arange(T, device=query.device) + memory.layer_seen(module.layer_idx) - T
    else:
        positions = position_ids.reshape(-1, T)[0].to(query.device)
    out = memory.attend(module.layer_idx, query, key, value, positions.long(), scaling)  # (B, H, T, D)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``retromem_kv`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, kv_memory_attention)
    if ATTENTION_NAME not in AttentionMaskInterface._global_mapping:
        # transformers builds masks (padding, causal offset) as for sdpa; the memories build their own
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model: Any) -> Any:
    """Switch ``model`` to the ``retromem_kv`` attention (no weight changes); returns the model."""
    register()
    find_rotary(model)  # refuse unsupported models up front
    model.set_attn_implementation(ATTENTION_NAME)
    return model


# ----------------------------------------------------------------------------------------------
# Rotary positions
# ----------------------------------------------------------------------------------------------

def find_rotary(model: Any) -> torch.nn.Module:
    """The model's rotary-embedding module (``rotary_emb`` with ``inv_freq``), checked to be the
    rotate-half form over the whole head."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "inv_freq"):
            cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            if 2 * mod.inv_freq.numel() != head_dim:
                raise UnsupportedModelError(
                    f"{type(model).__name__}: rotary embedding over {2 * mod.inv_freq.numel()} of {head_dim} head dims; "
                    "bounded KV memories need RoPE over the whole head (Llama, Mistral, Qwen2, Qwen3)")
            return mod
    raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding (`rotary_emb` with `inv_freq`); "
                                "bounded KV memories support RoPE decoders (Llama, Mistral, Qwen2, Qwen3)")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope:
    """Rotations by position differences with a model's own frequencies (rotate-half RoPE)."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.detach().float()

    def shift(self, x: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Rotate x (..., N, D) by ``delta`` positions (an int, or one per row: a (N,) tensor)."""
        if isinstance(delta, int):
            delta = torch.full((x.shape[-2],), delta, device=x.device)
        if delta.numel() and not bool(delta.any()):
            return x
        angles = delta.to(x.device).float()[:, None] * self.inv_freq.to(x.device)[None, :]  # (N, D/2)
        emb = torch.cat((angles, angles), dim=-1)
        return (x.float() * emb.cos() + _rotate_half(x.float()) * emb.sin()).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Attention over groups of keys that each see the queries at their own rotary position
# ----------------------------------------------------------------------------------------------

def group_attention(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], scaling: float,
                    want_probs: bool = False, probs_groups: int | None = None, per_query_head: bool = False
                    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """One softmax over several groups of keys.

    Each group is (q, k, v, mask): q (B, H, T, D) rotated as this group needs; k, v (B, Hkv, N, D);
    mask broadcastable to (B, Hkv, 1, T, N), True = attend. Returns (B, H, T, D) and, with
    ``want_probs``, each group's probabilities summed over the query heads of each KV head
    (B, Hkv, T, N) (of the first ``probs_groups`` groups only, when given: each costs a matmul), or
    with ``per_query_head`` each query head's own (B, H, T, N)).

    With 2-D masks (every method but Squeezed Attention's per-head selection) each group is one
    flash-attention call that also returns its log-sum-exp, and the groups are merged exactly
    (out = Σ_j o_j · exp(lse_j - lse)); the probabilities, when wanted, are exp(s - lse) from one
    more matmul. Same result as :func:`reference_group_attention` up to float rounding (tested)."""
    if not all(mask.dim() == 2 for _, _, _, mask in groups) or groups[0][0].dtype not in (torch.float32, torch.float64) \
            or groups[0][0].device.type != "cpu":
        if want_probs:
            return reference_group_attention(groups, scaling, want_probs=True, probs_groups=probs_groups,
                                             per_query_head=per_query_head)
        return _fused_group_attention(groups, scaling), None
    B, H, T, D = groups[0][0].shape
    parts = [_flash_lse(q, k, v, mask, scaling) for q, k, v, mask in groups]
    if len(parts) == 1:
        out, lse = parts[0]
    else:
        lse = torch.stack([p[1] for p in parts]).logsumexp(0)  # (B, H, T)
        lse_safe = lse.masked_fill(lse == NEG_INF, 0.0)
        out = sum(o * (l - lse_safe).exp()[..., None] for o, l in parts)
    if not want_probs:
        return out.to(groups[0][0].dtype), None
    probs = []
    for q, k, _, mask in groups[:probs_groups]:
        Hkv = k.shape[1]
        G = H // Hkv
        s = torch.matmul(q.reshape(B, Hkv, G * T, D), k.transpose(-1, -2))  # (B, Hkv, G*T, N)
        p = (s * scaling - lse.reshape(B, Hkv, G * T, 1)).exp().reshape(B, Hkv, G, T, -1)
        p = p * mask.to(p.dtype)
        probs.append(p.reshape(B, H, T, -1) if per_query_head else p.sum(2))  # (B, H or Hkv, T, N)
    return out.to(groups[0][0].dtype), probs


def _flash_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (B, H, T, D) over k, v (B, Hkv, N, D) under a (T, N) mask, and its log-sum-exp
    (B, H, T): -inf (and output 0) for rows that see no key. The query heads sharing a KV head are
    laid side by side as one head of G*T queries, so keys are never repeated."""
    B, H, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = H // Hkv
    if N == 0:
        return q.new_zeros(B, H, T, D), q.new_full((B, H, T), NEG_INF)
    qg = q.reshape(B, Hkv, G * T, D)  # (B, Hkv, G*T, D): query head h = kv * G + g
    bias = torch.zeros(T, N, dtype=q.dtype, device=q.device).masked_fill_(~mask, NEG_INF)
    if G > 1:
        bias = bias.repeat(G, 1)  # (G*T, N)
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, 0.0, False,
                                                                       attn_mask=bias[None, None], scale=scaling)
    o, lse = o.reshape(B, H, T, D), lse.reshape(B, H, T)
    empty = ~mask.any(-1)  # (T,) rows with no key: the kernel gives them lse 0
    if bool(empty.any()):
        lse = lse.masked_fill(empty, NEG_INF)
        o = o.masked_fill(empty[:, None], 0.0)
    return o, lse


def reference_group_attention(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                              scaling: float, want_probs: bool = False, probs_groups: int | None = None,
                              per_query_head: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """:func:`group_attention` written out (scores, one softmax, weighted values): the reference
    the fast path is tested against, and the path for per-head masks with probabilities."""
    B, H, T, D = groups[0][0].shape
    scores, values = [], []
    for q, k, v, mask in groups:
        Hkv = k.shape[1]
        qg = q.reshape(B, Hkv, H // Hkv, T, D)  # (B, Hkv, G, T, D): the query heads sharing each KV head
        s = torch.einsum("bkgtd,bknd->bkgtn", qg.float(), k.float()) * scaling  # (B, Hkv, G, T, N)
        if mask.dim() == 2:
            mask = mask[None, None, None]
        elif mask.dim() == 4:
            mask = mask[:, :, None]
        elif mask.dim() == 3:
            mask = mask[None, :, None]
        scores.append(s.masked_fill(~mask, NEG_INF))
        values.append(v)
    sizes = [s.shape[-1] for s in scores]
    probs = torch.softmax(torch.cat(scores, -1), dim=-1)  # every row sees at least its own key
    out = None
    parts = torch.split(probs, sizes, dim=-1)
    for p, v in zip(parts, values):
        o = torch.einsum("bkgtn,bknd->bkgtd", p, v.float())
        out = o if out is None else out + o
    out = out.reshape(B, H, T, D).to(groups[0][0].dtype)
    if not want_probs:
        return out, None
    return out, [p.reshape(B, H, T, -1) if per_query_head else p.sum(2) for p in parts[:probs_groups]]


def _fused_group_attention(groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                           scaling: float) -> torch.Tensor:
    """:func:`group_attention` as one fused SDPA call: with g groups, the query is the g group
    queries side by side along the head dimension (B, H, T, g*D) and group j's keys sit in the j-th
    D-slice (zeros elsewhere), so q' · k' is each key's score under its own group's query."""
    q0 = groups[0][0]
    B, H, T, D = q0.shape
    Hkv = groups[0][1].shape[1]
    masks = []
    for _, k, _, mask in groups:
        if mask.dim() == 2:
            mask = mask[None, None]
        masks.append(mask.expand(B, Hkv, T, k.shape[-2]))
    mask = torch.cat(masks, -1)  # (B, Hkv, T, N)
    if len(groups) == 1:
        q, k, v = q0, groups[0][1], groups[0][2]
    else:
        g = len(groups)
        q = torch.cat([grp[0] for grp in groups], -1)  # (B, H, T, g*D)
        ks = []
        for j, (_, kj, _, _) in enumerate(groups):
            z = kj.new_zeros(*kj.shape[:-1], g * D)
            z[..., j * D:(j + 1) * D] = kj
            ks.append(z)
        k = torch.cat(ks, -2)  # (B, Hkv, N, g*D)
        v = torch.cat([grp[2] for grp in groups], -2)
    G = H // Hkv
    mask = mask[:, :, None].expand(B, Hkv, G, T, mask.shape[-1]).reshape(B, H, T, mask.shape[-1])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                                           enable_gqa=G > 1)


# ----------------------------------------------------------------------------------------------
# The cache transformers sees
# ----------------------------------------------------------------------------------------------

def _layer_class():
    from transformers.cache_utils import CacheLayerMixin

    class CountingLayer(CacheLayerMixin):
        """Counts the tokens a layer has seen; the memory itself holds the keys and values."""

        is_sliding = False

        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.is_initialized = True

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.seen += key_states.shape[-2]
            return key_states, value_states

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return query_length, 0  # the memory builds its own masks

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.seen = 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            raise ConfigError("bounded KV memories do not support beam search (num_beams > 1)")

    return CountingLayer


class KVMemory(Cache):
    """Base of the bounded memories: a transformers Cache whose layers count tokens, plus
    ``attend(layer, q, k, v, positions, scaling)`` that subclasses implement.

    model: the (unmodified) decoder this memory serves; its config gives the layer count and its
    rotary module the frequencies. ``max_batch``: the batch sizes a method handles (1 for those that
    select per sequence)."""

    max_batch: int | None = 1

    def __init__(self, model: Any) -> None:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_layers = cfg.num_hidden_layers
        self.rope = Rope(find_rotary(model).inv_freq)
        super().__init__(layers=[_layer_class()() for _ in range(self.num_layers)])

    # -- what transformers and callers use --------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make a forward call (or generate) use this memory."""
        return {"cache": self}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        # The attention module calls ``cache.update(k, v, layer_idx, kwargs=kwargs)`` with the very
        # dict it then spreads into the attention function: naming the memory there is how
        # ``retromem_kv`` finds it, with no extra argument to forward() or generate().
        attn_kwargs = kwargs.get("kwargs")
        if isinstance(attn_kwargs, dict):
            attn_kwargs["kv_memory"] = self
        return super().update(key_states, value_states, layer_idx)

    def layer_seen(self, layer_idx: int) -> int:
        return self.layers[layer_idx].seen

    def check_batch(self, q: torch.Tensor) -> None:
        if self.max_batch is not None and q.shape[0] > self.max_batch:
            raise ConfigError(f"{type(self).__name__} takes batches of at most {self.max_batch} sequence(s), "
                              f"got {q.shape[0]}")

    def observe(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Called after a forward pass with its input ids and logits (SirLLM scores tokens with them)."""

    def wants_logits(self) -> bool:
        """Whether :meth:`observe` needs the logits of every position."""
        return type(self).observe is not KVMemory.observe

    # -- what methods implement ----------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        raise NotImplementedError

    def held_tensors(self) -> Iterable[torch.Tensor]:
        """The key/value tensors kept for attention between calls."""
        return ()

    def attention_bytes(self) -> int:
        """Bytes of keys and values held for attention (all layers)."""
        return sum(t.numel() * t.element_size() for t in self.held_tensors())

    def store_bytes(self) -> int:
        """Bytes held off the attention path (InfLLM's block store); 0 for the others."""
        return 0

    def held_tokens(self, layer: int = 0) -> int:
        """Tokens whose keys layer ``layer`` keeps for attention."""
        raise NotImplementedError

    @property
    def budget_tokens(self) -> int:
        raise NotImplementedError


def cat(a: torch.Tensor | None, b: torch.Tensor | None, dim: int = -2) -> torch.Tensor | None:
    """a and b joined along ``dim``; either may be None (nothing held yet)."""
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b], dim=dim)


# ----------------------------------------------------------------------------------------------
# Two families of bounded memory
# ----------------------------------------------------------------------------------------------

class TwoBranchMemory(KVMemory):
    """Initial tokens + a local window at their true distances, and a far branch at one capped
    distance (LM-Infinite, InfLLM).

    For a query at position i and a kept key at j (d = i - j):
    - local branch: 0 <= d < n_local, at the true distance (the key as the model rotated it);
    - far branch: d >= n_local, for the initial tokens (and, with ``far_window``, window keys that
      aged out inside the current segment) plus whatever :meth:`far_memory` adds (InfLLM's selected
      blocks): every far key is seen at distance ``far_distance`` (query rotated to that position,
      keys to position 0).
    One softmax covers both branches. Tokens leaving the window go to :meth:`evict` (dropped here).
    Per layer it keeps n_init + n_local tokens, plus what a subclass adds."""

    max_batch = None
    far_window = False

    def __init__(self, model: Any, n_init: int, n_local: int, far_distance: int) -> None:
        super().__init__(model)
        self.n_init, self.n_local, self.far_distance = n_init, n_local, far_distance
        L = self.num_layers
        self.init_k: list[torch.Tensor | None] = [None] * L  # (B, Hkv, <=n_init, D) rotated at true positions
        self.init_raw: list[torch.Tensor | None] = [None] * L  # the same keys at position 0
        self.init_v: list[torch.Tensor | None] = [None] * L
        self.init_pos: list[torch.Tensor | None] = [None] * L  # (<=n_init,)
        self.win_k: list[torch.Tensor | None] = [None] * L  # (B, Hkv, <=n_local, D) rotated at true positions
        self.win_v: list[torch.Tensor | None] = [None] * L
        self.win_pos: list[torch.Tensor | None] = [None] * L
        self.win_score: list[torch.Tensor | None] = [None] * L  # (B, H, <=n_local): attention received per query head

    # hooks for subclasses
    def far_memory(self, layer: int, q_far: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra far keys (B, Hkv, M, D) at position 0 and their values, chosen for these queries."""
        return None

    def evict(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, score: torch.Tensor) -> None:
        """Tokens leaving the local window (keys rotated at ``pos``); dropped by default."""

    def wants_scores(self) -> bool:
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        self.check_batch(q)
        empty = positions[:0]
        init_pos = self.init_pos[layer] if self.init_pos[layer] is not None else empty
        win_pos = self.win_pos[layer] if self.win_pos[layer] is not None else empty
        loc_k = cat(cat(self.init_k[layer], self.win_k[layer]), k)  # (B, Hkv, Nl, D)
        loc_v = cat(cat(self.init_v[layer], self.win_v[layer]), v)
        loc_pos = torch.cat([init_pos, win_pos, positions])
        d = positions[:, None] - loc_pos[None, :]  # (T, Nl) distances
        groups = [(q, loc_k, loc_v, (d >= 0) & (d < self.n_local))]
        far_k, far_v, far_mask = [], [], []
        q_far = self.rope.shift(q, self.far_distance - positions)  # (B, H, T, D): every query at far_distance
        aged = [(self.init_raw[layer], self.init_v[layer], init_pos)]
        if self.far_window and self.win_k[layer] is not None:
            # only the window's oldest tokens can age out during this call (positions ascend): the
            # rest would sit masked in the far group, costing as much as the memory itself
            n_aged = int((win_pos <= positions.max() - self.n_local).sum())
            if n_aged:
                aged.append((self.rope.shift(self.win_k[layer][:, :, :n_aged], -win_pos[:n_aged]),
                             self.win_v[layer][:, :, :n_aged], win_pos[:n_aged]))
        for kk, vv, pp in aged:
            if kk is not None and pp.numel():
                far = (positions[:, None] - pp[None, :]) >= self.n_local  # (T, n)
                if bool(far.any()):
                    far_k.append(kk)
                    far_v.append(vv)
                    far_mask.append(far)
        extra = self.far_memory(layer, q_far)
        if extra is not None and extra[0].shape[-2]:
            far_k.append(extra[0])
            far_v.append(extra[1])
            far_mask.append(torch.ones(q.shape[2], extra[0].shape[-2], dtype=torch.bool, device=q.device))
        if far_k:
            groups.append((q_far, torch.cat(far_k, -2), torch.cat(far_v, -2), torch.cat(far_mask, -1)))
        # only the local group's probabilities are kept (the attention each window token receives)
        out, probs = group_attention(groups, scaling, want_probs=self.wants_scores(), probs_groups=1, per_query_head=True)
        self._store(layer, k, v, positions, probs[0].sum(2) if probs is not None else None)
        return out

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               received: torch.Tensor | None) -> None:
        """Keep the new tokens: the first n_init of the stream as initial tokens, the rest in the window."""
        n_old_init = 0 if self.init_pos[layer] is None else self.init_pos[layer].numel()
        n_win = 0 if self.win_pos[layer] is None else self.win_pos[layer].numel()
        if received is not None:  # (B, H, Nl): attention each local key received from these queries, per query head
            if n_win:
                self.win_score[layer] = self.win_score[layer] + received[..., n_old_init:n_old_init + n_win]
            new_score = received[..., n_old_init + n_win:]
        else:
            new_score = torch.zeros(k.shape[:3], device=k.device)
        is_init = positions < self.n_init
        if bool(is_init.any()):
            i = is_init.nonzero().flatten()
            self.init_k[layer] = cat(self.init_k[layer], k[:, :, i])
            self.init_raw[layer] = cat(self.init_raw[layer], self.rope.shift(k[:, :, i], -positions[i]))
            self.init_v[layer] = cat(self.init_v[layer], v[:, :, i])
            self.init_pos[layer] = cat(self.init_pos[layer], positions[i], dim=0)
        r = (~is_init).nonzero().flatten()
        if not r.numel():
            return
        self.win_k[layer] = cat(self.win_k[layer], k[:, :, r])
        self.win_v[layer] = cat(self.win_v[layer], v[:, :, r])
        self.win_pos[layer] = cat(self.win_pos[layer], positions[r], dim=0)
        self.win_score[layer] = cat(self.win_score[layer], new_score[..., r], dim=-1)
        over = self.win_pos[layer].numel() - self.n_local
        if over > 0:
            self.evict(layer, self.win_k[layer][:, :, :over], self.win_v[layer][:, :, :over],
                       self.win_pos[layer][:over], self.win_score[layer][..., :over])
            self.win_k[layer] = self.win_k[layer][:, :, over:]
            self.win_v[layer] = self.win_v[layer][:, :, over:]
            self.win_pos[layer] = self.win_pos[layer][over:]
            self.win_score[layer] = self.win_score[layer][..., over:]

    def held_tensors(self) -> Iterable[torch.Tensor]:
        for group in (self.init_k, self.init_raw, self.init_v, self.win_k, self.win_v):
            yield from (t for t in group if t is not None)

    def held_tokens(self, layer: int = 0) -> int:
        return sum(0 if p is None else p.numel() for p in (self.init_pos[layer], self.win_pos[layer]))


class CachePositionMemory(KVMemory):
    """Kept tokens re-positioned inside the cache (StreamingLLM): the kept keys, then the new ones,
    sit at positions 0, 1, 2, ... so no distance exceeds the cache size, and each query attends
    causally to all of them. Before each call the store is pruned to :meth:`keep` (attention sinks
    and the recent window here; SirLLM adds high-entropy tokens), so a layer holds at most the
    budget plus the tokens of the call in flight."""

    max_batch = None

    def __init__(self, model: Any, n_sink: int, n_local: int) -> None:
        super().__init__(model)
        self.n_sink, self.n_local = n_sink, n_local
        L = self.num_layers
        self.k: list[torch.Tensor | None] = [None] * L  # (B, Hkv, N, D) rotated at true positions
        self.v: list[torch.Tensor | None] = [None] * L
        self.pos: list[torch.Tensor | None] = [None] * L  # (N,) true positions, ascending

    def keep(self, layer: int, pos: torch.Tensor) -> torch.Tensor:
        """Boolean (N,) of the stored tokens to keep: the sinks and the n_local most recent."""
        recent = pos > pos.max() - self.n_local
        return (pos < self.n_sink) | recent

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        self.check_batch(q)
        if self.pos[layer] is not None:
            keep = self.keep(layer, self.pos[layer])
            if not bool(keep.all()):
                i = keep.nonzero().flatten()
                self.k[layer], self.v[layer], self.pos[layer] = self.k[layer][:, :, i], self.v[layer][:, :, i], self.pos[layer][i]
        K, V = cat(self.k[layer], k), cat(self.v[layer], v)
        P = positions if self.pos[layer] is None else torch.cat([self.pos[layer], positions])
        idx = torch.arange(P.numel(), device=q.device)  # positions inside the cache
        T = q.shape[2]
        q_idx = idx[-T:]
        mask = idx[None, :] <= q_idx[:, None]  # (T, N) causal in cache order
        out, _ = group_attention([(self.rope.shift(q, q_idx - positions), self.rope.shift(K, idx - P), V, mask)], scaling)
        self.k[layer], self.v[layer], self.pos[layer] = K, V, P
        return out

    def held_tensors(self) -> Iterable[torch.Tensor]:
        yield from (t for t in self.k if t is not None)
        yield from (t for t in self.v if t is not None)

    def held_tokens(self, layer: int = 0) -> int:
        return 0 if self.pos[layer] is None else self.pos[layer].numel()


class StreamingLLM(CachePositionMemory):
    """The StreamingLLM baseline (Xiao et al. 2023): ``n_sink`` attention sinks plus the ``n_local``
    most recent tokens, positions inside the cache."""

    def __init__(self, model: Any, n_sink: int = 4, n_local: int = 1024) -> None:
        check_budget(n_sink, "streaming.n_sink", "--n-sink", minimum=0)
        check_budget(n_local, "streaming.n_local", "--n-local")
        super().__init__(model, n_sink, n_local)

    @property
    def budget_tokens(self) -> int:
        return self.n_sink + self.n_local


class FullAttention(KVMemory):
    """Every token kept at its true position: the exact reference (memory grows with the input)."""

    max_batch = None

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.k: list[torch.Tensor | None] = [None] * self.num_layers
        self.v: list[torch.Tensor | None] = [None] * self.num_layers
        self.pos: list[torch.Tensor | None] = [None] * self.num_layers

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
               scaling: float) -> torch.Tensor:
        past_k, past_v, past_pos = self.k[layer], self.v[layer], self.pos[layer]
        self.k[layer], self.v[layer] = cat(past_k, k), cat(past_v, v)
        self.pos[layer] = positions if past_pos is None else torch.cat([past_pos, positions])
        T = positions.numel()
        in_order = bool((positions[1:] > positions[:-1]).all()) and (past_pos is None or bool(past_pos.max() < positions.min()))
        if not in_order or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
            mask = self.pos[layer][None, :] <= positions[:, None]
            return group_attention([(q, self.k[layer], self.v[layer], mask)], scaling)[0]
        # the past is seen whole and the call's own keys causally: two flash calls with no mask
        # (a (T, N) mask at 32K tokens would cost more than the attention), merged by log-sum-exp
        B, H, _, D = q.shape
        G = H // k.shape[1]
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        o, lse = flash(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), 0.0, True, scale=scaling)
        if past_k is None:
            return o
        op, lp = flash(q.reshape(B, past_k.shape[1], G * T, D), past_k, past_v, 0.0, False, scale=scaling)
        op, lp = op.reshape(B, H, T, D), lp.reshape(B, H, T)
        m = torch.maximum(lse, lp)
        a, b = (lse - m).exp(), (lp - m).exp()
        return (o * a[..., None] + op * b[..., None]) / (a + b)[..., None]

    def held_tensors(self) -> Iterable[torch.Tensor]:
        yield from (t for t in self.k + self.v if t is not None)

    def held_tokens(self, layer: int = 0) -> int:
        return 0 if self.pos[layer] is None else self.pos[layer].numel()

    @property
    def budget_tokens(self) -> int:
        return -1  # unbounded


# ----------------------------------------------------------------------------------------------
# Driving a model with a memory
# ----------------------------------------------------------------------------------------------

def _forward(model: Any, ids: torch.Tensor, memory: KVMemory, keep_logits: str) -> torch.Tensor | None:
    kw = memory.model_kwargs()
    need_all = keep_logits == "all" or memory.wants_logits()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=0 if need_all else 1, **kw)
    memory.observe(ids, out.logits)
    if keep_logits == "all":
        return out.logits
    if keep_logits == "last":
        return out.logits[:, -1:]
    return None


def stream(model: Any, input_ids: torch.Tensor, memory: KVMemory, segment: int = 512,
           keep_logits: str = "none", score_from: int = 0) -> torch.Tensor | None:
    """Feed ``input_ids`` (B, L) through ``model`` with ``memory`` in segments of ``segment`` tokens.

    keep_logits: ``"none"``, ``"last"`` (logits of the last position) or ``"all"``; with ``"all"``,
    only positions ``score_from..`` are kept (the rest are dropped segment by segment)."""
    if keep_logits not in ("none", "last", "all"):
        raise ConfigError(f"`keep_logits` must be none, last or all, got {keep_logits!r}")
    if segment < 1:
        raise ConfigError(f"`segment` must be >= 1, got {segment}")
    kept: list[torch.Tensor] = []
    last = None
    with torch.inference_mode():
        for s in range(0, input_ids.shape[1], segment):
            piece = input_ids[:, s:s + segment]
            mode = "all" if keep_logits == "all" and s + piece.shape[1] > score_from else "none"
            if keep_logits == "last" and s + segment >= input_ids.shape[1]:
                mode = "last"
            logits = _forward(model, piece, memory, mode)
            if mode == "all":
                kept.append(logits[:, max(score_from - s, 0):])
            elif mode == "last":
                last = logits
    if keep_logits == "all":
        return torch.cat(kept, 1)
    return last


def generate(model: Any, input_ids: torch.Tensor, memory: KVMemory, segment: int = 512, **generate_kwargs: Any):
    """``model.generate`` over a prompt of any length: all but its last token are streamed through
    the memory in segments, then transformers' ``generate`` continues (greedy or sampling) with the
    memory as its cache. Returns what ``generate`` returns (the prompt followed by new tokens)."""
    if input_ids.shape[1] > 1:
        stream(model, input_ids[:, :-1], memory, segment=segment)
    hook = model.register_forward_hook(_observe_hook, with_kwargs=True) if memory.wants_logits() else None
    try:
        return model.generate(input_ids, **memory.model_kwargs(), **generate_kwargs)
    finally:
        if hook is not None:
            hook.remove()


def _observe_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    # generate() calls the model itself; this passes each step's ids and logits on to the memory
    memory = kwargs.get("cache")
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(memory, KVMemory) and ids is not None:
        memory.observe(ids, output.logits)


def check_budget(value: Any, key: str, flag: str | None = None, minimum: int = 1) -> int:
    """A token budget: an int >= minimum."""
    from retromem.config import integer

    return integer(value, key, ge=minimum, flag=flag)


def tensors_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)

