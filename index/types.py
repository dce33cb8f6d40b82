"""Result types shared by the dense and n-gram indexes.

A dense hit, an n-gram hit and a RETRO neighbour are the same kind of thing: a ``chunk_id`` in a
datastore. :func:`fetch_payloads` turns chunk ids into what a caller asked to see (text, tokens,
the continuation) through the datastore read API, so every index returns the same payload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class ChunkPayload:
    """A chunk fetched from the datastore, with its continuation (the next chunk of the same
    document; ``continuation_id`` is ``None`` for a document's last chunk)."""

    chunk_id: int
    doc_id: int
    text: str | None = None
    tokens: np.ndarray | None = None
    continuation_id: int | None = None
    continuation_text: str | None = None
    continuation_tokens: np.ndarray | None = None


def fetch_payloads(ds, chunk_ids: Sequence[int] | np.ndarray, *, text: bool = True, tokens: bool = True,
                   continuation: bool = True) -> list[ChunkPayload]:
    """Payloads of ``chunk_ids`` from datastore ``ds`` (a :class:`retromem.datastore.Datastore`), in order.

    Negative ids (FAISS's "no result") are not allowed here: filter them first.
    """
    ids = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
    if len(ids) == 0:
        return []
    docs = ds.doc_ids(ids)
    texts = ds.chunk_texts(ids) if text else None
    if tokens:
        toks, lens = ds.tokens(ids)
    nxt = ds.continuation_ids(ids) if continuation else np.full(len(ids), -1)
    has = nxt >= 0
    ctexts: dict[int, str] = {}
    ctoks: dict[int, np.ndarray] = {}
    if continuation and has.any():
        nids = nxt[has]
        if text:
            ctexts = dict(zip(nids.tolist(), ds.chunk_texts(nids)))
        if tokens:
            nt, nl = ds.tokens(nids)
            ctoks = {int(c): np.array(nt[i, : nl[i]]) for i, c in enumerate(nids)}
    out = []
    for i, cid in enumerate(ids.tolist()):
        n = int(nxt[i])
        out.append(ChunkPayload(
            chunk_id=cid, doc_id=int(docs[i]),
            text=texts[i] if texts is not None else None,
            tokens=np.array(toks[i, : lens[i]]) if tokens else None,
            continuation_id=n if n >= 0 else None,
            continuation_text=ctexts.get(n) if n >= 0 else None,
            continuation_tokens=ctoks.get(n) if n >= 0 else None,
        ))
    return out
