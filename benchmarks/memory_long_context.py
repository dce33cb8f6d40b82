"""Training-free long context on SmolLM2-135M: passkey, long-document perplexity, multi-turn recall
and fixed-context QA for full attention, StreamingLLM, LM-Infinite, InfLLM, SirLLM and Squeezed
Attention (:mod:`retromem.memory.long_context_eval`), optionally with trained memory models
(Infini-attention / AutoCompressor checkpoints, through :func:`retromem.memory.evaluation.passkey_eval`)
on the same passkey examples. Prints the markdown table; writes rows.jsonl / results.json under
--out and, with --plot, the accuracy-vs-length PNG.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_long_context.py --tasks passkey \\
        --lengths 2048,8192,16384 --depths 0.5 --budget 1024 --threads 1 --out runs/lc-passkey
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def trained_passkey(path: str, tok, cfg, emit) -> None:
    """Passkey rows for a saved memory model (memory on), through the trained methods' own evaluation."""
    import torch

    from retromem.memory.evaluation import MemoryEvalConfig, passkey_eval
    from retromem.memory.loading import load_memory_model

    model, _ = load_memory_model(path)
    kind = type(model).__name__
    ecfg = MemoryEvalConfig(out=str(Path(cfg.out) / "trained"), lengths=cfg.lengths, depths=cfg.depths,
                            samples=cfg.samples, seed=cfg.seed, corpus=cfg.corpus)
    for n in cfg.lengths:
        one = MemoryEvalConfig(**{**ecfg.__dict__, "lengths": (n,)})
        t0 = time.perf_counter()
        with torch.inference_mode():
            rows = passkey_eval(model, tok, one, modes=("memory",), progress=False)
        dt = time.perf_counter() - t0
        for r in rows:
            emit({"task": "passkey", "method": kind, "length": r["length"], "depth": r["depth"], "sample": r["sample"],
                  "correct": r["correct"], "seconds": round(dt / len(rows), 3), "tokens": n,
                  "tokens_per_s": round(n * len(rows) / dt, 2), "checkpoint": path})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="passkey,perplexity,recall,qa")
    ap.add_argument("--methods", default="full,streaming_llm,lm_infinite,infllm,sirllm")
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--depths", default="0.5")
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--ppl-lengths", default="2048,8192")
    ap.add_argument("--ppl-score", type=int, default=512)
    ap.add_argument("--ppl-streams", type=int, default=1, help="Disjoint stretches of the corpus scored at each length.")
    ap.add_argument("--recall-length", type=int, default=4096)
    ap.add_argument("--recall-facts", type=int, default=8)
    ap.add_argument("--recall-dialogues", type=int, default=1)
    ap.add_argument("--qa-length", type=int, default=4096)
    ap.add_argument("--qa-questions", type=int, default=8)
    ap.add_argument("--fractions", default="1,0.25")
    ap.add_argument("--full-max", type=int, default=16384)
    ap.add_argument("--trained", default="", help="Comma-separated saved memory models for the passkey rows.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="Also write the accuracy-vs-length PNG here.")
    ap.add_argument("--plot-score", default="correct", choices=("correct", "strict", "greedy"),
                    help="Passkey score plotted: key digits teacher-forced, strict, or greedy decoding.")
    ap.add_argument("--from-rows", default=None,
                    help="Comma-separated result directories: only print their rows' table (and --plot); run nothing.")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from retromem.memory.long_context_eval import LongEvalConfig, evaluate, markdown_table, plot, summarize

    if a.from_rows:
        rows = [json.loads(x) for d in a.from_rows.split(",") for x in (Path(d) / "rows.jsonl").read_text().splitlines()]
        print(markdown_table(summarize(rows)))
        for r in rows:
            if r["task"] == "qa":
                print(f"qa {r['method']} fraction {r['fraction']}: {r['answered']}/{r['questions']}, attended "
                      f"{r['attended_fraction']:.3f} of the context's keys, decode attention {r['decode_attention_ms']:.2f} ms/token")
        if a.plot:
            print("plot:", plot(rows, Path(a.plot), f"{a.model}, budget {a.budget} tokens", score=a.plot_score))
        return
    from retromem.models import load_causal_lm

    torch.set_num_threads(a.threads)
    split = lambda s, f=int: tuple(f(x) for x in s.split(",") if x)  # noqa: E731
    cfg = LongEvalConfig(out=a.out, methods=split(a.methods, str), tasks=split(a.tasks, str), budget=a.budget,
                         segment=a.segment, lengths=split(a.lengths), depths=split(a.depths, float), samples=a.samples,
                         ppl_lengths=split(a.ppl_lengths), ppl_score=a.ppl_score, ppl_streams=a.ppl_streams, recall_length=a.recall_length,
                         recall_facts=a.recall_facts, recall_dialogues=a.recall_dialogues, qa_length=a.qa_length,
                         qa_questions=a.qa_questions, fractions=split(a.fractions, float), full_max=a.full_max)
    model, tok = load_causal_lm(a.model)
    print(f"{a.model}: trained context (max_position_embeddings) = {model.config.max_position_embeddings} tokens")
    summary = evaluate(model, tok, cfg, title=f"{a.model}, budget {a.budget} tokens") if cfg.tasks else {"table": []}
    rows = [json.loads(x) for x in (Path(a.out) / "rows.jsonl").read_text().splitlines()] \
        if (Path(a.out) / "rows.jsonl").is_file() else []
    if a.trained:
        log = (Path(a.out) / "rows.jsonl").open("a")

        def emit(row: dict) -> None:
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()

        for path in a.trained.split(","):
            try:
                trained_passkey(path, tok, cfg, emit)
            except Exception as exc:  # a checkpoint that cannot run here is reported, not fatal
                print(f"trained model {path}: could not run: {type(exc).__name__}: {exc}")
        log.close()
        summary = summarize(rows)
    print(markdown_table(summary))
    if a.plot:
        print("plot:", plot(rows, Path(a.plot), f"{a.model}, budget {a.budget} tokens"))


if __name__ == "__main__":
    main()
