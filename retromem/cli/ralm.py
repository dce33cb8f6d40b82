"""Commands: `retromem ralm eval`, in-context retrieval augmentation of a frozen causal LM with its
controls and the datastore scaling curve (the library is :mod:`retromem.retro.ralm`), with dense or BM25
retrieval; `retromem ralm qa`, closed-book against retrieval-augmented question answering on gcide-qa
with the retrievers' recall (:mod:`retromem.retro.qa`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retromem.cli._common import (handle_errors, node_path, open_retriever, parse_list, retriever_options,
                                  shard_executor_options)


@click.group("ralm")
def group() -> None:
    """In-context retrieval augmentation (In-Context RALM / REPLUG / MassiveDS) of any causal LM."""


# RalmConfig's defaults, shown in --help (the CLI does not import torch to print help); a test
# checks that they match the dataclass
DEFAULTS = {"stride": 64, "query_tokens": 32, "context_tokens": 512, "k": 4, "deep_k": 100, "max_docs": 16,
            "max_doc_tokens": 1024, "eval_fraction": 0.05, "split_seed": 0, "fractions": (1.0,), "seeds": (0,),
            "decontam_ngram": 13, "separator": "\n\n", "random_seed": 0, "batch_size": 8, "bootstrap": 1000}


def _default(name: str) -> str:
    """`` [default: X]`` for a RalmConfig field, so the help shows what a flag left out means."""
    v = DEFAULTS[name]
    v = ",".join(str(x) for x in v) if isinstance(v, tuple) else v
    return f" [default: {v!r}]" if isinstance(v, str) else f" [default: {v}]"


@group.command("eval")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Causal LM: a built-in name, a local directory or a hub id (frozen).")
@click.option("--datastore", required=True, type=click.Path(exists=True, file_okay=False),
              help="Datastore whose held-out documents are scored (and whose chunks are retrieved).")
@click.option("--retriever", type=click.Choice(["dense", "lexical"]), default="dense", show_default=True,
              help="dense: --index or --server; lexical: BM25 hits from --lexical-index.")
@retriever_options("Dense index over --datastore, searched in this process.")
@click.option("--lexical-index", default=None, type=click.Path(exists=True, file_okay=False),
              help="With --retriever lexical: BM25 index over --datastore (`retromem index lexical build`).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="YAML file of RalmConfig fields (stride, k, fractions, ...); flags given override it.")
@click.option("--out", "-o", required=True, help="Output directory: results.json and scaling.png.")
@click.option("--stride", type=int, default=None, help="Tokens scored per retrieval." + _default("stride"))
@click.option("--query-tokens", type=int, default=None, help="Preceding tokens used as the query." + _default("query_tokens"))
@click.option("--context-tokens", type=int, default=None,
              help="Document tokens kept before the scored ones." + _default("context_tokens"))
@click.option("-k", type=int, default=None, help="Chunks prepended." + _default("k"))
@click.option("--deep-k", type=int, default=None, help="Hits retrieved once per query, filtered per subsample." + _default("deep_k"))
@click.option("--max-docs", type=int, default=None, help="Held-out documents evaluated." + _default("max_docs"))
@click.option("--max-doc-tokens", type=int, default=None, help="Tokens of each document considered." + _default("max_doc_tokens"))
@click.option("--eval-fraction", type=float, default=None,
              help="Share of documents held out (by hash of doc_id)." + _default("eval_fraction"))
@click.option("--split-seed", type=int, default=None, help=_default("split_seed").strip())
@click.option("--fractions", default=None,
              help="Datastore subsample fractions, comma-separated (e.g. 0.01,0.1,1)." + _default("fractions"))
@click.option("--seeds", default=None, help="Subsample seeds, comma-separated." + _default("seeds"))
@click.option("--decontam-ngram", type=int, default=None,
              help="Drop retrieved chunks sharing an n-gram of this many tokens with the evaluated document (0: off)."
                   + _default("decontam_ngram"))
@click.option("--separator", default=None, help="Text after each prepended chunk." + _default("separator"))
@click.option("--random-seed", type=int, default=None, help="Random chunks and bootstrap." + _default("random_seed"))
@click.option("--batch-size", type=int, default=None, help=_default("batch_size").strip())
@click.option("--bootstrap", type=int, default=None, help="Bootstrap resamples." + _default("bootstrap"))
@click.option("--compress", default="none",
              type=click.Choice(["none", "summary", "similarity", "surprisal", "extractive", "truncate"]), show_default=True,
              help="TCRA-LLM: compress the retrieved text before the prompt (summary: the small LM summarises; "
                   "similarity / surprisal: drop the sentences least like the query / the least surprising words; "
                   "extractive: model-free word-overlap fallback; truncate: the first tokens, the control).")
@click.option("--compress-ratio", type=float, default=0.5, show_default=True,
              help="Share of each retrieved text's tokens kept by --compress.")
@click.option("--threads", type=int, default=2, show_default=True)
@shard_executor_options
@handle_errors
def ralm_eval(model: str, datastore: str, retriever: str, index_dir: str | None, server: str | None,
              token_file: str | None, tls_ca: str | None, lexical_index: str | None, config_path: str | None, out: str,
              stride: int | None, query_tokens: int | None, context_tokens: int | None, k: int | None,
              deep_k: int | None, max_docs: int | None, max_doc_tokens: int | None, eval_fraction: float | None,
              split_seed: int | None, fractions: str | None, seeds: str | None, decontam_ngram: int | None,
              separator: str | None, random_seed: int | None, batch_size: int | None, bootstrap: int | None,
              compress: str, compress_ratio: float, threads: int, executor: str = "local", workers: int = 1,
              ray_address: str | None = None) -> None:
    """Score held-out documents of --datastore with no retrieval, retrieved chunks (dense or BM25), random
    chunks of the same length and another query's chunks, over datastore subsamples; write results.json
    and a plot. Settings come from --config (a YAML of RalmConfig fields), then the flags given. With
    --executor ray (or --workers N > 1) the LM scoring runs as tasks, each loading --model from its path
    (which every node must see); retrieval stays in this process; the figures equal the in-process run's."""
    import torch

    from retromem.datastore import Datastore
    from retromem.models import load_causal_lm
    from retromem.retro.ralm import RalmConfig, evaluate_ralm, plot_scaling

    from retromem.config import from_dict, read_yaml

    flags = dict(stride=stride, query_tokens=query_tokens, context_tokens=context_tokens, k=k, deep_k=deep_k,
                 max_docs=max_docs, max_doc_tokens=max_doc_tokens, eval_fraction=eval_fraction, split_seed=split_seed,
                 fractions=parse_list(fractions, "--fractions", float) if fractions is not None else None,
                 seeds=parse_list(seeds, "--seeds") if seeds is not None else None, decontam_ngram=decontam_ngram,
                 separator=separator, random_seed=random_seed, batch_size=batch_size, bootstrap=bootstrap)
    data = read_yaml(config_path) if config_path else {}
    data.update({key: v for key, v in flags.items() if v is not None})
    cfg = from_dict(RalmConfig, data, where=config_path or "")
    from retromem.retro.compress import CompressConfig, make_compressor

    ccfg = CompressConfig(compress, compress_ratio)
    torch.set_num_threads(threads)
    ds = Datastore.open(datastore)
    if retriever == "lexical":
        if lexical_index is None or index_dir is not None or server is not None:
            raise click.UsageError("--retriever lexical takes --lexical-index (and neither --index nor --server)")
        from retromem.index.lexical import LexicalIndex

        searcher = LexicalIndex.open(lexical_index, datastore=ds)
        source = f"bm25 {lexical_index}"
    else:
        if lexical_index is not None:
            raise click.UsageError("--lexical-index goes with --retriever lexical")
        searcher = open_retriever(index_dir, server, token_file, tls_ca, datastore=ds)
        source = server or str(index_dir)
    lm, tok = load_causal_lm(model)
    compressor = make_compressor(ccfg, tok, model=lm, summary_tokenizer=tok)
    runner = None
    if executor == "ray" or workers != 1:
        from retromem.datastore.executors import make_executor
        from retromem.retro.ralm import RalmModel, RalmRunner

        run_on = make_executor(executor, workers, ray_address)
        runner = RalmRunner(run_on, RalmModel(node_path(model), threads), shards=run_on.parallelism)
    res = evaluate_ralm(lm, tok, searcher, ds, cfg, progress=True, compressor=compressor, runner=runner)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"model": model, "datastore": str(ds.path), "retriever": retriever, "retriever_source": source,
              **res.as_dict()}
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


