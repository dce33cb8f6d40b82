"""Server interceptors: bearer-token authentication and Prometheus metrics.

Authentication reads ``authorization: Bearer <token>`` from the call metadata and answers
UNAUTHENTICATED without a valid token; the health and reflection services stay open, so that
load balancers can probe and tools can discover the API. Metrics: per-method latency histograms,
request and error counts (by status code), RPCs running in a worker thread, RPCs admitted and
waiting for one (the bounded queue's depth), RPCs refused at once because that queue was full, and
the dense batcher's queue, in a registry of the server's own (no module-level state), exported
over HTTP when the server is given a metrics port.

Queue depth and refusals come from the admission count of the ``grpc.server`` itself (read through
:meth:`MetricsInterceptor.bind`): gRPC refuses a call (RESOURCE_EXHAUSTED, before any handler or
interceptor wrapper runs) when its count of admitted calls has reached ``maximum_concurrent_rpcs``,
and it runs the interceptors under the same lock with the same count, so the interceptor sees
exactly the calls it is about to refuse.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from typing import Callable

import grpc

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
        method = details.method.rsplit("/", 1)[-1]
        m = self.m
        st = self._state
        if st is not None and st.maximum_concurrent_rpcs is not None and st.active_rpc_count >= st.maximum_concurrent_rpcs:
            m.refused.labels(method).inc()  # gRPC refuses this call as soon as we return
            return handler
        latency, requests = m._for(method)

        @contextlib.contextmanager
        def observed(context):
            """Count the call, time it, and count its error code if it fails (or is cancelled)."""
            t0 = time.perf_counter()
            requests.inc()
            self._started()
            try:
                yield
            except BaseException:
                m.error(method, context.code())
                raise
            finally:
                self._ended()
                latency.observe(time.perf_counter() - t0)

        def wrap(behaviour, streaming):
            if streaming:
                def run_stream(request, context):
                    with observed(context):
                        yield from behaviour(request, context)

                return run_stream

            def run(request, context):
                with observed(context):
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
