"""Speculative decoding with draft *trees* (REST, He et al. 2024; RASD) for any Hugging Face causal LM.

Entry points:

* ``model.generate(ids, custom_generate=SpeculativeDecoding(drafter), max_new_tokens=..., do_sample=...,
  temperature=..., top_k=..., top_p=...)``: transformers 5.x runs its usual input preparation
  (generation config merged with the keyword arguments, logits processors and warpers, stopping
  criteria) and hands the decoding loop to the callable. This is the integration chosen: a
  transformers ``CandidateGenerator`` (assisted generation) proposes *one chain* of candidates per
  step and verifies it with a causal mask, so a tree cannot go through it; ``custom_generate``
  keeps every ``generate`` keyword and its processors, and lets the loop verify a tree.
* :func:`speculative_generate` ``(model, input_ids, drafter, **generate_kwargs) -> (ids, stats)``, the
  same call returning the step statistics too; :func:`generate_rest` is REST with an in-process
  n-gram index.

Drafters (``draft(context) -> DraftTree``: a tree rooted at ``context[-1]``) are :class:`RestDrafter`
here (the suffix array, in process or through the service's batched ``NextTokens`` RPC) and the
draft-model, prompt-lookup and fused (RASD) drafters in :mod:`retromem.retro.drafters`.

One step. The root ``t0`` (the model's own next token, chosen from the previous pass) is emitted;
the drafter builds a tree under it; one forward pass verifies the whole tree:

    inputs      [t0, n_1, ..., n_N]                         (1 + N tokens, tree order: parents first)
    positions   L + depth(n_i)                              (t0 at depth 0; L = tokens in the cache)
    mask        input i sees the L cached tokens, itself and its ancestors: an additive 4-D mask
                (1, 1, 1 + N, L + 1 + N), 0 where seen and the dtype's minimum elsewhere

Acceptance walks down from the root. At node u, ``p_u`` is the model's distribution after the
context and u's path (logits through the same processors ``generate`` applies; greedy: its argmax).

* Greedy: the child carrying ``argmax p_u`` is accepted; otherwise the walk stops and that argmax is
  the next root. Every emitted token is the argmax after exactly the tokens before it, so the text
  is plain greedy decoding's, token for token.
* Sampling: the multi-draft recursive rejection rule (SpecInfer's multi-step speculative sampling)
  with deterministic drafts. The children ``x_1..x_k`` of u are tried in order with a residual
  ``r`` (initially ``p_u``): ``x_i`` is accepted with probability ``r(x_i)`` (r normalised); on
  rejection ``r`` becomes ``norm(max(0, r - δ_{x_i}))``, i.e. ``x_i`` removed. If every child is
  rejected the next root is drawn from the last ``r``. For a point-mass draft ``q = δ_x`` this is the
  standard rule (accept with ``min(1, p(x)/q(x)) = p(x)``, residual ``norm(max(0, p - q))``), and
  the emitted token is distributed exactly as ``p_u``: it is ``x_1`` with probability ``p(x_1)``,
  ``x_2`` with ``(1 - p(x_1)) p(x_2) / (1 - p(x_1))``, ..., and otherwise a draw from ``p`` without
  the tried tokens. Drafts are deterministic functions of the context here (suffix-array counts, a
  draft model's top-k), so every drafter is covered by the same rule.

The KV cache after partial acceptance: the tree pass appends the keys/values of all ``1 + N`` inputs;
the cache is cut back to the ``L`` tokens before it and the entries of the accepted path (``t0`` and
the accepted nodes, gathered by their slots) are put back. Their keys were rotated at positions
``L + depth``, which is where they now sit, so nothing is recomputed. Only ``DynamicCache`` with
full-attention layers is supported (a sliding-window cache drops entries the tree mask needs).

For trees of ``LAZY_HEAD_MIN_NODES`` nodes or more the verification pass computes the hidden states of
all nodes but applies the output layer only to the nodes the walk visits (Llama-family models, whose
logits are exactly ``lm_head(hidden)``): the output layer of a 49k-token vocabulary is ~20% of
SmolLM2-135M's per-token work, and most nodes of a large tree are never looked at. Smaller trees take
it on all rows at once (on a CPU one row costs nearly what a small batch of rows does).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from retromem.config import number, positive_int
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

# model types whose causal-LM logits are exactly get_output_embeddings()(get_decoder()(...)): no logit
# scaling or soft-capping, so the output layer can be applied to the visited tree nodes only
_PLAIN_HEAD = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


@dataclass(frozen=True)
class RestConfig:
    """How drafts are retrieved and how large the verified tree may be."""

    max_suffix: int = 16  # longest context suffix looked up
    min_suffix: int = 2  # shorter matches are too common to predict anything: no draft
    max_occurrences: int = 256  # occurrences of the suffix read (sampled evenly over the suffix array)
    depth: int = 8  # tokens of continuation read per occurrence: the tree's maximum depth
    max_nodes: int = 32  # draft tokens verified per forward pass (plus the model's own next token)
    # drop draft nodes followed by fewer than this share of the occurrences read (0: REST as published).
    # On a CPU a tree pass costs more with every token, so rarely-right nodes cost more than they win
    min_share: float = 0.0

    def __post_init__(self) -> None:
        for f in ("max_suffix", "min_suffix", "max_occurrences", "depth", "max_nodes"):
            positive_int(getattr(self, f), f"rest.{f}", flag="--" + f.replace("_", "-"))
        number(self.min_share, "rest.min_share", ge=0.0, lt=1.0, flag="--min-share")
        if self.min_suffix > self.max_suffix:
            raise ConfigError(f"`rest.min_suffix` (--min-suffix) must be at most `rest.max_suffix` (--max-suffix) "
                              f"= {self.max_suffix}, got {self.min_suffix}")


@dataclass
class SpecStats:
    """What one generation cost. ``accepted`` holds, per step (a tree pass after the prompt's), the
    draft tokens it accepted; every forward pass, the prompt's included, also yields the model's own
    next token, so plain decoding makes ``new_tokens`` passes and speculation ``steps + 1``."""

    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)
    draft_nodes: list[int] = field(default_factory=list)
    suffix_lengths: list[int] = field(default_factory=list)  # retrieval drafters: matched suffix per step (0: none)
    prefill_seconds: float = 0.0
    retrieval_seconds: float = 0.0  # drafting (retrieval and draft model) time
    forward_seconds: float = 0.0  # tree passes, acceptance and cache surgery included
    total_seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted length: tokens emitted per forward pass of the model (plain decoding: 1.0)."""
        return self.new_tokens / (self.steps + 1) if self.new_tokens else 0.0

    @property
    def mean_draft_nodes(self) -> float:
        return sum(self.draft_nodes) / len(self.draft_nodes) if self.draft_nodes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "new_tokens": self.new_tokens, "mean_accepted": self.mean_accepted,
                "mean_draft_nodes": self.mean_draft_nodes, "drafted_steps": sum(1 for n in self.draft_nodes if n),
                "prefill_seconds": self.prefill_seconds, "retrieval_seconds": self.retrieval_seconds,
                "forward_seconds": self.forward_seconds, "total_seconds": self.total_seconds}


