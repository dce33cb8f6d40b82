"""REST against plain greedy decoding and Hugging Face prompt-lookup decoding, side by side in one run
(BENCHMARKS.md, "Speculative decoding with retrieval drafts (REST) (issue 21)").

Held-out documentation continuation: the prompts are the first ``--prompt-tokens`` tokens of
documents of ``--corpus`` that are not among the datastore's inputs (by ``id``), and every method
continues each prompt by ``--new-tokens`` tokens, greedily:

- ``greedy``: ``model.generate(do_sample=False)``, the control;
- ``pld``: ``model.generate(prompt_lookup_num_tokens=10)``, Hugging Face prompt-lookup decoding
  (drafts copied from the prompt itself);
- ``rest-N``: :func:`retromem.retro.speculative.generate_rest` with drafts from the n-gram index
  over the datastore, ``N`` draft nodes per tree (``rest-8s``: 8 nodes, and nodes followed by
  under 10% of the occurrences read are dropped).

The methods run one after another on each prompt, in an order that rotates from prompt to prompt,
so a slow spell of the shared machine hits them alike. Reported per method: tokens/s (new tokens
over wall seconds, all prompts together), its ratio to greedy with a 95% bootstrap interval over
prompts, tokens per forward pass (mean accepted length; counted with a hook on the model's forward,
so greedy reads 1.0) and how many prompts give exactly greedy's tokens::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/speculative_rest.py --ngram-index /work/scratch/rest/ngram \\
        --corpus ../shared/corpora/python-docs.jsonl.gz --prompts 16 --out /work/scratch/rest/bench.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np
import torch


def heldout_prompts(corpus: str, exclude_ids: set[str], tok, n: int, prompt_tokens: int, min_tokens: int) -> list[dict]:
    """The first ``n`` documents of ``corpus`` (in file order) outside ``exclude_ids`` with at least
    ``min_tokens`` tokens, cut to their first ``prompt_tokens`` tokens."""
    out = []
    opener = gzip.open if corpus.endswith(".gz") else open
    with opener(corpus, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["id"] in exclude_ids:
                continue
            ids = tok(rec["text"], add_special_tokens=False).input_ids
            if len(ids) >= min_tokens:
                out.append({"id": rec["id"], "ids": ids[:prompt_tokens]})
            if len(out) == n:
                break
    return out


def datastore_input_ids(ds) -> set[str]:
    ids = set()
    for inp in ds.manifest["inputs"]:
        p = inp["path"]
        opener = gzip.open if p.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as fh:
            ids.update(json.loads(line)["id"] for line in fh)
    return ids


def ratio_interval(tok_m, sec_m, tok_g, sec_g, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(tokens/s of m over tokens/s of greedy, 2.5%, 97.5%), prompts resampled together."""
    tok_m, sec_m, tok_g, sec_g = (np.asarray(x, dtype=np.float64) for x in (tok_m, sec_m, tok_g, sec_g))
    point = (tok_m.sum() / sec_m.sum()) / (tok_g.sum() / sec_g.sum())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(tok_m), (n, len(tok_m)))
    r = (tok_m[draws].sum(1) / sec_m[draws].sum(1)) / (tok_g[draws].sum(1) / sec_g[draws].sum(1))
    lo, hi = np.percentile(r, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ngram-index", required=True)
    ap.add_argument("--corpus", default="../shared/corpora/python-docs.jsonl.gz")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--pld-tokens", type=int, default=10)
    ap.add_argument("--methods", default="greedy,pld,rest-32,rest-8s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.index.ngram import NgramIndex
    from retromem.models import load_causal_lm
    from retromem.retro.speculative import RestConfig, check_index_tokenizer, generate_rest

    idx = NgramIndex(args.ngram_index)
    model, tok = load_causal_lm(args.model)
    check_index_tokenizer(idx, tok, model)
    prompts = heldout_prompts(args.corpus, datastore_input_ids(idx.datastore), tok, args.prompts, args.prompt_tokens,
                              args.prompt_tokens + args.new_tokens)
    rest_cfgs = {"rest-32": RestConfig(max_nodes=32), "rest-8s": RestConfig(max_nodes=8, min_share=0.1),
                 "rest-8": RestConfig(max_nodes=8), "rest-16": RestConfig(max_nodes=16)}
    methods = args.methods.split(",")
    calls = [0]
    model.register_forward_pre_hook(lambda *a, **k: calls.__setitem__(0, calls[0] + 1))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(method: str, ids: list[int]) -> tuple[list[int], dict]:
        x = torch.tensor([ids])
        calls[0] = 0
        t = time.perf_counter()
        info: dict = {}
        if method == "greedy":
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=pad)[0].tolist()
        elif method == "pld":
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens, do_sample=False,
                                 prompt_lookup_num_tokens=args.pld_tokens, pad_token_id=pad)[0].tolist()
        else:
            res, st = generate_rest(model, tok, idx, ids, args.new_tokens, rest_cfgs[method], check_tokenizer=False)
            out = res[0].tolist()
            info = {"retrieval_s": st.retrieval_seconds, "draft_nodes": st.mean_draft_nodes,
                    "drafted_steps": sum(1 for n in st.draft_nodes if n), "steps": st.steps}
        sec = time.perf_counter() - t
        new = len(out) - len(ids)
        return out, {"seconds": sec, "new_tokens": new, "forwards": calls[0], **info}

    for m in methods:  # warm-up: first-call costs (tokenizer, kernels, page faults) outside the timings
        run(m, prompts[0]["ids"][:32])
    rows = []
    for i, p in enumerate(prompts):
        order = methods[i % len(methods):] + methods[:i % len(methods)]
        res = {m: run(m, p["ids"]) for m in order}
        greedy = res["greedy"][0] if "greedy" in res else None
        row = {"id": p["id"]}
        for m in methods:
            out, info = res[m]
            info["exact"] = greedy is not None and out == greedy
            row[m] = info
        rows.append(row)
        print(f"[{i + 1}/{len(prompts)}] {p['id']}: " + "  ".join(
            f"{m} {row[m]['new_tokens'] / row[m]['seconds']:.2f} tok/s {row[m]['new_tokens'] / max(row[m]['forwards'], 1):.2f} "
            f"tok/fwd{'' if row[m]['exact'] else ' (differs from greedy)'}" for m in methods), flush=True)

    summary = {}
    print(f"\n{len(rows)} prompts x {args.new_tokens} new tokens, {args.threads} thread(s)")
    print(f"{'method':<10} {'tok/s':>7} {'x greedy [95% CI]':>24} {'tok/fwd':>8} {'exact':>7} {'retrieval s':>12}")
    for m in methods:
        tok_m = [r[m]["new_tokens"] for r in rows]
        sec_m = [r[m]["seconds"] for r in rows]
        fw = sum(r[m]["forwards"] for r in rows)
        s = {"tokens_per_s": sum(tok_m) / sum(sec_m), "tokens_per_forward": sum(tok_m) / fw,
             "exact": sum(r[m]["exact"] for r in rows), "prompts": len(rows),
             "retrieval_s": sum(r[m].get("retrieval_s", 0.0) for r in rows), "seconds": sum(sec_m)}
        if "greedy" in methods:
            s["ratio"] = ratio_interval(tok_m, sec_m, [r["greedy"]["new_tokens"] for r in rows],
                                        [r["greedy"]["seconds"] for r in rows])
        if m.startswith("rest"):
            s["draft_nodes"] = float(np.mean([r[m]["draft_nodes"] for r in rows]))
            s["drafted_share"] = sum(r[m]["drafted_steps"] for r in rows) / max(sum(r[m]["steps"] for r in rows), 1)
        summary[m] = s
        ratio = f"{s['ratio'][0]:.2f} [{s['ratio'][1]:.2f}, {s['ratio'][2]:.2f}]" if "ratio" in s else "-"
        print(f"{m:<10} {s['tokens_per_s']:7.2f} {ratio:>24} {s['tokens_per_forward']:8.2f} "
              f"{s['exact']:>3}/{len(rows):<3} {s['retrieval_s']:12.2f}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
