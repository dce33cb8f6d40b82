"""SirLLM against StreamingLLM on multi-turn recall, and Squeezed Attention against full attention
on fixed-context QA, with 95% intervals (issue 20).

Recall: dialogues built by :func:`retromem.memory.long_context_eval.build_dialogue` (half number,
half word facts, every fact ending at least ``--budget`` tokens before the questions, so a window of
the budget holds none of them); full attention (the ceiling), StreamingLLM and SirLLM variants at
the same budget on the same dialogues. QA: :func:`retromem.memory.long_context_eval.qa_task`
(``--qa-contexts`` contexts, each prefilled and clustered once, asked at every fraction).
Rows go to ``--rows`` (JSONL, appended as they come); ``--report`` prints the tables from rows:
accuracy with a bootstrap interval over dialogues / contexts, and paired differences
(:func:`retromem.stats.paired_bootstrap`, whole dialogues / contexts resampled).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_recall_qa.py --task recall \\
        --recall-length 2048 --recall-facts 10 --dialogues 5 --budget 512 --rows rows/recall.jsonl
    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_recall_qa.py --task qa \\
        --qa-length 4096 --qa-questions 8 --qa-contexts 5 --fractions 1,0.5,0.25,0.125 --rows rows/qa.jsonl
    .venv/bin/python benchmarks/memory_recall_qa.py --report rows/recall.jsonl,rows/qa.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections import defaultdict
from pathlib import Path


def sirllm_variant(spec: str, budget: int):
    """``sirllm:LOCAL:DECAY[:call]``: 4 sinks, LOCAL recent tokens, the rest entropy-selected, DECAY per
    512 tokens (or per call with ``:call``: per turn when the dialogue is fed turn by turn)."""
    from retromem.memory.sirllm import SirLLMConfig

    _, local, decay, *unit = spec.split(":")
    return SirLLMConfig(n_sink=4, n_keep=budget - 4 - int(local), n_local=int(local), decay=float(decay),
                        decay_per=unit[0] if unit else "tokens")


def run_recall(a, emit) -> None:
    import torch

    from retromem.memory.kv_budget import FullAttention, StreamingLLM
    from retromem.memory.long_context_eval import _answer_right, build_dialogue, run_pieces
    from retromem.memory.passkey import token_stream
    from retromem.memory.sirllm import SirLLM

    model, tok = a.model_tok
    rng = random.Random(a.seed + 1)
    filler = token_stream(tok, a.recall_length * 3, None, skip_docs=5)
    methods = a.methods.split(",")
    for d in range(a.dialogues):
        dia = build_dialogue(tok, a.recall_length, a.recall_facts, filler, rng, kinds=("number", "word"), far=a.budget)
        # the body in one piece (fed in segments of --segment) or one call per turn (SirLLM's runs)
        body = [torch.tensor([t]) for t in dia.turns()] if a.feed == "turns" else [torch.tensor([dia.body])]
        pieces = body + [torch.tensor([q[0]]) for q in dia.questions]
        nb = len(body)
        if d < a.first_dialogue:  # built (the dialogues that follow stay the same), not run
            continue
        for method in methods:
            if method == "full" and a.full_dialogues is not None and d >= a.full_dialogues:
                continue
            if method == "full":
                mem = FullAttention(model)
            elif method == "streaming_llm":
                mem = StreamingLLM(model, n_sink=4, n_local=a.budget - 4)
            else:
                mem = SirLLM(model, sirllm_variant(method, a.budget))
            logits, st = run_pieces(model, mem, pieces, a.segment, set(range(nb, len(pieces))))
            right = [_answer_right(logits[nb + i], pieces[nb + i], s, e) for i, (_, s, e) in enumerate(dia.questions)]
            emit({"task": "recall", "method": method, "budget": a.budget, "length": a.recall_length, "dialogue": d,
                  "feed": a.feed,
                  "right": right, "kinds": dia.kinds, "fact_distance": [len(dia.body) - e for e in dia.fact_end],
                  "correct": sum(right) / len(right), **st})


def run_qa(a, emit) -> None:
    from retromem.memory.long_context_eval import LongEvalConfig, qa_task
    from retromem.memory.squeezed import SqueezedConfig

    model, tok = a.model_tok
    cfg = LongEvalConfig(out=str(Path(a.rows).parent), tasks=("qa",), qa_length=a.qa_length,
                         qa_questions=a.qa_questions, qa_contexts=a.qa_contexts, segment=a.segment,
                         fractions=tuple(float(x) for x in a.fractions.split(",")), seed=a.seed)
    qa_task(model, tok, cfg, emit, squeezed=SqueezedConfig(n_sink=a.n_sink, n_tail=a.n_tail, cluster_size=a.cluster_size,
                                                           coarse_size=a.coarse_size, heads=a.heads),
            selections=tuple(a.selection.split(",")), decoded=a.decoded,
            variants=tuple(a.variants.split(",")) if a.variants else None, first_context=a.first_context)


def run_attention_time(a, emit) -> None:
    """Attention per decoded token over n context keys with SmolLM2-135M's attention shape (9 query
    heads, 3 KV heads of 64 dims; one layer, random keys: the work depends on the count of keys
    attended, not their values), all keys against the clusters selected at each fraction."""
    import time

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.memory.squeezed import SqueezedAttention, SqueezedConfig

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3, head_dim=64))
    g = torch.Generator().manual_seed(0)
    for n in (int(x) for x in a.attn_lengths.split(",")):
        mem = SqueezedAttention(model, SqueezedConfig(kmeans_iters=2, cluster_size=a.cluster_size, heads=a.heads,
                                                      coarse_size=a.coarse_size))
        mem.ctx_k[0] = torch.randn(1, 3, n, 64, generator=g)
        mem.ctx_v[0] = torch.randn(1, 3, n, 64, generator=g)
        mem.calib_q[0] = torch.randn(1, 9, 64, 64, generator=g)
        t0 = time.perf_counter()
        mem.freeze()
        cluster_s = time.perf_counter() - t0
        for rep_ in range(2):  # each fraction twice, interleaved, to see the drift of a shared machine
            for f in [float(x) for x in a.fractions.split(",")]:
                mem.set_fraction(f)
                mem.reset_queries()
                for t in range(a.attn_tokens):
                    q = torch.randn(1, 9, 1, 64, generator=g)
                    kv = torch.randn(1, 3, 1, 64, generator=g)
                    with torch.inference_mode():
                        mem.attend(0, q, kv, kv, torch.tensor([n + t]), 0.125)
                emit({"task": "attention_time", "context_keys": n, "fraction": f, "repeat": rep_,
                      "attended_fraction": mem.attended_fraction(), "tokens": mem.decode_tokens,
                      "ms_per_token_per_layer": round(mem.decode_attention_ms(), 4),
                      "cpu_ms_per_token_per_layer": round(mem.decode_attention_ms(cpu=True), 4),
                      "cluster_s": round(cluster_s, 2), "heads": a.heads, "cluster_size": a.cluster_size,
                      "coarse_size": a.coarse_size})


def _group_mean_ci(vals: list[list[bool]], seed: int = 0, n: int = 2000) -> tuple[float, float, float]:
    """Mean of all items and a 95% bootstrap interval resampling whole groups (dialogues / contexts)."""
    import numpy as np

    g = np.random.default_rng(seed)
    sums = np.array([sum(v) for v in vals], float)
    cnts = np.array([len(v) for v in vals], float)
    idx = g.integers(0, len(vals), (n, len(vals)))
    boots = sums[idx].sum(1) / cnts[idx].sum(1)
    return float(sums.sum() / cnts.sum()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def _group_id(unit: tuple[int, int]) -> int:
    """(seed, dialogue or context) as one integer that sorts the same (the bootstrap's group ids)."""
    return unit[0] * 1_000_000 + unit[1]


def fact_report(by: dict[str, dict[tuple[int, int], dict]], ref: str) -> None:
    """Which questions a setting loses and whether their fact was selected: per setting, the share
    of the planted fact's keys selected by the query before the answer, averaged over layers, for
    questions lost (right with all keys, wrong here) and kept (right with both); and the layers
    where lost questions had the least of their fact."""
    import numpy as np

    print("\nfact selected by the query before the answer (mean share of the fact's keys over layers and heads):")
    for m, units in by.items():
        if m == ref:
            continue
        lost, kept = [], []
        for u, r in units.items():
            if "fact_selected" not in r or u not in by[ref]:
                continue
            for q, (a_, b_) in enumerate(zip(r["right"], by[ref][u]["right"])):
                if b_:
                    (kept if a_ else lost).append(r["fact_selected"][q])
        if not (lost or kept):
            continue
        line = f"- {m}: lost {len(lost)}, kept {len(kept)}"
        for name, xs in (("lost", lost), ("kept", kept)):
            if xs:
                arr = np.array(xs)  # (questions, layers)
                line += f"; {name}: {arr.mean():.2f} (layers with < half the fact: {float((arr < 0.5).mean(0).mean()):.2f})"
        if lost and kept:
            diff = np.array(kept).mean(0) - np.array(lost).mean(0)
            worst = np.argsort(-diff)[:5]
            line += "; layers where lost questions had least of their fact vs kept: " + ", ".join(
                f"{int(i)} ({np.array(lost).mean(0)[i]:.2f} vs {np.array(kept).mean(0)[i]:.2f})" for i in worst)
        print(line)


def report(paths: list[str], table_rows: str | None = None) -> None:
    from retromem.stats import mcnemar_p, paired_bootstrap

    table: list[dict] | None = [] if table_rows else None

    rows = [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()]
    for task, unit in (("recall", "dialogue"), ("qa", "context")):
        rs = [r for r in rows if r["task"] == task]
        if not rs:
            continue
        key = (lambda r: r["method"] + (" (per turn)" if r.get("feed") == "turns" else "")) if task == "recall" else \
            (lambda r: "all keys" if r["fraction"] >= 1 else f"{r['variant']} @ {r['fraction']}" if "variant" in r else
             f"{r.get('selection', 'fraction')} {r['fraction']}" + (f" (clusters of {r['cluster_size']})"
                                                                    if r.get("cluster_size", 16) != 16 else ""))
        # a dialogue / context is (seed, number): row files of other seeds reuse the numbers (rows
        # written before the seed was recorded count as one seed, -1)
        by: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
        for r in rs:
            by[key(r)][r.get("seed", -1), r[unit]] = r
        ref = "full" if task == "recall" else "all keys"
        if task == "recall" and ref not in by and "full (per turn)" in by:
            ref = "full (per turn)"
        print(f"\n{task}: per method (95% interval: {unit}s resampled)")
        print("| method | items | accuracy [95% CI] | number facts | word facts | vs full [95% CI] | extra |")
        print("| --- | ---: | --- | --- | --- | --- | --- |")
        for m, units in by.items():
            ids = sorted(units)
            vals = [units[u]["right"] for u in ids]
            mean, lo, hi = _group_mean_ci(vals)
            kinds = ""
            if task == "recall":
                parts = []
                for kind in ("number", "word"):
                    kv = [x for u in ids for x, k in zip(units[u]["right"], units[u]["kinds"]) if k == kind]
                    parts.append(f"{sum(kv)}/{len(kv)}")
                kinds = " | ".join(parts)
            else:
                kinds = " | "
            common = [u for u in ids if u in by.get(ref, {})]
            vs = ""
            if m != ref and common:
                a_ = [float(x) for u in common for x in units[u]["right"]]
                b_ = [float(x) for u in common for x in by[ref][u]["right"]]
                grp = [_group_id(u) for u in common for _ in units[u]["right"]]
                res = paired_bootstrap(a_, b_, groups=grp, n=2000)
                vs = f"{res.mean:+.3f} [{res.low:+.3f}, {res.high:+.3f}]"
            extra = ""
            if task == "qa":
                att = sum(units[u]["attended_fraction"] for u in ids) / len(ids)
                ms = sum(units[u]["decode_attention_ms"] for u in ids) / len(ids)
                extra = f"keys attended {att:.3f}; attention {ms:.1f} ms per decoded token"
                if all("decode_attention_cpu_ms" in units[u] for u in ids):
                    cpu = sum(units[u]["decode_attention_cpu_ms"] for u in ids) / len(ids)
                    extra += f" ({cpu:.1f} ms CPU)"
            else:
                extra = f"{sum(units[u]['tokens_per_s'] for u in ids) / len(ids):.0f} tok/s; KV {max(units[u]['attention_mib'] for u in ids):.1f} MiB"
            n_items = sum(len(v) for v in vals)
            if table is not None:
                table.append({"task": task, "method": m, "n": n_items, "accuracy": round(mean, 4),
                              "ci": [round(lo, 4), round(hi, 4)], "vs_reference": vs or None, "extra": extra,
                              "tokens_per_s": round(sum(units[u].get("tokens_per_s") or 0 for u in ids) / len(ids), 2)
                              if task == "recall" else None,
                              "attention_mib": max(units[u].get("attention_mib", 0) for u in ids)})
            print(f"| {m} | {n_items} | {sum(sum(v) for v in vals)}/{n_items} = {mean:.3f} [{lo:.3f}, {hi:.3f}] | {kinds} | {vs} | {extra} |")
        base = next((b for b in ("streaming_llm", "streaming_llm (per turn)") if b in by), None)
        if task == "recall" and base:
            print("\npaired against StreamingLLM (same dialogues and questions):")
            for m, units in by.items():
                if m.startswith("streaming_llm") or m.startswith("full") or \
                        m.endswith("(per turn)") != base.endswith("(per turn)"):
                    continue
                common = [u for u in sorted(units) if u in by[base]]
                a_ = [float(x) for u in common for x in units[u]["right"]]
                b_ = [float(x) for u in common for x in by[base][u]["right"]]
                grp = [_group_id(u) for u in common for _ in units[u]["right"]]
                res = paired_bootstrap(a_, b_, groups=grp, n=2000)
                only_a = sum(1 for x, y in zip(a_, b_) if x and not y)
                only_b = sum(1 for x, y in zip(a_, b_) if y and not x)
                print(f"- {m} - StreamingLLM: {res.mean:+.3f} [{res.low:+.3f}, {res.high:+.3f}] over {len(a_)} questions "
                      f"({only_a} right only with {m}, {only_b} only with StreamingLLM; exact McNemar p = "
                      f"{mcnemar_p(only_a, only_b):.2g})")
        if task == "qa" and ref in by:
            fact_report(by, ref)
            for field, what in (("decode_attention_ms", "wall"), ("decode_attention_cpu_ms", "CPU")):
                if not all(field in r for r in rs):
                    continue
                full_ms = sum(r[field] for r in by[ref].values()) / len(by[ref])
                for m, units in by.items():
                    if m != ref:
                        ms = sum(units[u][field] for u in units) / len(units)
                        print(f"- {m}: attention per decoded token {ms:.1f} ms vs {full_ms:.1f} ms with all keys "
                              f"({what} time; all keys / selected = {full_ms / ms:.2f}x: {'saved' if ms < full_ms else 'none saved'})")
    if table is not None:
        with open(table_rows, "w") as f:
            for row in table:
                f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=("recall", "qa", "attention-time"))
    ap.add_argument("--attn-lengths", default="2048,8192,32768")
    ap.add_argument("--attn-tokens", type=int, default=20)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="full,streaming_llm,sirllm:0:1.0",
                    help="recall: full, streaming_llm and SirLLM variants sirllm:LOCAL:DECAY")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--segment", type=int, default=512)
    ap.add_argument("--recall-length", type=int, default=2048)
    ap.add_argument("--recall-facts", type=int, default=10)
    ap.add_argument("--dialogues", type=int, default=5)
    ap.add_argument("--qa-length", type=int, default=4096)
    ap.add_argument("--qa-questions", type=int, default=8)
    ap.add_argument("--qa-contexts", type=int, default=5)
    ap.add_argument("--fractions", default="1,0.5,0.25,0.125")
    ap.add_argument("--selection", default="fraction", help="fraction, threshold or both (comma-separated)")
    ap.add_argument("--decoded", type=int, default=None,
                    help="questions per setting decoded token by token (timed); the rest in one call")
    ap.add_argument("--n-sink", type=int, default=4)
    ap.add_argument("--cluster-size", type=int, default=16)
    ap.add_argument("--heads", default="kv", help="qa: who selects clusters, kv or query heads")
    ap.add_argument("--coarse-size", type=int, default=0, help="qa: keys per coarse centroid (0 = one level)")
    ap.add_argument("--variants", default=None,
                    help="qa: settings CLUSTER/SELECTION/HEADS/COARSE (e.g. 16/fraction/kv/flat,4/fraction/query/2) "
                         "asked on one prefill per context, instead of --selection")
    ap.add_argument("--feed", choices=("segments", "turns"), default="segments",
                    help="recall: the dialogue body in --segment calls or one call per turn")
    ap.add_argument("--full-dialogues", type=int, default=None, help="recall: full attention on the first N dialogues only")
    ap.add_argument("--first-context", type=int, default=0,
                    help="qa: run contexts from this index on (the earlier ones are built, not run: resume a run)")
    ap.add_argument("--first-dialogue", type=int, default=0,
                    help="recall: run dialogues from this index on (the earlier ones are built, not run: resume a run)")
    ap.add_argument("--table-rows", default=None, help="with --report: also write one summary row per method (JSONL)")
    ap.add_argument("--n-tail", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=None, help="JSONL file the rows are appended to")
    ap.add_argument("--report", default=None, help="comma-separated row files: print the tables, run nothing")
    a = ap.parse_args()
    for flag, v in (("--first-context", a.first_context), ("--first-dialogue", a.first_dialogue)):
        if v < 0:
            ap.error(f"{flag} must be >= 0, got {v}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if a.report:
        report(a.report.split(","), a.table_rows)
        return
    import torch

    from retromem.memory.kv_budget import enable
    from retromem.models import load_causal_lm

    torch.set_num_threads(a.threads)
    if a.task != "attention-time":
        model, tok = load_causal_lm(a.model)
        enable(model)
        model.eval()
        a.model_tok = (model, tok)
    Path(a.rows).parent.mkdir(parents=True, exist_ok=True)
    with open(a.rows, "a") as log:
        def emit(row: dict) -> None:
            row = {**row, "seed": a.seed}  # dialogues / contexts of other seeds share their numbers
            log.write(json.dumps(row) + "\n")
            log.flush()
            logging.info("%s", {k: v for k, v in row.items() if k not in ("right", "kinds", "fact_distance")})

        {"recall": run_recall, "qa": run_qa, "attention-time": run_attention_time}[a.task](a, emit)


if __name__ == "__main__":
    main()
