"""Reliability suite (issue 15): every fault family on one small real store, tallied in one table.

Builds (once, cached under ``--work``) a store from a slice of the shared python-docs corpus
(about 120 KB of text, GPT-2 tokens, 3 datastore shards): datastore, MiniLM embeddings, an HNSW32
dense index, a 2-shard n-gram index, a compact FM-index (each with the CLI, timed: these are the
uninterrupted reference builds) and a neighbour table. Then it runs these fault families:

1. ``requests``: malformed requests of every RPC of ``service/v1/retrieval.proto`` (wrong message
   types and garbage bytes, empty, out-of-range, oversized fields, unknown ids) against a real
   `retromem serve` on loopback: the right status code and a message naming the field, and the
   server still answers Health and a good Search after each;
2. ``auth``: probes (no token, wrong tokens, look-alike metadata keys, the token in another header)
   against a server started with a token, on every RPC kind: none gets in (UNAUTHENTICATED);
3. ``overload``: silent streams with Health and Search beside them, a burst of unary calls,
   knobs past their caps and the fetch-everything Search (``benchmarks/service_bounds.py``'s cases);
4. ``sigterm``: SIGTERM during a silent stream and during a long call: exit within grace + 1 s;
5. ``kill``: ``kill -9`` at random points of each batch job (datastore build, embed, dense build,
   n-gram build, FM-index build; a point is a number of files in its output, temporaries and
   ``_work/`` included), then a re-run: its recorded checksums (every file's sha256) must equal the
   uninterrupted build's;
6. ``corruption``: every artifact file type damaged three ways (``tests/trust/harness.py``);
7. ``disk``: the datastore and n-gram builds under a file size limit (RLIMIT_FSIZE, SIGXFSZ
   ignored): one ``error:`` line, exit 2, no finished manifest; the re-run equals the reference;
8. ``writers``: a second job on the output of one that holds its lock (the first paused with
   SIGSTOP while the second runs): refused with a clear error; the first then finishes intact.

Each case ends as ``survived`` (a clear error, or an answer verified correct), ``crash`` (segfault,
traceback, INTERNAL status, a dead or hung server), ``wrong`` (a silent wrong answer: a bad request
answered OK, an intruder let in), ``lost`` (a finished artifact that no longer opens, a killed job
whose re-run does not give the same bytes) or ``unclear`` (an error, but another status code than
the right one or a message that does not name the field). Prints the table, writes
``results.json`` under ``--work``.

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/reliability.py --work /work/scratch/reliab/work --quick
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FAMILIES = ("requests", "auth", "overload", "sigterm", "kill", "corruption", "disk", "writers")
OUTCOMES = ("survived", "crash", "wrong", "lost", "unclear")
SLICE_BYTES = 120_000
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


@dataclass
class Case:
    family: str
    name: str
    outcome: str  # one of OUTCOMES
    detail: str = ""
    seconds: float = 0.0


# -- the store: reference builds with the CLI ------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retromem.cli", "-q", *args]


def job_commands(work: Path) -> dict[str, Callable[[Path], list[str]]]:
    """Each batch job as a CLI command writing to a given output; inputs are the reference store."""
    ref = work / "ref"
    return {
        "datastore build": lambda out: _cli("datastore", "build", str(work / "slice.jsonl"), "-o", str(out),
                                            "--tokenizer", "gpt2", "--shard-size", "40KB", "--workers", "1"),
        "embed": lambda out: _cli("index", "dense", "embed", str(ref / "ds"), "-o", str(out), "--batch-size", "64",
                                  "--device", "cpu"),
        "dense build": lambda out: _cli("index", "dense", "build", str(ref / "emb"), "-o", str(out), "--factory", "HNSW32",
                                        "--shard-vectors", "200", "--no-tune"),
        "n-gram build": lambda out: _cli("index", "ngram", "build", str(ref / "ds"), "-o", str(out), "--shard-tokens", "15K",
                                         "--cpus", "1"),
        "FM-index build": lambda out: _cli("index", "fm", "build", str(ref / "ds"), "-o", str(out), "--sample-rate", "8"),
    }


JOB_DIRS = {"datastore build": "ds", "embed": "emb", "dense build": "dense", "n-gram build": "ngram", "FM-index build": "fm"}


def write_slice(work: Path) -> Path:
    """The first python-docs documents, about SLICE_BYTES of text."""
    out = work / "slice.jsonl"
    if out.is_file():
        return out
    src = REPO.parent / "shared" / "corpora" / "python-docs.jsonl.gz"
    n, lines = 0, []
    with gzip.open(src, "rt") as f:
        for line in f:
            lines.append(line)
            n += len(json.loads(line)["text"].encode())
            if n >= SLICE_BYTES:
                break
    out.write_text("".join(lines))
    return out


def build_store(work: Path) -> dict[str, float]:
    """The reference builds, timed (cached: a re-run reads ``ref/timings.json``)."""
    ref = work / "ref"
    timings_file = ref / "timings.json"
    if timings_file.is_file():
        return json.loads(timings_file.read_text())
    ref.mkdir(parents=True, exist_ok=True)
    write_slice(work)
    timings = {}
    for job, cmd in job_commands(work).items():
        out = ref / JOB_DIRS[job]
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd(out), capture_output=True, text=True, env=ENV)
        timings[job] = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"the reference {job} failed:\n{r.stderr[-3000:]}")
        print(f"reference {job}: {timings[job]:.1f} s", flush=True)
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    compute_neighbours(NeighboursConfig(datastore=str(ref / "ds"), out=str(ref / "nbrs"), index=str(ref / "dense"), k=2,
                                        eval_fraction=0.1, shard_chunks=200), progress=False)
    timings_file.write_text(json.dumps(timings, indent=1))
    return timings


def recorded(path: Path) -> dict[str, Any] | None:
    """The artifact's recorded files (size and sha256 of each: no timing fields), or None when it
    does not open as a finished artifact."""
    from retromem.datastore.integrity import MANIFESTS, artifact_kind, read_manifest, recorded_files

    try:
        return recorded_files(read_manifest(path / MANIFESTS[artifact_kind(path)]))
    except Exception:  # noqa: BLE001  not finished, or not an artifact
        return None


def same_as_reference(out: Path, ref: Path) -> str:
    """'' when ``out`` records the same files with the same checksums as ``ref`` and verifies;
    else what differs."""
    from retromem.datastore.integrity import verify_artifact

    a, b = recorded(out), recorded(ref)
    if a is None:
        return "the re-run left no finished artifact"
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return f"{len(diff)} files differ from the uninterrupted build: {diff[:5]}"
    problems = verify_artifact(out).problems
    return f"verify: {problems[:3]}" if problems else ""


def _error_lines(stderr: str) -> list[str]:
    return [part for line in stderr.splitlines() for part in line.split("\r") if "error:" in part]


# -- 1-4: the service --------------------------------------------------------------------------------


def _server(ref: Path, extra: list[str]):
    from service_bounds import Server

    return Server(ref / "ds", ref / "dense", ["--ngram", str(ref / "ngram"), *extra])


def _status(fn: Callable[[], Any], timeout_hint: str = "") -> tuple[str, str]:
    import grpc

    try:
        fn()
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


def _still_serving(srv, stub, health) -> str:
    """'' when the server process lives and answers Health and a good text Search."""
    from grpc_health.v1 import health_pb2

    from retromem.service.v1 import retrieval_pb2 as pb

    if srv.proc.poll() is not None:
        return f"the server exited ({srv.proc.returncode})"
    code, msg = _status(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10))
    if code != "OK":
        return f"Health: {code} {msg[:100]}"
    code, msg = _status(lambda: stub.Search(pb.SearchRequest(queries=[pb.Query(text=b"sort a list")], k=3), timeout=30))
    return "" if code == "OK" else f"Search: {code} {msg[:100]}"


def malformed_cases(info, lib) -> list[tuple[str, str, Any, str, Any]]:
    """(rpc, case, request, expected status, text the message must hold) for every RPC. ``request``
    is a message, or raw bytes (wrong message type, garbage) sent with no serializer. Expected
    status ``OK``: the request is valid after all (an empty n-gram prompt is the unigram
    distribution), and the last item checks the answer against ``lib`` (the n-gram index in
    process): '' when it agrees. ``PARSE``: bytes of another message type, which the server must
    refuse or, where they happen to parse as a valid request of this type, answer as that request."""
    from retromem.service.v1 import retrieval_pb2 as pb

    L = info.limits
    n, V = info.datastore.num_chunks, info.datastore.vocab_size
    dim = info.dense.dim
    I, O, N, R = "INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND", "RESOURCE_EXHAUSTED"
    t = lambda s: pb.NgramQuery(text=s)  # noqa: E731
    ids = lambda *x: pb.NgramQuery(ids=pb.TokenIds(ids=list(x)))  # noqa: E731
    q = pb.Query(text=b"sort a list")
    vec = lambda v: pb.Query(vector=pb.Vector(values=v))  # noqa: E731
    big = b"x" * (L.max_message_bytes + 1024)
    k_all = min(L.max_k, info.dense.ntotal)

    def unigram(infgram: bool) -> Callable[[Any], str]:
        def check(resp) -> str:
            d = (lib.infgram_next_token_distribution if infgram else lib.next_token_distribution)([])
            got = (resp.prompt_count, {t.token_id: t.count for t in resp.tokens})
            return "" if got == (d.prompt_count, {t: c.count for t, c in d.tokens.items()}) else \
                f"not the unigram distribution: prompt_count {resp.prompt_count} != {d.prompt_count}"
        return check

    garbage = bytes([0xFF] * 64)
    cases: list[tuple[str, str, Any, str, str]] = [
        ("Info", "garbage bytes", garbage, "", ""),  # an empty request has no fields to get wrong
        ("Search", "empty request", pb.SearchRequest(), I, "queries"),
        ("Search", "k = 0", pb.SearchRequest(queries=[q], k=0), I, "`k`"),
        ("Search", "k past max_k", pb.SearchRequest(queries=[q], k=L.max_k + 1), O, "`k`"),
        ("Search", "empty text", pb.SearchRequest(queries=[pb.Query(text=b"")], k=3), I, "queries[0]"),
        ("Search", "invalid UTF-8", pb.SearchRequest(queries=[pb.Query(text=b"\xff\xfe")], k=3), I, "queries[0].text"),
        ("Search", "query neither text nor vector", pb.SearchRequest(queries=[pb.Query()], k=3), I, "queries[0]"),
        ("Search", "vector of the wrong dimension", pb.SearchRequest(queries=[vec([1.0] * 3)], k=3), I, "queries[0].vector"),
        ("Search", "NaN vector", pb.SearchRequest(queries=[vec([float("nan")] * dim)], k=3), I, "queries[0].vector"),
        ("Search", "infinite vector", pb.SearchRequest(queries=[vec([float("inf")] * dim)], k=3), I, "queries[0].vector"),
        ("Search", "text past max_query_bytes", pb.SearchRequest(queries=[pb.Query(text=b"a " * L.max_query_bytes)], k=3), I,
         "max_query_bytes"),
        ("Search", "batch past max_batch", pb.SearchRequest(queries=[q] * (L.max_batch + 1), k=1), I, "max_batch"),
        ("Search", "nprobe past max_nprobe", pb.SearchRequest(queries=[q], k=3, nprobe=L.max_nprobe + 1), O, "nprobe"),
        ("Search", "ef_search 2^32-1", pb.SearchRequest(queries=[q], k=3, ef_search=2**32 - 1), O, "ef_search"),
        ("Search", "unknown exclude_doc_ids", pb.SearchRequest(queries=[pb.Query(text=b"a", exclude_doc_ids=[10**12])], k=3),
         O, "exclude_doc_ids"),
        ("Search", "negative exclude_doc_ids", pb.SearchRequest(queries=[pb.Query(text=b"a", exclude_doc_ids=[-5])], k=3),
         O, "exclude_doc_ids"),
        ("Search", "exclude list past its cap",
         pb.SearchRequest(queries=[pb.Query(text=b"a", exclude_doc_ids=[0] * (L.max_exclude_doc_ids + 1))], k=3), I,
         "exclude_doc_ids"),
        ("Search", "message past max_message_bytes", pb.SearchRequest(queries=[pb.Query(text=big)], k=1), R, ""),
        ("Search", "answer too large (fetch all)",
         pb.SearchRequest(queries=[q] * L.max_batch, k=k_all, fetch=pb.Fetch(text=True, tokens=True, continuation=True)), R,
         "SearchStream"),
        ("Search", "wrong message type (a GetChunksRequest)", pb.GetChunksRequest(chunk_ids=[1, 2]).SerializeToString(),
         "PARSE", "queries"),
        ("Search", "garbage bytes", garbage, "", ""),
        ("SearchStream", "one empty message", [pb.SearchRequest()], I, "queries"),
        ("SearchStream", "k past max_k in message 2", [pb.SearchRequest(queries=[q], k=3),
                                                       pb.SearchRequest(queries=[q], k=L.max_k + 1)], O,
         "requests[1].k`"),
        ("SearchStream", "NaN vector", [pb.SearchRequest(queries=[vec([float("nan")] * dim)], k=3)], I, "queries[0].vector"),
        ("GetChunks", "empty request", pb.GetChunksRequest(), I, "chunk_ids"),
        ("GetChunks", "unknown id (= num_chunks)", pb.GetChunksRequest(chunk_ids=[0, n]), N, "chunk_ids[1]"),
        ("GetChunks", "negative id", pb.GetChunksRequest(chunk_ids=[-1]), N, "chunk_ids[0]"),
        ("GetChunks", "id 2^63-1", pb.GetChunksRequest(chunk_ids=[2**63 - 1]), N, "chunk_ids[0]"),
        ("GetChunks", "ids past max_chunks", pb.GetChunksRequest(chunk_ids=[0] * (L.max_chunks + 1)), I, "max_chunks"),
        ("GetChunks", "wrong message type (a SearchRequest)", pb.SearchRequest(queries=[q], k=3).SerializeToString(),
         "PARSE", "chunk_ids"),
    ]
    for verb in ("Count", "NextTokenDistribution", "InfgramNextTokenDistribution"):
        empty = (I, "`query`") if verb == "Count" else ("OK", unigram(verb.startswith("Infgram")))
        cases += [
            (verb, "empty request", pb.NgramRequest(), *empty),
            (verb, "empty text", pb.NgramRequest(query=t(b"")), *(empty if verb != "Count" else (I, "query.text"))),
            (verb, "invalid UTF-8", pb.NgramRequest(query=t(b"\xc3\x28")), I, "query.text"),
            (verb, "token id past the vocabulary", pb.NgramRequest(query=ids(1, V)), O, str(V)),
            (verb, "token id 2^32-1", pb.NgramRequest(query=ids(2**32 - 1)), O, "vocabulary"),
            (verb, "query past max_query_tokens", pb.NgramRequest(query=ids(*([1] * (L.max_query_tokens + 1)))), I,
             "max_query_tokens"),
            (verb, "garbage bytes", garbage, "", ""),
        ]
    for verb in ("Prob", "InfgramProb"):
        cases += [
            (verb, "empty request", pb.ProbRequest(), I, "next_token"),
            (verb, "next token of two tokens", pb.ProbRequest(prompt=t(b" the"), next_token=pb.Token(text=b" two tokens")), I,
             "next_token.text"),
            (verb, "next token id past the vocabulary", pb.ProbRequest(prompt=t(b" the"), next_token=pb.Token(id=V + 5)), O,
             "next_token.id"),
            (verb, "prompt token past the vocabulary", pb.ProbRequest(prompt=ids(V), next_token=pb.Token(id=1)), O, str(V)),
            (verb, "invalid UTF-8 prompt", pb.ProbRequest(prompt=t(b"\xff"), next_token=pb.Token(id=1)), I, "prompt.text"),
            (verb, "wrong message type (an NgramRequest)", pb.NgramRequest(query=t(b" the")).SerializeToString(), "PARSE",
             "next_token"),
        ]
    cases += [
        ("Find", "empty request", pb.FindRequest(), I, "`query`"),
        ("Find", "limit past max_find_limit", pb.FindRequest(query=t(b" the"), limit=L.max_find_limit + 1), O, "`limit`"),
        ("Find", "token id past the vocabulary", pb.FindRequest(query=ids(V)), O, str(V)),
        ("Find", "invalid UTF-8", pb.FindRequest(query=t(b"\xc3\x28")), I, "query.text"),
        ("Find", "garbage bytes", garbage, "", ""),
        ("SearchDocuments", "empty request", pb.SearchDocumentsRequest(), I, "clauses"),
        ("SearchDocuments", "clauses past max_clauses",
         pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[t(b" a")])] * (L.max_clauses + 1)), I, "max_clauses"),
        ("SearchDocuments", "terms past max_terms_per_clause",
         pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[t(b" a")] * (L.max_terms_per_clause + 1))]), I, "clauses[0].terms"),
        ("SearchDocuments", "an empty clause", pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[t(b" a")]), pb.Clause()]), I,
         "clauses[1].terms"),
        ("SearchDocuments", "max_diff_tokens past its cap",
         pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[t(b" a")])], max_diff_tokens=L.max_diff_tokens + 1), O,
         "max_diff_tokens"),
        ("SearchDocuments", "max_hits past max_find_limit",
         pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[t(b" a")])], max_hits=L.max_find_limit + 1), O, "max_hits"),
        ("SearchDocuments", "token id past the vocabulary",
         pb.SearchDocumentsRequest(clauses=[pb.Clause(terms=[ids(V)])]), O, str(V)),
    ]
    return cases


RESPONSES = {"Info": "InfoResponse", "Search": "SearchResponse", "SearchStream": "SearchResponse",
             "GetChunks": "GetChunksResponse", "Count": "CountResponse", "Prob": "ProbResponse",
             "NextTokenDistribution": "DistributionResponse", "InfgramProb": "ProbResponse",
             "InfgramNextTokenDistribution": "DistributionResponse", "Find": "FindResponse",
             "SearchDocuments": "SearchDocumentsResponse"}


def _request_of(rpc: str) -> Any:
    from retromem.service.v1 import retrieval_pb2 as pb

    return {"Info": pb.InfoRequest, "Search": pb.SearchRequest, "SearchStream": pb.SearchRequest,
            "GetChunks": pb.GetChunksRequest, "Count": pb.NgramRequest, "Prob": pb.ProbRequest,
            "NextTokenDistribution": pb.NgramRequest, "InfgramProb": pb.ProbRequest,
            "InfgramNextTokenDistribution": pb.NgramRequest, "Find": pb.FindRequest,
            "SearchDocuments": pb.SearchDocumentsRequest}[rpc]()


def _send(ch, rpc: str, request: Any, timeout: float, metadata=None) -> Any:
    """One call of ``rpc`` with a message, raw bytes or (SearchStream) a list of messages."""
    from retromem.service.v1 import retrieval_pb2 as pb

    path = f"/retromem.v1.Retrieval/{rpc}"
    decode = getattr(pb, RESPONSES[rpc]).FromString
    encode = (lambda b: b) if isinstance(request, bytes) else (lambda m: m.SerializeToString())
    if rpc == "SearchStream":
        call = ch.stream_stream(path, request_serializer=encode, response_deserializer=decode)
        return list(call(iter(request if isinstance(request, list) else [request]), timeout=timeout, metadata=metadata))
    return ch.unary_unary(path, request_serializer=encode, response_deserializer=decode)(request, timeout=timeout,
                                                                                          metadata=metadata)


def family_requests(ref: Path) -> list[Case]:
    from grpc_health.v1 import health_pb2_grpc
    from service_bounds import _stub

    from retromem.service.v1 import retrieval_pb2 as pb

    srv = _server(ref, [])
    out = []
    try:
        ch, stub = _stub(srv.target)
        health = health_pb2_grpc.HealthStub(ch)
        info = stub.Info(pb.InfoRequest(), timeout=30)
        from retromem.datastore import Datastore
        from retromem.index.ngram import NgramIndex

        lib = NgramIndex(ref / "ngram", Datastore.open(ref / "ds"))
        for rpc, name, req, want, text in malformed_cases(info, lib):
            t0 = time.perf_counter()
            answer: list = []
            code, msg = _status(lambda: answer.append(_send(ch, rpc, req, 60)))
            s = time.perf_counter() - t0
            after = _still_serving(srv, stub, health)
            detail = f"{code}: {msg[:200]}"
            if after:
                outcome, detail = "crash", f"{detail}; then {after}"
            elif code == "INTERNAL" and "deserializ" in msg.lower() and want in ("", "PARSE"):
                # bytes that do not parse: gRPC answers before the servicer sees them, with INTERNAL
                # where INVALID_ARGUMENT is the right code (the server survives; counted as unclear)
                outcome = "unclear"
            elif code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE"):
                outcome = "crash"
            elif code == "OK" and want == "OK":
                wrong = text(answer[0])
                outcome, detail = ("wrong", wrong) if wrong else ("survived", "OK, verified against the library")
            elif code == "OK" and want == "PARSE":
                # the bytes parse as this RPC's request: the answer must be that request's answer
                typed = getattr(pb, type(_request_of(rpc)).__name__).FromString(req)
                again = _send(ch, rpc, typed, 60)
                same = again.SerializeToString() == answer[0].SerializeToString()
                outcome = "survived" if same else "wrong"
                detail = f"OK: the bytes parse as {typed.__class__.__name__}({str(typed)[:80]!r}), answered as such" \
                    if same else "OK, and not the answer of the request the bytes parse as"
            elif code == "OK":
                outcome = "wrong"
            elif want == "" or (code == ("INVALID_ARGUMENT" if want == "PARSE" else want) and text in msg) \
                    or (want == "PARSE" and code == "INVALID_ARGUMENT" and "not a valid" in msg):
                # (bytes that do not parse as this RPC's request: refused naming the message type)
                outcome = "survived"
            else:
                outcome = "unclear"
                detail = f"wanted {want} naming {text!r}; got {detail}"
            out.append(Case("requests", f"{rpc}: {name}", outcome, detail, s))
        ch.close()
    finally:
        srv.close()
    return out


def family_auth(ref: Path, work: Path) -> list[Case]:
    import grpc
    from service_bounds import _stub

    from retromem.service.v1 import retrieval_pb2 as pb

    token = "s3cret-Token_42"
    (work / "token").write_text(token + "\n")
    os.chmod(work / "token", 0o600)
    srv = _server(ref, ["--token-file", str(work / "token")])
    B = f"Bearer {token}"
    probes = {
        "no metadata": [],
        "wrong token": [("authorization", "Bearer wrong")],
        "empty bearer": [("authorization", "Bearer ")],
        "empty value": [("authorization", "")],
        "token without scheme": [("authorization", token)],
        "Basic scheme": [("authorization", f"Basic {token}")],
        "token prefix": [("authorization", f"Bearer {token[:-1]}")],
        "token plus a character": [("authorization", f"Bearer {token}x")],
        "token in other case": [("authorization", f"Bearer {token.upper()}")],
        "wrong token then right one": [("authorization", "Bearer wrong"), ("authorization", B)],
        "look-alike key x-authorization": [("x-authorization", B)],
        "look-alike key authorisation": [("authorisation", B)],
        "look-alike key authorization-bin": [("authorization-bin", B.encode())],
        "look-alike key proxy-authorization": [("proxy-authorization", B)],
        "look-alike key grpc-authorization": [("grpc-authorization", B)],
        "token in x-api-key": [("x-api-key", token)],
        "token in cookie": [("cookie", f"token={token}")],
        "token in token": [("token", token)],
    }
    requests = {"Info": pb.InfoRequest(), "Search": pb.SearchRequest(queries=[pb.Query(text=b"sort")], k=3),
                "SearchStream": [pb.SearchRequest(queries=[pb.Query(text=b"sort")], k=3)],
                "GetChunks": pb.GetChunksRequest(chunk_ids=[0]), "Count": pb.NgramRequest(query=pb.NgramQuery(text=b" the")),
                "Find": pb.FindRequest(query=pb.NgramQuery(text=b" the"))}
    out = []
    try:
        ch, _ = _stub(srv.target)
        for name, md in probes.items():
            for rpc, req in requests.items():
                t0 = time.perf_counter()
                try:
                    code, msg = _status(lambda: _send(ch, rpc, req, 30, metadata=md or None))
                except (ValueError, grpc.RpcError) as exc:  # metadata the client library refuses to send
                    code, msg = "client refused", str(exc)[:100]
                s = time.perf_counter() - t0
                if code in ("UNAUTHENTICATED", "client refused"):
                    outcome = "survived"
                elif code == "OK":
                    outcome = "wrong"
                else:
                    outcome = "crash" if code in ("INTERNAL", "UNKNOWN", "UNAVAILABLE") else "unclear"
                out.append(Case("auth", f"{name} -> {rpc}", outcome, f"{code}: {msg[:120]}", s))
        # the control: the right token gets in (else "none gets in" proves nothing)
        for rpc, req in requests.items():
            code, msg = _status(lambda: _send(ch, rpc, req, 30, metadata=[("authorization", B)]))
            out.append(Case("auth", f"control: right token -> {rpc}", "survived" if code == "OK" else "unclear",
                            f"{code}: {msg[:120]}"))
        if srv.proc.poll() is not None:
            out.append(Case("auth", "server alive after the probes", "crash", f"exit {srv.proc.returncode}"))
        ch.close()
    finally:
        srv.close()
    return out


def _unary_burst(srv, n: int = 48) -> list[Case]:
    """n concurrent fetching Searches on 2 workers, and a Health check (2 s deadline) amid them:
    every call OK or RESOURCE_EXHAUSTED, Health answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from service_bounds import _stub

    from retromem.service.v1 import retrieval_pb2 as pb

    ch, stub = _stub(srv.target)
    req = pb.SearchRequest(queries=[pb.Query(text=f"query {i}".encode()) for i in range(16)], k=50,
                           fetch=pb.Fetch(text=True, tokens=True))
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(_status, lambda: stub.Search(req, timeout=120)) for _ in range(n)]
        time.sleep(0.3)
        t0 = time.perf_counter()
        h = _status(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2))
        hs = time.perf_counter() - t0
        codes = [f.result()[0] for f in futs]
    ch.close()
    counts = {c: codes.count(c) for c in sorted(set(codes))}
    bad = {c: k for c, k in counts.items() if c not in ("OK", "RESOURCE_EXHAUSTED")}
    return [Case("overload", f"{n} concurrent fetching Searches (16 x k=50) on 2 workers",
                 "survived" if not bad else "crash" if set(bad) & {"INTERNAL", "UNKNOWN", "UNAVAILABLE"} else "unclear",
                 json.dumps(counts)),
            Case("overload", "Health during the burst (2 s deadline)", "survived" if h[0] == "OK" else "unclear",
                 f"{h[0]} in {hs:.2f} s", hs)]


