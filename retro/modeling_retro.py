"""RETRO (Borgeaud et al. 2021): a decoder that reads retrieved neighbours through chunked
cross-attention (CCA), and the blocks that RETROfit inserts into pretrained decoders.

The input of ``T`` tokens is split into chunks of ``m = chunk_length`` tokens; chunk ``u`` has
``k`` retrieved neighbours of ``r`` tokens (the retrieved chunk plus its continuation),
``neighbour_ids`` of shape (B, n_chunks, k, r).

* The neighbour encoder is a small bidirectional transformer over each neighbour (rotary
  positions, no causal mask). Every encoder layer also cross-attends to the decoder's hidden
  states of the chunk that retrieved the neighbour, taken at the output of the first RETRO layer.
  Neighbour tokens are embedded with the decoder's own (shared) token embedding.
* CCA with the paper's causal shift: the tokens at positions [u*m + m - 1, (u+1)*m + m - 1) attend
  to the encoded neighbours of chunk u, i.e. from the last token of chunk u (the first position at
  which chunk u is complete) to the penultimate token of chunk u+1. Positions before m - 1 see no
  neighbours. Neighbours of chunks not yet complete within the input are never even encoded. With
  ``cca_relative_positions`` the queries carry rotary positions m - 1 + i (i: offset in the span)
  and the keys j (0..r-1 inside each neighbour), so the attention depends on their offset.
* The blocks hang on the decoder layers with hooks, in one of two places (``cca_placement``):
  - ``before_mlp`` (the paper, Algorithm 1: h <- h + ATTN(h); h <- h + CCA(h); h <- h + FFW(h)): a
    forward pre-hook on decoder layer ``l`` (1-based ``retro_layers``) records its input h, and a
    forward hook on its self-attention module returns attn_out + CCA(h + attn_out), so the layer's
    own residual becomes h + attn_out + CCA and its feed-forward reads that. The encoder reads the
    first RETRO layer's h + attn_out.
  - ``after_layer``: a forward hook on the decoder layer adds CCA(output) to its output, and the
    encoder reads the first RETRO layer's output.
  Hooks leave the base model's modules and parameter names untouched, so the same code serves the
  from-scratch ``RetroForCausalLM`` (a Llama-style decoder from transformers' building blocks)
  and ``RetrofitForCausalLM``, a pretrained Hugging Face decoder of a supported family
  (``DECODER_LAYERS``) wrapped with RETRO blocks (``retromem.retro.retrofit``).
* ``gated`` configs start every CCA output projection at zero, so the model with retrieval starts
  exactly equal to the model without it.

Chunk boundaries count from each row's first real token: a left-padded batch (``attention_mask``)
has each row's chunks in its own frame. Neighbours cut short (a continuation at a document's end)
are padded and masked with ``neighbour_attention_mask``.

Neighbours come with the call (``neighbour_ids`` for the first C chunks) or from a ``retriever``
callable that the forward asks, with the chunk's tokens, for each chunk the input completes beyond
those. Decoding with a key/value cache (``generate``, ``use_cache=True``): the retrieval state
(:class:`RetroMemory`: neighbours, the first RETRO layer's states, encoded neighbours) rides on the
cache object (``cache.retro_memory``), so a step encodes a chunk's neighbours once, when its last
token is fed, and CCA runs for the new positions only, attending the encoded neighbours of the
chunk whose span they sit in; beam search reorders it with the cache. The cached model equals the
whole-sequence forward (a test checks logits, greedy, seeded sampling and beams).

The modeling and configuration files import only torch and transformers (and each other,
relatively): ``retromem.hf_export`` copies them into saved directories with an ``auto_map``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm, apply_rotary_pos_emb

from .configuration_retro import RetroConfig, RetrofitConfig

CCA_ATTR = "retro_cca"
ENCODER_ATTR = "retro_encoder"
# the self-attention module of a decoder layer: Llama-style, GPT-2, GPT-NeoX
ATTENTION_ATTRS = ("self_attn", "attn", "attention")


# -- shared layers ------------------------------------------------------------------------------


def rotary_cos_sin(length: int | torch.Tensor, head_dim: int, theta: float,
                   like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of rotary embeddings for positions 0..length-1 (or the given 1-D positions): each (1, L, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=like.device, dtype=torch.float32) / head_dim))
    positions = torch.arange(length, device=like.device) if isinstance(length, int) else length.to(like.device)
    freqs = torch.outer(positions.to(torch.float32), inv_freq)  # (L, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, hd), the rotate-half layout Llama uses
    return emb.cos()[None].to(like.dtype), emb.sin()[None].to(like.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (N, H, L, hd) with cos, sin (1, L, hd) (Llama's rotate-half layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (N, H, L, hd)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    """Multi-head attention without a mask (bidirectional), self- or cross-: queries from ``x``,
    keys and values from ``context`` (``x`` itself when None). Rotary positions when ``rope_theta``."""

    def __init__(self, q_dim: int, kv_dim: int, inner_dim: int, out_dim: int, num_heads: int,
                 rope_theta: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.rope_theta = num_heads, inner_dim // num_heads, rope_theta
        self.q_proj = nn.Linear(q_dim, inner_dim, bias=False)
        self.k_proj = nn.Linear(kv_dim, inner_dim, bias=False)
        self.v_proj = nn.Linear(kv_dim, inner_dim, bias=False)
        self.o_proj = nn.Linear(inner_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                positions: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (N, Tq, q_dim), context (N, Tk, kv_dim), key_mask (N, Tk) bool, True = attend -> (N, Tq, out_dim).
        ``positions`` (query positions (Tq,), key positions (Tk,)) for rotary cross-attention; self-attention
        with ``rope_theta`` uses 0..Tq-1 for both."""
        context = x if context is None else context
        N, Tq, _ = x.shape
        Tk = context.shape[1]
        q = self.q_proj(x).view(N, Tq, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, Tq, hd)
        k = self.k_proj(context).view(N, Tk, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, Tk, hd)
        v = self.v_proj(context).view(N, Tk, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, Tk, hd)
        if positions is not None:  # cross-attention: queries and keys in their own frames
            q = rotate(q, *rotary_cos_sin(positions[0], self.head_dim, self.rope_theta, q))
            k = rotate(k, *rotary_cos_sin(positions[1], self.head_dim, self.rope_theta, k))
        elif self.rope_theta is not None:
            cos, sin = rotary_cos_sin(Tq, self.head_dim, self.rope_theta, q)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, H, Tq, hd)
        return self.o_proj(out.transpose(1, 2).reshape(N, Tq, -1))  # (N, Tq, out_dim)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class NeighbourEncoderLayer(nn.Module):
    """Bidirectional self-attention over a neighbour, cross-attention to its chunk's decoder states, MLP."""

    def __init__(self, config: RetroConfig, decoder_hidden: int) -> None:
        super().__init__()
        d, h, eps = config.encoder_hidden_size, config.encoder_num_heads, config.rms_norm_eps
        self.self_norm = LlamaRMSNorm(d, eps=eps)
        self.self_attn = Attention(d, d, d, d, h, rope_theta=config.rope_theta)
        self.cross_norm = LlamaRMSNorm(d, eps=eps)
        self.cross_attn = Attention(d, decoder_hidden, d, d, h)
        self.mlp_norm = LlamaRMSNorm(d, eps=eps)
        self.mlp = SwiGLU(d, config.encoder_intermediate_size)

    def forward(self, x: torch.Tensor, chunk_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.self_norm(x), key_mask=key_mask)
        x = x + self.cross_attn(self.cross_norm(x), chunk_states)
        return x + self.mlp(self.mlp_norm(x))


