"""RETRO generation speed with the key/value cache against without it, same output, in one run.

The model retrieves at every chunk boundary through the ``retriever`` callable (a deterministic
in-process function of the chunk's tokens, so that retrieval costs the same in both modes and the
benchmark times the model): with the cache (``use_cache=True``) each step feeds one token, and a
chunk's neighbours are encoded once when it completes; without it (the path generation took
before issue 17) every step re-reads the whole sequence and re-encodes every chunk's neighbours.
Both modes run greedy decoding of ``--new-tokens`` tokens after the same prompt, and the script
checks that they write the same tokens.

Models: ``smollm2`` (SmolLM2-135M RETROfitted with m=64, k=2, r=128, CCA on the default layers,
the new blocks moved off their zero start so that neighbours change the text) or ``tiny`` (a
from-scratch RETRO of 4 layers, width 128).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/retro_generation.py --model smollm2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def build(kind: str) -> tuple[torch.nn.Module, int, int, int]:
    """(model, chunk length m, neighbours k, neighbour length r)."""
    if kind == "tiny":
        from retromem.retro import RetroConfig, RetroForCausalLM

        torch.manual_seed(0)
        cfg = RetroConfig(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=4, max_position_embeddings=1024, chunk_length=64, num_neighbours=2,
                          neighbour_length=128, retro_layers=[2, 4], cca_placement="before_mlp",
                          cca_relative_positions=True)
        return RetroForCausalLM(cfg).eval(), 64, 2, 128
    from retromem.models import load_causal_lm
    from retromem.retro import retrofit

    base, _ = load_causal_lm("smollm2-135m")
    model = retrofit(base.eval(), chunk_length=64, neighbour_length=128, num_neighbours=2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: the gates open a little, so neighbours change the text
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval(), 64, 2, 128


def table_retriever(vocab: int, k: int, r: int, seed: int = 0):
    """Neighbours looked up in a fixed random table by a hash of the chunk's tokens (no index: the
    benchmark times the model; the retrieval is the same cheap call in both modes)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(0, vocab, (257, k, r), generator=g)

    def retrieve(chunk_ids: torch.Tensor, chunk_index: int, rows: torch.Tensor) -> torch.Tensor:
        key = (chunk_ids * torch.arange(1, chunk_ids.shape[1] + 1)).sum(-1) % 257  # (N,)
        return table[key]
    return retrieve


def run(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool, retriever) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0, use_cache=use_cache, retriever=retriever)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, m, k, r = build(args.model)
    vocab = model.get_input_embeddings().weight.shape[0]
    retriever = table_retriever(vocab, k, r)
    prompt = torch.randint(2, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {"cache": [], "no_cache": []}
    outputs = {}
    for _ in range(args.repeats):
        for mode in ("cache", "no_cache"):
            out, seconds = run(model, prompt, args.new_tokens, mode == "cache", retriever)
            times[mode].append(seconds)
            outputs.setdefault(mode, out)
            print(f"{mode:9s} {seconds:8.2f} s  {args.new_tokens / seconds:8.2f} tokens/s", flush=True)
    same = torch.equal(outputs["cache"], outputs["no_cache"])
    tps = {mode: [args.new_tokens / s for s in ts] for mode, ts in times.items()}
    speedups = [c / n for c, n in zip(times["no_cache"], times["cache"])]
    result = {"model": args.model, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
              "chunks_retrieved": (args.prompt_tokens + args.new_tokens - 1) // m, "threads": args.threads,
              "repeats": args.repeats, "tokens_per_s": {k: [round(v, 3) for v in vs] for k, vs in tps.items()},
              "speedup_per_repeat": [round(s, 2) for s in speedups], "speedup_median": round(statistics.median(speedups), 2),
              "same_tokens": same, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "torch": torch.__version__}
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if not same:
        raise SystemExit("the cached and uncached runs wrote different tokens")


if __name__ == "__main__":
    main()