def _ntotal(srv) -> int:
    """Vectors in the served index: the largest k a Search may ask of this store."""
    from service_bounds import _stub

    from retromem.service.v1 import retrieval_pb2 as pb

    ch, stub = _stub(srv.target)
    n = stub.Info(pb.InfoRequest(), timeout=30).dense.ntotal
    ch.close()
    return min(1000, n)


def family_overload(ref: Path) -> list[Case]:
    import service_bounds as sb

    out = []
    srv = _server(ref, ["--stream-idle", "3"])
    try:
        rows = sb.case_silent_streams(srv)
        for r in rows:
            name = r["case"]
            if "Health" in name or "Search" in name:
                ok = r["status"] == "OK"
            else:  # a silent stream must end, at its idle limit
                ok = r.get("status") == "DEADLINE_EXCEEDED"
            out.append(Case("overload", name, "survived" if ok else "unclear", json.dumps(r)[:200], r.get("seconds", 0)))
        out += _unary_burst(srv)
        for r in sb.case_ef_search(srv):
            want = "OK" if r["case"].startswith("then") else "OUT_OF_RANGE"
            out.append(Case("overload", r["case"], "survived" if r["status"] == want else
                            "crash" if r["status"] in ("INTERNAL", "UNKNOWN", "UNAVAILABLE") else "unclear",
                            f"{r['status']} in {r['seconds']} s, peak {r.get('peak_mb', '-')} MB", r["seconds"]))
        for r in sb.case_fetch_everything(srv, k=_ntotal(srv)):
            want = ("OK",) if r["case"].startswith("then") else ("RESOURCE_EXHAUSTED",)
            out.append(Case("overload", r["case"], "survived" if r["status"] in want and r["seconds"] < 10 else
                            "crash" if r["status"] in ("INTERNAL", "UNKNOWN", "UNAVAILABLE") else "unclear",
                            f"{r['status']} in {r['seconds']} s, peak {r.get('peak_mb', '-')} MB", r["seconds"]))
        if srv.proc.poll() is not None:
            out.append(Case("overload", "server alive after overload", "crash", f"exit {srv.proc.returncode}"))
    finally:
        srv.close()
    return out