class NeighbourEncoder(nn.Module):
    """Encodes the k neighbours of each chunk, each conditioned on the decoder states of its chunk."""

    def __init__(self, config: RetroConfig, decoder_hidden: int) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.embed_norm = LlamaRMSNorm(decoder_hidden, eps=eps)
        self.in_proj = nn.Linear(decoder_hidden, config.encoder_hidden_size, bias=False)
        # the decoder's residual stream is unnormalised (GPT-2's has outlier dimensions): normalise first
        self.chunk_norm = LlamaRMSNorm(decoder_hidden, eps=eps)
        self.layers = nn.ModuleList(NeighbourEncoderLayer(config, decoder_hidden) for _ in range(config.encoder_num_layers))
        self.norm = LlamaRMSNorm(config.encoder_hidden_size, eps=eps)

    def forward(self, neighbour_embeds: torch.Tensor, chunk_states: torch.Tensor,
                neighbour_mask: torch.Tensor | None = None) -> torch.Tensor:
        """neighbour_embeds (B, C, k, r, D) token embeddings; chunk_states (B, C, m, D); neighbour_mask
        (B, C, k, r) bool, False = padding -> (B, C, k*r, d)."""
        B, C, k, r, D = neighbour_embeds.shape
        m = chunk_states.shape[2]
        x = self.in_proj(self.embed_norm(neighbour_embeds)).reshape(B * C * k, r, -1)  # (B*C*k, r, d)
        ctx = self.chunk_norm(chunk_states)[:, :, None].expand(B, C, k, m, D).reshape(B * C * k, m, D)  # (B*C*k, m, D)
        key_mask = None if neighbour_mask is None else neighbour_mask.reshape(B * C * k, r)  # (B*C*k, r)
        for layer in self.layers:
            x = layer(x, ctx, key_mask)
        return self.norm(x).reshape(B, C, k * r, -1)  # (B, C, k*r, d)


