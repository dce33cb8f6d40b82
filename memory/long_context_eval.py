"""One long-context evaluation for the memory methods: passkey retrieval, long-document perplexity,
multi-turn recall and question answering over a long fixed context, with memory held and tokens
per second, on the same inputs for every method.

Methods (:data:`METHODS`) are bounded KV memories over the unmodified model
(:mod:`retromem.memory.kv_budget`): ``full`` (every token kept: the reference, where it fits),
``streaming_llm`` (sinks + window; the kvpress / attention-sinks baseline, see below),
``lm_infinite``, ``infllm`` (the paper's lookup), ``infllm_keys`` (the same memory; a question
or a generated token looks up blocks by every stored key, ``InfLLMConfig.lookup = "keys"``),
``infllm_keys_topk`` (its ablation: always the top-k blocks, ``min_share = 0``; the three InfLLM
lookups share one prefill) and ``sirllm``, all at one token budget (:func:`build_memory` splits
it), plus ``squeezed`` for the fixed-context task. Each input is fed in segments of
``segment`` tokens; the part that is scored (the question and its answer) comes as its own last
call, as it would at generation time, and is scored teacher-forced: an answer is right when the
argmax at every answer position is the answer token (what greedy decoding would write).

Tasks:
- ``passkey``: :func:`~retromem.memory.passkey.make_passkey` (real documentation text as the
  haystack) at each length and depth;
- ``perplexity``: documents of the corpus concatenated (EOS between them); the perplexity of its
  last ``ppl_score`` tokens after the preceding ``length`` - ``ppl_score`` tokens (the same scored
  tokens at every length: only the context differs);
- ``recall`` (built like SirLLM's multi-turn tasks): a long dialogue whose user turns state
  facts ("Alice's locker number is 48213") among turns of real text; at the end every fact is
  asked in turn, one call per question; the score is the share recalled;
- ``qa`` (Squeezed Attention's setting): facts planted in a fixed context of ``qa_length`` tokens,
  prefilled once and clustered; each question is asked against it (the tokens after the context
  dropped between questions) at each keys ``fraction`` (1 = full attention).

Baselines from the field's libraries cannot run beside transformers 5.24: ``kvpress`` 0.5.5
(the newest) requires transformers < 5.3 and its hooks read the ``past_key_values`` and
``cache_position`` attention arguments that transformers 5.24 renamed (``cache``) and removed;
``attention-sinks`` 0.4.0 pins transformers 4.34. They run in their own environments on the
examples :func:`passkey_examples` builds (``benchmarks/memory_long_context.py --export-passkey``,
``benchmarks/library_streaming_llm.py``). ``streaming_llm`` is this package's own sink + window
cache (:class:`~retromem.memory.kv_budget.StreamingLLM`); on the shared examples it writes what both
libraries write. Trained memories (Infini-attention, AutoCompressor) run on the same inputs with
their fixed ablation beside them (:class:`TrainedMemory`, ``LongEvalConfig.trained``).
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from retromem.config import fail, integer, is_int, is_number, non_negative_int, one_of, positive_int
from retromem.memory.kv_budget import FullAttention, KVMemory, StreamingLLM, enable, stream
from retromem.stats import wilson

logger = logging.getLogger(__name__)

METHODS = ("full", "streaming_llm", "lm_infinite", "infllm", "infllm_keys", "infllm_keys_topk", "sirllm")
# InfLLM's lookups: the same memory, differing only in what a short call (a question, a generated
# token) looks up; requested together, they share one prefill (:func:`passkey_task`)
INFLLM_LOOKUPS = {"infllm": {"lookup": "repr"}, "infllm_keys": {"lookup": "keys"},
                  "infllm_keys_topk": {"lookup": "keys", "min_share": 0.0}}
TASKS = ("passkey", "perplexity", "recall", "qa")
METHOD_LABELS = {"full": "full attention", "streaming_llm": "StreamingLLM (sinks + window)",
                 "lm_infinite": "LM-Infinite", "infllm": "InfLLM",
                 "infllm_keys": "InfLLM, key lookup for short calls",
                 "infllm_keys_topk": "InfLLM, key lookup, always top-k (ablation)", "sirllm": "SirLLM", "squeezed": "Squeezed Attention",
                 # trained memories and their ablation on the same weights (TrainedMemory)
                 "infini_attention": "Infini-attention (fine-tuned), memory on",
                 "infini_attention_knocked_out": "Infini-attention, memory read zeroed (same weights)",
                 "autocompressor": "AutoCompressor (fine-tuned), summaries on",
                 "autocompressor_knocked_out": "AutoCompressor, no summaries (same weights)",
                 # the field's libraries, run in their own environments on the exported examples
                 "kvpress_streaming_llm": "kvpress StreamingLLMPress", "attention_sinks": "attention-sinks"}

METHOD_COLORS = {"full": "tab:blue", "streaming_llm": "tab:orange", "lm_infinite": "tab:green", "infllm": "tab:red",
                 "infllm_keys": "darkred", "infllm_keys_topk": "salmon", "sirllm": "tab:purple", "squeezed": "tab:brown", "infini_attention": "tab:olive",
                 "infini_attention_knocked_out": "tab:gray", "autocompressor": "tab:cyan",
                 "autocompressor_knocked_out": "tab:pink", "kvpress_streaming_llm": "gold", "attention_sinks": "black"}

NAMES = ("Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena",
         "Marek", "Nadia", "Oskar", "Priya")


@dataclass(frozen=True)
class LongEvalConfig:
    """methods / tasks: what runs; budget: tokens of KV each bounded method keeps per layer;
    segment: tokens per call; lengths / depths / samples: passkey grid; ppl_lengths / ppl_score:
    perplexity of the last ppl_score tokens of inputs of each length; recall_length / recall_facts
    / recall_dialogues: the multi-turn task; qa_length / qa_questions / qa_contexts / fractions: Squeezed
    Attention's task; full_max: longest input run with full attention; trained: saved Infini-attention /
    AutoCompressor directories run on the same passkey and perplexity inputs (:func:`trained_task`)."""

    out: str
    methods: tuple[str, ...] = METHODS
    tasks: tuple[str, ...] = TASKS
    budget: int = 1024
    segment: int = 512
    lengths: tuple[int, ...] = (2048, 8192)
    depths: tuple[float, ...] = (0.5,)
    samples: int = 1
    ppl_lengths: tuple[int, ...] = (2048, 8192)
    ppl_score: int = 512
    ppl_streams: int = 1
    recall_length: int = 4096
    recall_facts: int = 8
    recall_dialogues: int = 1
    qa_length: int = 4096
    qa_questions: int = 8
    qa_contexts: int = 1
    fractions: tuple[float, ...] = (1.0, 0.25)
    full_max: int = 16384
    trained: tuple[str, ...] = ()
    seed: int = 0
    corpus: str | None = None

    def __post_init__(self) -> None:
        for m in self.methods:
            one_of(m, "methods", METHODS, flag="--methods")
        for t in self.tasks:
            one_of(t, "tasks", TASKS, flag="--tasks")
        integer(self.budget, "budget", ge=64, flag="--budget")
        positive_int(self.segment, "segment", flag="--segment")
        for key, flag in (("lengths", "--lengths"), ("ppl_lengths", "--ppl-lengths")):
            v = getattr(self, key)
            if not all(is_int(n) and n >= 256 for n in v):
                fail(key, "be input lengths >= 256 tokens", v, flag=flag)
            object.__setattr__(self, key, tuple(int(n) for n in v))
        if not self.depths or not all(is_number(d) and 0 <= d <= 1 for d in self.depths):
            fail("depths", "lie in [0, 1]", self.depths, flag="--depths")
        if not self.fractions or not all(is_number(f) and 0 < f <= 1 for f in self.fractions):
            fail("fractions", "lie in (0, 1]", self.fractions, flag="--fractions")
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "trained", tuple(str(p) for p in self.trained))
        non_negative_int(self.samples, "samples", flag="--samples")
        integer(self.ppl_score, "ppl_score", ge=16, flag="--ppl-score")
        positive_int(self.ppl_streams, "ppl_streams", flag="--ppl-streams")
        integer(self.recall_length, "recall_length", ge=256, flag="--recall-length")
        positive_int(self.recall_facts, "recall_facts", flag="--recall-facts")
        if self.recall_facts > len(NAMES):
            fail("recall_facts", f"be at most {len(NAMES)}", self.recall_facts, flag="--recall-facts")
        non_negative_int(self.recall_dialogues, "recall_dialogues", flag="--recall-dialogues")
        integer(self.qa_length, "qa_length", ge=256, flag="--qa-length")
        positive_int(self.qa_questions, "qa_questions", flag="--qa-questions")
        if self.qa_questions > len(NAMES):
            fail("qa_questions", f"be at most {len(NAMES)}", self.qa_questions, flag="--qa-questions")
        positive_int(self.qa_contexts, "qa_contexts", flag="--qa-contexts")
        positive_int(self.full_max, "full_max", flag="--full-max")
        integer(self.seed, "seed")


def infllm_config(method: str, budget: int) -> Any:
    """The :class:`~retromem.memory.infllm.InfLLMConfig` of an InfLLM method (:data:`INFLLM_LOOKUPS`) at ``budget``."""
    from retromem.memory.infllm import InfLLMConfig

    return replace(InfLLMConfig.for_budget(budget), **INFLLM_LOOKUPS[method])


def build_memory(method: str, model: Any, budget: int) -> KVMemory:
    """The memory of ``method`` holding about ``budget`` tokens per layer (``full``: unbounded).

    StreamingLLM / LM-Infinite: 4 sinks + a window of the rest. SirLLM: 4 sinks, half the rest
    for entropy-selected tokens, half for the window. InfLLM: the paper's proportions
    (:meth:`~retromem.memory.infllm.InfLLMConfig.for_budget`; 6,399 is the paper's configuration);
    ``infllm_keys`` the same with ``lookup="keys"``, ``infllm_keys_topk`` also with ``min_share=0``
    (:data:`INFLLM_LOOKUPS`)."""
    from retromem.memory.infllm import InfLLM
    from retromem.memory.lm_infinite import LMInfinite, LMInfiniteConfig
    from retromem.memory.sirllm import SirLLM, SirLLMConfig

    if method == "full":
        return FullAttention(model)
    if method == "streaming_llm":
        return StreamingLLM(model, n_sink=4, n_local=budget - 4)
    if method == "lm_infinite":
        return LMInfinite(model, LMInfiniteConfig(n_global=4, n_local=budget - 4))
    if method == "sirllm":
        half = (budget - 4) // 2
        return SirLLM(model, SirLLMConfig(n_sink=4, n_keep=half, n_local=budget - 4 - half))
    if method in INFLLM_LOOKUPS:
        return InfLLM(model, infllm_config(method, budget))
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _stats(memory: KVMemory, tokens: int, seconds: float) -> dict[str, Any]:
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else None,
            "attention_mib": round(memory.attention_bytes() / 2 ** 20, 3),
            "store_mib": round(memory.store_bytes() / 2 ** 20, 3), "held_tokens": memory.held_tokens(0)}


def run_pieces(model: Any, memory: KVMemory, pieces: list[torch.Tensor], segment: int,
               scored: set[int]) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Feed ``pieces`` (each (1, n)) in order through one memory; the logits of the pieces whose
    index is in ``scored`` (each piece in one call). Returns (logits by piece, stats)."""
    out: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    tokens = 0
    for i, p in enumerate(pieces):
        if i in scored:
            out[i] = stream(model, p, memory, segment=max(segment, p.shape[1]), keep_logits="all")
        else:
            stream(model, p, memory, segment=segment)
        tokens += p.shape[1]
    return out, _stats(memory, tokens, time.perf_counter() - t0)


def _answer_right(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> bool:
    """logits (1, n, V) of a piece whose tokens are ``ids`` (1, n): are tokens start..end-1 the argmax?"""
    pred = logits[0, start - 1:end - 1].argmax(-1)
    return bool((pred == ids[0, start:end]).all())


def _answer_logprob(logits: torch.Tensor, ids: torch.Tensor, start: int, end: int) -> float:
    """Teacher-forced log-probability (nats) of tokens start..end-1 of ``ids`` under ``logits``."""
    lp = torch.log_softmax(logits[0, start - 1:end - 1].float(), -1)
    return float(lp.gather(-1, ids[0, start:end, None]).sum())


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

def walk_prefix_tree(examples: list[tuple[torch.Tensor, int]], segment: int, state: Any,
                     advance: Callable[[Any, torch.Tensor], Any], fork: Callable[[Any], Any],
                     leaf: Callable[[Any, int, int], Any]) -> Iterator[tuple[int, Any]]:
    """Visit ``examples`` whose tokens share prefixes, each shared prefix advanced once.

    Each example is (ids (1, n), cut): ``ids[:, :cut]`` is what any state may see before the
    example parts from the others. The examples form a tree (passkey examples over one haystack
    share the text before their needles; examples of several lengths with the needle at the same
    place share everything before their questions): a common prefix is advanced once, up to the
    last multiple of ``segment`` before the examples part, where the state is forked and each part
    continues from its own copy. ``advance(state, ids) -> state`` feeds ids (a memory may change in
    place and return itself); ``fork(state)`` copies it; ``leaf(state, pos, i)`` finishes example
    ``i`` from a state that has seen ``ids[:, :pos]`` (pos a multiple of ``segment``). Yields
    (i, leaf's result) as each example completes; at most one fork per level of the tree is alive."""

    def lcp(a: torch.Tensor, b: torch.Tensor) -> int:
        n = min(a.shape[1], b.shape[1])
        diff = (a[0, :n] != b[0, :n]).nonzero()
        return int(diff[0]) if diff.numel() else n

    def solve(state: Any, pos: int, group: list[int]) -> Iterator[tuple[int, Any]]:
        # every example of ``group`` starts with ids[:pos], which ``state`` has seen (pos on a boundary)
        first = examples[group[0]][0]
        common = min([lcp(first, examples[i][0]) for i in group[1:]] + [examples[i][1] for i in group])
        upto = (common // segment) * segment if len(group) > 1 else pos
        if upto > pos:
            state = advance(state, first[:, pos:upto])
            pos = upto
        if len(group) == 1:
            yield group[0], leaf(state, pos, group[0])
            return
        # parts: examples that end within the next segment go alone, the rest by their next segment
        parts: list[list[int]] = []
        for i in group:
            ids, cut = examples[i]
            for part in parts:
                j = part[0]
                if cut > pos + segment and examples[j][1] > pos + segment and \
                        bool((examples[j][0][:, pos:pos + segment] == ids[:, pos:pos + segment]).all()):
                    part.append(i)
                    break
            else:
                parts.append([i])
        parts.sort(key=len)  # the largest part goes on with this state: at most one copy per level is alive
        for n, part in enumerate(parts):
            yield from solve(fork(state) if n < len(parts) - 1 else state, pos, part)

    yield from solve(state, 0, list(range(len(examples))))


def run_shared_prefix(model: Any, make_memory: Callable[[], KVMemory], examples: list[tuple[torch.Tensor, int]],
                      segment: int, greedy: tuple[list[int], int] | None = None,
                      variants: list[Callable[[KVMemory], None]] | None = None
                      ) -> Iterator[tuple[int, torch.Tensor, dict[str, Any]]]:
    """:func:`run_pieces` over ``examples`` whose tokens share prefixes, each shared prefix run once
    (:func:`walk_prefix_tree` with a memory that is deep-copied where examples part).

    Each example is (ids (1, n), cut): the pieces ``ids[:, :cut]`` and ``ids[:, cut:]`` (the latter
    scored, as one call). Every example sees exactly the calls of a fresh :func:`run_pieces` (the
    same segment boundaries from the same memory state), so its logits are identical (tested).
    Yields (index, scored logits (1, n - cut, V), stats over the tokens run for this example alone;
    ``shared_tokens`` came from common prefixes) as each example completes.

    ``greedy`` = (prompt ends, new tokens): also decode greedily from a copy of each example's
    memory after ``ids[:, cut:end]`` (the question without its answer); the tokens go in the
    stats as ``generated``.

    ``variants``: functions that turn a copy of the memory into another method's (for InfLLM, its
    lookup: :meth:`~retromem.memory.infllm.InfLLM.relookup`). Each example's last, partial segment
    before ``cut``, its question and its greedy decoding then run once per variant, from a copy
    taken at that segment boundary; everything before it runs once. That equals a fresh run of each
    variant only where the variants make the same calls identically up to there (InfLLM's lookups
    on full segments: :meth:`~retromem.memory.infllm.InfLLMConfig.short_lookup`, checked by the caller).
    Yields one tuple per variant, in order, with ``variant`` (its index) in the stats."""
    import copy

    def advance(memory: KVMemory, ids: torch.Tensor) -> KVMemory:
        stream(model, ids, memory, segment=segment)
        return memory

    def leaf(memory: KVMemory, pos: int, i: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        ids, cut = examples[i]
        t0 = time.perf_counter()
        split = cut if variants is None else cut - (cut - pos) % segment
        if split > pos:
            stream(model, ids[:, pos:split], memory, segment=segment)
        shared_s = time.perf_counter() - t0
        out = []
        for v, setup in enumerate(variants or [None]):
            t0 = time.perf_counter()
            mem = memory
            if setup is not None:
                mem = copy.deepcopy(memory) if v < len(variants) - 1 else memory
                setup(mem)
            if cut > split:
                stream(model, ids[:, split:cut], mem, segment=segment)
            extra: dict[str, Any] = {} if variants is None else {"variant": v}
            if greedy is not None:  # not timed: tokens/s is over the example's own input tokens
                t1 = time.perf_counter()
                extra["generated"] = _greedy(model, copy.deepcopy(mem), ids[:, cut:greedy[0][i]], greedy[1])
                t0 += time.perf_counter() - t1
            logits = stream(model, ids[:, cut:], mem, segment=max(segment, ids.shape[1] - cut), keep_logits="all")
            st = _stats(mem, ids.shape[1] - pos, shared_s + time.perf_counter() - t0)
            out.append((logits, {**st, "shared_tokens": pos, **extra}))
        return out

    for i, results in walk_prefix_tree(examples, segment, make_memory(), advance, copy.deepcopy, leaf):
        for logits, st in results:
            yield i, logits, st


def _greedy(model: Any, memory: KVMemory, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` (1, n) through ``memory``, one call per new token."""
    logits = stream(model, prompt, memory, segment=max(1, prompt.shape[1]), keep_logits="last")
    out = []
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = stream(model, torch.tensor([[nxt]]), memory, segment=1, keep_logits="last")
    return out


def _round_robin(runs: list[tuple[str, list[int], Iterator]]) -> Iterator[tuple]:
    live = list(runs)
    while live:
        for run in list(live):
            try:
                j, logits, st = next(run[2])
            except StopIteration:
                live.remove(run)
                continue
            yield run[0], run[1], j, logits, st


def passkey_grid(lengths: tuple[int, ...], depths: tuple[float, ...]) -> dict[int, list[int]]:
    """Needle places (haystack tokens before the needle) per length: depth d of length L puts the
    needle after round(d * L) haystack tokens, so lengths that are multiples of each other share
    needle places (0.25 of 8K = 0.125 of 16K) and the examples share all but their questions."""
    return {L: sorted({round(d * L) for d in depths}) for L in lengths}


def passkey_examples(tok: Any, cfg: LongEvalConfig) -> Iterator[tuple[int, list[tuple[int, Any, float]],
                                                                     list[tuple[torch.Tensor, int]]]]:
    """The passkey examples of ``cfg``, sample by sample: (sample, [(length, PasskeyExample, depth)],
    [(ids (1, n), start of the question)]). Per sample one stretch of haystack and, for every length
    and depth, a needle (:func:`passkey_grid`; one key per needle place): every method, trained or
    not, and the library baselines (exported with ``--export-passkey``) read these same examples."""
    from retromem.memory.passkey import NEEDLE, PREFIX, QUESTION, make_passkey, token_stream

    rng = random.Random(cfg.seed)
    hay = token_stream(tok, max(cfg.lengths) + 1000, cfg.corpus)
    enc = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    n_question = enc(QUESTION)
    for s in range(cfg.samples):
        offset = rng.randrange(0, len(hay) - max(cfg.lengths) + 1)
        seeds: dict[int, int] = {}
        meta, examples = [], []
        for n in cfg.lengths:
            for place in passkey_grid((n,), cfg.depths)[n]:
                seed = seeds.setdefault(place, rng.randrange(2 ** 31))
                key = str(random.Random(seed).randrange(10 ** 4, 10 ** 5))  # the key make_passkey draws first
                n_hay = n - enc(PREFIX) - enc(NEEDLE.format(key=key)) - n_question - enc(" " + key)
                # a haystack of exactly n_hay tokens (make_passkey's offset is then 0), the needle
                # after ``place`` of them: the same text and key wherever the place recurs
                ex = make_passkey(tok, n, min(place, n_hay) / n_hay, hay[offset:offset + n_hay], random.Random(seed))
                assert ex.needle_start == enc(PREFIX) + min(place, n_hay)
                meta.append((n, ex, min(place, n_hay) / n_hay))
                examples.append((torch.tensor([ex.input_ids]), ex.answer_start - n_question))
        yield s, meta, examples


GREEDY_TOKENS = 8  # new tokens decoded greedily after the passkey question


def passkey_scores(tok: Any, logits: torch.Tensor, ids: torch.Tensor, ex: Any, generated: list[int]) -> dict[str, Any]:
    """The three passkey scores of one example from the logits (1, n - c, V) of its last n - c
    tokens ``ids`` (1, n - c) (c: where the scored call starts) and the greedily generated tokens.

    correct: every digit of the key is the argmax after "The pass key is" and the answer's leading
    space (teacher-forced); strict: the space too (SmolLM2 writes the space before digits as its own
    token, which the small model often puts after " a"); greedy: the first number greedy decoding
    writes is the key (InfiniteBench's rule); key_logprob: the teacher-forced log-probability of the
    key's tokens in nats (graded, where the other three are right or wrong). The teacher-forced
    scores flatter a memory that looks up by its queries (InfLLM): the question and answer come as
    one call, so the answer's own queries help choose what the question attends; greedy decoding
    has no such help."""
    n = len(ex.input_ids)
    c = n - ids.shape[1]
    first_digit = next(i for i in range(ex.answer_start, n) if any(ch.isdigit() for ch in tok.decode(ex.input_ids[i])))
    text = tok.decode(generated)
    found = re.findall(r"\d+", text)
    return {"correct": _answer_right(logits, ids, first_digit - c, n - c),
            "strict": _answer_right(logits, ids, ex.answer_start - c, n - c),
            "key_logprob": round(_answer_logprob(logits, ids, first_digit - c, n - c), 4),
            "greedy": bool(found) and found[0] == ex.key, "generated": text}


def passkey_task(model: Any, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    """Passkey examples (:func:`passkey_examples`); all examples of a sample form one tree of shared
    prefixes, run once per method (:func:`run_shared_prefix`: the logits of separate runs); each
    example is scored on its own answer (:func:`passkey_scores`). InfLLM's lookups
    (:data:`INFLLM_LOOKUPS`) requested together share one prefill where that is exact (every
    full segment's lookup is the paper's): only the last partial segment, the question and the
    answer run per lookup, so they are compared on the same memory."""
    lookups = [m for m in cfg.methods if m in INFLLM_LOOKUPS]
    groups = [[m] for m in cfg.methods if m not in INFLLM_LOOKUPS]
    if len(lookups) > 1 and not any(infllm_config(m, cfg.budget).short_lookup(cfg.segment) for m in lookups):
        groups.append(lookups)
    else:
        groups += [[m] for m in lookups]
    for s, meta, examples in passkey_examples(tok, cfg):
        runs = []
        for group in groups:
            method = group[0]
            keep = [i for i, m in enumerate(meta) if not (method == "full" and m[0] > cfg.full_max)]
            variants = None if len(group) == 1 else [lambda mem, m=m: mem.relookup(**INFLLM_LOOKUPS[m]) for m in group]
            runs.append((group, keep, run_shared_prefix(
                model, lambda method=method: build_memory(method, model, cfg.budget), [examples[i] for i in keep],
                cfg.segment, greedy=([meta[i][1].answer_start for i in keep], GREEDY_TOKENS), variants=variants)))
        # the methods take turns, one example each, so a long run has every method's rows on the same
        # examples so far
        for group, keep, j, logits, st in _round_robin(runs):
            method = group[st.pop("variant", 0)]
            n, ex, depth = meta[keep[j]]
            ids, cut = examples[keep[j]]
            scores = passkey_scores(tok, logits, ids[:, cut:], ex, st.pop("generated"))
            emit({"task": "passkey", "method": method, "length": n, "depth": round(depth, 4), "sample": s,
                  "seed": cfg.seed, "key": ex.key, **scores, "needle_at": ex.needle_start, **st})


def perplexity_inputs(tok: Any, cfg: LongEvalConfig) -> Iterator[tuple[int, int, torch.Tensor, int]]:
    """(stream, length, ids (1, length), cut): ``ppl_streams`` disjoint stretches of the corpus
    (consecutive, each of the longest length); every length scores the same last ``ppl_score``
    tokens (from ``cut`` on) after more or less context."""
    from retromem.memory.passkey import token_stream

    longest = max(cfg.ppl_lengths)
    text = token_stream(tok, longest * cfg.ppl_streams, cfg.corpus)
    for k in range(cfg.ppl_streams):
        stream_ids = torch.tensor([text[k * longest:(k + 1) * longest]])
        for n in cfg.ppl_lengths:
            yield k, n, stream_ids[:, -n:], n - cfg.ppl_score


def perplexity_task(model: Any, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    for k, n, ids, cut in perplexity_inputs(tok, cfg):
        for method in cfg.methods:
            if method == "full" and n > cfg.full_max:
                continue
            mem = build_memory(method, model, cfg.budget)
            logits, st = run_pieces(model, mem, [ids[:, :cut], ids[:, cut:]], cfg.segment, {1})
            nll = torch.nn.functional.cross_entropy(logits[1][0, :-1].float(), ids[0, cut + 1:], reduction="sum")
            emit({"task": "perplexity", "method": method, "length": n, "stream": k, "nll": float(nll),
                  "scored": n - cut - 1, "perplexity": math.exp(float(nll) / (n - cut - 1)), **st})


# ----------------------------------------------------------------------------------------------
# Trained memories (Infini-attention, AutoCompressor) on the same inputs
# ----------------------------------------------------------------------------------------------

TRAINED_MODES = ("memory", "knocked_out")


class TrainedMemory:
    """A saved Infini-attention / AutoCompressor model's memory as a value that the passkey tree and
    the perplexity inputs advance segment by segment.

    The state is Infini-attention's compressive memory (:class:`~retromem.memory.infini_attention.InfiniMemory`)
    or the AutoCompressor's accumulated summary vectors (its soft prompt); both are advanced over
    whole segments only, as in training and in :func:`retromem.memory.evaluation.logits_for` (which
    this reproduces, tested). Two modes, the fidelity issue's ablation beside the memory:
    ``memory`` (as trained) and ``knocked_out`` (Infini: the memory read zeroed, the gate's damping
    kept; AutoCompressor: no summaries, every segment alone), on the same weights. No model
    fine-tuned the same way without a memory module exists; that control is not run."""

    def __init__(self, model: Any) -> None:
        from retromem.memory.evaluation import segment_length_of
        from retromem.memory.infini_attention import InfiniAttentionLM

        self.model = model
        self.infini = isinstance(model, InfiniAttentionLM)
        self.seg = segment_length_of(model)
        self.name = "infini_attention" if self.infini else "autocompressor"
        base = model.base.config
        heads = getattr(base, "num_key_value_heads", None) or base.num_attention_heads
        head_dim = getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads
        # bytes of one token's keys and values over all layers (fp32, as the models run here)
        self.kv_token_bytes = 2 * base.num_hidden_layers * heads * head_dim * 4

    def method(self, mode: str) -> str:
        return self.name if mode == "memory" else f"{self.name}_knocked_out"

    def advance(self, state: Any, ids: torch.Tensor) -> Any:
        """The state after ``ids`` (1, whole segments) more; ``state`` itself is not changed."""
        assert ids.shape[1] % self.seg == 0, (ids.shape, self.seg)
        with torch.inference_mode():
            if self.infini:
                return self.model(ids, memory=state, keep_logits="none").memory
            return self.model.compress(ids, softprompt=state, segment_lengths=[self.seg])

    def logits(self, state: Any, ids: torch.Tensor, mode: str) -> torch.Tensor:
        """Logits (1, n, V) of ``ids`` (1, n), which start on a segment boundary after ``state``."""
        from retromem.memory.evaluation import logits_for

        if mode == "knocked_out":  # nothing is read from before: the state does not matter
            return logits_for(self.model, ids, "knocked_out", 0)
        with torch.inference_mode():
            if self.infini:
                old = self.model.gate_mode
                try:
                    self.model.set_gate_mode("learned")
                    return self.model(ids, memory=state, keep_logits="all").logits
                finally:
                    self.model.set_gate_mode(old)
            return self.model(ids, softprompt=state, segment_lengths=[self.seg]).logits

    def held_mib(self, state: Any, mode: str) -> float:
        """Memory held for attention: the local segment's keys and values, plus the compressive
        memory (Infini) or the summary vectors' keys and values (AutoCompressor), memory on only."""
        held = self.seg * self.kv_token_bytes
        if mode == "memory" and state is not None:
            held += state.nbytes() if self.infini else (state.shape[1] + self.model.memory_config.summary_length) * self.kv_token_bytes
        return round(held / 2 ** 20, 3)


def trained_passkey(tm: TrainedMemory, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    """The passkey examples of :func:`passkey_examples` through a trained memory, in both
    :data:`TRAINED_MODES`, with the three scores of :func:`passkey_scores`. The shared prefixes of a
    sample are advanced once (:func:`walk_prefix_tree`; the states are values, so a fork is the
    state itself); each example then advances to the segment boundary before its question's last
    token and reads the rest (question and answer) in one call, and greedy decoding re-reads that
    short tail with each new token (at most a segment plus :data:`GREEDY_TOKENS`)."""
    if cfg.segment % tm.seg:
        fail("segment", f"be a multiple of the trained model's segment length {tm.seg}", cfg.segment, flag="--segment")
    for s, meta, examples in passkey_examples(tok, cfg):
        def leaf(state: Any, pos: int, i: int) -> list[dict[str, Any]]:
            n, ex, depth = meta[i]
            ids = examples[i][0]
            first = (ex.answer_start - 1) // tm.seg * tm.seg  # the segments before it are what the memory holds
            rows = []
            t0 = time.perf_counter()
            if first > pos:
                state = tm.advance(state, ids[:, pos:first])
            for mode in TRAINED_MODES:
                t1 = time.perf_counter()
                tail = ids[:, first:]
                logits = tm.logits(state, tail, mode)
                own = time.perf_counter() - (t0 if mode == "memory" else t1)
                prompt = ids[:, first:ex.answer_start]
                generated: list[int] = []
                for _ in range(GREEDY_TOKENS):
                    nxt = int(tm.logits(state, torch.cat([prompt, torch.tensor([generated], dtype=prompt.dtype)], 1)
                                        if generated else prompt, mode)[0, -1].argmax())
                    generated.append(nxt)
                rows.append({"task": "passkey", "method": tm.method(mode), "length": n, "depth": round(depth, 4),
                             "sample": s, **passkey_scores(tok, logits, tail, ex, generated), "needle_at": ex.needle_start,
                             "seconds": round(own, 3), "tokens": n - pos if mode == "memory" else n - first,
                             "tokens_per_s": round((n - pos) / own, 2) if mode == "memory" else None,
                             "attention_mib": tm.held_mib(state, mode), "store_mib": 0.0, "shared_tokens": pos})
            return rows

        for _, rows in walk_prefix_tree(examples, cfg.segment, None, tm.advance, lambda st: st, leaf):
            for row in rows:
                emit(row)


def trained_perplexity(tm: TrainedMemory, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    """The perplexity inputs of :func:`perplexity_inputs` through a trained memory in both modes: the
    memory of the segments before the scored tokens' first segment, then that segment on."""
    for k, n, ids, cut in perplexity_inputs(tok, cfg):
        first = cut // tm.seg * tm.seg
        t0 = time.perf_counter()
        state = tm.advance(None, ids[:, :first]) if first else None
        for mode in TRAINED_MODES:
            t1 = time.perf_counter()
            logits = tm.logits(state, ids[:, first:], mode)[:, cut - first:]
            own = time.perf_counter() - (t0 if mode == "memory" else t1)
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, cut + 1:], reduction="sum")
            emit({"task": "perplexity", "method": tm.method(mode), "length": n, "stream": k, "nll": float(nll),
                  "scored": n - cut - 1, "perplexity": math.exp(float(nll) / (n - cut - 1)),
                  "seconds": round(own, 3), "tokens": n, "tokens_per_s": round(n / own, 2) if mode == "memory" else None,
                  "attention_mib": tm.held_mib(state, mode), "store_mib": 0.0})


def trained_task(path: str, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    """Passkey and perplexity (those of ``cfg.tasks``) for the saved memory model at ``path``, on the
    inputs of the other methods (built with ``tok``: the checkpoint's own tokenizer must agree)."""
    from retromem.memory.loading import load_memory_model
    from retromem.memory.passkey import NEEDLE, PREFIX, QUESTION

    model, own_tok = load_memory_model(path)
    model.eval()
    probe = PREFIX + NEEDLE.format(key="48213") + QUESTION
    if _enc(own_tok, probe) != _enc(tok, probe):
        fail("trained", "use the evaluated model's tokenizer (the examples are built with it)", path, flag="--trained")
    tm = TrainedMemory(model)
    if "passkey" in cfg.tasks:
        trained_passkey(tm, tok, cfg, emit)
    if "perplexity" in cfg.tasks:
        trained_perplexity(tm, tok, cfg, emit)


def _enc(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


WORDS = ("walrus", "lantern", "cactus", "violin", "anchor", "pepper", "glacier", "saddle", "trumpet", "falcon",
         "marble", "compass", "thimble", "orchid", "harbor", "kettle", "lobster", "meadow", "pyramid", "quartz",
         "raven", "satchel", "tulip", "volcano", "wombat", "zeppelin", "biscuit", "canyon", "dolphin", "emerald",
         "feather", "giraffe", "hammock", "igloo", "jigsaw", "koala", "lemonade", "mustard", "nutmeg", "octopus",
         "parsley", "quilt", "rhubarb", "sparrow", "tornado", "umbrella", "velvet", "walnut")
FACT_KINDS = {"number": "locker number", "word": "password"}  # kind of fact -> what the dialogue calls it


@dataclass(frozen=True)
class Dialogue:
    """A multi-turn recall example: ``body`` is streamed; ``questions`` are (ids, answer start, answer
    end), each asked as one call; ``kinds[i]`` and ``fact_end[i]`` (the body index just after the
    fact) belong to ``questions[i]``."""

    body: list[int]
    questions: list[tuple[list[int], int, int]]
    kinds: list[str]
    fact_end: list[int]
    turn_ends: tuple[int, ...] = ()  # body index after each turn, ascending, the last = len(body)

    def turns(self) -> list[list[int]]:
        """The body cut into its turns (fed one call per turn, as SirLLM's runs feed a dialogue)."""
        starts = (0,) + self.turn_ends[:-1]
        return [self.body[a:b] for a, b in zip(starts, self.turn_ends)]


def _filler_turns(tok: Any, n: int, filler: list[int], offset: int, rng: random.Random,
                  ends: list[int] | None = None) -> tuple[list[int], int]:
    """Exactly ``n`` tokens of user turns of real text ("User: ...\\nAssistant: Thanks, go on.\\n");
    returns (ids, the filler offset after them); appends each turn's end (index in the returned
    ids) to ``ends``."""
    head, tail = _enc(tok, "User: "), _enc(tok, "\nAssistant: Thanks, go on.\n")
    out: list[int] = []
    while len(out) < n:
        room = n - len(out) - len(head) - len(tail)
        if room < 8:  # too little room for one more turn: plain text to the end
            take = n - len(out)
            out += filler[offset:offset + take]
            offset += take
        else:
            take = min(rng.randrange(60, 160), room)
            out += head + filler[offset:offset + take] + tail
            offset += take
        if ends is not None:
            ends.append(len(out))
    return out, offset


def build_dialogue(tok: Any, length: int, n_facts: int, filler: list[int], rng: random.Random,
                   kinds: tuple[str, ...] = ("number",), far: int = 0) -> Dialogue:
    """A dialogue of exactly ``length`` tokens: ``n_facts`` fact turns among user turns of real text,
    then one question turn per fact, in random order.

    Facts are spread over the body (one at a random place in each of ``n_facts`` equal stretches)
    and every fact ends at least ``far`` tokens before the body ends, so a window of ``far`` tokens
    before the questions holds none of them. ``kinds`` cycles over the facts (shuffled): ``number``
    ("Alice's locker number is 48213": five digits, one token each in most tokenizers, ~2.3 nats
    apiece) and ``word`` ("Alice's password is walrus": a noun, like the items of SirLLM's grocery
    task)."""
    for k in kinds:
        one_of(k, "recall kinds", tuple(FACT_KINDS))
    names = rng.sample(NAMES, n_facts)
    kind_of = [kinds[i % len(kinds)] for i in range(n_facts)]
    rng.shuffle(kind_of)
    words = iter(rng.sample(WORDS, n_facts))
    values = [str(rng.randrange(10000, 100000)) if k == "number" else next(words) for k in kind_of]
    facts = [_enc(tok, f"User: Please remember this: {n}'s {FACT_KINDS[k]} is {v}.\nAssistant: Noted.\n")
             for n, k, v in zip(names, kind_of, values)]
    order = rng.sample(range(n_facts), n_facts)
    questions = []
    for i in order:
        what = f"{names[i]}'s {FACT_KINDS[kind_of[i]]}"
        head = _enc(tok, f"User: What is {what}?\nAssistant: {what} is")
        ans = _enc(tok, " " + values[i])
        questions.append((head + ans + _enc(tok, ".\n"), len(head), len(head) + len(ans)))
    body_len = length - sum(len(q[0]) for q in questions)
    free = body_len - sum(len(f) for f in facts)  # filler tokens in the body
    room = free - far  # where facts may start (in filler tokens before them)
    if room < 8 * n_facts:
        fail("recall_length", f"leave room for {n_facts} facts ending at least {far} tokens (the budget) "
             "before the questions", length, flag="--recall-length")
    starts = [int(room * (j + rng.random()) / n_facts) for j in range(n_facts)]  # one per stretch, ascending
    body: list[int] = []
    fact_end = []
    offset = rng.randrange(0, max(1, len(filler) - length * 2))
    done = 0  # filler tokens placed so far
    turn_ends: list[int] = []
    for s, fact in zip(starts, facts):
        ends: list[int] = []
        gap, offset = _filler_turns(tok, s - done, filler, offset, rng, ends)
        turn_ends += [len(body) + e for e in ends]
        body += gap + fact
        done = s
        fact_end.append(len(body))
        turn_ends.append(len(body))
    ends = []
    gap, offset = _filler_turns(tok, free - done, filler, offset, rng, ends)
    turn_ends += [len(body) + e for e in ends]
    body += gap
    assert len(body) == body_len and body_len - fact_end[-1] >= far and turn_ends[-1] == body_len
    return Dialogue(body, questions, [kind_of[i] for i in order], [fact_end[i] for i in order], tuple(turn_ends))


def make_dialogue(tok: Any, length: int, n_facts: int, filler: list[int], rng: random.Random
                  ) -> tuple[list[int], list[tuple[list[int], int, int]]]:
    """:func:`build_dialogue` with number facts anywhere in the body: (body ids, [(question ids,
    answer start, answer end)])."""
    d = build_dialogue(tok, length, n_facts, filler, rng)
    return d.body, d.questions


def recall_task(model: Any, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None]) -> None:
    """Dialogues of ``recall_length`` tokens, half number and half word facts, each ending at least
    ``budget`` tokens before the questions (beyond every bounded method's window); one row per
    dialogue and method, with each question's result in ``right`` (paired across methods)."""
    from retromem.memory.passkey import token_stream

    rng = random.Random(cfg.seed + 1)
    filler = token_stream(tok, cfg.recall_length * 3, cfg.corpus, skip_docs=5)
    for d in range(cfg.recall_dialogues):
        dia = build_dialogue(tok, cfg.recall_length, cfg.recall_facts, filler, rng, kinds=("number", "word"),
                             far=cfg.budget)
        body, questions = dia.body, dia.questions
        pieces = [torch.tensor([body])] + [torch.tensor([q[0]]) for q in questions]
        for method in cfg.methods:
            if method == "full" and cfg.recall_length > cfg.full_max:
                continue
            mem = build_memory(method, model, cfg.budget)
            logits, st = run_pieces(model, mem, pieces, cfg.segment, set(range(1, len(pieces))))
            right = [_answer_right(logits[i + 1], pieces[i + 1], a, b) for i, (_, a, b) in enumerate(questions)]
            emit({"task": "recall", "method": method, "length": len(body) + sum(len(q[0]) for q in questions),
                  "dialogue": d, "recalled": sum(right), "facts": len(right), "correct": sum(right) / len(right),
                  "right": right, "kinds": dia.kinds, "fact_distance": [len(body) - e for e in dia.fact_end], **st})


CALIBRATION_NAMES = ("Quinn", "Rosa", "Sven", "Tomas")  # asked only to calibrate thresholds, never planted


def parse_variant(spec: str) -> dict[str, Any]:
    """``CLUSTER/SELECTION/HEADS/COARSE[/FRACTIONS]`` (``4/fraction/query/2/0.25+0.125``): keys per
    cluster, ``fraction`` or ``threshold``, ``kv`` or ``query`` selecting heads, ``flat`` or the
    coarse clusters kept as a multiple of the keys taken (hierarchical centroids; needs the config's
    ``coarse_size``), and optionally the fractions it is asked at ("+"-separated; default: all)."""
    parts = spec.split("/")
    if len(parts) not in (4, 5) or not parts[0].isdigit():
        fail("qa variants", "be CLUSTER/SELECTION/HEADS/COARSE like 4/fraction/query/flat", spec, flag="--variants")
    one_of(parts[1], "qa variant selection", ("fraction", "threshold"), flag="--variants")
    one_of(parts[2], "qa variant heads", ("kv", "query"), flag="--variants")
    coarse = 0.0 if parts[3] == "flat" else float(parts[3])
    only = tuple(float(f) for f in parts[4].split("+")) if len(parts) == 5 else None
    return {"cluster_size": int(parts[0]), "selection": parts[1], "heads": parts[2], "coarse_keep": coarse, "only": only}


def qa_task(model: Any, tok: Any, cfg: LongEvalConfig, emit: Callable[[dict], None], squeezed: Any = None,
            selections: tuple[str, ...] | None = None, decoded: int | None = None,
            variants: tuple[str, ...] | None = None, first_context: int = 0) -> None:
    """Squeezed Attention over fixed contexts with planted facts: ``qa_contexts`` contexts of
    ``qa_length`` tokens (consecutive stretches of the corpus), each prefilled and clustered once
    and asked its ``qa_questions`` questions at every fraction (1 = full attention, no selection).
    One row per context and setting, each question's result in ``right`` (paired across settings).
    ``squeezed``: a :class:`~retromem.memory.squeezed.SqueezedConfig` for everything but the fraction;
    ``selections``: ways of picking clusters to ask at each fraction below 1 (default: the config's),
    on the same clusters; ``variants``: instead of ``selections``, settings of :func:`parse_variant`
    (each cluster size clustered once from the same prefill; threshold variants calibrated on
    questions about :data:`CALIBRATION_NAMES`, never planted); ``decoded``: how many questions per
    setting decode their answer one token at a time (the gather path, timed); the others are scored
    in one call (the mask path, which gives the same logits, tested), which costs a sixth of the calls
    (default: all decoded). Rows of fractions below 1 carry ``fact_selected``: per question and
    layer, the share of the question's planted fact (its context keys) selected by the query that
    predicts the answer's first token, averaged over the selecting heads. ``first_context``: run the
    contexts from this index on (the earlier ones are built, not run: resume a run)."""
    from retromem.memory.passkey import token_stream
    from retromem.memory.squeezed import SqueezedAttention, SqueezedConfig

    rng = random.Random(cfg.seed + 2)
    hays = token_stream(tok, cfg.qa_length * cfg.qa_contexts, cfg.corpus, skip_docs=20)
    base = squeezed or SqueezedConfig()
    specs = [parse_variant(v) for v in variants] if variants else \
        [{"cluster_size": base.cluster_size, "selection": s, "heads": base.heads, "coarse_keep": base.coarse_keep}
         for s in (selections or (base.selection,))]
    for sp in specs:
        sp.setdefault("only", None)
    question = "\n\nQuestion: What is the secret number of {n}? Answer: The secret number of {n} is"
    for c_i in range(cfg.qa_contexts):
        names = rng.sample(NAMES, cfg.qa_questions)
        keys = [str(rng.randrange(10000, 100000)) for _ in names]
        facts = [_enc(tok, f" The secret number of {n} is {k}. ") for n, k in zip(names, keys)]
        hay = hays[c_i * cfg.qa_length:(c_i + 1) * cfg.qa_length]
        n_hay = cfg.qa_length - sum(len(f) for f in facts)
        cuts = sorted(rng.sample(range(n_hay), len(facts)))
        ctx: list[int] = []
        spans = []  # (start, end) of each fact in the context
        prev = 0
        for c, f in zip(cuts, facts):
            ctx += hay[prev:c]
            spans.append((len(ctx), len(ctx) + len(f)))
            ctx += f
            prev = c
        ctx += hay[prev:n_hay]
        if c_i < first_context:
            continue
        t0 = time.perf_counter()
        first = replace(base, fraction=cfg.fractions[0], cluster_size=specs[0]["cluster_size"])
        mems = {first.cluster_size: SqueezedAttention.prefill(model, torch.tensor([ctx]), first, segment=cfg.segment)}
        build_s = time.perf_counter() - t0
        calibrated: set[int] = set()
        for sp in specs:
            if sp["cluster_size"] not in mems:
                mems[sp["cluster_size"]] = mems[first.cluster_size].reclustered(
                    model, replace(first, cluster_size=sp["cluster_size"]))
            if sp["selection"] == "threshold" and sp["cluster_size"] not in calibrated:
                mems[sp["cluster_size"]].calibrate(model, [torch.tensor([_enc(tok, question.format(n=n))])
                                                          for n in CALIBRATION_NAMES])
                calibrated.add(sp["cluster_size"])
        settings = [(f, sp) for f in cfg.fractions
                    for sp in ([x for x in specs if x["only"] is None or f in x["only"]] if f < 1 else [None])]
        for fraction, sp in settings:
            mem = mems[(sp or specs[0])["cluster_size"]]
            if sp is None:
                mem.set_fraction(fraction)
                label = "none"
            else:
                mem.set_fraction(fraction, sp["selection"], sp["heads"], sp["coarse_keep"])
                label = sp["selection"]
            right, fact_selected = [], []
            for q_i, (n, k) in enumerate(zip(names, keys)):
                mem.reset_queries()
                head = _enc(tok, question.format(n=n))
                ans = _enc(tok, " " + k)
                ids = torch.tensor([head + ans])
                mem.probe = (*spans[names.index(n)], len(head) - 1) if fraction < 1 else None
                if decoded is not None and q_i >= decoded:  # question and answer in one call
                    logits = stream(model, ids, mem, segment=ids.shape[1], keep_logits="all")
                    right.append(_answer_right(logits, ids, len(head), ids.shape[1]))
                else:
                    # the question in one call, then the answer one token at a time (decoding: keys gathered)
                    logits = stream(model, ids[:, :len(head) + 1], mem, segment=len(head) + 1, keep_logits="all")
                    logits = torch.cat([logits] + [stream(model, ids[:, j:j + 1], mem, segment=1, keep_logits="all")
                                                   for j in range(len(head) + 1, ids.shape[1] - 1)], 1)
                    right.append(_answer_right(torch.cat([logits, logits[:, -1:]], 1), ids, len(head), ids.shape[1]))
                if mem.probe is not None:
                    fact_selected.append([round(float(h.mean()), 3) for h in mem.probe_hits])
                mem.probe = None
            row = {"task": "qa", "method": "squeezed" if fraction < 1 else "full", "fraction": fraction,
                   "selection": label, "cluster_size": mem.config.cluster_size, "length": cfg.qa_length,
                   "context": c_i, "correct": sum(right) / len(right), "answered": sum(right),
                   "questions": len(right), "right": right, "attended_fraction": mem.attended_fraction(),
                   "decode_attention_ms": round(mem.decode_attention_ms(), 4),
                   "decode_attention_cpu_ms": round(mem.decode_attention_ms(cpu=True), 4),
                   "prefill_and_cluster_s": round(build_s, 2), "attention_mib": round(mem.attention_bytes() / 2 ** 20, 3)}
            if variants:
                row["variant"] = "all keys" if sp is None else "/".join(variants[specs.index(sp)].split("/")[:4])
                row["centroid_comparisons"] = mem.compared
            if fact_selected:
                row["fact_selected"] = fact_selected
            emit(row)


TASK_FUNCTIONS = {"passkey": passkey_task, "perplexity": perplexity_task, "recall": recall_task, "qa": qa_task}


# ----------------------------------------------------------------------------------------------
# Running, summarising, plotting
# ----------------------------------------------------------------------------------------------

def summarize(rows: list[dict]) -> dict[str, Any]:
    """Per task, method and length: accuracy (or perplexity), mean tokens/s, largest memory held."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"], r.get("length"), r.get("fraction"))].append(r)
    table = []
    for (task, method, length, fraction), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, kv[0][3] or 0)):
        row = {"task": task, "method": method, "length": length, "n": len(rs)}
        if fraction is not None:
            row["fraction"] = fraction
        if task == "perplexity":
            row["perplexity"] = math.exp(sum(r["nll"] for r in rs) / sum(r["scored"] for r in rs))
            if len(rs) > 1:  # streams: a t interval on their mean NLL per token, as perplexity
                row["ci"] = _t_interval_ppl([r["nll"] / r["scored"] for r in rs])
        else:
            row["accuracy"] = sum(r["correct"] for r in rs) / len(rs)
            if all(isinstance(r["correct"], bool) for r in rs):
                row["ci"] = wilson(sum(r["correct"] for r in rs), len(rs))
            for key in ("strict", "greedy", "key_logprob"):  # passkey's other scores (rows before key_logprob lack it)
                if all(key in r for r in rs):
                    row[key] = sum(r[key] for r in rs) / len(rs)
            if all("greedy" in r for r in rs):
                row["greedy_ci"] = wilson(sum(r["greedy"] for r in rs), len(rs))
        for key in ("tokens_per_s", "decode_attention_ms", "attended_fraction"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            if vals:
                row[key] = sum(vals) / len(vals)
        for key in ("attention_mib", "store_mib"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key] = max(vals)
        table.append(row)
    return {"table": table}


def _t_interval_ppl(nll_per_token: list[float]) -> tuple[float, float]:
    """95% t interval of the mean NLL per token over streams, as perplexities."""
    from statistics import mean, stdev

    t975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
    n = len(nll_per_token)
    half = t975.get(n - 1, 1.96) * stdev(nll_per_token) / math.sqrt(n)
    return (math.exp(mean(nll_per_token) - half), math.exp(mean(nll_per_token) + half))


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| task | method | tokens | n | accuracy / ppl [95% CI] | strict / greedy | tok/s | attention KV MiB | block store MiB |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["table"]:
        score = f"ppl {r['perplexity']:.2f}" if "perplexity" in r else f"{r['accuracy']:.2f}"
        if "ci" in r:
            score += f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]"
        name = METHOD_LABELS.get(r["method"], r["method"]) + (f" (fraction {r['fraction']})" if "fraction" in r else "")
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        other = f"{r['strict']:.2f} / {r['greedy']:.2f}" if "strict" in r else "-"
        lines.append(f"| {r['task']} | {name} | {r['length']} | {r['n']} | {score} | {other} | {tps} | "
                     f"{r.get('attention_mib', float('nan')):.1f} | {r.get('store_mib', 0.0):.1f} |")
    return "\n".join(lines)


def greedy_table(summary: dict[str, Any]) -> str:
    """The one passkey table: greedy accuracy (what a user gets) with its 95% Wilson interval, speed
    and memory held, one row per method and length (long-document perplexity rows follow, with their
    t interval over streams where there are several)."""
    lines = ["| method | tokens | n | greedy [95% CI] | tok/s | attention KV MiB | block store MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ppl = ["| method | tokens | streams | perplexity [95% CI] | tok/s | attention KV MiB |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in summary["table"]:
        name = METHOD_LABELS.get(r["method"], r["method"])
        tps = f"{r['tokens_per_s']:.1f}" if "tokens_per_s" in r else "-"
        kv = f"{r['attention_mib']:.1f}" if "attention_mib" in r else "-"
        if r["task"] == "passkey" and "greedy" in r:
            lo, hi = r["greedy_ci"]
            k = round(r["greedy"] * r["n"])
            lines.append(f"| {name} | {r['length']} | {r['n']} | {k}/{r['n']} = {r['greedy']:.2f} [{lo:.2f}, {hi:.2f}] | "
                         f"{tps} | {kv} | {r.get('store_mib', 0.0):.1f} |")
        elif r["task"] == "perplexity":
            ci = f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if "ci" in r else ""
            ppl.append(f"| {name} | {r['length']} | {r['n']} | {r['perplexity']:.2f}{ci} | {tps} | {kv} |")
    return "\n".join(lines + ([""] + ppl if len(ppl) > 2 else []))


def paired_passkey(rows: list[dict], method: str, score: str = "greedy") -> list[dict[str, Any]]:
    """``method`` against every other method on the same passkey examples: rows are matched by
    (seed, key, sample, length, depth), so runs of one seed in separate files (one method each)
    pair up and two depth or length sets that draw other keys under one seed do not. Rows written
    before the seed and key were recorded match by (``run``, sample, length, depth), ``run`` being
    whatever tells runs of other seeds apart (the row file they came from; absent: one run). Per
    other method and length (and all lengths together): the examples both ran, how many each
    answered (``score``), the discordant ones, the exact McNemar p and the paired difference with a
    bootstrap interval (examples resampled)."""
    from retromem.stats import mcnemar_p, paired_bootstrap

    by: dict[str, dict[tuple, bool]] = defaultdict(dict)
    for r in rows:
        if r["task"] == "passkey":
            which = ("seed", r["seed"], r.get("key")) if "seed" in r else ("run", r.get("run", 0), None)
            by[r["method"]][(*which, r["sample"], r["length"], r["depth"])] = bool(r[score])
    if method not in by:
        fail("paired", f"name a method of the rows ({', '.join(sorted(by))})", method)
    out = []
    for other in sorted(set(by) - {method}):
        both = sorted(set(by[method]) & set(by[other]))
        for length in sorted({k[4] for k in both}) + ["all"]:
            keys = [k for k in both if length in ("all", k[4])]
            a = [by[method][k] for k in keys]
            b = [by[other][k] for k in keys]
            a_only = sum(x and not y for x, y in zip(a, b))
            b_only = sum(y and not x for x, y in zip(a, b))
            diff = paired_bootstrap([float(x) for x in a], [float(y) for y in b], n=2000, seed=0)
            out.append({"method": method, "other": other, "length": length, "n": len(keys), "method_right": sum(a),
                        "other_right": sum(b), "method_only": a_only, "other_only": b_only,
                        "mcnemar_p": mcnemar_p(a_only, b_only), "diff": diff.mean, "low": diff.low, "high": diff.high})
    return out


def paired_table(pairs: list[dict[str, Any]]) -> str:
    """:func:`paired_passkey` as markdown."""
    lines = ["| method - other | tokens | n | method / other right | difference [95% CI] | only method / only other (McNemar p) |",
             "| --- | ---: | ---: | ---: | --- | ---: |"]
    for p in pairs:
        name = f"{METHOD_LABELS.get(p['method'], p['method'])} - {METHOD_LABELS.get(p['other'], p['other'])}"
        lines.append(f"| {name} | {p['length']} | {p['n']} | {p['method_right']} / {p['other_right']} | "
                     f"{p['diff']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] | {p['method_only']} / {p['other_only']} "
                     f"({p['mcnemar_p']:.2g}) |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str, score: str = "correct") -> Path | None:
    """Passkey (and recall) accuracy against context length, one line per method; ``score``: the
    passkey rows' field plotted (``correct``, ``strict`` or ``greedy``), with 95% Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("passkey", "recall") if any(r["task"] == t for r in rows)]
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["task"] == task:
                by[r["method"]][r["length"]].append(float(r.get(score, r["correct"]) if task == "passkey" else r["correct"]))
        order = [m for m in METHOD_LABELS if m in by] + sorted(m for m in by if m not in METHOD_LABELS)
        spare = iter(c for c in ("tab:brown", "darkred", "navy", "teal", "indigo", "salmon")
                     if c not in {METHOD_COLORS.get(m) for m in order})
        for k, method in enumerate(order):
            # methods that score alike at one length would hide each other: a small shift along x each
            shift = 2 ** (0.04 * (k - (len(order) - 1) / 2))
            xs = sorted(by[method])
            n = sum(len(v) for v in by[method].values())
            ys = [sum(by[method][x]) / len(by[method][x]) for x in xs]
            label = f"{METHOD_LABELS.get(method, method)} ({n} example{'s' if n > 1 else ''})"
            color = METHOD_COLORS.get(method) or next(spare, None)
            if task == "passkey":  # 95% Wilson intervals
                ci = [wilson(round(sum(by[method][x])), len(by[method][x])) for x in xs]
                yerr = [[y - lo for y, (lo, _) in zip(ys, ci)], [hi - y for y, (_, hi) in zip(ys, ci)]]
                ax.errorbar([x * shift for x in xs], ys, yerr=yerr, fmt="o-", capsize=3, color=color, label=label)
            else:
                ax.plot([x * shift for x in xs], ys, "o-", color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(("accuracy" if score == "correct" else f"accuracy ({score})") if task == "passkey"
                      else "share of facts recalled")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{task}: {title}", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(model: Any, tok: Any, cfg: LongEvalConfig, title: str = "") -> dict[str, Any]:
    """Run ``cfg.tasks`` for ``cfg.methods``; rows go to ``out/rows.jsonl`` as they come (a long
    run can be read while it goes), the summary to ``out/results.json``, the plot to
    ``out/accuracy_vs_length.png``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    enable(model)
    model.eval()
    rows: list[dict] = []
    log = (out / "rows.jsonl").open("a")

    def emit(row: dict) -> None:
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        logger.info("%s", row)

    try:
        for task in cfg.tasks:
            TASK_FUNCTIONS[task](model, tok, cfg, emit)
        for path in cfg.trained:
            trained_task(path, tok, cfg, emit)
    finally:
        log.close()
    summary = summarize(rows)
    summary["config"] = asdict(cfg)
    p = plot(rows, out / "accuracy_vs_length.png", title or type(model).__name__)
    summary["plot"] = str(p) if p else None
    (out / "results.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return summary
