"""Generation with fresh retrieval (``retromem retro generate``): every time a chunk of m tokens is
complete (prompt or generated), its text is sent to the retriever and its k neighbours (chunk +
continuation) join the model's neighbours, so the next chunk is written reading them.

The retriever is duck-typed like the neighbours job's: ``search(texts, k, exclude_doc_ids=...,
fetch=True)`` returning ``payloads`` with ``tokens`` and ``continuation_tokens`` (an in-process
:class:`retromem.index.dense.DenseIndex`, or the service client). Decoding is one Hugging Face
``generate`` call with a key/value cache (greedy, sampling, beam search, a streamer, as configured):
the model calls :class:`ChunkRetriever` whenever a row completes a chunk, with the chunk's tokens,
so the prompts of a batch (left-padded) retrieve together, each at its own chunk boundaries.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from retromem.config import positive_int
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retrieval:
    """The neighbours fetched for chunk ``chunk_index`` (0-based, of prompt + generated tokens)."""

    chunk_index: int
    query: str
    chunk_ids: list[int]
    doc_ids: list[int]
    scores: list[float]
    texts: list[str | None]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str  # the generated continuation alone
    retrievals: list[Retrieval] = field(default_factory=list)


def neighbour_rows(payloads: Sequence[Any], k: int, r: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, r) token ids and mask from retrieved payloads: chunk tokens then continuation tokens."""
    if len(payloads) < k:
        raise ConfigError(f"the retriever returned {len(payloads)} neighbours, the model reads {k}")
    toks = np.full((k, r), pad_id, dtype=np.int64)
    mask = np.zeros((k, r), dtype=bool)
    for j, p in enumerate(payloads[:k]):
        if p.tokens is None:
            raise ConfigError("the retriever returned neighbours without tokens: search with fetch=True")
        row = np.concatenate([np.asarray(p.tokens), np.asarray(p.continuation_tokens if p.continuation_tokens is not None
                                                                  else [], dtype=np.int64)])[:r]
        toks[j, : len(row)] = row
        mask[j, : len(row)] = True
    return toks, mask


def check_retriever(retriever: Any, tokenizer: Any, cfg: Any) -> None:
    """ConfigError unless the retriever's datastore was tokenized by the model's tokenizer and cut into
    the model's chunk length. A local index has a ``datastore``; a :class:`retromem.service.client.RetrievalClient`
    reports the server's datastore through ``info()``; other retrievers are taken on trust."""
    from retromem.retro.data import check_datastore_tokenizer, check_tokenizer_record

    ds = getattr(retriever, "datastore", None)
    if ds is not None:
        check_datastore_tokenizer(ds, tokenizer, cfg.vocab_size)
        chunk_length = ds.chunk_length
    elif callable(getattr(retriever, "info", None)) and hasattr(retriever, "target"):
        info = retriever.info()
        d = info.datastore
        where = f"the datastore served at {retriever.target}"
        if not info.HasField("datastore") or not d.vocab_sha256:
            raise ConfigError(f"the server at {retriever.target} serves no datastore: RETRO needs neighbour tokens")
        if not info.HasField("dense"):
            raise ConfigError(f"the server at {retriever.target} serves no dense index: start it with --dense")
        check_tokenizer_record(d.tokenizer, d.vocab_sha256, int(d.vocab_size), where, tokenizer, cfg.vocab_size)
        chunk_length = int(d.chunk_length)
    else:
        return
    if chunk_length != cfg.chunk_length:
        raise ConfigError(f"the retriever's datastore has chunks of {chunk_length} tokens, the model {cfg.chunk_length}")


