"""Request handling shared by the servicer and the router: the status-code error, the decorator that
turns library errors into status codes, the field-by-field request checks, and the streaming
search loop. Conversions between messages and library types live in :mod:`retromem.service.messages`."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import grpc
import numpy as np

from retromem.errors import QueryError, ServiceError
from retromem.service.interceptors import Metrics
from retromem.service.v1 import retrieval_pb2 as pb

logger = logging.getLogger(__name__)

SERVICE_NAME = "retromem.v1.Retrieval"


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


def status_of(exc: BaseException) -> Any:
    return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None


def stream_search(request_iterator, context, answer, max_message_bytes: int, metrics: Metrics | None):
    """SearchStream for the server and the router: answer each request (``answer(r, req)`` gives
    its QueryResults and missing shards) and send the results back in slices below the message cap.
    Stops early, and counts it, when the client cancels or disconnects."""
    budget = max_message_bytes - 64 * 1024  # room for framing
    r = -1
    try:
        for r, req in enumerate(request_iterator):
            check_deadline(context)
            results, missing = answer(r, req)
            out, size = pb.SearchResponse(request_index=r, missing_shards=missing), 0
            for i, qr in enumerate(results):
                s = qr.ByteSize() + 8
                if out.results and size + s > budget:
                    yield out
                    out, size = pb.SearchResponse(request_index=r, query_offset=i, missing_shards=missing), 0
                out.results.append(qr)
                size += s
            if not context.is_active():
                return
            yield out
    except ServiceError as exc:
        context.abort(exc.code, exc.message)
    except QueryError as exc:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"requests[{r}]: {exc}")
    finally:  # a client that cancels or disconnects: stop here, nothing more is searched
        if not context.is_active() and metrics is not None:
            metrics.cancelled.inc()
