"""Drafters for tree speculative decoding (:mod:`retromem.retro.speculative`) besides REST's suffix array:
a draft model's tree, a prompt-lookup tree, and RASD's fusion of several trees.

* :class:`ModelDrafter`: a small causal LM drafts a tree level by level (one forward pass per level,
  every node of a level together, under a tree mask over its own KV cache), keeping the nodes of the
  highest path probability (EAGLE-2-style dynamic tree) and pruning those below ``min_prob`` (RASD's
  tree pruning). :meth:`ModelDrafter.early_exit` is the offline default: the target model's own first
  ``layers`` layers, its final norm and output layer (no weights copied). ``vocab`` restricts the
  draft output layer to a token subset (e.g. the datastore's most frequent tokens, as FR-Spec does):
  on a CPU a 49k-row output layer costs more than two decoder layers.
* :class:`ContextDrafter`: prompt lookup as a tree: the longest suffix of the context that occurred
  earlier in the context, and the continuations of its earlier occurrences, merged by frequency.
* :class:`FusedDrafter`: RASD's fused tree: the trees of several drafters merged by longest-prefix
  matching (a path shared by two trees is one branch), earlier drafters' nodes kept first when the
  node budget binds; verified in one pass like any tree.

Every drafter's tree is a deterministic function of the context, so the speculative sampling rule
with point-mass drafts (speculative.py) stays exact for all of them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from retromem.config import number, positive_int
from retromem.errors import ConfigError
from retromem.retro.speculative import DraftTree, build_draft_tree

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelDraftConfig:
    """The shape of a draft model's tree."""

    depth: int = 4  # levels: draft-model passes per step (the first shares the catch-up pass)
    width: int = 4  # nodes kept per level (and children considered per node)
    max_nodes: int = 12  # draft tokens in all
    min_prob: float = 0.05  # prune nodes whose path probability under the draft model is below this

    def __post_init__(self) -> None:
        for f in ("depth", "width", "max_nodes"):
            positive_int(getattr(self, f), f"draft.{f}", flag="--draft-" + f.replace("_", "-"))
        number(self.min_prob, "draft.min_prob", ge=0.0, lt=1.0, flag="--draft-min-prob")


