"""Commands: `retromem serve` (the gRPC retrieval server or router) and `retromem query` (a client
for every RPC, human-readable or --json), plus the demo step that serves and queries over gRPC."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from retromem.cli._common import PATH_OR_URL, handle_errors, parse_list, parse_number, parse_size, secret, snippet
from retromem.cli.datastore import verify_option
from retromem.errors import ConfigError


def read_deployment(path: str) -> tuple[tuple[str, ...], tuple[tuple[str, int, int], ...]]:
    """Shard targets and their (datastore_id, first_doc, first_chunk) from a deployment file."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
        entries = data["shards"]
        targets = tuple(str(e["target"]) for e in entries)
        ranges = tuple((str(e["datastore_id"]), int(e["first_doc"]), int(e["first_chunk"])) for e in entries)
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--deployment {path}: expected `shards:` as a list of {{target, datastore_id, first_doc, "
                          f"first_chunk}} ({type(exc).__name__}: {exc})") from None
    if not targets:
        raise ConfigError(f"--deployment {path} lists no shards")
    if any(d < 0 or c < 0 for _, d, c in ranges):
        raise ConfigError(f"--deployment {path}: first_doc and first_chunk must be non-negative")
    return targets, ranges


@click.command("serve")
@click.option("--datastore", "datastore_path", type=PATH_OR_URL, help="Datastore directory or URL (mirrored locally).")
@click.option("--dense", type=PATH_OR_URL, help="Dense index directory or URL (mirrored locally).")
@click.option("--ngram", type=PATH_OR_URL, help="N-gram (suffix array) index directory or URL (mirrored locally).")
@click.option("--shard", "shards", multiple=True, help="Router mode: host:port of a shard server (repeat, in id order).")
@click.option("--deployment", type=click.Path(exists=True, dir_okay=False),
              help="Router mode: YAML/JSON `shards:` list of {target, datastore_id, first_doc, first_chunk}; ids come "
                   "from it, not from shard order. With --engine ray: each shard's datastore/dense/ngram paths, "
                   "datastore_id, first_doc, first_chunk and replicas or autoscaling (see retromem.service.ray_serve).")
@click.option("--engine", type=click.Choice(["grpc", "ray"]), default="grpc", show_default=True,
              help="ray: run the shards of --deployment as Ray Serve deployments (replicas, health checks, "
                   "autoscaling) behind this gRPC front; grpc: this process serves (or routes) by itself.")
@click.option("--ray-address", default=None, help="--engine ray: the Ray cluster to join (default: a running local one, "
                                                  "or a new one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", type=int, default=50051, show_default=True, help="Port (0: any free one).")
@click.option("--workers", type=int, default=8, show_default=True, help="Threads running unary requests (health checks included).")
@click.option("--max-streams", type=int, default=4, show_default=True, help="Streams open at once, on threads of their own; beyond: RESOURCE_EXHAUSTED.")
@click.option("--stream-idle", type=float, default=30.0, show_default=True, help="End a stream whose client sends nothing for this many seconds.")
@click.option("--stream-max", type=float, default=3600.0, show_default=True, help="The longest a stream may stay open, in seconds.")
@click.option("--max-queue", type=int, default=64, show_default=True, help="Requests that may wait for a thread; beyond: RESOURCE_EXHAUSTED.")
@click.option("--batch-wait-ms", type=float, default=2.0, show_default=True, help="Dense micro-batching: most a query waits for company.")
@click.option("--max-dense-batch", type=int, default=256, show_default=True, help="Dense micro-batching: queries per FAISS call.")
@click.option("--max-batch", type=int, default=1024, show_default=True, help="Queries per Search request.")
@click.option("--max-k", type=int, default=1000, show_default=True)
@click.option("--max-chunks", type=int, default=4096, show_default=True, help="Ids per GetChunks request.")
@click.option("--max-query-tokens", type=int, default=1000, show_default=True)
@click.option("--max-message-bytes", default="16MiB", show_default=True, help="Largest message received or sent; a Search whose answer would not fit is refused before any work.")
@click.option("--max-nprobe", type=int, default=4096, show_default=True, help="Largest IVF nprobe a request may ask for.")
@click.option("--max-ef-search", type=int, default=4096, show_default=True, help="Largest HNSW ef_search a request may ask for.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token clients must send (default: $RETROMEM_TOKEN; none: open).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate chain: serve TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key of --tls-cert.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics over HTTP on this port.")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address of /metrics (it has no auth: loopback unless you mean it).")
@click.option("--grace", type=float, default=10.0, show_default=True, help="SIGTERM: seconds in-flight requests may take to finish.")
@click.option("--partial", is_flag=True, help="Router: answer without failed shards, naming them in missing_shards.")
@click.option("--shard-timeout", type=float, default=10.0, show_default=True, help="Router: deadline of each shard call, in seconds.")
@click.option("--shard-token-file", type=click.Path(dir_okay=False), help="Router: token to send to the shards (default: $RETROMEM_SHARD_TOKEN).")
@click.option("--shard-tls-ca", type=click.Path(exists=True, dir_okay=False), help="Router: CA certificate of TLS shards.")
@click.option("--torch-threads", type=int, default=None, help="Threads of the query embedder.")
@click.option("--faiss-threads", type=int, default=None, help="FAISS OpenMP threads (default: one per core).")
@verify_option
@handle_errors
def serve(datastore_path, dense, ngram, shards, deployment, engine, ray_address, host, port, workers, max_streams, stream_idle, stream_max, max_queue,
          batch_wait_ms, max_dense_batch, max_batch, max_k, max_chunks, max_query_tokens, max_message_bytes, max_nprobe,
          max_ef_search, token_file, tls_cert, tls_key, metrics_port, metrics_host, grace,
          partial, shard_timeout, shard_token_file, shard_tls_ca, torch_threads, faiss_threads) -> None:
    """Serve a datastore and its dense and/or n-gram index over gRPC (or, with --shard, route to shard
    servers). Runs until SIGTERM or Ctrl-C, then finishes in-flight requests and exits."""
    from retromem.service.config import ServerConfig, ServiceLimits
    from retromem.service.server import serve as run

    limits = ServiceLimits(max_batch=max_batch, max_k=max_k, max_chunks=max_chunks, max_query_tokens=max_query_tokens,
                           max_message_bytes=parse_size(max_message_bytes, "--max-message-bytes"), max_nprobe=max_nprobe,
                           max_ef_search=max_ef_search)
    shard_ranges: tuple = ()
    ray_dep = None
    if engine == "ray":
        from retromem.service.ray_serve import read_ray_deployment

        if not deployment:
            raise ConfigError("--engine ray serves the shards of a deployment file: give --deployment FILE")
        if shards or datastore_path or dense or ngram:
            raise ConfigError("--engine ray takes its shards and their paths from --deployment: drop --shard, "
                              "--datastore, --dense and --ngram")
        ray_dep = read_ray_deployment(deployment)
        shards = tuple(s.target for s in ray_dep.shards)
        shard_ranges = tuple((s.datastore_id, s.first_doc, s.first_chunk) for s in ray_dep.shards)
    elif ray_address:
        raise ConfigError("--ray-address goes with --engine ray")
    elif deployment:
        if shards:
            raise ConfigError("give the shards either with --shard or in --deployment, not both")
        shards, shard_ranges = read_deployment(deployment)
    cfg = ServerConfig(datastore=datastore_path, dense=dense, ngram=ngram, shards=tuple(shards), shard_ranges=shard_ranges,
                       host=host, port=port,
                       workers=workers, max_streams=max_streams, stream_idle_s=stream_idle, stream_max_s=stream_max,
                       max_queue=max_queue, batch_wait_ms=batch_wait_ms, max_dense_batch=max_dense_batch,
                       token=secret(token_file, "RETROMEM_TOKEN"), tls_cert=tls_cert, tls_key=tls_key,
                       metrics_port=metrics_port, metrics_host=metrics_host, grace_s=grace, partial=partial, shard_timeout_s=shard_timeout,
                       shard_token=secret(shard_token_file, "RETROMEM_SHARD_TOKEN"), shard_tls_ca=shard_tls_ca,
                       torch_threads=torch_threads, faiss_threads=faiss_threads, limits=limits)

    def ready(running) -> None:
        parts = [p for p, v in (("ray-serve" if ray_dep else "router", cfg.shards), ("datastore", datastore_path), ("dense", dense), ("ngram", ngram)) if v]
        extra = f", metrics on http://{metrics_host}:{running.metrics_port}/metrics" if running.metrics_port is not None else ""
        click.echo(f"serving {'+'.join(parts)} on {host}:{running.port} ({'TLS' if tls_cert else 'plaintext'}"
                   f"{', token required' if cfg.token else ''}){extra}", err=False)
        sys.stdout.flush()

    if ray_dep is not None:
        from retromem.service.ray_serve import serve_ray

        abandoned = serve_ray(ray_dep, cfg, ray_address=ray_address, on_ready=ready)
    else:
        abandoned = run(cfg, on_ready=ready)
    click.echo(f"stopped: {abandoned} call(s) still running after --grace {grace:g}s were abandoned" if abandoned
               else "stopped: in-flight requests drained")
    # exit now: the interpreter's teardown (a last garbage collection over the loaded tokenizer, model
    # and indexes: 3-4 s on the demo store) and joining threads of abandoned calls would hold the exit
    # past the grace period that SIGTERM was promised
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# query


@click.group("query")
@click.option("--target", default=lambda: os.environ.get("RETROMEM_TARGET", "127.0.0.1:50051"), show_default="127.0.0.1:50051 or $RETROMEM_TARGET",
              help="host:port of the server.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the bearer token (default: $RETROMEM_TOKEN).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False), help="Connect with TLS, trusting this CA certificate.")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Deadline of each call, in seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON (protobuf field names).")
@click.pass_context
def query(ctx: click.Context, target: str, token_file: str | None, tls_ca: str | None, timeout: float, as_json: bool) -> None:
    """Query a retrieval server over gRPC: one sub-command per RPC."""
    ctx.obj = {"target": target, "token_file": token_file, "tls_ca": tls_ca, "timeout": timeout, "json": as_json}


def _client(ctx: click.Context):
    from retromem.service.client import RetrievalClient

    o = ctx.obj
    return RetrievalClient(o["target"], token=secret(o["token_file"], "RETROMEM_TOKEN"), tls_ca=o["tls_ca"],
                           timeout=o["timeout"], retries=2)


def _emit(ctx: click.Context, msg, human) -> None:
    if ctx.obj["json"]:
        from google.protobuf.json_format import MessageToDict

        click.echo(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), indent=2, ensure_ascii=False))
    else:
        human(msg)


