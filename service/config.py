"""Configuration of a retrieval server or router: what it serves, how it listens, its limits.

One dataclass per component, validated in ``__post_init__``; a bad field raises
:class:`retromem.errors.ConfigError` naming the command-line flag. Requests never name files:
every path a server reads is fixed here, when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retromem.config import fail, integer, key_name, non_negative_int, number, optional_positive_int, positive_int
from retromem.errors import ConfigError

MiB = 2**20
# a shard target `serve:NAME` is the Ray Serve shard deployment NAME (retromem.service.ray_serve), not a host:port
SERVE_TARGET = "serve:"

# the command-line flags of `retromem serve` that set ServiceLimits fields (the others have none)
_FLAGS = {"max_batch": "--max-batch", "max_k": "--max-k", "max_chunks": "--max-chunks",
          "max_query_tokens": "--max-query-tokens", "max_message_bytes": "--max-message-bytes",
          "max_nprobe": "--max-nprobe", "max_ef_search": "--max-ef-search"}
INT32_MAX = 2**31 - 1  # FAISS (through SWIG) and gRPC take signed 32-bit ints: no limit may exceed it


@dataclass(frozen=True)
class ServiceLimits:
    """Caps on what one request may ask for; exceeding one is the caller's mistake
    (INVALID_ARGUMENT for counts and lengths, OUT_OF_RANGE for a knob such as ``k`` or
    ``ef_search`` above its cap), never a slow server. Every per-request knob has one, and
    ``Info`` shows them all. An answer estimated to exceed ``max_message_bytes`` is refused before
    any work (RESOURCE_EXHAUSTED, pointing at SearchStream)."""

    max_batch: int = 1024  # queries per Search request (SearchStream takes any number of requests)
    max_k: int = 1000
    max_query_bytes: int = 16_384  # bytes of one query text
    max_query_tokens: int = 1000  # tokens of one n-gram query
    max_chunks: int = 4096  # ids per GetChunks request
    max_find_limit: int = 1000  # occurrences per Find / hits per SearchDocuments
    max_clauses: int = 8
    max_terms_per_clause: int = 16
    max_message_bytes: int = 16 * MiB  # received and sent; SearchStream slices responses below it
    max_nprobe: int = 4096  # IVF lists one query may visit (0 in a request: the index's tuned default)
    max_ef_search: int = 4096  # HNSW efSearch of one query (FAISS reserves about 8 bytes per unit)
    max_exclude_doc_ids: int = 1024  # documents one query may exclude
    max_diff_tokens: int = 100  # SearchDocuments: how far apart a match's clauses may be

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_k", "max_query_bytes", "max_query_tokens", "max_chunks", "max_find_limit",
                     "max_clauses", "max_terms_per_clause", "max_nprobe", "max_ef_search", "max_exclude_doc_ids",
                     "max_diff_tokens"):
            integer(getattr(self, name), f"limits.{name}", ge=1, le=INT32_MAX, flag=_FLAGS.get(name))
        if not _is_size(self.max_message_bytes):
            fail("limits.max_message_bytes", "be between 64KiB and 2GiB", self.max_message_bytes,
                 flag=_FLAGS["max_message_bytes"])


def _is_size(v: object) -> bool:  # gRPC's message limits are signed 32-bit
    return isinstance(v, int) and not isinstance(v, bool) and 64 * 1024 <= v <= 2**31 - 1


@dataclass(frozen=True)
class ServerConfig:
    """A server over any of a datastore, a dense index and an n-gram index; or, with ``shards``,
    a router that fans out to shard servers and merges their answers."""

    datastore: str | None = None
    dense: str | None = None
    ngram: str | None = None
    shards: tuple[str, ...] = ()  # router mode: host:port of each shard server, in id order
    # router: each shard's (datastore_id, first_doc, first_chunk) from a deployment description, so ids
    # do not depend on shard order; empty: ids follow the order of `shards`
    shard_ranges: tuple[tuple[str, int, int], ...] = ()
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (the bound one is reported)
    workers: int = 8  # threads running unary requests (health checks included)
    max_streams: int = 4  # streams (SearchStream, reflection, health Watch) open at once, on threads of their own
    stream_idle_s: float = 30.0  # a stream whose client sends nothing for this long is ended (DEADLINE_EXCEEDED)
    stream_max_s: float = 3600.0  # the longest any stream may stay open
    max_queue: int = 64  # requests waiting for a thread; beyond it: RESOURCE_EXHAUSTED at once
    batch_wait_ms: float = 2.0  # dense micro-batching: how long the first query waits for company
    max_dense_batch: int = 256  # dense micro-batching: queries per FAISS call
    token: str | None = None  # bearer token every call must carry (health and reflection exempt)
    tls_cert: str | None = None  # PEM certificate chain and key: serve TLS instead of plaintext
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP
    metrics_host: str = "127.0.0.1"  # its address: loopback unless asked (it has no auth)
    grace_s: float = 10.0  # SIGTERM: how long in-flight requests may take to finish
    partial: bool = False  # router: answer without shards that failed, naming them
    shard_timeout_s: float = 10.0  # router: deadline of each shard call (the caller's, if shorter)
    shard_token: str | None = None  # router: token to present to the shards
    shard_tls_ca: str | None = None  # router: CA certificate to verify TLS shards with
    torch_threads: int | None = None  # embedder threads (None: torch's default)
    faiss_threads: int | None = None  # FAISS OpenMP threads (None: FAISS's default, one per core)
    limits: ServiceLimits = field(default_factory=ServiceLimits)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))
        object.__setattr__(self, "shard_ranges", tuple(tuple(r) for r in self.shard_ranges))
        if self.shard_ranges and len(self.shard_ranges) != len(self.shards):
            fail("shard_ranges", f"give one (datastore_id, first_doc, first_chunk) per shard ({len(self.shards)})",
                 len(self.shard_ranges), flag="--deployment")
        if len(set(self.shards)) != len(self.shards):
            dup = sorted({s for s in self.shards if self.shards.count(s) > 1})
            fail("shards", "name each shard server once (a shard given twice returns every hit twice)", dup, flag="--shard")
        if self.shards and (self.datastore or self.dense or self.ngram):
            raise ConfigError("a router (`--shard`) serves its shards only: drop --datastore/--dense/--ngram")
        if not self.shards and not (self.datastore or self.dense or self.ngram):
            raise ConfigError("nothing to serve: give --datastore, --dense and/or --ngram, or --shard for a router")
        for s in self.shards:
            host, _, port = s.rpartition(":")
            if (not host or not port.isdigit()) and not (s.startswith(SERVE_TARGET) and len(s) > len(SERVE_TARGET)):
                fail("shards", "be host:port", s, flag="--shard")
        integer(self.port, "port", ge=0, le=65535, flag="--port")
        positive_int(self.workers, "workers", flag="--workers")
        positive_int(self.max_streams, "max_streams", flag="--max-streams")
        number(self.stream_idle_s, "stream_idle_s", gt=0, flag="--stream-idle")
        number(self.stream_max_s, "stream_max_s", gt=0, flag="--stream-max")
        if not isinstance(self.metrics_host, str) or not self.metrics_host:
            fail("metrics_host", "be a host name or address", self.metrics_host, flag="--metrics-host")
        non_negative_int(self.max_queue, "max_queue", flag="--max-queue")
        number(self.batch_wait_ms, "batch_wait_ms", ge=0, le=1000, flag="--batch-wait-ms")
        positive_int(self.max_dense_batch, "max_dense_batch", flag="--max-dense-batch")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"{key_name('tls_cert', '--tls-cert')} and {key_name('tls_key', '--tls-key')} go together: "
                              "give both or neither")
        if self.token is not None and not self.token.strip():
            raise ConfigError(f"{key_name('token', '--token-file')} is empty: give a secret, or no token for an open server")
        if self.metrics_port is not None:
            integer(self.metrics_port, "metrics_port", ge=0, le=65535, flag="--metrics-port")
        number(self.grace_s, "grace_s", ge=0, flag="--grace")
        number(self.shard_timeout_s, "shard_timeout_s", gt=0, flag="--shard-timeout")
        optional_positive_int(self.faiss_threads, "faiss_threads", flag="--faiss-threads")
        optional_positive_int(self.torch_threads, "torch_threads", flag="--torch-threads")
        if not isinstance(self.limits, ServiceLimits):
            fail("limits", "be a ServiceLimits", self.limits)

    @property
    def threads(self) -> int:
        """Threads of the server's pool: ``workers`` for unary calls, ``max_streams`` more for streams,
        so that open streams never take the last thread from a health check or a Search."""
        return self.workers + self.max_streams

    @property
    def max_concurrent_rpcs(self) -> int:
        """Running plus queued requests: gRPC answers RESOURCE_EXHAUSTED beyond it."""
        return self.threads + self.max_queue

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
