"""TCRA-LLM retrieved-context compression on gcide-qa (BENCHMARKS.md, "Retrieved-context compression
(TCRA-LLM) (issue 21)"): prompt tokens saved against answer accuracy.

SmolLM2-135M answers the first ``--questions`` gcide-qa questions with the few-shot prompt of
:mod:`retromem.retro.qa`, under: ``none`` (closed book), ``retrieved`` (the top-``k`` BM25 entries,
uncompressed: the control), and each compressor of :mod:`retromem.retro.compress` at each ratio
(the same retrieved entries, compressed before they enter the prompt; ``truncate``, each entry's
first tokens to the same budget, is the control for the compressors). The summary compressor,
which generates, runs on the first ``--summary-questions`` only (its own paired control is the
uncompressed setting on the same questions). Per setting: accuracy with a Wilson interval, mean
prompt tokens, tokens saved against ``retrieved``, and the paired accuracy difference against
``retrieved`` with a bootstrap interval. Settings are written as they finish (``--out``), and a
re-run skips the settings already there::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/tcra_compression.py --work /work/scratch/qa/gcide \\
        --out /work/scratch/h21/tcra.json --plot benchmarks/tcra_compression.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/qa/gcide", help="gcide_qa.py's work folder (ds, bm25)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--questions", type=int, default=80)
    ap.add_argument("--summary-questions", type=int, default=24)
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--methods", default="similarity,surprisal,truncate")
    ap.add_argument("--summary-ratio", type=float, default=0.5)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.datastore import Datastore
    from retromem.index.lexical import LexicalIndex
    from retromem.models import load_causal_lm
    from retromem.retro.compress import CompressConfig, make_compressor
    from retromem.retro.qa import (QaConfig, _present, build_prompt, compare, entry_text, generate_answers, is_correct,
                                   load_qa_items, rank_entries, wilson)

    work = Path(args.work)
    ds = Datastore.open(work / "ds")
    cfg = QaConfig(k=args.k)
    items = load_qa_items(CORPORA / "gcide-qa.jsonl.gz", limit=args.questions * 2)
    kept, _, _ = _present(items, ds)
    kept = kept[:args.questions]
    ranks = rank_entries(LexicalIndex.open(work / "bm25", datastore=ds), [q.query for q in kept], ds, cfg)
    entries = [[entry_text(ds, d, cfg.entry_chars) for d in reversed(r[:cfg.k])] for r in ranks]
    model, tok = load_causal_lm(args.model)

    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"args": vars(args), "settings": {}}
    settings = [("none", None, None, len(kept)), ("retrieved", None, None, len(kept))]
    for r in [float(x) for x in args.ratios.split(",")]:
        for m in args.methods.split(","):
            settings.append((f"{m}-{r:g}", m, r, len(kept)))
    if args.summary_questions:
        settings.append((f"summary-{args.summary_ratio:g}", "summary", args.summary_ratio, args.summary_questions))
    embedder = None
    for name, method, ratio, n in settings:
        if name in res["settings"]:
            continue
        t = time.perf_counter()
        if name == "none":
            shown = [[] for _ in kept[:n]]
        elif method is None:
            shown = entries[:n]
        else:
            if method == "similarity" and embedder is None:
                from retromem.index.embed import Embedder

                embedder = Embedder(device="cpu").model
            comp = make_compressor(CompressConfig(method, ratio), tok, model=model, summary_tokenizer=tok,
                                   embedder=embedder)
            shown = [comp.compress(q.query, e) for q, e in zip(kept[:n], entries[:n])]
        prompts = [build_prompt(q.query, e) for q, e in zip(kept[:n], shown)]
        answers = generate_answers(model, tok, prompts, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        res["settings"][name] = {
            "method": method, "ratio": ratio, "n": n, "seconds": time.perf_counter() - t,
            "prompt_tokens": [len(tok(p, add_special_tokens=False).input_ids) for p in prompts],
            "entry_tokens": [sum(len(tok(x, add_special_tokens=False).input_ids) for x in e) for e in shown],
            "correct": [bool(is_correct(a, q.answer)) for a, q in zip(answers, kept[:n])],
            "answers": answers, "examples": [e for e in shown[:3]],
        }
        out.write_text(json.dumps(res, indent=1) + "\n")
        s = res["settings"][name]
        print(f"{name:<16} acc {np.mean(s['correct']):.3f} ({sum(s['correct'])}/{n})  prompt tokens "
              f"{np.mean(s['prompt_tokens']):.1f}  entry tokens {np.mean(s['entry_tokens']):.1f}  "
              f"{s['seconds']:.0f}s", flush=True)

    # the table: every setting against the uncompressed control on the same questions
    base = res["settings"]["retrieved"]
    rows = []
    print(f"\n{len(kept)} questions, k = {cfg.k} BM25 entries, {args.threads} thread(s)")
    print(f"{'setting':<16} {'n':>4} {'accuracy [95% CI]':>24} {'prompt tok':>10} {'entry tok':>9} {'saved':>6} "
          f"{'acc - retrieved [95% CI]':>28}")
    for name, s in res["settings"].items():
        n = s["n"]
        w = wilson(sum(s["correct"]), n)
        saved = 1 - np.mean(s["entry_tokens"]) / max(np.mean(base["entry_tokens"][:n]), 1e-9)
        c = compare(s["correct"], base["correct"][:n], cfg, names=(name, "retrieved"))
        row = {"setting": name, "n": n, "accuracy": w, "prompt_tokens": float(np.mean(s["prompt_tokens"])),
               "entry_tokens": float(np.mean(s["entry_tokens"])), "entry_tokens_saved": float(saved),
               "prompt_tokens_saved": float(1 - np.mean(s["prompt_tokens"]) / np.mean(base["prompt_tokens"][:n])),
               "vs_retrieved": c, "method": s["method"], "ratio": s["ratio"]}
        rows.append(row)
        print(f"{name:<16} {n:>4} {w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}]".ljust(46)
              + f" {row['prompt_tokens']:10.1f} {row['entry_tokens']:9.1f} {saved:6.0%} "
              f"{c['diff']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]")
    res["table"] = rows
    out.write_text(json.dumps(res, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            a = r["accuracy"]
            color = {"similarity": "tab:blue", "surprisal": "tab:orange", "summary": "tab:green",
                     "truncate": "tab:gray"}.get(r["method"], "k")
            ax.errorbar(r["prompt_tokens"], a["rate"], yerr=[[a["rate"] - a["low"]], [a["high"] - a["rate"]]],
                        fmt="o", color=color, capsize=3)
            ax.annotate(r["setting"] + ("" if r["n"] == len(kept) else f" (n={r['n']})"), (r["prompt_tokens"], a["rate"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("mean prompt tokens")
        ax.set_ylabel("answer accuracy (95% Wilson)")
        ax.set_title(f"TCRA compression on gcide-qa, SmolLM2-135M, BM25 top-{cfg.k}, {len(kept)} questions",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
