"""RETROfit of SmolLM2-135M on the python-docs datastore, end to end, and its held-out perplexity
against the base model and the controls in the same run, on the same documents.

Steps (each resumable, so re-running the script continues where it stopped):
  1. neighbours of every chunk of the training split (own document excluded, plus neighbours sharing
     a 32-token n-gram with a held-out document) and of the held-out split;
  2. training with configs/retro/retrofit-smollm2-pydocs.yaml (Hugging Face Trainer); with
     --with-control, also the control run: the same config with `neighbours_mode: random` (same
     blocks, sequences and steps; every chunk reads a random other document's chunk's neighbours),
     in <output_dir>-random;
  3. `retro eval` on held-out documents: base model, RETRO with retrieved neighbours, with random
     neighbours, with none, and the control run (with --with-control / --control-dir), paired
     bootstrap intervals over documents for the differences, the leakage analysis and its plot.

Usage:
  python benchmarks/retro_retrofit.py [--config configs/retro/retrofit-smollm2-pydocs.yaml]
      [--index /work/scratch/dense/idx45k/HNSW32_SQ8] [--with-control]
      [--model-dir DIR (skip training: evaluate DIR)] [--control-dir DIR (the control run's final model)]
      [--max-sequences 64] [--out /work/scratch/retro/eval-smollm2-pydocs]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def train_run(cfg, ds) -> str:
    from retromem.retro.training import train

    t0 = time.perf_counter()
    r = train(cfg, resume=True)
    print(f"training    [{cfg.neighbours_mode} neighbours] {r.steps} steps x {cfg.train.batch_size} sequences x "
          f"{cfg.seq_chunks * ds.chunk_length} tokens = {r.steps * cfg.train.batch_size * cfg.seq_chunks * ds.chunk_length:,} "
          f"tokens; {r.trainable_parameters:,} of {r.total_parameters:,} parameters trainable; "
          f"{time.perf_counter() - t0:.0f}s this run")
    return r.final_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs/retro/retrofit-smollm2-pydocs.yaml"))
    ap.add_argument("--index", default="/work/scratch/dense/idx45k/HNSW32_SQ8")
    ap.add_argument("--model-dir", default=None, help="Evaluate this trained directory instead of training.")
    ap.add_argument("--with-control", action="store_true",
                    help="Also train the control run (neighbours_mode: random) and evaluate it beside the RETRO run.")
    ap.add_argument("--control-dir", default=None, help="The control run's trained directory (skips its training).")
    ap.add_argument("--eval-fraction", type=float, default=0.05, help="Share of documents held out (by hash).")
    ap.add_argument("--max-sequences", type=int, default=64)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="/work/scratch/retro/eval-smollm2-pydocs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.datastore import Datastore
    from retromem.models import load_causal_lm
    from retromem.retro.evaluation import RetroEvalConfig, evaluate, format_difference
    from retromem.retro.loading import load_retro_model
    from retromem.retro.neighbours import NeighbourTable, NeighboursConfig, compute_neighbours
    from retromem.retro.training import load_train_config

    cfg = load_train_config(args.config)
    ds = Datastore.open(cfg.datastore)
    train_nb, eval_nb = cfg.neighbours
    for out, split, leak in ((train_nb, "train", 32), (eval_nb, "eval", None)):
        res = compute_neighbours(NeighboursConfig(datastore=cfg.datastore, index=args.index, out=out, split=split,
                                                  leakage_ngram=leak, eval_fraction=args.eval_fraction), progress=False)
        print(f"neighbours  {split}: {res.chunks:,} chunks, {res.dropped_for_leakage:,} dropped for leakage this run, "
              f"{res.seconds:.1f}s")
    model_dir = args.model_dir or train_run(cfg, ds)
    control_dir = args.control_dir
    if control_dir is None and args.with_control:
        control_dir = train_run(load_train_config(args.config, neighbours_mode="random",
                                                  output_dir=f"{cfg.output_dir}-random"), ds)
    model, _ = load_retro_model(model_dir)
    control = load_retro_model(control_dir)[0] if control_dir else None
    base, _ = load_causal_lm(cfg.model)
    table = NeighbourTable([train_nb, eval_nb], ds)
    ecfg = RetroEvalConfig(out=args.out, seq_chunks=args.seq_chunks, max_sequences=args.max_sequences, batch_size=2,
                           bootstrap=args.bootstrap)
    s = evaluate(model, ds, table, ecfg, base=base, title=f"RETROfit SmolLM2-135M ({Path(model_dir).name})",
                 control=control)
    state = Path(model_dir).parent / "log_history.json"
    print(f"evaluation  {s['sequences']} held-out sequences x {s['sequence_tokens']} tokens from "
          f"{s['held_out_documents']} documents ({s['settings']['base']['tokens']:,} predicted tokens) in {s['seconds']:.0f}s")
    for name, v in s["settings"].items():
        print(f"  {name:<12} perplexity {v['perplexity']:8.3f}   bits/byte {v['bits_per_byte']:.4f}")
    print(f"  check: largest per-token |base - retro_off| {s['max_abs_token_nll_difference_base_vs_retro_off']:.2e} nats")
    print(f"differences, mean NLL nats/token, {ecfg.level:.0%} paired bootstrap over {ecfg.groups}s "
          f"({ecfg.bootstrap} resamples):")
    for name, d in s["differences"].items():
        ratio = f" [{d['ppl_ratio_low']:.4f}, {d['ppl_ratio_high']:.4f}]" if d["low"] is not None else ""
        print(f"  {name:<26} {format_difference(d, ecfg.groups + 's')}   perplexity x{d['ppl_ratio']:.4f}{ratio}")
    rn = s["random_neighbours"]
    print(f"  mean 8-gram overlap with the neighbours read: retrieved {rn['mean_overlap_retrieved']:.3f}, "
          f"random {rn['mean_overlap_random']:.3f}")
    for b in s["leakage_buckets"]:
        vals = "  ".join(f"{k[4:]} {v:.4f}" for k, v in b.items() if k.startswith("bpb_") and v is not None)
        d = b["retro - retro_random"]
        gain = f"  retrieved - random {format_difference(d, ecfg.groups + 's')}" if d else ""
        print(f"  overlap {b['overlap']:<14} {b['chunks']:5d} chunks  {vals}{gain}")
    print(f"results     {Path(args.out) / 'results.json'}  plot {s['plot']}")
    if state.is_file():
        evals = [h for h in json.loads(state.read_text()) if "eval_loss" in h]
        print("periodic eval (held-out loss with retrieval): " + ", ".join(f"step {h['step']}: {h['eval_loss']:.4f}" for h in evals))


if __name__ == "__main__":
    main()
