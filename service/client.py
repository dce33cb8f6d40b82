"""A Python client of the retrieval service, returning the library's own result types.

``RetrievalClient(target).search(queries, k, exclude_doc_ids=..., fetch=...)`` returns an
:class:`retromem.index.types.SearchResult` exactly as :meth:`retromem.index.dense.DenseIndex.search` does (chunk ids
and scores as (n, k) arrays, -1 / -inf where fewer than k hits, optional payloads), so either can
be handed to RETRO or the memory modules as a retriever. The n-gram verbs return
:mod:`retromem.index.types`' dataclasses and ``get_chunks`` :class:`retromem.index.types.ChunkPayload`.

Every call has a deadline (``timeout``); every RPC is read-only, so every call is retried on
UNAVAILABLE with exponential backoff (gRPC's own retry policy). Batches larger than the server's
``max_batch`` go over ``SearchStream`` in slices, so no message hits the size cap, and so does a
batch whose answer the server refuses as too big for one message. A refused call
raises :class:`ServiceCallError` (status ``code`` and the server's message); refusals of the
query itself (INVALID_ARGUMENT, OUT_OF_RANGE, NOT_FOUND) raise :class:`RemoteQueryError`, a
:class:`retromem.errors.QueryError` like the in-process indexes raise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import grpc
import numpy as np

from retromem.index.types import ChunkPayload, SearchResult
from retromem.config import integer, number
from retromem.errors import QueryError, RemoteQueryError, ServiceCallError
from retromem.service.common import SERVICE_NAME
from retromem.service.messages import fetch_msg, filters_msg, meta_value, payload_from_msg
from retromem.service.v1 import retrieval_pb2 as pb
from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

QUERY_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND)


def _raise(exc: grpc.RpcError, method: str):
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = RemoteQueryError if code in QUERY_CODES else ServiceCallError
    raise cls(code, details or "", method) from None


def _ngram_query(q) -> pb.NgramQuery:
    if isinstance(q, str):
        return pb.NgramQuery(text=q.encode("utf-8"))
    if isinstance(q, bytes):
        return pb.NgramQuery(text=q)
    ids = [int(x) for x in np.asarray(q).reshape(-1)]
    if any(x < 0 for x in ids):
        raise QueryError(f"token ids must be non-negative, got {min(ids)}")
    return pb.NgramQuery(ids=pb.TokenIds(ids=ids))


def _token(t) -> pb.Token:
    if isinstance(t, str):
        return pb.Token(text=t.encode("utf-8"))
    if isinstance(t, bytes):
        return pb.Token(text=t)
    if int(t) < 0:
        raise QueryError(f"next_token must be a non-negative token id, got {t}")
    return pb.Token(id=int(t))


def _occurrence(o: pb.Occurrence):
    from retromem.index.types import Occurrence

    return Occurrence(int(o.doc_id), int(o.chunk_id), int(o.offset), int(o.chunk_offset), 0)


def _dist(m: pb.DistributionResponse):
    from retromem.index.types import NextTokenDistribution, TokenCount

    return NextTokenDistribution(int(m.prompt_count), {int(t.token_id): TokenCount(int(t.count), float(t.prob)) for t in m.tokens},
                                 bool(m.approx), int(m.suffix_len) if m.HasField("suffix_len") else None)


class RetrievalClient:
    """Client of one retrieval server or router (see module docstring).

    ``tls_ca``: PEM file (or bytes) of the CA that signed the server's certificate; ``True`` uses
    the system roots; ``None`` connects in plaintext. ``token``: the server's bearer token.
    """

    def __init__(self, target: str, *, token: str | None = None, tls_ca: str | bytes | bool | None = None,
                 tls_server_name: str | None = None, timeout: float = 30.0, retries: int = 4,
                 max_message_bytes: int = 64 * 2**20, stream_batch: int | None = None) -> None:
        number(timeout, "timeout", gt=0, flag="--timeout")
        integer(retries, "retries", ge=0, le=4)  # gRPC allows 5 attempts
        self.target = target
        self.timeout = timeout
        self.stream_batch = stream_batch
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        policy = {"methodConfig": [{
            "name": [{"service": SERVICE_NAME}],
            "retryPolicy": {"maxAttempts": retries + 1, "initialBackoff": "0.05s", "maxBackoff": "2s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }]} if retries else {"methodConfig": []}
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.enable_retries", 1 if retries else 0), ("grpc.service_config", json.dumps(policy))]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls_ca is None or tls_ca is False:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            roots = None if tls_ca is True else (tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots), options=options)
        self.stub = pb_grpc.RetrievalStub(self.channel)
        self._limits: pb.Limits | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RetrievalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, request, timeout: float | None = None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout or self.timeout, metadata=self._metadata,
                                              wait_for_ready=False)
        except grpc.RpcError as exc:
            _raise(exc, method)

    # -- info and health -----------------------------------------------------------------

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        return self._call("Info", pb.InfoRequest(), timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ... of ``service`` ("" = the server)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            r = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, "Health.Check")
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    @property
    def limits(self) -> pb.Limits:
        if self._limits is None:
            self._limits = self.info().limits
        return self._limits

    # -- dense ---------------------------------------------------------------------------

    @staticmethod
    def _queries(queries, exclude_doc_ids) -> list[pb.Query]:
        if isinstance(queries, (str, bytes)):
            raise QueryError("`queries` must be a batch: a list of texts or an (n, dim) array, not one string")
        if isinstance(queries, np.ndarray) or (len(queries) and not isinstance(queries[0], (str, bytes))):
            x = np.asarray(queries, dtype=np.float32)
            if x.ndim != 2:
                raise QueryError(f"query vectors must be 2-D (n, dim); got shape {x.shape}")
            qs = [pb.Query(vector=pb.Vector(values=row)) for row in x]
        else:
            qs = [pb.Query(text=t.encode("utf-8") if isinstance(t, str) else t) for t in queries]
        if exclude_doc_ids is not None:
            if len(exclude_doc_ids) != len(qs):
                raise QueryError(f"exclude_doc_ids has {len(exclude_doc_ids)} entries for {len(qs)} queries: "
                                 "give one (or None) per query")
            for q, e in zip(qs, exclude_doc_ids):
                if e is not None:
                    q.exclude_doc_ids.extend(int(d) for d in np.atleast_1d(np.asarray(e, dtype=np.int64)).reshape(-1))
        return qs

    def search(self, queries, k: int = 10, *, exclude_doc_ids: Sequence[Iterable[int] | int | None] | None = None,
               fetch: bool | str | Sequence[str] = False, nprobe: int | None = None, ef_search: int | None = None,
               filters: dict[str, Any] | None = None, timeout: float | None = None) -> SearchResult:
        """Top-k chunks per query, as :meth:`retromem.index.dense.DenseIndex.search` returns them
        (``filters``: ``{field: value or [values]}`` on the datastore's metadata, enforced in the search)."""
        qs = self._queries(queries, exclude_doc_ids)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        base = dict(k=int(k), nprobe=nprobe or 0, ef_search=ef_search or 0, fetch=fetch_msg(fetch),
                    filters=filters_msg(filters))
        batch = self.stream_batch or int(self.limits.max_batch) or 1024
        want_payloads = bool(fetch)
        ids = np.full((len(qs), k), -1, np.int64)
        scores = np.full((len(qs), k), -np.inf, np.float32)
        payloads: list[list[ChunkPayload]] | None = [[] for _ in qs] if want_payloads else None
        if len(qs) <= batch:
            try:
                resp = self._call("Search", pb.SearchRequest(queries=qs, **base), timeout)
                self._fill(resp.results, 0, ids, scores, payloads)
                return SearchResult(ids, scores, payloads)
            except ServiceCallError as exc:
                # the answer would not fit in one message (refused before any work): stream it instead
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or "SearchStream" not in exc.details:
                    raise
        requests = [pb.SearchRequest(queries=qs[i:i + batch], **base) for i in range(0, len(qs), batch)]
        try:
            for resp in self.stub.SearchStream(iter(requests), timeout=timeout or self.timeout, metadata=self._metadata):
                self._fill(resp.results, resp.request_index * batch + resp.query_offset, ids, scores, payloads)
        except grpc.RpcError as exc:
            _raise(exc, "SearchStream")
        return SearchResult(ids, scores, payloads)

    @staticmethod
    def _fill(results, start: int, ids, scores, payloads) -> None:
        for i, r in enumerate(results, start=start):
            n = len(r.chunk_ids)
            ids[i, :n] = r.chunk_ids
            scores[i, :n] = r.scores
            if payloads is not None:
                payloads[i] = [payload_from_msg(c) for c in r.chunks]

    # -- chunks --------------------------------------------------------------------------

    def get_chunks(self, chunk_ids: Sequence[int] | np.ndarray, *, fetch: bool | str | Sequence[str] = True,
                   timeout: float | None = None) -> list[ChunkPayload]:
        ids = [int(c) for c in np.asarray(chunk_ids, dtype=np.int64).reshape(-1)]
        resp = self._call("GetChunks", pb.GetChunksRequest(chunk_ids=ids, fetch=fetch_msg(fetch)), timeout)
        return [payload_from_msg(c) for c in resp.chunks]

    def get_document(self, doc_id: int, *, text: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """A document: doc_id, source_id, source, metadata, text (unless ``text=False``) and its chunk range."""
        d = self._call("GetDocument", pb.GetDocumentRequest(doc_id=int(doc_id), omit_text=not text), timeout).document
        return {"doc_id": int(d.doc_id), "source_id": d.source_id, "source": d.source,
                "metadata": {k: meta_value(v) for k, v in d.metadata.items()},
                "text": d.text if d.HasField("text") else None, "first_chunk_id": int(d.first_chunk_id),
                "num_chunks": int(d.num_chunks), "num_tokens": int(d.num_tokens)}

    def reload(self, *, timeout: float | None = None) -> pb.ReloadResponse:
        """Ask the server to re-open the datastore's newest version and its indexes (calls in flight finish first on the old)."""
        return self._call("Reload", pb.ReloadRequest(), timeout)

    # -- n-gram --------------------------------------------------------------------------

    def count(self, ngram, *, timeout: float | None = None):
        from retromem.index.types import Count

        r = self._call("Count", pb.NgramRequest(query=_ngram_query(ngram)), timeout)
        return Count(int(r.count), bool(r.approx))

    def count_batch(self, ngrams, *, timeout: float | None = None):
        """Counts of many n-grams (texts or token-id lists): one CountBatch round trip per max_batch of them."""
        from retromem.index.types import Count

        ngrams = list(ngrams)
        step = int(self.limits.max_batch) or 1024
        out = []
        for i in range(0, len(ngrams), step):
            r = self._call("CountBatch", pb.CountBatchRequest(queries=[_ngram_query(g) for g in ngrams[i : i + step]]), timeout)
            out.extend(Count(int(c), bool(a)) for c, a in zip(r.counts, r.approx))
        return out

    def prob(self, prompt, next_token, *, timeout: float | None = None):
        from retromem.index.types import Prob

        r = self._call("Prob", pb.ProbRequest(prompt=_ngram_query(prompt), next_token=_token(next_token)), timeout)
        return Prob(int(r.prompt_count), int(r.cont_count), float(r.prob) if r.HasField("prob") else None)

    def infgram_prob(self, prompt, next_token, *, timeout: float | None = None):
        from retromem.index.types import InfgramProb

        r = self._call("InfgramProb", pb.ProbRequest(prompt=_ngram_query(prompt), next_token=_token(next_token)), timeout)
        return InfgramProb(int(r.prompt_count), int(r.cont_count), float(r.prob), int(r.suffix_len))

    def next_token_distribution(self, prompt, *, top_k: int = 0, timeout: float | None = None):
        return _dist(self._call("NextTokenDistribution", pb.NgramRequest(query=_ngram_query(prompt), top_k=top_k), timeout))

    def infgram_next_token_distribution(self, prompt, *, top_k: int = 0, timeout: float | None = None):
        return _dist(self._call("InfgramNextTokenDistribution", pb.NgramRequest(query=_ngram_query(prompt), top_k=top_k),
                                timeout))

    def draft_continuations(self, contexts: Sequence[Sequence[int]], depth: int, max_occurrences: int | None = None,
                            min_suffix: int = 2, max_suffix: int = 16, *, timeout: float | None = None):
        """NextTokens: :meth:`retromem.index.ngram.NgramIndex.draft_continuations` over the service, all
        contexts in one round trip."""
        from retromem.index.ngram import Continuations

        req = pb.NextTokensRequest(contexts=[pb.TokenIds(ids=[int(t) for t in c]) for c in contexts], depth=depth,
                                   max_occurrences=max_occurrences or 0, min_suffix=min_suffix, max_suffix=max_suffix)
        r = self._call("NextTokens", req, timeout)
        return [(int(m.suffix_len), Continuations(int(m.count), int(m.read), tuple(
                    (tuple(int(t) for t in c.ids), int(c.count)) for c in m.continuations), bool(m.approx))
                 if m.suffix_len else None) for m in r.results]

    def find(self, ngram, limit: int = 10, *, timeout: float | None = None):
        from retromem.index.types import FindResult

        r = self._call("Find", pb.FindRequest(query=_ngram_query(ngram), limit=limit), timeout)
        return FindResult(int(r.count), tuple(_occurrence(o) for o in r.occurrences))

    def search_documents(self, cnf: Sequence[Sequence[Any]], max_hits: int = 10, max_diff_tokens: int | None = None,
                         *, timeout: float | None = None):
        from retromem.index.types import DocumentSearch

        req = pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[_ngram_query(t) for t in clause]) for clause in cnf],
                                        max_hits=max_hits, max_diff_tokens=max_diff_tokens or 0)
        r = self._call("SearchDocuments", req, timeout)
        return DocumentSearch(int(r.count), bool(r.approx), tuple(_occurrence(o) for o in r.hits))

    def raw(self, method: str, request, timeout: float | None = None):
        """Any RPC with a message built by hand (the full response, ``missing_shards`` included)."""
        return self._call(method, request, timeout)