class ChunkRetriever:
    """The ``retriever`` callable a RETRO model's forward takes: ``(chunk_ids (N, m), chunk_index, rows (N,))
    -> (ids (N, k, r), mask (N, k, r))``, searching ``retriever`` with the decoded text of each chunk and
    recording every search as a :class:`Retrieval` under its batch row."""

    def __init__(self, retriever: Any, tokenizer: Any, k: int, r: int, pad_id: int,
                 exclude_doc_ids: Sequence[int] | None = None,
                 on_retrieval: Callable[[int, Retrieval], None] | None = None) -> None:
        self.retriever, self.tokenizer, self.k, self.r, self.pad_id = retriever, tokenizer, k, r, pad_id
        self.exclude = None if exclude_doc_ids is None else list(exclude_doc_ids)
        self.on_retrieval = on_retrieval
        self.records: dict[int, list[Retrieval]] = {}

    def __call__(self, chunk_ids: torch.Tensor, chunk_index: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = [self.tokenizer.decode(row) for row in chunk_ids.tolist()]
        excl = None if self.exclude is None else [self.exclude] * len(queries)
        res = self.retriever.search(queries, self.k, exclude_doc_ids=excl, fetch=True)
        toks, masks = [], []
        for i, (row, query) in enumerate(zip(rows.tolist(), queries)):
            payloads = res.payloads[i]
            t, mk = neighbour_rows(payloads, self.k, self.r, self.pad_id)
            toks.append(t)
            masks.append(mk)
            rec = Retrieval(chunk_index, query, [p.chunk_id for p in payloads[:self.k]],
                            [p.doc_id for p in payloads[:self.k]],
                            [float(s) for s in np.asarray(res.scores[i])[:self.k]], [p.text for p in payloads[:self.k]])
            self.records.setdefault(row, []).append(rec)
            if self.on_retrieval is not None:
                self.on_retrieval(row, rec)
        device = chunk_ids.device
        return torch.from_numpy(np.stack(toks)).to(device), torch.from_numpy(np.stack(masks)).to(device)


def _retro_settings(model: Any) -> Any:
    cfg = model.retro_config if getattr(model, "retro_config", None) is not None else getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    takes = "retriever" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())  # e.g. a peft wrapper
    if getattr(cfg, "chunk_length", None) is None or not takes:
        raise ConfigError(f"{type(model).__name__} is not a RETRO model (RETROfit it or load a RetroForCausalLM)")
    return cfg


@torch.inference_mode()
def generate_batch_with_retrieval(model: torch.nn.Module, tokenizer: Any, retriever: Any,
                                  prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 64,
                                  exclude_doc_ids: Sequence[int] | None = None,
                                  on_retrieval: Callable[[int, Retrieval], None] | None = None,
                                  **generate_kwargs: Any) -> list[GenerationResult]:
    """Decodes ``max_new_tokens`` after each prompt (a batch, left-padded), retrieving at every chunk
    boundary of every row; one :class:`GenerationResult` per prompt (its text stops after an end-of-text).

    exclude_doc_ids: documents never retrieved from (e.g. the ones the prompts came from).
    on_retrieval: called with (prompt index, Retrieval) as each search returns; with beam search the
        rows are beams, and a prompt's records are every search its beams made.
    generate_kwargs: passed to ``model.generate`` (do_sample, temperature, top_p, num_beams, streamer,
        use_cache, ...); ``num_return_sequences`` must stay 1."""
    cfg = _retro_settings(model)
    if not callable(getattr(retriever, "search", None)):
        raise TypeError(f"the retriever must have search(queries, k, exclude_doc_ids=..., fetch=...), got {type(retriever).__name__}")
    positive_int(max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
    if generate_kwargs.get("num_return_sequences", 1) != 1:
        raise ConfigError("`num_return_sequences` must be 1: generation with retrieval returns one text per prompt")
    check_retriever(retriever, tokenizer, cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) if isinstance(p, str) else list(p) for p in prompts]
    if not rows or any(not r for r in rows):
        raise ConfigError("the prompt is empty")
    longest = max(len(r) for r in rows)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=device)  # (B, T) left-padded
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=device)
    beams = int(generate_kwargs.get("num_beams", 1) or 1)
    hook = None if on_retrieval is None else (lambda row, rec: on_retrieval(row // beams, rec))
    chunks = ChunkRetriever(retriever, tokenizer, cfg.num_neighbours, cfg.neighbour_length, pad, exclude_doc_ids, hook)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, retriever=chunks, **generate_kwargs)
    results = []
    for i, prompt_ids in enumerate(rows):
        new = out[i, longest:].tolist()
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        records = [rec for row in range(i * beams, (i + 1) * beams) for rec in chunks.records.get(row, [])]
        results.append(GenerationResult(prompt_ids, new, tokenizer.decode(new), records))
    return results


def generate_with_retrieval(model: torch.nn.Module, tokenizer: Any, retriever: Any, prompt: str | Sequence[int], *,
                            max_new_tokens: int = 64, exclude_doc_ids: Sequence[int] | None = None,
                            on_retrieval: Callable[[Retrieval], None] | None = None,
                            **generate_kwargs: Any) -> GenerationResult:
    """Decodes ``max_new_tokens`` after ``prompt``, retrieving at every chunk boundary (one prompt of
    :func:`generate_batch_with_retrieval`; ``on_retrieval`` gets each Retrieval)."""
    hook = None if on_retrieval is None else (lambda _row, rec: on_retrieval(rec))
    return generate_batch_with_retrieval(model, tokenizer, retriever, [prompt], max_new_tokens=max_new_tokens,
                                         exclude_doc_ids=exclude_doc_ids, on_retrieval=hook, **generate_kwargs)[0]