def _ngram(q: str, ids: bool):
    from retromem.service.v1 import retrieval_pb2 as pb

    if not ids:
        return pb.NgramQuery(text=q.encode("utf-8"))
    return pb.NgramQuery(ids=pb.TokenIds(ids=list(parse_list(q, "QUERY (with --ids)"))))


def _token(t: str, ids: bool):
    from retromem.service.v1 import retrieval_pb2 as pb

    if ids:
        return pb.Token(id=parse_number(t, "--next (with --ids)"))
    return pb.Token(text=t.encode("utf-8"))


def _fetch(fetch: bool):
    from retromem.service.messages import fetch_msg

    return fetch_msg(fetch)


def _missing(m) -> None:
    if len(m.missing_shards):
        click.echo(f"partial answer: shards {', '.join(m.missing_shards)} did not answer", err=True)


def _call(ctx, method: str, request):
    with _client(ctx) as c:
        return c.raw(method, request)


@query.command("info")
@click.pass_context
@handle_errors
def q_info(ctx):
    """The datastore, indexes, tokenizer, embedder and limits of the server."""
    from retromem.service.v1 import retrieval_pb2 as pb

    def show(m):
        click.echo(f"retromem {m.version} {m.role}{'  (token required)' if m.auth_required else ''}")
        if m.HasField("datastore"):
            d = m.datastore
            click.echo(f"datastore  {d.datastore_id[:16]}  {d.num_documents:,} documents, {d.num_chunks:,} chunks of "
                       f"{d.chunk_length} tokens, {d.num_tokens:,} tokens; tokenizer {d.tokenizer} ({d.vocab_size:,} ids)")
        if m.HasField("dense"):
            d = m.dense
            click.echo(f"dense      {d.factory}  {d.ntotal:,} vectors of {d.dim} dims; embedder {d.embedder} "
                       f"sha256:{d.embedder_sha256[:12]}; defaults {dict(d.search_defaults) or 'none'}")
        if m.HasField("ngram"):
            click.echo(f"n-gram     {m.ngram.engine}  {m.ngram.num_tokens:,} tokens in {m.ngram.shards} shard(s)")
        for s in m.shards:
            click.echo(f"shard      {s.target}  docs {s.first_doc_id}..{s.first_doc_id + s.num_documents - 1}, "
                       f"chunks {s.first_chunk_id}..{s.first_chunk_id + s.num_chunks - 1}")
        lim = m.limits
        click.echo(f"limits     batch {lim.max_batch}, k {lim.max_k}, query {lim.max_query_bytes} bytes / {lim.max_query_tokens} "
                   f"tokens, chunks {lim.max_chunks}, message {lim.max_message_bytes:,} bytes; {lim.workers} workers, "
                   f"queue {lim.max_queue}, dense batches of {lim.max_dense_batch} within {lim.batch_wait_ms} ms")
        click.echo(f"           nprobe {lim.max_nprobe}, ef_search {lim.max_ef_search}, {lim.max_exclude_doc_ids} excluded "
                   f"documents per query, max_diff_tokens {lim.max_diff_tokens}; {lim.max_streams} streams, idle "
                   f"{lim.stream_idle_s:g} s, open {lim.stream_max_s:g} s at most")

    _emit(ctx, _call(ctx, "Info", pb.InfoRequest()), show)


