"""Retrieved-context compression (TCRA-LLM, Liu et al. 2023) for the in-context retrieval path
(:mod:`retromem.retro.qa`, :mod:`retromem.retro.ralm`): shrink retrieved passages before they enter
the prompt, to a target share of their tokens, so the reader reads fewer prompt tokens.

Two kinds, as in the paper, each to a compression ``ratio`` r in (0, 1]: the compressed passage
has at most ``ceil(r * n)`` tokens of the reader's tokenizer, n being the passage's own.

* Summarisation compression (:class:`SummaryCompressor`): a small instruction-tuned LM (offline
  default: SmolLM2-135M-Instruct) is prompted to summarise each passage with the question in view,
  generating at most ``ceil(r * n)`` tokens greedily. The paper fine-tunes T5 on summaries written
  by a large model; this is the zero-shot version of the same step.
* Semantic compression: drop low-information parts until the budget holds.
  :class:`SimilarityCompressor` drops the sentences least similar to the query (cosine of
  sentence-transformers embeddings; offline default all-MiniLM-L6-v2), :class:`SurprisalCompressor`
  drops the words the small LM finds least surprising (-log p of the word's tokens given the text
  before it: Selective Context's criterion), keeping the rest in their original order.
  :class:`ExtractiveCompressor` is a model-free fallback, stated as such: sentences ranked by word
  overlap with the query. :class:`TruncateCompressor` (each passage's first tokens, to the same
  budget) is the control every compressor is measured against.

Every compressor has ``compress(query, passages) -> list[str]`` and ``describe() -> dict``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from retromem.config import number, one_of
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

METHODS = ("none", "summary", "similarity", "surprisal", "extractive", "truncate")
_SENT = re.compile(r"(?<=[.;!?])\s+|\s+--\s+")
_WORD = re.compile(r"\S+\s*")
_ABBREV = re.compile(r"(?:^|[\s(])[A-Za-z]{1,2}\.$")


@dataclass(frozen=True)
class CompressConfig:
    method: str = "none"  # one of METHODS
    ratio: float = 0.5  # share of a passage's tokens kept (compressed length <= ceil(ratio * n))

    def __post_init__(self) -> None:
        one_of(self.method, "compress.method", METHODS, flag="--compress")
        number(self.ratio, "compress.ratio", gt=0.0, le=1.0, flag="--compress-ratio")


def sentences(text: str) -> list[str]:
    """Sentence-like pieces of ``text``: split after . ; ! ? and at " -- " (GCIDE's sense separator),
    but not after a short abbreviation ("(v. t.)", "e.g.")."""
    out: list[str] = []
    for piece in (s.strip() for s in _SENT.split(" ".join(text.split()))):
        if not piece:
            continue
        if out and _ABBREV.search(out[-1]):
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def _budget(n: int, ratio: float) -> int:
    return max(1, math.ceil(ratio * n))


class _Base:
    def __init__(self, tokenizer: Any, ratio: float) -> None:
        number(ratio, "compress.ratio", gt=0.0, le=1.0, flag="--compress-ratio")
        self.tokenizer = tokenizer
        self.ratio = ratio

    def ntokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _keep_ranked(self, pieces: list[str], scores: Sequence[float], budget: int, joiner: str = " ") -> str:
        """The highest-scoring pieces whose joined text fits in ``budget`` tokens, in their original
        order (pieces are tried best first; one that does not fit is skipped for smaller ones)."""
        if self.ratio >= 1.0:
            return joiner.join(pieces).strip()
        keep: list[int] = []
        order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable").tolist()
        for i in order:
            trial = sorted(keep + [i])
            if self.ntokens(joiner.join(pieces[j] for j in trial)) <= budget:
                keep = trial
        if not keep and order:  # no whole piece fits: the best one, cut to the budget word by word
            words = pieces[order[0]].split()
            while words and self.ntokens(" ".join(words)) > budget:
                words.pop()
            return " ".join(words)
        return joiner.join(pieces[j] for j in keep).strip()

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "ratio": self.ratio}  # type: ignore[attr-defined]


class ExtractiveCompressor(_Base):
    """Model-free fallback: sentences ranked by the share of the query's words they contain."""

    method = "extractive"

    def compress(self, query: str, passages: Sequence[str]) -> list[str]:
        qwords = {w.lower().strip(".,;:!?()\"'") for w in query.split()} - {""}
        out = []
        for p in passages:
            sents = sentences(p)
            scores = [len(qwords & {w.lower().strip(".,;:!?()\"'") for w in s.split()}) / (1 + len(s.split()))
                      for s in sents]
            out.append(self._keep_ranked(sents, scores, _budget(self.ntokens(p), self.ratio)))
        return out


class TruncateCompressor(_Base):
    """The control for every compressor: each passage's first ``ceil(ratio * n)`` tokens."""

    method = "truncate"

    def compress(self, query: str, passages: Sequence[str]) -> list[str]:
        out = []
        for p in passages:
            ids = self.tokenizer(" ".join(p.split()), add_special_tokens=False)["input_ids"]
            out.append(self.tokenizer.decode(ids[:_budget(len(ids), self.ratio)]).strip())
        return out


class SimilarityCompressor(_Base):
    """Semantic compression: sentences ranked by cosine similarity of their embedding to the query's."""

    method = "similarity"

    def __init__(self, tokenizer: Any, ratio: float, embedder: Any) -> None:
        super().__init__(tokenizer, ratio)
        self.embedder = embedder  # a sentence-transformers model (encode(list[str]) -> (n, d))

    def compress(self, query: str, passages: Sequence[str]) -> list[str]:
        split = [sentences(p) for p in passages]
        flat = [s for ss in split for s in ss]
        if not flat:
            return ["" for _ in passages]
        emb = np.asarray(self.embedder.encode([query] + flat, normalize_embeddings=True))
        sims = emb[1:] @ emb[0]
        out, at = [], 0
        for p, ss in zip(passages, split):
            out.append(self._keep_ranked(ss, sims[at:at + len(ss)].tolist(), _budget(self.ntokens(p), self.ratio)))
            at += len(ss)
        return out


class SurprisalCompressor(_Base):
    """Semantic compression at word level: the words whose tokens the small LM found least surprising
    (lowest summed -log p given the text before them, the query first) are dropped."""

    method = "surprisal"

    def __init__(self, tokenizer: Any, ratio: float, model: Any) -> None:
        super().__init__(tokenizer, ratio)
        self.model = model

    @torch.inference_mode()
    def word_surprisal(self, query: str, passage: str) -> tuple[list[str], list[float]]:
        words = _WORD.findall(" ".join(passage.split()))
        if not words:
            return [], []
        head = list(self.tokenizer(query.strip() + "\n", add_special_tokens=False)["input_ids"])
        ids, owner = list(head), [-1] * len(head)
        for w, text in enumerate(words):
            t = self.tokenizer(text if w == 0 else text, add_special_tokens=False)["input_ids"]
            ids += t
            owner += [w] * len(t)
        x = torch.tensor([ids], device=next(self.model.parameters()).device)
        lp = torch.log_softmax(self.model(input_ids=x).logits[0, :-1].float(), dim=-1)  # (len - 1, vocab)
        tok_s = (-lp.gather(1, x[0, 1:, None])[:, 0]).tolist()  # surprisal of token j + 1
        s = [0.0] * len(words)
        for j, w in enumerate(owner[1:]):
            if w >= 0:
                s[w] += tok_s[j]
        return words, s

    def compress(self, query: str, passages: Sequence[str]) -> list[str]:
        out = []
        for p in passages:
            words, s = self.word_surprisal(query, p)
            out.append(self._keep_ranked([w.strip() for w in words], s, _budget(self.ntokens(p), self.ratio)))
        return out


class SummaryCompressor(_Base):
    """Summarisation compression: the small LM summarises each passage, question in view, in at most
    ``ceil(ratio * n)`` tokens (greedy; its chat template when it has one)."""

    method = "summary"
    PROMPT = ("Summarize the dictionary entry below in a few words, keeping only what helps answer the question.\n"
              "Question: {query}\nEntry: {passage}")

    def __init__(self, tokenizer: Any, ratio: float, model: Any, summary_tokenizer: Any | None = None) -> None:
        super().__init__(tokenizer, ratio)
        self.model = model
        self.stok = summary_tokenizer or tokenizer

    @torch.inference_mode()
    def compress(self, query: str, passages: Sequence[str]) -> list[str]:
        out = []
        device = next(self.model.parameters()).device
        for p in passages:
            text = self.PROMPT.format(query=query.strip(), passage=" ".join(p.split()))
            if getattr(self.stok, "chat_template", None):
                ids = self.stok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)["input_ids"]
            else:
                ids = self.stok(text + "\nSummary:", return_tensors="pt", add_special_tokens=False).input_ids
            budget = _budget(self.ntokens(p), self.ratio)
            pad = self.stok.pad_token_id if self.stok.pad_token_id is not None else self.stok.eos_token_id
            gen = self.model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                      max_new_tokens=budget, do_sample=False, pad_token_id=pad)
            summary = self.stok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
            # the reader's tokenizer decides the budget: cut words until it holds
            words = summary.split()
            while words and self.ntokens(" ".join(words)) > budget:
                words.pop()
            out.append(" ".join(words))
        return out