def family_sigterm(ref: Path) -> list[Case]:
    import service_bounds as sb

    out = []
    grace = 5.0  # service_bounds.Server passes --grace 5
    for busy in (False, True):
        srv = _server(ref, [])
        try:
            for r in (sb.case_sigterm_busy(srv, k=_ntotal(srv)) if busy else sb.case_sigterm(srv)):
                m = re.match(r"exit (-?\d+)", r["status"])
                rc = int(m.group(1)) if m else None
                if rc is None or rc < 0:
                    outcome = "crash"
                else:
                    outcome = "survived" if rc == 0 and r["seconds"] <= grace + 1 else "unclear"
                out.append(Case("sigterm", r["case"], outcome, f"{r['status']} after {r['seconds']} s (grace {grace:g} s)",
                                r["seconds"]))
        finally:
            srv.close()
    return out


# -- 5, 7, 8: batch jobs -------------------------------------------------------------------------------


def _run_to_end(cmd: list[str], limit: int | None = None) -> subprocess.CompletedProcess:
    pre = None
    if limit:
        from tests.retromem.test_diskspace import _limited

        pre = _limited(limit)
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900, preexec_fn=pre)


def _rerun_case(family: str, name: str, cmd: list[str], out: Path, ref: Path, t0: float, note: str) -> Case:
    """Re-run the job to its end; compare with the reference."""
    r = _run_to_end(cmd)
    if r.returncode != 0:
        tb = "Traceback" in r.stderr or r.returncode < 0
        return Case(family, name, "crash" if tb else "lost", f"{note}; the re-run: exit {r.returncode}: "
                    f"{(_error_lines(r.stderr) or [r.stderr[-300:]])[-1][:300]}", time.perf_counter() - t0)
    diff = same_as_reference(out, ref)
    return Case(family, name, "lost" if diff else "survived", f"{note}; {diff or 'the re-run equals the uninterrupted build'}",
                time.perf_counter() - t0)


