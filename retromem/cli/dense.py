"""Commands: `retromem index dense embed|build|search|tune|eval` (dense retrieval), and the demo step
that embeds the demo datastore, builds a FAISS index and searches it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from retromem.cli._common import (PATH_OR_URL, fmt_bytes, handle_errors, local_out, parse_size, shard_executor_options,
                                  snippet)


@click.group("dense")
def group() -> None:
    """Dense retrieval: embed a datastore's chunks, build, tune, search and evaluate FAISS indexes."""


@group.command("embed")
@click.argument("datastore", type=PATH_OR_URL)
@click.option("--out", "-o", default=None, help="Embeddings directory (default: DATASTORE/embeddings/<model>).")
@click.option("--model", default="all-minilm-l6-v2", show_default=True,
              help="sentence-transformers model: built-in all-minilm-l6-v2 (offline), a local directory or a hub id.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present).")
@click.option("--fp16/--no-fp16", default=None, help="Half precision (default: on for CUDA, off for CPU).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: one embedder actor per GPU of the cluster.")
@click.option("--ray-address", default=None)
@click.option("--query-prompt-name", default="auto", show_default=True,
              help="Prompt for queries: auto (the model's 'query' prompt), none, or a name in the model's prompts.")
@click.option("--document-prompt-name", default="auto", show_default=True,
              help="Prompt for chunks: auto (the model's 'document' / 'passage' / 'corpus' prompt), none, or a name.")
@click.option("--similarity", type=click.Choice(["auto", "cosine", "dot", "euclidean"]), default="auto", show_default=True,
              help="auto: the model's similarity_fn_name (cosine when unset); sets the FAISS metric and normalisation.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "openvino"]), default="torch", show_default=True,
              help="CPU runtime of the same weights (onnx: onnxruntime, openvino: openvino; exported once beside the "
              "model; extra cpu-backends). See BENCHMARKS.md for their recall and speed.")
@click.option("--overwrite", is_flag=True, help="Delete existing embeddings at --out first.")
@handle_errors
def index_embed(datastore: str, out: str | None, model: str, batch_size: int, device: str | None, fp16: bool | None,
                executor: str, ray_address: str | None, query_prompt_name: str, document_prompt_name: str,
                similarity: str, backend: str, overwrite: bool) -> None:
    """Embed every chunk of DATASTORE, one float16 file per datastore shard; re-run to resume."""
    from retromem.index.embed import EmbedConfig, embed_datastore

    cfg = EmbedConfig(datastore=datastore, out=out, model=model, batch_size=batch_size, device=device, fp16=fp16,
                      executor=executor, ray_address=ray_address, query_prompt_name=query_prompt_name,
                      document_prompt_name=document_prompt_name, similarity=similarity, backend=backend)
    if out is None and "://" in datastore:
        raise click.UsageError("a DATASTORE URL needs --out (the default is a folder inside DATASTORE)")
    with local_out(out if out is not None else str(cfg.out_path), overwrite) as out_dir:  # a URL: written in a staging directory, then put there
        res = embed_datastore(dataclasses.replace(cfg, out=out_dir), overwrite=overwrite)
    m = res.manifest
    e = m["embedder"]
    if res.embedded_shards == 0:
        click.echo(f"{res.out} is already complete; nothing to do.")
    click.echo(f"embeddings  {m['num_vectors']:,} x {m['dim']} float16 in {len(m['shards'])} shards -> {res.out}")
    click.echo(f"embedder    {e['name']}  sha256:{e['weights_sha256'][:12]}  max_seq_length {e['max_seq_length']}")
    click.echo(f"encoding    similarity {e.get('similarity', 'cosine')}; query prompt {e.get('query_prompt')!r}; "
               f"document prompt {e.get('document_prompt')!r}; backend {e.get('backend', 'torch')}")
    if res.chunks_per_second:
        click.echo(f"throughput  {res.chunks_per_second:,.0f} chunks/s ({res.seconds:.1f}s)")


@group.command("build")
@click.argument("embeddings", type=PATH_OR_URL)
@click.option("--out", "-o", required=True, help="Index directory.")
@click.option("--factory", default="auto", show_default=True,
              help="FAISS factory string (Flat, HNSW32, IVF4096,SQ8, OPQ64,IVF65536_HNSW32,PQ64 ...) or auto.")