def make_compressor(cfg: CompressConfig, tokenizer: Any, *, model: Any = None, summary_tokenizer: Any = None,
                    embedder: Any = None) -> Any | None:
    """The compressor of ``cfg`` (None for ``none``); ``model`` (summary, surprisal) and ``embedder``
    (similarity) are loaded with the offline defaults when not given."""
    if cfg.method == "none":
        return None
    if cfg.method == "extractive":
        return ExtractiveCompressor(tokenizer, cfg.ratio)
    if cfg.method == "truncate":
        return TruncateCompressor(tokenizer, cfg.ratio)
    if cfg.method == "similarity":
        if embedder is None:
            from retromem.index.embed import Embedder

            embedder = Embedder(device="cpu").model  # the offline all-MiniLM-L6-v2
        return SimilarityCompressor(tokenizer, cfg.ratio, embedder)
    if model is None:
        from retromem.models import load_causal_lm

        model, summary_tokenizer = load_causal_lm("smollm2-135m")
    if cfg.method == "surprisal":
        return SurprisalCompressor(tokenizer, cfg.ratio, model)
    if cfg.method == "summary":
        return SummaryCompressor(tokenizer, cfg.ratio, model, summary_tokenizer)
    raise ConfigError(f"`compress.method` (--compress) must be one of {METHODS}, got {cfg.method!r}")


__all__ = ["CompressConfig", "ExtractiveCompressor", "METHODS", "SimilarityCompressor", "SummaryCompressor",
           "SurprisalCompressor", "TruncateCompressor", "make_compressor", "sentences"]
