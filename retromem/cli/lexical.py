"""Commands: `retromem index lexical build|search`, BM25 over a datastore's chunks (the library is
:mod:`retromem.index.lexical`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retromem.cli._common import fmt_bytes, handle_errors, snippet


@click.group("lexical")
def group() -> None:
    """Lexical retrieval: BM25 (the bm25s library) over a datastore's chunks."""


@group.command("build")
@click.argument("datastore_path", metavar="DATASTORE", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "-o", required=True, help="Output index directory.")
@click.option("--tokenization", type=click.Choice(["stopwords-en", "words"]), default="stopwords-en",
              show_default=True, help="Lowercased words of 2+ characters, English stop words dropped or kept.")
@click.option("--k1", type=float, default=1.5, show_default=True, help="BM25 term-frequency saturation.")
@click.option("--b", type=float, default=0.75, show_default=True, help="BM25 length normalisation.")
@click.option("--overwrite", is_flag=True, help="Delete an existing lexical index at --out first.")
@click.option("--json", "as_json", is_flag=True, help="Print the index manifest as JSON.")
@handle_errors
def build(datastore_path: str, out: str, tokenization: str, k1: float, b: float, overwrite: bool, as_json: bool) -> None:
    """Build the BM25 index of every chunk of DATASTORE (re-run: a finished index is kept)."""
    from retromem.index.lexical import LexicalBuildConfig, build_lexical_index

    r = build_lexical_index(datastore_path, out, LexicalBuildConfig(tokenization=tokenization, k1=k1, b=b),
                            overwrite=overwrite)
    m = r.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    if r.already_complete:
        click.echo(f"{out} is already complete for this datastore; nothing to do.")
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    c = m["counts"]
    click.echo(f"lexical index {out}  (bm25s {m['engine']['version']}, {m['bm25']['tokenization']}, "
               f"k1 {m['bm25']['k1']}, b {m['bm25']['b']})")
    click.echo(f"datastore     {m['datastore_id'][:16]}  {c['documents']:,} documents, {c['chunks']:,} chunks, "
               f"{c['terms']:,} terms, vocabulary {c['vocabulary']:,}")
    click.echo(f"size          {fmt_bytes(size)}")
    if not r.already_complete:
        click.echo(f"time          {r.seconds:.1f}s")


@group.command("search")
@click.argument("index_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", type=int, default=5, show_default=True)
@click.option("--datastore", default=None, type=click.Path(exists=True, file_okay=False),
              help="The datastore the index was built from (default: the path it records).")
@click.option("--exclude-doc", "exclude_docs", type=int, multiple=True, help="doc_id to exclude (every query).")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def search(index_dir: str, queries: tuple[str, ...], k: int, datastore: str | None, exclude_docs: tuple[int, ...],
           as_json: bool) -> None:
    """Search the BM25 index INDEX_DIR for each of QUERIES (texts); show hits with their continuation."""
    from retromem.index.lexical import LexicalIndex

    if datastore is not None:
        from retromem.datastore import Datastore

        idx = LexicalIndex.open(index_dir, datastore=Datastore.open(datastore))
    else:
        idx = LexicalIndex.open(index_dir)
    excl = [list(exclude_docs)] * len(queries) if exclude_docs else None
    res = idx.search(list(queries), k, exclude_doc_ids=excl, fetch=True)
    if as_json:
        out = [[{"chunk_id": p.chunk_id, "doc_id": p.doc_id, "score": float(s), "text": p.text,
                 "continuation_id": p.continuation_id, "continuation": p.continuation_text}
                for p, s in zip(res.payloads[i], res.scores[i])] for i in range(len(queries))]
        click.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    for i, q in enumerate(queries):
        click.echo(f"query: {q!r}")
        if not res.payloads[i]:
            click.echo("  (no chunk shares a term with the query)")
        for rank, (p, s) in enumerate(zip(res.payloads[i], res.scores[i]), 1):
            click.echo(f"  {rank}. chunk {p.chunk_id} (doc {p.doc_id})  bm25 {s:.3f}  {snippet(p.text, 110, quote=True)}")
