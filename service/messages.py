"""Conversions between the ``retromem.v1`` protobuf messages and the library's result types
(:class:`retromem.index.types.ChunkPayload`, n-gram distributions and occurrences, the server's
limits), for the servicer, the router and the client."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from retromem.index.types import ChunkPayload
from retromem.service.config import ServerConfig
from retromem.service.v1 import retrieval_pb2 as pb

FETCH_ALL = ("text", "tokens", "continuation")


def fetch_flags(msg: pb.Fetch | None, *, default_all: bool = False) -> tuple[str, ...]:
    if msg is None:
        return FETCH_ALL if default_all else ()
    return tuple(name for name in FETCH_ALL if getattr(msg, name))


def fetch_msg(flags: Iterable[str] | bool) -> pb.Fetch:
    if flags is True:
        flags = FETCH_ALL
    elif flags is False or flags is None:
        flags = ()
    elif isinstance(flags, str):
        flags = (flags,)
    flags = set(flags)
    bad = flags - set(FETCH_ALL)
    if bad:
        raise ValueError(f"fetch must be True or some of {list(FETCH_ALL)}, got {sorted(bad)}")
    return pb.Fetch(**{name: name in flags for name in FETCH_ALL})


def meta_value_msg(v: Any, field: str = "metadata") -> pb.MetadataValue:
    """One metadata value as a message (bool before int: a bool is an int in Python)."""
    if isinstance(v, (bool, np.bool_)):
        return pb.MetadataValue(flag=bool(v))
    if isinstance(v, (int, np.integer)):
        return pb.MetadataValue(int=int(v))
    if isinstance(v, (float, np.floating)):
        return pb.MetadataValue(real=float(v))
    if isinstance(v, str):
        return pb.MetadataValue(text=v)
    if v is None:
        return pb.MetadataValue()
    return pb.MetadataValue(text=str(v))  # dates, decimals: their text form


def meta_value(m: pb.MetadataValue) -> Any:
    kind = m.WhichOneof("value")
    return None if kind is None else getattr(m, kind)


def metadata_msg(target, metadata: dict[str, Any] | None) -> None:
    """Fill the ``metadata`` map of ``target`` (a Chunk or Document message)."""
    for k, v in (metadata or {}).items():
        target.metadata[str(k)].CopyFrom(meta_value_msg(v))


def filters_msg(filters: dict[str, Any] | None) -> list[pb.MetadataFilter]:
    """``{field: value or [values]}`` as MetadataFilter messages."""
    out = []
    for name, value in (filters or {}).items():
        values = list(value) if isinstance(value, (list, tuple, set, frozenset)) else [value]
        out.append(pb.MetadataFilter(field=name, values=[meta_value_msg(v) for v in values]))
    return out


def filters_from_msg(filters: Iterable[pb.MetadataFilter], prefix: str = "") -> dict[str, list]:
    """MetadataFilter messages as ``{field: [values]}``; an empty field, an empty value list or a
    field named twice raises ValueError naming the field."""
    out: dict[str, list] = {}
    for i, f in enumerate(filters):
        where = f"`{prefix}filters[{i}]"
        if not f.field:
            raise ValueError(f"{where}.field` is empty: name a metadata field")
        if f.field in out:
            raise ValueError(f"{where}.field` names {f.field!r} twice: give all its values in one filter")
        if not len(f.values):
            raise ValueError(f"{where}.values` is empty: give at least one value")
        vals = [meta_value(v) for v in f.values]
        if any(v is None for v in vals):
            raise ValueError(f"{where}.values` holds an unset value")
        out[f.field] = vals
    return out


def chunk_msg(p: ChunkPayload, id_offset: int = 0, doc_offset: int = 0) -> pb.Chunk:
    m = pb.Chunk(chunk_id=p.chunk_id + id_offset, doc_id=p.doc_id + doc_offset, source_id=p.source_id or "")
    metadata_msg(m, p.metadata)
    if p.text is not None:
        m.text = p.text
    if p.tokens is not None:
        m.tokens.extend(np.asarray(p.tokens).tolist())
    if p.continuation_id is not None:
        m.continuation_id = p.continuation_id + id_offset
        if p.continuation_text is not None:
            m.continuation_text = p.continuation_text
        if p.continuation_tokens is not None:
            m.continuation_tokens.extend(np.asarray(p.continuation_tokens).tolist())
    return m


def payload_from_msg(m: pb.Chunk) -> ChunkPayload:
    has_cont = m.HasField("continuation_id")
    return ChunkPayload(
        chunk_id=int(m.chunk_id), doc_id=int(m.doc_id),
        text=m.text if m.HasField("text") else None,
        tokens=np.asarray(m.tokens, dtype=np.int64) if len(m.tokens) else None,
        continuation_id=int(m.continuation_id) if has_cont else None,
        continuation_text=m.continuation_text if m.HasField("continuation_text") else None,
        continuation_tokens=np.asarray(m.continuation_tokens, dtype=np.int64) if has_cont and len(m.continuation_tokens) else None,
        source_id=m.source_id or None, metadata={k: meta_value(v) for k, v in m.metadata.items()},
    )


def shift_chunk(m: pb.Chunk, id_offset: int, doc_offset: int) -> None:
    """Renumber a shard's chunk into the router's id space, in place."""
    m.chunk_id += id_offset
    m.doc_id += doc_offset
    if m.HasField("continuation_id"):
        m.continuation_id += id_offset


def limits_msg(cfg: ServerConfig) -> pb.Limits:
    lim = cfg.limits
    return pb.Limits(max_batch=lim.max_batch, max_k=lim.max_k, max_query_bytes=lim.max_query_bytes,
                     max_query_tokens=lim.max_query_tokens, max_chunks=lim.max_chunks, max_find_limit=lim.max_find_limit,
                     max_clauses=lim.max_clauses, max_terms_per_clause=lim.max_terms_per_clause,
                     max_message_bytes=lim.max_message_bytes, workers=cfg.workers, max_queue=cfg.max_queue,
                     batch_wait_ms=cfg.batch_wait_ms, max_dense_batch=cfg.max_dense_batch, max_nprobe=lim.max_nprobe,
                     max_ef_search=lim.max_ef_search, max_exclude_doc_ids=lim.max_exclude_doc_ids,
                     max_diff_tokens=lim.max_diff_tokens, max_streams=cfg.max_streams, stream_idle_s=cfg.stream_idle_s,
                     stream_max_s=cfg.stream_max_s)


def dist_msg(d, top_k: int, decode) -> pb.DistributionResponse:
    items = d.top(top_k) if top_k else d.top(len(d.tokens))
    m = pb.DistributionResponse(prompt_count=d.prompt_count, approx=d.approx)
    m.tokens.extend(pb.TokenCount(token_id=t, count=c.count, prob=c.prob, text=decode(t)) for t, c in items)
    if d.suffix_len is not None:
        m.suffix_len = d.suffix_len
    return m


def occurrence_msg(o, id_offset: int = 0, doc_offset: int = 0) -> pb.Occurrence:
    return pb.Occurrence(doc_id=o.doc_id + doc_offset, chunk_id=o.chunk_id + id_offset, offset=o.offset,
                         chunk_offset=o.chunk_offset)