RestStats = SpecStats  # the name of the first, REST-only version


@dataclass(frozen=True)
class DraftTree:
    """A draft tree in parents-first order. Node 0 is the root (the model's own next token); node i
    > 0 has token ``tokens[i]``, parent ``parents[i]`` (< i) and depth ``depths[i]`` (root: 0).
    Siblings carry distinct tokens; their order is the order sampling tries them in."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self) -> list[dict[int, int]]:
        """Per node, its children as token -> node index (in tree order)."""
        out: list[dict[int, int]] = [{} for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            out[self.parents[i]][self.tokens[i]] = i
        return out

    def paths(self) -> list[tuple[int, ...]]:
        """Per node, the tokens below the root down to it (the root's: ())."""
        out: list[tuple[int, ...]] = [()]
        for i in range(1, len(self.tokens)):
            out.append(out[self.parents[i]] + (self.tokens[i],))
        return out

    def truncated(self, max_depth: int) -> "DraftTree":
        """The nodes at most ``max_depth`` below the root."""
        if max(self.depths) <= max_depth:
            return self
        keep = [i for i in range(len(self)) if self.depths[i] <= max_depth]
        remap = {old: j for j, old in enumerate(keep)}
        return DraftTree(tuple(self.tokens[i] for i in keep), tuple(remap[self.parents[i]] if i else -1 for i in keep),
                         tuple(self.depths[i] for i in keep))

    @staticmethod
    def lone(root: int) -> "DraftTree":
        return DraftTree((int(root),), (-1,), (0,))


def build_draft_tree(root: int, sequences: Sequence[tuple[Sequence[int], int]], max_nodes: int,
                     min_count: int = 1) -> DraftTree:
    """The ``max_nodes`` most frequent nodes of the trie of ``sequences`` ((tokens, count) pairs),
    under ``root``, leaving out nodes with a count below ``min_count``. A node's count is the total
    of the sequences through it, never more than its parent's, so taking nodes best first from a
    frontier that starts at the root's children gives a prefix-closed tree (ties: shallower, then
    earlier-inserted first)."""
    trie: list[dict[int, int]] = [{}]  # node -> {token: child}
    count: list[int] = [0]
    tok: list[int] = [root]
    for seq, c in sequences:
        n = 0
        for t in seq:
            t = int(t)
            if t not in trie[n]:
                trie[n][t] = len(trie)
                trie.append({})
                count.append(0)
                tok.append(t)
            n = trie[n][t]
            count[n] += int(c)
    tokens, parents, depths = [root], [-1], [0]
    heap = [(-count[ch], 1, ch, 0) for ch in trie[0].values()]  # (-count, depth, trie node, tree parent)
    heapq.heapify(heap)
    while heap and len(tokens) <= max_nodes:
        c, d, n, parent = heapq.heappop(heap)
        if -c < min_count:
            break  # the frontier is best first: everything left is rarer
        me = len(tokens)
        tokens.append(tok[n])
        parents.append(parent)
        depths.append(d)
        for ch in trie[n].values():
            heapq.heappush(heap, (-count[ch], d + 1, ch, me))
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths))


