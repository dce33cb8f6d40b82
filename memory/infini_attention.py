"""Infini-attention (Munkhdalai et al. 2024) as a drop-in replacement for the attention of Hugging
Face decoders (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Phi-3, GPT-NeoX, GPT-2).

The input is processed in segments of ``segment_length`` tokens. Inside a segment every layer runs
its ordinary causal attention; across segments each layer carries a compressive memory per
key/value head, ``M`` (d x d) and a normaliser ``z`` (d), with σ = ELU + 1:

    read    A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1})
    linear  M_s = M_{s-1} + σ(K)ᵀ V                         z_s = z_{s-1} + Σ_t σ(K_t)
    delta   M_s = M_{s-1} + σ(K)ᵀ (V − σ(K) M_{s-1} / (σ(K) z_{s-1}))
    output  A = g ⊙ A_mem + (1 − g) ⊙ A_local,  g = sigmoid(β), one β per query head

The memory ablation (gate mode "knockout") zeroes the read and keeps the gate: A = (1 − g) ⊙ A_local,
so an input that fits in one segment (empty memory, A_mem = 0) is unchanged; plain A_local (mode
"local") also removes the gate's damping and is the base model, not a memory ablation.

The memory path uses the layer's own Q, K, V *before* the rotary embedding, so memory carries no
positions, and positions (RoPE, or GPT-2's learned ones) restart at 0 in every segment (no position
ever exceeds the segment length, whatever the input length). The state is O(layers · kv_heads · d²)
whatever the input length. With grouped-query attention the memory lives per key/value head (that
is where K and V live) and the query heads of a group read it, each with its own gate.

Each segment's write is a sum over its tokens of terms that depend only on the token and on
M_{s-1}, so it is accumulated token by token (``InfiniMemory.dM``) and added when the segment is
complete: generation with a cache (the memory, the pending write and the open segment's keys and
values) computes what a pass over the whole text computes.

The wrapper keeps the base model's own attention module (``self_attn.inner``: its projections,
kernel, sliding window, soft-capping) and reads Q, K, V from its projections and A_local from the
input of its output projection through hooks installed for the duration of one call; per family
``FAMILIES`` names those submodules.

Guards against the failures of open implementations:
- β starts at ``gate_init`` (default −2: g ≈ 0.12, dg/dβ ≈ 0.10) and |gate_init| > 6 is refused,
  so the gate is never born saturated (−100 gives zero gradient forever);
- memory is detached only every ``bptt_segments`` segments (None: never), so the write path
  (K, V projections through M and z) gets gradient from later segments;
- every layer owns its own state; nothing is shared across layers;
- β is a named parameter (``*.memory_gate``, in the module ``*.infini_gate``) that the trainer puts
  in its own parameter group with its own learning rate and no weight decay, and that peft trains
  and saves with ``modules_to_save=list(InfiniAttentionLM.memory_modules)``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin
from transformers.modeling_outputs import ModelOutput

from .common import (MEMORY_CONFIG_FILE, MemoryCache, MemoryPreTrainedModel, NestedBaseConfig, SegmentLoss,
                     UnsupportedModelError, check_architecture, check_input_ids, fail, is_int, is_number, keep_mode,
                     number, one_of, positive_int, run_lanes)

logger = logging.getLogger(__name__)

GATE_PARAM = "memory_gate"
MAX_ABS_GATE_INIT = 6.0  # sigmoid'(6) ≈ 0.0025: past this the gate learns too slowly to matter
GateMode = Literal["learned", "knockout", "local", "memory"]
GATE_MODES = ("learned", "knockout", "local", "memory")


@dataclass(frozen=True)
class Family:
    """Where a decoder family keeps what the wrapper needs.

    layers: path of the decoder layers in the causal LM; attn: the attention's name in a layer;
    proj: the modules whose outputs are Q, K, V before positions (one fused module: ``fused`` says
    how Q, K, V lie in its output: "concat" [Q | K | V], or "per_head" [q k v] per head, GPT-NeoX);
    out: the output projection, whose input is A_local (B, T, H·d); cache_kw: the attention's
    keyword for its key/value cache; max_positions: the config field bounding positions, if any."""

    layers: str
    attn: str
    proj: tuple[str, ...]
    out: str
    fused: str | None = None
    cache_kw: str = "cache"
    max_positions: str | None = None


_LLAMA_LIKE = Family("model.layers", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    # Qwen3 normalises q and k per head before RoPE: the memory reads them after that norm
    "qwen3": Family("model.layers", "self_attn", ("q_norm", "k_norm", "v_proj"), "o_proj"),
    "phi3": Family("model.layers", "self_attn", ("qkv_proj",), "o_proj", fused="concat"),
    "gpt_neox": Family("gpt_neox.layers", "attention", ("query_key_value",), "dense", fused="per_head",
                       cache_kw="layer_past"),
    "gpt2": Family("transformer.h", "attn", ("c_attn",), "c_proj", fused="concat", max_positions="n_positions"),
}
SUPPORTED_MODEL_TYPES = set(FAMILIES)


@dataclass(frozen=True)
class InfiniAttentionConfig:
    """Settings of the Infini-attention wrapper.

    segment_length: tokens per segment (local attention span; memory is written once per segment).
    update: "linear" or "delta" memory update.
    bptt_segments: memory is detached after every this many segments (the backpropagation-through-
        time window); None keeps the whole graph (full BPTT, the paper's setting).
    gate_init: initial β of every head; g = sigmoid(β) is the weight of the memory read.
    eps: added to the normaliser so an empty memory reads as zero rather than NaN.
    """

    segment_length: int = 2048
    update: Literal["linear", "delta"] = "delta"
    bptt_segments: int | None = 2
    gate_init: float = -2.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        positive_int(self.segment_length, "infini.segment_length", flag="--segment-length")
        one_of(self.update, "infini.update", ("linear", "delta"))
        if self.bptt_segments is not None and (not is_int(self.bptt_segments) or self.bptt_segments < 1):
            fail("infini.bptt_segments", "be a positive integer or null (full BPTT)", self.bptt_segments)
        if not is_number(self.gate_init) or abs(self.gate_init) > MAX_ABS_GATE_INIT:
            fail("infini.gate_init", f"be a number in [-{MAX_ABS_GATE_INIT}, {MAX_ABS_GATE_INIT}] so that the gate has "
                 f"gradient (sigmoid saturates beyond)", self.gate_init)
        number(self.eps, "infini.eps", gt=0)


@dataclass
class InfiniMemory:
    """The state of every layer: the compressive memory ``M[l]`` (B, H_kv, d, d) and ``z[l]``
    (B, H_kv, d) as of the last complete segment, the open segment's pending write ``dM``, ``dz``
    (added when it completes), and, while generating with a cache, the open segment's keys and
    values after positions ``local_k[l]``, ``local_v[l]`` (B, H_kv, open_tokens, d).

    ``write`` False makes a forward read the memory without adding to it.
    """

    M: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    dM: dict[int, torch.Tensor] = field(default_factory=dict)
    dz: dict[int, torch.Tensor] = field(default_factory=dict)
    local_k: dict[int, torch.Tensor] = field(default_factory=dict)
    local_v: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens_seen: int = 0
    segments_seen: int = 0
    open_tokens: int = 0  # tokens of the open (incomplete) segment
    write: bool = True
    keep_local: bool = False  # keep the open segment's keys and values (generation with a cache)

    def get(self, layer: int, batch: int, heads: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.M:
            # fp32 state: z is a running sum over all tokens and would lose precision in bf16
            self.M[layer] = torch.zeros(batch, heads, dim, dim, device=like.device, dtype=torch.float32)
            self.z[layer] = torch.zeros(batch, heads, dim, device=like.device, dtype=torch.float32)
        return self.M[layer], self.z[layer]

    def add_write(self, layer: int, dM: torch.Tensor, dz: torch.Tensor) -> None:
        self.dM[layer] = dM if layer not in self.dM else self.dM[layer] + dM
        self.dz[layer] = dz if layer not in self.dz else self.dz[layer] + dz

    def commit(self) -> None:
        """The open segment is complete: add its write to the memory and drop its local keys/values."""
        for layer, dM in self.dM.items():
            self.M[layer] = self.M[layer] + dM
            self.z[layer] = self.z[layer] + self.dz[layer]
        self.dM, self.dz, self.local_k, self.local_v = {}, {}, {}, {}
        if self.open_tokens:
            self.segments_seen += 1
        self.open_tokens = 0

    def detach_(self) -> "InfiniMemory":
        self.M = {k: v.detach() for k, v in self.M.items()}
        self.z = {k: v.detach() for k, v in self.z.items()}
        return self

    def select_(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (beam search)."""
        for name in ("M", "z", "dM", "dz", "local_k", "local_v"):
            setattr(self, name, {k: v.index_select(0, idx.to(v.device)) for k, v in getattr(self, name).items()})

    def clone(self) -> "InfiniMemory":
        # tensors are replaced, never written in place, so new dicts over the same tensors suffice
        return InfiniMemory(**{**self.__dict__, **{n: dict(getattr(self, n)) for n in
                                                   ("M", "z", "dM", "dz", "local_k", "local_v")}})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.M, self.z, self.dM, self.dz, self.local_k, self.local_v)
                   for t in d.values())

    def save(self, path: Any) -> None:
        """Write the state (safetensors) so that a stream can be resumed later (not the local keys/values)."""
        from safetensors.torch import save_file

        tensors = {f"{kind}.{k}": v.detach().contiguous().cpu()
                   for kind in ("M", "z", "dM", "dz") for k, v in getattr(self, kind).items()}
        save_file(tensors, str(path), metadata={"tokens_seen": str(self.tokens_seen),
                                                "segments_seen": str(self.segments_seen),
                                                "open_tokens": str(self.open_tokens)})

    @classmethod
    def load(cls, path: Any, device: str | torch.device = "cpu") -> "InfiniMemory":
        from safetensors import safe_open

        mem = cls()
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():
                kind, layer = key.split(".")
                getattr(mem, kind)[int(layer)] = fh.get_tensor(key)
        mem.tokens_seen = int(meta.get("tokens_seen", 0))
        mem.segments_seen = int(meta.get("segments_seen", 0))
        mem.open_tokens = int(meta.get("open_tokens", 0))
        return mem


