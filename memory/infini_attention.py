"""Infini-attention (Munkhdalai et al. 2024) as a drop-in replacement for the attention of Hugging
Face Llama-family decoders.

The input is processed in segments of ``segment_length`` tokens. Inside a segment every layer runs
its ordinary causal (RoPE) attention; across segments each layer carries a compressive memory per
key/value head, ``M`` (d x d) and a normaliser ``z`` (d), with σ = ELU + 1:

    read    A_mem = σ(Q) M_{s-1} / (σ(Q) z_{s-1})
    linear  M_s = M_{s-1} + σ(K)ᵀ V                         z_s = z_{s-1} + Σ_t σ(K_t)
    delta   M_s = M_{s-1} + σ(K)ᵀ (V − σ(K) M_{s-1} / (σ(K) z_{s-1}))
    output  A = g ⊙ A_mem + (1 − g) ⊙ A_local,  g = sigmoid(β), one β per query head

The memory ablation (gate mode "knockout") zeroes the read and keeps the gate: A = (1 − g) ⊙ A_local,
so an input that fits in one segment (empty memory, A_mem = 0) is unchanged; plain A_local (mode
"local") also removes the gate's damping and is the base model, not a memory ablation.

The memory path uses the layer's own Q, K, V *before* the rotary embedding, so memory carries no
positions, and RoPE positions restart at 0 in every segment (no position ever exceeds the segment
length, whatever the input length). The state is O(layers · kv_heads · d²) whatever the input
length. With grouped-query attention the memory lives per key/value head (that is where K and V
live) and the query heads of a group read it, each with its own gate.

Guards against the failures of open implementations:
- β starts at ``gate_init`` (default −2: g ≈ 0.12, dg/dβ ≈ 0.10) and |gate_init| > 6 is refused,
  so the gate is never born saturated (−100 gives zero gradient forever);
- memory is detached only every ``bptt_segments`` segments (None: never), so the write path
  (K, V projections through M and z) gets gradient from later segments;
- every layer owns its own state; nothing is shared across layers;
- β is a named parameter (``*.memory_gate``) that the trainer puts in its own parameter group
  with its own learning rate and no weight decay (see :mod:`retromem.memory.training`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from retromem.config import fail, is_int, is_number, number, one_of, positive_int
from retromem.memory.common import MemoryWrapper, SegmentLoss, WrapperOutput, check_architecture, check_input_ids

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}
GATE_PARAM = "memory_gate"
MAX_ABS_GATE_INIT = 6.0  # sigmoid'(6) ≈ 0.0025: past this the gate learns too slowly to matter
GateMode = Literal["learned", "knockout", "local", "memory"]
GATE_MODES = ("learned", "knockout", "local", "memory")


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
    """The compressive memory of every layer: ``M[l]`` (B, H_kv, d, d) and ``z[l]`` (B, H_kv, d).

    ``write`` False makes a forward read the memory without updating it (used while generating
    inside a segment that is not complete yet).
    """

    M: dict[int, torch.Tensor] = field(default_factory=dict)
    z: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens_seen: int = 0
    segments_seen: int = 0
    write: bool = True

    def get(self, layer: int, batch: int, heads: int, dim: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.M:
            # fp32 state: z is a running sum over all tokens and would lose precision in bf16
            self.M[layer] = torch.zeros(batch, heads, dim, dim, device=like.device, dtype=torch.float32)
            self.z[layer] = torch.zeros(batch, heads, dim, device=like.device, dtype=torch.float32)
        return self.M[layer], self.z[layer]

    def detach_(self) -> "InfiniMemory":
        self.M = {k: v.detach() for k, v in self.M.items()}
        self.z = {k: v.detach() for k, v in self.z.items()}
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.M.values(), *self.z.values()])

    def save(self, path: str | Path) -> None:
        """Write the state (safetensors) so that a stream can be resumed later."""
        from safetensors.torch import save_file

        tensors = {f"M.{k}": v.detach().contiguous().cpu() for k, v in self.M.items()}
        tensors.update({f"z.{k}": v.detach().contiguous().cpu() for k, v in self.z.items()})
        save_file(tensors, str(path), metadata={"tokens_seen": str(self.tokens_seen),
                                                "segments_seen": str(self.segments_seen)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "InfiniMemory":
        from safetensors import safe_open

        mem = cls()
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            for key in fh.keys():
                kind, layer = key.split(".")
                getattr(mem, kind)[int(layer)] = fh.get_tensor(key)
        mem.tokens_seen = int(meta.get("tokens_seen", 0))
        mem.segments_seen = int(meta.get("segments_seen", 0))
        return mem


def _sigma(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


class InfiniAttention(nn.Module):
    """One layer's attention: the original projections and local attention, plus memory and gate.

    Built from an existing ``LlamaAttention`` (its q/k/v/o projections are taken over, not copied),
    so pretrained weights, LoRA adapters and the configured attention kernel all keep working.
    """

    def __init__(self, attn: nn.Module, cfg: InfiniAttentionConfig) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = True
        # Qwen2 sets the window per layer on the attention module; Mistral reads it from the config
        self.sliding_window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.infini = cfg
        self.memory_gate = nn.Parameter(torch.full((self.num_heads,), float(cfg.gate_init)))
        self.gate_mode: GateMode = "learned"

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        memory: InfiniMemory | None = kwargs.pop("infini_memory", None)
        B, T, _ = hidden_states.shape
        hidden_shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, Hkv, T, d)

        cos, sin = position_embeddings
        q_rope, k_rope = apply_rotary_pos_emb(q, k, cos, sin)
        k_local, v_local = k_rope, v
        if past_key_values is not None:
            k_local, v_local = past_key_values.update(k_rope, v, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        local, attn_weights = attention_interface(
            self, q_rope, k_local, v_local, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs)
        # local: (B, T, H, d)

        if self.gate_mode == "knockout":
            # the memory read is zeroed and nothing else changes: g * 0 + (1 - g) * A_local. With an
            # empty memory A_mem is exactly 0 (0 / eps), so the first segment is bitwise the same as
            # with memory on; plain A_local ("local") would also drop the gate's damping of local attention.
            g = torch.sigmoid(self.memory_gate).to(local.dtype).view(1, 1, -1, 1)
            out = (1 - g) * local
        elif memory is None or self.gate_mode == "local":
            out = local
        else:
            out = self._with_memory(q, k, v, local, memory)
        out = out.reshape(B, T, -1).contiguous()
        return self.o_proj(out), attn_weights

    def _with_memory(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, local: torch.Tensor,
                     memory: InfiniMemory) -> torch.Tensor:
        B, H, T, d = q.shape
        Hkv, G, eps = self.num_kv_heads, self.num_key_value_groups, self.infini.eps
        M, z = memory.get(self.layer_idx, B, Hkv, d, q)
        sq = _sigma(q.float()).view(B, Hkv, G, T, d)  # query heads grouped onto their kv head
        sk = _sigma(k.float())  # (B, Hkv, T, d), no RoPE: memory is position-free
        vf = v.float()
        # read the memory as it was before this segment
        num = torch.einsum("bkgtd,bkde->bkgte", sq, M)  # (B, Hkv, G, T, d)
        den = torch.einsum("bkgtd,bkd->bkgt", sq, z).unsqueeze(-1)  # (B, Hkv, G, T, 1)
        a_mem = (num / (den + eps)).reshape(B, H, T, d).transpose(1, 2).to(local.dtype)  # (B, T, H, d)
        if memory.write:
            if self.infini.update == "delta":
                # subtract what the memory already returns for these keys, so repeats do not pile up
                v_old = torch.einsum("bktd,bkde->bkte", sk, M) / (torch.einsum("bktd,bkd->bkt", sk, z).unsqueeze(-1) + eps)
                vf = vf - v_old
            memory.M[self.layer_idx] = M + torch.einsum("bktd,bkte->bkde", sk, vf)  # (B, Hkv, d, d)
            memory.z[self.layer_idx] = z + sk.sum(dim=2)  # (B, Hkv, d)
        if self.gate_mode == "memory":
            return a_mem
        g = torch.sigmoid(self.memory_gate).to(local.dtype).view(1, 1, H, 1)
        return g * a_mem + (1 - g) * local


@dataclass
class InfiniOutput(WrapperOutput):
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, kept, V): see ``keep_logits``
    memory: InfiniMemory


class InfiniAttentionLM(MemoryWrapper):
    """A Llama-family causal LM whose attention layers are Infini-attention.

    ``forward(input_ids, labels=None, memory=None)`` runs the input segment by segment and returns
    the loss, the logits asked for and the memory after the input (pass it back in to stream).
    """

    kind = "infini_attention"
    config_class = InfiniAttentionConfig

    def __init__(self, base: nn.Module, config: InfiniAttentionConfig | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"`base` must be a Hugging Face causal LM (nn.Module), got {type(base).__name__}")
        check_architecture(base, SUPPORTED_MODEL_TYPES, "Infini-attention")
        self.memory_config = config or InfiniAttentionConfig()
        self.base = base
        for layer in base.model.layers:
            if not isinstance(layer.self_attn, InfiniAttention):
                layer.self_attn = InfiniAttention(layer.self_attn, self.memory_config)
        self.gate_mode: GateMode = "learned"

    @property
    def config(self):
        """The base model's Hugging Face config (what Trainer and generation utilities expect)."""
        return self.base.config

    # -- modes and telemetry ------------------------------------------------------------------

    def attention_layers(self) -> list[InfiniAttention]:
        return [layer.self_attn for layer in self.base.model.layers]

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
        return torch.stack([torch.sigmoid(a.memory_gate.detach().float()) for a in self.attention_layers()])

    def memory_parameters(self) -> list[nn.Parameter]:
        return [a.memory_gate for a in self.attention_layers()]

    # -- running ------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, memory: InfiniMemory | None = None,
                keep_logits: Literal["all", "last", "none"] = "last", label_weights: torch.Tensor | None = None,
                **unused: Any) -> InfiniOutput:
        """Run ``input_ids`` (B, L) segment by segment.

        labels: (B, L) token ids (-100 ignored); the loss is next-token cross-entropy over the
            whole input, the last logit of each segment predicting the first token of the next.
        memory: state from an earlier call (streaming); a fresh one if None.
        keep_logits: "all" returns (B, L, V) logits, "last" only (B, 1, V), "none" nothing
            (long inputs: the full logits of 64K tokens would take gigabytes).
        label_weights: (B, L) weights of the labels' cross-entropy (see ``SegmentLoss``).
        """
        unknown = {k for k, v in unused.items() if v is not None and k not in ("attention_mask", "num_items_in_batch")}
        if unknown:
            raise TypeError(f"InfiniAttentionLM.forward got unexpected arguments {sorted(unknown)}")
        input_ids = check_input_ids(input_ids)
        if keep_logits not in ("all", "last", "none"):
            raise ValueError(f"`keep_logits` must be 'all', 'last' or 'none', got {keep_logits!r}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        memory = memory if memory is not None else InfiniMemory()
        seg = self.memory_config.segment_length
        loss = SegmentLoss(labels, label_weights)
        kept: list[torch.Tensor] = []
        L = input_ids.shape[1]
        for i, start in enumerate(range(0, L, seg)):
            end = min(start + seg, L)
            need_all = labels is not None or keep_logits == "all"
            # only the last position's logits unless asked: a 2,048-token segment's full logits are 400 MB
            logits = self._segment(input_ids[:, start:end], memory, logits_to_keep=0 if need_all else 1)
            if labels is not None:
                loss.add(logits, start, end)
            if keep_logits == "all":
                kept.append(logits)
            elif keep_logits == "last" and end == L:
                kept.append(logits[:, -1:])
            del logits
            if self.memory_config.bptt_segments is not None and memory.segments_seen % self.memory_config.bptt_segments == 0:
                memory.detach_()  # end of a BPTT window: older segments get no gradient from later ones
        with torch.no_grad():  # telemetry for the trainer's logs
            self.last_memory_stats = {
                "memory_M_norm": float(torch.stack([m.norm() for m in memory.M.values()]).mean()) if memory.M else 0.0,
                "memory_z_mean": float(torch.stack([z.mean() for z in memory.z.values()]).mean()) if memory.z else 0.0}
        return InfiniOutput(loss=loss.value(), logits=torch.cat(kept, dim=1) if kept else None, memory=memory)

    def _segment(self, ids: torch.Tensor, memory: InfiniMemory, logits_to_keep: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        position_ids = torch.arange(T, device=ids.device).unsqueeze(0)  # RoPE restarts every segment
        out = self.base(input_ids=ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_to_keep,
                        infini_memory=memory if self.gate_mode not in ("local", "knockout") else None)
        if memory.write:
            memory.tokens_seen += T
            memory.segments_seen += 1
        return out.logits

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 16, memory: InfiniMemory | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: the prompt's complete segments go to memory; new tokens attend locally
        to the current (incomplete) segment and read memory, which is written when it fills up."""
        input_ids = check_input_ids(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        seg = self.memory_config.segment_length
        memory = memory if memory is not None else InfiniMemory()
        L = input_ids.shape[1]
        full = (L - 1) // seg * seg  # keep at least one token in the open segment
        if full:
            self.forward(input_ids[:, :full], memory=memory, keep_logits="none")
        pending = input_ids[:, full:]
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            memory.write = False
            try:
                logits = self._segment(pending, memory)
            finally:
                memory.write = True
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            pending = torch.cat([pending, nxt], dim=1)
            if pending.shape[1] > seg:  # the open segment is full: write it, keep the new token
                self._segment(pending[:, :seg], memory)
                pending = pending[:, seg:]
        return torch.cat([input_ids, *new], dim=1)