@click.option("--memory-budget", default=None, help="For --factory auto: the most the index may take, e.g. 2GiB.")
@click.option("--target-recall", type=float, default=0.95, show_default=True, help="Recall@10 the tuning step aims for.")
@click.option("--train-size", type=int, default=None, help="Training sample (default: 256 points per centroid).")
@click.option("--shard-vectors", type=int, default=50_000_000, show_default=True, help="Vectors per index shard.")
@click.option("--merge", type=click.Choice(["none", "ondisk"]), default="none", show_default=True,
              help="ondisk: merge IVF shards into one index with memory-mapped inverted lists.")
@click.option("--gpu/--no-gpu", default=None, help="Train, add (and search) on GPUs (default: when faiss-gpu sees one).")
@click.option("--tune/--no-tune", default=True, show_default=True, help="Find nprobe/efSearch for --target-recall after building.")
@shard_executor_options
@click.option("--overwrite", is_flag=True)
@handle_errors
def index_build_dense(embeddings: str, out: str, factory: str, memory_budget: str | None, target_recall: float,
                      train_size: int | None, shard_vectors: int, merge: str, gpu: bool | None, tune: bool, executor: str,
                      workers: int, ray_address: str | None, overwrite: bool) -> None:
    """Build a FAISS index over EMBEDDINGS (from `retromem index embed`); re-run to resume."""
    from retromem.index.dense_build import DenseBuildConfig, build_dense

    cfg = DenseBuildConfig(embeddings=embeddings, out=out, factory=factory,
                           memory_budget=parse_size(memory_budget, "--memory-budget") if memory_budget else None,
                           target_recall=target_recall, train_size=train_size, shard_vectors=shard_vectors,
                           merge=merge, gpu=gpu, tune=tune, executor=executor, workers=workers, ray_address=ray_address)
    with local_out(cfg.out, overwrite) as out_dir:  # a URL: built in a staging directory, then put there
        res = build_dense(dataclasses.replace(cfg, out=out_dir), overwrite=overwrite)
    _print_index(res.meta)


def _print_index(m: dict) -> None:
    click.echo(f"index       {m['factory']}  ({m['ntotal']:,} vectors x {m['dim']}, "
               f"{(m.get('embedder') or {}).get('similarity', 'cosine')} similarity, metric {m.get('metric', 'inner_product')})")
    click.echo(f"chosen      {m['reason']}")
    click.echo(f"size        {fmt_bytes(m['index_bytes'])} ({m['index_bytes'] / max(m['ntotal'], 1):.1f} bytes/vector; "
               f"float32 {4 * m['dim']}; estimated {fmt_bytes(m['estimated_bytes'])})")
    click.echo(f"built from  datastore {m['datastore_id'][:16]}  embedder {m['embedder']['name']} "
               f"sha256:{m['embedder']['weights_sha256'][:12]}")
    t = m.get("tuning")
    if t:
        state = "reached" if t["reached"] else "NOT reached (best shown)"
        click.echo(f"tuned       {t['param']}={t['value']}: recall@{t['k']} target {t['target_recall']} {state}")
    secs = (m.get("build") or {}).get("seconds")
    if secs:
        click.echo("time        " + "  ".join(f"{k} {v:.1f}s" for k, v in secs.items()))


@group.command("search")
@click.argument("index_dir", type=PATH_OR_URL)
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", type=int, default=5, show_default=True)
@click.option("--nprobe", type=int, default=None)
@click.option("--ef-search", type=int, default=None)
@click.option("--exclude-doc", "exclude_docs", type=int, multiple=True, help="doc_id to exclude (every query).")
@click.option("--datastore", "datastore_path", default=None, type=PATH_OR_URL,
              help="Datastore directory, if it moved (default: the one the index records); must be the same datastore_id.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def index_search(index_dir: str, queries: tuple[str, ...], k: int, nprobe: int | None, ef_search: int | None,
                 exclude_docs: tuple[int, ...], datastore_path: str | None, as_json: bool) -> None:
    """Search the dense index INDEX_DIR for each of QUERIES (texts); show hits with their continuation."""
    from retromem.index.dense import DenseIndex

    idx = DenseIndex.open(index_dir, datastore=datastore_path)
    excl = [list(exclude_docs)] * len(queries) if exclude_docs else None
    res = idx.search(list(queries), k, nprobe=nprobe, ef_search=ef_search, exclude_doc_ids=excl, fetch=True)
    if as_json:
        out = [[{"chunk_id": p.chunk_id, "doc_id": p.doc_id, "score": float(s), "text": p.text,
                 "continuation_id": p.continuation_id, "continuation": p.continuation_text}
                for p, s in zip(res.payloads[i], res.scores[i])] for i in range(len(queries))]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for i, q in enumerate(queries):
        click.echo(f"query: {q!r}")
        for rank, (p, s) in enumerate(zip(res.payloads[i], res.scores[i]), 1):
            click.echo(f"  {rank}. chunk {p.chunk_id} (doc {p.doc_id})  score {s:.3f}  {snippet(p.text, 110, quote=True)}")


