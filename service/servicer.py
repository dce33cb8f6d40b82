"""The retrieval servicer: one gRPC API over a datastore, a dense index and an n-gram index.

:class:`RetrievalServicer` is a thin adapter: it checks each request field by field (so that a
bad one gets the right status code and a message naming the field, and the server keeps
serving), calls the library (:class:`retromem.index.dense.DenseIndex` through the micro-batcher,
:class:`retromem.index.ngram.NgramIndex`, :func:`retromem.index.types.fetch_payloads`) and converts the typed
results to messages (:mod:`retromem.service.messages`). :class:`Backend` is what one server
serves. Wiring it into a running server is :mod:`retromem.service.server`'s job.

Reload without downtime (``Reload`` RPC, SIGHUP): what a server serves is one immutable
:class:`ServingState` (backend, dense batcher, Info); a reload opens a new one beside it (the
datastore's newest version, the indexes) and swaps the reference. Every call pins the state it
started with (:func:`pinned`) and finishes on it, so a call never sees half of each; the old state
is freed when its last call ends. Nothing is mutated under a running call.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc
import numpy as np

from retromem import __version__
from retromem.errors import ConfigError
from retromem.index.dense import MAX_SEARCH_PARAM
from retromem.index.types import deleted_chunk_ids
from retromem.service.batcher import DeadlinePassed, DenseBatcher, DenseItem
from retromem.service.common import (SEARCH_ADVICE, AnswerSize, ServiceError, check_answer, check_chunk_ids,
                                     check_knob, check_search_request, decode_text, invalid, message_budget, rpc,
                                     stream_search, too_big)
from retromem.service.config import ServerConfig, ServiceLimits
from retromem.service.interceptors import Metrics
from retromem.service.messages import (chunk_msg, dist_msg, fetch_flags, filters_from_msg, limits_msg, metadata_msg,
                                       occurrence_msg)
from retromem.service.v1 import retrieval_pb2 as pb
from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

OUT_OF_RANGE = grpc.StatusCode.OUT_OF_RANGE
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Backend:
    """What one server serves; any of the three may be absent."""

    datastore: Any = None  # datastore.Datastore
    dense: Any = None  # index.dense.DenseIndex
    ngram: Any = None  # index.ngram.NgramIndex

    @classmethod
    def open(cls, cfg: ServerConfig) -> "Backend":
        from retromem.datastore import Datastore

        ds = Datastore.open(cfg.datastore) if cfg.datastore else None
        dense = ngram = None
        if cfg.dense:
            from retromem.index.dense import DenseIndex

            dense = DenseIndex.open(cfg.dense, datastore=ds)
            ds = ds or dense.datastore
        if cfg.ngram:
            from retromem.index.ngram import NgramIndex, QueryLimits

            lim = cfg.limits
            ngram = NgramIndex(cfg.ngram, ds, QueryLimits(max_query_tokens=lim.max_query_tokens, max_clauses=lim.max_clauses,
                                                           max_terms_per_clause=lim.max_terms_per_clause,
                                                           max_diff_tokens=lim.max_diff_tokens))
            ds = ds or ngram.datastore
        if dense is not None and ngram is not None and dense.datastore_id != ngram.datastore.datastore_id:
            raise ConfigError("--dense and --ngram were built from different datastores: serve each on its own")
        return cls(ds, dense, ngram)


@dataclass(frozen=True)
class ServingState:
    """Everything one version of a server answers from; never mutated, replaced whole by a reload."""

    backend: Backend
    batcher: DenseBatcher | None
    info: pb.InfoResponse
    size: AnswerSize
    opened_at: float  # time.monotonic() when it was opened
    bare_knn: bool = False  # a CPU dense index over a datastore without tombstones: search() is knn() plus checks


def pinned(fn: Callable) -> Callable:
    """RPC-method decorator: the call runs on the state current when it started (a thread-local pin,
    set around each step of a streaming handler), however many reloads happen meanwhile."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(self, request, context):
            state = self._state
            gen = fn(self, request, context)
            while True:
                prev = getattr(self._local, "state", None)
                self._local.state = state
                try:
                    item = next(gen)
                except StopIteration:
                    return
                finally:
                    self._local.state = prev
                yield item

        return stream

    @functools.wraps(fn)
    def unary(self, request, context):
        prev = getattr(self._local, "state", None)
        self._local.state = self._state
        try:
            return fn(self, request, context)
        finally:
            self._local.state = prev

    return unary


