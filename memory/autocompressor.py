"""AutoCompressor (Chevalier et al. 2023) for Hugging Face decoders: Llama family and GPT-2.

A text is cut into segments. Each segment is fed as ``[soft prompt ; segment ; κ summary tokens]``;
the final-layer hidden states (after the final norm) at the κ summary positions are the segment's
*summary vectors*, which are appended to the soft prompt of every later segment (accumulation).
The summary-token embeddings are a learned (κ, hidden) parameter initialised from the EOS
embedding. Summary vectors can be passed back to ``forward`` / ``generate`` as ``softprompt=`` and
precomputed for datastore chunks or documents (:func:`precompute_summaries`), keyed by content hash.

Positions (the original code ignored them for some models, AutoCompressors issue #17): every input
vector gets a real position; the soft prompt takes positions 0..P-1, the segment P..P+N-1 and the
summary tokens P+N..P+N+κ-1, for RoPE (Llama) and learned absolute positions (GPT-2) alike.

Works on current transformers through public model APIs only (``inputs_embeds``, ``position_ids``,
the decoder body ``base.base_model`` and ``get_output_embeddings()``), not a forked modeling file
(issue #28: pinned to an old transformers). Randomized segment lengths come from a generator
seeded by the config (issue #20: results not reproducible).

Stop-gradient: gradients cross at most ``stop_gradient_after`` compression steps. The accumulated
summaries are detached at the start of every window of ``stop_gradient_after + 1`` segments
(truncated backpropagation through time, like the Infini-attention BPTT window).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal

import torch
import torch.nn as nn

from retromem.config import boolean, fail, integer, non_negative_int, optional_non_negative_int, positive_int
from retromem.memory.common import (MemoryWrapper, SegmentLoss, WrapperOutput, check_architecture, check_input_ids,
                                     segment_bounds)

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "gpt2"}
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
class AutoCompressorOutput(WrapperOutput):
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # (B, kept, V)
    softprompt: torch.Tensor | None  # (B, P, hidden) when output_softprompt


def sample_segment_lengths(total: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Segment lengths drawn uniformly from [lo, hi] until they cover ``total`` tokens."""
    out, covered = [], 0
    while covered < total:
        n = rng.randint(lo, hi)
        out.append(n)
        covered += n
    return out