@group.command("tune")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--target-recall", type=float, default=0.95, show_default=True)
@click.option("-k", type=int, default=10, show_default=True)
@click.option("--queries", "n_queries", type=int, default=500, show_default=True, help="Sampled chunks used as queries.")
@click.option("--query-file", type=click.Path(dir_okay=False), default=None,
              help="Real queries too: .npy vectors, JSONL (text or query per line) or one text per line.")
@click.option("--holdout", type=float, default=0.3, show_default=True,
              help="Share of --query-file held out from tuning; its recall is reported.")
@handle_errors
def index_tune(index_dir: str, target_recall: float, k: int, n_queries: int, query_file: str | None,
               holdout: float) -> None:
    """Find the smallest nprobe/efSearch reaching --target-recall recall@k against exact search; store it."""
    from retromem.index.dense_eval import tune

    rep = tune(index_dir, target_recall=target_recall, k=k, n_queries=n_queries, query_file=query_file, holdout=holdout)
    if rep.param is None:
        click.echo(f"{rep.meta['factory']} has no search parameter to tune (exact or fixed).")
        return
    src = rep.meta["tuning"]["query_source"]
    if query_file:
        click.echo(f"queries: {src['chunks']} datastore chunks, {src['file_tuned_on']} from {query_file} "
                   f"(+{src['file_held_out']} held out)")
    for c in rep.curve:
        extra = "".join(f"  {name}={c[f'recall_{name}']:.4f}" for name in ("file", "held_out") if f"recall_{name}" in c)
        click.echo(f"  {rep.param}={int(c[rep.param]):<6} recall@{k}={c['recall']:.4f}{extra}  {c['qps']:,.0f} q/s")
    verdict = "reaches" if rep.reached else "does NOT reach (the codes are too coarse; best kept)"
    click.echo(f"default {rep.param}={rep.value}: {verdict} recall@{k} >= {target_recall}"
               + ("" if query_file else " on datastore chunks (give --query-file for real queries)"))
    if rep.held_out_recall is not None:
        ok = "meets" if rep.held_out_recall >= target_recall else "falls SHORT of"
        click.echo(f"held-out queries: recall@{k}={rep.held_out_recall:.4f}, {ok} the target")


@group.command("eval")
@click.argument("index_dir", type=PATH_OR_URL)
@click.option("--queries", "n_queries", type=int, default=1000, show_default=True)
@click.option("--nprobe", type=int, default=None)
@click.option("--ef-search", type=int, default=None)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def index_eval_dense(index_dir: str, n_queries: int, nprobe: int | None, ef_search: int | None, as_json: bool) -> None:
    """Recall@1/10/100 against exact inner-product search, and queries/s of both, on sampled chunks."""
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_eval import evaluate

    ntotal = DenseIndex.open(index_dir).ntotal
    ks = tuple(k for k in (1, 10, 100) if k <= ntotal)
    rep = evaluate(index_dir, n_queries=n_queries, ks=ks, nprobe=nprobe, ef_search=ef_search)
    if as_json:
        click.echo(json.dumps({"factory": rep.factory, "queries": rep.queries, "recall": rep.recall, "qps": rep.qps,
                               "exact_qps": rep.exact_qps, "speedup": rep.speedup, "single_qps": rep.single_qps,
                               "exact_single_qps": rep.exact_single_qps, "single_speedup": rep.single_speedup,
                               "bytes_per_vector": rep.bytes_per_vector,
                               "float32_bytes_per_vector": rep.float32_bytes_per_vector, "params": rep.params}, indent=2))
        return
    click.echo(f"index       {rep.factory}  params {rep.params}  ({rep.queries} sampled chunks as queries, own document excluded)")
    click.echo("recall      " + "  ".join(f"@{k} {r:.4f}" for k, r in rep.recall.items()) + "   (against exact inner-product search)")
    click.echo(f"speed       batch: {rep.qps:,.0f} q/s vs exact {rep.exact_qps:,.0f} q/s: {rep.speedup:.2f}x;  "
               f"one query a call: {rep.single_qps:,.0f} vs {rep.exact_single_qps:,.0f} q/s: {rep.single_speedup:.2f}x")
    click.echo(f"size        {rep.bytes_per_vector:.1f} bytes/vector vs float32 {rep.float32_bytes_per_vector}: {rep.compression:.1f}x smaller")


