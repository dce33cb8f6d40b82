"""Request handling shared by the servicer and the router: the status-code error, the decorator that
turns library errors into status codes, the field-by-field request checks (every per-request knob
against its limit, and the answer's size estimated before any work is done), and the streaming
search loop. Conversions between messages and library types live in :mod:`retromem.service.messages`."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from retromem.errors import QueryError, ServiceError
from retromem.service.interceptors import Metrics
from retromem.service.messages import fetch_flags
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


def message_budget(max_message_bytes: int) -> int:
    """Bytes of results one message may carry: the cap less room for framing."""
    return max_message_bytes - min(64 * 1024, max_message_bytes // 8)


def _varint(n: int) -> int:
    return max(1, (max(int(n), 0).bit_length() + 6) // 7)


@dataclass(frozen=True)
class AnswerSize:
    """Wire bytes of answers, estimated from the datastore's shape before any work is done: a
    hit's id and score, and each part of a fetched chunk (its text at the datastore's mean chunk
    text size, its tokens at the chunk length). An estimate, not a bound: an answer that turns out
    larger than the cap after all is still refused (:func:`check_answer`), with the same advice."""

    hit: int  # chunk id + score
    chunk: int  # chunk id, doc id and the message's own framing
    text: float  # one chunk text
    tokens: int  # one chunk's token ids

    @classmethod
    def of(cls, info: pb.DatastoreInfo | None) -> "AnswerSize":
        if info is None or not info.num_chunks:
            return cls(hit=15, chunk=30, text=64 * 4 + 3, tokens=64 * 5 + 3)  # no datastore: GPT-2-like guesses
        ids = _varint(info.num_chunks)
        token_bytes = _varint(info.vocab_size - 1) if info.vocab_size else 5
        text = info.text_bytes / info.num_chunks if info.text_bytes else info.chunk_length * 4
        return cls(hit=ids + 5, chunk=2 * ids + 6, text=text + 3, tokens=info.chunk_length * token_bytes + 3)

    def fetched(self, flags: Iterable[str]) -> float:
        """One fetched chunk with ``flags`` (of text, tokens, continuation)."""
        flags = set(flags)
        if not flags:
            return 0.0
        parts = self.text * ("text" in flags) + self.tokens * ("tokens" in flags)
        return self.chunk + parts + (self.chunk + parts if "continuation" in flags else 0)

    def query(self, k: int, flags: Iterable[str]) -> float:
        """One query's result of ``k`` hits."""
        return 8 + k * (self.hit + self.fetched(flags))


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 1024:,.0f} KiB"


def too_big(size: float, max_message_bytes: int, what: str, advice: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the answer would be about {_mb(size)} ({what}), more than this server sends in one message "
                        f"(max_message_bytes={max_message_bytes:,}): {advice}")


SEARCH_ADVICE = "send the queries over SearchStream, which answers in slices, or ask for fewer queries, a smaller k or less fetch"


def _fetched(flags: Iterable[str]) -> str:
    flags = list(flags)
    return f"with {', '.join(flags)}" if flags else "ids and scores"


def check_knob(value: int, field: str, cap: int, cap_name: str, zero: str = "the index's default") -> None:
    """A knob where 0 means a default and anything else must be at most ``cap``: checked here, so
    that no value beyond the cap (2^31 included) ever reaches FAISS or the n-gram engine."""
    if value > cap:
        raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, f"`{field}` is {value:,}; this server allows 0 ({zero}) or "
                                                         f"1..{cap:,} ({cap_name})")


def check_search_request(req: pb.SearchRequest, limits: Any, ntotal: int, prefix: str = "",
                         size: AnswerSize | None = None, *, streaming: bool = False) -> int:
    """The checks every server and router makes of a Search request before anything else: some
    queries, no more than ``max_batch``, 1 <= k <= min(max_k, vectors in the index), nprobe and
    ef_search within their caps, no query excluding more than ``max_exclude_doc_ids`` documents,
    and (given ``size``) an answer that fits in one message: all of it for Search, one query's for
    a SearchStream request (the stream sends the rest in slices). Returns the number of queries."""
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
    check_knob(req.nprobe, f"{prefix}nprobe", limits.max_nprobe, "max_nprobe")
    check_knob(req.ef_search, f"{prefix}ef_search", limits.max_ef_search, "max_ef_search")
    for i, q in enumerate(req.queries):
        if len(q.exclude_doc_ids) > limits.max_exclude_doc_ids:
            raise invalid(f"`{prefix}queries[{i}].exclude_doc_ids` has {len(q.exclude_doc_ids):,} ids, more than "
                          f"max_exclude_doc_ids={limits.max_exclude_doc_ids:,}")
    if size is not None:
        flags = fetch_flags(req.fetch if req.HasField("fetch") else None)
        one = size.query(req.k, flags)
        budget = message_budget(limits.max_message_bytes)
        if one > budget:
            raise too_big(one, limits.max_message_bytes, f"one query's {req.k:,} hits {_fetched(flags)}",
                          "ask for a smaller k or less fetch")
        if not streaming and n * one > budget:
            raise too_big(n * one, limits.max_message_bytes, f"{n:,} queries x {req.k:,} hits {_fetched(flags)}",
                          SEARCH_ADVICE)
    return n


def check_answer(msg: Any, max_message_bytes: int, what: str, advice: str) -> Any:
    """``msg`` if it fits in one message; else the refusal the estimate would have given (the
    estimate uses mean chunk sizes, so an answer of unusually long chunks can still be too big)."""
    size = msg.ByteSize()
    if size > message_budget(max_message_bytes):
        raise too_big(size, max_message_bytes, what, advice)
    return msg


def check_chunk_ids(chunk_ids: Any, limits: Any, num_chunks: int, size: AnswerSize | None = None,
                    flags: Iterable[str] = ()) -> np.ndarray:
    """The ids of a GetChunks request, checked: some, no more than ``max_chunks``, each a chunk of
    the datastore (NOT_FOUND names the first that is not), and (given ``size``) their ``flags``
    fitting in one message."""
    n = len(chunk_ids)
    if n == 0:
        raise invalid("`chunk_ids` is empty: give at least one chunk id")
    if n > limits.max_chunks:
        raise invalid(f"`chunk_ids` has {n:,} ids, more than max_chunks={limits.max_chunks:,}")
    if size is not None and n * size.fetched(flags) > message_budget(limits.max_message_bytes):
        raise too_big(n * size.fetched(flags), limits.max_message_bytes, f"{n:,} chunks {_fetched(flags)}",
                      "ask for fewer chunks per call, or less fetch")
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
    its QueryResults, an iterable that may search as it goes, and missing shards) and send the
    results back in slices below the message cap. Stops early, and counts it, when the client
    cancels or disconnects."""
    budget = message_budget(max_message_bytes)
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