class AutoCompressorLM(MemoryWrapper):
    """A causal LM that compresses earlier segments into summary vectors used as a soft prompt."""

    kind = "autocompressor"
    config_class = AutoCompressorConfig

    def __init__(self, base: nn.Module, config: AutoCompressorConfig | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"`base` must be a Hugging Face causal LM (nn.Module), got {type(base).__name__}")
        self.model_type = check_architecture(base, SUPPORTED_MODEL_TYPES, "AutoCompressor")
        self.memory_config = config or AutoCompressorConfig()
        self.base = base
        emb = base.get_input_embeddings().weight
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ValueError("the base model's config has no `eos_token_id`; summary tokens are initialised from it")
        # (κ, hidden): every summary token starts as EOS; their positions tell them apart
        self.summary_embeddings = nn.Parameter(emb.detach()[eos].clone().repeat(self.memory_config.summary_length, 1))
        self.hidden_size = emb.shape[1]
        self.max_positions = getattr(base.config, "n_positions", None) if self.model_type == "gpt2" else None
        self._rng = random.Random(self.memory_config.seed)

    @property
    def config(self):
        """The base model's Hugging Face config (what Trainer and generation utilities expect)."""
        return self.base.config

    def memory_parameters(self) -> list[nn.Parameter]:
        return [self.summary_embeddings]

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
        return softprompt.expand(batch, -1, -1)

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

    def _run(self, embeds: torch.Tensor) -> torch.Tensor:
        """Final-layer hidden states (after the final norm) of ``embeds`` (B, T, hidden) at positions 0..T-1."""
        T = embeds.shape[1]
        if self.max_positions is not None and T > self.max_positions:
            raise ValueError(f"soft prompt + segment + summary tokens = {T} positions, more than this GPT-2's "
                             f"n_positions={self.max_positions}; use shorter segments or accumulate_summary=False")
        position_ids = torch.arange(T, device=embeds.device).unsqueeze(0).expand(embeds.shape[0], -1)
        out = self.base.base_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, softprompt: torch.Tensor | None = None,
                segment_lengths: list[int] | None = None, output_softprompt: bool = False,
                keep_logits: Literal["all", "last", "none"] = "all", label_weights: torch.Tensor | None = None,
                **unused: Any) -> AutoCompressorOutput:
        """Run ``input_ids`` (B, L) segment by segment.

        softprompt: (B or 1, P, hidden) summary vectors made earlier (e.g. by :meth:`compress`),
            placed before everything; None or P = 0 for none.
        segment_lengths: lengths of the segments (the last repeats); None: random in training,
            ``segment_max`` otherwise. One segment covering the input and no ``output_softprompt``
            uses no summary tokens at all, and then equals the base model.
        output_softprompt: also compress the last segment and return the whole soft prompt
            (given soft prompt + every segment's summaries), to pass back later.
        label_weights: (B, L) weights of the labels' cross-entropy (see ``SegmentLoss``).
        """
        unknown = {k for k, v in unused.items() if v is not None and k not in ("attention_mask", "num_items_in_batch")}
        if unknown:
            raise TypeError(f"AutoCompressorLM.forward got unexpected arguments {sorted(unknown)}")
        input_ids = check_input_ids(input_ids)
        B, L = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"`labels` must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        given = self._check_softprompt(softprompt, B)
        bounds = segment_bounds(L, self._segment_lengths(L, segment_lengths))
        kappa = self.memory_config.summary_length
        window = self.memory_config.stop_gradient_after
        embed = self.base.get_input_embeddings()
        lm_head = self.base.get_output_embeddings()
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
            pieces = parts + [seg] + ([self.summary_embeddings.to(seg.dtype).unsqueeze(0).expand(B, -1, -1)] if compress else [])
            hidden = self._run(torch.cat(pieces, dim=1))  # (B, P + N (+ κ), hidden)
            if labels is not None or keep_logits == "all" or (keep_logits == "last" and end == L):
                logits = lm_head(hidden[:, P:P + N])  # (B, N, V)
                loss.add(logits, start, end)
                if keep_logits == "all":
                    kept.append(logits)
                elif keep_logits == "last" and end == L:
                    kept.append(logits[:, -1:])
            if compress:
                new = hidden[:, P + N:]  # (B, κ, hidden): this segment's summary vectors
                summaries = summaries + [new] if self.memory_config.accumulate_summary else [new]
        out_sp = None
        if output_softprompt:
            out_sp = torch.cat(([given] if given is not None else []) + summaries, dim=1) if (given is not None or summaries) \
                else input_ids.new_zeros((B, 0, self.hidden_size), dtype=self.summary_embeddings.dtype)
        return AutoCompressorOutput(loss=loss.value(), logits=torch.cat(kept, 1) if kept else None, softprompt=out_sp)

    @torch.inference_mode()
    def compress(self, input_ids: torch.Tensor, softprompt: torch.Tensor | None = None,
                 segment_lengths: list[int] | None = None) -> torch.Tensor:
        """Summary vectors (B, P + κ·segments, hidden) of ``input_ids``, to pass as ``softprompt=``."""
        return self.forward(input_ids, softprompt=softprompt, segment_lengths=segment_lengths,
                            output_softprompt=True, keep_logits="none").softprompt

    def compress_text(self, tokenizer: Any, text: str, segment_lengths: list[int] | None = None) -> torch.Tensor:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return self.compress(ids.to(self.summary_embeddings.device), segment_lengths=segment_lengths)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, softprompt: torch.Tensor | None = None, max_new_tokens: int = 16,
                 eos_token_id: int | None = None, auto_compress: bool = True) -> torch.Tensor:
        """Greedy decoding after ``softprompt``. With ``auto_compress`` the open segment (prompt plus
        generated tokens) is compressed into the soft prompt whenever it grows past ``segment_max``."""
        input_ids = check_input_ids(input_ids)
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        seg = self.memory_config.segment_max
        sp = self._check_softprompt(softprompt, input_ids.shape[0])
        pending = input_ids
        if auto_compress and pending.shape[1] > seg:
            full = (pending.shape[1] - 1) // seg * seg
            sp = self.compress(pending[:, :full], softprompt=sp, segment_lengths=[seg])
            pending = pending[:, full:]
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.forward(pending, softprompt=sp, segment_lengths=[pending.shape[1]], keep_logits="last").logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            new.append(nxt)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            pending = torch.cat([pending, nxt], dim=1)
            if auto_compress and pending.shape[1] > seg:
                sp = self.compress(pending[:, :seg], softprompt=sp, segment_lengths=[seg])
                pending = pending[:, seg:]
        return torch.cat([input_ids, *new], dim=1)

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
    from tqdm import tqdm

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
    from retromem.datastore import Datastore

    ds = Datastore.open(datastore_path)
    texts = list(ds.chunk_texts(list(chunk_ids))) if chunk_ids is not None else []
    texts += [ds.document_text(int(d)) for d in (doc_ids or [])]
    return texts
