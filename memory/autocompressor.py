"""AutoCompressor (Chevalier et al. 2023) for Hugging Face decoders: Llama, Mistral, Qwen2, Qwen3,
Gemma, Gemma2, Phi-3, GPT-NeoX and GPT-2.

A text is cut into segments. Each segment is fed as ``[soft prompt ; segment ; κ summary tokens]``;
the final-layer hidden states (after the final norm) at the κ summary positions are the segment's
*summary vectors*, which are appended to the soft prompt of every later segment (accumulation).
The summary-token embeddings are a learned (κ, hidden) parameter initialised from the EOS
embedding. Summary vectors can be passed back to ``forward`` / ``generate`` as ``softprompt=`` and
precomputed for datastore chunks or documents (:func:`precompute_summaries`), keyed by content hash.

Positions (the original code ignored them for some models, AutoCompressors issue #17): every input
vector gets a real position; the soft prompt takes positions 0..P-1, the segment P..P+N-1 and the
summary tokens P+N..P+N+κ-1, for RoPE and learned absolute positions (GPT-2) alike. (Gemma scales
every input vector by sqrt(hidden), summary vectors fed back included: they are learned with it.)

Works on current transformers through public model APIs only (``inputs_embeds``, ``position_ids``,
``cache``, the decoder body ``base.base_model`` and ``get_output_embeddings()``), not a forked
modeling file (issue #28: pinned to an old transformers). Randomized segment lengths come from a
generator seeded by the config (issue #20: results not reproducible).

Generation with a cache (:class:`AutoCompressorState`) keeps the summary vectors of past segments
and the base model's keys and values of ``[soft prompt ; open segment]``; when the open segment is
full and another token comes, the κ summary tokens are run on top of that cache (the same vectors a
pass over the whole text makes) and the cache restarts from the longer soft prompt.

Stop-gradient: gradients cross at most ``stop_gradient_after`` compression steps. The accumulated
summaries are detached at the start of every window of ``stop_gradient_after + 1`` segments
(truncated backpropagation through time, like the Infini-attention BPTT window).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin
from transformers.modeling_outputs import ModelOutput

from .common import (MemoryCache, MemoryPreTrainedModel, NestedBaseConfig, SegmentLoss, boolean, check_architecture,
                     check_input_ids, fail, integer, keep_mode, non_negative_int, optional_non_negative_int,
                     positive_int, run_lanes, segment_bounds)

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt_neox", "gpt2"}
SUMMARY_PARAM = "summary_embeddings"


@dataclass(frozen=True)
class AutoCompressorConfig:
    """Settings of the AutoCompressor wrapper.

    summary_length: κ summary tokens per segment (paper: 50).
    segment_min / segment_max: segment lengths are drawn uniformly from this range in training
        (paper: 1,024-2,048); in eval and generation segments are ``segment_max`` long.
    randomize_segments: draw segment lengths in training (False: always segment_max).
    accumulate_summary: soft prompt = summaries of *all* earlier segments (False: only the last).
    stop_gradient_after: compression steps a gradient may cross; None: no limit.
    seed: seeds the segment-length generator.
    """

    summary_length: int = 50
    segment_min: int = 1024
    segment_max: int = 2048
    randomize_segments: bool = True
    accumulate_summary: bool = True
    stop_gradient_after: int | None = 2
    seed: int = 0

    def __post_init__(self) -> None:
        non_negative_int(self.summary_length, "autocompressor.summary_length")
        positive_int(self.segment_min, "autocompressor.segment_min", flag="--segment-length")
        positive_int(self.segment_max, "autocompressor.segment_max", flag="--segment-length")
        if self.segment_min > self.segment_max:
            fail("autocompressor.segment_min", f"be <= `autocompressor.segment_max` ({self.segment_max})", self.segment_min)
        boolean(self.randomize_segments, "autocompressor.randomize_segments")
        boolean(self.accumulate_summary, "autocompressor.accumulate_summary")
        optional_non_negative_int(self.stop_gradient_after, "autocompressor.stop_gradient_after")
        integer(self.seed, "autocompressor.seed")


@dataclass
class AutoCompressorOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, kept, V)
    cache: MemoryCache | None = None
    softprompt: torch.Tensor | None = None  # (B, P, hidden) when output_softprompt


@dataclass
class AutoCompressorState:
    """One lane's state: the soft prompt given by the caller (B, P0, hidden) and the summaries made
    since, and while generating with a cache the base model's cache of ``[soft prompt ; open
    segment]`` with the open segment's length."""

    given: torch.Tensor | None = None
    summaries: list[torch.Tensor] = field(default_factory=list)
    kv: Any = None  # DynamicCache of the base model
    open_tokens: int = 0
    softprompt_out: torch.Tensor | None = None

    def softprompt(self) -> torch.Tensor | None:
        parts = ([self.given] if self.given is not None else []) + self.summaries
        return torch.cat(parts, dim=1) if parts else None

    def select_(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (beam search)."""
        self.given = self.given.index_select(0, idx.to(self.given.device)) if self.given is not None else None
        self.summaries = [s.index_select(0, idx.to(s.device)) for s in self.summaries]
        if self.kv is not None:
            self.kv.reorder_cache(idx)

    def clone(self) -> "AutoCompressorState":
        import copy

        return AutoCompressorState(self.given, list(self.summaries), copy.deepcopy(self.kv), self.open_tokens)


def sample_segment_lengths(total: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Segment lengths drawn uniformly from [lo, hi] until they cover ``total`` tokens."""
    out, covered = [], 0
    while covered < total:
        n = rng.randint(lo, hi)
        out.append(n)
        covered += n
    return out


class SummaryTokens(nn.Module):
    """The κ learned summary-token embeddings; ``forward(B)`` is (B, κ, hidden). Its own module so
    that peft can train and save it (``modules_to_save=["summary"]``)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.summary_embeddings = nn.Parameter(init)  # (κ, hidden)

    def forward(self, batch: int) -> torch.Tensor:
        return self.summary_embeddings.unsqueeze(0).expand(batch, -1, -1)


class AutoCompressorLMConfig(NestedBaseConfig):
    """Config of :class:`AutoCompressorLM`: the base model's config (``base_config``, nested) and
    the AutoCompressor settings (``autocompressor``, the fields of :class:`AutoCompressorConfig`)."""

    model_type = "autocompressor"
    settings_key = "autocompressor"
    settings_class = AutoCompressorConfig

    def __init__(self, base_config: Any = None, base_config_type: str | None = None, **kwargs: Any) -> None:
        # defined here (not only inherited) so that transformers keeps it instead of generating a dataclass __init__
        super().__init__(base_config, base_config_type, **kwargs)


def check_family(base: Any) -> str:
    """The base model's model_type, if the wrapper supports it; else UnsupportedModelError naming it."""
    if not isinstance(base, nn.Module):
        raise TypeError(f"`base` must be a Hugging Face causal LM (nn.Module), got {type(base).__name__}")
    return check_architecture(base, SUPPORTED_MODEL_TYPES, "AutoCompressor")


class AutoCompressorLM(MemoryPreTrainedModel, GenerationMixin):
    """A causal LM that compresses earlier segments into summary vectors used as a soft prompt.

    Built from a config (``from_pretrained``, ``from_config``) or around a model:
    ``AutoCompressorLM(base_causal_lm, AutoCompressorConfig(...))``. ``generate()`` is Hugging
    Face's, with ``softprompt=`` to start from summary vectors made earlier.
    """

    config_class = AutoCompressorLMConfig
    settings_key = "autocompressor"
    settings_class = AutoCompressorConfig
    legacy_kind = "autocompressor"
    memory_modules = ("summary",)
    card_summary = ("An AutoCompressor (Chevalier et al. 2023): a causal language model that compresses each "
                    "segment of its input into summary vectors, read as a soft prompt by later segments.")
    _no_split_modules: list[str] = []

    def __init__(self, config: AutoCompressorLMConfig | nn.Module, memory_config: AutoCompressorConfig | None = None,
                 **kwargs: Any) -> None:
        base = None
        if isinstance(config, nn.Module):
            base = config
            check_family(base)
            config = AutoCompressorLMConfig(base_config=base.config,
                                            autocompressor=asdict(memory_config or AutoCompressorConfig()))
        elif not isinstance(config, AutoCompressorLMConfig):
            raise TypeError(f"`config` must be an AutoCompressorLMConfig or a Hugging Face causal LM, got {type(config).__name__}")
        super().__init__(config)
        if base is None:
            base = AutoModelForCausalLM.from_config(config.base_config)
        self.model_type = check_family(base)
        self.memory_config = AutoCompressorConfig(**config.autocompressor)
        self.base = base
        emb = base.get_input_embeddings().weight
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ValueError("the base model's config has no `eos_token_id`; summary tokens are initialised from it")
        # (κ, hidden): every summary token starts as EOS; their positions tell them apart
        self.summary = SummaryTokens(emb.detach()[eos].clone().repeat(self.memory_config.summary_length, 1))
        self.hidden_size = emb.shape[1]
        self.max_positions = getattr(base.config, "n_positions", None) if self.model_type == "gpt2" else None
        self._rng = random.Random(self.memory_config.seed)
        self.post_init()  # tied-weight keys of the base; its weights are already initialised and stay as they are

    @property
    def summary_embeddings(self) -> nn.Parameter:
        """(κ, hidden): the summary tokens' embeddings."""
        return self.summary.summary_embeddings

    @staticmethod
    def legacy_key(key: str) -> str:
        """A weight name of a directory saved before in today's layout."""
        return f"summary.{SUMMARY_PARAM}" if key == SUMMARY_PARAM else key

    def memory_parameters(self) -> list[nn.Parameter]:
        return list(self.summary.parameters())

    # -- checks ---------------------------------------------------------------------------------

    def _check_softprompt(self, softprompt: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if softprompt is None:
            return None
        if not isinstance(softprompt, torch.Tensor) or softprompt.dim() != 3:
            raise ValueError(f"`softprompt` must be a tensor of shape (batch, vectors, {self.hidden_size}), got "
                             f"{tuple(softprompt.shape) if isinstance(softprompt, torch.Tensor) else type(softprompt).__name__}")
        if softprompt.shape[-1] != self.hidden_size:
            raise ValueError(f"`softprompt` has width {softprompt.shape[-1]}, but this model's hidden size is "
                             f"{self.hidden_size}: summary vectors only fit the model (size) that made them")
        if softprompt.shape[0] not in (1, batch):
            raise ValueError(f"`softprompt` batch {softprompt.shape[0]} does not match input batch {batch}")
        return softprompt.expand(batch, -1, -1) if softprompt.shape[1] else None

    def _segment_lengths(self, length: int, segment_lengths: list[int] | None) -> list[int]:
        if segment_lengths is not None:
            if not segment_lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in segment_lengths):
                raise ValueError(f"`segment_lengths` must be a non-empty list of positive integers, got {segment_lengths!r}")
            return list(segment_lengths)
        c = self.memory_config
        if self.training and c.randomize_segments:
            return sample_segment_lengths(length, c.segment_min, c.segment_max, self._rng)
        return [c.segment_max]

    # -- running --------------------------------------------------------------------------------

    def _check_positions(self, T: int) -> None:
        if self.max_positions is not None and T > self.max_positions:
            raise ValueError(f"soft prompt + segment + summary tokens = {T} positions, more than this GPT-2's "
                             f"n_positions={self.max_positions}; use shorter segments or accumulate_summary=False")

    def _run_body(self, embeds: torch.Tensor, start: int = 0, kv: Any = None) -> torch.Tensor:
        """Final-layer hidden states (after the final norm) of ``embeds`` (B, T, hidden) at positions
        start..start+T-1, after what ``kv`` (a base-model cache) holds."""
        T = embeds.shape[1]
        self._check_positions(start + T)
        position_ids = torch.arange(start, start + T, device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        out = self.base.base_model(inputs_embeds=embeds, position_ids=position_ids, cache=kv, use_cache=kv is not None)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: MemoryCache | None = None, use_cache: bool | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, softprompt: torch.Tensor | None = None,
                segment_lengths: list[int] | None = None, output_softprompt: bool = False,
                keep_logits: Literal["all", "last", "none"] | None = None, label_weights: torch.Tensor | None = None,
                return_dict: bool | None = None, **unused: Any) -> AutoCompressorOutput:
        """Run ``input_ids`` (B, L) segment by segment.

        softprompt: (B or 1, P, hidden) summary vectors made earlier (e.g. by :meth:`compress`),
            placed before everything; None or P = 0 for none. With a cache it is read on the first call only.
        segment_lengths: lengths of the segments (the last repeats); None: random in training,
            ``segment_max`` otherwise. One segment covering the input and no ``output_softprompt``
            uses no summary tokens at all, and then equals the base model.
        output_softprompt: also compress the last segment and return the whole soft prompt
            (given soft prompt + every segment's summaries), to pass back later.
        cache / use_cache: generation: the cache carries the summaries and the open segment's keys
            and values from call to call (made here on the first call); segments are ``segment_max``.
        keep_logits: "all" | "last" | "none"; default from ``logits_to_keep`` (0: all).
        label_weights: (B, L) weights of the labels' cross-entropy (see ``SegmentLoss``).
        """
        unknown = {k for k, v in unused.items() if v is not None and k not in
                   ("num_items_in_batch", "position_ids", "output_attentions", "output_hidden_states")}
        if unknown:
            raise TypeError(f"AutoCompressorLM.forward got unexpected arguments {sorted(unknown)}")
        input_ids = check_input_ids(input_ids)
        B, L = input_ids.shape
        keep = keep_mode(keep_logits, logits_to_keep)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        given = self._check_softprompt(softprompt, B)
        if self._use_cache(use_cache, cache) and cache is None:
            cache = MemoryCache()
        if cache is not None and segment_lengths is not None and set(segment_lengths) != {self.memory_config.segment_max}:
            raise ValueError("`segment_lengths` cannot be given with a cache: generation uses segments of segment_max")
        bounds = self._segment_lengths(L, segment_lengths)

        def fresh(row: int | None) -> AutoCompressorState:
            return AutoCompressorState(given=given if row is None or given is None else given[row:row + 1])

        def run(ids, state, keep_, lab, w):
            if cache is not None:
                return self._run_cached(ids, state, keep_, lab, w)
            return self._run(ids, state, keep_, lab, w, bounds, output_softprompt)

        loss, logits, states = run_lanes(input_ids, attention_mask, cache, fresh, run, keep, labels, label_weights)
        out_sp = None
        if output_softprompt:
            if len(states) > 1:
                raise ValueError("`output_softprompt` needs a batch without padding (summaries of rows differ in length)")
            out_sp = states[0].softprompt_out if cache is None else states[0].softprompt()
            if out_sp is None:
                out_sp = input_ids.new_zeros((B, 0, self.hidden_size), dtype=self.summary_embeddings.dtype)
        if cache is not None:
            cache.seen += L
        return AutoCompressorOutput(loss=loss, logits=logits, cache=cache, softprompt=out_sp)

    def _run(self, input_ids: torch.Tensor, state: AutoCompressorState, keep: str, labels: torch.Tensor | None,
             label_weights: torch.Tensor | None, segment_lengths: list[int], output_softprompt: bool
             ) -> tuple[SegmentLoss, torch.Tensor | None]:
        """One lane, the whole input in one call (training, evaluation, generation without a cache)."""
        B, L = input_ids.shape
        bounds = segment_bounds(L, segment_lengths)
        kappa = self.memory_config.summary_length
        window = self.memory_config.stop_gradient_after
        embed = self.base.get_input_embeddings()
        lm_head = self.base.get_output_embeddings()
        given = state.given
        summaries: list[torch.Tensor] = []
        loss = SegmentLoss(labels, label_weights)
        kept: list[torch.Tensor] = []
        for i, (start, end) in enumerate(bounds):
            if window is not None and i > 0 and i % (window + 1) == 0:
                summaries = [s.detach() for s in summaries]  # a new BPTT window starts here
            parts = ([given] if given is not None else []) + summaries
            P = sum(p.shape[1] for p in parts)
            seg = embed(input_ids[:, start:end])  # (B, N, hidden)
            N = end - start
            compress = kappa > 0 and (i < len(bounds) - 1 or output_softprompt)
            pieces = parts + [seg] + ([self.summary(B).to(seg.dtype)] if compress else [])
            hidden = self._run_body(torch.cat(pieces, dim=1))  # (B, P + N (+ κ), hidden)
            if labels is not None or keep == "all" or (keep == "last" and end == L):
                logits = self._logits(lm_head, hidden[:, P:P + N])  # (B, N, V)
                loss.add(logits, start, end)
                if keep == "all":
                    kept.append(logits)
                elif keep == "last" and end == L:
                    kept.append(logits[:, -1:])
            if compress:
                new = hidden[:, P + N:]  # (B, κ, hidden): this segment's summary vectors
                summaries = summaries + [new] if self.memory_config.accumulate_summary else [new]
        state.summaries = summaries
        state.softprompt_out = state.softprompt() if output_softprompt else None
        return loss, torch.cat(kept, 1) if kept else None

    def _run_cached(self, input_ids: torch.Tensor, state: AutoCompressorState, keep: str, labels: torch.Tensor | None,
                    label_weights: torch.Tensor | None) -> tuple[SegmentLoss, torch.Tensor | None]:
        """One lane, continuing from ``state``: tokens fill the open segment; when it is full and
        more come, it is compressed on top of its cache and the cache restarts from the soft prompt."""
        B, L = input_ids.shape
        seg = self.memory_config.segment_max
        embed = self.base.get_input_embeddings()
        lm_head = self.base.get_output_embeddings()
        loss = SegmentLoss(labels, label_weights)
        kept: list[torch.Tensor] = []
        start = 0
        while start < L:
            if state.open_tokens == seg:
                self._compress_open_segment(state)
            if state.kv is None:  # a new segment: the soft prompt goes first
                state.kv = DynamicCache(config=self.base.config)
                sp = state.softprompt()
                if sp is not None:
                    self._run_body(sp.to(embed.weight.dtype), 0, state.kv)
            end = min(start + seg - state.open_tokens, L)
            P = state.kv.get_seq_length() - state.open_tokens
            hidden = self._run_body(embed(input_ids[:, start:end]), P + state.open_tokens, state.kv)  # (B, N, hidden)
            state.open_tokens += end - start
            if labels is not None or keep == "all" or (keep == "last" and end == L):
                logits = self._logits(lm_head, hidden)
                loss.add(logits, start, end)
                kept.append(logits if keep == "all" else logits[:, -1:])
            start = end
        if keep == "last":
            kept = kept[-1:]
        return loss, torch.cat(kept, 1) if kept and keep != "none" else None

    def _logits(self, lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's logits of final hidden states, with its final soft-capping (Gemma2) if any."""
        logits = lm_head(hidden)
        cap = getattr(self.base.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _compress_open_segment(self, state: AutoCompressorState) -> None:
        kappa = self.memory_config.summary_length
        if kappa:
            B = state.kv.layers[0].keys.shape[0] if hasattr(state.kv, "layers") else 1
            new = self._run_body(self.summary(B).to(self.get_input_embeddings().weight.dtype),
                                 state.kv.get_seq_length(), state.kv)  # (B, κ, hidden)
            state.summaries = state.summaries + [new] if self.memory_config.accumulate_summary else [new]
        state.kv, state.open_tokens = None, 0

    @torch.inference_mode()
    def compress(self, input_ids: torch.Tensor, softprompt: torch.Tensor | None = None,
                 segment_lengths: list[int] | None = None) -> torch.Tensor:
        """Summary vectors (B, P + κ·segments, hidden) of ``input_ids``, to pass as ``softprompt=``."""
        return self.forward(input_ids, softprompt=softprompt, segment_lengths=segment_lengths, use_cache=False,
                            output_softprompt=True, keep_logits="none").softprompt

    def compress_text(self, tokenizer: Any, text: str, segment_lengths: list[int] | None = None) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return self.compress(ids.to(self.summary_embeddings.device), segment_lengths=segment_lengths)


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the model type, and ``save_pretrained``
    write ``auto_map`` with this code beside the weights."""
    AutoConfig.register(AutoCompressorLMConfig.model_type, AutoCompressorLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(AutoCompressorLMConfig, AutoCompressorLM, exist_ok=True)
    AutoCompressorLMConfig.register_for_auto_class()
    AutoCompressorLM.register_for_auto_class("AutoModelForCausalLM")


register()

# -- precomputed summary vectors (the paper's retrieval use) ----------------------------------------

def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SummaryStore:
    """Summary vectors keyed by the SHA-256 of the text they summarise, in one safetensors file."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no summary store at {self.path}")
        with safe_open(str(self.path), framework="pt") as fh:
            self.metadata = fh.metadata() or {}
            self._tensors = {k: fh.get_tensor(k) for k in fh.keys()}

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, text_or_hash: str) -> bool:
        return self._key(text_or_hash) in self._tensors

    def _key(self, text_or_hash: str) -> str:
        if len(text_or_hash) == 64 and all(c in "0123456789abcdef" for c in text_or_hash):
            return text_or_hash
        return content_hash(text_or_hash)

    def get(self, text_or_hash: str) -> torch.Tensor:
        """(vectors, hidden) summary of a text (or its hash); add a batch dim to use as softprompt."""
        key = self._key(text_or_hash)
        if key not in self._tensors:
            raise KeyError(f"no summary for content hash {key} in {self.path}")
        return self._tensors[key]


def precompute_summaries(model: AutoCompressorLM, tokenizer: Any, texts: Iterable[str], out_path: str | Path,
                         segment_lengths: list[int] | None = None, progress: bool = True) -> Path:
    """Compress each text and store its summary vectors keyed by content hash (safetensors).

    Texts already in ``out_path`` are skipped, so an interrupted run resumes; the file is
    replaced atomically.
    """
    from safetensors.torch import save_file

    try:
        from tqdm import tqdm
    except ImportError:  # the copy saved beside a model may run without tqdm
        def tqdm(items, **_):
            return items

    out = Path(out_path)
    done: dict[str, torch.Tensor] = dict(SummaryStore(out)._tensors) if out.is_file() else {}
    model.eval()
    todo = [(content_hash(t), t) for t in texts]
    for key, text in tqdm(todo, desc="compress", disable=not progress):
        if key in done:
            continue
        done[key] = model.compress_text(tokenizer, text, segment_lengths)[0].float().cpu().contiguous()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    save_file(done, str(tmp), metadata={"hidden_size": str(model.hidden_size),
                                        "summary_length": str(model.memory_config.summary_length),
                                        "model_type": model.model_type})
    os.replace(tmp, out)
    return out


def datastore_texts(datastore_path: str | Path, chunk_ids: Iterable[int] | None = None,
                    doc_ids: Iterable[int] | None = None) -> list[str]:
    """Chunk texts or whole-document texts of a retromem datastore, to pass to precompute_summaries."""
    import importlib

    # imported by name: the copy of this file saved beside a model must not need retromem (remote code)
    Datastore = importlib.import_module("retromem.datastore").Datastore

    ds = Datastore.open(datastore_path)
    texts = list(ds.chunk_texts(list(chunk_ids))) if chunk_ids is not None else []
    texts += [ds.document_text(int(d)) for d in (doc_ids or [])]
    return texts
