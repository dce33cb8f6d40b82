"""Pieces shared by the server, the router and the client: the status-code error, the decorator
that turns library errors into status codes, and conversions between protobuf messages and the
library's result types (:class:`index.types.ChunkPayload`)."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from index.types import ChunkPayload
from retromem.errors import QueryError
from service.v1 import retrieval_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = "retromem.v1.Retrieval"
FETCH_ALL = ("text", "tokens", "continuation")


class ServiceError(Exception):
    """A request the server refuses: a gRPC status code and a message naming the field."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_deadline(context: grpc.ServicerContext, what: str = "request") -> None:
    """Skip work nobody waits for: a request that sat in the queue past its deadline."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the {what}'s deadline passed before it was served")


def rpc(fn: Callable) -> Callable:
    """Servicer-method decorator: ServiceError -> its status; a library QueryError (a caller's
    mistake the servicer did not pre-check) -> INVALID_ARGUMENT; anything else -> INTERNAL,
    logged with its traceback. The server keeps serving in every case."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            check_deadline(context)
            return fn(self, request, context)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        except QueryError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except grpc.RpcError:
            raise  # context.abort's own exception, or a shard's error the router already mapped
        except Exception as exc:  # a bug: say so, keep the server up
            if not context.is_active():
                return None
            logger.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{fn.__name__} failed: {type(exc).__name__}: {exc}")

    return wrapper


def check_search_request(req: pb.SearchRequest, limits: Any, ntotal: int, prefix: str = "") -> int:
    """The checks every server and router makes of a Search request before anything else: some
    queries, no more than ``max_batch``, and 1 <= k <= min(max_k, vectors in the index). Returns the
    number of queries."""
    n = len(req.queries)
    if n == 0:
        raise invalid(f"`{prefix}queries` is empty: give at least one query")
    if n > limits.max_batch:
        raise invalid(f"`{prefix}queries` has {n:,} queries, more than max_batch={limits.max_batch:,}: "
                      "send them in several requests over SearchStream")
    if req.k == 0:
        raise invalid(f"`{prefix}k` must be positive, got 0")
    kmax = min(limits.max_k, int(ntotal))
    if req.k > kmax:
        raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, f"`{prefix}k` is {req.k}; this server allows 1..{kmax}")
    return n


def check_chunk_ids(chunk_ids: Any, limits: Any, num_chunks: int) -> np.ndarray:
    """The ids of a GetChunks request, checked: some, no more than ``max_chunks``, each a chunk of
    the datastore (NOT_FOUND names the first that is not)."""
    n = len(chunk_ids)
    if n == 0:
        raise invalid("`chunk_ids` is empty: give at least one chunk id")
    if n > limits.max_chunks:
        raise invalid(f"`chunk_ids` has {n:,} ids, more than max_chunks={limits.max_chunks:,}")
    ids = np.asarray(chunk_ids, dtype=np.int64)
    bad = (ids < 0) | (ids >= num_chunks)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ServiceError(grpc.StatusCode.NOT_FOUND, f"`chunk_ids[{i}]` = {int(ids[i])} is not a chunk of this "
                                                      f"datastore (ids are 0..{num_chunks - 1})")
    return ids


def decode_text(data: bytes, field: str, max_bytes: int, *, allow_empty: bool = False) -> str:
    """A query's UTF-8 text, checked: valid UTF-8, not empty (unless allowed), not too long."""
    if len(data) > max_bytes:
        raise invalid(f"`{field}` is {len(data):,} bytes, more than max_query_bytes={max_bytes:,}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"`{field}` is not valid UTF-8: byte {exc.start} ({data[exc.start:exc.start + 1]!r}) "
                      f"{exc.reason}") from None
    if not allow_empty and not text.strip():
        raise invalid(f"`{field}` is empty: give some text")
    return text


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


def chunk_msg(p: ChunkPayload, id_offset: int = 0, doc_offset: int = 0) -> pb.Chunk:
    m = pb.Chunk(chunk_id=p.chunk_id + id_offset, doc_id=p.doc_id + doc_offset)
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
    )


def shift_chunk(m: pb.Chunk, id_offset: int, doc_offset: int) -> None:
    """Renumber a shard's chunk into the router's id space, in place."""
    m.chunk_id += id_offset
    m.doc_id += doc_offset
    if m.HasField("continuation_id"):
        m.continuation_id += id_offset


def status_of(exc: BaseException) -> Any:
    return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
