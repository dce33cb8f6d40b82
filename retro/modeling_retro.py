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
  and RETROfit of Hugging Face Llama and GPT-2 models (``retromem.retro.retrofit``).
* ``gated`` configs start every CCA output projection at zero, so the model with retrieval starts
  exactly equal to the model without it.

Chunk boundaries count from position 0 of the input, so inputs with neighbours must not be
left-padded. Neighbours cut short (a continuation at a document's end) are padded and masked with
``neighbour_attention_mask``. Key/value caching across generation steps with neighbours is not
supported yet: with neighbours, a forward must see the whole sequence (``use_cache=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, LlamaConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaRMSNorm, apply_rotary_pos_emb

from .configuration_retro import RetroConfig

CCA_ATTR = "retro_cca"
ENCODER_ATTR = "retro_encoder"
# the self-attention module of a decoder layer: Llama-style, then GPT-2
ATTENTION_ATTRS = ("self_attn", "attn")


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
    """CCA with the causal shift: returns the residual update (B, T, D) for decoder states (B, T, D)."""

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

    def forward(self, hidden: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, D) decoder states from position 0; encoded (B, C, k*r, d) neighbours of the first
        C chunks (C <= T // m, all complete); mask (B, C, k*r) bool, False = padding."""
        B, T, D = hidden.shape
        C, m = encoded.shape[1], self.chunk_length
        out = hidden.new_zeros(B, T, D)
        if C == 0:
            return out
        # span u = positions [u*m + m - 1, u*m + 2m - 1): shift by m - 1, pad the last span to m tokens
        shifted = hidden[:, m - 1: m - 1 + C * m]  # (B, <=C*m, D)
        n = shifted.shape[1]
        shifted = F.pad(shifted, (0, 0, 0, C * m - n))  # (B, C*m, D)
        q = self.norm(shifted).view(B * C, m, D)  # (B*C, m, D)
        key_mask = None if mask is None else mask.reshape(B * C, -1)  # (B*C, k*r)
        positions = None
        if self.relative_positions:
            # span offset i sits at m - 1 + i in the retrieving chunk's frame; neighbour token j at j
            r = self.neighbour_length
            k_pos = torch.arange(r, device=hidden.device).repeat(encoded.shape[2] // r)  # (k*r,)
            positions = (torch.arange(m, device=hidden.device) + m - 1, k_pos)
        attended = self.attn(q, encoded.reshape(B * C, encoded.shape[2], -1), key_mask=key_mask,
                             positions=positions)  # (B*C, m, D)
        out[:, m - 1: m - 1 + n] = attended.view(B, C * m, D)[:, :n]
        return out


# -- attaching the blocks to a decoder ------------------------------------------------------------


@dataclass
class RetroState:
    """What the hooks of one forward pass share: neighbour token embeddings (B, C, k, r, D), their
    padding mask (B, C, k, r) (None: no padding) and, once the first RETRO layer has run, the
    encoded neighbours (B, C_complete, k*r, d)."""

    neighbour_embeds: torch.Tensor
    neighbour_mask: torch.Tensor | None = None
    encoded: torch.Tensor | None = None


class RetroContext:
    """Holder of the current forward's ``RetroState`` (None outside a forward with neighbours)."""

    def __init__(self) -> None:
        self.state: RetroState | None = None


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
    """The self-attention module of a decoder layer (``self_attn`` of Llama-style layers, ``attn`` of GPT-2)."""
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


def _apply_cca(layer: nn.Module, state: RetroState, hidden: torch.Tensor, encode: bool) -> torch.Tensor:
    """The CCA update (B, T, D) of ``layer`` for decoder states ``hidden`` (B, T, D); with ``encode`` (the
    first RETRO layer) the neighbours are encoded first, conditioned on ``hidden``'s chunks."""
    chunk_length = getattr(layer, CCA_ATTR).chunk_length
    if encode:
        B, T, D = hidden.shape
        # only chunks complete within the input can be attended; later neighbours are not encoded
        C = min(state.neighbour_embeds.shape[1], T // chunk_length)
        chunk_states = hidden[:, : C * chunk_length].reshape(B, C, chunk_length, D)  # (B, C, m, D)
        mask = None if state.neighbour_mask is None else state.neighbour_mask[:, :C]  # (B, C, k, r)
        state.encoded = getattr(layer, ENCODER_ATTR)(state.neighbour_embeds[:, :C], chunk_states, mask)  # (B, C, k*r, d)
    cca_mask = None
    if state.neighbour_mask is not None:
        C = state.encoded.shape[1]
        cca_mask = state.neighbour_mask[:, :C].reshape(hidden.shape[0], C, -1)  # (B, C, k*r)
    return getattr(layer, CCA_ATTR)(hidden, state.encoded, cca_mask)


def _retro_layer_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """``after_layer``: runs the encoder (first RETRO layer only) and CCA on a decoder layer's output."""
    state = module.retro_context.state
    if state is None:  # no retrieval in this forward: the layer is unchanged
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
    hidden = hidden + _apply_cca(module, state, hidden, encode=state.encoded is None)
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
    # the first RETRO layer encodes on every call, a checkpoint replay included, so the replay's ops match
    attn_out = attn_out + _apply_cca(layer, call.state, call.hidden + attn_out, encode=hasattr(layer, ENCODER_ATTR))
    return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out


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


def check_no_cache_with_neighbours(past_key_values: Any) -> None:
    if past_key_values is not None and past_key_values.get_seq_length() > 0:
        raise ValueError("`neighbour_ids` with a non-empty `past_key_values` is not supported: the neighbour encoder "
                         "needs the decoder states of whole chunks. Run the whole sequence (use_cache=False).")


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
        from transformers import initialization as hf_init

        pending = [m.attn.o_proj for m in self.modules() if isinstance(m, ChunkedCrossAttention) and m.gated
                   and not getattr(m.attn.o_proj, "_is_hf_initialized", False)]
        super().initialize_weights()
        for proj in pending:
            hf_init.zeros_(proj.weight)  # gated: start equal to the model without retrieval


class RetroForCausalLM(RetroPreTrainedModel, GenerationMixin):
    """A Llama-style decoder (transformers' ``LlamaModel``) with a neighbour encoder and CCA blocks.

    ``forward(input_ids, neighbour_ids=None, labels=None)``: ``neighbour_ids`` (B, n_chunks, k, r);
    None runs the plain decoder (CCA skipped). ``generate`` accepts ``neighbour_ids`` as a fixed
    model kwarg (then every step re-reads the whole sequence) or none (ordinary cached decoding).
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
                past_key_values: Any = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, neighbour_attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """neighbour_ids (B, n_chunks, k, r) token ids of the neighbours of each chunk of the input;
        neighbour_attention_mask (B, n_chunks, k, r): 1 for real tokens, 0 for padding (a continuation cut
        short at a document's end); None: no padding."""
        if neighbour_attention_mask is not None and neighbour_ids is None:
            raise ValueError("`neighbour_attention_mask` was given without `neighbour_ids`")
        if neighbour_ids is not None:
            ref = input_ids if input_ids is not None else inputs_embeds
            check_neighbour_ids(neighbour_ids, ref.shape[0], self.config)
            check_no_cache_with_neighbours(past_key_values)
            use_cache = False
            mask = None if neighbour_attention_mask is None else check_neighbour_mask(neighbour_attention_mask, neighbour_ids)
            self.retro_context.state = RetroState(self.model.embed_tokens(neighbour_ids), mask)  # (B, C, k, r, D)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             **kwargs)
        finally:
            self.retro_context.state = None
        hidden = out.last_hidden_state  # (B, T, D)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])  # (B, T_kept, V)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Any = None,
                                      neighbour_ids: torch.LongTensor | None = None,
                                      neighbour_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        if neighbour_ids is None:
            return super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        # fixed neighbours: no key/value cache (see the module docstring), so every step reads the whole sequence
        return {"input_ids": input_ids, "neighbour_ids": neighbour_ids, "attention_mask": kwargs.get("attention_mask"),
                "neighbour_attention_mask": neighbour_attention_mask, "use_cache": False}


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
