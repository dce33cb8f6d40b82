"""Speculative decoding with retrieval drafts (REST, He et al. 2024) for any Hugging Face causal LM.

Each step, the model's next token ``t0`` is known (the argmax of the last logits). The longest
suffix of ``context + [t0]`` (at most ``max_suffix``, at least ``min_suffix`` tokens) that occurs
in the datastore is looked up in the n-gram index's suffix array; the token sequences that follow
its occurrences (up to ``max_occurrences`` of them, ``depth`` tokens each) are merged into a trie,
and the ``max_nodes`` most frequent trie nodes (a prefix-closed set: a node is never more frequent
than its parent) form the draft tree. One forward pass verifies the whole tree:

    inputs      [t0, n_1, ..., n_N]                         (1 + N tokens, tree order: parents first)
    positions   L + depth(n_i)                              (t0 at depth 0; L = tokens in the cache)
    mask        input i sees the L cached tokens, itself and its ancestors: an additive 4-D mask
                (1, 1, 1 + N, L + 1 + N), 0 where seen and the dtype's minimum elsewhere

Greedy acceptance walks the tree from ``t0`` along the model's argmax: while a child of the
current node carries the argmax of the current node's logits, it is accepted. The argmax after the
last accepted node is the next step's ``t0``. So every step emits ``1 + accepted`` tokens for one
forward pass, and every emitted token is the argmax of the model's logits after exactly the
emitted tokens before it: the output is plain greedy decoding's, token for token (up to
floating-point differences between a tree pass and one-token passes, which the tests and the
benchmark check for).

The KV cache: the tree pass appends the keys/values of all ``1 + N`` inputs; afterwards the cache
is cut back to the ``L`` tokens before it and the entries of the accepted path (``t0`` and the
accepted nodes, gathered by their slots) are put back. Their keys were rotated at positions
``L + depth``, which is where they now sit, so nothing is recomputed: the cost is one copy of the
cache per step (O(L) memory traffic, no FLOPs), against a second forward pass for re-running the
accepted tokens. Only Hugging Face's ``DynamicCache`` with full-attention layers is supported (a
sliding-window cache drops entries the tree mask would need).

Sampling is not implemented: ``do_sample=True`` is refused.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from retromem.config import number, positive_int
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)


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
class RestStats:
    """What one generation cost. ``accepted`` holds, per step (a tree pass after the prompt's), the
    draft tokens it accepted; every forward pass, the prompt's included, also yields the model's own
    next token, so plain greedy decoding makes ``new_tokens`` passes and REST ``steps + 1``."""

    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)
    draft_nodes: list[int] = field(default_factory=list)
    suffix_lengths: list[int] = field(default_factory=list)  # matched suffix per step (0: no draft)
    prefill_seconds: float = 0.0
    retrieval_seconds: float = 0.0
    forward_seconds: float = 0.0  # tree passes, cache surgery included
    total_seconds: float = 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean accepted length: tokens emitted per forward pass (plain greedy decoding: 1.0)."""
        return self.new_tokens / (self.steps + 1) if self.new_tokens else 0.0

    @property
    def mean_draft_nodes(self) -> float:
        return sum(self.draft_nodes) / len(self.draft_nodes) if self.draft_nodes else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "new_tokens": self.new_tokens, "mean_accepted": self.mean_accepted,
                "mean_draft_nodes": self.mean_draft_nodes, "drafted_steps": sum(1 for n in self.draft_nodes if n),
                "prefill_seconds": self.prefill_seconds, "retrieval_seconds": self.retrieval_seconds,
                "forward_seconds": self.forward_seconds, "total_seconds": self.total_seconds}


@dataclass(frozen=True)
class DraftTree:
    """A draft tree in parents-first order. Node 0 is the root (the model's own next token); node i
    > 0 has token ``tokens[i]``, parent ``parents[i]`` (< i) and depth ``depths[i]`` (root: 0)."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    depths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tokens)

    def children(self) -> list[dict[int, int]]:
        """Per node, its children as token -> node index."""
        out: list[dict[int, int]] = [{} for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            out[self.parents[i]][self.tokens[i]] = i
        return out


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


def tree_attention_mask(tree: DraftTree, past: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask (1, 1, n, past + n): node i sees the ``past`` cached tokens, itself and its
    ancestors (0), and nothing else (the dtype's minimum). Along one branch it is the causal mask."""
    n = len(tree)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        seen[i, i] = True
        if i:
            seen[i] |= seen[tree.parents[i]]  # parents come first, so their rows are complete
    full = torch.cat([torch.ones(n, past, dtype=torch.bool), seen], dim=1)  # (n, past + n)
    mask = torch.zeros(n, past + n, dtype=dtype).masked_fill_(~full, torch.finfo(dtype).min)
    return mask[None, None]  # (1, 1, n, past + n)


def _check_cache(cache: Any) -> None:
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise ConfigError(f"REST keeps the accepted path by editing the KV cache and supports Hugging Face's "
                          f"DynamicCache with full-attention layers only; this model uses {type(cache).__name__} "
                          f"({sorted({type(layer).__name__ for layer in (layers or [])})})")


