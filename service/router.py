"""Router: one retrieval API over N shard servers, answers merged (as MassiveDS serves shards).

The shard unit is one server per datastore (with its dense and/or n-gram index). Global ids come
from a deployment description (``--deployment``: each shard's datastore id and first document and
chunk id, checked against what the shard serves, ranges never overlapping), so adding a shard or
reordering them moves no id. Without one, shards are listed in id order and numbered
consecutively: shard i's ``doc_id``/``chunk_id`` are offset by the documents/chunks of shards
0..i-1, the numbering of one datastore built from the shards' inputs in shard order. Either way a
datastore given twice is refused, the ids the router hands out are globally unique, and a router
over shards answers as one server over their union:
dense hits merged by score (top-k), n-gram counts summed, ∞-gram answers merged at the longest
suffix any shard matched, chunks fetched from the shard that owns them.

Each request fans out concurrently with a deadline (``shard_timeout_s``, or the caller's if
sooner). A shard refusing the query itself (INVALID_ARGUMENT, OUT_OF_RANGE, ...) passes its status
on. A shard that fails or times out fails the answer (UNAVAILABLE, naming it) unless the router
runs with ``partial=True``: then the answer comes from the shards that did answer and names the
missing ones in ``missing_shards``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np

from retromem import __version__
from retromem.errors import ConfigError
from retromem.service.common import (SEARCH_ADVICE, AnswerSize, ServiceError, check_answer, check_chunk_ids,
                                     check_search_request, message_budget, rpc, stream_search)
from retromem.service.messages import fetch_flags
from retromem.service.config import SERVE_TARGET, ServerConfig
from retromem.service.interceptors import Metrics
from retromem.service.messages import limits_msg, shift_chunk
from retromem.service.v1 import retrieval_pb2 as pb
from retromem.service.v1 import retrieval_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# A shard answering one of these refused the query itself: the caller's mistake, passed on as is.
QUERY_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED}


@dataclass
class Shard:
    target: str
    stub: pb_grpc.RetrievalStub
    channel: grpc.Channel
    info: pb.InfoResponse
    first_doc: int = 0
    first_chunk: int = 0

    @property
    def num_docs(self) -> int:
        return int(self.info.datastore.num_documents)

    @property
    def num_chunks(self) -> int:
        return int(self.info.datastore.num_chunks)


def _channel(cfg: ServerConfig, target: str) -> grpc.Channel:
    size = cfg.limits.max_message_bytes
    opts = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]
    if cfg.shard_tls_ca:
        from pathlib import Path

        creds = grpc.ssl_channel_credentials(root_certificates=Path(cfg.shard_tls_ca).read_bytes())
        return grpc.secure_channel(target, creds, options=opts)
    return grpc.insecure_channel(target, options=opts)


def place_shards(shards: list[Shard], declared: dict[str, tuple[str, int, int]]) -> list[Shard]:
    """The shards in id order with their first document and chunk id set. With a deployment description
    (``declared``: target -> (datastore_id, first_doc, first_chunk)) the ids are declared, checked against
    the datastore each shard serves, ranges never overlapping, so adding or reordering shards moves no id;
    without one they follow the order given. A datastore served by two shards is refused either way:
    its hits would come back twice."""
    ids = [s.info.datastore.datastore_id for s in shards]
    for i, d in enumerate(ids):
        if d and ids.index(d) != i:
            raise ConfigError(f"shards {shards[ids.index(d)].target} and {shards[i].target} serve the same "
                              f"datastore {d[:16]}: every hit would come back twice; give each datastore once")
    if not declared:
        doc = chunk = 0
        for s in shards:
            s.first_doc, s.first_chunk = doc, chunk
            doc += s.num_docs
            chunk += s.num_chunks
        return list(shards)
    for s in shards:
        want, doc, chunk = declared[s.target]
        if s.info.datastore.datastore_id != want:
            raise ConfigError(f"shard {s.target} serves datastore {s.info.datastore.datastore_id[:16]}, but the "
                              f"deployment declares {want[:16]} for it")
        s.first_doc, s.first_chunk = int(doc), int(chunk)
    out = sorted(shards, key=lambda s: s.first_chunk)
    for a, b in zip(out, out[1:]):
        if b.first_chunk < a.first_chunk + a.num_chunks or b.first_doc < a.first_doc + a.num_docs:
            raise ConfigError(f"the deployment's id ranges of shards {a.target} (chunks {a.first_chunk:,}.."
                              f"{a.first_chunk + a.num_chunks - 1:,}, documents {a.first_doc:,}..{a.first_doc + a.num_docs - 1:,}) "
                              f"and {b.target} (chunks from {b.first_chunk:,}, documents from {b.first_doc:,}) overlap")
    return out


class RouterServicer(pb_grpc.RetrievalServicer):
    """The ``retromem.v1.Retrieval`` service over shard servers (see module docstring)."""

    def __init__(self, cfg: ServerConfig, metrics: Metrics | None = None,
                 connect: Callable[[str], tuple[Any, Any]] | None = None) -> None:
        """``connect(target) -> (stub, channel)``: how to reach a shard (default: a gRPC channel to
        host:port; the Ray Serve fan-out passes one that calls the shard deployments' handles)."""
        self.cfg = cfg
        self.limits = cfg.limits
        self.metrics = metrics
        self._metadata = (("authorization", f"Bearer {cfg.shard_token}"),) if cfg.shard_token else None
        self.shards: list[Shard] = []
        self._declared = dict(zip(cfg.shards, cfg.shard_ranges)) if cfg.shard_ranges else {}
        for target in cfg.shards:
            if connect is not None:
                stub, ch = connect(target)
            elif target.startswith(SERVE_TARGET):
                raise ConfigError(f"shard {target} is a Ray Serve deployment: serve it with `retromem serve --engine ray "
                                  "--deployment FILE`")
            else:
                ch = _channel(cfg, target)
                stub = pb_grpc.RetrievalStub(ch)
            try:  # the shards may still be starting: wait for them up to the shard timeout
                info = stub.Info(pb.InfoRequest(), timeout=cfg.shard_timeout_s, metadata=self._metadata,
                                 wait_for_ready=True)
            except grpc.RpcError as exc:
                for s in self.shards:
                    s.channel.close()
                ch.close()
                raise ConfigError(f"shard {target} did not answer Info within {cfg.shard_timeout_s}s: "
                                  f"{exc.code().name}: {exc.details()}") from None
            self.shards.append(Shard(target, stub, ch, info))
        try:
            self._install(place_shards(self.shards, self._declared))
        except ConfigError:
            self.close()
            raise

    def _install(self, shards: list[Shard]) -> None:
        """Serve ``shards`` (placed): the id tables, the merged Info and the answer-size model."""
        self._check_compatible(shards)
        self.shards = shards
        last = shards[-1]
        self.num_docs, self.num_chunks = last.first_doc + last.num_docs, last.first_chunk + last.num_chunks
        self._chunk_starts = np.array([s.first_chunk for s in shards], dtype=np.int64)
        self._chunk_ends = np.array([s.first_chunk + s.num_chunks for s in shards], dtype=np.int64)
        self._info = self._build_info()
        self.size = AnswerSize.of(self._info.datastore if self._info.HasField("datastore") else None)

    @rpc
    def Reload(self, request, context):
        """Every shard re-opens its newest version (its own Reload), then the router re-reads their Info
        and re-places them. Without a deployment description a shard that grew or shrank before the
        last one would move the ids of every shard after it: refused (FAILED_PRECONDITION), and the
        router keeps serving the old placement; with one, new sizes must fit the declared ranges."""
        import time

        t0 = time.perf_counter()
        answers, missing = self._all("Reload", request, context)
        if missing:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"shards did not reload: {missing}; the router still serves "
                                                           "the previous placement")
        fresh = []
        for s in self.shards:
            info = s.stub.Info(pb.InfoRequest(), timeout=self.cfg.shard_timeout_s, metadata=self._metadata)
            fresh.append(Shard(s.target, s.stub, s.channel, info))
        if not self._declared:
            for old, new in zip(self.shards[:-1], fresh[:-1]):
                if (new.num_docs, new.num_chunks) != (old.num_docs, old.num_chunks):
                    raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"shard {old.target} now holds {new.num_chunks:,} chunks (was {old.num_chunks:,}): "
                                       "the ids of the shards after it would move; serve them with --deployment "
                                       "(declared id ranges with room to grow). Still serving the previous placement.")
        try:
            self._install(place_shards(fresh, self._declared))
        except ConfigError as exc:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"{exc}; still serving the previous placement") from None
        return pb.ReloadResponse(num_documents=self.num_docs, num_chunks=self.num_chunks,
                                 deleted_documents=sum(int(a.deleted_documents) for a in answers.values()),
                                 dense_ntotal=sum(int(a.dense_ntotal) for a in answers.values()),
                                 seconds=time.perf_counter() - t0)

    def close(self) -> None:
        for s in self.shards:
            s.channel.close()

    def _check_compatible(self, shards: list[Shard]) -> None:
        infos = [s.info for s in shards]
        for what, get in (("tokenizer vocabulary", lambda i: i.datastore.vocab_sha256),
                          ("chunk length", lambda i: i.datastore.chunk_length),
                          ("embedder", lambda i: (i.HasField("dense"), i.dense.embedder_sha256, i.dense.dim)),
                          ("n-gram index presence", lambda i: i.HasField("ngram")),
                          ("datastore presence", lambda i: i.HasField("datastore"))):
            values = {get(i) for i in infos}
            if len(values) > 1:
                raise ConfigError(f"the shards differ in their {what}: a router merges shards of one kind only")

    def _build_info(self) -> pb.InfoResponse:
        first = self.shards[0].info
        m = pb.InfoResponse(version=__version__, role="router", limits=limits_msg(self.cfg),
                            auth_required=self.cfg.token is not None)
        if first.HasField("datastore"):
            ident = hashlib.sha256("".join(s.info.datastore.datastore_id for s in self.shards).encode()).hexdigest()
            m.datastore.CopyFrom(pb.DatastoreInfo(
                datastore_id=ident, num_documents=self.num_docs, num_chunks=self.num_chunks,
                chunk_length=first.datastore.chunk_length, num_tokens=sum(s.info.datastore.num_tokens for s in self.shards),
                tokenizer=first.datastore.tokenizer, vocab_size=first.datastore.vocab_size,
                vocab_sha256=first.datastore.vocab_sha256,
                text_bytes=sum(s.info.datastore.text_bytes for s in self.shards),
                deleted_documents=sum(s.info.datastore.deleted_documents for s in self.shards)))
        if first.HasField("dense"):
            m.dense.CopyFrom(first.dense)
            m.dense.ntotal = sum(s.info.dense.ntotal for s in self.shards)
            factories = {s.info.dense.factory for s in self.shards}
            m.dense.factory = factories.pop() if len(factories) == 1 else "mixed"
        if first.HasField("ngram"):
            m.ngram.CopyFrom(pb.NgramInfo(num_tokens=sum(s.info.ngram.num_tokens for s in self.shards),
                                          shards=sum(s.info.ngram.shards for s in self.shards), engine=first.ngram.engine))
        m.shards.extend(pb.ShardInfo(target=s.target, first_doc_id=s.first_doc, num_documents=s.num_docs,
                                     first_chunk_id=s.first_chunk, num_chunks=s.num_chunks) for s in self.shards)
        return m

    # -- fan-out -------------------------------------------------------------------------

    def _fan_out(self, method: str, requests: dict[int, object], context) -> tuple[dict[int, object], list[str]]:
        """Call ``method`` on each shard i in ``requests`` concurrently; their answers and the
        shards missing from them (only with ``partial``; otherwise a failure raises)."""
        timeout = self.cfg.shard_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        calls = {i: getattr(self.shards[i].stub, method).future(req, timeout=timeout, metadata=self._metadata)
                 for i, req in requests.items()}
        answers: dict[int, object] = {}
        failed: list[tuple[int, grpc.RpcError]] = []
        for i, call in calls.items():
            try:
                answers[i] = call.result()
            except grpc.RpcError as exc:
                failed.append((i, exc))
        for i, exc in failed:
            if exc.code() in QUERY_CODES:  # the query's fault, not the shard's
                raise ServiceError(exc.code(), exc.details() or "")
        if failed and (not self.cfg.partial or not answers):
            names = "; ".join(f"shard {i} ({self.shards[i].target}): {exc.code().name}: {exc.details()}" for i, exc in failed)
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= timeout and all(
                e.code() == grpc.StatusCode.DEADLINE_EXCEEDED for _, e in failed) else grpc.StatusCode.UNAVAILABLE
            raise ServiceError(code, f"{len(failed)} of {len(requests)} shards failed: {names}")
        missing = [self.shards[i].target for i, _ in failed]
        if missing:
            logger.warning("%s: answering without shards %s", method, missing)
        return answers, missing

    def _all(self, method: str, request, context):
        return self._fan_out(method, {i: request for i in range(len(self.shards))}, context)

    def _need(self, what: str) -> None:
        if not self._info.HasField(what):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"the shards serve no {what} index")

    # -- info ----------------------------------------------------------------------------

    @rpc
    def Info(self, request, context):
        return self._info

    # -- dense ---------------------------------------------------------------------------

    def _search(self, req: pb.SearchRequest, context, prefix: str = "",
                streaming: bool = False) -> tuple[list[pb.QueryResult], list[str]]:
        self._need("dense")
        n = check_search_request(req, self.limits, self._info.dense.ntotal, prefix, self.size, streaming=streaming)
        for i, q in enumerate(req.queries):
            e = np.asarray(q.exclude_doc_ids, dtype=np.int64)
            bad = (e < 0) | (e >= self.num_docs)
            if bad.any():
                raise ServiceError(grpc.StatusCode.OUT_OF_RANGE, f"`{prefix}queries[{i}].exclude_doc_ids` holds doc_id "
                                                                 f"{int(e[bad][0])}, outside 0..{self.num_docs - 1}")
        requests = {}
        for si, s in enumerate(self.shards):
            sub = pb.SearchRequest()
            sub.CopyFrom(req)
            sub.k = min(req.k, int(s.info.dense.ntotal))
            for q in sub.queries:  # each shard excludes its own documents, in its own numbering
                local = [d - s.first_doc for d in q.exclude_doc_ids if s.first_doc <= d < s.first_doc + s.num_docs]
                del q.exclude_doc_ids[:]
                q.exclude_doc_ids.extend(local)
            requests[si] = sub
        answers, missing = self._fan_out("Search", requests, context)
        results = []
        for qi in range(n):
            hits = []  # (-score, shard, rank, global id, chunk message)
            for si, resp in answers.items():
                s = self.shards[si]
                r = resp.results[qi]
                for j, (cid, score) in enumerate(zip(r.chunk_ids, r.scores)):
                    chunk = r.chunks[j] if len(r.chunks) else None
                    if chunk is not None:
                        shift_chunk(chunk, s.first_chunk, s.first_doc)
                    hits.append((-score, si, j, cid + s.first_chunk, chunk))
            hits.sort(key=lambda h: (h[0], h[1], h[2]))
            top = hits[:req.k]
            qr = pb.QueryResult(chunk_ids=[h[3] for h in top], scores=[-h[0] for h in top])
            qr.chunks.extend(h[4] for h in top if h[4] is not None)
            results.append(qr)
        return results, missing

    @rpc
    def Search(self, request, context):
        results, missing = self._search(request, context)
        return check_answer(pb.SearchResponse(results=results, missing_shards=missing), self.limits.max_message_bytes,
                            f"{len(request.queries):,} queries x {request.k:,} hits", SEARCH_ADVICE)

    def stream_answer(self, r: int, req: pb.SearchRequest, context) -> tuple[list[pb.QueryResult], list[str]]:
        """The results of SearchStream's request ``r`` and the shards missing from them."""
        budget = message_budget(self.limits.max_message_bytes)
        prefix = f"requests[{r}]."
        self._need("dense")
        n = check_search_request(req, self.limits, self._info.dense.ntotal, prefix, self.size, streaming=True)
        # each shard answers a unary Search: ask in slices that fit in one of its messages
        step = max(1, int(budget // self.size.query(req.k, fetch_flags(req.fetch if req.HasField("fetch") else None))))
        if n <= step:
            return self._search(req, context, prefix, streaming=True)
        results, missing = [], set()
        for lo in range(0, n, step):
            sub = pb.SearchRequest()
            sub.CopyFrom(req)
            del sub.queries[:]
            sub.queries.extend(req.queries[lo:lo + step])
            got, miss = self._search(sub, context, prefix, streaming=True)
            results.extend(got)
            missing.update(miss)
        return results, sorted(missing)

    def SearchStream(self, request_iterator, context):
        yield from stream_search(request_iterator, context, lambda r, req: self.stream_answer(r, req, context),
                                 self.limits.max_message_bytes, self.metrics)

    # -- chunks --------------------------------------------------------------------------

    @rpc
    def GetChunks(self, request, context):
        self._need("datastore")
        ids = check_chunk_ids(request.chunk_ids, self.limits, self.num_chunks, self.size,
                              fetch_flags(request.fetch if request.HasField("fetch") else None, default_all=True))
        owner = np.searchsorted(self._chunk_starts, ids, side="right") - 1
        gap = ids >= self._chunk_ends[owner]
        if gap.any():  # between declared shard ranges: no shard holds them
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"no shard holds chunk ids {ids[gap][:10].tolist()} (they fall "
                               "between the deployment's shard ranges)")
        requests = {}
        for si in np.unique(owner).tolist():
            sub = pb.GetChunksRequest(chunk_ids=(ids[owner == si] - self.shards[si].first_chunk).tolist())
            if request.HasField("fetch"):
                sub.fetch.CopyFrom(request.fetch)
            requests[si] = sub
        answers, missing = self._fan_out("GetChunks", requests, context)
        if missing:  # a chunk cannot be half-returned: missing chunks fail the call
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"shards holding some of the chunks failed: {missing}")
        out = pb.GetChunksResponse()
        taken = {si: 0 for si in answers}
        for si in owner.tolist():
            c = answers[si].chunks[taken[si]]
            taken[si] += 1
            shift_chunk(c, self.shards[si].first_chunk, self.shards[si].first_doc)
            out.chunks.append(c)
        return out

    # -- n-gram --------------------------------------------------------------------------

    @rpc
    def Count(self, request, context):
        self._need("ngram")
        answers, missing = self._all("Count", request, context)
        first = next(iter(answers.values()))
        return pb.CountResponse(count=sum(a.count for a in answers.values()), approx=any(a.approx for a in answers.values()),
                                token_ids=first.token_ids, missing_shards=missing)

    @rpc
    def NextTokens(self, request, context):
        """Per context, the longest suffix any shard matched with a continuation: the shards that matched
        that length contribute (counts, reads and continuation counts summed); a shard whose longest match
        is shorter holds no occurrence of it."""
        self._need("ngram")
        answers, missing = self._all("NextTokens", request, context)
        out = pb.NextTokensResponse()
        for i in range(len(request.contexts)):
            rows = [a.results[i] for a in answers.values()]
            n = max(r.suffix_len for r in rows)
            merged = pb.ContextContinuations(suffix_len=n)
            if n:
                seqs: dict[tuple[int, ...], int] = {}
                for r in rows:
                    if r.suffix_len == n:
                        merged.count += r.count
                        merged.read += r.read
                        merged.approx = merged.approx or r.approx
                        for c in r.continuations:
                            seqs[tuple(c.ids)] = seqs.get(tuple(c.ids), 0) + int(c.count)
                merged.continuations.extend(pb.Continuation(ids=list(k), count=v)
                                            for k, v in sorted(seqs.items(), key=lambda kv: (-kv[1], kv[0])))
            out.results.append(merged)
        if missing:  # a context's answer cannot be half a datastore's: missing shards fail the call
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"shards failed: {missing}")
        return out

    @rpc
    def CountBatch(self, request, context):
        self._need("ngram")
        answers, missing = self._all("CountBatch", request, context)
        counts = np.sum([np.asarray(a.counts, dtype=np.int64) for a in answers.values()], axis=0)
        approx = np.any([np.asarray(a.approx, dtype=bool) for a in answers.values()], axis=0)
        return pb.CountBatchResponse(counts=counts.tolist(), approx=approx.tolist(), missing_shards=missing)

    @rpc
    def Prob(self, request, context):
        self._need("ngram")
        answers, missing = self._all("Prob", request, context)
        pc = sum(a.prompt_count for a in answers.values())
        cc = sum(a.cont_count for a in answers.values())
        m = pb.ProbResponse(prompt_count=pc, cont_count=cc, missing_shards=missing)
        if pc > 0:
            m.prob = cc / pc
        return m

    @staticmethod
    def _longest(answers: dict) -> list:
        # the longest suffix that occurs anywhere; shards where it does not occur matched shorter ones
        longest = max(a.suffix_len for a in answers.values())
        return [a for a in answers.values() if a.suffix_len == longest]

    @rpc
    def InfgramProb(self, request, context):
        self._need("ngram")
        answers, missing = self._all("InfgramProb", request, context)
        best = self._longest(answers)
        pc = sum(a.prompt_count for a in best)
        cc = sum(a.cont_count for a in best)
        return pb.ProbResponse(prompt_count=pc, cont_count=cc, prob=cc / pc if pc else 0.0, suffix_len=best[0].suffix_len,
                               missing_shards=missing)

    def _dist(self, method: str, request: pb.NgramRequest, context, infgram: bool) -> pb.DistributionResponse:
        self._need("ngram")
        sub = pb.NgramRequest()
        sub.CopyFrom(request)
        sub.top_k = 0  # every token from every shard: a merged top-k needs them all
        answers, missing = self._all(method, sub, context)
        parts = self._longest(answers) if infgram else list(answers.values())
        pc = sum(a.prompt_count for a in parts)
        counts: dict[int, int] = {}
        texts: dict[int, str] = {}
        for a in parts:
            for t in a.tokens:
                counts[t.token_id] = counts.get(t.token_id, 0) + t.count
                texts[t.token_id] = t.text
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if request.top_k:
            items = items[:request.top_k]
        m = pb.DistributionResponse(prompt_count=pc, approx=any(a.approx for a in parts), missing_shards=missing)
        m.tokens.extend(pb.TokenCount(token_id=t, count=c, prob=c / pc if pc else 0.0, text=texts[t]) for t, c in items)
        if infgram:
            m.suffix_len = parts[0].suffix_len
        return m

    @rpc
    def NextTokenDistribution(self, request, context):
        return self._dist("NextTokenDistribution", request, context, infgram=False)

    @rpc
    def InfgramNextTokenDistribution(self, request, context):
        return self._dist("InfgramNextTokenDistribution", request, context, infgram=True)

    def _shifted(self, answers: dict, field: str, limit: int):
        """Occurrences (and their chunks) of every shard in shard order, renumbered, at most ``limit``."""
        occ, chunks = [], []
        for si in sorted(answers):
            s = self.shards[si]
            a = answers[si]
            for j, o in enumerate(getattr(a, field)):
                if len(occ) >= limit:
                    break
                o.doc_id += s.first_doc
                o.chunk_id += s.first_chunk
                occ.append(o)
                if len(a.chunks):
                    c = a.chunks[j]
                    shift_chunk(c, s.first_chunk, s.first_doc)
                    chunks.append(c)
        return occ, chunks

    @rpc
    def Find(self, request, context):
        self._need("ngram")
        answers, missing = self._all("Find", request, context)
        occ, chunks = self._shifted(answers, "occurrences", request.limit or 10)
        return pb.FindResponse(count=sum(a.count for a in answers.values()), occurrences=occ, chunks=chunks,
                               missing_shards=missing)

    @rpc
    def SearchDocuments(self, request, context):
        self._need("ngram")
        answers, missing = self._all("SearchDocuments", request, context)
        hits, chunks = self._shifted(answers, "hits", request.max_hits or 10)
        return pb.SearchDocumentsResponse(count=sum(a.count for a in answers.values()),
                                          approx=any(a.approx for a in answers.values()), hits=hits,
                                          doc_ids=sorted({h.doc_id for h in hits}), chunks=chunks, missing_shards=missing)