class ChunkedCrossAttention(nn.Module):
    """CCA with the causal shift: the residual update of decoder states that sit in one chunk's span,
    attending that chunk's encoded neighbours (see :func:`cca_update` for the spans)."""

    def __init__(self, config: RetroConfig, decoder_hidden: int) -> None:
        super().__init__()
        self.chunk_length, self.neighbour_length = config.chunk_length, config.neighbour_length
        self.norm = LlamaRMSNorm(decoder_hidden, eps=config.rms_norm_eps)
        d = config.encoder_hidden_size
        self.relative_positions = config.cca_relative_positions
        self.attn = Attention(decoder_hidden, d, d, decoder_hidden, config.encoder_num_heads,
                              rope_theta=config.rope_theta if self.relative_positions else None)
        self.gated = config.gated
        if self.gated:
            nn.init.zeros_(self.attn.o_proj.weight)

    def attend(self, hidden: torch.Tensor, encoded: torch.Tensor, key_mask: torch.Tensor | None = None,
               first_offset: int = 0) -> torch.Tensor:
        """hidden (N, L, D): L consecutive decoder states of one span, from span offset ``first_offset``
        (0..m-1); encoded (N, k*r, d) the neighbours of the span's chunk; key_mask (N, k*r) bool, False =
        padding -> the update (N, L, D)."""
        m, L = self.chunk_length, hidden.shape[1]
        positions = None
        if self.relative_positions:
            # span offset i sits at m - 1 + i in the retrieving chunk's frame; neighbour token j at j
            r = self.neighbour_length
            k_pos = torch.arange(r, device=hidden.device).repeat(encoded.shape[1] // r)  # (k*r,)
            q_pos = torch.arange(first_offset, first_offset + L, device=hidden.device) + m - 1  # (L,)
            positions = (q_pos, k_pos)
        return self.attn(self.norm(hidden), encoded, key_mask=key_mask, positions=positions)  # (N, L, D)

    def forward(self, hidden: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None = None,
                first_offset: int | None = None) -> torch.Tensor:
        """With ``first_offset`` (a span's states, encoded (N, k*r, d), mask (N, k*r)): :meth:`attend`.
        Without: hidden (B, T, D) decoder states from position 0; encoded (B, C, k*r, d) neighbours of the
        first C chunks (all complete); mask (B, C, k*r) bool, False = padding -> the update (B, T, D).
        (The hooks call the module, not ``attend``, so that wrappers such as peft's ``modules_to_save``
        copies take effect.)"""
        if first_offset is not None:
            return self.attend(hidden, encoded, mask, first_offset)
        out = hidden.new_zeros(hidden.shape)
        got = span_update(self, hidden, encoded, mask, 0, encoded.shape[1], self.chunk_length)
        if got is not None:
            t_lo, t_hi, update = got
            out[:, t_lo:t_hi] = update
        return out


def span_update(cca: nn.Module, hidden: torch.Tensor, encoded: torch.Tensor, key_mask: torch.Tensor | None,
                rel0: int, n_encoded: int, m: int) -> tuple[int, int, torch.Tensor] | None:
    """CCA of states ``hidden`` (R, T, D) at positions [rel0, rel0 + T) (counted from the rows' first real
    token) with encoded neighbours (R, C, k*r, d) of which the first ``n_encoded`` chunks are valid: the
    input offsets [a, b) that get an update and the update (R, b - a, D); None when none does.

    Span u is [u*m + m - 1, u*m + 2m - 1): from the last token of chunk u to the penultimate token of
    chunk u + 1; its tokens attend the encoded neighbours of chunk u. Positions before m - 1, and spans
    whose chunk is not encoded, get no update. States of one span (a decoding step) attend with just
    their tokens; several spans are laid out as whole spans (zero-padded at the ends) and attended at once."""
    R, T, D = hidden.shape
    t_lo, t_hi = max(rel0, m - 1), min(rel0 + T, n_encoded * m + m - 1)
    if t_lo >= t_hi:
        return None
    u_lo, u_hi = (t_lo - m + 1) // m, (t_hi - m) // m  # spans of positions t_lo and t_hi - 1
    h = hidden[:, t_lo - rel0: t_hi - rel0]  # (R, L, D)
    enc = encoded[:, u_lo: u_hi + 1]  # (R, U, k*r, d)
    kmask = None if key_mask is None else key_mask[:, u_lo: u_hi + 1]  # (R, U, k*r)
    U = u_hi - u_lo + 1
    if U == 1:
        update = cca(h, enc[:, 0], None if kmask is None else kmask[:, 0], first_offset=t_lo - (u_lo * m + m - 1))
    else:
        w0 = u_lo * m + m - 1  # first position of the window of whole spans
        window = F.pad(h, (0, 0, t_lo - w0, (u_hi + 1) * m + m - 1 - t_hi))  # (R, U*m, D)
        update = cca(window.reshape(R * U, m, D), enc.reshape(R * U, enc.shape[2], -1),
                     None if kmask is None else kmask.reshape(R * U, -1), first_offset=0)  # (R*U, m, D)
        update = update.reshape(R, U * m, D)[:, t_lo - w0: t_hi - w0]  # (R, L, D)
    return t_lo - rel0, t_hi - rel0, update


# -- what retrieval keeps between forwards -----------------------------------------------------------


Rows = slice | torch.Tensor  # the batch rows of one padding group: slice(None) (all rows) or indices


class RetroMemory:
    """The retrieval side of a forward, per batch row: the neighbours of each chunk, the decoder states
    that condition their encoding, and the encoded neighbours.

    A forward without a cache builds a fresh one (everything is computed from position 0). With a key/value
    cache it lives on the cache (``cache.retro_memory``) and grows with it: a chunk's neighbours are encoded
    once, when the chunk is complete, from the first RETRO layer's states that the earlier forwards kept.
    Chunks count from each row's first real token (``pads``: left padding), so the rows of a batch may
    complete chunks at different steps; rows with the same padding form a group that moves together.
    Every tensor has the batch first, so beam search reorders them with :meth:`select`.
    """

    def __init__(self, pads: torch.Tensor) -> None:
        self.pads = pads.to("cpu", torch.long)  # (B,) tokens of left padding per row
        B = len(self.pads)
        self.tokens: torch.Tensor | None = None  # (B, T) every input id seen (the retriever's queries)
        self.neighbour_ids: torch.Tensor | None = None  # (B, C, k, r)
        self.neighbour_mask: torch.Tensor | None = None  # (B, C, k, r) bool; None: no padding anywhere
        self.n_neighbours = torch.zeros(B, dtype=torch.long)  # (B,) chunks with neighbours
        self.fixed_chunks = 0  # chunks whose neighbours came with the call (neighbour_ids)
        self.chunk_states: torch.Tensor | None = None  # (B, T, D) the first RETRO layer's states
        self.encoded: torch.Tensor | None = None  # (B, C, k*r, d)
        self.encoded_mask: torch.Tensor | None = None  # (B, C, k*r) bool
        self.n_encoded = torch.zeros(B, dtype=torch.long)  # (B,) chunks encoded
        self._groups: list[tuple[int, Rows]] | None = None

    def groups(self) -> list[tuple[int, Rows]]:
        """(padding, rows) for each distinct left padding of the batch."""
        if self._groups is None:
            values = sorted(set(self.pads.tolist()))
            if len(values) == 1:
                self._groups = [(values[0], slice(None))]
            else:
                self._groups = [(v, torch.nonzero(self.pads == v).flatten()) for v in values]
        return self._groups

    def first_row(self, rows: Rows) -> int:
        return 0 if isinstance(rows, slice) else int(rows[0])

    def select(self, index: torch.Tensor) -> None:
        """Keeps rows ``index`` (B',) in that order (beam search's reordering)."""
        cpu = index.to("cpu")
        for name in ("pads", "n_neighbours", "n_encoded"):
            setattr(self, name, getattr(self, name).index_select(0, cpu))
        for name in ("tokens", "neighbour_ids", "neighbour_mask", "chunk_states", "encoded", "encoded_mask"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))
        self._groups = None

    def _grow(self, chunks: int) -> None:
        """Room for ``chunks`` chunks of neighbours (zeros beyond what is stored)."""
        have = 0 if self.neighbour_ids is None else self.neighbour_ids.shape[1]
        if chunks <= have:
            return
        self.neighbour_ids = F.pad(self.neighbour_ids, (0, 0, 0, 0, 0, chunks - have))
        if self.neighbour_mask is not None:
            self.neighbour_mask = F.pad(self.neighbour_mask, (0, 0, 0, 0, 0, chunks - have), value=True)

    def _set_mask(self, rows: Rows, lo: int, hi: int, mask: torch.Tensor | None) -> None:
        if mask is None and self.neighbour_mask is None:
            return
        if self.neighbour_mask is None:  # the first padded neighbours: every earlier one is all real tokens
            self.neighbour_mask = torch.ones(self.neighbour_ids.shape, dtype=torch.bool, device=self.neighbour_ids.device)
        self.neighbour_mask[rows, lo:hi] = True if mask is None else mask

    def set_fixed(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """The neighbours given with the call for chunks [0, C) of every row (B, C, k, r); a later call with
        the same number of chunks changes nothing (a chunk's neighbours are read once)."""
        C = ids.shape[1]
        if C <= self.fixed_chunks:
            return
        if self.neighbour_ids is None:
            self.neighbour_ids = ids
            self.neighbour_mask = mask
        else:
            self._grow(C)
            self.neighbour_ids[:, :C] = ids
            self._set_mask(slice(None), 0, C, mask)
        self.fixed_chunks = C
        self.n_neighbours = torch.maximum(self.n_neighbours, torch.full_like(self.n_neighbours, C))

    def add_chunk(self, rows: Rows, u: int, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Neighbours (R, k, r) of chunk ``u`` of ``rows``, retrieved when the chunk completed."""
        if self.neighbour_ids is None:
            B = len(self.pads)
            self.neighbour_ids = ids.new_zeros((B, u + 1, *ids.shape[1:]))
        self._grow(u + 1)
        self.neighbour_ids[rows, u] = ids
        self._set_mask(rows, u, u + 1, None if mask is None else mask[:, None])
        self.n_neighbours[rows] = u + 1

    def store_encoded(self, rows: Rows, lo: int, hi: int, encoded: torch.Tensor, mask: torch.Tensor | None) -> None:
        """encoded (R, hi - lo, k*r, d) neighbours of chunks [lo, hi) of ``rows``; mask (R, hi - lo, k*r)."""
        B = len(self.pads)
        if self.encoded is None and lo == 0 and isinstance(rows, slice):  # the common case: no copy
            self.encoded, self.encoded_mask = encoded, mask
        else:
            have = 0 if self.encoded is None else self.encoded.shape[1]
            if hi > have:
                grown = encoded.new_zeros((B, hi, *encoded.shape[2:]))
                if self.encoded is not None:
                    grown[:, :have] = self.encoded
                self.encoded = grown
                if self.encoded_mask is not None:
                    self.encoded_mask = F.pad(self.encoded_mask, (0, 0, 0, hi - have), value=True)
            self.encoded[rows, lo:hi] = encoded
            if mask is not None or self.encoded_mask is not None:
                if self.encoded_mask is None:
                    self.encoded_mask = torch.ones(self.encoded.shape[:3], dtype=torch.bool, device=encoded.device)
                self.encoded_mask[rows, lo:hi] = True if mask is None else mask
        self.n_encoded[rows] = hi


@dataclass
class RetroState:
    """What the hooks of one forward share: the retrieval memory, the absolute position of the forward's
    first token, whether the memory persists (a cached forward), and the token embedding that embeds
    neighbour tokens (the decoder's own)."""

    memory: RetroMemory
    chunk_length: int
    start: int = 0
    persistent: bool = False
    embed: nn.Module | None = None


class RetroContext:
    """Holder of the current forward's ``RetroState`` (None outside a forward with retrieval)."""

    def __init__(self) -> None:
        self.state: RetroState | None = None


def encode_chunks(layer: nn.Module, state: RetroState, hidden: torch.Tensor) -> None:
    """At the first RETRO layer: encodes the neighbours of every chunk that is complete (within the input
    and what the cache saw before), has neighbours and is not encoded yet, each conditioned on that
    chunk's states ``hidden`` (B, T_new, D) of this layer."""
    mem, m = state.memory, state.chunk_length
    if not state.persistent:  # a fresh forward (or its replay under activation checkpointing) encodes again
        mem.chunk_states, mem.encoded, mem.encoded_mask = hidden, None, None
        mem.n_encoded.zero_()
    else:
        mem.chunk_states = hidden if mem.chunk_states is None else torch.cat([mem.chunk_states, hidden], dim=1)
    total = state.start + hidden.shape[1]
    for pad, rows in mem.groups():
        first = mem.first_row(rows)
        lo = int(mem.n_encoded[first])
        hi = min(max(0, (total - pad) // m), int(mem.n_neighbours[first]))
        if hi <= lo:
            continue
        states = mem.chunk_states[rows, pad + lo * m: pad + hi * m]  # (R, U*m, D)
        R, D = states.shape[0], states.shape[-1]
        states = states.reshape(R, hi - lo, m, D)  # (R, U, m, D)
        embeds = state.embed(mem.neighbour_ids[rows, lo:hi])  # (R, U, k, r, D)
        mask = None if mem.neighbour_mask is None else mem.neighbour_mask[rows, lo:hi]  # (R, U, k, r)
        encoded = getattr(layer, ENCODER_ATTR)(embeds, states, mask)  # (R, U, k*r, d)
        mem.store_encoded(rows, lo, hi, encoded, None if mask is None else mask.reshape(R, hi - lo, -1))


def cca_update(layer: nn.Module, state: RetroState, hidden: torch.Tensor) -> torch.Tensor:
    """The CCA update (B, T_new, D) of ``layer`` for its states ``hidden`` (B, T_new, D) at absolute positions
    [start, start + T_new), each group of rows in its own frame (see :func:`span_update`)."""
    cca, mem = getattr(layer, CCA_ATTR), state.memory
    out = hidden.new_zeros(hidden.shape)
    if mem.encoded is None:
        return out
    for pad, rows in mem.groups():
        n_enc = int(mem.n_encoded[mem.first_row(rows)])
        kmask = None if mem.encoded_mask is None else mem.encoded_mask[rows]
        got = span_update(cca, hidden[rows], mem.encoded[rows], kmask, state.start - pad, n_enc, state.chunk_length)
        if got is None:
            continue
        a, b, update = got
        if isinstance(rows, slice) and a == 0 and b == hidden.shape[1]:
            out = update
        else:
            out[rows, a:b] = update
    return out


def _apply_cca(layer: nn.Module, state: RetroState, hidden: torch.Tensor) -> torch.Tensor:
    """The CCA update (B, T, D) of ``layer`` for its states ``hidden``; the first RETRO layer (the one with
    the encoder) first encodes the neighbours of newly complete chunks, conditioned on ``hidden``."""
    if hasattr(layer, ENCODER_ATTR):
        encode_chunks(layer, state, hidden)
    return cca_update(layer, state, hidden)


# -- attaching the blocks to a decoder ------------------------------------------------------------


class LayerLink:
    """A plain (unregistered) reference from a decoder layer's attention module to its layer, so the
    attention hook finds the layer's CCA block without making the layer a child of its own child.
    ``copy.deepcopy`` of the model maps it to the copied layer."""

    __slots__ = ("layer",)

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer


@dataclass
class LayerCall:
    """One call of a ``before_mlp`` RETRO layer: the forward's state and the layer's input h (B, T, D)."""

    state: RetroState
    hidden: torch.Tensor


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of a decoder layer (``self_attn`` of Llama-style layers, ``attn`` of GPT-2,
    ``attention`` of GPT-NeoX)."""
    for name in ATTENTION_ATTRS:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"`cca_placement: before_mlp` needs the decoder layer's self-attention module "
                     f"({' or '.join(ATTENTION_ATTRS)}); {type(layer).__name__} has none: use after_layer")


def attach_retro_blocks(layers: nn.ModuleList, config: RetroConfig, decoder_hidden: int,
                        context: RetroContext) -> list[Any]:
    """Adds ``retro_cca`` (and, on the first RETRO layer, ``retro_encoder``) to the decoder layers named by
    ``config.retro_layers`` and the hooks that apply them (see the module docstring); returns the handles."""
    handles = []
    first = min(config.retro_layers)
    for number in sorted(config.retro_layers):
        layer = layers[number - 1]
        setattr(layer, CCA_ATTR, ChunkedCrossAttention(config, decoder_hidden))
        if number == first:
            setattr(layer, ENCODER_ATTR, NeighbourEncoder(config, decoder_hidden))
        # the hooks read the context from their layer (not a closure), so a deep copy of the model gets its own
        layer.retro_context = context
        if config.cca_placement == "after_layer":
            handles.append(layer.register_forward_hook(_retro_layer_hook))
        else:
            attn = attention_module(layer)
            attn.retro_link = LayerLink(layer)
            layer.retro_call = None
            handles.append(layer.register_forward_pre_hook(_record_layer_input, with_kwargs=True))
            handles.append(attn.register_forward_hook(_cca_after_attention))
    return handles


def _retro_layer_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """``after_layer``: runs the encoder (first RETRO layer only) and CCA on a decoder layer's output."""
    state = module.retro_context.state
    if state is None:  # no retrieval in this forward: the layer is unchanged
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
    hidden = hidden + _apply_cca(module, state, hidden)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _record_layer_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """``before_mlp``: keeps the layer's input h (and the forward's state) for its attention hook.

    Kept until the layer's next call, not cleared after the forward: activation checkpointing
    replays the layer's forward (not this hook) during backward, when the forward's state is gone."""
    state = module.retro_context.state
    hidden = args[0] if args else kwargs.get("hidden_states")
    module.retro_call = None if state is None else LayerCall(state, hidden)


def _cca_after_attention(module: nn.Module, args: Any, output: Any) -> Any:
    """``before_mlp``: attn_out -> attn_out + CCA(h + attn_out), so the layer's residual becomes
    h + attn_out + CCA(h + attn_out) before its feed-forward."""
    layer = module.retro_link.layer
    call = layer.retro_call
    if call is None:  # no retrieval in this forward: the layer is unchanged
        return None
    attn_out = output[0] if isinstance(output, tuple) else output  # (B, T, D)
    # the first RETRO layer encodes on every uncached call, a checkpoint replay included, so the replay's ops match
    attn_out = attn_out + _apply_cca(layer, call.state, call.hidden + attn_out)
    return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out


# -- checking inputs and starting a forward with retrieval ----------------------------------------------------


def check_neighbour_ids(neighbour_ids: Any, batch_size: int, config: RetroConfig) -> torch.Tensor:
    """ValueError/TypeError unless ``neighbour_ids`` is an integer tensor (B, n_chunks, k, r) for this config."""
    if not isinstance(neighbour_ids, torch.Tensor):
        raise TypeError(f"`neighbour_ids` must be a torch.Tensor of token ids, got {type(neighbour_ids).__name__}")
    if neighbour_ids.dtype.is_floating_point or neighbour_ids.dtype == torch.bool:
        raise TypeError(f"`neighbour_ids` must hold integer token ids, got dtype {neighbour_ids.dtype}")
    k, r = config.num_neighbours, config.neighbour_length
    shape = tuple(neighbour_ids.shape)
    if neighbour_ids.ndim != 4 or shape[0] != batch_size or shape[2] != k or shape[3] != r or shape[1] < 1:
        raise ValueError(f"`neighbour_ids` must have shape (batch={batch_size}, n_chunks>=1, num_neighbours={k}, "
                         f"neighbour_length={r}), got {shape}")
    low, high = int(neighbour_ids.min()), int(neighbour_ids.max())
    if low < 0 or high >= config.vocab_size:
        raise ValueError(f"`neighbour_ids` must be token ids in [0, {config.vocab_size}) (the model's vocabulary), got "
                         f"values in [{low}, {high}]; were the neighbours tokenized with another tokenizer?")
    return neighbour_ids


def check_neighbour_mask(neighbour_mask: Any, neighbour_ids: torch.Tensor) -> torch.Tensor:
    """The padding mask (B, n_chunks, k, r) as bool (True = real token); ValueError if its shape is not
    neighbour_ids' or a neighbour is all padding (it would have nothing to attend to)."""
    if not isinstance(neighbour_mask, torch.Tensor):
        raise TypeError(f"`neighbour_attention_mask` must be a torch.Tensor, got {type(neighbour_mask).__name__}")
    if tuple(neighbour_mask.shape) != tuple(neighbour_ids.shape):
        raise ValueError(f"`neighbour_attention_mask` must have the shape of neighbour_ids {tuple(neighbour_ids.shape)}, "
                         f"got {tuple(neighbour_mask.shape)}")
    mask = neighbour_mask.to(device=neighbour_ids.device).bool()
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("`neighbour_attention_mask` leaves a neighbour with no tokens; every neighbour needs at least "
                         "one real token (a retrieved chunk is never empty)")
    return mask


def left_padding(attention_mask: torch.Tensor | None, batch_size: int) -> torch.Tensor:
    """(B,) tokens of left padding per row of a 2-D attention mask (zeros without one)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.zeros(batch_size, dtype=torch.long)
    return (attention_mask.long().cumsum(-1) == 0).sum(-1).cpu()


def retrieve_new_chunks(memory: RetroMemory, retriever: Callable, config: RetroConfig) -> None:
    """Calls ``retriever(chunk_ids (R, m), chunk_index, rows (R,))`` for every chunk that the tokens seen
    so far complete and that has no neighbours yet; it returns neighbour ids (R, k, r), or (ids, mask)."""
    m, T = config.chunk_length, memory.tokens.shape[1]
    all_rows = torch.arange(len(memory.pads))
    for pad, rows in memory.groups():
        complete = max(0, (T - pad) // m)
        for u in range(int(memory.n_neighbours[memory.first_row(rows)]), complete):
            query = memory.tokens[rows, pad + u * m: pad + (u + 1) * m]  # (R, m)
            got = retriever(query, u, all_rows[rows])
            ids, mask = got if isinstance(got, tuple) else (got, None)
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"the retriever must return neighbour ids as a torch.Tensor (R, k, r), got "
                                f"{type(ids).__name__}")
            ids = ids.to(memory.tokens.device)
            check_neighbour_ids(ids[:, None], query.shape[0], config)
            if mask is not None:
                mask = check_neighbour_mask(mask[:, None], ids[:, None])[:, 0]
            memory.add_chunk(rows, u, ids, mask)


def begin_retro_forward(config: RetroConfig, context: RetroContext, embed: nn.Module, *, input_ids: Any,
                        inputs_embeds: Any, attention_mask: Any, cache: Any, use_cache: bool | None,
                        neighbour_ids: Any, neighbour_mask: Any, retriever: Callable | None,
                        make_cache: Callable[[], Any]) -> tuple[Any, bool | None]:
    """Sets ``context.state`` for a forward (None when it has no retrieval); returns the (cache, use_cache)
    to run the decoder with.

    Without a cache (``use_cache`` not True and no ``cache``) the forward is self-contained: every chunk
    complete in the input that has neighbours is encoded from scratch. With one, the retrieval memory
    rides on the cache, so that a decoding step encodes only the chunk its token completes."""
    if neighbour_mask is not None and neighbour_ids is None:
        raise ValueError("`neighbour_attention_mask` was given without `neighbour_ids`")
    memory = getattr(cache, "retro_memory", None) if cache is not None else None
    if neighbour_ids is None and retriever is None and memory is None:
        context.state = None
        return cache, use_cache
    ref = input_ids if input_ids is not None else inputs_embeds
    B = ref.shape[0]
    if neighbour_ids is not None:
        check_neighbour_ids(neighbour_ids, B, config)
        neighbour_mask = None if neighbour_mask is None else check_neighbour_mask(neighbour_mask, neighbour_ids)
    if retriever is not None:
        if not callable(retriever):
            raise TypeError(f"`retriever` must be callable (chunk_ids, chunk_index, rows) -> neighbour ids, got "
                            f"{type(retriever).__name__}")
        if input_ids is None:
            raise ValueError("a `retriever` needs `input_ids` (its queries are the tokens of each complete chunk)")
    start = cache.get_seq_length() if cache is not None else 0
    persistent = use_cache is True or cache is not None
    if persistent:
        if cache is None:
            cache = make_cache()
        if memory is None or start == 0:
            if start > 0:
                raise ValueError("retrieval with a cache that was filled without it is not supported: the neighbour "
                                 "encoder needs the decoder states of whole chunks. Start from an empty cache (give "
                                 "`neighbour_ids` or `retriever` from the first forward) or use use_cache=False.")
            memory = RetroMemory(left_padding(attention_mask, B))
            cache.retro_memory = memory
        use_cache = True
    else:
        memory = RetroMemory(left_padding(attention_mask, B))
        use_cache = False
    if neighbour_ids is not None:
        memory.set_fixed(neighbour_ids, neighbour_mask)
    if retriever is not None:
        memory.tokens = input_ids if memory.tokens is None or not persistent else torch.cat([memory.tokens, input_ids], 1)
        retrieve_new_chunks(memory, retriever, config)
    context.state = RetroState(memory, config.chunk_length, start, persistent, embed)
    return cache, use_cache


def reorder_retro_cache(cache: Any, beam_idx: torch.Tensor) -> Any:
    """Beam search's reordering of the key/value cache and the retrieval memory riding on it."""
    cache.reorder_cache(beam_idx)
    memory = getattr(cache, "retro_memory", None)
    if memory is not None:
        memory.select(beam_idx)
    return cache


def zero_gated_projections(model: nn.Module, pending: list[nn.Module]) -> None:
    from transformers import initialization as hf_init

    for proj in pending:
        hf_init.zeros_(proj.weight)  # gated: start equal to the model without retrieval


def pending_gated_projections(model: nn.Module) -> list[nn.Module]:
    """The gated CCA output projections transformers has not initialised yet (see ``initialize_weights``)."""
    return [m.attn.o_proj for m in model.modules() if isinstance(m, ChunkedCrossAttention) and m.gated
            and not getattr(m.attn.o_proj, "_is_hf_initialized", False)]


# -- the from-scratch model ---------------------------------------------------------------------


class RetroPreTrainedModel(PreTrainedModel):
    config_class = RetroConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation, then the gated CCA output projections back to zero.

        The CCA blocks hang inside the decoder (``self.model``, a ``LlamaModel``), and transformers
        initialises a sub-model's modules with that sub-model's own ``_init_weights``, which knows
        nothing of CCA and draws ``o_proj`` from N(0, initializer_range): an ``_init_weights``
        branch here would never be reached. ``transformers.initialization.zeros_`` skips tensors
        already loaded from a checkpoint, so ``from_pretrained`` keeps trained projections and only
        a missing one starts at zero; like transformers, a projection initialised once (its module
        flagged ``_is_hf_initialized``) is left alone by a later call.
        """
        pending = pending_gated_projections(self)
        super().initialize_weights()
        zero_gated_projections(self, pending)

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        return reorder_retro_cache(cache, beam_idx)


class RetroForCausalLM(RetroPreTrainedModel, GenerationMixin):
    """A Llama-style decoder (transformers' ``LlamaModel``) with a neighbour encoder and CCA blocks.

    ``forward(input_ids, neighbour_ids=None, labels=None, retriever=None, ...)``: ``neighbour_ids``
    (B, n_chunks, k, r) the neighbours of the first chunks; ``retriever`` a callable fetching the
    neighbours of later chunks as they complete; neither runs the plain decoder (CCA skipped).
    ``generate`` takes both as model kwargs and decodes with a key/value cache (see the module docstring).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # tied when config.tie_word_embeddings

    def __init__(self, config: RetroConfig) -> None:
        super().__init__(config)
        self.model = LlamaModel(decoder_config(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.retro_context = RetroContext()
        attach_retro_blocks(self.model.layers, config, config.hidden_size, self.retro_context)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, neighbour_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Any = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, neighbour_attention_mask: torch.Tensor | None = None,
                retriever: Callable | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """neighbour_ids (B, n_chunks, k, r) token ids of the neighbours of the first chunks of each row;
        neighbour_attention_mask (B, n_chunks, k, r): 1 for real tokens, 0 for padding (a continuation cut
        short at a document's end); retriever: ``(chunk_ids (R, m), chunk_index, rows (R,)) -> (R, k, r)``
        ids (or ids and mask) for each later chunk once it is complete. Chunks count from each row's
        first real token (``attention_mask``'s left padding)."""
        if "past_key_values" in kwargs:  # transformers' old name of the cache
            cache = kwargs.pop("past_key_values")
        cache, use_cache = begin_retro_forward(
            self.config, self.retro_context, self.model.embed_tokens, input_ids=input_ids, inputs_embeds=inputs_embeds,
            attention_mask=attention_mask, cache=cache, use_cache=use_cache, neighbour_ids=neighbour_ids,
            neighbour_mask=neighbour_attention_mask, retriever=retriever,
            make_cache=lambda: DynamicCache(config=self.model.config))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        finally:
            self.retro_context.state = None
        hidden = out.last_hidden_state  # (B, T, D)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])  # (B, T_kept, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


def decoder_config(config: RetroConfig) -> LlamaConfig:
    """The LlamaConfig of a RetroConfig's decoder."""
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, initializer_range=config.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        tie_word_embeddings=False, attn_implementation=config._attn_implementation)


# -- RETROfit: a pretrained decoder with RETRO blocks ----------------------------------------------------------


# where each supported family keeps its decoder layers (attribute path from the causal-LM class)
DECODER_LAYERS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
                  "qwen3": "model.layers", "gemma": "model.layers", "gemma2": "model.layers",
                  "gemma3_text": "model.layers", "phi3": "model.layers", "olmo2": "model.layers",
                  "smollm3": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}
RETRO_KEYS = (f".{CCA_ATTR}.", f".{ENCODER_ATTR}.")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported Hugging Face causal LM; ValueError naming the family otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_LAYERS.get(model_type)
    if path is None:
        raise ValueError(f"RETROfit supports Hugging Face causal LMs of model_type {', '.join(sorted(DECODER_LAYERS))}; "
                         f"got {type(model).__name__} with model_type {model_type!r}")
    layers: Any = model
    for name in path.split("."):
        layers = getattr(layers, name, None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} (model_type {model_type!r}) has no decoder layers at `{path}`: is it "
                         "the causal-LM class (e.g. LlamaForCausalLM, GPT2LMHeadModel)?")
    return layers


def is_retro_key(name: str) -> bool:
    return any(key in name for key in RETRO_KEYS)


def base_weights_sha256(model: nn.Module) -> str:
    """sha256 of a model's own weights (names, shapes and float32 values in name order; RETRO blocks left
    out), so a base model is recognised whatever file format or lossless dtype it was stored in."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if is_retro_key(name):
            continue
        t = tensor.detach()
        t = (t.float() if t.is_floating_point() else t).contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class RetrofitForCausalLM(PreTrainedModel, GenerationMixin):
    """A pretrained Hugging Face decoder (``self.base``, frozen) with a neighbour encoder and CCA blocks on
    the layers ``config.retro_layers`` names, gated to start exactly equal to the base.

    ``forward`` and ``generate`` take ``neighbour_ids`` / ``neighbour_attention_mask`` / ``retriever`` as
    :class:`RetroForCausalLM` does; without them it is the base model. A directory saved with only the RETRO
    weights (``config.weights == "retro"``) loads them onto the base it names, after checking the base's
    weights against the recorded sha256.
    """

    config_class = RetrofitConfig
    base_model_prefix = "base"
    _supports_sdpa = True
    supports_gradient_checkpointing = True
    # the base's top-level module, reachable as an attribute of the wrapper (model.model, model.transformer)
    _BASE_ATTRS = ("model", "transformer", "gpt_neox")

    def __init__(self, config: RetrofitConfig, base: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        from transformers import AutoModelForCausalLM

        self.retro_config = config.get_retro_config()
        if base is None:
            base = AutoModelForCausalLM.from_config(config.get_base_config())
        layers = decoder_layers(base)
        if any(hasattr(layer, CCA_ATTR) for layer in layers):
            raise ValueError(f"{type(base).__name__} already carries RETRO blocks; start from a fresh base model")
        for p in base.parameters():  # RETROfit trains the new blocks only
            p.requires_grad_(False)
        self.base = base
        self.retro_context = RetroContext()
        attach_retro_blocks(layers, self.retro_config, self.retro_config.hidden_size, self.retro_context)
        ref = next(base.parameters())
        for layer in layers:  # the new blocks on the base's device and dtype
            for name in (CCA_ATTR, ENCODER_ATTR):
                if hasattr(layer, name):
                    getattr(layer, name).to(device=ref.device, dtype=ref.dtype)
        if getattr(base, "generation_config", None) is not None:
            self.generation_config = copy.deepcopy(base.generation_config)
        self.post_init()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in RetrofitForCausalLM._BASE_ATTRS and "base" in self._modules:
                return getattr(self._modules["base"], name)
            raise

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialisation of what is not loaded, then the gated CCA projections at zero."""
        pending = pending_gated_projections(self)
        super().initialize_weights()
        zero_gated_projections(self, pending)

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def get_decoder(self) -> nn.Module:
        return self.base.get_decoder()

    def _reorder_cache(self, cache: Any, beam_idx: torch.Tensor) -> Any:
        return reorder_retro_cache(cache, beam_idx)

    def forward(self, input_ids: torch.LongTensor | None = None, neighbour_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache: Any = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, neighbour_attention_mask: torch.Tensor | None = None,
                retriever: Callable | None = None, **kwargs: Any) -> Any:
        """As :meth:`RetroForCausalLM.forward`; the base model's own outputs (logits, loss, cache)."""
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        cache, use_cache = begin_retro_forward(
            self.retro_config, self.retro_context, self.base.get_input_embeddings(), input_ids=input_ids,
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, use_cache=use_cache,
            neighbour_ids=neighbour_ids, neighbour_mask=neighbour_attention_mask, retriever=retriever,
            make_cache=lambda: DynamicCache(config=self.base.config))
        try:
            return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                             inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                             logits_to_keep=logits_to_keep, **kwargs)
        finally:
            self.retro_context.state = None

    def retro_state_dict(self) -> dict[str, torch.Tensor]:
        """The RETRO blocks' tensors, named as in the base model (``model.layers.3.retro_cca...``)."""
        return {name: t for name, t in self.base.state_dict().items() if is_retro_key(name)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, base_model: Any = None,
                        **kwargs: Any) -> "RetrofitForCausalLM":
        """transformers' ``from_pretrained``; for a directory of RETRO weights alone (``config.weights ==
        "retro"``) the base model comes from ``base_model`` (a model, a directory or a hub id) or the one
        the config records, and must have the recorded weights' sha256."""
        config = kwargs.get("config")
        hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        if not isinstance(config, RetrofitConfig):
            config = RetrofitConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        if config.weights != "retro":
            if base_model is not None:
                raise ValueError(f"{pretrained_model_name_or_path} holds the whole model; `base_model` is only for a "
                                 "directory of RETRO weights alone")
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return cls._from_retro_weights(str(pretrained_model_name_or_path), config, base_model, kwargs, hub)

    @classmethod
    def _from_retro_weights(cls, path: str, config: RetrofitConfig, base_model: Any, kwargs: dict,
                            hub: dict) -> "RetrofitForCausalLM":
        import os

        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        if isinstance(base_model, nn.Module):
            base, where = base_model, type(base_model).__name__
        else:
            where = base_model or (config.base_model_path if config.base_model_path and os.path.isdir(config.base_model_path)
                                   else config.base_model_name)
            if not where:
                raise ValueError(f"{path} holds RETRO weights alone and names no base model: pass base_model=...")
            load_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype", "device_map") if k in kwargs}
            base = AutoModelForCausalLM.from_pretrained(where, **load_kwargs)
        if config.base_model_sha256:
            got = base_weights_sha256(base)
            if got != config.base_model_sha256:
                raise ValueError(f"the base model {where} has weights sha256 {got[:16]}..., but the RETRO weights in "
                                 f"{path} belong to {config.base_model_name!r} with sha256 "
                                 f"{config.base_model_sha256[:16]}...: load them onto that base (base_model=...)")
        model = cls(config, base=base)
        if os.path.isdir(path):
            weights = os.path.join(path, RETRO_WEIGHTS_FILE)
        else:
            from huggingface_hub import hf_hub_download

            weights = hf_hub_download(path, RETRO_WEIGHTS_FILE, **hub)
        tensors = load_file(weights)
        own = {f"base.{name}" for name in model.retro_state_dict()}
        if set(tensors) != own:
            raise ValueError(f"the RETRO weights in {path} do not fit this model: missing {sorted(own - set(tensors))[:3]}, "
                             f"unexpected {sorted(set(tensors) - own)[:3]}")
        model.load_state_dict(tensors, strict=False)
        return model.eval()


RETRO_WEIGHTS_FILE = "model.safetensors"
