"""What InfLLM's block lookup costs per layer, the paper's rule against the key lookup
(``InfLLMConfig.lookup = "keys"``: the attention mass each block would get among every stored key), with SmolLM2-135M's shapes (9 query heads, 3 KV heads, 64
dims, blocks of 128 tokens), on a real :class:`~retromem.memory.infllm.BlockStore`, at several
stored lengths; beside them, the attention the lookup feeds (one layer's queries over the
budget's keys), the reference the lookup cost is read against.

    python benchmarks/infllm_lookup_cost.py --stored 8192,32768,131072 --queries 1,12

Prints one line per (stored tokens, queries): CPU-ms per layer and call for each, and the ratio
to the attention. CPU time on one thread (``torch.set_num_threads(1)``)."""

from __future__ import annotations

import argparse
import json
import time

import torch

from retromem.memory.infllm import BlockStore, InfLLMConfig, block_scores


def per_call(fn, seconds: float) -> float:
    fn()
    t, k = time.process_time(), 0
    while time.process_time() - t < seconds:
        fn()
        k += 1
    return 1000 * (time.process_time() - t) / k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stored", default="8192,32768,131072", help="tokens in the block store (comma-separated)")
    ap.add_argument("--queries", default="1,12", help="queries per call: 1 a generated token, 12 a question")
    ap.add_argument("--budget", type=int, default=3327, help="keys a query attends (InfLLMConfig.for_budget)")
    ap.add_argument("--seconds", type=float, default=2.0, help="CPU-seconds timed per figure")
    a = ap.parse_args()
    torch.set_num_threads(1)
    H, Hkv, D = 9, 3, 64
    c = InfLLMConfig.for_budget(a.budget)
    g = torch.Generator().manual_seed(0)
    for stored in (int(x) for x in a.stored.split(",")):
        store = BlockStore("cpu")
        for _ in range(stored // c.block_size):
            k = torch.randn(Hkv, c.block_size, D, generator=g)
            store.add(k, k, torch.randn(H * D, generator=g), torch.zeros(H, c.n_repr, dtype=torch.long))
        for T in (int(x) for x in a.queries.split(",")):
            q = torch.randn(1, H, T, D, generator=g)
            kv = torch.randn(1, H, c.budget_tokens, D, generator=g)
            paper = per_call(lambda: block_scores(q, store.reprs()).topk(c.topk), a.seconds)
            keys = per_call(lambda: store.key_scores(q[0], D ** -0.5).topk(c.topk), a.seconds)
            attn = per_call(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv), a.seconds)
            print(json.dumps({"stored_tokens": store.n * c.block_size, "queries": T, "paper_ms": round(paper, 4),
                              "keys_ms": round(keys, 4), "attention_ms": round(attn, 4),
                              "keys_over_attention": round(keys / attn, 2), "keys_over_paper": round(keys / paper, 1)}),
                  flush=True)


if __name__ == "__main__":
    main()
