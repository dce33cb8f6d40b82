"""Generation with fresh retrieval (``retromem retro generate``): every time a chunk of m tokens is
complete (prompt or generated), its text is sent to the retriever and its k neighbours (chunk +
continuation) join the model's neighbours, so the next chunk is written reading them.

The retriever is duck-typed like the neighbours job's: ``search([text], k, exclude_doc_ids=...,
fetch=True)`` returning ``payloads`` with ``tokens`` and ``continuation_tokens`` (an in-process
:class:`retromem.index.dense.DenseIndex`, or the service client). Between chunk boundaries decoding is
Hugging Face ``generate`` with fixed neighbours (greedy, sampling, ... as configured); batch size 1.
"""

from __future__ import annotations

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


@torch.inference_mode()
def generate_with_retrieval(model: torch.nn.Module, tokenizer: Any, retriever: Any, prompt: str | Sequence[int], *,
                            max_new_tokens: int = 64, exclude_doc_ids: Sequence[int] | None = None,
                            on_retrieval: Callable[[Retrieval], None] | None = None,
                            **generate_kwargs: Any) -> GenerationResult:
    """Decodes ``max_new_tokens`` after ``prompt``, retrieving at every chunk boundary.

    exclude_doc_ids: documents never retrieved from (e.g. the one the prompt came from).
    generate_kwargs: passed to ``model.generate`` (do_sample, temperature, top_p, ...)."""
    cfg = model.retro_config if getattr(model, "retro_config", None) is not None else getattr(model, "config", None)
    if getattr(cfg, "chunk_length", None) is None:
        raise ConfigError(f"{type(model).__name__} is not a RETRO model (RETROfit it or load a RetroForCausalLM)")
    if not callable(getattr(retriever, "search", None)):
        raise TypeError(f"the retriever must have search(queries, k, exclude_doc_ids=..., fetch=...), got {type(retriever).__name__}")
    positive_int(max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
    check_retriever(retriever, tokenizer, cfg)
    m, k, r = cfg.chunk_length, cfg.num_neighbours, cfg.neighbour_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ConfigError("the prompt is empty")
    excl = None if exclude_doc_ids is None else [list(exclude_doc_ids)]
    nbr_toks: list[np.ndarray] = []
    nbr_mask: list[np.ndarray] = []
    retrievals: list[Retrieval] = []
    device = next(model.parameters()).device

    def retrieve_complete_chunks() -> None:
        while len(nbr_toks) < len(ids) // m:
            u = len(nbr_toks)
            query = tokenizer.decode(ids[u * m:(u + 1) * m])
            res = retriever.search([query], k, exclude_doc_ids=excl, fetch=True)
            payloads = res.payloads[0]
            t, mk = neighbour_rows(payloads, k, r, pad)
            nbr_toks.append(t)
            nbr_mask.append(mk)
            rec = Retrieval(u, query, [p.chunk_id for p in payloads[:k]], [p.doc_id for p in payloads[:k]],
                            [float(s) for s in np.asarray(res.scores[0])[:k]], [p.text for p in payloads[:k]])
            retrievals.append(rec)
            if on_retrieval is not None:
                on_retrieval(rec)

    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("pad_token_id", pad)
    start = len(ids)
    while len(ids) - start < max_new_tokens:
        retrieve_complete_chunks()
        boundary = (len(ids) // m + 1) * m
        n = min(boundary - len(ids), max_new_tokens - (len(ids) - start))
        x = torch.tensor([ids], device=device)
        kw = dict(generate_kwargs)
        if nbr_toks:
            kw["neighbour_ids"] = torch.from_numpy(np.stack(nbr_toks))[None].to(device)  # (1, C, k, r)
            kw["neighbour_attention_mask"] = torch.from_numpy(np.stack(nbr_mask))[None].to(device)
        out = model.generate(x, max_new_tokens=n, min_new_tokens=0, **kw)
        new = out[0, len(ids):].tolist()
        ids.extend(new)
        if not new or (tokenizer.eos_token_id is not None and new[-1] == tokenizer.eos_token_id):
            break
    new_ids = ids[start:]
    return GenerationResult(ids[:start], new_ids, tokenizer.decode(new_ids), retrievals)