def keep_accepted(cache: Any, past: int, slots: Sequence[int]) -> None:
    """Cut ``cache`` back to its first ``past`` tokens and re-append the entries at tree slots
    ``slots`` (input positions of the last pass, in order): the accepted path, and nothing else."""
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
    """Draft trees for REST from an in-process :class:`retromem.index.ngram.NgramIndex`."""

    def __init__(self, ngram_index: Any, config: RestConfig | None = None) -> None:
        self.index = ngram_index
        self.config = config or RestConfig()
        if self.config.max_occurrences > ngram_index.limits.max_support:
            raise ConfigError(f"`rest.max_occurrences` (--max-occurrences) must be at most the index's max_support="
                              f"{ngram_index.limits.max_support}, got {self.config.max_occurrences}")

    def longest_suffix(self, context: Sequence[int]) -> int:
        """Length of the longest suffix of ``context`` (capped at ``max_suffix``) that occurs in the
        datastore, or 0 when even ``min_suffix`` tokens do not. A suffix occurs whenever a longer one
        does, so the length is found by binary search."""
        cfg = self.config
        lo, hi = 0, min(cfg.max_suffix, len(context))
        if hi < cfg.min_suffix:
            return 0
        lo = cfg.min_suffix - 1
        while lo < hi:
            mid = (lo + hi + 1) >> 1
            if self.index.count(list(context[len(context) - mid:])).count > 0:
                lo = mid
            else:
                hi = mid - 1
        return lo if lo >= cfg.min_suffix else 0

    def draft(self, context: Sequence[int]) -> tuple[DraftTree, int]:
        """(tree rooted at ``context[-1]``, matched suffix length); a lone root when nothing matched.
        A suffix whose occurrences all end a document has no continuation: the next shorter one is
        tried."""
        cfg = self.config
        n = self.longest_suffix(context)
        while n >= cfg.min_suffix:
            cont = self.index.continuations(list(context[len(context) - n:]), cfg.depth, cfg.max_occurrences)
            if cont.sequences:
                min_count = max(1, math.ceil(cfg.min_share * cont.read))
                return build_draft_tree(int(context[-1]), cont.sequences, cfg.max_nodes, min_count), n
            n -= 1
        return DraftTree((int(context[-1]),), (-1,), (0,)), 0


def _eos_ids(model: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


@torch.inference_mode()
def generate_rest(model: Any, tokenizer: Any, ngram_index: Any, prompt: str | Sequence[int] | torch.Tensor,
                  max_new_tokens: int = 64, config: RestConfig | None = None, *, do_sample: bool = False,
                  check_tokenizer: bool = True) -> tuple[torch.Tensor, RestStats]:
    """Greedy decoding of ``model`` from ``prompt`` (text, or token ids) with REST drafts from
    ``ngram_index``: (ids (1, prompt + new) like ``model.generate``, stats). Stops after
    ``max_new_tokens`` or at the model's end-of-sequence token (kept, as ``generate`` keeps it)."""
    if do_sample:
        raise ConfigError("`do_sample` (--sample): REST here is greedy only (the speculative acceptance rule for "
                          "sampling is not implemented); use do_sample=False")
    positive_int(max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
    drafter = RestDrafter(ngram_index, config)
    if check_tokenizer:
        check_index_tokenizer(ngram_index, tokenizer, model)
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ConfigError("`prompt` is empty: give at least one token")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = _eos_ids(model)
    stats = RestStats()
    t_start = time.perf_counter()

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids.to(device), cache=cache, use_cache=True)
    _check_cache(cache)
    nxt = int(out.logits[0, -1].argmax())
    context = ids[0].tolist()
    new: list[int] = []
    stats.prefill_seconds = time.perf_counter() - t_start
    while True:
        # nxt is the model's next token: emit it, stop if done, else draft after it and verify
        new.append(nxt)
        if nxt in eos or len(new) >= max_new_tokens:
            break
        context.append(nxt)
        t0 = time.perf_counter()
        tree, suffix = drafter.draft(context)
        # never draft past max_new_tokens: drop nodes deeper than the tokens still allowed
        room = max_new_tokens - len(new)
        if max(tree.depths) > room:
            keep = [i for i in range(len(tree)) if tree.depths[i] <= room]
            remap = {old: j for j, old in enumerate(keep)}
            tree = DraftTree(tuple(tree.tokens[i] for i in keep),
                             tuple(remap[tree.parents[i]] if i else -1 for i in keep),
                             tuple(tree.depths[i] for i in keep))
        t1 = time.perf_counter()
        past = cache.get_seq_length()
        inp = torch.tensor([tree.tokens], dtype=torch.long, device=device)  # (1, n)
        pos = torch.tensor([[past + d for d in tree.depths]], dtype=torch.long, device=device)  # (1, n)
        mask = tree_attention_mask(tree, past, dtype).to(device)  # (1, 1, n, past + n)
        logits = model(input_ids=inp, position_ids=pos, attention_mask=mask, cache=cache,
                       use_cache=True).logits[0]  # (n, vocab)
        best = logits.argmax(dim=-1).tolist()
        children = tree.children()
        path = [0]
        while best[path[-1]] in children[path[-1]]:
            path.append(children[path[-1]][best[path[-1]]])
        keep_accepted(cache, past, path)
        t2 = time.perf_counter()
        stats.retrieval_seconds += t1 - t0
        stats.forward_seconds += t2 - t1
        stats.steps += 1
        stats.draft_nodes.append(len(tree) - 1)
        stats.suffix_lengths.append(suffix)
        accepted = [tree.tokens[i] for i in path[1:]]
        # the root was emitted above; emit the accepted drafts, stopping at end-of-sequence
        done = False
        for t in accepted:
            new.append(t)
            context.append(t)
            if t in eos:
                done = True
                break
        stats.accepted.append(len(accepted))
        if done or len(new) >= max_new_tokens:
            break
        nxt = best[path[-1]]
    stats.new_tokens = len(new)
    stats.total_seconds = time.perf_counter() - t_start
    return torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1), stats


__all__ = ["DraftTree", "RestConfig", "RestDrafter", "RestStats", "build_draft_tree", "check_index_tokenizer",
           "generate_rest", "keep_accepted", "tree_attention_mask"]
