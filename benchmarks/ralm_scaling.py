"""In-context retrieval augmentation of SmolLM2-135M and the datastore scaling curve, small enough for a
loaded CPU: a python-docs slice (the first ``--docs`` documents of ``../shared/corpora/python-docs``,
each cut to ``--max-chars``) as the datastore, SmolLM2 tokenizer, 64-token chunks, all-MiniLM-L6-v2
embeddings in an exact (Flat) index; the held-out documents of its eval split are scored with no
retrieval, retrieved chunks, random same-length chunks and another query's chunks, over datastore
subsamples (:mod:`retromem.retro.ralm`). Prints the figures; writes results.json and the plot.

    .venv/bin/python benchmarks/ralm_scaling.py --work /work/scratch/ralm --plot benchmarks/ralm_scaling.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path


def build_store(work: Path, docs: int, max_chars: int):
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    work.mkdir(parents=True, exist_ok=True)
    ds_dir, idx_dir = work / "ds", work / "idx"
    if not (ds_dir / "manifest.json").is_file():
        src = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "python-docs.jsonl.gz"
        with gzip.open(src, "rt") as f, open(work / "docs.jsonl", "w") as out:
            for i, line in enumerate(f):
                if i >= docs:
                    break
                r = json.loads(line)
                out.write(json.dumps({"id": r["id"], "text": r["text"][:max_chars]}) + "\n")
        t = time.time()
        build(BuildConfig(inputs=(str(work / "docs.jsonl"),), out=str(ds_dir), workers=1))
        print(f"datastore built in {time.time() - t:.0f}s")
    ds = Datastore.open(ds_dir)
    if not (idx_dir / "index.json").is_file():
        t = time.time()
        emb = embed_datastore(EmbedConfig(datastore=str(ds_dir), out=str(work / "emb"), batch_size=64), progress=False)
        build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(idx_dir), factory="Flat", tune=False),
                    progress=False)
        print(f"embedded {ds.num_chunks:,} chunks and built the index in {time.time() - t:.0f}s")
    return ds, DenseIndex.open(idx_dir, datastore=ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/scratch/ralm")
    ap.add_argument("--plot", default="benchmarks/ralm_scaling.png")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--max-chars", type=int, default=5000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--max-docs", type=int, default=12)
    ap.add_argument("--max-doc-tokens", type=int, default=160)
    ap.add_argument("--context-tokens", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--query-tokens", type=int, default=32)
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--deep-k", type=int, default=100)
    ap.add_argument("--fractions", default="0.1,0.3,1")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--decontam-ngram", type=int, default=13)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from retromem.models import load_causal_lm
    from retromem.retro.ralm import RalmConfig, evaluate_ralm, plot_scaling

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ds, idx = build_store(work, args.docs, args.max_chars)
    model, tok = load_causal_lm(args.model)
    cfg = RalmConfig(stride=args.stride, query_tokens=args.query_tokens, context_tokens=args.context_tokens, k=args.k,
                     deep_k=args.deep_k, max_docs=args.max_docs, max_doc_tokens=args.max_doc_tokens,
                     eval_fraction=args.eval_fraction, fractions=tuple(float(f) for f in args.fractions.split(",")),
                     seeds=tuple(int(s) for s in args.seeds.split(",")), decontam_ngram=args.decontam_ngram)
    t = time.time()
    res = evaluate_ralm(model, tok, idx, ds, cfg, progress=True)
    seconds = time.time() - t
    report = {"model": args.model, "datastore": str(ds.path), "documents_in_datastore": ds.num_documents,
              "chunks": ds.num_chunks, "seconds": seconds, **res.as_dict()}
    (work / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_scaling(res, args.plot, title=f"SmolLM2-135M, python-docs slice, {len(res.doc_ids)} held-out documents")

    print(f"datastore {ds.num_documents} documents, {ds.num_chunks:,} chunks, {res.datastore_tokens:,} tokens outside the "
          f"{len(res.doc_ids)} evaluated documents; {res.tokens_scored:,} tokens scored in {seconds:.0f}s")
    print("| setting | perplexity | NLL |\n| --- | ---: | ---: |")
    for name, s in res.settings.items():
        print(f"| {name} | {s['ppl']:.3f} | {s['nll']:.4f} |")
    print("\n| difference (a - b) | dNLL | 95% interval | ppl ratio |\n| --- | ---: | --- | ---: |")
    for d in res.differences:
        print(f"| {d['a']} - {d['b']} | {d['delta_nll']:+.4f} | [{d['low']:+.4f}, {d['high']:+.4f}] | {d['ppl_ratio']:.3f} |")
    print("\n| fraction | seed | datastore tokens | ppl | vs none (dNLL, 95%) | vs random (dNLL, 95%) | chunks/block |")
    print("| ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for r in res.scaling:
        v, w = r["vs_none"], r["vs_random"]
        print(f"| {r['fraction']:g} | {r['seed']} | {r['datastore_tokens']:,} | {r['ppl']:.3f} | "
              f"{v['delta_nll']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] | "
              f"{w['delta_nll']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}] | {r['mean_chunks']:.2f} |")
    print(f"\ndecontamination: {res.decontamination}")


if __name__ == "__main__":
    main()
