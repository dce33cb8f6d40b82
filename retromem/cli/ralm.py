"""Commands: `retromem ralm eval`, in-context retrieval augmentation of a frozen causal LM with its
controls and the datastore scaling curve (the library is :mod:`retromem.retro.ralm`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retromem.cli._common import handle_errors, open_retriever, parse_list, retriever_options


@click.group("ralm")
def group() -> None:
    """In-context retrieval augmentation (In-Context RALM / REPLUG / MassiveDS) of any causal LM."""


@group.command("eval")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Causal LM: a built-in name, a local directory or a hub id (frozen).")
@click.option("--datastore", required=True, type=click.Path(exists=True, file_okay=False),
              help="Datastore whose held-out documents are scored (and whose chunks are retrieved).")
@retriever_options("Dense index over --datastore, searched in this process.")
@click.option("--out", "-o", required=True, help="Output directory: results.json and scaling.png.")
@click.option("--stride", type=int, default=64, show_default=True, help="Tokens scored per retrieval.")
@click.option("--query-tokens", type=int, default=32, show_default=True, help="Preceding tokens used as the query.")
@click.option("--context-tokens", type=int, default=512, show_default=True, help="Document tokens kept before the scored ones.")
@click.option("-k", type=int, default=4, show_default=True, help="Chunks prepended.")
@click.option("--deep-k", type=int, default=100, show_default=True, help="Hits retrieved once per query, filtered per subsample.")
@click.option("--max-docs", type=int, default=16, show_default=True, help="Held-out documents evaluated.")
@click.option("--max-doc-tokens", type=int, default=1024, show_default=True, help="Tokens of each document considered.")
@click.option("--eval-fraction", type=float, default=0.05, show_default=True, help="Share of documents held out (by hash of doc_id).")
@click.option("--split-seed", type=int, default=0, show_default=True)
@click.option("--fractions", default="1.0", show_default=True, help="Datastore subsample fractions, comma-separated (e.g. 0.01,0.1,1).")
@click.option("--seeds", default="0", show_default=True, help="Subsample seeds, comma-separated.")
@click.option("--decontam-ngram", type=int, default=13, show_default=True,
              help="Drop retrieved chunks sharing an n-gram of this many tokens with the evaluated document (0: off).")
@click.option("--separator", default="\n\n", show_default=True, help="Text after each prepended chunk.")
@click.option("--random-seed", type=int, default=0, show_default=True, help="Random chunks and bootstrap.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--threads", type=int, default=2, show_default=True)
@handle_errors
def ralm_eval(model: str, datastore: str, index_dir: str | None, server: str | None, token_file: str | None,
              tls_ca: str | None, out: str, stride: int, query_tokens: int, context_tokens: int, k: int, deep_k: int,
              max_docs: int, max_doc_tokens: int, eval_fraction: float, split_seed: int, fractions: str, seeds: str,
              decontam_ngram: int, separator: str, random_seed: int, batch_size: int, bootstrap: int,
              threads: int) -> None:
    """Score held-out documents of --datastore with no retrieval, retrieved chunks, random chunks of the
    same length and another query's chunks, over datastore subsamples; write results.json and a plot."""
    import torch

    from retromem.datastore import Datastore
    from retromem.models import load_causal_lm
    from retromem.retro.ralm import RalmConfig, evaluate_ralm, plot_scaling

    cfg = RalmConfig(stride=stride, query_tokens=query_tokens, context_tokens=context_tokens, k=k, deep_k=deep_k,
                     max_docs=max_docs, max_doc_tokens=max_doc_tokens, eval_fraction=eval_fraction,
                     split_seed=split_seed, fractions=parse_list(fractions, "--fractions", float), seeds=parse_list(seeds, "--seeds"),
                     decontam_ngram=decontam_ngram, separator=separator, random_seed=random_seed,
                     batch_size=batch_size, bootstrap=bootstrap)
    torch.set_num_threads(threads)
    ds = Datastore.open(datastore)
    retriever = open_retriever(index_dir, server, token_file, tls_ca, datastore=ds)
    lm, tok = load_causal_lm(model)
    res = evaluate_ralm(lm, tok, retriever, ds, cfg, progress=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": model, "datastore": str(ds.path), "retriever": server or str(index_dir), **res.as_dict()}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot = plot_scaling(res, out_dir / "scaling.png", title=f"{Path(model).name}, {len(res.doc_ids)} held-out documents")

    click.echo(f"documents   {len(res.doc_ids)} held out, {res.tokens_scored:,} tokens scored; datastore "
               f"{res.datastore_tokens:,} tokens outside them")
    for name, s in res.settings.items():
        click.echo(f"{name:<12}ppl {s['ppl']:.3f}  (nll {s['nll']:.4f})")
    for d in res.differences:
        click.echo(f"{d['a'] + ' - ' + d['b']:<26}dNLL {d['delta_nll']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]  "
                   f"ppl x{d['ppl_ratio']:.3f}{'  *' if d['excludes_zero'] else ''}")
    for r in res.scaling:
        v = r["vs_none"]
        click.echo(f"fraction {r['fraction']:<6g} seed {r['seed']}  {r['datastore_tokens']:>12,} tokens  ppl {r['ppl']:.3f}  "
                   f"vs none {v['delta_nll']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]  chunks/block {r['mean_chunks']:.2f}")
    dc = res.decontamination
    if dc["ngram"]:
        click.echo(f"decontam    {dc['dropped_candidates']:,} of {dc['candidates_checked']:,} candidates share a "
                   f"{dc['ngram']}-gram with their document ({dc['dropped_from_top_k']:,} from the top k)")
    click.echo(f"wrote       {out_dir / 'results.json'}, {plot}")
