"""Commands: `retromem index ngram build|query|score|eval-interpolation` (exact n-gram search over the
suffix array and the ∞-gram language model) and `retromem index fm build|query` (the compressed
FM-index), with their demo steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from retromem.cli._common import (PATH_OR_URL, fmt_bytes, handle_errors, local_out, parse_list, parse_number, parse_size,
                                  shard_executor_options)
from retromem.errors import ConfigError

VERBS = ["count", "find", "prob", "ntd", "infgram-prob", "infgram-ntd", "search"]


def _query(text: str, ids: bool):
    """A query as given on the command line: text, or comma/space separated token ids with --ids."""
    if not ids:
        return text
    return list(parse_list(text, "QUERY (with --ids)"))


def _cnf(text: str, ids: bool) -> list[list]:
    """infini-gram's query syntax: clauses joined by ' AND ', n-grams within a clause by ' OR '."""
    return [[_query(term, ids) for term in clause.split(" OR ")] for clause in text.split(" AND ")]


@click.group("ngram")
def group() -> None:
    """Exact n-gram search (infini-gram suffix array) and the ∞-gram language model."""


@click.group("fm")
def fm_group() -> None:
    """Compressed substring search over the datastore text (FM-index)."""


@group.command("build")
@click.argument("datastore_path", metavar="DATASTORE", type=PATH_OR_URL)
@click.option("--out", "-o", required=True, help="Output index directory.")
@click.option("--shard-tokens", default="1G", show_default=True, help="Tokens per shard (whole documents), e.g. 500M.")
@click.option("--cpus", type=int, default=0, show_default=True, help="Indexer processes (0: every core).")
@click.option("--mem", default="4GiB", show_default=True, help="Memory the suffix-array indexer may use.")
@shard_executor_options
@click.option("--overwrite", is_flag=True, help="Delete an existing index at --out first.")
@click.option("--json", "as_json", is_flag=True, help="Print the index manifest as JSON.")
@handle_errors
def build_ngram(datastore_path: str, out: str, shard_tokens: str, cpus: int, mem: str, executor: str, workers: int,
                ray_address: str | None, overwrite: bool, as_json: bool) -> None:
    """Build the infini-gram suffix-array index of DATASTORE (resumable: re-run to continue)."""
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    cfg = NgramBuildConfig(shard_tokens=parse_size(shard_tokens, "--shard-tokens"), cpus=cpus,
                           mem_bytes=parse_size(mem, "--mem"), executor=executor, workers=workers, ray_address=ray_address)
    with local_out(out, overwrite) as out_dir:  # a URL: built in a staging directory, then put there
        r = build_ngram_index(datastore_path, out_dir, cfg, overwrite=overwrite)
    m = r.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    if r.already_complete:
        click.echo(f"{out} is already complete for this datastore; nothing to do.")
    size = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
    tokens = m["counts"]["tokens"]
    click.echo(f"n-gram index  {out}  ({m['engine']['package']} {m['engine']['version']}, {m['token_dtype']})")
    click.echo(f"datastore     {m['datastore_id'][:16]}  {m['counts']['documents']:,} documents, {tokens:,} tokens, "
               f"{m['counts']['shards']} shard(s)")
    click.echo(f"size          {fmt_bytes(size)}  ({size / max(tokens, 1):.2f} bytes per token)")
    if not r.already_complete:
        click.echo(f"time          {r.seconds:.1f}s  ({tokens / max(r.seconds, 1e-9):,.0f} tokens/s), peak memory "
                   f"{fmt_bytes(r.peak_rss_bytes)}")