@query.command("health")
@click.option("--service", default="", help="Service name ('' for the whole server).")
@click.pass_context
@handle_errors
def q_health(ctx, service):
    """The standard gRPC health check."""
    with _client(ctx) as c:
        status = c.health(service)
    click.echo(json.dumps({"status": status}) if ctx.obj["json"] else status)
    if status != "SERVING":
        sys.exit(1)


@query.command("search")
@click.argument("texts", nargs=-1, required=True)
@click.option("-k", type=int, default=5, show_default=True)
@click.option("--exclude-doc", "exclude", type=int, multiple=True, help="doc_id every query must not retrieve from (repeat).")
@click.option("--nprobe", type=int, default=0, help="IVF lists to visit (0: the index's default).")
@click.option("--ef-search", type=int, default=0, help="HNSW efSearch (0: the index's default).")
@click.option("--fetch/--no-fetch", default=True, show_default=True, help="Return text, tokens and continuation.")
@click.pass_context
@handle_errors
def q_search(ctx, texts, k, exclude, nprobe, ef_search, fetch):
    """Dense search: the top-k chunks for each of TEXTS."""
    from retromem.service.v1 import retrieval_pb2 as pb

    req = pb.SearchRequest(queries=[pb.Query(text=t.encode("utf-8"), exclude_doc_ids=exclude) for t in texts], k=k,
                           nprobe=nprobe, ef_search=ef_search, fetch=_fetch(fetch))

    def show(m):
        _missing(m)
        for t, r in zip(texts, m.results):
            click.echo(f"query: {t!r}")
            for j, (cid, s) in enumerate(zip(r.chunk_ids, r.scores)):
                line = f"  chunk {cid}  score {s:.3f}"
                if len(r.chunks):
                    line += f"  (doc {r.chunks[j].doc_id})  {snippet(r.chunks[j].text)}"
                click.echo(line)

    _emit(ctx, _call(ctx, "Search", req), show)