def _files(path: Path) -> int:
    """Files under ``path`` now (a job renames and deletes as it goes: what vanishes is skipped)."""
    return sum(len(files) for _, _, files in os.walk(path))


def _wait_for_lock(proc: subprocess.Popen, dest: Path) -> float:
    """Seconds until the job took the lock of its output (or ended)."""
    from retromem.datastore.job import LOCK

    t0 = time.perf_counter()
    while proc.poll() is None and not (dest / LOCK).exists():
        time.sleep(0.005)
    return time.perf_counter() - t0


def family_kill(work: Path, timings: dict[str, float], points: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for job, cmd in job_commands(work).items():
        ref = work / "ref" / JOB_DIRS[job]
        T = timings[job]
        n_files = sum(1 for p in ref.rglob("*") if p.is_file())
        for i in range(points):
            # a random point of the work, counted in files: kill once the output holds this many
            # (temporaries and _work/ included), so that short jobs are killed mid-way too
            j = rng.randint(3, max(3, n_files - 1))  # past its lock and kind marker
            dest = work / "kill" / f"{JOB_DIRS[job]}-{i}"
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd(dest), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                    start_new_session=True)
            files = 0
            while proc.poll() is None and files < j:
                time.sleep(0.002)
                files = _files(dest)
            at = time.perf_counter() - t0
            if proc.poll() is not None:
                note = f"finished before its output held {j} files"
            else:
                os.killpg(proc.pid, signal.SIGKILL)  # the job and any worker processes
                proc.wait()
                note = f"killed with {j} files of {n_files} in its output, at {at:.1f} s (the reference took {T:.1f} s)"
                if recorded(dest) is not None:  # a killed job must not leave a finished-looking artifact...
                    diff = same_as_reference(dest, ref)
                    if diff:  # ...unless it really had finished
                        out.append(Case("kill", f"{job} #{i + 1}", "lost", f"{note}; finished-looking after the kill: {diff}"))
                        continue
            out.append(_rerun_case("kill", f"{job} #{i + 1}", cmd(dest), dest, ref, t0, note))
            print(f"  kill {job} #{i + 1}: {out[-1].outcome} ({out[-1].detail})", flush=True)
    return out


