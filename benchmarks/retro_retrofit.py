"""RETROfit of SmolLM2-135M on the python-docs datastore, end to end, and its held-out perplexity
against the base model in the same run, on the same documents.

Steps (each resumable, so re-running the script continues where it stopped):
  1. neighbours of every chunk of the training split (own document excluded, plus neighbours sharing
     a 32-token n-gram with a held-out document) and of the held-out split;
  2. training with configs/retro/retrofit-smollm2-pydocs.yaml (Hugging Face Trainer);
  3. evaluation on held-out documents: base model, RETRO with neighbours, RETRO with them removed,
     with the leakage analysis and its plot.

Usage:
  python benchmarks/retro_retrofit.py [--config configs/retro/retrofit-smollm2-pydocs.yaml]
      [--index /work/scratch/dense/idx45k/HNSW32_SQ8] [--model-dir DIR (skip training: evaluate DIR)]
      [--max-sequences 64] [--out /work/scratch/retro/eval-smollm2-pydocs]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/retro/retrofit-smollm2-pydocs.yaml"))
    ap.add_argument("--index", default="/work/scratch/dense/idx45k/HNSW32_SQ8")
    ap.add_argument("--model-dir", default=None, help="Evaluate this trained directory instead of training.")
    ap.add_argument("--max-sequences", type=int, default=64)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/work/scratch/retro/eval-smollm2-pydocs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.datastore import Datastore
    from retromem.retro.neighbours import NeighbourTable
    from retromem.retro.evaluation import RetroEvalConfig, evaluate
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours
    from retromem.retro.loading import load_retro_model
    from retromem.retro.training import load_train_config, train
    from retromem.models import load_causal_lm

    cfg = load_train_config(args.config)
    ds = Datastore.open(cfg.datastore)
    train_nb, eval_nb = cfg.neighbours
    for out, split, leak in ((train_nb, "train", 32), (eval_nb, "eval", None)):
        res = compute_neighbours(NeighboursConfig(datastore=cfg.datastore, index=args.index, out=out, split=split,
                                                  leakage_ngram=leak), progress=False)
        print(f"neighbours  {split}: {res.chunks:,} chunks, {res.dropped_for_leakage:,} dropped for leakage this run, "
              f"{res.seconds:.1f}s")
    model_dir = args.model_dir
    if model_dir is None:
        t0 = time.perf_counter()
        r = train(cfg, resume=True)
        print(f"training    {r.steps} steps x {cfg.train.batch_size} sequences x {cfg.seq_chunks * ds.chunk_length} tokens = "
              f"{r.steps * cfg.train.batch_size * cfg.seq_chunks * ds.chunk_length:,} tokens; {r.trainable_parameters:,} of "
              f"{r.total_parameters:,} parameters trainable; {time.perf_counter() - t0:.0f}s this run")
        model_dir = r.final_dir
    model, _ = load_retro_model(model_dir)
    base, _ = load_causal_lm(cfg.model)
    table = NeighbourTable([train_nb, eval_nb], ds)
    ecfg = RetroEvalConfig(out=args.out, seq_chunks=args.seq_chunks, max_sequences=args.max_sequences, batch_size=2)
    s = evaluate(model, ds, table, ecfg, base=base, title=f"RETROfit SmolLM2-135M ({Path(model_dir).name})")
    state = Path(model_dir).parent / "log_history.json"
    print(f"evaluation  {s['sequences']} held-out sequences x {s['sequence_tokens']} tokens from "
          f"{s['held_out_documents']} documents ({s['settings']['base']['tokens']:,} predicted tokens) in {s['seconds']:.0f}s")
    for name, v in s["settings"].items():
        print(f"  {name:<10} perplexity {v['perplexity']:8.3f}   bits/byte {v['bits_per_byte']:.4f}")
    print(f"  check: largest per-token |base - retro_off| {s['max_abs_token_nll_difference_base_vs_retro_off']:.2e} nats")
    for b in s["leakage_buckets"]:
        vals = "  ".join(f"{k[4:]} {v:.4f}" for k, v in b.items() if k.startswith("bpb_") and v is not None)
        print(f"  overlap {b['overlap']:<14} {b['chunks']:5d} chunks  {vals}")
    print(f"results     {Path(args.out) / 'results.json'}  plot {s['plot']}")
    if state.is_file():
        evals = [h for h in json.loads(state.read_text()) if "eval_loss" in h]
        print("periodic eval (held-out loss with retrieval): " + ", ".join(f"step {h['step']}: {h['eval_loss']:.4f}" for h in evals))


if __name__ == "__main__":
    main()
