"""Question answering on gcide-qa (issue 16): retrieval recall@1/@10 of the answer entry for the dense index
and for BM25 over the same datastore, and SmolLM2-135M answering closed-book, with the top-k dense or BM25
entries in its prompt, with the gold entry (oracle) and with k random entries (:mod:`retromem.retro.qa`).

Datastore: embedding all 126,225 gcide entries on a shared 2-core CPU is too slow, so the datastore is a
subset: the answer entry of every evaluated question plus a seeded random sample of other entries,
``--entries`` in all, built with the ordinary datastore build (SmolLM2 tokenizer, 64-token chunks, default
dedup), embedded with all-MiniLM-L6-v2 into an exact (Flat) FAISS index, and indexed with BM25
(:mod:`retromem.index.lexical`). With ``--full-bm25`` BM25 recall is also measured over a datastore of
all 126,225 entries (reported separately). Every stage is resumable into ``--work``: re-run the same
command after a kill and it carries on (LM generations are saved per block of questions).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/gcide_qa.py --work /work/scratch/qa/gcide \\
        --threads 1 --plot benchmarks/gcide_qa.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import time
from pathlib import Path

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def write_subset(work: Path, answer_ids: set[str], entries: int, seed: int) -> dict:
    """docs.jsonl: every answer entry plus a seeded sample of the others, ``entries`` in all, in
    dictionary order."""
    with gzip.open(CORPORA / "gcide.jsonl.gz", "rt") as f:
        recs = [json.loads(line) for line in f]
    others = [i for i, r in enumerate(recs) if r["id"] not in answer_ids]
    keep = set(random.Random(seed).sample(others, max(0, entries - len(answer_ids))))
    n = 0
    with open(work / "docs.jsonl", "w") as out:
        for i, r in enumerate(recs):
            if i in keep or r["id"] in answer_ids:
                out.write(json.dumps({"id": r["id"], "text": r["text"]}) + "\n")
                n += 1
    return {"entries": n, "answers": len(answer_ids), "gcide_entries": len(recs)}


def build_store(work: Path, answer_ids: set[str], entries: int, seed: int):
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.index.lexical import LexicalIndex, build_lexical_index

    work.mkdir(parents=True, exist_ok=True)
    ds_dir, idx_dir, bm_dir = work / "ds", work / "idx", work / "bm25"
    if not (ds_dir / "manifest.json").is_file():
        if not (work / "subset.json").is_file():
            (work / "subset.json").write_text(json.dumps(write_subset(work, answer_ids, entries, seed)) + "\n")
        t = time.time()
        build(BuildConfig(inputs=(str(work / "docs.jsonl"),), out=str(ds_dir), workers=1))
        print(f"datastore built in {time.time() - t:.0f}s", flush=True)
    ds = Datastore.open(ds_dir)
    if not (idx_dir / "index.json").is_file():
        t = time.time()
        emb = embed_datastore(EmbedConfig(datastore=str(ds_dir), out=str(work / "emb"), batch_size=64), progress=False)
        build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(idx_dir), factory="Flat", tune=False),
                    progress=False)
        print(f"embedded {ds.num_chunks:,} chunks and built the index in {time.time() - t:.0f}s", flush=True)
    t = time.time()
    r = build_lexical_index(ds_dir, bm_dir, progress=False)
    if not r.already_complete:
        print(f"BM25 over {ds.num_chunks:,} chunks built in {time.time() - t:.0f}s", flush=True)
    return ds, DenseIndex.open(idx_dir, datastore=ds), LexicalIndex.open(bm_dir, datastore=ds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/scratch/qa/gcide")
    ap.add_argument("--plot", default="benchmarks/gcide_qa.png")
    ap.add_argument("--entries", type=int, default=20_000, help="gcide entries in the datastore")
    ap.add_argument("--recall-questions", type=int, default=500)
    ap.add_argument("--lm-questions", type=int, default=200)
    ap.add_argument("--block", type=int, default=20, help="questions per saved block of LM generations")
    ap.add_argument("-k", type=int, default=3, help="entries in the prompt")
    ap.add_argument("--entry-chars", type=int, default=160)
    ap.add_argument("--max-new-tokens", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full-bm25", action="store_true", help="also BM25 recall over all 126,225 entries")
    ap.add_argument("--stage", choices=("build", "recall", "all"), default="all")
    args = ap.parse_args()

    import torch

    from retromem.retro.qa import (QaConfig, evaluate_qa, load_qa_items, plot_qa, recall_report)

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    items = load_qa_items(CORPORA / "gcide-qa.jsonl.gz", limit=args.recall_questions)
    ds, dense, bm25 = build_store(work, {q.answer_id for q in items}, args.entries, args.seed)
    if args.stage == "build":
        return
    cfg = QaConfig(k=args.k, entry_chars=args.entry_chars, max_new_tokens=args.max_new_tokens,
                   random_seed=args.seed, block=args.block)
    t = time.time()
    recall = recall_report(items, ds, {"dense": dense, "bm25": bm25}, cfg)
    recall["seconds"] = time.time() - t
    if args.full_bm25:
        full = work / "full"
        full.mkdir(exist_ok=True)
        from retromem.datastore import BuildConfig, Datastore, build
        from retromem.index.lexical import LexicalIndex, build_lexical_index

        if not (full / "ds" / "manifest.json").is_file():
            t = time.time()
            build(BuildConfig(inputs=(str(CORPORA / "gcide.jsonl.gz"),), out=str(full / "ds"), workers=1))
            print(f"full datastore built in {time.time() - t:.0f}s", flush=True)
        fds = Datastore.open(full / "ds")
        build_lexical_index(full / "ds", full / "bm25", progress=False)
        recall["full_bm25"] = recall_report(items, fds, {"bm25": LexicalIndex.open(full / "bm25", datastore=fds)}, cfg)
    (work / "recall.json").write_text(json.dumps(recall, indent=1) + "\n")
    _print_recall(recall)
    if args.stage == "recall":
        return

    from retromem.models import load_causal_lm

    model, tok = load_causal_lm(args.model)
    t = time.time()
    res = evaluate_qa(model, tok, items[:args.lm_questions], ds, {"dense": dense, "bm25": bm25}, cfg,
                      cache_dir=work / "lm", progress=True)
    report = {"model": args.model, "datastore": str(ds.path), "documents_in_datastore": ds.num_documents,
              "chunks": ds.num_chunks, "subset": json.loads((work / "subset.json").read_text()),
              "seconds_this_run": time.time() - t, "recall": recall, **res}
    (work / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_qa(report, args.plot, title=f"SmolLM2-135M on gcide-qa ({res['questions']} questions, "
                                     f"{ds.num_documents:,}-entry datastore)")
    _print_lm(res)


def _print_recall(recall: dict) -> None:
    print(f"\nrecall over {recall['questions']} questions ({recall['missing']} answer entries missing from the datastore)")
    print("| retriever | recall@1 (95% Wilson) | recall@10 (95% Wilson) |\n| --- | --- | --- |")
    for name, r in recall["retrievers"].items():
        cells = [f"{r[f'recall@{k}']['rate']:.3f} [{r[f'recall@{k}']['low']:.3f}, {r[f'recall@{k}']['high']:.3f}]"
                 for k in (1, 10)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    for c in recall["comparisons"]:
        print(f"{c['a']} - {c['b']} @{c['at']}: {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], "
              f"McNemar p {c['mcnemar_p']:.3g} ({c['a_only']} vs {c['b_only']} discordant)")
    if "full_bm25" in recall:
        _print_recall(recall["full_bm25"])


def _print_lm(res: dict) -> None:
    print(f"\n{res['questions']} questions, k = {res['config']['k']}")
    print("| setting | accuracy (95% Wilson) | correct |\n| --- | --- | ---: |")
    for name, s in res["settings"].items():
        print(f"| {name} | {s['rate']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {s['correct']}/{s['n']} |")
    print("\n| comparison | difference (95% paired bootstrap) | McNemar p | discordant (a only / b only) |")
    print("| --- | --- | ---: | --- |")
    for c in res["comparisons"]:
        print(f"| {c['a']} - {c['b']} | {c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] | {c['mcnemar_p']:.3g} | "
              f"{c['a_only']} / {c['b_only']} |")


if __name__ == "__main__":
    main()
