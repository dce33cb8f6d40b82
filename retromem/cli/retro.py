"""Commands: `retromem retro neighbours|train|eval|generate|export` (RETRO), and the demo step that runs
the neighbours job and generates with retrieval."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from retromem.cli._common import (PATH_OR_URL, handle_errors, local_out, node_path as _node_path, open_retriever,
                                  retriever_options, secret, shard_executor_options, train_options)
from retromem.errors import ConfigError


@click.group("retro")
def group() -> None:
    """RETRO: the neighbours job, training / RETROfit, evaluation and generation with retrieval."""


@group.command("neighbours")
@click.argument("datastore", type=PATH_OR_URL)
@retriever_options("Dense index over DATASTORE (retromem index build-dense), searched in this process.")
@click.option("--out", "-o", required=True, help="Output directory or URL (Parquet shards + neighbours.json).")
@click.option("-k", type=int, default=2, show_default=True, help="Neighbours per chunk (RETRO: 2).")
@click.option("--split", type=click.Choice(["train", "eval", "all"]), default="train", show_default=True)
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Share of documents held out (by hash of doc_id).")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--query", type=click.Choice(["auto", "embeddings", "text"]), default="auto", show_default=True,
              help="auto: the index's stored chunk embeddings when present, else embed the chunk texts.")
@click.option("--leakage-ngram", type=int, default=None,
              help="Also drop neighbours sharing an n-gram of this many tokens with a held-out document.")
@click.option("--candidates", type=int, default=None, help="Hits searched per chunk before filtering (default k, 4k with --leakage-ngram).")
@click.option("--shard-chunks", type=int, default=8192, show_default=True, help="Chunks per output shard (the unit of resume).")
@click.option("--batch-size", type=int, default=512, show_default=True)
@click.option("--max-chunks", type=int, default=None, help="Only the first N chunks of the split (smoke runs).")
@click.option("--overwrite", is_flag=True, help="Delete existing output first.")
@shard_executor_options
@handle_errors
def retro_neighbours(datastore: str, index_dir: str | None, server: str | None, token_file: str | None, tls_ca: str | None,
                     out: str, k: int, split: str, eval_fraction: float, split_seed: int,
                     query: str, leakage_ngram: int | None, candidates: int | None, shard_chunks: int, batch_size: int,
                     max_chunks: int | None, overwrite: bool, executor: str = "local", workers: int = 1,
                     ray_address: str | None = None) -> None:
    """Retrieve k neighbours for every chunk of a split of DATASTORE (own document excluded), from a dense
    index in process (--index) or a running server (--server, which must serve DATASTORE); re-run to resume.
    With --executor ray (or --workers N > 1) each output shard is a task that opens DATASTORE and the
    index (or a client of --server) itself: both must be where every worker sees them; same files."""
    from retromem.datastore import Datastore
    from retromem.retro.neighbours import NeighboursConfig, RetrieverSpec, compute_neighbours

    cfg = NeighboursConfig(datastore=datastore, out=out, index=index_dir, k=k, split=split, eval_fraction=eval_fraction,
                           split_seed=split_seed, query=query, leakage_ngram=leakage_ngram, candidates=candidates,
                           shard_chunks=shard_chunks, batch_size=batch_size, max_chunks=max_chunks)
    retriever = open_retriever(index_dir, server, token_file, tls_ca, datastore=Datastore.open(datastore) if index_dir else None)
    run_on, spec = None, None
    if executor == "ray" or workers != 1:
        from retromem.datastore.executors import make_executor

        run_on = make_executor(executor, workers, ray_address)
        spec = (RetrieverSpec(server=server, token=secret(token_file, "RETROMEM_TOKEN"), tls_ca=tls_ca) if server
                else RetrieverSpec(index=_node_path(index_dir)))
    try:
        with local_out(out, overwrite) as out_dir:  # a URL: written in a staging directory, then put there
            res = compute_neighbours(dataclasses.replace(cfg, out=out_dir), retriever, overwrite=overwrite,
                                     executor=run_on, spec=spec)
    finally:
        if server is not None:
            retriever.close()
    m = res.manifest
    missing = sum(s["missing"] for s in m["shards"])
    if res.shards_done == 0:
        click.echo(f"{res.out} is already complete; nothing to do.")
    click.echo(f"neighbours  {res.chunks:,} chunks of split {split} x k={k} -> {res.out} ({len(m['shards'])} shards, "
               f"queries from {m['query']})")
    click.echo(f"resume      {res.shards_skipped} shards already done, {res.shards_done} computed in {res.seconds:.1f}s")
    click.echo(f"excluded    own document always; {sum(s['dropped_for_leakage'] for s in m['shards']):,} candidates "
               f"dropped for sharing a {leakage_ngram}-gram with held-out documents" if leakage_ngram else
               "excluded    own document")
    if missing:
        click.echo(f"warning     {missing:,} neighbour slots empty (fewer eligible chunks than k)", err=True)


@group.command("train")
@train_options("retro/tiny-scratch.yaml")
@click.option("--datastore", default=None, help="Override `datastore`.")
@click.option("--neighbours", multiple=True, help="Override `neighbours` (repeat for several directories).")
@click.option("--model", default=None, help="Override `model` (the base to RETROfit).")
@click.option("--neighbours-mode", type=click.Choice(["retrieved", "random"]), default=None,
              help="Override `neighbours_mode`: random trains the control (same blocks and steps, each chunk reads "
                   "another chunk's neighbours).")
@handle_errors
def retro_train(config_path: str, output_dir: str | None, datastore: str | None, neighbours: tuple[str, ...],
                model: str | None, neighbours_mode: str | None, max_steps: int | None, resume: bool) -> None:
    """Train a RETRO model (RETROfit of a frozen base, or from scratch) with Hugging Face Trainer.

    On several processes: torchrun --nproc_per_node N -m retromem.cli retro train --config ...
    (or accelerate launch); rank 0 alone writes the final model and prints this summary."""
    from retromem.retro.training import load_train_config, train

    cfg = load_train_config(config_path, output_dir=output_dir, datastore=datastore,
                            neighbours=list(neighbours) or None, model=model, neighbours_mode=neighbours_mode,
                            train={"max_steps": max_steps})
    res = train(cfg, resume=resume)
    if not res.main_process:
        return
    loss = "n/a" if res.train_loss is None else f"{res.train_loss:.4f}"
    ev = "" if res.eval_loss is None else f"; held-out loss {res.eval_loss:.4f}"
    click.echo(f"trained {res.steps} steps on {res.train_examples:,} sequences (train loss {loss}{ev}); "
               f"{res.trainable_parameters:,} of {res.total_parameters:,} parameters trainable"
               + (f"; resumed from {res.resumed_from}" if res.resumed_from else ""))
    click.echo(f"model: {res.final_dir}")


@group.command("eval")
@click.option("--model", "model_path", required=True, help="A trained RETRO directory (RETROfit weights or a RetroForCausalLM).")
@click.option("--base-model", default=None, help="The base model (RETROfit: default the recorded base; from scratch: none).")
@click.option("--control-model", default=None,
              help="The same run trained with `neighbours_mode: random` (the control without retrieval signal).")
@click.option("--datastore", "datastore_path", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--neighbours", multiple=True, required=True,
              help="Neighbours directories covering the eval split; pass the train split's too: its chunks lend the "
                   "random neighbours of the control.")
@click.option("--seq-chunks", type=int, default=4, show_default=True)
@click.option("--max-sequences", type=int, default=64, show_default=True, help="Held-out sequences, spread over the split (0: all).")
@click.option("--batch-size", type=int, default=2, show_default=True)
@click.option("--overlap-ngram", type=int, default=8, show_default=True, help="n of the leakage analysis's n-gram overlap.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random neighbours and the bootstrap.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples of each interval.")
@click.option("--groups", type=click.Choice(["document", "sequence"]), default="document", show_default=True,
              help="What the bootstrap resamples: held-out documents or evaluated sequences.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", default="retro-eval", show_default=True, help="Directory for results.json, chunks.jsonl, leakage.png.")
@shard_executor_options
@handle_errors
def retro_eval(model_path: str, base_model: str | None, control_model: str | None, datastore_path: str, neighbours: tuple[str, ...], seq_chunks: int,
               max_sequences: int, batch_size: int, overlap_ngram: int, seed: int, bootstrap: int, groups: str,
               threads: int, out: str, executor: str = "local", workers: int = 1, ray_address: str | None = None) -> None:
    """Held-out perplexity and bits per byte on the same tokens: base model, RETRO with retrieved
    neighbours, with random neighbours (another chunk's), with none, and the control run (trained on
    random neighbours) if given; paired bootstrap intervals for the differences; and the leakage
    analysis (gain against neighbour overlap), plotted. With --executor ray (or --workers N > 1) the
    forward passes run as tasks, one per run of batches, each loading the models from their paths
    (which every node must see); the figures equal the in-process run's."""
    import torch

    from retromem.datastore import Datastore
    from retromem.retro.data import check_datastore_tokenizer
    from retromem.retro.neighbours import NeighbourTable
    from retromem.retro.evaluation import RetroEvalConfig, evaluate, format_difference
    from retromem.retro.loading import load_retro_model, recorded_base_model
    from retromem.models import load_causal_lm

    torch.set_num_threads(threads)
    cfg = RetroEvalConfig(out=out, seq_chunks=seq_chunks, max_sequences=max_sequences or None, batch_size=batch_size,
                          overlap_ngram=overlap_ngram, seed=seed, bootstrap=bootstrap, groups=groups)
    ds = Datastore.open(datastore_path)
    model, tok = load_retro_model(model_path, base_model)
    check_datastore_tokenizer(ds, tok, model.config.vocab_size)
    base_name = base_model or recorded_base_model(model_path)
    base = load_causal_lm(base_name)[0] if base_name else None
    control = load_retro_model(control_model, base_model)[0] if control_model else None
    table = NeighbourTable(list(neighbours), ds)
    runner = None
    if executor == "ray" or workers != 1:
        from retromem.datastore.executors import make_executor
        from retromem.retro.evaluation import EvalModels, ShardRunner

        spec = EvalModels(_node_path(model_path), _node_path(base_model), _node_path(base_name),
                          _node_path(control_model), threads=threads)
        run_on = make_executor(executor, workers, ray_address)
        runner = ShardRunner(run_on, spec, shards=run_on.parallelism)
    s = evaluate(model, ds, table, cfg, base=base, title=f"{Path(model_path).name} on {ds.path.name}", control=control,
                 runner=runner)
    click.echo(f"{s['sequences']} held-out sequences of {s['sequence_tokens']} tokens from {s['held_out_documents']} "
               f"documents never trained on; k={s['num_neighbours']}; random neighbours lent by "
               f"{s['random_neighbours']['donor_split']}-split chunks of other documents")
    for name, v in s["settings"].items():
        click.echo(f"  {name:<12} perplexity {v['perplexity']:8.3f}   bits/byte {v['bits_per_byte']:.4f}")
    click.echo(f"differences in mean NLL (nats/token; < 0: the first is better), {cfg.level:.0%} paired bootstrap "
               f"intervals over {cfg.groups}s:")
    for name, d in s["differences"].items():
        verdict = "excludes 0" if d["excludes_zero"] else ("contains 0" if d["low"] is not None else "")
        click.echo(f"  {name:<26} {format_difference(d, cfg.groups + 's')} {verdict}   "
                   f"perplexity x{d['ppl_ratio']:.4f}")
    if s["max_abs_token_nll_difference_base_vs_retro_off"] is not None:
        click.echo(f"  check: base vs RETRO without neighbours, largest per-token difference "
                   f"{s['max_abs_token_nll_difference_base_vs_retro_off']:.2e} nats")
    click.echo("leakage (bits/byte by overlap of the chunk with its retrieved neighbours; retrieved - random in nats/token):")
    for b in s["leakage_buckets"]:
        vals = "  ".join(f"{k[4:]} {v:.4f}" for k, v in b.items() if k.startswith("bpb_") and v is not None)
        d = b["retro - retro_random"]
        gain = f"  retrieved - random {format_difference(d, cfg.groups + 's')}" if d else ""
        click.echo(f"  {b['overlap']:<14} {b['chunks']:6d} chunks  {vals}{gain}")
    click.echo(f"results: {Path(out) / 'results.json'}   plot: {s['plot']}")