def demo(out_dir: Path, datastore_path: Path, echo) -> None:
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    emb = embed_datastore(EmbedConfig(datastore=str(datastore_path), out=str(out_dir / "embeddings"), batch_size=64))
    echo(f"embedded {emb.manifest['num_vectors']:,} chunks with {emb.manifest['embedder']['name']} "
         f"({emb.manifest['dim']} dims, float16) -> {emb.out}"
         + (f" at {emb.chunks_per_second:,.0f} chunks/s" if emb.chunks_per_second else " (already done)"))
    res = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(out_dir / "dense-index"), factory="auto",
                                       memory_budget=2 * 2**20, tune_queries=200))
    _print_index(res.meta)
    idx = DenseIndex.open(res.out)
    queries = ["How do I read a file line by line?", "sort a list of dictionaries by a key"]
    hits = idx.search(queries, 3, fetch=True)
    for q, row, scores in zip(queries, hits.payloads, hits.scores):
        echo(f"query: {q!r}")
        for p, s in zip(row, scores):
            echo(f"  chunk {p.chunk_id} (doc {p.doc_id})  score {s:.3f}  {snippet(p.text, 90, quote=True)}")
    top = hits.payloads[0][0]
    again = idx.search(queries[:1], 3, exclude_doc_ids=[[top.doc_id]])
    echo(f"excluding document {top.doc_id}: still {int((again.chunk_ids[0] >= 0).sum())} hits, none from it: "
         f"{not set(idx.datastore.doc_ids(again.chunk_ids[0])) & {top.doc_id}}")


@click.command("update")
@click.argument("index_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--datastore", "datastore_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Datastore directory, if it moved (default: the one each index records); must be the same datastore_id.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def index_update(index_dirs: tuple[str, ...], datastore_path: str | None, as_json: bool) -> None:
    """Bring indexes (dense, n-gram, FM-index, BM25) up to their datastore's newest version: embed and
    add only new chunks, one n-gram shard per new segment, deleted documents' vectors removed and
    their n-gram shards rebuilt (after `retromem datastore compact`, `datastore check-takedown --index`
    then passes). FM-index and BM25 are rebuilt whole."""
    from retromem.index.update import update_index

    out = []
    for d in index_dirs:
        r = update_index(d, datastore=datastore_path)
        out.append({"path": str(r.path), "kind": r.kind, "added": r.added, "removed": r.removed,
                    "shards_written": r.shards_written, "bytes_written": r.bytes_written, "seconds": round(r.seconds, 3),
                    "recall_new_at_10": r.recall_new, "drifted": r.drifted, "note": r.note})
        if not as_json:
            what = {"dense": "vectors", "ngram": "documents"}.get(r.kind, "documents")
            extra = f"; recall@10 on new chunks {r.recall_new:.3f}{' (drifted: retune or rebuild)' if r.drifted else ''}" \
                if r.recall_new is not None else ""
            click.echo(f"{r.kind:<6} {d}: +{r.added:,} {what}, -{r.removed:,} deleted, {len(r.shards_written)} shard(s) "
                       f"written ({fmt_bytes(r.bytes_written)}) in {r.seconds:.1f}s{extra}{'; ' + r.note if r.note else ''}")
    if as_json:
        click.echo(json.dumps(out, indent=2))