@group.command("query")
@click.argument("index_path", metavar="INDEX", type=PATH_OR_URL)
@click.argument("query")
@click.option("--verb", type=click.Choice(VERBS), default="count", show_default=True)
@click.option("--next", "next_token", default=None, help="The next token for prob / infgram-prob (one-token text, or an id with --ids).")
@click.option("--ids", is_flag=True, help="QUERY (and --next) are token ids, not text.")
@click.option("--limit", type=int, default=5, show_default=True, help="Occurrences, hits or tokens to show.")
@click.option("--datastore", "datastore_path", default=None, help="Datastore directory (default: the one the index records).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ngram_query(index_path: str, query: str, verb: str, next_token: str | None, ids: bool, limit: int,
                datastore_path: str | None, as_json: bool) -> None:
    """Query the n-gram index at INDEX. For --verb search, QUERY is a CNF: 'a OR b AND c'."""
    from dataclasses import asdict

    from retromem.index.ngram import NgramIndex

    idx = NgramIndex(index_path, datastore_path)
    q = _query(query, ids)
    if verb in ("prob", "infgram-prob"):
        if next_token is None:
            raise ConfigError(f"--verb {verb} needs --next TOKEN")
        nxt = parse_number(next_token, "--next (with --ids)") if ids else next_token
        res = idx.prob(q, nxt) if verb == "prob" else idx.infgram_prob(q, nxt)
    elif verb == "count":
        res = idx.count(q)
    elif verb == "find":
        res = idx.find(q, limit=limit)
    elif verb == "ntd":
        res = idx.next_token_distribution(q)
    elif verb == "infgram-ntd":
        res = idx.infgram_next_token_distribution(q)
    else:
        res = idx.search_documents(_cnf(query, ids), max_hits=limit)
    if as_json:
        d = asdict(res)
        if "tokens" in d:
            d["tokens"] = {str(k): v for k, v in d["tokens"].items()}
        click.echo(json.dumps(d, indent=2))
        return
    tok = idx.datastore.tokenizer
    if verb in ("find", "search"):
        click.echo(f"{res.count:,} {'occurrences' if verb == 'find' else 'matches'}" + (" (approx)" if getattr(res, "approx", False) else ""))
        hits = res.occurrences if verb == "find" else res.hits
        for h, p in zip(hits[:limit], idx.fetch(hits[:limit])):
            click.echo(f"- doc {h.doc_id} token {h.offset} -> chunk {h.chunk_id} (+{h.chunk_offset}), continuation {p.continuation_id}")
            click.echo("  " + click.style(p.text.replace("\n", " ")[:200], fg="green"))
    elif verb in ("ntd", "infgram-ntd"):
        extra = f", suffix of {res.suffix_len} tokens" if res.suffix_len is not None else ""
        click.echo(f"prompt count {res.prompt_count:,}{extra}{' (approx)' if res.approx else ''}")
        for t, c in res.top(limit):
            click.echo(f"  {tok.decode([t])!r:>20}  id {t:>6}  count {c.count:>8,}  p {c.prob:.4f}")
    else:
        click.echo(repr(res))


@fm_group.command("build")
@click.argument("datastore_path", metavar="DATASTORE", type=PATH_OR_URL)
@click.option("--out", "-o", required=True, help="Output index directory.")
@click.option("--backend", type=click.Choice(["compact", "fm-index"]), default="compact", show_default=True,
              help="compact: our zstd-compressed FM-index; fm-index: the fm-index package (larger).")
@click.option("--sample-rate", type=int, default=32, show_default=True, help="compact: keep every n-th suffix-array entry.")
@click.option("--shard-size", default="512MiB", show_default=True,
              help="compact: text per shard (whole documents); a shard's build holds ~14 bytes per text byte.")
@shard_executor_options
@click.option("--overwrite", is_flag=True, help="Delete an existing index at --out first.")
@handle_errors
def build_fm(datastore_path: str, out: str, backend: str, sample_rate: int, shard_size: str, executor: str, workers: int,
             ray_address: str | None, overwrite: bool) -> None:
    """Build the FM-index (compressed exact substring search) of DATASTORE's normalized text."""
    from retromem.index.fm_index import build_fm_index

    with local_out(out, overwrite) as out_dir:  # a URL: built in a staging directory, then put there
        r = build_fm_index(datastore_path, out_dir, backend=backend, sample_rate=sample_rate,
                           shard_bytes=parse_size(shard_size, "--shard-size"), executor=executor, workers=workers,
                           ray_address=ray_address, overwrite=overwrite)
    m = r.manifest
    if r.already_complete:
        click.echo(f"{out} is already complete for this datastore; nothing to do.")
    click.echo(f"FM-index      {out}  ({m['backend']}: {m['library']['package']} {m['library']['version']})")
    click.echo(f"size          {fmt_bytes(m['index_bytes'])} for {fmt_bytes(m['text_bytes'])} of text: "
               f"{m['size_ratio']:.0%} of the corpus bytes" + (f", {len(m['shards'])} shard(s)" if m.get("shards") else "")
               + ("" if r.already_complete else f"; built in {r.seconds:.1f}s"))


