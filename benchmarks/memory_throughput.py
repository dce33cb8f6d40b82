"""Benchmark: tokens/s of Infini-attention inference against the base model (SmolLM2-135M, CPU).

Base and Infini-attention runs alternate in one process on the same real-text input (python-docs),
so that load from other processes on the machine hits both alike; the figure to read is the
ratio of the medians. Only the last position's logits are computed in both.

    .venv/bin/python benchmarks/memory_throughput.py --lengths 2048,4096 --segment 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--segment", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.passkey import token_stream
    from retromem.models import load_causal_lm

    base, tok = load_causal_lm("smollm2-135m")
    infini = InfiniAttentionLM(copy.deepcopy(base), InfiniAttentionConfig(segment_length=args.segment)).eval()
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.tensor([token_stream(tok, n)])
        times: dict[str, list[float]] = {"base": [], "infini": []}
        with torch.inference_mode():
            for _ in range(args.repeats):
                t = time.perf_counter()
                base(ids, logits_to_keep=1, use_cache=False)
                times["base"].append(time.perf_counter() - t)
                t = time.perf_counter()
                infini(ids, keep_logits="none")
                times["infini"].append(time.perf_counter() - t)
        b, i = statistics.median(times["base"]), statistics.median(times["infini"])
        print(f"{n:6d} tokens: base {n / b:7.1f} tok/s   infini {n / i:7.1f} tok/s   infini/base = {b / i:.3f}   "
              f"(median of {args.repeats}; base s {[round(x, 1) for x in times['base']]}, "
              f"infini s {[round(x, 1) for x in times['infini']]})", flush=True)


if __name__ == "__main__":
    main()