@query.command("chunks")
@click.argument("chunk_ids", nargs=-1, type=int, required=True)
@click.option("--continuation/--no-continuation", default=True, show_default=True)
@click.pass_context
@handle_errors
def q_chunks(ctx, chunk_ids, continuation):
    """Fetch chunks by id, with their continuation."""
    from retromem.service.v1 import retrieval_pb2 as pb

    req = pb.GetChunksRequest(chunk_ids=chunk_ids, fetch=pb.Fetch(text=True, tokens=True, continuation=continuation))

    def show(m):
        for c in m.chunks:
            click.echo(f"chunk {c.chunk_id} (doc {c.doc_id}, {len(c.tokens)} tokens): {c.text!r}")
            if c.HasField("continuation_id"):
                click.echo(f"  continuation {c.continuation_id}: {c.continuation_text!r}")
            elif continuation:
                click.echo("  continuation: none (last chunk of its document)")

    _emit(ctx, _call(ctx, "GetChunks", req), show)


_ids_opt = click.option("--ids", is_flag=True, help="QUERY (and --next) are token ids, not text.")


@query.command("count")
@click.argument("ngram")
@_ids_opt
@click.pass_context
@handle_errors
def q_count(ctx, ngram, ids):
    """Occurrences of an n-gram."""
    from retromem.service.v1 import retrieval_pb2 as pb

    def show(m):
        _missing(m)
        click.echo(f"count({ngram!r}) = {m.count:,}{' (approx)' if m.approx else ''}   tokens {list(m.token_ids)}")

    _emit(ctx, _call(ctx, "Count", pb.NgramRequest(query=_ngram(ngram, ids))), show)