@fm_group.command("query")
@click.argument("index_path", metavar="INDEX", type=PATH_OR_URL)
@click.argument("pattern")
@click.option("--limit", type=int, default=3, show_default=True, help="Hits to show with their context.")
@click.option("--window", type=int, default=80, show_default=True, help="Characters of context either side.")
@click.option("--datastore", "datastore_path", default=None)
@handle_errors
def fm_query(index_path: str, pattern: str, limit: int, window: int, datastore_path: str | None) -> None:
    """Count PATTERN (any substring) with the FM-index at INDEX and show the first hits in their documents."""
    from retromem.index.fm_index import FMIndex

    fm = FMIndex(index_path, datastore_path)
    f = fm.find(pattern, limit=limit)
    click.echo(f"{f.count:,} occurrences")
    for h in f.hits:
        c = fm.context(h, len(pattern), window)
        click.echo(f"- doc {h.doc_id} char {h.offset} -> chunk {h.chunk_id}")
        click.echo("  " + (c.text[: c.match_start] + click.style(c.text[c.match_start : c.match_end], fg="green")
                           + c.text[c.match_end :]).replace("\n", " "))


@group.command("score")
@click.argument("index_path", metavar="INDEX", type=PATH_OR_URL)
@click.argument("text")
@click.option("--datastore", "datastore_path", default=None, help="Datastore directory (default: the one the index records).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ngram_score(index_path: str, text: str, datastore_path: str | None, as_json: bool) -> None:
    """Per-token ∞-gram probabilities of TEXT (each token given all the tokens before it)."""
    from dataclasses import asdict

    from retromem.index.ngram import NgramIndex

    idx = NgramIndex(index_path, datastore_path)
    scores = idx.score(text)
    if as_json:
        click.echo(json.dumps([asdict(s) for s in scores], indent=2))
        return
    tok = idx.datastore.tokenizer
    for s in scores:
        click.echo(f"{tok.decode([s.token_id])!r:>20}  p {s.prob:.4f}  suffix {s.suffix_len:>3}  "
                   f"({s.cont_count:,}/{s.prompt_count:,})")
    nz = [s.prob for s in scores if s.prob > 0]
    click.echo(f"{len(scores)} tokens, {len(nz)} with nonzero ∞-gram probability"
               + (f", mean log2 p of those {sum(math.log2(p) for p in nz) / len(nz):.2f}" if nz else ""))


@group.command("eval-interpolation")
@click.argument("index_path", metavar="INDEX", type=PATH_OR_URL)
@click.option("--heldout", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSONL (.gz/.zst) of held-out test documents, not in the datastore.")
@click.option("--validation", default=None, type=click.Path(exists=True, dir_okay=False),
              help="JSONL of held-out validation documents (disjoint from --heldout) to tune the two weights on; "
                   "default: split --heldout by document (--validation-fraction, --seed).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--model", default="smollm2-135m", show_default=True, help="Hugging Face causal LM (built-in name, directory or hub id).")
@click.option("--max-docs", type=int, default=24, show_default=True, help="Documents per split (validation, test).")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="Whole documents, each capped at this many tokens.")
@click.option("--prefix-tokens", type=int, default=384, show_default=True,
              help="Also report each test document's first N tokens (same weights), beside the whole-document figure.")
@click.option("--lambdas", default="0,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95", show_default=True,
              help="Grid each ∞-gram weight (sparse, non-sparse) is tuned over on the validation documents.")
@click.option("--validation-fraction", type=float, default=0.5, show_default=True)
@click.option("--bootstrap", type=int, default=1000, show_default=True, help="Bootstrap resamples of documents.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--plot", default=None, help="Write a PNG of perplexity against one weight here.")
@click.option("--datastore", "datastore_path", default=None)
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ngram_eval_interpolation(index_path: str, heldout: str, validation: str | None, text_field: str, model: str,
                             max_docs: int, max_tokens: int, prefix_tokens: int, lambdas: str, validation_fraction: float,
                             bootstrap: int, seed: int, plot: str | None, datastore_path: str | None, as_json: bool) -> None:
    """Perplexity of a causal LM alone and interpolated with the ∞-gram LM (the paper's two weights,
    sparse and non-sparse estimates, tuned on validation documents), on held-out test documents."""
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_lm import InterpolationConfig, evaluate_interpolation, plot_interpolation, read_heldout

    lams = parse_list(lambdas, "--lambdas", float)
    cfg = InterpolationConfig(model=model, max_docs=max_docs, max_tokens=max_tokens, prefix_tokens=prefix_tokens,
                              lambdas=lams, validation_fraction=validation_fraction, bootstrap=bootstrap, seed=seed)
    idx = NgramIndex(index_path, datastore_path)
    if validation:
        texts, val = read_heldout(heldout, text_field), read_heldout(validation, text_field)
    else:
        texts, val = read_heldout(heldout, text_field), None
    res = evaluate_interpolation(idx, texts, cfg, validation=val)
    if plot:
        plot_interpolation(res, plot)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    click.echo(f"model {model}; weights tuned on {res.validation.documents} validation documents "
               f"({res.validation.tokens:,} tokens): λ_sparse {res.lambda_sparse}, λ_dense {res.lambda_dense} "
               f"(one weight: {res.lambda_single})")
    for name, f in (("test, whole documents", res.test), (f"test, first {res.prefix_tokens} tokens", res.test_prefix),
                    ("validation (tuned on)", res.validation)):
        r, lo, hi = f.ratio
        click.echo(f"{name}: {f.documents} documents, {f.tokens:,} tokens")
        click.echo(f"  LM alone {f.lm_perplexity:.3f}  interpolated {f.interpolated_perplexity:.3f}  "
                   f"({r - 1:+.1%}, 95% CI {lo - 1:+.1%} .. {hi - 1:+.1%} over documents)  one weight {f.single_lambda_perplexity:.3f}")
        click.echo(f"  sparse ∞-gram estimates on {f.sparse_fraction:.1%} of tokens ({f.sparse_correct:.1%} of them right); "
                   f"nonzero on {f.nonzero_fraction:.1%}; mean suffix length {f.mean_suffix_len:.1f}")
    if plot:
        click.echo(f"plot: {plot}")


def demo(out_dir: Path, datastore_path: Path, echo) -> None:
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    r = build_ngram_index(datastore_path, out_dir / "ngram", NgramBuildConfig(), progress=False)
    m = r.manifest
    size = sum(f.stat().st_size for f in (out_dir / "ngram").rglob("*") if f.is_file())
    echo(f"index of {m['counts']['tokens']:,} tokens in {m['counts']['shards']} shard(s), "
         f"{size / max(m['counts']['tokens'], 1):.2f} bytes per token" + ("" if r.already_complete else f", built in {r.seconds:.1f}s"))
    idx = NgramIndex(out_dir / "ngram", datastore_path)
    for q in (" list comprehension", " the Python interpreter", " lambda"):
        echo(f"count({q!r}) = {idx.count(q).count:,}")
    prompt, nxt = "Nobody has written this exact prompt before, so the Python", " interpreter"
    p = idx.infgram_prob(prompt, nxt)
    echo(f"∞-gram P({nxt!r} | {prompt!r}) = {p.prob:.3f}, backing off to the last {p.suffix_len} tokens "
         f"({p.cont_count}/{p.prompt_count})")
    d = idx.next_token_distribution(" for x in")
    top = ", ".join(f"{idx.datastore.tokenizer.decode([t])!r} {c.prob:.2f}" for t, c in d.top(3))
    echo(f"next tokens after ' for x in' ({d.prompt_count} occurrences): {top}")
    f = idx.find(" list comprehension", limit=1)
    if f.occurrences:
        h = f.occurrences[0]
        (p,) = idx.fetch([h])
        echo(f"find(' list comprehension'): {f.count} occurrences; first in doc {h.doc_id} at token {h.offset} "
             f"-> chunk {h.chunk_id}:")
        echo("  " + p.text.replace("\n", " ")[:160])
        if p.continuation_text is not None:
            echo(f"  continuation (chunk {p.continuation_id}): " + p.continuation_text.replace("\n", " ")[:120])


def demo_fm(out_dir: Path, datastore_path: Path, echo) -> None:
    from retromem.index.fm_index import FMIndex, build_fm_index
    from retromem.index.ngram import NgramIndex

    r = build_fm_index(datastore_path, out_dir / "fm", progress=False)
    m = r.manifest
    echo(f"FM-index of {fmt_bytes(m['text_bytes'])} of text: {fmt_bytes(m['index_bytes'])} ({m['size_ratio']:.0%} of the corpus)")
    fm = FMIndex(out_dir / "fm", datastore_path)
    sa = NgramIndex(out_dir / "ngram", datastore_path)
    for q in ("list comprehension", " list comprehension", "comprehens"):
        echo(f"FM count({q!r}) = {fm.count(q):,}   suffix-array token count = "
             + (f"{sa.count(q).count:,}" if q.startswith(" ") else "n/a (not on token boundaries)"))
    f = fm.find("generator expression", limit=1)
    if f.hits:
        c = fm.context(f.hits[0], len("generator expression"), 60)
        echo(f"find('generator expression'): {f.count} hits; first in doc {c.doc_id}, chunk {c.chunk_id}: "
             + c.text.replace("\n", " "))