def ancestor_matrix(parents: Sequence[int]) -> np.ndarray:
    """(n, n) bool: row i is True at i and at its ancestors (parents come first)."""
    n = len(parents)
    seen = np.eye(n, dtype=bool)
    for i in range(1, n):
        seen[i] |= seen[parents[i]]  # the parent's row is complete already
    return seen


def tree_attention_mask(tree: DraftTree, past: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (1, 1, n, past + n): node i sees the ``past`` cached tokens, itself and its
    ancestors (0), and nothing else (the dtype's minimum). Along one branch it is the causal mask."""
    n = len(tree)
    mask = torch.zeros(n, past + n, dtype=dtype)
    mask[:, past:].masked_fill_(torch.from_numpy(~ancestor_matrix(tree.parents)), torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, n, past + n)


def _check_cache(cache: Any) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise ConfigError(f"tree speculation keeps the accepted path by editing the KV cache and supports Hugging "
                          f"Face's DynamicCache with full-attention layers only; this model uses "
                          f"{type(cache).__name__} ({sorted({type(layer).__name__ for layer in (layers or [])})})")


def keep_accepted(cache: Any, past: int, slots: Sequence[int]) -> None:
    """Cut ``cache`` back to its first ``past`` tokens and re-append the entries at tree slots
    ``slots`` (input positions of the last pass, in order): the accepted path, and nothing else."""
    n = len(slots)
    if list(slots) == list(range(n)):  # a prefix of the pass (a chain accepted from its start): crop only
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, :past + n]
            layer.values = layer.values[:, :, :past + n]
        return
    idx = torch.as_tensor([past + s for s in slots], dtype=torch.long)
    for layer in cache.layers:
        # keys/values: (batch, kv_heads, seq, head_dim); gather on seq
        layer.keys = torch.cat([layer.keys[:, :, :past], layer.keys.index_select(2, idx.to(layer.keys.device))], dim=2)
        layer.values = torch.cat([layer.values[:, :, :past], layer.values.index_select(2, idx.to(layer.values.device))],
                                 dim=2)


def check_index_tokenizer(ngram_index: Any, tokenizer: Any, model: Any) -> None:
    """ConfigError unless the n-gram index's datastore was tokenized by the model's tokenizer: drafts
    in another vocabulary are not weaker, they are noise."""
    from retromem.retro.data import check_datastore_tokenizer

    check_datastore_tokenizer(ngram_index.datastore, tokenizer, int(model.config.vocab_size))


class RestDrafter:
    """REST draft trees from a suffix array: an in-process :class:`retromem.index.ngram.NgramIndex`
    or a :class:`retromem.service.client.RetrievalClient` (both answer ``draft_continuations``: the
    longest matched suffix of each context and what follows it, one call, one round trip)."""

    def __init__(self, source: Any, config: RestConfig | None = None) -> None:
        self.source = source
        self.config = config or RestConfig()
        limits = getattr(source, "limits", None)
        max_support = getattr(limits, "max_support", None)
        if isinstance(max_support, int) and self.config.max_occurrences > max_support:
            raise ConfigError(f"`rest.max_occurrences` (--max-occurrences) must be at most the index's max_support="
                              f"{max_support}, got {self.config.max_occurrences}")
        self.last_suffix = 0

    def sequences(self, contexts: Sequence[Sequence[int]]) -> list[tuple[int, Any]]:
        """Per context: (matched suffix length, :class:`retromem.index.ngram.Continuations` or None)."""
        cfg = self.config
        return self.source.draft_continuations([list(c) for c in contexts], depth=cfg.depth,
                                               max_occurrences=cfg.max_occurrences, min_suffix=cfg.min_suffix,
                                               max_suffix=cfg.max_suffix)

    def tree(self, root: int, cont: Any) -> DraftTree:
        cfg = self.config
        if cont is None or not cont.sequences:
            return DraftTree.lone(root)
        min_count = max(1, math.ceil(cfg.min_share * cont.read))
        return build_draft_tree(int(root), cont.sequences, cfg.max_nodes, min_count)

    def draft(self, context: Sequence[int]) -> DraftTree:
        """The tree rooted at ``context[-1]`` (a lone root when no suffix of at least ``min_suffix``
        tokens occurs with a continuation); ``last_suffix`` holds the matched length."""
        ((n, cont),) = self.sequences([context])
        self.last_suffix = n
        return self.tree(int(context[-1]), cont)


def _eos_ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return {int(e) for e in (value if isinstance(value, (list, tuple)) else [value])}


class _Verifier:
    """One tree pass of the target model; logits (through the generation processors) per node on demand."""

    def __init__(self, model: Any, processors: Any, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.processors = processors
        self.dtype = dtype
        self.device = device
        mt = getattr(model.config, "model_type", "")
        self.lazy_head = (mt in _PLAIN_HEAD and hasattr(model, "get_decoder")
                          and isinstance(model.get_output_embeddings(), torch.nn.Linear))

    # On a CPU the output layer of one row costs reading its whole weight (SmolLM2: 113 MB, ~0.04 s at 1
    # thread), and a batch of rows costs little more: all rows at once win for small trees, the visited
    # rows only for large ones (measured on SmolLM2-135M: 8 rows together 0.057 s; the walk visits
    # 1 + accepted rows, ~2.4)
    LAZY_HEAD_MIN_NODES = 24

    def run(self, tree: DraftTree, cache: Any) -> Callable[[int], torch.Tensor]:
        past = cache.get_seq_length()
        inp = torch.tensor([tree.tokens], dtype=torch.long, device=self.device)  # (1, n)
        pos = torch.tensor([[past + d for d in tree.depths]], dtype=torch.long, device=self.device)  # (1, n)
        mask = tree_attention_mask(tree, past, self.dtype).to(self.device)  # (1, 1, n, past + n)
        if self.lazy_head and len(tree) >= self.LAZY_HEAD_MIN_NODES:
            hidden = self.model.get_decoder()(input_ids=inp, position_ids=pos, attention_mask=mask, cache=cache,
                                              use_cache=True).last_hidden_state[0]  # (n, d)
            head = self.model.get_output_embeddings()
            rows: dict[int, torch.Tensor] = {}

            def logits(i: int) -> torch.Tensor:
                if i not in rows:
                    rows[i] = head(hidden[i]).float()  # (vocab,)
                return rows[i]
            return logits
        all_logits = self.model(input_ids=inp, position_ids=pos, attention_mask=mask, cache=cache,
                                use_cache=True).logits[0].float()  # (n, vocab)
        return lambda i: all_logits[i]


class SpeculativeDecoding:
    """The decoding loop for ``model.generate(..., custom_generate=SpeculativeDecoding(drafter))``
    (see the module docstring). ``last_stats`` holds the last call's :class:`SpecStats`. Batch size 1;
    ``do_sample`` and the processors ``generate`` builds (temperature, top-k, top-p, repetition
    penalty, ...) are honoured, each node's scores computed with its own token sequence."""

    def __init__(self, drafter: Any) -> None:
        if not callable(getattr(drafter, "draft", None)):
            raise ConfigError(f"`drafter` must have a draft(context) -> DraftTree method, got {type(drafter).__name__}")
        self.drafter = drafter
        self.last_stats: SpecStats | None = None

    @torch.inference_mode()
    def __call__(self, model: Any, input_ids: torch.Tensor, logits_processor: Any = None, stopping_criteria: Any = None,
                 generation_config: Any = None, synced_gpus: bool = False, streamer: Any = None,
                 **model_kwargs: Any) -> torch.Tensor:
        from transformers import DynamicCache

        gc = generation_config or model.generation_config
        if input_ids.shape[0] != 1:
            raise ConfigError(f"speculative decoding here takes one sequence at a time; got a batch of "
                              f"{input_ids.shape[0]}")
        am = model_kwargs.get("attention_mask")
        if am is not None and not bool(am.all()):
            raise ConfigError("`attention_mask` has padding: speculative decoding here takes one unpadded sequence")
        if getattr(gc, "return_dict_in_generate", False):
            raise ConfigError("`return_dict_in_generate` is not supported by speculative decoding; it returns the ids")
        if getattr(gc, "num_beams", 1) not in (None, 1):
            raise ConfigError(f"`num_beams` must be 1 for speculative decoding, got {gc.num_beams}")
        do_sample = bool(getattr(gc, "do_sample", False))
        max_length = int(gc.max_length) if getattr(gc, "max_length", None) else input_ids.shape[1] + 20
        eos = _eos_ids(getattr(gc, "eos_token_id", None))
        processors = logits_processor if logits_processor is not None and len(logits_processor) else None
        device = input_ids.device
        dtype = next(model.parameters()).dtype
        verifier = _Verifier(model, processors, dtype, device)
        stats = SpecStats()
        self.last_stats = stats
        t_start = time.perf_counter()

        seq = input_ids[0].tolist()
        n_prompt = len(seq)

        def scores(logits: torch.Tensor, path: Sequence[int]) -> torch.Tensor:
            """The processed scores (vocab,) after ``seq + path`` (what ``generate`` would compute)."""
            if processors is None:
                return logits
            ids = torch.tensor([seq + list(path)], dtype=torch.long, device=device)
            return processors(ids, logits[None].clone())[0]

        def pick(s: torch.Tensor) -> int:
            if not do_sample:
                return int(s.argmax())
            return int(torch.multinomial(torch.softmax(s, dim=-1), 1))

        def stop(t: int) -> bool:
            if t in eos or len(seq) >= max_length:
                return True
            if stopping_criteria is not None and len(stopping_criteria):
                return bool(stopping_criteria(torch.tensor([seq], device=device), None).any())
            return False

        cache = DynamicCache(config=model.config)
        # logits of the last position only, as generate's prefill does: the output layer over a whole
        # prompt (SmolLM2: 128 tokens x 49k rows) costs as much as several decoding steps on a CPU
        try:
            out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            cache = DynamicCache(config=model.config)
            out = model(input_ids=input_ids, cache=cache, use_cache=True)
        _check_cache(cache)
        nxt = pick(scores(out.logits[0, -1].float(), ()))
        stats.prefill_seconds = time.perf_counter() - t_start
        if streamer is not None:
            streamer.put(input_ids.cpu())
        while True:
            # nxt is the model's next token: emit it, stop if done, else draft after it and verify
            seq.append(nxt)
            if streamer is not None:
                streamer.put(torch.tensor([nxt]))
            if stop(nxt):
                break
            t0 = time.perf_counter()
            tree = self.drafter.draft(seq)
            if tree.tokens[0] != nxt:
                raise ConfigError(f"the drafter returned a tree rooted at {tree.tokens[0]}, not at the context's last "
                                  f"token {nxt}")
            tree = tree.truncated(max_length - len(seq))  # never draft past max_length
            t1 = time.perf_counter()
            logits = verifier.run(tree, cache)
            children = tree.children()
            path = [0]
            toks: list[int] = []
            while True:
                u = path[-1]
                s = scores(logits(u), toks)
                kids = children[u]
                if not do_sample:
                    best = int(s.argmax())
                    if best in kids:
                        path.append(kids[best])
                        toks.append(best)
                        continue
                    nxt = best
                    break
                r = torch.softmax(s, dim=-1)
                chosen = None
                for t, child in kids.items():
                    total = float(r.sum())
                    if total <= 0.0:
                        break
                    if float(torch.rand(())) * total < float(r[t]):
                        chosen = (t, child)
                        break
                    r[t] = 0.0  # rejected: the residual is p without the tried tokens
                if chosen is not None:
                    path.append(chosen[1])
                    toks.append(chosen[0])
                    continue
                nxt = int(torch.multinomial(r if float(r.sum()) > 0 else torch.softmax(s, dim=-1), 1))
                break
            keep_accepted(cache, cache.get_seq_length() - len(tree), path)
            t2 = time.perf_counter()
            stats.retrieval_seconds += t1 - t0
            stats.forward_seconds += t2 - t1
            stats.steps += 1
            stats.draft_nodes.append(len(tree) - 1)
            stats.suffix_lengths.append(int(getattr(self.drafter, "last_suffix", 0)))
            # the root was emitted above; emit the accepted drafts, stopping where generate would
            done = False
            n_acc = 0
            for t in toks:
                seq.append(t)
                n_acc += 1
                if streamer is not None:
                    streamer.put(torch.tensor([t]))
                if stop(t):
                    done = True
                    break
            stats.accepted.append(n_acc)
            if done:
                break
        if streamer is not None:
            streamer.end()
        stats.new_tokens = len(seq) - n_prompt
        stats.total_seconds = time.perf_counter() - t_start
        return torch.tensor([seq], dtype=torch.long, device=device)


_GENERATE_KWARGS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "typical_p", "repetition_penalty", "no_repeat_ngram_size", "eos_token_id", "pad_token_id",
                    "bos_token_id", "attention_mask", "generation_config", "min_new_tokens", "stopping_criteria",
                    "logits_processor", "streamer", "suppress_tokens", "bad_words_ids", "use_cache"}


def speculative_generate(model: Any, input_ids: torch.Tensor | Sequence[int], drafter: Any,
                         **generate_kwargs: Any) -> tuple[torch.Tensor, SpecStats]:
    """``model.generate(input_ids, custom_generate=SpeculativeDecoding(drafter), **generate_kwargs)``
    and its statistics. ``generate_kwargs`` are ``generate``'s (max_new_tokens, do_sample, temperature,
    top_k, top_p, repetition_penalty, eos_token_id, ...); others are refused."""
    unknown = sorted(set(generate_kwargs) - _GENERATE_KWARGS)
    if unknown:
        raise ConfigError(f"speculative_generate does not take {unknown}; it takes generate's "
                          f"{sorted(_GENERATE_KWARGS)}")
    if "max_new_tokens" in generate_kwargs:
        positive_int(generate_kwargs["max_new_tokens"], "max_new_tokens", flag="--max-new-tokens")
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.shape[-1] == 0:
        raise ConfigError("`prompt` is empty: give at least one token")
    ids = ids.to(next(model.parameters()).device)
    generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
    if generate_kwargs.get("pad_token_id") is None and model.generation_config.pad_token_id is None:
        eos = _eos_ids(model.generation_config.eos_token_id)
        generate_kwargs["pad_token_id"] = min(eos) if eos else 0  # silences generate's warning; never used (batch 1)
    loop = SpeculativeDecoding(drafter)
    out = model.generate(ids, custom_generate=loop, **generate_kwargs)
    assert loop.last_stats is not None
    return out, loop.last_stats


def generate_rest(model: Any, tokenizer: Any, ngram_index: Any, prompt: str | Sequence[int] | torch.Tensor,
                  max_new_tokens: int = 64, config: RestConfig | None = None, *, do_sample: bool = False,
                  check_tokenizer: bool = True, **generate_kwargs: Any) -> tuple[torch.Tensor, SpecStats]:
    """REST: decoding of ``model`` from ``prompt`` (text, or token ids) with drafts from
    ``ngram_index`` (an in-process n-gram index, or a retrieval client): (ids (1, prompt + new) like
    ``model.generate``, stats). Greedy by default; ``do_sample=True`` (and temperature, top_k, ...)
    samples with the speculative acceptance rule."""
    positive_int(max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
    drafter = RestDrafter(ngram_index, config)
    if check_tokenizer:
        check_index_tokenizer(ngram_index, tokenizer, model)
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    return speculative_generate(model, ids, drafter, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                **generate_kwargs)


__all__ = ["DraftTree", "RestConfig", "RestDrafter", "RestStats", "SpecStats", "SpeculativeDecoding",
           "ancestor_matrix", "build_draft_tree", "check_index_tokenizer", "generate_rest", "keep_accepted",
           "speculative_generate", "tree_attention_mask"]