def _prob_cmd(name: str, method: str, doc: str):
    @query.command(name, help=doc)
    @click.argument("prompt")
    @click.option("--next", "next_token", required=True, help="The next token (one-token text, or an id with --ids).")
    @_ids_opt
    @click.pass_context
    @handle_errors
    def cmd(ctx, prompt, next_token, ids):
        from retromem.service.v1 import retrieval_pb2 as pb

        def show(m):
            _missing(m)
            p = f"{m.prob:.6f}" if m.HasField("prob") else "undefined (the prompt never occurs)"
            suffix = f", longest occurring suffix {m.suffix_len} tokens" if m.HasField("suffix_len") else ""
            click.echo(f"P({next_token!r} | {prompt!r}) = {p}   ({m.cont_count:,} / {m.prompt_count:,}{suffix})")

        _emit(ctx, _call(ctx, method, pb.ProbRequest(prompt=_ngram(prompt, ids), next_token=_token(next_token, ids))), show)

    return cmd


def _dist_cmd(name: str, method: str, doc: str):
    @query.command(name, help=doc)
    @click.argument("prompt")
    @click.option("--top", type=int, default=10, show_default=True, help="Most frequent next tokens to return (0: all).")
    @_ids_opt
    @click.pass_context
    @handle_errors
    def cmd(ctx, prompt, top, ids):
        from retromem.service.v1 import retrieval_pb2 as pb

        def show(m):
            _missing(m)
            suffix = f", longest occurring suffix {m.suffix_len} tokens" if m.HasField("suffix_len") else ""
            click.echo(f"after {prompt!r}: {m.prompt_count:,} occurrences{' (sampled)' if m.approx else ''}{suffix}")
            for t in m.tokens:
                click.echo(f"  {t.token_id:>6} {t.text!r:<16} {t.count:>8,}  {t.prob:.4f}")

        _emit(ctx, _call(ctx, method, pb.NgramRequest(query=_ngram(prompt, ids), top_k=top)), show)

    return cmd


_prob_cmd("prob", "Prob", "P(next token | prompt) from n-gram counts.")
_prob_cmd("infgram-prob", "InfgramProb", "∞-gram probability: backs off to the longest suffix of the prompt that occurs.")
_dist_cmd("ntd", "NextTokenDistribution", "Next-token distribution after a prompt.")
_dist_cmd("infgram-ntd", "InfgramNextTokenDistribution", "∞-gram next-token distribution.")


def _occurrences(m, field: str) -> None:
    occ = getattr(m, field)
    for j, o in enumerate(occ):
        line = f"  doc {o.doc_id}  chunk {o.chunk_id}  token {o.offset} (chunk offset {o.chunk_offset})"
        if len(m.chunks):
            line += f"  {snippet(m.chunks[j].text, 80)}"
        click.echo(line)


