"""Can `retromem retro eval` see a model read its neighbours? A positive control on planted copies.

A tiny corpus where every document has an exact copy under another id (16 demo-corpus documents cut
to 2,500 characters, plus their copies; dedup off), GPT-2 tokens in 32-token chunks, a Flat
all-MiniLM-L6-v2 index, neighbours (k = 2, own document excluded) with 25% of documents held out.
A held-out chunk's best neighbour is then its copy plus continuation, which holds the very next
chunk, so copying pays. Two tiny from-scratch RETRO models (configs/retro/tiny-scratch.yaml) train
the same steps on the same sequences, one with retrieved neighbours and one with random ones
(`neighbours_mode: random`, the control); `retro eval` then scores both on the held-out documents.

This checks the evaluation's power, not a retrieval claim: the copies of held-out documents sit in
the training split, so both models also saw the held-out text in training.

The modeling ablation: ``--variant NAME=JSON`` trains one more model with retrieved neighbours and
those ``from_scratch`` fields (``--variant after_layer='{"cca_placement": "after_layer"}'``), same
seed, sequences and steps; each is scored with retrieved / random / no neighbours, and its per-token
NLL with retrieved neighbours is compared with the main model's on the same tokens (paired bootstrap
over held-out documents). The main model takes the paper's CCA choices (``retromem retro train``'s
default for from-scratch configs); runs before those options existed used ``after_layer`` without
positions, so old run directories are not resumed (their names carry no variant).

Usage:
  python benchmarks/retro_planted_copies.py [--steps 300] [--threads 1] [--out /work/scratch/retro/planted] \
      [--variant NAME=JSON ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/work/scratch/retro/planted")
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON from_scratch fields (ablation)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.assets import demo_corpus
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.datastore.dedup import DedupConfig
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.retro.evaluation import RetroEvalConfig, evaluate, format_difference
    from retromem.retro.loading import load_retro_model
    from retromem.retro.neighbours import NeighbourTable, NeighboursConfig, compute_neighbours
    from retromem.retro.training import load_train_config, train

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ds").exists():
        with gzip.open(demo_corpus(), "rt", encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh][12:28]
        docs = [{"id": d["id"], "text": d["text"][:2500]} for d in docs]
        docs += [{"id": f"{d['id']}-copy", "text": d["text"]} for d in docs]
        (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        build(BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(root / "ds"), tokenizer="gpt2", chunk_length=32,
                          shard_bytes=100_000, workers=1, dedup=DedupConfig(exact=False, near=False)))
    ds = Datastore.open(root / "ds")
    if not (root / "idx").exists():
        emb = embed_datastore(EmbedConfig(datastore=str(ds.path), out=str(root / "emb"), batch_size=64), progress=False)
        build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "idx"), factory="Flat", tune=False),
                    progress=False)
    index = DenseIndex.open(root / "idx", datastore=ds)
    neighbours = [str(compute_neighbours(NeighboursConfig(datastore=str(ds.path), out=str(root / f"nb-{split}"), k=2,
                                                          split=split, eval_fraction=0.25, split_seed=0),
                                         index, progress=False).out) for split in ("train", "eval")]
    print(f"datastore   {ds.num_documents} documents, {len(ds.chunk_doc_array)} chunks of 32 GPT-2 tokens")
    final = {}
    runs = {"retrieved": ("retrieved", {}), "random": ("random", {})}
    for spec in args.variant:
        name, _, fields = spec.partition("=")
        runs[name] = ("retrieved", json.loads(fields))
    for name, (mode, fields) in runs.items():
        t0 = time.perf_counter()
        cfg = load_train_config(REPO / "configs/retro/tiny-scratch.yaml", output_dir=str(root / f"run-{name}-{args.steps}"),
                                datastore=str(ds.path), neighbours=neighbours, neighbours_mode=mode,
                                train={"max_steps": args.steps, "save_steps": args.steps, "eval_steps": None,
                                       "logging_steps": 50, "threads": args.threads})
        if fields:
            cfg = type(cfg)(**{**cfg.__dict__, "from_scratch": {**cfg.from_scratch, **fields}})
        r = train(cfg, resume=True)
        final[name] = r.final_dir
        print(f"training    [{name}] {r.steps} steps, train loss {r.train_loss:.3f}, "
              f"{time.perf_counter() - t0:.0f}s this run")
    model, control = load_retro_model(final["retrieved"])[0], load_retro_model(final["random"])[0]
    ecfg = RetroEvalConfig(out=str(root / f"eval-{args.steps}"), seq_chunks=4, max_sequences=None, overlap_ngram=8)
    s = evaluate(model, ds, NeighbourTable(neighbours, ds), ecfg, control=control, progress=False,
                 title=f"planted copies: tiny RETRO, {args.steps} steps")
    print(f"evaluation  {s['sequences']} sequences of {s['sequence_tokens']} tokens from {s['held_out_documents']} "
          f"held-out documents; mean 8-gram overlap with the neighbours read: retrieved "
          f"{s['random_neighbours']['mean_overlap_retrieved']:.3f}, random {s['random_neighbours']['mean_overlap_random']:.3f}")
    for name, v in s["settings"].items():
        print(f"  {name:<12} perplexity {v['perplexity']:8.2f}   bits/byte {v['bits_per_byte']:.4f}")
    print(f"differences, mean NLL nats/token, {ecfg.level:.0%} paired bootstrap over documents:")
    for name, d in s["differences"].items():
        print(f"  {name:<26} {format_difference(d, 'documents')}")
    for b in s["leakage_buckets"]:
        print(f"  overlap {b['overlap']:<14} {b['chunks']:4d} chunks  retrieved - random "
              f"{format_difference(b['retro - retro_random'], 'documents')}")
    print(f"results     {root / f'eval-{args.steps}' / 'results.json'}  plot {s['plot']}")
    if args.variant:
        ablation(root, ds, neighbours, final, args, ecfg)


def chunk_token_nll(path: Path, setting: str) -> tuple:
    """(per-token NLL, document of each token, chunk ids) from an evaluation's chunks.jsonl (each chunk's
    mean NLL spread over its tokens)."""
    import numpy as np

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokens = np.array([r["tokens"] for r in rows])
    nll = np.repeat(np.array([r[f"nll_{setting}"] for r in rows]) / tokens, tokens)
    return nll, np.repeat(np.array([r["doc_id"] for r in rows]), tokens), [r["chunk_id"] for r in rows]


def ablation(root: Path, ds, neighbours: list[str], final: dict, args, ecfg) -> None:
    """Scores every --variant like the main model and compares them on the same tokens."""
    from dataclasses import replace

    from retromem.retro.evaluation import evaluate, format_difference
    from retromem.retro.loading import load_retro_model
    from retromem.retro.neighbours import NeighbourTable
    from retromem.stats import paired_bootstrap

    main_nll, groups, main_chunks = chunk_token_nll(Path(ecfg.out) / "chunks.jsonl", "retro")
    print("ablation    each variant with retrieved neighbours minus the main model (paper's CCA) with retrieved "
          "neighbours, and its own retrieved - random, nats/token, 95% over documents:")
    for name in [n for n in final if n not in ("retrieved", "random")]:
        model = load_retro_model(final[name])[0]
        vcfg = replace(ecfg, out=str(root / f"eval-{name}-{args.steps}"))
        s = evaluate(model, ds, NeighbourTable(neighbours, ds), vcfg, progress=False, title=f"planted copies [{name}]")
        nll, g, chunks = chunk_token_nll(Path(vcfg.out) / "chunks.jsonl", "retro")
        assert chunks == main_chunks and (g == groups).all()  # the same tokens
        r = paired_bootstrap(nll, main_nll, groups=groups, n=ecfg.bootstrap, seed=ecfg.seed, level=ecfg.level)
        print(f"  {name:<22} variant - main {r.mean:+.4f} [{r.low:+.4f}, {r.high:+.4f}]   retrieved - random "
              f"{format_difference(s['differences']['retro - retro_random'], 'documents')}   perplexity "
              f"{s['settings']['retro']['perplexity']:.2f}")


if __name__ == "__main__":
    main()