def family_disk(work: Path) -> list[Case]:
    """The datastore and n-gram builds under a file size limit below their largest file."""
    cmds = job_commands(work)
    ref = work / "ref"
    largest = {j: max(p.stat().st_size for p in (ref / JOB_DIRS[j]).rglob("*") if p.is_file())
               for j in ("datastore build", "n-gram build")}
    # a small limit (the first shard fails) and half the largest file (later writes fail)
    limits = {j: [8_192, largest[j] // 2] for j in largest}
    out = []
    for job, lims in limits.items():
        for limit in lims:
            dest = work / "disk" / f"{JOB_DIRS[job]}-{limit}"
            shutil.rmtree(dest, ignore_errors=True)
            t0 = time.perf_counter()
            name = f"{job}, files limited to {limit:,} bytes"
            r = _run_to_end(cmds[job](dest), limit)
            lines = _error_lines(r.stderr)
            if r.returncode == 0:
                diff = same_as_reference(dest, ref / JOB_DIRS[job])
                out.append(Case("disk", name, "lost" if diff else "unclear", f"the limit did not bite: {diff or 'finished'}"))
                continue
            if "Traceback" in r.stderr or r.returncode < 0 or r.returncode == 1 and not lines:
                out.append(Case("disk", name, "crash", f"exit {r.returncode}: {r.stderr[-300:]}"))
                continue
            if r.returncode != 2 or len(lines) != 1 or recorded(dest) is not None:
                out.append(Case("disk", name, "unclear", f"exit {r.returncode}, {len(lines)} error lines: {lines[:2]}"))
                continue
            line = lines[0][lines[0].index("error:"):]
            out.append(_rerun_case("disk", name, cmds[job](dest), dest, ref / JOB_DIRS[job], t0,
                                   f"exit 2, one line: {line[:160]}"))
            print(f"  disk {name}: {out[-1].outcome}", flush=True)
    return out


def family_writers(work: Path) -> list[Case]:
    """The first job paused (SIGSTOP) as it takes its lock, and (a second case) half-way through
    its work; a second job on the same output must be refused; the first, resumed, must finish
    equal to the reference."""
    out = []
    for (job, cmd), when in [(jc, w) for w in ("at its lock", "half-way") for jc in job_commands(work).items()]:
        dest = work / "writers" / JOB_DIRS[job]
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.perf_counter()
        first = subprocess.Popen(cmd(dest), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                 start_new_session=True)
        _wait_for_lock(first, dest)
        if when == "half-way":  # once its output holds half the reference's files
            half = sum(1 for p in (work / "ref" / JOB_DIRS[job]).rglob("*") if p.is_file()) // 2
            while first.poll() is None and _files(dest) < half:
                time.sleep(0.002)
        if first.poll() is not None:
            out.append(Case("writers", f"{job}, the first paused {when}", "unclear", f"the first job ended (exit {first.returncode}) before it could be paused"))
            continue
        os.killpg(first.pid, signal.SIGSTOP)
        second = _run_to_end(cmd(dest))
        os.killpg(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=900)
        lines = _error_lines(second.stderr)
        refused = second.returncode == 2 and len(lines) == 1 and "another retromem job is writing" in lines[0] \
            and str(dest) in lines[0]
        diff = same_as_reference(dest, work / "ref" / JOB_DIRS[job]) if first.returncode == 0 else \
            f"the first job failed: exit {first.returncode}: {err[-300:]}"
        if "Traceback" in second.stderr or second.returncode < 0:
            outcome = "crash"
        elif diff:
            outcome = "lost"
        elif second.returncode == 0:
            outcome = "wrong"  # two writers on one output both said they succeeded
        else:
            outcome = "survived" if refused else "unclear"
        out.append(Case("writers", f"{job}, the first paused {when}", outcome, f"second: exit {second.returncode}, {(lines or [''])[0][:200]}; "
                        f"first: {diff or 'finished, equal to the reference'}", time.perf_counter() - t0))
        print(f"  writers {out[-1].name}: {out[-1].outcome}", flush=True)
    return out


# -- 6: corruption ----------------------------------------------------------------------------------


def family_corruption(work: Path, quick: bool) -> list[Case]:
    """The trust harness over this store's six artifacts, every file damaged three ways; ``quick``:
    one file of each type (shard files of the same name in other shards left out)."""
    from trust_corruption import file_type

    from tests.trust import harness as h

    ref = work / "ref"
    arts = {k: ref / h.DIRS[k] for k in h.KINDS}
    selected = h.cases(arts)
    if quick:
        seen: set[tuple[str, str]] = set()
        keep = []
        for kind, rel, how in selected:
            if (file_type(kind, rel), how) not in seen:
                seen.add((file_type(kind, rel), how))
                keep.append((kind, rel, how))
        selected = keep
    mapping = {"error": "survived", "correct": "survived", "crash": "crash", "wrong": "wrong", "traceback": "crash",
               "vague": "unclear"}
    out = []
    for o in h.run_cases(arts, work / "corruption", selected):
        outcome = mapping[o.result]
        if o.verify == "missed":  # verify must name every damaged file
            outcome = "unclear" if outcome == "survived" else outcome
        out.append(Case("corruption", f"{o.kind} {o.file} {o.damage}", outcome, f"{o.result}, verify {o.verify}: {o.message[:200]}"))
    return out


# -- the table ------------------------------------------------------------------------------------


def table(cases: list[Case]) -> str:
    cols = ("cases", *OUTCOMES)
    head = ("| family | cases tried | survived | crashes | silent wrong | data lost | unclear |\n"
            "|---|---|---|---|---|---|---|")
    rows = []
    for fam in [f for f in FAMILIES if any(c.family == f for c in cases)] + ["all"]:
        cs = [c for c in cases if fam in ("all", c.family)]
        n = {"cases": len(cs), **{o: sum(c.outcome == o for c in cs) for o in OUTCOMES}}
        cells = " | ".join(str(n[c]) for c in cols)
        rows.append(f"| {'**all**' if fam == 'all' else fam} | {cells} |")
    return head + "\n" + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the store (reused) and every case's files.")
    ap.add_argument("--quick", action="store_true", help="2 kill points per job instead of 3.")
    ap.add_argument("--kill-points", type=int, default=None, help="kill -9 points per batch job (default 3; 2 with --quick).")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"Comma-separated, of {', '.join(FAMILIES)}.")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    points = args.kill_points or (2 if args.quick else 3)
    t_start = time.perf_counter()
    timings = build_store(args.work)
    ref = args.work / "ref"
    run = {"requests": lambda: family_requests(ref), "auth": lambda: family_auth(ref, args.work),
           "overload": lambda: family_overload(ref), "sigterm": lambda: family_sigterm(ref),
           "kill": lambda: family_kill(args.work, timings, points, args.seed),
           "corruption": lambda: family_corruption(args.work, False), "disk": lambda: family_disk(args.work),
           "writers": lambda: family_writers(args.work)}
    cases: list[Case] = []
    seconds = {}
    for fam in args.families.split(","):
        t0 = time.perf_counter()
        got = run[fam]()
        seconds[fam] = round(time.perf_counter() - t0, 1)
        cases += got
        bad = [c for c in got if c.outcome != "survived"]
        print(f"{fam}: {len(got)} cases, {len(bad)} not survived ({seconds[fam]} s)", flush=True)
        for c in bad:
            print(f"  {c.outcome}: {c.name}: {c.detail}", flush=True)
    print("\n" + table(cases))
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick, "kill_points": points,
           "reference_build_s": timings, "family_s": seconds, "total_s": round(time.perf_counter() - t_start, 1),
           "table": table(cases), "cases": [asdict(c) for c in cases]}
    (args.work / "results.json").write_text(json.dumps(res, indent=1))
    print(f"\n{len(cases)} cases in {res['total_s']} s; results in {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