class ModelDrafter:
    """Draft trees from a causal LM that shares the target's tokenizer (see module docstring)."""

    def __init__(self, model: Any, config: ModelDraftConfig | None = None, *, vocab: Sequence[int] | None = None) -> None:
        self.config = config or ModelDraftConfig()
        self.decoder = model.get_decoder()
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or head.bias is not None:
            raise ConfigError(f"the draft model's output layer must be a bias-free Linear (Llama-like), got "
                              f"{type(head).__name__}")
        weight = head.weight.detach()  # (vocab, d)
        if vocab is not None:
            ids = torch.as_tensor(sorted({int(v) for v in vocab}), dtype=torch.long)
            if len(ids) == 0 or int(ids[-1]) >= weight.shape[0] or int(ids[0]) < 0:
                raise ConfigError(f"`vocab` must be a non-empty set of token ids in 0..{weight.shape[0] - 1}")
            self.vocab_ids: torch.Tensor | None = ids
            self.weight = weight.index_select(0, ids).contiguous()  # (|vocab|, d)
        else:
            self.vocab_ids = None
            self.weight = weight
        self.config_model = model.config
        self._cache: Any = None
        self._tokens: list[int] = []
        self.passes = 0  # draft-model forward passes so far

    @classmethod
    def early_exit(cls, target: Any, layers: int, config: ModelDraftConfig | None = None, *,
                   vocab: Sequence[int] | None = None) -> "ModelDrafter":
        """The target's first ``layers`` decoder layers + its final norm + its output layer as the draft
        model (:func:`early_exit_model`: the target's own weights, shared)."""
        return cls(early_exit_model(target, layers), config, vocab=vocab)

    def reset(self) -> None:
        self._cache = None
        self._tokens = []

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(m, d) hidden states -> (m, |vocab|) log-probabilities over the draft vocabulary."""
        return torch.log_softmax((hidden @ self.weight.T).float(), dim=-1)

    def _token(self, j: int) -> int:
        return int(self.vocab_ids[j]) if self.vocab_ids is not None else int(j)

    @torch.inference_mode()
    def draft(self, context: Sequence[int]) -> DraftTree:
        from transformers import DynamicCache

        cfg = self.config
        ctx = [int(t) for t in context]
        device = self.weight.device
        dtype = self.weight.dtype
        # catch up: keep the cached prefix shared with this context, feed the rest (the root included)
        common = 0
        for a, b in zip(self._tokens, ctx):
            if a != b:
                break
            common += 1
        common = min(common, len(ctx) - 1)
        if self._cache is None:
            self._cache = DynamicCache(config=self.config_model)
            common = 0
        else:
            self._crop(common)
        hidden = self.decoder(input_ids=torch.tensor([ctx[common:]], device=device), cache=self._cache,
                              use_cache=True).last_hidden_state[0, -1:]  # (1, d)
        self.passes += 1
        self._tokens = list(ctx)
        L = len(ctx)
        tokens, parents, depths, cum = [ctx[-1]], [-1], [0], [0.0]
        frontier, lp = [0], self._logprobs(hidden)  # nodes of the last level, their (m, |vocab|) log-probs
        fed: list[int] = []  # draft nodes whose keys/values sit in the cache after the L context tokens
        for d in range(1, cfg.depth + 1):
            budget = cfg.max_nodes - (len(tokens) - 1)
            if budget <= 0:
                break
            top_lp, top_ix = lp.topk(min(cfg.width, lp.shape[1]), dim=-1)  # (m, width)
            cands = sorted(((cum[f] + float(top_lp[r, c]), f, self._token(int(top_ix[r, c])))
                            for r, f in enumerate(frontier) for c in range(top_lp.shape[1])), reverse=True)
            new = []
            for score, f, t in cands[:min(cfg.width, budget)]:
                if np.exp(score) < cfg.min_prob:
                    break  # sorted: the rest are less likely
                new.append(len(tokens))
                tokens.append(t)
                parents.append(f)
                depths.append(d)
                cum.append(score)
            if not new or d == cfg.depth or len(tokens) - 1 >= cfg.max_nodes:
                break
            # one pass for the whole level: each new node sees the context, its fed ancestors and itself
            m = len(new)
            mask = torch.full((m, L + len(fed) + m), torch.finfo(dtype).min, dtype=dtype)
            mask[:, :L] = 0
            for r, n in enumerate(new):
                mask[r, L + len(fed) + r] = 0
                a = parents[n]
                while a > 0:
                    mask[r, L + fed.index(a)] = 0
                    a = parents[a]
            pos = torch.tensor([[L - 1 + depths[n] for n in new]], device=device)
            h = self.decoder(input_ids=torch.tensor([[tokens[n] for n in new]], device=device), position_ids=pos,
                             attention_mask=mask[None, None].to(device), cache=self._cache,
                             use_cache=True).last_hidden_state[0]  # (m, d)
            self.passes += 1
            fed.extend(new)
            frontier, lp = new, self._logprobs(h)
        self._crop(L)
        return DraftTree(tuple(tokens), tuple(parents), tuple(depths))

    def _crop(self, n: int) -> None:
        for layer in self._cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, :n]
                layer.values = layer.values[:, :, :n]


def early_exit_model(target: Any, layers: int) -> Any:
    """A causal LM of the target's class made of the target's first ``layers`` decoder layers, its
    final norm and its output layer, sharing the target's modules (no weights copied): a draft model
    for :class:`ModelDrafter` and for Hugging Face assisted generation (``assistant_model=``) alike.
    Llama-family layout (``model.embed_tokens``, ``model.layers``, ``model.norm``, ``lm_head``)."""
    total = int(target.config.num_hidden_layers)
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers < total:
        raise ConfigError(f"`draft.layers` (--draft-layers) must be in 1..{total - 1} (the target has {total} "
                          f"layers), got {layers!r}")
    inner = getattr(target, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm")) or \
            not hasattr(target, "lm_head"):
        raise ConfigError(f"an early exit needs a Llama-like model (model.embed_tokens, model.layers, model.norm, "
                          f"lm_head); {type(target).__name__} is not")
    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = layers
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:layers]
    with torch.device("meta"):  # no weights allocated: every module is replaced by the target's own
        small = type(target)(cfg)
    small.model.embed_tokens = inner.embed_tokens
    small.model.layers = torch.nn.ModuleList(list(inner.layers[:layers]))
    small.model.norm = inner.norm
    if hasattr(inner, "rotary_emb"):
        small.model.rotary_emb = inner.rotary_emb
    small.lm_head = target.lm_head
    left = [n for n, t in list(small.named_parameters()) + list(small.named_buffers()) if t.is_meta]
    if left:
        raise ConfigError(f"an early exit of {type(target).__name__} left {left[:3]} unshared")
    small.generation_config = copy.deepcopy(target.generation_config)
    return small.eval()


class ContextDrafter:
    """Prompt lookup as a tree: the continuations (``depth`` tokens) of the earlier occurrences of the
    context's longest suffix (``min_ngram`` to ``max_ngram`` tokens) within the context itself."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, depth: int = 10, max_nodes: int = 10) -> None:
        for name, v in (("max_ngram", max_ngram), ("min_ngram", min_ngram), ("depth", depth), ("max_nodes", max_nodes)):
            positive_int(v, f"lookup.{name}", flag="--lookup-" + name.replace("_", "-"))
        if min_ngram > max_ngram:
            raise ConfigError(f"`lookup.min_ngram` must be at most `lookup.max_ngram` = {max_ngram}, got {min_ngram}")
        self.max_ngram, self.min_ngram, self.depth, self.max_nodes = max_ngram, min_ngram, depth, max_nodes
        self.last_suffix = 0

    def draft(self, context: Sequence[int]) -> DraftTree:
        arr = np.asarray(context, dtype=np.int64)
        L = len(arr)
        self.last_suffix = 0
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            win = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)  # windows starting before the suffix
            hits = np.flatnonzero((win == arr[L - n:]).all(axis=1))
            seen: dict[tuple[int, ...], int] = {}
            for p in hits.tolist():
                cont = tuple(arr[p + n:p + n + self.depth].tolist())
                if cont:
                    seen[cont] = seen.get(cont, 0) + 1
            if seen:
                self.last_suffix = n
                # most frequent first; among equals the latest occurrence (nearest text) first
                ranked = sorted(seen.items(), key=lambda kv: -kv[1])
                return build_draft_tree(int(arr[-1]), ranked, self.max_nodes)
        return DraftTree.lone(int(arr[-1]))