@query.command("find")
@click.argument("ngram")
@click.option("--limit", type=int, default=10, show_default=True)
@click.option("--fetch/--no-fetch", default=False, show_default=True, help="Also return the chunks.")
@_ids_opt
@click.pass_context
@handle_errors
def q_find(ctx, ngram, limit, fetch, ids):
    """Where an n-gram occurs (document, chunk, offset)."""
    from retromem.service.v1 import retrieval_pb2 as pb

    def show(m):
        _missing(m)
        click.echo(f"{m.count:,} occurrences of {ngram!r}; the first {len(m.occurrences)}:")
        _occurrences(m, "occurrences")

    _emit(ctx, _call(ctx, "Find", pb.FindRequest(query=_ngram(ngram, ids), limit=limit,
                                                 fetch=_fetch(fetch) if fetch else None)), show)


@query.command("search-docs")
@click.argument("cnf")
@click.option("--max-hits", type=int, default=10, show_default=True)
@click.option("--max-diff-tokens", type=int, default=0, help="Clauses must match within this many tokens (0: the server's default).")
@click.option("--fetch/--no-fetch", default=False, show_default=True)
@_ids_opt
@click.pass_context
@handle_errors
def q_search_docs(ctx, cnf, max_hits, max_diff_tokens, fetch, ids):
    """Document search for a CNF in infini-gram's syntax: "a OR b AND c"."""
    from retromem.service.v1 import retrieval_pb2 as pb

    clauses = [pb.Clause(terms=[_ngram(t, ids) for t in c.split(" OR ")]) for c in cnf.split(" AND ")]
    req = pb.SearchDocumentsRequest(clauses=clauses, max_hits=max_hits, max_diff_tokens=max_diff_tokens,
                                    fetch=_fetch(fetch) if fetch else None)

    def show(m):
        _missing(m)
        click.echo(f"{m.count:,} matches{' (approx)' if m.approx else ''} in documents {list(m.doc_ids)}:")
        _occurrences(m, "hits")

    _emit(ctx, _call(ctx, "SearchDocuments", req), show)


# ---------------------------------------------------------------------------------------------
# demo


def demo(out_dir: Path, datastore_path: Path, echo) -> None:
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    dense = out_dir / "dense-index"
    ngram = out_dir / "ngram"
    cfg = ServerConfig(datastore=str(datastore_path), dense=str(dense) if (dense / "index.json").exists() else None,
                       ngram=str(ngram) if (ngram / "ngram_index.json").exists() else None, port=0, workers=4)
    running = start_server(cfg)
    try:
        with RetrievalClient(running.target) as c:
            info = c.info()
            echo(f"serving on {running.target}: {info.datastore.num_chunks:,} chunks"
                 + (f", dense {info.dense.factory}" if info.HasField("dense") else "")
                 + (f", n-gram {info.ngram.num_tokens:,} tokens" if info.HasField("ngram") else "")
                 + f"; health {c.health()}")
            if info.HasField("dense"):
                res = c.search(["How do I read a file line by line?"], 3, fetch=True)
                for cid, s, p in zip(res.chunk_ids[0], res.scores[0], res.payloads[0]):
                    echo(f"  Search: chunk {cid} (doc {p.doc_id}) score {s:.3f}  {snippet(p.text, 80)}")
            if info.HasField("ngram"):
                echo(f"  Count(' list comprehension') = {c.count(' list comprehension').count:,}; "
                     f"InfgramProb(' interpreter' | '... the Python') = "
                     f"{c.infgram_prob('Nobody has written this exact prompt before, so the Python', ' interpreter').prob:.3f}")
            (chunk,) = c.get_chunks([info.datastore.num_chunks // 2])
            echo(f"  GetChunks({chunk.chunk_id}): doc {chunk.doc_id}, continuation {chunk.continuation_id}")
            echo(f"  next: retromem serve --datastore {datastore_path} --dense {dense} --ngram {ngram}  "
                 f"|  retromem query count ' list comprehension'")
    finally:
        running.stop(1.0)
