"""Server interceptors: bearer-token authentication, bounds on streams, and Prometheus metrics.

Authentication reads ``authorization: Bearer <token>`` from the call metadata and answers
UNAUTHENTICATED without a valid token; the health and reflection services stay open, so that
load balancers can probe and tools can discover the API. Metrics: per-method latency histograms,
request and error counts (by status code), RPCs running in a worker thread, RPCs admitted and
waiting for one (the bounded queue's depth), RPCs refused at once because that queue was full, and
the dense batcher's queue, in a registry of the server's own (no module-level state), exported
over HTTP when the server is given a metrics port.

Streams (SearchStream, reflection, health Watch) hold a thread for as long as the client keeps
them open, so :class:`StreamGuard` bounds them: at most ``max_streams`` at once (the server's pool
has that many threads beyond its unary workers, so open streams never starve a health check or a
Search), a stream whose client sends nothing for ``idle_s`` ends with DEADLINE_EXCEEDED, and none
stays open longer than ``max_s``. On shutdown open streams are in-flight calls like any other: they
may go on for the grace period, and gRPC cancels them when it ends (which wakes a stream waiting
for its client, so nothing holds the exit).

Queue depth and refusals come from the admission count of the ``grpc.server`` itself (read through
:meth:`MetricsInterceptor.bind`): gRPC refuses a call (RESOURCE_EXHAUSTED, before any handler or
interceptor wrapper runs) when its count of admitted calls has reached ``maximum_concurrent_rpcs``,
and it runs the interceptors under the same lock with the same count, so the interceptor sees
exactly the calls it is about to refuse.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

import grpc

from retromem.errors import ServiceError

logger = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def _rewrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable, bool], Callable]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (``wrap(fn, streaming_response)``)."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False), handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True), handler.request_deserializer,
                                                 handler.response_serializer)


class TokenAuth(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        got = next((v for k, v in details.invocation_metadata if k == "authorization"), None)
        if got is not None and hmac.compare_digest(got.encode() if isinstance(got, str) else got, self._expected):
            return handler
        why = "no `authorization` metadata: send `authorization: Bearer <token>`" if got is None else \
            "the bearer token in `authorization` is not valid"

        def deny(behaviour, streaming):
            def refuse(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

            return refuse

        return _rewrap(handler, deny)


class _Malformed:
    """What a request's bytes became when they do not parse as its message type."""

    def __init__(self, why: str) -> None:
        self.why = why


class MalformedRequests(grpc.ServerInterceptor):
    """Request bytes that do not parse as the method's message get INVALID_ARGUMENT naming the method
    and the message type, instead of gRPC's own INTERNAL "Exception deserializing request!" (which
    says the server failed, when the client sent garbage). The deserializer turns a parse failure
    into a marker; the handler aborts on it. Innermost in the chain, so authentication still comes
    first and the metrics count the refusal."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple] = {}  # method -> (its handler, that handler wrapped): built once

    def intercept_service(self, continuation, details):
        h = continuation(details)
        if h is None or h.request_deserializer is None:
            return h
        got = self._wrapped.get(details.method)
        if got is not None and got[0] is h:
            return got[1]
        wrapped = self._wrap(h, details.method)
        self._wrapped[details.method] = (h, wrapped)  # a race wraps twice, harmlessly
        return wrapped

    @staticmethod
    def _wrap(h: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = h.request_deserializer
        what = getattr(getattr(parse, "__self__", None), "__name__", None) or "its request message"

        def safe(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001  (any parse failure is the client's)
                return _Malformed(f"{type(exc).__name__}: {exc}")

        def refuse(context, bad: _Malformed) -> None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method}: the request's bytes are not a valid {what} ({bad.why}); "
                          "send a serialized request message of the method's type")

        def checked(it, context):
            for item in it:
                if isinstance(item, _Malformed):
                    refuse(context, item)
                yield item

        def wrap(fn: Callable, streaming_response: bool) -> Callable:
            request_streaming = h.request_streaming

            if streaming_response:
                def run_stream(request, context):
                    if request_streaming:
                        request = checked(request, context)
                    elif isinstance(request, _Malformed):
                        refuse(context, request)
                    yield from fn(request, context)

                return run_stream

            def run(request, context):
                if request_streaming:
                    request = checked(request, context)
                elif isinstance(request, _Malformed):
                    refuse(context, request)
                return fn(request, context)

            return run

        wrapped = _rewrap(h, wrap)
        ctor = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
        behaviour = wrapped.unary_unary or wrapped.unary_stream or wrapped.stream_unary or wrapped.stream_stream
        return ctor[(h.request_streaming, h.response_streaming)](behaviour, safe, h.response_serializer)


_END = object()  # the client closed its side of the stream


class _Requests:
    """A stream's request iterator whose wait for the client's next message can time out.

    gRPC's iterator blocks until a message comes or the call ends; a reader thread of the stream's
    own takes each message from it when (and only when) the handler asks for one, so nothing is
    read ahead of the handler and gRPC's flow control still holds back a fast client."""

    def __init__(self, it: Iterator, idle_s: float, deadline: float, max_s: float,
                 on_timeout: Callable[[], None] = lambda: None) -> None:
        self._it = it
        self._idle_s, self._deadline, self._max_s = idle_s, deadline, max_s
        self._on_timeout = on_timeout
        self._asks: queue.SimpleQueue = queue.SimpleQueue()
        self._got: queue.SimpleQueue = queue.SimpleQueue()
        self._asked = False
        self._done = False
        threading.Thread(target=self._read, name="retromem-stream-reader", daemon=True).start()

    def _read(self) -> None:
        while self._asks.get() is not _END:
            try:
                self._got.put((next(self._it), None))
            except StopIteration:
                self._got.put((_END, None))
                return
            except BaseException as exc:  # the call was cancelled or ended: hand it to the handler
                self._got.put((None, exc))
                return

    def close(self) -> None:
        self._asks.put(_END)

    def __iter__(self) -> "_Requests":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        left = self._deadline - time.monotonic()
        if left <= 0:
            self._on_timeout()
            raise _lifetime(self._max_s)
        if not self._asked:
            self._asks.put(True)
            self._asked = True
        wait = min(self._idle_s, left)
        try:
            msg, exc = self._got.get(timeout=wait)
        except queue.Empty:
            self._on_timeout()
            if wait < left:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"the client sent no message for {self._idle_s:g}s, the most this server waits "
                                   "(stream_idle_s, --stream-idle): stream ended; open a new one when there is more "
                                   "to send") from None
            raise _lifetime(self._max_s) from None
        self._asked = False
        if exc is not None:
            self._done = True
            raise exc
        if msg is _END:
            self._done = True
            raise StopIteration
        return msg