@group.command("generate")
@click.argument("prompt")
@click.option("--model", "model_path", default=None,
              help="A trained RETRO directory; default: SmolLM2-135M RETROfitted with untrained (zero-gated) blocks.")
@click.option("--base-model", default=None)
@retriever_options("Dense index to retrieve from in this process (its datastore must use the model's tokenizer).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--exclude-doc", "exclude_docs", type=int, multiple=True, help="doc_id never retrieved from.")
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-p", type=float, default=0.95, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True, help="Beam search with this many beams.")
@click.option("--no-cache", is_flag=True, help="Re-read the whole sequence at every step (no key/value cache).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@handle_errors
def retro_generate(prompt: str, model_path: str | None, base_model: str | None, index_dir: str | None,
                   server: str | None, token_file: str | None, tls_ca: str | None, max_new_tokens: int,
                   exclude_docs: tuple[int, ...], sample: bool, temperature: float, top_p: float, num_beams: int,
                   no_cache: bool, seed: int, threads: int) -> None:
    """Continue PROMPT, retrieving fresh neighbours (from --index, or --server over gRPC) each time a
    chunk completes."""
    import torch

    from retromem.retro.generation import generate_with_retrieval
    from retromem.retro.loading import load_generation_model

    idx = open_retriever(index_dir, server, token_file, tls_ca)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    chunk_length = int(idx.info().datastore.chunk_length) if server is not None else idx.datastore.chunk_length
    model, tok = load_generation_model(model_path, base_model, chunk_length)
    kw = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {}
    if num_beams < 1:
        raise ConfigError(f"`--num-beams` must be a positive integer, got {num_beams}")
    kw.update(num_beams=num_beams, use_cache=not no_cache)

    def show(r) -> None:
        hits = ", ".join(f"chunk {c} (doc {d}, {s:.2f})" for c, d, s in zip(r.chunk_ids, r.doc_ids, r.scores))
        click.echo(click.style(f"[chunk {r.chunk_index} complete -> retrieved {hits}]", fg="cyan"), err=True)

    res = generate_with_retrieval(model, tok, idx, prompt, max_new_tokens=max_new_tokens,
                                  exclude_doc_ids=list(exclude_docs) or None, on_retrieval=show, **kw)
    click.echo(prompt + click.style(res.text, fg="green"))


@group.command("export")
@click.argument("model_path", type=click.Path(exists=True, file_okay=False))
@click.argument("out")
@click.option("--base-model", default=None, help="The RETROfit's base model (default: the one recorded with it).")
@click.option("--weights", type=click.Choice(["retro", "full"]), default="retro", show_default=True,
              help="RETROfit: its RETRO weights alone (the base pinned by name and sha256) or the whole model.")
@click.option("--datastore", "datastore_path", default=None, type=click.Path(exists=True, file_okay=False),
              help="Record this datastore's id in the model card.")
@click.option("--embedder", default=None, help="Record the embedder the neighbours were retrieved with.")
@click.option("--training-data", default=None, help="Record what the model was trained on.")
@handle_errors
def retro_export(model_path: str, out: str, base_model: str | None, weights: str, datastore_path: str | None,
                 embedder: str | None, training_data: str | None) -> None:
    """Write the RETRO model at MODEL_PATH (any saved layout) to OUT as a Hugging Face directory that
    loads anywhere with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)."""
    from retromem.retro.loading import is_retrofitted, load_retro_model, model_card, recorded_base_model, save_model

    model, tok = load_retro_model(model_path, base_model)
    datastore_id = None
    if datastore_path is not None:
        from retromem.datastore import Datastore

        datastore_id = Datastore.open(datastore_path).datastore_id
    base = None
    if is_retrofitted(model):
        base = base_model or recorded_base_model(model_path) or model.config.base_model_name
    card = model_card(model, datastore_id=datastore_id, embedder=embedder, training_data=training_data)
    save_model(model, tok, out, base, weights=weights, card=card)
    click.echo(f"exported {type(model).__name__} to {out} (load with trust_remote_code=True)")


def demo(out_dir: Path, datastore_path: Path, echo) -> None:
    import time

    import torch

    from retromem.index.dense import DenseIndex
    from retromem.retro.generation import generate_with_retrieval
    from retromem.retro.loading import load_generation_model
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    index_dir = out_dir / "dense-index"
    if not (index_dir / "index.json").is_file():
        echo(f"skipped: no dense index at {index_dir} (the dense index demo step builds it)")
        return
    torch.set_num_threads(2)
    res = compute_neighbours(NeighboursConfig(datastore=str(datastore_path), out=str(out_dir / "retro-neighbours"),
                                              index=str(index_dir), split="eval", eval_fraction=0.1), progress=False)
    missing = sum(s["missing"] for s in res.manifest["shards"])
    echo(f"neighbours job: {res.chunks} chunks of the held-out split (10% of documents by hash), k=2, own document "
         f"excluded -> {res.out} ({len(res.manifest['shards'])} Parquet shard(s), {missing} empty slots)")
    idx = DenseIndex.open(index_dir)
    ds = idx.datastore
    model, tok = load_generation_model(None, None, ds.chunk_length)
    doc = int(ds.chunk_doc_array[ds.num_chunks // 3])
    first_chunk = int(ds.doc_first_chunk_array[doc])
    prompt = ds.tokens([first_chunk])[0][0, : ds.chunk_length - 8].tolist()  # chunk 0 completes 8 tokens in
    echo("SmolLM2-135M RETROfitted with UNTRAINED blocks (CCA gated at zero, so the text equals the base model's; "
         "a trained model comes from `retromem retro train`)")
    echo(f"prompt: {len(prompt)} tokens of document {doc} (excluded from retrieval): {tok.decode(prompt)[:100]!r}...")
    t0 = time.perf_counter()
    out = generate_with_retrieval(model, tok, idx, prompt, max_new_tokens=24, exclude_doc_ids=[doc],
                                  on_retrieval=lambda r: echo(f"  chunk {r.chunk_index} complete (prompt + generated "
                                                              f"tokens): retrieved chunks {r.chunk_ids} from documents "
                                                              f"{r.doc_ids}: {r.texts[0][:70]!r}..."))
    echo(f"generated {len(out.new_ids)} tokens in {time.perf_counter() - t0:.1f}s, {len(out.retrievals)} retrieval(s) "
         f"on the way: {out.text[:200]!r}")
    if doc in {d for r in out.retrievals for d in r.doc_ids}:
        raise ConfigError("the demo retrieved from the excluded document")
