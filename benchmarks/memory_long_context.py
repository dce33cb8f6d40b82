"""Training-free long context on SmolLM2-135M: passkey, long-document perplexity, multi-turn recall
and fixed-context QA for full attention, StreamingLLM, LM-Infinite, InfLLM, SirLLM and Squeezed
Attention (:mod:`retromem.memory.long_context_eval`), optionally with trained memory models
(``--trained``: Infini-attention / AutoCompressor checkpoints, memory on and knocked out on the same
weights) on the same passkey and perplexity inputs. Prints the markdown tables (every score, and the
greedy table with intervals); writes rows.jsonl / results.json under --out and, with --plot, the
accuracy-vs-length PNG. ``--export-passkey`` writes the passkey examples for the library baselines
(benchmarks/library_streaming_llm.py, run in their own environments).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_long_context.py --tasks passkey \\
        --lengths 2048,8192,16384 --depths 0.5 --budget 1024 --threads 1 --out runs/lc-passkey
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def read_rows(spec: str) -> list[dict]:
    """Rows from comma-separated result directories (their rows.jsonl) or JSONL files; each row's
    ``run`` is the index of the file it came from (runs of different seeds share sample numbers)."""
    rows = []
    for run, d in enumerate(spec.split(",")):
        path = Path(d) / "rows.jsonl" if Path(d).is_dir() else Path(d)
        rows += [{**json.loads(x), "run": run} for x in path.read_text().splitlines() if x.strip()]
    return rows


def export_passkey(tok, cfg, path: Path) -> int:
    """The passkey examples of ``cfg`` as JSON lines (token ids, where the question starts, the key),
    for the library baselines that run in their own environments (benchmarks/library_streaming_llm.py)."""
    from retromem.memory.long_context_eval import passkey_examples

    n = 0
    with path.open("w") as fh:
        for s, meta, examples in passkey_examples(tok, cfg):
            for (length, ex, depth), (ids, cut) in zip(meta, examples):
                fh.write(json.dumps({"sample": s, "length": length, "depth": round(depth, 4), "key": ex.key,
                                     "needle_at": ex.needle_start, "question_start": cut,
                                     "answer_start": ex.answer_start, "input_ids": ex.input_ids}) + "\n")
                n += 1
    return n


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
    ap.add_argument("--trained", default="", help="Comma-separated saved memory models (Infini-attention / "
                    "AutoCompressor) run on the same passkey and perplexity inputs, memory on and knocked out.")
    ap.add_argument("--export-passkey", default=None, help="Write the passkey examples (JSONL) here and run nothing.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="Draws the haystack offsets and keys (another seed: other examples).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="Also write the accuracy-vs-length PNG here.")
    ap.add_argument("--plot-score", default="correct", choices=("correct", "strict", "greedy"),
                    help="Passkey score plotted: key digits teacher-forced, strict, or greedy decoding.")
    ap.add_argument("--from-rows", default=None,
                    help="Comma-separated result directories or JSONL files: only print their rows' tables (and --plot); run nothing.")
    ap.add_argument("--paired", default=None,
                    help="With --from-rows: also this method against every other on the same passkey examples "
                    "(paired difference of --plot-score, McNemar), per length.")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import torch

    from retromem.memory.long_context_eval import (LongEvalConfig, evaluate, greedy_table, markdown_table, paired_passkey,
                                                   paired_table, plot, summarize)

    if a.from_rows:
        rows = read_rows(a.from_rows)
        print(markdown_table(summarize(rows)))
        print()
        print(greedy_table(summarize(rows)))
        for r in rows:
            if r["task"] == "qa":
                print(f"qa {r['method']} fraction {r['fraction']}: {r['answered']}/{r['questions']}, attended "
                      f"{r['attended_fraction']:.3f} of the context's keys, decode attention {r['decode_attention_ms']:.2f} ms/token")
        if a.paired:
            print()
            print(paired_table(paired_passkey(rows, a.paired, score=a.plot_score)))
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
                         qa_questions=a.qa_questions, fractions=split(a.fractions, float), full_max=a.full_max,
                         trained=split(a.trained, str), seed=a.seed)
    model, tok = load_causal_lm(a.model)
    if a.export_passkey:
        print(f"{export_passkey(tok, cfg, Path(a.export_passkey))} passkey examples -> {a.export_passkey}")
        return
    print(f"{a.model}: trained context (max_position_embeddings) = {model.config.max_position_embeddings} tokens")
    summary = evaluate(model, tok, cfg, title=f"{a.model}, budget {a.budget} tokens")
    rows = read_rows(a.out)
    print(markdown_table(summary))
    print()
    print(greedy_table(summary))
    if a.plot:
        print("plot:", plot(rows, Path(a.plot), f"{a.model}, budget {a.budget} tokens", score=a.plot_score))


if __name__ == "__main__":
    main()
