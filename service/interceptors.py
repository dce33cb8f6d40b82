"""Server interceptors: bearer-token authentication and Prometheus metrics.

Authentication reads ``authorization: Bearer <token>`` from the call metadata and answers
UNAUTHENTICATED without a valid token; the health and reflection services stay open, so that
load balancers can probe and tools can discover the API. Metrics: per-method latency histograms,
request and error counts (by status code), RPCs in flight (running plus queued) and the dense
batcher's queue, in a registry of the server's own (no module-level state), exported over HTTP
when the server is given a metrics port.
"""

from __future__ import annotations

import hmac
import time
from typing import Callable

import grpc

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
        self.in_flight = Gauge("retromem_rpc_in_flight", "RPCs running or queued for a worker thread",
                               registry=self.registry)
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

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        m = self.m
        latency, requests = m._for(method)

        def wrap(behaviour, streaming):
            if streaming:
                def run_stream(request, context):
                    t0 = time.perf_counter()
                    requests.inc()
                    m.in_flight.inc()
                    try:
                        yield from behaviour(request, context)
                    except BaseException:
                        m.error(method, context.code())
                        raise
                    finally:
                        m.in_flight.dec()
                        latency.observe(time.perf_counter() - t0)

                return run_stream

            def run(request, context):
                t0 = time.perf_counter()
                requests.inc()
                m.in_flight.inc()
                try:
                    return behaviour(request, context)
                except BaseException:
                    m.error(method, context.code())
                    raise
                finally:
                    m.in_flight.dec()
                    latency.observe(time.perf_counter() - t0)

            return run

        return _rewrap(handler, wrap)