class RetrievalServicer(pb_grpc.RetrievalServicer):
    """The ``retromem.v1.Retrieval`` service over a :class:`Backend` (see module docstring)."""

    def __init__(self, cfg: ServerConfig, backend: Backend, metrics: Metrics | None = None) -> None:
        self.cfg = cfg
        self.limits: ServiceLimits = cfg.limits
        self.metrics = metrics
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._local = threading.local()  # the state each running call is pinned to
        self._reload_lock = threading.Lock()  # one reload at a time
        self._state = self._open_state(backend)
        if metrics is not None and backend.dense is not None:
            metrics.dense_queue.set_function(lambda: self.batcher.depth if self.batcher is not None else 0)

    def _open_state(self, backend: Backend) -> ServingState:
        batcher = None
        if backend.dense is not None:
            batcher = DenseBatcher(backend.dense, max_batch=self.cfg.max_dense_batch, wait_s=self.cfg.batch_wait_ms / 1000,
                                   on_batch=self.metrics.dense_batch.observe if self.metrics else None)
        info = self._build_info(backend)
        d = backend.dense
        bare = d is not None and not d.gpu and not len(deleted_chunk_ids(d.datastore))
        return ServingState(backend, batcher, info, AnswerSize.of(info.datastore if info.HasField("datastore") else None),
                            time.monotonic(), bare)

    # the state of the running call (pinned), else the current one
    @property
    def state(self) -> ServingState:
        return getattr(self._local, "state", None) or self._state

    @property
    def b(self) -> Backend:
        return self.state.backend

    @property
    def batcher(self) -> DenseBatcher | None:
        return self.state.batcher

    @property
    def size(self) -> AnswerSize:
        return self.state.size

    @property
    def _info(self) -> pb.InfoResponse:
        return self.state.info

    def close(self) -> None:
        if self._state.batcher is not None:
            self._state.batcher.close()

    def reload(self) -> ServingState:
        """Open the datastore's newest version and the indexes anew (what ``cfg`` names) and serve them
        from now on; calls already running finish on the old state. An error leaves the old state
        serving and is raised."""
        with self._reload_lock:
            t0 = time.perf_counter()
            backend = Backend.open(self.cfg)
            if backend.dense is not None and backend.dense.meta.get("embedder"):
                old = self._state.backend.dense
                if old is not None and old._embedder is not None:
                    backend.dense.attach_embedder(old.embedder)  # the same model: no second load
                else:
                    backend.dense.embedder  # load it now, not in the first call
            new = self._open_state(backend)
            old_state, self._state = self._state, new  # one reference swap: calls pin one or the other
            logger.info("reloaded in %.2fs: datastore version %s, %s documents", time.perf_counter() - t0,
                        getattr(backend.datastore, "version", 1), getattr(backend.datastore, "num_documents", "?"))
            if old_state.batcher is not None:
                old_state.batcher.close()
            return new

    # -- info ----------------------------------------------------------------------------

    def _build_info(self, backend: Backend) -> pb.InfoResponse:
        from retromem.index.types import deleted_doc_ids

        m = pb.InfoResponse(version=__version__, role="server", limits=limits_msg(self.cfg),
                            auth_required=self.cfg.token is not None)
        ds = backend.datastore
        if ds is not None:
            man = ds.manifest
            tok = man["tokenizer"]
            m.datastore.CopyFrom(pb.DatastoreInfo(
                datastore_id=ds.datastore_id, num_documents=ds.num_documents, num_chunks=ds.num_chunks,
                chunk_length=ds.chunk_length, num_tokens=int(man["counts"]["tokens"]), tokenizer=str(tok.get("name", "")),
                vocab_size=int(tok.get("vocab_size", 0)), vocab_sha256=str(tok.get("vocab_hash", "")),
                text_bytes=int(man["counts"].get("text_bytes", 0)), version=int(getattr(ds, "version", 1) or 1),
                version_id=str(getattr(ds, "version_id", "") or ""), deleted_documents=len(deleted_doc_ids(ds)),
                metadata_fields={str(k): str(v) for k, v in (getattr(ds, "metadata_fields", None) or {}).items()}))
        d = backend.dense
        if d is not None:
            e = d.meta["embedder"]
            m.dense.CopyFrom(pb.DenseInfo(factory=d.factory, dim=d.dim, ntotal=d.ntotal, embedder=e["name"],
                                          embedder_sha256=e["weights_sha256"],
                                          search_defaults={k: int(v) for k, v in d.defaults.items()}))
        g = backend.ngram
        if g is not None:
            eng = g.manifest.get("engine", {})
            m.ngram.CopyFrom(pb.NgramInfo(num_tokens=g.num_tokens, shards=len(g.manifest["shards"]),
                                          engine=f"{eng.get('package', 'infini-gram')} {eng.get('version', '')}".strip()))
        return m

    @pinned
    @rpc
    def Info(self, request, context):
        return self._info

    # -- dense ---------------------------------------------------------------------------

    def _need(self, what: str):
        part = getattr(self.b, what)
        if part is None:
            flag = {"dense": "--dense", "ngram": "--ngram", "datastore": "--datastore"}[what]
            raise ServiceError(FAILED_PRECONDITION, f"this server has no {what} index loaded (start it with {flag})"
                               if what != "datastore" else "this server has no datastore loaded (start it with --datastore)")
        return part

    def _dense_item(self, req: pb.SearchRequest, context, prefix: str = "", streaming: bool = False) -> DenseItem:
        dense = self._need("dense")
        lim = self.limits
        n = check_search_request(req, lim, dense.ntotal, prefix, self.size, streaming=streaming)
        x = np.zeros((n, dense.dim), np.float32)
        texts: dict[int, str] = {}
        exclude: list[np.ndarray | None] | None = None
        ndocs = self.b.datastore.num_documents
        for i, q in enumerate(req.queries):
            kind = q.WhichOneof("query")
            f = f"{prefix}queries[{i}]"
            if kind == "text":
                texts[i] = decode_text(q.text, f"{f}.text", lim.max_query_bytes)
            elif kind == "vector":
                v = np.asarray(q.vector.values, dtype=np.float32)
                if len(v) != dense.dim:
                    raise invalid(f"`{f}.vector` has {len(v)} values; this index takes {dense.dim}")
                if not np.isfinite(v).all():
                    raise invalid(f"`{f}.vector` holds NaN or infinity at position {int(np.flatnonzero(~np.isfinite(v))[0])}")
                x[i] = v
            else:
                raise invalid(f"`{f}` has neither text nor vector")
            if len(q.exclude_doc_ids):
                e = np.asarray(q.exclude_doc_ids, dtype=np.int64)
                bad = (e < 0) | (e >= ndocs)
                if bad.any():
                    raise ServiceError(OUT_OF_RANGE, f"`{f}.exclude_doc_ids` holds doc_id {int(e[bad][0])}, outside "
                                                     f"0..{ndocs - 1}")
                if exclude is None:
                    exclude = [None] * n
                exclude[i] = e
        filters = self._filters(req, prefix)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return DenseItem(x, texts, int(req.k), req.nprobe or None, req.ef_search or None, exclude,
                         fetch_flags(req.fetch if req.HasField("fetch") else None), deadline, filters)

    def _filters(self, req: pb.SearchRequest, prefix: str) -> tuple:
        """The request's metadata filters, checked against the datastore's declared fields, as a
        hashable ((field, (values...)), ...) sorted by field (the batcher groups equal filters)."""
        from retromem.index.types import check_filters, metadata_fields

        if not len(req.filters):
            return ()
        try:
            flt = filters_from_msg(req.filters, prefix)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        flt = check_filters(flt, metadata_fields(self.b.datastore))  # QueryError -> INVALID_ARGUMENT
        return tuple(sorted((k, tuple(v)) for k, v in flt.items()))

    def _dense_search(self, item: DenseItem, context):
        try:
            return self.batcher.search(item, timeout=context.time_remaining())
        except DeadlinePassed:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the search finished") from None

    @staticmethod
    def _results(res, lo: int, hi: int) -> Iterator[pb.QueryResult]:
        for i in range(lo, hi):
            ids, scores = res.chunk_ids[i], res.scores[i]
            keep = ids >= 0
            r = pb.QueryResult(chunk_ids=ids[keep].tolist(), scores=scores[keep].tolist())
            if res.payloads is not None:
                r.chunks.extend(chunk_msg(p) for p in res.payloads[i])
            yield r

    def _announced_item(self, req: pb.SearchRequest, context, prefix: str = "", streaming: bool = False) -> DenseItem:
        self._need("dense")
        self.batcher.arrive()
        try:
            return self._dense_item(req, context, prefix, streaming)
        except BaseException:
            self.batcher.abandon()
            raise

    def _solo_search(self, req: pb.SearchRequest, context) -> pb.SearchResponse | None:
        """The short way for the commonest request, one vector with no exclusions, filters or fetch:
        the same checks as the batched path, then a bare top-k (:meth:`DenseIndex.knn`, what
        :meth:`DenseIndex.search` runs for such a query) in this thread while no dense batch is
        running (:meth:`DenseBatcher.solo`); the answer equals the batched path's. None: take the
        batched path (another request's shape, or a batch running or on its way)."""
        st = self.state
        q = req.queries[0]
        if (not st.bare_knn or q.WhichOneof("query") != "vector" or len(q.exclude_doc_ids) or len(req.filters)
                or req.nprobe > MAX_SEARCH_PARAM or req.ef_search > MAX_SEARCH_PARAM
                or (req.HasField("fetch") and fetch_flags(req.fetch))):
            return None
        dense = st.backend.dense
        check_search_request(req, self.limits, dense.ntotal, "", st.size)
        k = dense.check_k(int(req.k))
        x = np.asarray(q.vector.values, dtype=np.float32)
        if len(x) != dense.dim:
            raise invalid(f"`queries[0].vector` has {len(x)} values; this index takes {dense.dim}")
        if not np.isfinite(x).all():
            raise invalid(f"`queries[0].vector` holds NaN or infinity at position {int(np.flatnonzero(~np.isfinite(x))[0])}")
        x = x.reshape(1, -1)  # (1, dim)
        nprobe, ef = req.nprobe or None, req.ef_search or None
        done, got = st.batcher.solo(lambda: dense.knn(x, k, nprobe=nprobe, ef_search=ef))
        if not done:  # a batch is running: join the queue with what is parsed already
            st.batcher.arrive()
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            res = self._dense_search(DenseItem(x, {}, k, nprobe, ef, None, (), deadline), context)
            D, I = res.scores, res.chunk_ids
        else:
            D, I = got
        keep = I[0] >= 0
        out = pb.SearchResponse(results=[pb.QueryResult(chunk_ids=I[0][keep].tolist(), scores=D[0][keep].tolist())])
        return check_answer(out, self.limits.max_message_bytes, f"1 query x {k:,} hits", SEARCH_ADVICE)

    @pinned
    @rpc
    def Search(self, request, context):
        if len(request.queries) == 1 and self.state.batcher is not None:
            out = self._solo_search(request, context)
            if out is not None:
                return out
        item = self._announced_item(request, context)
        res = self._dense_search(item, context)
        out = pb.SearchResponse()
        out.results.extend(self._results(res, 0, len(res.chunk_ids)))
        return check_answer(out, self.limits.max_message_bytes, f"{len(item.vectors):,} queries x {item.k:,} hits",
                            SEARCH_ADVICE)

    @pinned
    def SearchStream(self, request_iterator, context):
        budget = message_budget(self.limits.max_message_bytes)

        def answer(r, req):
            item = self._announced_item(req, context, f"requests[{r}].", streaming=True)
            n = len(item.vectors)
            # search in slices of about one message each: the server holds one slice's payloads at a time
            step = max(1, int(budget // self.size.query(item.k, item.fetch)))

            def results():
                for lo in range(0, n, step):
                    if lo:
                        self.batcher.arrive()
                    res = self._dense_search(item if step >= n else item.rows(lo, min(n, lo + step)), context)
                    yield from self._results(res, 0, len(res.chunk_ids))

            return results(), []

        yield from stream_search(request_iterator, context, answer, self.limits.max_message_bytes, self.metrics)

    # -- chunks --------------------------------------------------------------------------

    @pinned
    @rpc
    def GetChunks(self, request, context):
        from retromem.index.types import fetch_payloads

        from retromem.index.types import live_chunk_mask

        ds = self._need("datastore")
        flags = fetch_flags(request.fetch if request.HasField("fetch") else None, default_all=True)
        ids = check_chunk_ids(request.chunk_ids, self.limits, ds.num_chunks, self.size, flags)
        live = live_chunk_mask(ds, ids)
        if not live.all():
            dead = np.asarray(ids)[~live]
            raise ServiceError(FAILED_PRECONDITION, f"`chunk_ids` holds chunks of deleted documents: "
                                                    f"{', '.join(map(str, dead[:20].tolist()))}"
                                                    f"{f' and {len(dead) - 20} more' if len(dead) > 20 else ''}")
        payloads = fetch_payloads(ds, ids, text="text" in flags, tokens="tokens" in flags,
                                  continuation="continuation" in flags)
        return check_answer(pb.GetChunksResponse(chunks=[chunk_msg(p) for p in payloads]), self.limits.max_message_bytes,
                            f"{len(ids):,} chunks", "ask for fewer chunks per call, or less fetch")

    @pinned
    @rpc
    def GetDocument(self, request, context):
        from retromem.index.types import deleted_doc_ids, doc_metadata

        ds = self._need("datastore")
        d = int(request.doc_id)
        if not 0 <= d < ds.num_documents:
            raise ServiceError(OUT_OF_RANGE, f"`doc_id` {d} is outside 0..{ds.num_documents - 1}")
        if d in set(deleted_doc_ids(ds).tolist()):
            raise ServiceError(FAILED_PRECONDITION, f"`doc_id` {d} is a deleted document")
        nbytes = int(ds.doc_byte_offsets_array[d + 1] - ds.doc_byte_offsets_array[d])
        if not request.omit_text and nbytes + 4096 > self.limits.max_message_bytes:
            raise too_big(nbytes + 4096, self.limits.max_message_bytes, f"document {d} ({nbytes:,} bytes of text)",
                          "ask with omit_text and fetch its chunks with GetChunks")
        doc = ds.document(d)
        m = pb.Document(doc_id=d, source_id=doc.source_id, source=doc.source, first_chunk_id=doc.first_chunk_id,
                        num_chunks=doc.n_chunks, num_tokens=doc.n_tokens)
        if not request.omit_text:
            m.text = doc.text
        metadata_msg(m, getattr(doc, "metadata", None) or doc_metadata(ds, [d])[0])
        return pb.GetDocumentResponse(document=m)

    @rpc
    def Reload(self, request, context):
        t0 = time.perf_counter()
        try:
            st = self.reload()
        except Exception as exc:  # the old state keeps serving
            logger.exception("reload failed")
            raise ServiceError(FAILED_PRECONDITION, f"reload failed, still serving the previous version: "
                                                    f"{type(exc).__name__}: {exc}") from None
        from retromem.index.types import deleted_doc_ids

        ds = st.backend.datastore
        return pb.ReloadResponse(version=int(getattr(ds, "version", 1) or 1), version_id=str(getattr(ds, "version_id", "") or ""),
                                 num_documents=ds.num_documents if ds is not None else 0,
                                 num_chunks=ds.num_chunks if ds is not None else 0,
                                 deleted_documents=len(deleted_doc_ids(ds)) if ds is not None else 0,
                                 dense_ntotal=st.backend.dense.ntotal if st.backend.dense is not None else 0,
                                 seconds=time.perf_counter() - t0)

    # -- n-gram --------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return self.b.ngram.encode(text)

    def _decode(self, token_id: int) -> str:
        with self._tok_lock:
            return self.b.ngram.datastore.tokenizer.decode([token_id])

    def _ids(self, q: pb.NgramQuery, field: str, *, allow_empty: bool = False) -> list[int]:
        g = self._need("ngram")
        lim = self.limits
        kind = q.WhichOneof("query")
        if kind == "text":
            text = decode_text(q.text, f"{field}.text", lim.max_query_bytes, allow_empty=allow_empty)
            ids = self._encode(text) if text else []
            if not ids and not allow_empty:
                raise invalid(f"`{field}.text` is empty: {text!r} has no tokens")
        elif kind == "ids":
            ids = list(q.ids.ids)
            if not ids and not allow_empty:
                raise invalid(f"`{field}.ids` is empty: give at least one token id")
            bad = [t for t in ids if t >= g.vocab_size]
            if bad:
                raise ServiceError(OUT_OF_RANGE, f"`{field}.ids` has token id {bad[0]} outside the vocabulary "
                                                 f"0..{g.vocab_size - 1}")
        elif allow_empty:
            ids = []
        else:
            raise invalid(f"`{field}` is not set: give text or ids")
        if len(ids) > lim.max_query_tokens:
            raise invalid(f"`{field}` has {len(ids):,} tokens, more than max_query_tokens={lim.max_query_tokens:,}")
        return ids

    def _token(self, t: pb.Token, field: str) -> int:
        g = self._need("ngram")
        kind = t.WhichOneof("token")
        if kind == "text":
            text = decode_text(t.text, f"{field}.text", self.limits.max_query_bytes)
            ids = self._encode(text)
            if len(ids) != 1:
                raise invalid(f"`{field}.text` must be a single token; {text!r} is {len(ids)} tokens {ids}")
            return ids[0]
        if kind == "id":
            if t.id >= g.vocab_size:
                raise ServiceError(OUT_OF_RANGE, f"`{field}.id` {t.id} is outside the vocabulary 0..{g.vocab_size - 1}")
            return int(t.id)
        raise invalid(f"`{field}` is not set: give text or id")

    @pinned
    @rpc
    def Count(self, request, context):
        ids = self._ids(request.query, "query")
        c = self.b.ngram.count(ids)
        return pb.CountResponse(count=c.count, approx=c.approx, token_ids=ids)

    @pinned
    @rpc
    def CountBatch(self, request, context):
        g = self._need("ngram")
        n = len(request.queries)
        if not n:
            raise invalid("`queries` is empty: give at least one n-gram")
        if n > self.limits.max_batch:
            raise invalid(f"`queries` has {n:,} n-grams, more than max_batch={self.limits.max_batch:,}: send several requests")
        counts = [g.count(self._ids(q, f"queries[{i}]")) for i, q in enumerate(request.queries)]
        return pb.CountBatchResponse(counts=[c.count for c in counts], approx=[c.approx for c in counts])

    @pinned
    @rpc
    def Prob(self, request, context):
        ids = self._ids(request.prompt, "prompt", allow_empty=True)
        p = self.b.ngram.prob(ids, self._token(request.next_token, "next_token"))
        m = pb.ProbResponse(prompt_count=p.prompt_count, cont_count=p.cont_count)
        if p.prob is not None:
            m.prob = p.prob
        return m

    @pinned
    @rpc
    def InfgramProb(self, request, context):
        ids = self._ids(request.prompt, "prompt", allow_empty=True)
        p = self.b.ngram.infgram_prob(ids, self._token(request.next_token, "next_token"))
        return pb.ProbResponse(prompt_count=p.prompt_count, cont_count=p.cont_count, prob=p.prob, suffix_len=p.suffix_len)

    def _top_k(self, request: pb.NgramRequest) -> int:
        vocab = self._need("ngram").vocab_size
        if request.top_k > vocab:  # 0 asks for all: never more than the vocabulary
            raise ServiceError(OUT_OF_RANGE, f"`top_k` is {request.top_k:,}; this server allows 0 (all) or 1..{vocab:,} "
                                             "(the vocabulary size)")
        return request.top_k

    @pinned
    @rpc
    def NextTokenDistribution(self, request, context):
        top_k = self._top_k(request)
        ids = self._ids(request.query, "query", allow_empty=True)
        return dist_msg(self.b.ngram.next_token_distribution(ids), top_k, self._decode)

    @pinned
    @rpc
    def InfgramNextTokenDistribution(self, request, context):
        top_k = self._top_k(request)
        ids = self._ids(request.query, "query", allow_empty=True)
        return dist_msg(self.b.ngram.infgram_next_token_distribution(ids), top_k, self._decode)

    @pinned
    @rpc
    def NextTokens(self, request, context):
        g = self._need("ngram")
        lim = self.limits
        if not request.contexts:
            raise invalid("`contexts` is empty: give at least one context")
        if len(request.contexts) > lim.max_batch:
            raise invalid(f"`contexts` has {len(request.contexts):,} contexts, more than max_batch={lim.max_batch:,}")
        if not 1 <= request.depth <= 64:
            raise invalid(f"`depth` must be in 1..64, got {request.depth}")
        if request.max_occurrences > g.limits.max_support:
            raise ServiceError(OUT_OF_RANGE, f"`max_occurrences` is {request.max_occurrences:,}; this server allows 0 "
                                             f"(its max_support) or 1..{g.limits.max_support:,}")
        lo, hi = request.min_suffix or 2, request.max_suffix or 16
        if lo > hi or hi > lim.max_query_tokens:
            raise invalid(f"`min_suffix` ({lo}) must be at most `max_suffix` ({hi}), which is at most "
                          f"max_query_tokens={lim.max_query_tokens}")
        contexts = [self._ids(pb.NgramQuery(ids=c), f"contexts[{i}]") for i, c in enumerate(request.contexts)]
        found = g.draft_continuations(contexts, int(request.depth), request.max_occurrences or None, lo, hi)
        return pb.NextTokensResponse(results=[
            pb.ContextContinuations(suffix_len=n) if cont is None else pb.ContextContinuations(
                suffix_len=n, count=cont.count, read=cont.read, approx=cont.approx,
                continuations=[pb.Continuation(ids=list(ids), count=c) for ids, c in cont.sequences])
            for n, cont in found])

    def _limit(self, value: int, default: int, field: str, fetch: pb.Fetch | None) -> int:
        n = value or default
        if n > self.limits.max_find_limit:
            raise ServiceError(OUT_OF_RANGE, f"`{field}` is {n}; this server allows 1..{self.limits.max_find_limit} "
                                             "(max_find_limit)")
        flags = fetch_flags(fetch)
        size = 40 + n * (40 + self.size.fetched(flags))  # count, occurrences and their chunks
        if flags and size > message_budget(self.limits.max_message_bytes):
            raise too_big(size, self.limits.max_message_bytes, f"{n:,} occurrences with {', '.join(flags)}",
                          f"ask for a smaller `{field}`, or less fetch")
        return n

    def _chunks(self, hits, fetch: pb.Fetch | None) -> list[pb.Chunk]:
        flags = fetch_flags(fetch)
        if not flags or not hits:
            return []
        ps = self.b.ngram.fetch(hits, text="text" in flags, tokens="tokens" in flags, continuation="continuation" in flags)
        return [chunk_msg(p) for p in ps]

    @pinned
    @rpc
    def Find(self, request, context):
        fetch = request.fetch if request.HasField("fetch") else None
        limit = self._limit(request.limit, 10, "limit", fetch)
        ids = self._ids(request.query, "query")
        r = self.b.ngram.find(ids, limit=limit)
        return pb.FindResponse(count=r.count, occurrences=[occurrence_msg(o) for o in r.occurrences],
                               chunks=self._chunks(r.occurrences, request.fetch if request.HasField("fetch") else None))

    @pinned
    @rpc
    def SearchDocuments(self, request, context):
        g = self._need("ngram")
        lim = self.limits
        if not request.clauses:
            raise invalid("`clauses` is empty: give at least one clause of n-grams")
        if len(request.clauses) > lim.max_clauses:
            raise invalid(f"`clauses` has {len(request.clauses)} clauses, more than max_clauses={lim.max_clauses}")
        cnf = []
        for i, clause in enumerate(request.clauses):
            if not clause.terms:
                raise invalid(f"`clauses[{i}].terms` is empty: give at least one n-gram")
            if len(clause.terms) > lim.max_terms_per_clause:
                raise invalid(f"`clauses[{i}].terms` has {len(clause.terms)} terms, more than "
                              f"max_terms_per_clause={lim.max_terms_per_clause}")
            cnf.append([self._ids(t, f"clauses[{i}].terms[{j}]") for j, t in enumerate(clause.terms)])
        max_hits = self._limit(request.max_hits, 10, "max_hits", request.fetch if request.HasField("fetch") else None)
        check_knob(request.max_diff_tokens, "max_diff_tokens", lim.max_diff_tokens, "max_diff_tokens", "the server's default")
        r = g.search_documents(cnf, max_hits=max_hits, max_diff_tokens=request.max_diff_tokens or None)
        return pb.SearchDocumentsResponse(count=r.count, approx=r.approx, hits=[occurrence_msg(o) for o in r.hits],
                                          doc_ids=r.doc_ids,
                                          chunks=self._chunks(r.hits, request.fetch if request.HasField("fetch") else None))