@group.command("qa")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Causal LM that answers: a built-in name, a local directory or a hub id (frozen).")
@click.option("--datastore", required=True, type=click.Path(exists=True, file_okay=False),
              help="Datastore of dictionary entries (one document per entry, source ids = answer_id).")
@click.option("--qa", "qa_path", required=True, type=click.Path(dir_okay=False),
              help="gcide-qa JSONL(.gz) of {query, answer_id, answer}.")
@click.option("--index", "index_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Dense index over --datastore (the `dense` setting).")
@click.option("--lexical-index", default=None, type=click.Path(exists=True, file_okay=False),
              help="BM25 index over --datastore (the `bm25` setting).")
@click.option("--out", "-o", required=True, help="Output directory: results.json and qa.png (and generations/).")
@click.option("--questions", type=int, default=500, show_default=True, help="Questions for retrieval recall (first in the file).")
@click.option("--lm-questions", type=int, default=200, show_default=True,
              help="The first this many of them are answered by the LM (0: recall only).")
@click.option("-k", type=int, default=3, show_default=True, help="Entries in the prompt.")
@click.option("--search-k", type=int, default=50, show_default=True, help="Chunks retrieved per question.")
@click.option("--entry-chars", type=int, default=160, show_default=True, help="Characters of each entry shown.")
@click.option("--max-new-tokens", type=int, default=5, show_default=True, help="Greedy tokens generated.")
@click.option("--compress", default="none",
              type=click.Choice(["none", "summary", "similarity", "surprisal", "extractive", "truncate"]), show_default=True,
              help="TCRA-LLM: compress the retrieved entries before the prompt (summary: the small LM summarises; "
                   "similarity / surprisal: drop the sentences least like the question / the least surprising words; "
                   "extractive: model-free word-overlap fallback; truncate: the first tokens, the control).")