def fuse_trees(trees: Sequence[DraftTree], max_nodes: int | None = None) -> DraftTree:
    """Merge trees with the same root by longest-prefix matching: each node of each tree (in order,
    parents first) joins the node of the fused tree that carries its parent's path; a path already
    there is shared. With ``max_nodes``, nodes past the budget are left out (earlier trees first;
    a node whose parent was left out is left out too, so the result stays prefix-closed)."""
    if not trees:
        raise ConfigError("fuse_trees needs at least one tree")
    root = trees[0].tokens[0]
    if any(t.tokens[0] != root for t in trees):
        raise ConfigError(f"trees to fuse must share their root; got roots {[t.tokens[0] for t in trees]}")
    tokens, parents, depths = [root], [-1], [0]
    kids: list[dict[int, int]] = [{}]
    for t in trees:
        where = [0] + [-1] * (len(t) - 1)  # node of t -> node of the fused tree (-1: left out)
        for i in range(1, len(t)):
            p = where[t.parents[i]]
            if p < 0:
                continue
            tok = t.tokens[i]
            if tok in kids[p]:
                where[i] = kids[p][tok]
                continue
            if max_nodes is not None and len(tokens) - 1 >= max_nodes:
                continue
            where[i] = kids[p][tok] = len(tokens)
            tokens.append(tok)
            parents.append(p)
            depths.append(depths[p] + 1)
            kids.append({})
    return DraftTree(tuple(tokens), tuple(parents), tuple(depths))


class FusedDrafter:
    """RASD: the trees of ``drafters`` (e.g. a pruned draft-model tree and a retrieval tree) fused by
    longest-prefix matching into one tree of at most ``max_nodes`` draft tokens."""

    def __init__(self, drafters: Sequence[Any], max_nodes: int | None = None) -> None:
        if not drafters:
            raise ConfigError("`drafters` is empty: give at least one")
        if max_nodes is not None:
            positive_int(max_nodes, "fused.max_nodes", flag="--max-nodes")
        self.drafters = list(drafters)
        self.max_nodes = max_nodes
        self.last_suffix = 0

    def draft(self, context: Sequence[int]) -> DraftTree:
        trees = [d.draft(context) for d in self.drafters]
        self.last_suffix = max((int(getattr(d, "last_suffix", 0)) for d in self.drafters), default=0)
        return fuse_trees(trees, self.max_nodes)


def frequent_tokens(streams: Any, n: int) -> list[int]:
    """The ``n`` most frequent token ids of an iterable of token arrays (a draft head's vocabulary)."""
    positive_int(n, "draft.vocab", flag="--draft-vocab")
    counts: np.ndarray | None = None
    for s in streams:
        c = np.bincount(np.asarray(s, dtype=np.int64))
        if counts is None:
            counts = c
        else:
            if len(c) > len(counts):
                counts, c = c, counts
            counts[:len(c)] += c
    if counts is None:
        return []
    return np.argsort(-counts, kind="stable")[:n].tolist()


__all__ = ["ContextDrafter", "FusedDrafter", "ModelDraftConfig", "ModelDrafter", "early_exit_model", "frequent_tokens",
           "fuse_trees"]
