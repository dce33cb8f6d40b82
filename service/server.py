"""Server wiring: :func:`start_server` puts a servicer (the retrieval servicer of
:mod:`retromem.service.servicer`, or the router of :mod:`retromem.service.router`) into a ``grpc.server`` with a bounded queue
(``maximum_concurrent_rpcs``: beyond it gRPC answers RESOURCE_EXHAUSTED at once), a thread pool of
``workers`` threads for unary calls plus ``max_streams`` for streams (bounded by
:class:`retromem.service.interceptors.StreamGuard`), the standard health and reflection services,
optional TLS and bearer-token auth, and Prometheus metrics (on ``metrics_host``, loopback unless
asked); :func:`serve` runs it until SIGTERM/SIGINT, then drains in-flight requests for at most
the grace period and returns. SIGHUP (or the ``Reload`` RPC) re-opens the datastore's newest
version and the indexes without downtime (:meth:`RetrievalServicer.reload`).
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from retromem.errors import ConfigError
from retromem.service.common import SERVICE_NAME
from retromem.service.config import ServerConfig
from retromem.service.interceptors import MalformedRequests, Metrics, MetricsInterceptor, StreamGuard, TokenAuth
from retromem.service.router import RouterServicer
from retromem.service.servicer import Backend, RetrievalServicer
from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

__all__ = ["Backend", "RunningServer", "is_loopback", "serve", "server_credentials", "start_server"]


@dataclass
class RunningServer:
    """A started server: ``port`` is the bound port (useful with ``port=0``)."""

    server: grpc.Server
    port: int
    servicer: Any
    metrics: Metrics
    health: Any
    metrics_port: int | None = None
    _http: Any = None
    streams: StreamGuard | None = None
    _pool: futures.ThreadPoolExecutor | None = None
    abandoned: int = 0  # calls still running after the stop (set by stop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls (open streams included) finish for ``grace``
        seconds, then cancel what is left; returns within about ``grace`` seconds."""
        t0 = time.monotonic()
        self.health.enter_graceful_shutdown()
        if self.streams is not None:
            self.streams.close()
        # gRPC cancels what still runs when the grace period ends; a handler that ignores the
        # cancellation (a long FAISS call) must not hold the exit: wait a little past it, no more
        end = None if grace is None else t0 + grace + 0.5
        self.server.stop(grace).wait(None if end is None else max(0.0, end - time.monotonic()))
        if self._pool is not None:  # a handler deaf to the cancellation (one long FAISS call) would hold the exit
            self._pool.shutdown(wait=False, cancel_futures=True)
            for t in list(getattr(self._pool, "_threads", ())):
                t.join(None if end is None else max(0.0, end - time.monotonic()))
            self.abandoned = sum(t.is_alive() for t in getattr(self._pool, "_threads", ()))
            if self.abandoned:
                logger.warning("%d call(s) still running %.1fs after the stop began: leaving them", self.abandoned,
                               time.monotonic() - t0)
        self.servicer.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    if cfg.tls_cert is None:
        return None
    try:
        cert, key = Path(cfg.tls_cert).read_bytes(), Path(cfg.tls_key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS certificate or key: {exc}") from exc
    return grpc.ssl_server_credentials([(key, cert)])


def start_server(cfg: ServerConfig, backend: Backend | None = None, servicer: Any = None) -> RunningServer:
    """Open what ``cfg`` names (or use ``backend``), start serving, return at once. ``servicer``: serve
    this one instead (the Ray Serve front of :mod:`retromem.service.ray_serve`), with the same wiring."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.faiss_threads is not None:
        import faiss

        faiss.omp_set_num_threads(cfg.faiss_threads)
    metrics = Metrics()
    if servicer is not None:
        pass
    elif cfg.shards:
        servicer = RouterServicer(cfg, metrics)
    else:
        servicer = RetrievalServicer(cfg, backend or Backend.open(cfg), metrics)
        if servicer.b.dense is not None and servicer.b.dense.meta.get("embedder"):
            servicer.b.dense.embedder  # load the model now: the first text query should not pay for it
    metrics_interceptor = MetricsInterceptor(metrics)
    streams = StreamGuard(cfg.max_streams, cfg.stream_idle_s, cfg.stream_max_s, metrics)
    interceptors = [metrics_interceptor] + ([TokenAuth(cfg.token)] if cfg.token else []) + [streams, MalformedRequests()]
    size = cfg.limits.max_message_bytes
    pool = futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="retromem-rpc")
    server = grpc.server(pool,
                         interceptors=interceptors, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs,
                         options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
                                  ("grpc.so_reuseport", 0)])
    metrics_interceptor.bind(server)
    pb_grpc.add_RetrievalServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    creds = server_credentials(cfg)
    try:
        port = server.add_secure_port(cfg.address, creds) if creds else server.add_insecure_port(cfg.address)
    except RuntimeError as exc:
        servicer.close()
        raise ConfigError(f"cannot listen on {cfg.address}: {exc}") from exc
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, port, servicer, metrics, health_servicer, streams=streams, _pool=pool)
    if cfg.metrics_port is not None:
        try:
            running._http, running.metrics_port = metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        except OSError as exc:
            running.stop(0)
            raise ConfigError(f"cannot serve metrics on {cfg.metrics_host}:{cfg.metrics_port} (--metrics-host, "
                              f"--metrics-port): {exc}") from exc
        if not is_loopback(cfg.metrics_host):
            logger.warning("metrics are served without authentication on %s:%d (--metrics-host)", cfg.metrics_host,
                           running.metrics_port)
    if cfg.token and creds is None and not is_loopback(cfg.host):
        logger.warning("the bearer token is accepted over plaintext on %s: anyone on the network path can read it; "
                       "serve TLS (--tls-cert/--tls-key) or listen on a loopback address", cfg.host)
    logger.info("serving %s on %s:%d (%s)", "router" if cfg.shards else "retrieval", cfg.host, port,
                "TLS" if creds else "plaintext")
    return running


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (``0.0.0.0``, ``::`` and names other than
    localhost count as reachable from outside)."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(cfg: ServerConfig, *, on_ready=None, servicer: Any = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests (up to ``cfg.grace_s``) and return
    the number of calls still running then (a process should exit without waiting for them:
    ``os._exit``, since Python would join their threads at exit)."""
    running = start_server(cfg, servicer=servicer)
    stop = threading.Event()

    def handle(signum, frame):
        logger.info("signal %d: draining in-flight requests (grace %.1fs)", signum, cfg.grace_s)
        stop.set()

    def reload() -> None:
        try:
            running.servicer.reload()
        except Exception:  # the previous version keeps serving
            logger.exception("SIGHUP reload failed; still serving the previous version")

    def hup(signum, frame):
        # never open files inside a signal handler: the reload runs on a thread of its own
        if hasattr(running.servicer, "reload"):
            logger.info("SIGHUP: reloading the datastore's newest version and the indexes")
            threading.Thread(target=reload, name="retromem-reload", daemon=True).start()
        else:
            logger.warning("SIGHUP: a router has nothing to reload; reload its shard servers")

    signals = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    old = {s: signal.signal(s, hup if s == getattr(signal, "SIGHUP", None) else handle) for s in signals}
    try:
        if on_ready is not None:
            on_ready(running)
        while not stop.wait(0.1):
            pass
        running.stop(cfg.grace_s)
        return running.abandoned
    finally:
        for s, h in old.items():
            signal.signal(s, h)
