"""Speculative decoding side by side in one run (BENCHMARKS.md, "Speculative decoding: REST, RASD,
prompt lookup, assisted generation (issue 21)"): tokens/s and mean accepted length of

- ``greedy``: ``model.generate(do_sample=False)``, the control;
- ``pld``: Hugging Face prompt-lookup decoding (``prompt_lookup_num_tokens``);
- ``assisted``: Hugging Face assisted generation with the draft model (``assistant_model=``);
- ``rest``: REST drafts from the in-process suffix array (``--rest-nodes`` nodes, ``--min-share``);
- ``rest-grpc``: the same drafts through the retrieval service's batched NextTokens RPC (a server on
  loopback in a child process);
- ``rest+lookup``: the REST tree fused with a prompt-lookup tree (RASD's fusion, two retrieval trees);
- ``rasd``: RASD: the draft model's tree pruned by its probabilities, fused with the REST tree;
- ``draft``: the draft model's tree alone (tree speculation, same draft model as ``assisted``);

on two tasks: held-out documentation continuation (documents of ``--corpus`` not in the datastore)
and gcide-qa answering (the few-shot prompt of :mod:`retromem.retro.qa` with the gold entry; the
datastore, python-docs, is out of domain there). The draft model is the target's own early exit
(``--draft-layers`` layers + final norm + output layer, weights shared). Methods run one after
another on each prompt in an order rotating from prompt to prompt; ratios to greedy carry a
bootstrap interval over prompts; tok/fwd counts target forward calls with a hook (greedy: 1.0)::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/speculative_decoding.py --ngram-index /work/scratch/rest/ngram \\
        --datastore-dir /work/scratch/rest/..  --out /work/scratch/h21/spec.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative_rest import datastore_input_ids, heldout_prompts, ratio_interval  # noqa: E402

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"


def qa_prompts(tok, n: int) -> list[dict]:
    """gcide-qa questions (file order) in the few-shot prompt, each with its gold entry shown."""
    from retromem.retro.qa import build_prompt

    gold = {}
    items = []
    with gzip.open(CORPORA / "gcide-qa.jsonl.gz", "rt") as f:
        for line in f:
            items.append(json.loads(line))
            if len(items) == n:
                break
    want = {it["answer_id"] for it in items}
    with gzip.open(CORPORA / "gcide.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r["id"] in want:
                gold[r["id"]] = " ".join(r["text"].split())[:160]
            if len(gold) == len(want):
                break
    return [{"id": it["answer_id"], "ids": tok(build_prompt(it["query"], [gold[it["answer_id"]]]),
                                                 add_special_tokens=False).input_ids} for it in items]


def start_server(ngram: str, datastore: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", "--datastore", datastore, "--ngram", ngram, "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    from retromem.service.client import RetrievalClient

    for _ in range(240):
        time.sleep(0.5)
        try:
            with RetrievalClient(f"127.0.0.1:{port}", timeout=2, retries=0) as c:
                if c.health() == "SERVING":
                    return proc
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
    raise RuntimeError("the retrieval server did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ngram-index", required=True)
    ap.add_argument("--corpus", default=str(CORPORA / "python-docs.jsonl.gz"))
    ap.add_argument("--tasks", default="docs,qa")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--qa-prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--qa-new-tokens", type=int, default=24)
    ap.add_argument("--pld-tokens", type=int, default=10)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--rest-nodes", type=int, default=8)
    ap.add_argument("--min-share", type=float, default=0.1)
    ap.add_argument("--methods", default="greedy,pld,assisted,rest,rest-grpc,rest+lookup,rasd,draft")
    ap.add_argument("--port", type=int, default=50871)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.index.ngram import NgramIndex
    from retromem.models import load_causal_lm
    from retromem.retro.drafters import ContextDrafter, FusedDrafter, ModelDraftConfig, ModelDrafter, early_exit_model
    from retromem.retro.speculative import RestConfig, RestDrafter, check_index_tokenizer, speculative_generate

    idx = NgramIndex(args.ngram_index)
    model, tok = load_causal_lm(args.model)
    check_index_tokenizer(idx, tok, model)
    methods = args.methods.split(",")
    client = server = None
    if "rest-grpc" in methods:
        import atexit

        from retromem.service.client import RetrievalClient

        server = start_server(args.ngram_index, str(idx.datastore.path), args.port)
        atexit.register(server.terminate)
        client = RetrievalClient(f"127.0.0.1:{args.port}", timeout=60)
    assistant = early_exit_model(model, args.draft_layers)
    rcfg = RestConfig(max_nodes=args.rest_nodes, min_share=args.min_share)
    dcfg = ModelDraftConfig(depth=3, width=3, max_nodes=6, min_prob=0.1)
    drafters = {
        "rest": lambda: RestDrafter(idx, rcfg),
        "rest-grpc": lambda: RestDrafter(client, rcfg),
        "rest+lookup": lambda: FusedDrafter([ContextDrafter(max_ngram=4, depth=8, max_nodes=8), RestDrafter(idx, rcfg)],
                                            max_nodes=12),
        "rasd": lambda: FusedDrafter([ModelDrafter(assistant, dcfg), RestDrafter(idx, rcfg)]),
        "draft": lambda: ModelDrafter(assistant, dcfg),
    }
    calls = [0]
    model.register_forward_pre_hook(lambda *a, **k: calls.__setitem__(0, calls[0] + 1))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def run(method: str, ids: list[int], new_tokens: int) -> tuple[list[int], dict]:
        x = torch.tensor([ids])
        calls[0] = 0
        t = time.perf_counter()
        info: dict = {}
        kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        with torch.inference_mode():
            if method == "greedy":
                out = model.generate(x, **kw)[0].tolist()
            elif method == "pld":
                out = model.generate(x, prompt_lookup_num_tokens=args.pld_tokens, **kw)[0].tolist()
            elif method == "assisted":
                out = model.generate(x, assistant_model=assistant, **kw)[0].tolist()
            else:
                res, st = speculative_generate(model, x, drafters[method](), max_new_tokens=new_tokens, do_sample=False)
                out = res[0].tolist()
                info = {"draft_s": st.retrieval_seconds, "draft_nodes": st.mean_draft_nodes,
                        "drafted_steps": sum(1 for n in st.draft_nodes if n), "steps": st.steps}
        sec = time.perf_counter() - t
        fw = calls[0]
        if method in drafters:  # a tree pass calls the decoder alone (lazy output layer): passes from the stats
            fw = info["steps"] + 1
        return out, {"seconds": sec, "new_tokens": len(out) - len(ids), "forwards": fw, **info}

    tasks = {}
    for task in args.tasks.split(","):
        if task == "docs":
            tasks[task] = (heldout_prompts(args.corpus, datastore_input_ids(idx.datastore), tok, args.prompts,
                                           args.prompt_tokens, args.prompt_tokens + args.new_tokens), args.new_tokens)
        else:
            tasks[task] = (qa_prompts(tok, args.qa_prompts), args.qa_new_tokens)
    first = next(iter(tasks.values()))[0][0]["ids"][:32]
    for m in methods:  # warm-up: first-call costs outside the timings
        run(m, first, 8)
    result = {"args": vars(args), "tasks": {}}
    for task, (prompts, new_tokens) in tasks.items():
        rows = []
        for i, p in enumerate(prompts):
            order = methods[i % len(methods):] + methods[:i % len(methods)]
            res = {m: run(m, p["ids"], new_tokens) for m in order}
            greedy = res["greedy"][0] if "greedy" in res else None
            row = {"id": p["id"]}
            for m in methods:
                out, info = res[m]
                info["exact"] = greedy is not None and out == greedy
                row[m] = info
            rows.append(row)
            result["tasks"][task] = {"rows": rows, "new_tokens": new_tokens}  # partial results survive a kill
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"[{task} {i + 1}/{len(prompts)}] {p['id']}: " + "  ".join(
                f"{m} {row[m]['new_tokens'] / row[m]['seconds']:.2f} tok/s "
                f"{row[m]['new_tokens'] / max(row[m]['forwards'], 1):.2f} tok/fwd{'' if row[m]['exact'] else ' (DIFFERS)'}"
                for m in methods), flush=True)
        summary = {}
        print(f"\n{task}: {len(rows)} prompts x {new_tokens} new tokens, {args.threads} thread(s)")
        print(f"{'method':<12} {'tok/s':>7} {'x greedy [95% CI]':>24} {'tok/fwd':>8} {'s/fwd':>6} {'exact':>7} "
              f"{'draft s':>8} {'nodes':>6}")
        for m in methods:
            tok_m = [r[m]["new_tokens"] for r in rows]
            sec_m = [r[m]["seconds"] for r in rows]
            fw = sum(r[m]["forwards"] for r in rows)
            s = {"tokens_per_s": sum(tok_m) / sum(sec_m), "tokens_per_forward": sum(tok_m) / fw,
                 "seconds_per_forward": sum(sec_m) / fw, "exact": sum(r[m]["exact"] for r in rows),
                 "prompts": len(rows), "draft_s": sum(r[m].get("draft_s", 0.0) for r in rows), "seconds": sum(sec_m),
                 "draft_nodes": float(np.mean([r[m].get("draft_nodes", 0.0) for r in rows]))}
            if "greedy" in methods:
                s["ratio"] = ratio_interval(tok_m, sec_m, [r["greedy"]["new_tokens"] for r in rows],
                                            [r["greedy"]["seconds"] for r in rows])
            summary[m] = s
            ratio = f"{s['ratio'][0]:.2f} [{s['ratio'][1]:.2f}, {s['ratio'][2]:.2f}]" if "ratio" in s else "-"
            print(f"{m:<12} {s['tokens_per_s']:7.2f} {ratio:>24} {s['tokens_per_forward']:8.2f} "
                  f"{s['seconds_per_forward']:6.3f} {s['exact']:>3}/{len(rows):<3} {s['draft_s']:8.2f} "
                  f"{s['draft_nodes']:6.1f}", flush=True)
        result["tasks"][task] = {"summary": summary, "rows": rows, "new_tokens": new_tokens}
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if server is not None:
        client.close()
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