def _lifetime(max_s: float) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the stream has been open {max_s:g}s, the longest this server keeps one (stream_max_s, "
                        "--stream-max): stream ended; open a new one for the rest")


class StreamGuard(grpc.ServerInterceptor):
    """Bounds every streaming RPC (see the module docstring): ``max_streams`` at once, the client's
    silence to ``idle_s``, the whole stream to ``max_s``."""

    def __init__(self, max_streams: int, idle_s: float, max_s: float, metrics: "Metrics | None" = None) -> None:
        self.max_streams, self.idle_s, self.max_s = max_streams, idle_s, max_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open = 0
        self._closing = False

    @property
    def open_streams(self) -> int:
        return self._open

    def close(self) -> None:
        """The server is shutting down: no new stream is admitted."""
        with self._lock:
            self._closing = True

    def intercept_service(self, continuation, details):
        h = continuation(details)
        if h is None or not (h.request_streaming or h.response_streaming):
            return h
        method = details.method.rsplit("/", 1)[-1]
        if h.stream_stream:
            return grpc.stream_stream_rpc_method_handler(self._guard(h.stream_stream, method, True, True),
                                                         h.request_deserializer, h.response_serializer)
        if h.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._guard(h.unary_stream, method, False, True),
                                                        h.request_deserializer, h.response_serializer)
        return grpc.stream_unary_rpc_method_handler(self._guard(h.stream_unary, method, True, False),
                                                    h.request_deserializer, h.response_serializer)

    def _ended(self, method: str, why: str) -> None:
        if self.metrics is not None:
            self.metrics.streams_ended.labels(method, why).inc()

    def _admit(self, method: str, request, context, request_streaming: bool):
        """Take a stream slot (or refuse the call); the request (iterator) to hand the handler, and
        what to undo when the stream ends."""
        with self._lock:
            refused = self._closing or self._open >= self.max_streams
            if not refused:
                self._open += 1
        if refused:
            self._ended(method, "refused")
            if self._closing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down: retry on another server")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{self.max_streams} streams are open, the most this server runs at once (max_streams, "
                          "--max-streams): retry later, or use the unary calls")
        deadline = time.monotonic() + self.max_s
        timer = None
        if request_streaming:
            request = _Requests(request, self.idle_s, deadline, self.max_s, lambda: self._ended(method, "timeout"))
        else:  # the server decides when such a stream ends (health Watch): cancel it at its lifetime
            timer = threading.Timer(self.max_s, context.cancel)
            timer.daemon = True
            timer.start()
        return request, deadline, timer

    def _release(self, request, timer) -> None:
        if timer is not None:
            timer.cancel()
        if isinstance(request, _Requests):
            request.close()
        with self._lock:
            self._open -= 1

    def _guard(self, behaviour: Callable, method: str, request_streaming: bool, response_streaming: bool) -> Callable:
        guard = self

        def aborted(context, exc: ServiceError) -> None:
            context.abort(exc.code, exc.message)

        if response_streaming:
            def run_stream(request, context):
                request, deadline, timer = guard._admit(method, request, context, request_streaming)
                try:
                    for response in behaviour(request, context):
                        yield response
                        if time.monotonic() > deadline:
                            guard._ended(method, "timeout")
                            raise _lifetime(guard.max_s)
                except ServiceError as exc:
                    aborted(context, exc)
                finally:
                    guard._release(request, timer)

            return run_stream

        def run(request, context):
            request, deadline, timer = guard._admit(method, request, context, request_streaming)
            try:
                return behaviour(request, context)
            except ServiceError as exc:
                aborted(context, exc)
            finally:
                guard._release(request, timer)

        return run


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.latency = Histogram("retromem_rpc_latency_seconds", "Server-side latency of each RPC", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("retromem_rpc_requests", "RPCs started", ["method"], registry=self.registry)
        self.errors = Counter("retromem_rpc_errors", "RPCs that ended with a status other than OK",
                              ["method", "code"], registry=self.registry)
        self.in_flight = Gauge("retromem_rpc_in_flight", "RPCs running in a worker thread", registry=self.registry)
        self.queued = Gauge("retromem_rpc_queued", "RPCs admitted and waiting for a worker thread",
                            registry=self.registry)
        self.refused = Counter("retromem_rpc_refused", "RPCs refused at once (RESOURCE_EXHAUSTED): no worker "
                               "thread or queue slot was free", ["method"], registry=self.registry)
        self.dense_queue = Gauge("retromem_dense_queue_depth", "Dense requests waiting for the micro-batcher",
                                 registry=self.registry)
        self.dense_batch = Histogram("retromem_dense_batch_queries", "Queries per batched FAISS search",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self.cancelled = Counter("retromem_stream_cancelled", "Streams the client cancelled or abandoned",
                                 registry=self.registry)
        self.streams_ended = Counter("retromem_stream_ended", "Streams the server refused or ended: refused (too "
                                     "many open), timeout (idle or too old)",
                                     ["method", "reason"], registry=self.registry)
        self._children: dict[str, tuple] = {}

    def _for(self, method: str) -> tuple:
        c = self._children.get(method)
        if c is None:
            c = self._children[method] = (self.latency.labels(method), self.requests.labels(method))
        return c

    def error(self, method: str, code: grpc.StatusCode | None) -> None:
        self.errors.labels(method, (code or grpc.StatusCode.UNKNOWN).name).inc()

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns (http server, bound port)."""
        from prometheus_client import start_http_server

        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, server.server_address[1]

    def text(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._state = None  # the grpc server's admission state, once bound
        self._running = 0
        self._lock = threading.Lock()
        self._wrapped: dict[str, tuple] = {}  # method -> (its handler, that handler wrapped)
        metrics.queued.set_function(self._queued)

    def bind(self, server: grpc.Server) -> None:
        """Read admissions from ``server`` (a ``grpc.server`` with ``maximum_concurrent_rpcs``). Its
        count is private to grpcio: where it is missing, queue depth and refusals are not reported."""
        state = getattr(server, "_state", None)
        if state is None or not hasattr(state, "active_rpc_count") or not hasattr(state, "maximum_concurrent_rpcs"):
            logger.warning("this grpcio does not expose its admission count: retromem_rpc_queued and "
                           "retromem_rpc_refused stay at 0")
            return
        self._state = state

    def _queued(self) -> float:
        st = self._state
        if st is None:
            return 0.0
        # admitted = running + waiting; a call whose handler returned stays admitted until its
        # response is sent, so for that moment it shows as waiting
        return float(max(0, st.active_rpc_count - self._running))

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        st = self._state
        if st is not None and st.maximum_concurrent_rpcs is not None and st.active_rpc_count >= st.maximum_concurrent_rpcs:
            self.m.refused.labels(details.method.rsplit("/", 1)[-1]).inc()  # gRPC refuses this call as soon as we return
            return handler
        # the wrapped handler depends on the method alone: built once, not per call (issue 19)
        got = self._wrapped.get(details.method)
        if got is not None and got[0] is handler:
            return got[1]
        wrapped = self._wrap(handler, details.method.rsplit("/", 1)[-1])
        self._wrapped[details.method] = (handler, wrapped)  # a race wraps twice, harmlessly
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        latency, requests = self.m._for(method)

        def wrap(behaviour, streaming):
            if streaming:
                def run_stream(request, context):
                    with _Observed(self, method, latency, requests, context):
                        yield from behaviour(request, context)

                return run_stream

            def run(request, context):
                with _Observed(self, method, latency, requests, context):
                    return behaviour(request, context)

            return run

        return _rewrap(handler, wrap)

    def _started(self) -> None:
        with self._lock:
            self._running += 1
        self.m.in_flight.inc()

    def _ended(self) -> None:
        with self._lock:
            self._running -= 1
        self.m.in_flight.dec()


class _Observed:
    """One call's observation: counts the call, times it, and counts its error code if it fails
    (or is cancelled). A plain class: cheaper per call than a generator-based context manager."""

    __slots__ = ("owner", "method", "latency", "requests", "context", "t0")

    def __init__(self, owner: MetricsInterceptor, method: str, latency, requests, context) -> None:
        self.owner, self.method, self.latency, self.requests, self.context = owner, method, latency, requests, context

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()
        self.requests.inc()
        self.owner._started()

    def __exit__(self, typ, exc, tb) -> bool:
        try:
            if typ is not None:
                self.owner.m.error(self.method, self.context.code())
        finally:
            self.owner._ended()
            self.latency.observe(time.perf_counter() - self.t0)
        return False
