"""Does a RETRO model trained from scratch read its neighbours on real text? Retrieved against random
neighbours, beside the control run, on a CPU budget (issue 16).

Data: linux-docs (``../shared/corpora/linux-docs.jsonl.gz``), whose driver, media-format and ABI
pages repeat each other across documents. Documents are ranked by cross-document redundancy (the
share of their 25-word windows whose word 8-grams mostly occur in another document) and taken from
the top until ``--words`` words, each cut to ``--max-chars`` characters; the same word budget from
python-docs has far fewer such windows (the script prints both, ``select-stats.json``). The
datastore build keeps its defaults (SmolLM2 tokenizer, exact and near dedup), with ``--chunk-length``
token chunks (32); all-MiniLM-L6-v2 embeddings in an exact (Flat) index; neighbours (k = 2, chunk +
continuation, the chunk's own document excluded, no leakage filter: copying must be able to pay) of
every training chunk and every held-out chunk (``--eval-fraction`` of documents held out by hash).

Training: two from-scratch RETRO models from ``--config`` (``configs/retro/small-scratch-cpu.yaml``)
on the same sequences with the same seed and steps, one with retrieved neighbours and the control
with ``neighbours_mode: random``; ``--variant NAME=JSON`` adds models with other ``from_scratch``
fields (the modeling ablation: ``--variant after_layer='{"cca_placement": "after_layer"}'``), each
with its own control-free retrieved run scored on the same held-out sequences.

Evaluation: ``retromem.retro.evaluation.evaluate`` (retrieved / random / none / control, paired
bootstrap over held-out documents, leakage table by overlap bucket); ``--plot`` copies the leakage
plot into the repository.

Every stage is resumable (datastore, embeddings, index, neighbours and training skip finished
work; training resumes from its newest checkpoint). The two runs train side by side in two
processes, then one scores them:

    B="nice -n 5 .venv/bin/python benchmarks/retro_real_text.py --work /work/scratch/retro2/real --threads 1"
    OMP_NUM_THREADS=1 $B --stage data
    OMP_NUM_THREADS=1 $B --stage train --runs retrieved &  OMP_NUM_THREADS=1 $B --stage train --runs random &
    OMP_NUM_THREADS=1 $B --stage eval --plot benchmarks/retro_real_text.png
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"


# -- choosing documents with cross-document redundancy -------------------------------------------------


def window_sharing(docs: list[dict], ngram: int = 8, window: int = 25) -> list[list[float]]:
    """Per document, per ``window``-word window: the share of its word n-grams that occur in another document."""
    owner: dict[int, int] = {}
    grams = []
    for i, d in enumerate(docs):
        words = d["text"].split()
        g = [hash(tuple(words[j:j + ngram])) for j in range(len(words) - ngram + 1)]
        grams.append(g)
        for h in set(g):
            o = owner.get(h)
            owner[h] = i if o is None else (o if o == i else -1)  # -1: in two documents or more
    out = []
    for g in grams:
        wins = [g[s:s + window] for s in range(0, len(g), window)]
        out.append([sum(owner[h] == -1 for h in w) / len(w) for w in wins if len(w) >= 10])
    return out


def select_documents(corpus: str, words: int, max_chars: int) -> tuple[list[dict], dict]:
    """The most redundant documents of ``corpus`` (cut to ``max_chars``) up to ``words`` words, and statistics."""
    with gzip.open(CORPORA / f"{corpus}.jsonl.gz", "rt", encoding="utf-8") as fh:
        docs = [json.loads(line) for line in fh]
    docs = [{"id": d["id"], "text": d["text"][:max_chars]} for d in docs]
    sharing = window_sharing(docs)
    ranked = sorted(range(len(docs)), key=lambda i: (-sum(s > 0.5 for s in sharing[i]) / max(1, len(sharing[i])), i))
    chosen, total = [], 0
    for i in ranked:
        if total >= words:
            break
        chosen.append(i)
        total += len(docs[i]["text"].split())
    chosen.sort()  # corpus order, so the datastore's doc ids follow the corpus
    picked = [docs[i] for i in chosen]
    within = [s for w in window_sharing(picked) for s in w]
    stats = {"corpus": corpus, "documents": len(picked), "of_documents": len(docs), "words": total,
             "windows": len(within), "max_chars": max_chars,
             "share_windows_over_half_shared": sum(s > 0.5 for s in within) / len(within),
             "share_windows_over_0.8_shared": sum(s > 0.8 for s in within) / len(within),
             "share_windows_none_shared": sum(s == 0 for s in within) / len(within)}
    return picked, stats


# -- stages ----------------------------------------------------------------------------------------------


def build_store(work: Path, args: argparse.Namespace):
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    work.mkdir(parents=True, exist_ok=True)
    ds_dir, idx_dir = work / "ds", work / "idx"
    if not (ds_dir / "manifest.json").is_file():
        stats = {}
        for corpus in ("python-docs", "linux-docs"):  # the same budget from each, to say why linux-docs
            picked, stats[corpus] = select_documents(corpus, args.words, args.max_chars)
            print(f"select      {corpus}: {json.dumps(stats[corpus])}", flush=True)
            if corpus == args.corpus:
                with open(work / "docs.jsonl", "w", encoding="utf-8") as out:
                    out.writelines(json.dumps(d) + "\n" for d in picked)
        (work / "select-stats.json").write_text(json.dumps(stats, indent=2))
        t = time.perf_counter()
        build(BuildConfig(inputs=(str(work / "docs.jsonl"),), out=str(ds_dir), chunk_length=args.chunk_length,
                          workers=1))
        print(f"datastore   built in {time.perf_counter() - t:.0f}s", flush=True)
    ds = Datastore.open(ds_dir)
    dedup = ds.manifest["dedup"]
    print(f"datastore   {ds.num_documents} documents, {ds.manifest['counts']['tokens']:,} tokens, {ds.num_chunks:,} chunks "
          f"of {ds.chunk_length} tokens; dedup removed {dedup['removed_exact']} exact and {dedup['removed_near']} near "
          f"duplicates of {dedup['input_documents']}", flush=True)
    if not (idx_dir / "index.json").is_file():
        t = time.perf_counter()
        emb = embed_datastore(EmbedConfig(datastore=str(ds_dir), out=str(work / "emb"), batch_size=64), progress=True)
        print(f"embedded    {ds.num_chunks:,} chunks in {time.perf_counter() - t:.0f}s "
              f"({ds.num_chunks / (time.perf_counter() - t):.1f} chunks/s)", flush=True)
        build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(idx_dir), factory="Flat", tune=False),
                    progress=False)
    return ds, DenseIndex.open(idx_dir, datastore=ds)


def neighbours(work: Path, ds, index, args: argparse.Namespace) -> list[str]:
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    out = []
    for split in ("train", "eval"):
        t = time.perf_counter()
        res = compute_neighbours(NeighboursConfig(datastore=str(ds.path), out=str(work / f"nb-{split}"), k=2, split=split,
                                                  eval_fraction=args.eval_fraction, split_seed=0), index, progress=False)
        print(f"neighbours  {split}: {time.perf_counter() - t:.0f}s", flush=True)
        out.append(str(res.out))
    return out


def run_specs(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    """{run name: (neighbours_mode, from_scratch overrides)}: retrieved, random and every --variant."""
    runs = {"retrieved": ("retrieved", {}), "random": ("random", {})}
    for spec in args.variant:
        name, _, fields = spec.partition("=")
        runs[name] = ("retrieved", json.loads(fields))
    return runs


def run_dir(work: Path, name: str, args: argparse.Namespace) -> Path:
    return work / f"run-{name}-{args.steps}"


def train_runs(work: Path, ds, nb: list[str], args: argparse.Namespace) -> None:
    """Trains the runs named by --runs (default: all) one after the other; start one process per run to
    train them side by side."""
    from retromem.retro.training import load_train_config, train

    runs = run_specs(args)
    for name in args.runs or list(runs):
        mode, fields = runs[name]
        t0 = time.perf_counter()
        cfg = load_train_config(args.config, output_dir=str(run_dir(work, name, args)), datastore=str(ds.path),
                                neighbours=nb, neighbours_mode=mode,
                                train={"max_steps": args.steps, "save_steps": args.save_steps, "eval_steps": None,
                                       "threads": args.threads})
        if fields:
            cfg = type(cfg)(**{**cfg.__dict__, "from_scratch": {**cfg.from_scratch, **fields}})
        r = train(cfg, resume=True)
        print(f"training    [{name}] {r.steps} steps, train loss {r.train_loss:.3f}, "
              f"{time.perf_counter() - t0:.0f}s this run", flush=True)


def model_dirs(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """{run name: the model to score}: each run's final model, or its checkpoint-N with --eval-step N
    (a run cut short: the runs compare at the same step)."""
    out = {}
    for name in run_specs(args):
        d = run_dir(work, name, args)
        out[name] = d / f"checkpoint-{args.eval_step}" if args.eval_step else d / "final"
        if not out[name].is_dir():
            raise SystemExit(f"error: {out[name]} is missing: train the run first (--stage train --runs {name})")
    return out


def evaluation(work: Path, ds, nb: list[str], final: dict[str, Path], args: argparse.Namespace) -> None:
    from retromem.retro.evaluation import RetroEvalConfig, evaluate, format_difference
    from retromem.retro.loading import load_retro_model
    from retromem.retro.neighbours import NeighbourTable

    table = NeighbourTable(nb, ds)
    control = load_retro_model(final["random"])[0]
    for name in [n for n in final if n != "random"]:
        model = load_retro_model(final[name])[0]
        step = args.eval_step or args.steps
        ecfg = RetroEvalConfig(out=str(work / f"eval-{name}-{step}"), seq_chunks=args.seq_chunks,
                               max_sequences=args.max_sequences, overlap_ngram=8)
        t0 = time.perf_counter()
        done = Path(ecfg.out) / "results.json"
        if done.is_file():  # scored already (resumable): print it again
            s = json.loads(done.read_text())
        else:
            s = evaluate(model, ds, table, ecfg, control=control if name == "retrieved" else None, progress=False,
                         title=f"linux-docs: small RETRO [{name}], {step} steps")
        print(f"evaluation  [{name}] {s['sequences']} sequences of {s['sequence_tokens']} tokens from "
              f"{s['held_out_documents']} held-out documents, {time.perf_counter() - t0:.0f}s; mean 8-gram overlap "
              f"retrieved {s['random_neighbours']['mean_overlap_retrieved']:.3f}, "
              f"random {s['random_neighbours']['mean_overlap_random']:.3f}", flush=True)
        for sname, v in s["settings"].items():
            print(f"  {sname:<12} perplexity {v['perplexity']:8.2f}   bits/byte {v['bits_per_byte']:.4f}")
        print(f"  differences, mean NLL nats/token, {ecfg.level:.0%} paired bootstrap over documents:")
        for dname, d in s["differences"].items():
            print(f"  {dname:<26} {format_difference(d, 'documents')}")
        for b in s["leakage_buckets"]:
            print(f"  overlap {b['overlap']:<14} {b['chunks']:4d} chunks  retrieved - random "
                  f"{format_difference(b['retro - retro_random'], 'documents')}   retrieved - none "
                  f"{format_difference(b['retro - retro_off'], 'documents')}")
        print(f"  results   {ecfg.out}/results.json", flush=True)
        if name == "retrieved" and args.plot:
            shutil.copyfile(s["plot"], REPO / args.plot)
    if len(final) > 2:
        compare_variants(work, final, args)


def chunk_token_nll(path: Path) -> tuple:
    """(per-token NLL with retrieved neighbours, document of each token, chunk ids) from an evaluation's
    chunks.jsonl (each chunk's mean NLL spread over its tokens)."""
    import numpy as np

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokens = np.array([r["tokens"] for r in rows])
    nll = np.repeat(np.array([r["nll_retro"] for r in rows]) / tokens, tokens)
    return nll, np.repeat(np.array([r["doc_id"] for r in rows]), tokens), [r["chunk_id"] for r in rows]


def compare_variants(work: Path, final: dict[str, Path], args: argparse.Namespace) -> None:
    """The ablation: each --variant against the main model, both reading retrieved neighbours, on the same tokens."""
    from retromem.stats import paired_bootstrap

    step = args.eval_step or args.steps
    main_nll, groups, main_chunks = chunk_token_nll(work / f"eval-retrieved-{step}" / "chunks.jsonl")
    print("ablation    variant - main model (paper's CCA), both with retrieved neighbours, nats/token, 95% over "
          "documents:")
    for name in [n for n in final if n not in ("retrieved", "random")]:
        nll, g, chunks = chunk_token_nll(work / f"eval-{name}-{step}" / "chunks.jsonl")
        assert chunks == main_chunks and (g == groups).all()  # the same tokens
        r = paired_bootstrap(nll, main_nll, groups=groups, n=1000, seed=0, level=0.95)
        print(f"  {name:<22} {r.mean:+.4f} [{r.low:+.4f}, {r.high:+.4f}]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/work/scratch/retro2/real")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--corpus", default="linux-docs", choices=("linux-docs", "python-docs"))
    ap.add_argument("--words", type=int, default=130_000, help="word budget of the selected documents")
    ap.add_argument("--max-chars", type=int, default=20_000)
    ap.add_argument("--chunk-length", type=int, default=32)
    ap.add_argument("--eval-fraction", type=float, default=0.15)
    ap.add_argument("--config", default=str(REPO / "configs/retro/small-scratch-cpu.yaml"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--save-steps", type=int, default=100)
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON from_scratch fields (an ablation run)")
    ap.add_argument("--seq-chunks", type=int, default=8)
    ap.add_argument("--max-sequences", type=int, default=None)
    ap.add_argument("--stage", default="all", choices=("data", "train", "eval", "all"))
    ap.add_argument("--runs", type=lambda v: v.split(","), default=None,
                    help="comma-separated runs to train in this process (default: all, one after the other)")
    ap.add_argument("--eval-step", type=int, default=None, help="score checkpoint-N of every run instead of final")
    ap.add_argument("--plot", default=None, help="copy the leakage plot here (relative to the repository)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    ds, index = build_store(work, args)
    nb = neighbours(work, ds, index, args)
    if args.stage == "data":
        return
    if args.stage in ("train", "all"):
        train_runs(work, ds, nb, args)
    if args.stage in ("eval", "all"):
        evaluation(work, ds, nb, model_dirs(work, args), args)


if __name__ == "__main__":
    main()
