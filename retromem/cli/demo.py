"""Command: `retromem demo`, the main job on the built-in corpus.

The demo is an explicit, ordered list of steps. It always builds the demo datastore and reads it
back; then each step (one per part of retromem, defined beside that part's commands) runs on it
in the order of :data:`STEPS`. ``--only`` picks steps by the start of their title.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from retromem.cli import dense, memory, ngram, retro, service
from retromem.cli._common import handle_errors
from retromem.cli.datastore import print_summary

Echo = Callable[[str], None]
Step = Callable[[Path, Path, Echo], None]  # (demo directory, datastore directory, echo)

STEPS: tuple[tuple[str, Step], ...] = (
    ("dense index: embed the chunks, build FAISS, search with exclusion", dense.demo),
    ("n-gram search: infini-gram suffix array over the datastore", ngram.demo),
    ("FM-index: compressed substring search over the datastore text", ngram.demo_fm),
    ("gRPC service: serve the datastore and both indexes, query every RPC over loopback", service.demo),
    ("memory modules: Infini-attention and AutoCompressor on SmolLM2-135M", memory.demo),
    ("RETRO: neighbours job, then generation retrieving a fresh chunk at every chunk boundary", retro.demo),
)


def read_back(datastore_path: Path, echo: Echo) -> int:
    """Read a chunk, its RETRO neighbour unit and a whole document back; the chunk id shown."""
    from retromem.datastore import Datastore

    ds = Datastore.open(datastore_path)
    cid = ds.num_chunks // 2
    chunk = ds.chunks([cid])[0]
    _, lens = ds.neighbour_tokens([cid])
    echo(f"chunk {cid} (document {chunk.doc_id}, position {chunk.position}): {chunk.text[:160]!r}...")
    echo(f"RETRO neighbour unit (chunk + continuation): {int(lens[0])} tokens")
    doc_ids = ds.document_chunk_ids(chunk.doc_id)
    toks, lens = ds.tokens(doc_ids)
    tokens = [int(t) for row, n in zip(toks, lens) for t in row[:n]]
    same = ds.tokenizer.decode(tokens) == ds.document_text(chunk.doc_id)
    echo(f"decoding the {len(doc_ids)} chunks of document {chunk.doc_id} gives back its text: {same}")
    return cid


@click.command("demo")
@click.option("--out", default="retromem-demo", show_default=True, help="Directory for everything the demo builds.")
@click.option("--workers", type=int, default=0, show_default=True)
@click.option("--only", multiple=True, help="Run only the demo steps whose title starts with this (the datastore is always built).")
@handle_errors
def demo(out: str, workers: int, only: tuple[str, ...]) -> None:
    """Run the main job on the built-in corpus (Python tutorial and HOWTOs): build a datastore, read it
    back, then index, query and model it with every part of retromem."""
    from retromem.assets import demo_corpus
    from retromem.datastore import BuildConfig, build

    out_dir = Path(out)
    corpus = demo_corpus()
    steps = [s for s in STEPS if not only or any(s[0].startswith(o) for o in only)]
    total = 2 + len(steps)
    click.echo(f"[1/{total}] datastore build: {corpus.name} -> {out_dir / 'datastore'}")
    cfg = BuildConfig(inputs=(str(corpus),), out=str(out_dir / "datastore"), workers=workers)
    result = build(cfg)
    print_summary(result.manifest, result.seconds or None)
    click.echo(f"\n[2/{total}] datastore read: a chunk, its continuation, and a document round trip")
    cid = read_back(Path(cfg.out), click.echo)
    for i, (title, fn) in enumerate(steps, start=3):
        click.echo(f"\n[{i}/{total}] {title}")
        fn(out_dir, Path(cfg.out), click.echo)
    click.echo(f"\nnext: retromem datastore info {cfg.out}   |   retromem datastore show {cfg.out} {cid}")