@click.option("--compress-ratio", type=float, default=0.5, show_default=True,
              help="Share of each entry's tokens kept by --compress.")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--random-seed", type=int, default=0, show_default=True, help="Random entries and bootstrap.")
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--threads", type=int, default=2, show_default=True)
@handle_errors
def ralm_qa(model: str, datastore: str, qa_path: str, index_dir: str | None, lexical_index: str | None, out: str,
            questions: int, lm_questions: int, k: int, search_k: int, entry_chars: int, max_new_tokens: int,
            batch_size: int, random_seed: int, bootstrap: int, threads: int, compress: str = "none",
            compress_ratio: float = 0.5) -> None:
    """Question answering on gcide-qa: recall@1/@10 of the answer entry for the dense index and BM25, and
    the LM's accuracy closed-book, with the top-k dense / BM25 entries, the gold entry (oracle) and k
    random entries in its prompt, with Wilson intervals and paired comparisons; resumable into --out."""
    import torch

    from retromem.config import non_negative_int, positive_int
    from retromem.datastore import Datastore
    from retromem.retro.qa import QaConfig, evaluate_qa, load_qa_items, plot_qa, recall_report

    positive_int(questions, "questions", flag="--questions")
    non_negative_int(lm_questions, "lm_questions", flag="--lm-questions")
    if index_dir is None and lexical_index is None:
        raise click.UsageError("give --index (dense), --lexical-index (BM25) or both")
    cfg = QaConfig(k=k, search_k=search_k, entry_chars=entry_chars, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, random_seed=random_seed, bootstrap=bootstrap)
    from retromem.retro.compress import CompressConfig, make_compressor

    ccfg = CompressConfig(compress, compress_ratio)
    torch.set_num_threads(threads)
    ds = Datastore.open(datastore)
    retrievers = {}
    if index_dir is not None:
        from retromem.index.dense import DenseIndex

        retrievers["dense"] = DenseIndex.open(index_dir, datastore=ds)
    if lexical_index is not None:
        from retromem.index.lexical import LexicalIndex

        retrievers["bm25"] = LexicalIndex.open(lexical_index, datastore=ds)
    items = load_qa_items(qa_path, limit=questions)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    recall = recall_report(items, ds, retrievers, cfg)
    report = {"model": model, "datastore": str(ds.path), "qa": qa_path, "recall": recall}
    click.echo(f"recall      {recall['questions']} questions ({recall['missing']} answer entries not in the datastore)")
    for name, r in recall["retrievers"].items():
        click.echo(f"{name:<12}" + "  ".join(f"@{a} {v['rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                                             for a, v in ((x.split('@')[1], r[x]) for x in r)))
    for c in recall["comparisons"]:
        click.echo(f"{c['a']} - {c['b']} @{c['at']}: {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]  "
                   f"McNemar p {c['mcnemar_p']:.3g}")
    if lm_questions:
        from retromem.models import load_causal_lm

        lm, tok = load_causal_lm(model)
        compressor = make_compressor(ccfg, tok, model=lm, summary_tokenizer=tok)
        res = evaluate_qa(lm, tok, items[:lm_questions], ds, retrievers, cfg, cache_dir=out_dir / "generations",
                          progress=True, compressor=compressor)
        report.update(res)
        click.echo(f"answers     {res['questions']} questions, k = {k}")
        for name, s in res["settings"].items():
            click.echo(f"{name:<12}accuracy {s['rate']:.3f} [{s['low']:.3f}, {s['high']:.3f}]  ({s['correct']}/{s['n']})"
                       f"  prompt tokens {(res['prompt_tokens'].get(name) or float('nan')):.1f}")
        for c in res["comparisons"]:
            click.echo(f"{c['a'] + ' - ' + c['b']:<24}{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]  "
                       f"McNemar p {c['mcnemar_p']:.3g}{'  *' if c['excludes_zero'] else ''}")
    (out_dir / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    wrote = [str(out_dir / "results.json")]
    if lm_questions:
        wrote.append(str(plot_qa(report, out_dir / "qa.png", title=f"{Path(model).name}, {report['questions']} questions")))
    click.echo(f"wrote       {', '.join(wrote)}")