def _sigma(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part)
    return module


class _OpenSegmentKV:
    """The key/value cache handed to the base model's attention: the open segment's keys and values
    (after positions) in ``memory``, extended by each call (kept only while generating with a cache)."""

    def __init__(self, memory: InfiniMemory) -> None:
        self.memory = memory

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        mem = self.memory
        if layer_idx in mem.local_k:
            key_states = torch.cat([mem.local_k[layer_idx], key_states], dim=2)  # (B, Hkv, S + T, d)
            value_states = torch.cat([mem.local_v[layer_idx], value_states], dim=2)
        if mem.keep_local:
            mem.local_k[layer_idx], mem.local_v[layer_idx] = key_states, value_states
        return key_states, value_states


class MemoryGate(nn.Module):
    """β of every query head; ``forward()`` is g = sigmoid(β). Its own module so that peft can train
    and save it (``modules_to_save=["infini_gate"]``)."""

    _is_memory_module = True

    def __init__(self, heads: int, init: float) -> None:
        super().__init__()
        self.memory_gate = nn.Parameter(torch.full((heads,), float(init)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.memory_gate)


class InfiniAttention(nn.Module):
    """One layer's attention: the base model's attention module (``inner``), plus memory and gate."""

    def __init__(self, attn: nn.Module, cfg: InfiniAttentionConfig, family: Family, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.inner = attn
        self.family = family
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = (getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
                         or config.hidden_size // self.num_heads)
        # Qwen2 / Qwen3 / Gemma2 set the window per layer on the attention module; Mistral reads it from the config
        self.sliding_window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        self.infini = cfg
        self.infini_gate = MemoryGate(self.num_heads, cfg.gate_init)
        self.gate_mode: GateMode = "learned"

    @property
    def memory_gate(self) -> nn.Parameter:
        """β (H,): the gate's parameter."""
        return self.infini_gate.memory_gate

    def __getattr__(self, name: str) -> Any:
        # the wrapped attention's own parts (q_proj, k_proj, ...) stay reachable as attributes of the layer's attention
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        memory: InfiniMemory | None = kwargs.pop("infini_memory", None)
        if memory is None or (self.gate_mode == "local" and not memory.keep_local):
            return self.inner(hidden_states, *args, **kwargs)
        B, T = hidden_states.shape[:2]
        past = memory.local_k[self.layer_idx].shape[2] if self.layer_idx in memory.local_k else 0
        kwargs[self.family.cache_kw] = _OpenSegmentKV(memory)
        if past:
            kwargs["attention_mask"] = self._mask_with_past(past, T, hidden_states)
        if self.gate_mode == "local":
            return self.inner(hidden_states, *args, **kwargs)
        captured: list[torch.Tensor] = []
        hooks = []
        if self.gate_mode != "knockout":
            for name in self.family.proj:
                hooks.append(_get(self.inner, name).register_forward_hook(lambda mod, inp, out: captured.append(out)))
        out_proj = _get(self.inner, self.family.out)
        hooks.append(out_proj.register_forward_pre_hook(
            lambda mod, inp: (self._mix(inp[0], captured, memory), *inp[1:])))
        try:
            return self.inner(hidden_states, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    def _mask_with_past(self, past: int, T: int, like: torch.Tensor) -> torch.Tensor:
        """Additive mask (1, 1, T, past + T): new token i sees the open segment's ``past`` keys and the
        new tokens up to itself, within the sliding window if the layer has one."""
        q = torch.arange(T, device=like.device).unsqueeze(1) + past  # (T, 1) positions in the segment
        k = torch.arange(past + T, device=like.device).unsqueeze(0)  # (1, S + T)
        ok = k <= q
        if self.sliding_window:
            ok = ok & (q - k < self.sliding_window)
        mask = torch.zeros(T, past + T, dtype=like.dtype, device=like.device)
        return mask.masked_fill(~ok, torch.finfo(like.dtype).min)[None, None]

    def _qkv(self, captured: list[torch.Tensor], B: int, T: int) -> tuple[torch.Tensor, ...]:
        """Q (B, H, T, d), K and V (B, Hkv, T, d) before positions, from the projections' outputs."""
        d, H, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        if self.family.fused == "concat":
            q, k, v = captured[0].split([H * d, Hkv * d, Hkv * d], dim=-1)
        elif self.family.fused == "per_head":
            q, k, v = captured[0].view(B, T, H, 3 * d).chunk(3, dim=-1)  # GPT-NeoX: [q k v] per head
        else:
            q, k, v = captured
        return tuple(x.reshape(B, T, -1, d).transpose(1, 2) for x in (q, k, v))

    def _mix(self, local: torch.Tensor, captured: list[torch.Tensor], memory: InfiniMemory) -> torch.Tensor:
        """The output projection's input: g ⊙ A_mem + (1 − g) ⊙ A_local per head, (B, T, H·d)."""
        B, T, _ = local.shape
        H, d = self.num_heads, self.head_dim
        local = local.view(B, T, H, d)
        g = self.infini_gate().to(local.dtype).view(1, 1, H, 1)
        if self.gate_mode == "knockout":
            # the memory read is zeroed and nothing else changes: g * 0 + (1 - g) * A_local. With an
            # empty memory A_mem is exactly 0 (0 / eps), so the first segment is bitwise the same as
            # with memory on; plain A_local ("local") would also drop the gate's damping of local attention.
            return ((1 - g) * local).reshape(B, T, H * d)
        q, k, v = self._qkv(captured, B, T)
        a_mem = self._read_write(q, k, v, memory).to(local.dtype)  # (B, T, H, d)
        if self.gate_mode == "memory":
            return a_mem.reshape(B, T, H * d)
        return (g * a_mem + (1 - g) * local).reshape(B, T, H * d)

    def _read_write(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: InfiniMemory) -> torch.Tensor:
        B, H, T, d = q.shape
        Hkv, eps = self.num_kv_heads, self.infini.eps
        G = H // Hkv
        M, z = memory.get(self.layer_idx, B, Hkv, d, q)
        sq = _sigma(q.float()).view(B, Hkv, G, T, d)  # query heads grouped onto their kv head
        sk = _sigma(k.float())  # (B, Hkv, T, d), no positions: memory is position-free
        vf = v.float()
        # read the memory as it was before this segment
        num = torch.einsum("bkgtd,bkde->bkgte", sq, M)  # (B, Hkv, G, T, d)
        den = torch.einsum("bkgtd,bkd->bkgt", sq, z).unsqueeze(-1)  # (B, Hkv, G, T, 1)
        a_mem = (num / (den + eps)).reshape(B, H, T, d).transpose(1, 2)  # (B, T, H, d)
        if memory.write:
            if self.infini.update == "delta":
                # subtract what the memory already returns for these keys, so repeats do not pile up
                v_old = torch.einsum("bktd,bkde->bkte", sk, M) / (torch.einsum("bktd,bkd->bkt", sk, z).unsqueeze(-1) + eps)
                vf = vf - v_old
            memory.add_write(self.layer_idx, torch.einsum("bktd,bkte->bkde", sk, vf),  # (B, Hkv, d, d)
                             sk.sum(dim=2))  # (B, Hkv, d)
        return a_mem


@dataclass
class InfiniOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, kept, V): see ``keep_logits``
    cache: MemoryCache | None = None
    memory: InfiniMemory | None = None


class InfiniAttentionLMConfig(NestedBaseConfig):
    """Config of :class:`InfiniAttentionLM`: the base model's config (``base_config``, nested) and the
    Infini-attention settings (``infini``, the fields of :class:`InfiniAttentionConfig`)."""

    model_type = "infini_attention"
    settings_key = "infini"
    settings_class = InfiniAttentionConfig

    def __init__(self, base_config: Any = None, base_config_type: str | None = None, **kwargs: Any) -> None:
        # defined here (not only inherited) so that transformers keeps it instead of generating a dataclass __init__
        super().__init__(base_config, base_config_type, **kwargs)


class InfiniAttentionLM(MemoryPreTrainedModel, GenerationMixin):
    """A causal LM whose attention layers are Infini-attention.

    ``forward(input_ids, labels=None, memory=None)`` runs the input segment by segment and returns
    the loss, the logits asked for and the memory after the input (pass it back in to stream);
    ``generate()`` is Hugging Face's (greedy, sampling, beam search, streamers) with a cache holding
    the memory and the open segment's keys and values.

    Built from a config (``from_pretrained``, ``from_config``) or around a model:
    ``InfiniAttentionLM(base_causal_lm, InfiniAttentionConfig(...))``.
    """

    config_class = InfiniAttentionLMConfig
    settings_key = "infini"
    settings_class = InfiniAttentionConfig
    legacy_kind = "infini_attention"
    memory_modules = ("infini_gate",)
    card_summary = ("A causal language model whose attention layers are Infini-attention (Munkhdalai et al. 2024): "
                    "local attention within segments plus a compressive memory per layer and key/value head, "
                    "mixed by a learned gate per head.")
    _no_split_modules: list[str] = []

    def __init__(self, config: InfiniAttentionLMConfig | nn.Module, memory_config: InfiniAttentionConfig | None = None,
                 **kwargs: Any) -> None:
        base = None
        if isinstance(config, nn.Module):
            base = config
            check_family(base)
            config = InfiniAttentionLMConfig(base_config=base.config,
                                             infini=asdict(memory_config or InfiniAttentionConfig()))
        elif not isinstance(config, InfiniAttentionLMConfig):
            raise TypeError(f"`config` must be an InfiniAttentionLMConfig or a Hugging Face causal LM, got {type(config).__name__}")
        super().__init__(config)
        if base is None:
            base = AutoModelForCausalLM.from_config(config.base_config)
            check_family(base)
        self.base = base
        self.memory_config = InfiniAttentionConfig(**config.infini)
        self.family = FAMILIES[base.config.model_type]
        limit = getattr(base.config, self.family.max_positions, None) if self.family.max_positions else None
        if limit is not None and self.memory_config.segment_length > limit:
            fail("infini.segment_length", f"be <= the base model's {self.family.max_positions} ({limit})",
                 self.memory_config.segment_length, flag="--segment-length")
        for i, layer in enumerate(_get(base, self.family.layers)):
            attn = getattr(layer, self.family.attn)
            if not isinstance(attn, InfiniAttention):
                setattr(layer, self.family.attn, InfiniAttention(attn, self.memory_config, self.family, base.config, i))
        self.gate_mode: GateMode = "learned"
        self.last_memory_stats: dict[str, float] = {}
        self.post_init()  # tied-weight keys of the base; its weights are already initialised and stay as they are

    @staticmethod
    def legacy_key(key: str) -> str:
        """A weight name of a directory saved before (``self_attn.q_proj``) in today's layout."""
        if ".self_attn." in key:
            head, tail = key.split(".self_attn.", 1)
            tail = f"infini_gate.{tail}" if tail == GATE_PARAM else f"inner.{tail}"
            return f"{head}.self_attn.{tail}"
        return key

    # -- modes and telemetry ------------------------------------------------------------------

    def attention_layers(self) -> list[InfiniAttention]:
        return [getattr(layer, self.family.attn) for layer in _get(self.base, self.family.layers)]

    def set_gate_mode(self, mode: GateMode) -> None:
        """"learned": g * A_mem + (1 - g) * A_local, the model as trained;
        "knockout": the memory ablation: the read is zeroed and the gate kept, (1 - g) * A_local
        (the memory is neither read nor written); the first segment, where memory is empty, is
        identical to "learned";
        "local": plain local attention A_local, the gate removed too (within one segment this is the
        base model; it is NOT a memory ablation of a trained model: it also undoes the gate's damping);
        "memory": memory read only (diagnostics)."""
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {', '.join(map(repr, GATE_MODES))}, got {mode!r}")
        self.gate_mode = mode
        for attn in self.attention_layers():
            attn.gate_mode = mode

    def gates(self) -> torch.Tensor:
        """sigmoid(β) of every layer and head: (layers, heads)."""
        return torch.stack([a.infini_gate().detach().float() for a in self.attention_layers()])

    def memory_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.attention_layers() for p in a.infini_gate.parameters()]

    # -- running ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: MemoryCache | None = None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, memory: InfiniMemory | None = None,
                keep_logits: Literal["all", "last", "none"] | None = None, label_weights: torch.Tensor | None = None,
                return_dict: bool | None = None, **unused: Any) -> InfiniOutput:
        """Run ``input_ids`` (B, L) segment by segment.

        labels: (B, L) token ids (-100 ignored); the loss is next-token cross-entropy over the
            whole input, the last logit of each segment predicting the first token of the next.
        memory: state from an earlier call (streaming); a fresh one if None. Without a cache the
            input's last, incomplete segment is written too, so the memory returned holds the whole input.
        cache / use_cache: generation: the cache carries the memory and the open segment's keys and
            values from call to call (made here on the first call).
        keep_logits: "all" returns (B, L, V) logits, "last" only (B, 1, V), "none" nothing
            (long inputs: the full logits of 64K tokens would take gigabytes); default from
            ``logits_to_keep`` (0: all).
        label_weights: (B, L) weights of the labels' cross-entropy (see ``SegmentLoss``).
        """
        unknown = {k for k, v in unused.items() if v is not None and k not in
                   ("num_items_in_batch", "position_ids", "output_attentions", "output_hidden_states")}
        if unknown:
            raise TypeError(f"InfiniAttentionLM.forward got unexpected arguments {sorted(unknown)}")
        input_ids = check_input_ids(input_ids)
        keep = keep_mode(keep_logits, logits_to_keep)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if self._use_cache(use_cache, cache) and cache is None:
            cache = MemoryCache()
        keep_local = cache is not None

        def fresh(row: int | None) -> InfiniMemory:
            if memory is None:
                mem = InfiniMemory()
            elif row is None:
                mem = memory.clone()  # the caller's memory stays as it was; the one after the input is returned
            else:
                mem = memory.clone()
                mem.select_(torch.tensor([row if next(iter(memory.M.values()), torch.zeros(2)).shape[0] > 1 else 0]))
            mem.keep_local = keep_local
            return mem

        def run(ids, mem, keep_, lab, w):
            return self._run(ids, mem, keep_, lab, w)

        loss, logits, states = run_lanes(input_ids, attention_mask, cache, fresh, run, keep, labels, label_weights)
        if cache is None:
            for mem in states:  # no cache to carry the open segment: write it, the memory holds the whole input
                mem.commit()
        else:
            cache.seen += input_ids.shape[1]
        with torch.no_grad():  # telemetry for the trainer's logs
            mem = states[0]
            self.last_memory_stats = {
                "memory_M_norm": float(torch.stack([m.norm() for m in mem.M.values()]).mean()) if mem.M else 0.0,
                "memory_z_mean": float(torch.stack([z.mean() for z in mem.z.values()]).mean()) if mem.z else 0.0}
        return InfiniOutput(loss=loss, logits=logits, cache=cache, memory=states[0] if len(states) == 1 else None)

    def _run(self, ids: torch.Tensor, memory: InfiniMemory, keep: str, labels: torch.Tensor | None,
             label_weights: torch.Tensor | None) -> tuple[SegmentLoss, torch.Tensor | None]:
        """One lane: the tokens go into the open segment, which is written to memory when it fills up."""
        seg = self.memory_config.segment_length
        loss = SegmentLoss(labels, label_weights)
        kept: list[torch.Tensor] = []
        L = ids.shape[1]
        start = 0
        while start < L:
            end = min(start + seg - memory.open_tokens, L)
            need_all = labels is not None or keep == "all"
            # only the last position's logits unless asked: a 2,048-token segment's full logits are 400 MB
            logits = self._chunk(ids[:, start:end], memory, logits_to_keep=0 if need_all else 1)
            if labels is not None:
                loss.add(logits, start, end)
            if keep == "all":
                kept.append(logits)
            elif keep == "last" and end == L:
                kept.append(logits[:, -1:])
            del logits
            if memory.open_tokens == seg:
                memory.commit()
                if self.memory_config.bptt_segments is not None and memory.segments_seen % self.memory_config.bptt_segments == 0:
                    memory.detach_()  # end of a BPTT window: older segments get no gradient from later ones
            start = end
        return loss, torch.cat(kept, dim=1) if kept else None

    def _chunk(self, ids: torch.Tensor, memory: InfiniMemory, logits_to_keep: int = 0) -> torch.Tensor:
        """Tokens that continue the open segment: positions go on from the segment's start."""
        T = ids.shape[1]
        position_ids = torch.arange(memory.open_tokens, memory.open_tokens + T, device=ids.device).unsqueeze(0)
        out = self.base(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep,
                        infini_memory=memory)
        memory.open_tokens += T
        memory.tokens_seen += T
        return out.logits


def check_family(base: Any) -> str:
    """The base model's model_type, if the wrapper supports it; else UnsupportedModelError naming it."""
    if not isinstance(base, nn.Module):
        raise TypeError(f"`base` must be a Hugging Face causal LM (nn.Module), got {type(base).__name__}")
    return check_architecture(base, SUPPORTED_MODEL_TYPES, "Infini-attention")


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the model type, and ``save_pretrained``
    write ``auto_map`` with this code beside the weights."""
    AutoConfig.register(InfiniAttentionLMConfig.model_type, InfiniAttentionLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(InfiniAttentionLMConfig, InfiniAttentionLM, exist_ok=True)
    InfiniAttentionLMConfig.register_for_auto_class()
    InfiniAttentionLM.register_for_auto_class("AutoModelForCausalLM")


register()
__all__ = ["InfiniAttentionConfig", "InfiniAttentionLM", "InfiniAttentionLMConfig", "InfiniMemory", "FAMILIES",
           "UnsupportedModelError", "MEMORY_CONFIG_FILE"]
