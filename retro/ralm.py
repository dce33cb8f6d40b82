"""In-context retrieval augmentation (In-Context RALM, REPLUG, MassiveDS) of a frozen causal LM, with
its controls and the datastore scaling curve (``retromem ralm eval``).

For each held-out document (the eval split of :class:`retromem.retro.splits.SplitSpec`, tokenized
with the *model's* tokenizer), every ``stride`` tokens from position ``query_tokens`` on, the
preceding ``query_tokens`` tokens are the query; the next ``stride`` tokens are scored (loss on
them only) after up to ``context_tokens`` tokens of the document, under these settings:

* ``none``: the document context alone;
* ``retrieved``: the top-k retrieved chunks (chunk + continuation text, re-tokenized with the model's
  tokenizer, each followed by ``separator``) prepended, best chunk nearest the context;
* ``random``: k random datastore chunks cut to the same token lengths as the retrieved ones (rules
  out "any extra context helps");
* ``other_query``: the retrieved chunks of another document's query at the same position (rules out
  "any relevant-looking text helps").

Retrieval is one deep top-``deep_k`` search per query against the full index (evaluated documents
excluded); the datastore scaling curve is then computed MassiveDS's cheap way: for a subsample
(a chunk's document is in it when a seeded hash of its ``doc_id`` is below the fraction) the hits
of documents outside it are dropped and the top k of the rest kept. Decontamination drops every
hit whose chunk + continuation shares a ``decontam_ngram``-token n-gram (model tokens) with the
evaluated document, and counts them. Every difference between settings comes with a paired
bootstrap interval over documents (:func:`retromem.stats.paired_bootstrap` with documents as groups).

The retriever is duck-typed: ``search(queries, k, exclude_doc_ids=..., fetch=True)`` returning
payloads with ``text`` and ``continuation_text`` (an in-process :class:`retromem.index.dense.DenseIndex`,
BM25 hits from a :class:`retromem.index.lexical.LexicalIndex`, or the gRPC
:class:`retromem.service.client.RetrievalClient`); the controls are the same whichever retrieves.
Documents, random chunks and datastore sizes come from the local datastore.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from retromem.config import fail, integer, non_negative_int, number, optional_positive_int, positive_int
from retromem.errors import ConfigError
from retromem.retro.splits import SplitSpec
from retromem.stats import paired_bootstrap

logger = logging.getLogger(__name__)

SETTINGS = ("none", "retrieved", "random", "other_query")
# (a, b): every reported difference a - b in mean NLL per token
COMPARISONS = (("retrieved", "none"), ("retrieved", "random"), ("retrieved", "other_query"),
               ("random", "none"), ("other_query", "none"))


@dataclass(frozen=True)
class RalmConfig:
    stride: int = 64  # tokens scored per retrieval
    query_tokens: int = 32  # preceding tokens that form the query
    context_tokens: int = 512  # document tokens kept before the scored ones
    k: int = 4  # chunks prepended
    deep_k: int = 100  # hits retrieved once per query, filtered per subsample
    max_docs: int | None = 16  # held-out documents evaluated (first in doc_id order)
    max_doc_tokens: int | None = 1024  # tokens of each document considered (scoring stops there)
    eval_fraction: float = 0.05
    split_seed: int = 0
    fractions: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    decontam_ngram: int = 13  # 0: no decontamination
    separator: str = "\n\n"
    random_seed: int = 0
    batch_size: int = 8  # sequences per forward pass
    search_batch: int = 32  # queries per search call
    bootstrap: int = 1000
    level: float = 0.95

    def __post_init__(self) -> None:
        positive_int(self.stride, "stride", flag="--stride")
        positive_int(self.query_tokens, "query_tokens", flag="--query-tokens")
        positive_int(self.context_tokens, "context_tokens", flag="--context-tokens")
        positive_int(self.k, "k", flag="-k")
        positive_int(self.deep_k, "deep_k", flag="--deep-k")
        if self.deep_k < self.k:
            fail("deep_k", f"be at least k ({self.k})", self.deep_k, flag="--deep-k")
        optional_positive_int(self.max_docs, "max_docs", flag="--max-docs")
        optional_positive_int(self.max_doc_tokens, "max_doc_tokens", flag="--max-doc-tokens")
        SplitSpec(self.eval_fraction, self.split_seed)  # checks both
        if self.eval_fraction == 0:
            fail("eval_fraction", "be above 0: the held-out documents are the ones evaluated", 0, flag="--eval-fraction")
        object.__setattr__(self, "fractions", tuple(self.fractions))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not self.fractions:
            fail("fractions", "name at least one fraction", self.fractions, flag="--fractions")
        for f in self.fractions:
            number(f, "fractions", gt=0, le=1, flag="--fractions")
        if not self.seeds:
            fail("seeds", "name at least one seed", self.seeds, flag="--seeds")
        for s in self.seeds:
            integer(s, "seeds", flag="--seeds")
        non_negative_int(self.decontam_ngram, "decontam_ngram", flag="--decontam-ngram")
        if not isinstance(self.separator, str):
            fail("separator", "be a string", self.separator, flag="--separator")
        integer(self.random_seed, "random_seed", flag="--random-seed")
        positive_int(self.batch_size, "batch_size", flag="--batch-size")
        positive_int(self.search_batch, "search_batch", flag="--search-batch")
        positive_int(self.bootstrap, "bootstrap", flag="--bootstrap")
        number(self.level, "level", gt=0, lt=1, flag="--level")

    @property
    def split(self) -> SplitSpec:
        return SplitSpec(self.eval_fraction, self.split_seed)


# ---------------------------------------------------------------------------------------------
# pieces, each testable alone


def in_subsample(doc_ids: Sequence[int] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(n,) bool: documents in the datastore subsample ``(fraction, seed)``; every one at 1.0.

    A seeded hash of doc_id, so a chunk's membership does not depend on which query found it, and
    the subsample of a larger fraction (same seed) contains that of a smaller one."""
    ids = np.asarray(doc_ids, dtype=np.int64).reshape(-1)
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    out = np.empty(len(ids), dtype=bool)
    for i, d in enumerate(ids.tolist()):
        h = hashlib.blake2b(f"ralm-subsample:{seed}:{d}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "little") / 2**64 < fraction
    return out


def top_k_kept(chunk_ids: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``chunk_ids`` (best first; -1 = no hit) where ``keep`` is True."""
    ok = (np.asarray(chunk_ids) >= 0) & np.asarray(keep, dtype=bool)
    return np.asarray(chunk_ids)[ok][:k]


def ngram_set(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    t = list(tokens)
    return {tuple(t[i:i + n]) for i in range(len(t) - n + 1)}


def shares_ngram(tokens: Sequence[int], grams: set[tuple[int, ...]], n: int) -> bool:
    """True when ``tokens`` holds one of the n-grams ``grams`` (decontamination)."""
    t = list(tokens)
    return any(tuple(t[i:i + n]) in grams for i in range(len(t) - n + 1))


def random_tokens(ds: Any, tokenizer: Any, eligible: np.ndarray, length: int, rng: np.random.Generator,
                  cache: dict[int, list[int]] | None = None) -> list[int]:
    """Exactly ``length`` model tokens of random chunks (each with its continuation) drawn from the
    chunk ids ``eligible`` of datastore ``ds``; ``cache`` maps chunk id -> tokens across calls."""
    cache = {} if cache is None else cache
    out: list[int] = []
    tries = 0
    while len(out) < length:
        tries += 1
        if tries > 100 + 10 * length:
            raise ConfigError("the datastore's eligible chunks hold no text to draw random chunks from")
        c = int(rng.choice(eligible))
        if c not in cache:
            nxt = int(ds.continuation_ids([c])[0])
            text = ds.chunk_texts([c])[0] + (ds.chunk_texts([nxt])[0] if nxt >= 0 else "")
            cache[c] = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        out += cache[c]
    return out[:length]


def _nll_batch(model: torch.nn.Module, seqs: list[list[int]], n_targets: list[int], pad_id: int) -> list[np.ndarray]:
    """Per-token NLL (nats) of the last ``n_targets[i]`` tokens of each sequence.

    Left-padded, with position ids counted from each row's first real token, so every row's targets
    sit at the end and only the last ``max(n_targets) + 1`` positions go through the LM head (the
    (B, T, vocab) logits of whole sequences would cost more than the transformer itself)."""
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = max(n_targets) + 1
    kw = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device))
    try:
        logits = model(**kw, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        logits = model(**kw).logits
    logits = logits[:, -keep:-1].float()  # (B, keep-1, V): position t predicts token t+1
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, ids[:, width - keep + 1:].to(device)[..., None])[..., 0]  # (B, keep-1)
    return [nll[i, nll.shape[1] - m:].cpu().numpy().astype(np.float64) for i, m in enumerate(n_targets)]


@torch.inference_mode()
def score_sequences(model: torch.nn.Module, items: list[tuple[list[int], int]], *, pad_id: int,
                    batch_size: int = 8, progress: str | None = None) -> list[np.ndarray]:
    """Per-token NLL of the last ``m`` tokens of each ``(tokens, m)``; batches sorted by length.
    ``progress``: a label for a progress bar, or None for none."""
    from tqdm.auto import tqdm

    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out: list[np.ndarray | None] = [None] * len(items)
    for b in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None, unit="batch"):
        idx = order[b:b + batch_size]
        seqs = [items[i][0] for i in idx]
        if limit and max(len(s) for s in seqs) > limit:
            raise ConfigError(f"a scored sequence has {max(len(s) for s in seqs)} tokens, the model reads at most "
                              f"{limit}: lower --context-tokens, -k or --stride")
        for i, v in zip(idx, _nll_batch(model, seqs, [items[i][1] for i in idx], pad_id)):
            out[i] = v
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# the evaluation


@dataclass
class _Doc:
    doc_id: int
    tokens: list[int]  # model tokens, whole document
    positions: list[int]  # start of each scored block
    grams: set[tuple[int, ...]] = field(default_factory=set)


@dataclass
class RalmResult:
    """What :func:`evaluate_ralm` measured; :meth:`as_dict` is results.json."""

    config: dict[str, Any]
    doc_ids: list[int]
    tokens_scored: int
    datastore_tokens: int  # datastore tokens outside the evaluated documents (datastore tokenizer)
    settings: dict[str, dict[str, float]]  # name -> {nll, ppl, tokens}
    differences: list[dict[str, Any]]  # a - b in mean NLL, with intervals
    scaling: list[dict[str, Any]]  # one row per (fraction, seed)
    decontamination: dict[str, Any]
    retrievals: dict[str, list[list[list[int]]]]  # setting -> doc -> block -> chunk ids (full datastore)
    prefix_tokens: dict[str, int]  # setting -> tokens prepended, summed over blocks
    nll: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)  # setting -> per-doc token NLLs

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("nll")
        return d


def _payload_text(p: Any) -> str:
    return (p.text or "") + (p.continuation_text or "")


def evaluate_ralm(model: torch.nn.Module, tokenizer: Any, retriever: Any, datastore: Any, cfg: RalmConfig, *,
                  progress: bool = False, compressor: Any = None, runner: "RalmRunner | None" = None) -> RalmResult:
    """Scores the held-out documents of ``datastore`` under every setting and subsample (see module doc).
    ``compressor`` (:mod:`retromem.retro.compress`, TCRA-LLM): the ``retrieved`` setting's chunks are
    compressed, with the block's query in view, before they are prepended (``prefix_tokens`` shows
    the tokens saved); the controls and the scaling curve stay uncompressed.

    ``runner`` (:class:`RalmRunner`): the LM scoring (the cost) runs as its executor's tasks (local
    processes or Ray), each loading the model from its path; retrieval, the controls' draws and the
    sums stay here, so the result equals the in-process one exactly (the same batches; tested)."""
    if not callable(getattr(retriever, "search", None)):
        raise TypeError(f"the retriever must have search(queries, k, exclude_doc_ids=..., fetch=...), "
                        f"got {type(retriever).__name__}")
    ds = datastore
    _check_same_datastore(retriever, ds)
    k, n = cfg.k, cfg.decontam_ngram
    sep = list(tokenizer(cfg.separator, add_special_tokens=False)["input_ids"]) if cfg.separator else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # -- held-out documents, in model tokens
    docs: list[_Doc] = []
    for d in cfg.split.doc_ids(ds.num_documents, "eval").tolist():
        toks = list(tokenizer(ds.document_text(d), add_special_tokens=False)["input_ids"])
        end = len(toks) if cfg.max_doc_tokens is None else min(len(toks), cfg.max_doc_tokens)
        pos = list(range(cfg.query_tokens, end, cfg.stride))
        if pos:
            docs.append(_Doc(d, toks, pos, ngram_set(toks, n) if n else set()))
        if cfg.max_docs is not None and len(docs) >= cfg.max_docs:
            break
    if not docs:
        raise ConfigError(f"no held-out document has more than --query-tokens ({cfg.query_tokens}) tokens "
                          f"(eval_fraction {cfg.eval_fraction}, split_seed {cfg.split_seed}): raise --eval-fraction")
    eval_ids = [d.doc_id for d in docs]
    logger.info("ralm: %d held-out documents, %d scored blocks", len(docs), sum(len(d.positions) for d in docs))

    # -- one deep retrieval per query, evaluated documents excluded
    queries = [(i, b, tokenizer.decode(doc.tokens[p - cfg.query_tokens:p]))
               for i, doc in enumerate(docs) for b, p in enumerate(doc.positions)]
    query_text = {(i, b): q for i, b, q in queries}
    deep: dict[tuple[int, int], np.ndarray] = {}
    chunk_text: dict[int, str] = {}
    for s in range(0, len(queries), cfg.search_batch):
        part = queries[s:s + cfg.search_batch]
        res = retriever.search([q for _, _, q in part], cfg.deep_k, exclude_doc_ids=[eval_ids] * len(part), fetch=True)
        for (i, b, _), row, pays in zip(part, res.chunk_ids, res.payloads):
            deep[i, b] = np.asarray(row[row >= 0], dtype=np.int64)
            for p in pays:
                chunk_text.setdefault(int(p.chunk_id), _payload_text(p))
    all_hits = np.array(sorted(chunk_text), dtype=np.int64)
    hit_doc = dict(zip(all_hits.tolist(), ds.doc_ids(all_hits).tolist())) if len(all_hits) else {}
    if any(hit_doc[c] in set(eval_ids) for c in hit_doc):  # the retriever must honour exclude_doc_ids
        raise ConfigError("the retriever returned a chunk of an excluded (evaluated) document")
    chunk_tokens = {c: list(tokenizer(t, add_special_tokens=False)["input_ids"]) for c, t in chunk_text.items()}

    contaminated: dict[tuple[int, int], bool] = {}

    def clean(i: int, c: int) -> bool:
        if not n:
            return True
        if (i, c) not in contaminated:
            contaminated[i, c] = shares_ngram(chunk_tokens[c], docs[i].grams, n)
        return not contaminated[i, c]

    def select(i: int, hits: np.ndarray, keep_docs: np.ndarray | None = None, forbid: int | None = None) -> list[int]:
        keep = np.array([clean(i, int(c)) and hit_doc[int(c)] != forbid for c in hits], dtype=bool)
        if keep_docs is not None:
            keep &= keep_docs
        return top_k_kept(hits, keep, k).tolist()

    def prefix(ids: Sequence[int]) -> list[int]:
        out: list[int] = []
        for c in reversed(list(ids)):  # best chunk last, nearest the context
            out += chunk_tokens[c] + sep
        return out

    # -- the items to score: (setting, doc, block) -> (tokens, m)
    def item(i: int, b: int, pre: list[int]) -> tuple[list[int], int]:
        doc, p = docs[i], docs[i].positions[b]
        end = min(p + cfg.stride, len(doc.tokens))
        return pre + doc.tokens[max(0, p - cfg.context_tokens):end], end - p

    rng = np.random.default_rng(cfg.random_seed)
    chunk_doc = np.asarray(ds.chunk_doc_array)
    eligible = np.flatnonzero(~np.isin(chunk_doc, eval_ids))
    if len(eligible) == 0:
        raise ConfigError("the datastore holds no chunk outside the evaluated documents")

    selections: dict[str, dict[tuple[int, int], list[int]]] = {"retrieved": {}, "other_query": {}}
    prefixes: dict[str, dict[tuple[int, int], list[int]]] = {s: {} for s in SETTINGS}
    dropped_topk = 0
    for i, doc in enumerate(docs):
        for b in range(len(doc.positions)):
            hits = deep[i, b]
            sel = select(i, hits)
            selections["retrieved"][i, b] = sel
            dropped_topk += sum(1 for c in hits[:k].tolist() if not clean(i, c))
            prefixes["none"][i, b] = []
            prefixes["retrieved"][i, b] = prefix(sel)
            if compressor is not None:
                texts = compressor.compress(query_text[i, b], [chunk_text[c] for c in reversed(sel)])
                prefixes["retrieved"][i, b] = [t for x in texts for t in
                                               list(tokenizer(x, add_special_tokens=False)["input_ids"]) + sep]
            # random: the same lengths, chunk by chunk, so the two prefixes have equal token counts
            rand: list[int] = []
            for c in reversed(sel):
                rand += random_tokens(ds, tokenizer, eligible, len(chunk_tokens[c]), rng, chunk_tokens) + sep
            prefixes["random"][i, b] = rand
            if len(docs) > 1:
                j = (i + 1) % len(docs)
                bj = min(b, len(docs[j].positions) - 1)
                other = select(i, deep[j, bj], None, forbid=doc.doc_id)
            else:
                other = []
            selections["other_query"][i, b] = other
            prefixes["other_query"][i, b] = prefix(other)
    dropped_deep = sum(contaminated.values())

    # -- the scaling curve's selections: subsamples of the datastore, hits filtered from the deep lists
    keys = [(i, b) for i, doc in enumerate(docs) for b in range(len(doc.positions))]
    subsamples: list[tuple[float, int, np.ndarray, dict[tuple[int, int], list[int]]]] = []
    all_docs = np.arange(ds.num_documents)
    for f in cfg.fractions:
        for seed in (cfg.seeds if f < 1.0 else cfg.seeds[:1]):
            member = in_subsample(all_docs, f, seed)
            if f >= 1.0:
                sels = selections["retrieved"]
            else:
                sels = {(i, b): select(i, deep[i, b], member[[hit_doc[int(c)] for c in deep[i, b]]]
                                       if len(deep[i, b]) else np.zeros(0, bool))
                        for i, b in keys}
            subsamples.append((f, seed, member, sels))

    # -- score the four settings and every subsample (in process, or as the runner's tasks)
    work: dict[str, list[tuple[list[int], int]]] = {}
    for s in SETTINGS:
        if s == "other_query" and len(docs) < 2:
            continue
        work[s] = [item(i, b, prefixes[s][i, b]) for i, b in keys]
    for f, seed, _, sels in subsamples:
        if f < 1.0:
            work[f"fraction {f:g} seed {seed}"] = [item(i, b, prefix(sels[i, b])) for i, b in keys]
    if runner is None:
        scored = {}
        for name, items in work.items():
            scored[name] = score_sequences(model, items, pad_id=pad, batch_size=cfg.batch_size,
                                           progress=name if progress else None)
            logger.info("ralm: scored %s", name)
    else:
        scored = runner.score(work, pad_id=pad, batch_size=cfg.batch_size)
    nll: dict[str, list[np.ndarray]] = {s: _per_doc(scored[s], keys, len(docs)) for s in SETTINGS if s in scored}

    doc_tokens = np.bincount(chunk_doc, weights=np.asarray(ds.chunk_ntokens_array, dtype=np.float64),
                             minlength=ds.num_documents)
    outside = ~np.isin(np.arange(ds.num_documents), eval_ids)
    scaling = []
    for f, seed, member, sels in subsamples:
        vals_doc = nll["retrieved"] if f >= 1.0 else _per_doc(scored[f"fraction {f:g} seed {seed}"], keys, len(docs))
        counts = np.array([len(v) for v in sels.values()])
        row = {"fraction": float(f), "seed": int(seed), "datastore_tokens": int(doc_tokens[member & outside].sum()),
               **_summary(vals_doc), "mean_chunks": float(counts.mean()), "blocks_short": int((counts < k).sum()),
               "vs_none": _diff(vals_doc, nll["none"], cfg), "vs_random": _diff(vals_doc, nll["random"], cfg)}
        scaling.append(row)
        logger.info("ralm: fraction %.3g seed %d: ppl %.3f", f, seed, row["ppl"])

    settings = {s: _summary(v) for s, v in nll.items()}
    diffs = [{"a": a, "b": b, **_diff(nll[a], nll[b], cfg)} for a, b in COMPARISONS if a in nll and b in nll]
    return RalmResult(
        config=_config_dict(cfg), doc_ids=eval_ids, tokens_scored=int(sum(len(v) for v in nll["none"])),
        datastore_tokens=int(doc_tokens[outside].sum()), settings=settings, differences=diffs, scaling=scaling,
        decontamination={"ngram": n, "dropped_candidates": int(dropped_deep), "dropped_from_top_k": int(dropped_topk),
                         "candidates_checked": len(contaminated)},
        retrievals={s: [[sel[i, b] for b in range(len(doc.positions))] for i, doc in enumerate(docs)]
                    for s, sel in selections.items()},
        prefix_tokens={s: int(sum(len(p) for p in pre.values())) for s, pre in prefixes.items()},
        nll=nll,
    )


@dataclass(frozen=True)
class RalmModel:
    """Where every task finds the scoring LM (a directory every node sees, a built-in name or a hub id
    each node resolves from its own cache) and its torch threads (the in-process run's ``--threads``)."""

    model: str
    threads: int = 1


@functools.lru_cache(maxsize=1)
def _lm_of(spec: RalmModel) -> torch.nn.Module:
    # a worker process (Ray reuses them) loads the model once, not once per task
    from retromem.models import load_causal_lm

    return load_causal_lm(spec.model)[0]


def _score_task(ctx: tuple[RalmModel, int, int], task: tuple[str, int, list[tuple[list[int], int]]]) -> list[np.ndarray]:
    """One task: :func:`score_sequences` over a run of whole batches of one setting's length-sorted items."""
    spec, pad_id, batch_size = ctx
    torch.set_num_threads(spec.threads)
    return score_sequences(_lm_of(spec), task[2], pad_id=pad_id, batch_size=batch_size)


class RalmRunner:
    """Runs :func:`evaluate_ralm`'s scoring as tasks of an executor (``retromem.datastore.executors``:
    local processes or Ray). Each setting's sequences are sorted by length as :func:`score_sequences`
    sorts them and cut into at most ``shards`` runs of whole batches, one task each (all settings'
    tasks at once), so every batch is the one the in-process run forms; results come back in order."""

    def __init__(self, executor: Any, model: RalmModel, shards: int) -> None:
        positive_int(shards, "shards", flag="--workers")
        self.executor, self.model, self.shards = executor, model, shards

    def score(self, work: dict[str, list[tuple[list[int], int]]], *, pad_id: int,
              batch_size: int) -> dict[str, list[np.ndarray]]:
        tasks, where = [], {}
        for name, items in work.items():
            order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
            nb = -(-len(items) // batch_size)
            bounds = np.linspace(0, nb, min(self.shards, nb) + 1).round().astype(int) * batch_size
            for a, b in zip(bounds[:-1], bounds[1:]):
                if b > a:
                    idx = order[a:b]
                    where[name, len(tasks)] = idx
                    tasks.append((name, len(tasks), [items[i] for i in idx]))
        out: dict[str, list[np.ndarray | None]] = {name: [None] * len(items) for name, items in work.items()}
        for task, vals in self.executor.map(_score_task, (self.model, pad_id, batch_size), tasks):
            for i, v in zip(where[task[0], task[1]], vals):
                out[task[0]][i] = v
        return out  # type: ignore[return-value]


def _check_same_datastore(retriever: Any, ds: Any) -> None:
    """ConfigError unless the retriever searches ``ds`` (its chunk ids would name other chunks)."""
    theirs, where = None, "the index"
    if getattr(retriever, "datastore", None) is not None:
        theirs = retriever.datastore.datastore_id
    elif callable(getattr(retriever, "info", None)) and hasattr(retriever, "target"):
        info = retriever.info()
        theirs, where = (info.datastore.datastore_id if info.HasField("datastore") else None), f"the server at {retriever.target}"
    if theirs is not None and theirs != ds.datastore_id:
        raise ConfigError(f"{where} serves datastore {theirs}, but --datastore {ds.path} is {ds.datastore_id}")


def _per_doc(vals: list[np.ndarray], keys: list[tuple[int, int]], ndocs: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(ndocs)]
    for (i, _), v in zip(keys, vals):
        parts[i].append(v)
    return [np.concatenate(p) for p in parts]


def _summary(per_doc: list[np.ndarray]) -> dict[str, float]:
    flat = np.concatenate(per_doc)
    return {"nll": float(flat.mean()), "ppl": float(math.exp(flat.mean())), "tokens": int(len(flat))}


def _diff(a: list[np.ndarray], b: list[np.ndarray], cfg: RalmConfig) -> dict[str, Any]:
    """Mean NLL difference a - b with a paired bootstrap interval over documents, and as a ppl ratio."""
    groups = np.concatenate([np.full(len(x), i) for i, x in enumerate(a)])
    r = paired_bootstrap(np.concatenate(a), np.concatenate(b), groups=groups, n=cfg.bootstrap, seed=cfg.random_seed,
                         level=cfg.level)
    return {"delta_nll": r.mean, "low": r.low, "high": r.high, "level": r.level, "ppl_ratio": math.exp(r.mean),
            "ppl_ratio_low": math.exp(r.low), "ppl_ratio_high": math.exp(r.high), "excludes_zero": r.excludes_zero(),
            "documents": r.n_groups}


def _config_dict(cfg: RalmConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["fractions"], d["seeds"] = list(cfg.fractions), list(cfg.seeds)
    return d


def plot_scaling(result: RalmResult | dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Perplexity against datastore tokens (log x): the retrieved curve (mean over seeds, error bars =
    the paired interval of its difference with no retrieval, as a ppl ratio times the no-retrieval
    ppl), with the no-retrieval and random-chunk lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result.as_dict() if isinstance(result, RalmResult) else result
    none_ppl = r["settings"]["none"]["ppl"]
    by_f: dict[float, list[dict[str, Any]]] = {}
    for row in r["scaling"]:
        by_f.setdefault(row["fraction"], []).append(row)
    xs, ys, lo, hi = [], [], [], []
    for f in sorted(by_f):
        rows = by_f[f]
        xs.append(np.mean([x["datastore_tokens"] for x in rows]))
        ys.append(np.mean([x["ppl"] for x in rows]))
        lo.append(np.mean([none_ppl * x["vs_none"]["ppl_ratio_low"] for x in rows]))
        hi.append(np.mean([none_ppl * x["vs_none"]["ppl_ratio_high"] for x in rows]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ys_a = np.array(ys)
    ax.errorbar(xs, ys, yerr=[np.maximum(ys_a - lo, 0), np.maximum(np.array(hi) - ys_a, 0)], marker="o", capsize=3,
                label=f"retrieved (k={r['config']['k']})")
    for row in r["scaling"]:
        ax.plot(row["datastore_tokens"], row["ppl"], "x", color="C0", alpha=0.4)
    ax.axhline(none_ppl, color="k", ls="--", label="no retrieval")
    if "random" in r["settings"]:
        ax.axhline(r["settings"]["random"]["ppl"], color="C3", ls=":", label="random chunks (same length)")
    if "other_query" in r["settings"]:
        ax.axhline(r["settings"]["other_query"]["ppl"], color="C2", ls="-.", label="another query's chunks")
    ax.set_xscale("log")
    ax.set_xlabel("datastore tokens (subsample)")
    ax.set_ylabel("perplexity of the scored tokens")
    ax.set_title(title or f"{len(r['doc_ids'])} held-out documents, {r['tokens_scored']:,} tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["COMPARISONS", "RalmConfig", "RalmModel", "RalmResult", "RalmRunner", "SETTINGS", "evaluate_ralm",
           "in_subsample", "ngram_set", "plot_scaling", "random_tokens", "score_sequences", "shares_ngram", "top_k_kept"]
