"""Configuration of a retrieval server or router: what it serves, how it listens, its limits.

One dataclass per component, validated in ``__post_init__``; a bad field raises
:class:`retromem.errors.ConfigError` naming the command-line flag. Requests never name files:
every path a server reads is fixed here, when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retromem.errors import ConfigError

MiB = 2**20


@dataclass(frozen=True)
class ServiceLimits:
    """Caps on what one request may ask for; exceeding one is the caller's mistake
    (INVALID_ARGUMENT, or OUT_OF_RANGE for a k above ``max_k``), never a slow server."""

    max_batch: int = 1024  # queries per Search request (SearchStream takes any number of requests)
    max_k: int = 1000
    max_query_bytes: int = 16_384  # bytes of one query text
    max_query_tokens: int = 1000  # tokens of one n-gram query
    max_chunks: int = 4096  # ids per GetChunks request
    max_find_limit: int = 1000  # occurrences per Find / hits per SearchDocuments
    max_clauses: int = 8
    max_terms_per_clause: int = 16
    max_message_bytes: int = 16 * MiB  # received and sent; SearchStream slices responses below it

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_k", "max_query_bytes", "max_query_tokens", "max_chunks", "max_find_limit",
                     "max_clauses", "max_terms_per_clause"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"`--{name.replace('_', '-')}` must be a positive integer, got {v!r}")
        if not isinstance(self.max_message_bytes, int) or not 64 * 1024 <= self.max_message_bytes <= 2**31 - 1:
            raise ConfigError(f"`--max-message-bytes` must be between 64KiB and 2GiB, got {self.max_message_bytes!r}")


@dataclass(frozen=True)
class ServerConfig:
    """A server over any of a datastore, a dense index and an n-gram index; or, with ``shards``,
    a router that fans out to shard servers and merges their answers."""

    datastore: str | None = None
    dense: str | None = None
    ngram: str | None = None
    shards: tuple[str, ...] = ()  # router mode: host:port of each shard server, in id order
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (the bound one is reported)
    workers: int = 8  # threads running requests
    max_queue: int = 64  # requests waiting for a thread; beyond it: RESOURCE_EXHAUSTED at once
    batch_wait_ms: float = 2.0  # dense micro-batching: how long the first query waits for company
    max_dense_batch: int = 256  # dense micro-batching: queries per FAISS call
    token: str | None = None  # bearer token every call must carry (health and reflection exempt)
    tls_cert: str | None = None  # PEM certificate chain and key: serve TLS instead of plaintext
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics over HTTP
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
        if self.shards and (self.datastore or self.dense or self.ngram):
            raise ConfigError("a router (`--shard`) serves its shards only: drop --datastore/--dense/--ngram")
        if not self.shards and not (self.datastore or self.dense or self.ngram):
            raise ConfigError("nothing to serve: give --datastore, --dense and/or --ngram, or --shard for a router")
        for s in self.shards:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"`--shard` must be host:port, got {s!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"`--port` must be in 0..65535, got {self.port!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"`--workers` must be a positive integer, got {self.workers!r}")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ConfigError(f"`--max-queue` must be a non-negative integer, got {self.max_queue!r}")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ConfigError(f"`--batch-wait-ms` must be between 0 and 1000, got {self.batch_wait_ms!r}")
        if not isinstance(self.max_dense_batch, int) or self.max_dense_batch < 1:
            raise ConfigError(f"`--max-dense-batch` must be a positive integer, got {self.max_dense_batch!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("`--tls-cert` and `--tls-key` go together: give both or neither")
        if self.token is not None and not self.token.strip():
            raise ConfigError("`--token` is empty: give a secret, or no token for an open server")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"`--metrics-port` must be in 0..65535, got {self.metrics_port!r}")
        if self.grace_s < 0:
            raise ConfigError(f"`--grace` must be non-negative, got {self.grace_s!r}")
        if self.shard_timeout_s <= 0:
            raise ConfigError(f"`--shard-timeout` must be positive, got {self.shard_timeout_s!r}")
        if self.faiss_threads is not None and self.faiss_threads < 1:
            raise ConfigError(f"`--faiss-threads` must be a positive integer, got {self.faiss_threads!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"`--torch-threads` must be a positive integer, got {self.torch_threads!r}")

    @property
    def max_concurrent_rpcs(self) -> int:
        """Running plus queued requests: gRPC answers RESOURCE_EXHAUSTED beyond it."""
        return self.workers + self.max_queue

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
