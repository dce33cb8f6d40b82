"""Benchmark: generate() of the memory models with the cache against without, and the save / load
round trip in a fresh process with only transformers (SmolLM2-135M base, CPU).

For each kind (Infini-attention, AutoCompressor; memory parameters as initialised, not trained:
speed and equality do not depend on them) and the base model as a reference, a real-text prompt
(python-docs) is continued greedily for ``--new`` tokens with ``use_cache=True`` and
``use_cache=False``; runs alternate in one process so that load from other processes hits both
alike. Printed: tokens/s of each (median of ``--repeats``), the speed-up, and whether the two
outputs are the same tokens. Then each kind is saved with ``save_pretrained`` and loaded in a
child process started with ``python -I -S`` and only site-packages on its path (retromem cannot be
imported there) with ``trust_remote_code=True``; printed: the largest logit difference.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/memory_generation.py --threads 1 \\
        --prompt 256 --new 256 --segment 128 --repeats 2 --out /work/scratch/h17mem/gen
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

CHILD = """
import sys
sys.path.append(sys.argv[2])
import importlib.util
assert importlib.util.find_spec("retromem") is None, "retromem is importable"
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[1] + "/ids.pt")
with torch.inference_mode():
    d = (m(ids).logits - torch.load(sys.argv[1] + "/logits.pt")).abs().max().item()
print(f"ROUNDTRIP {type(m).__module__}.{type(m).__name__} max|logit diff| {d:.3g}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--new", type=int, default=256, help="new tokens")
    ap.add_argument("--segment", type=int, default=128, help="segment length of both memory models")
    ap.add_argument("--summary", type=int, default=16, help="AutoCompressor summary tokens per segment")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", default="base,infini,autocompressor")
    ap.add_argument("--out", default="memory-generation", help="directory for the saved models")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.passkey import token_stream
    from retromem.models import load_causal_lm

    base, tok = load_causal_lm("smollm2-135m")
    base.eval()
    models = {
        "base": base,
        "infini": InfiniAttentionLM(copy.deepcopy(base), InfiniAttentionConfig(segment_length=args.segment)).eval(),
        "autocompressor": AutoCompressorLM(copy.deepcopy(base), AutoCompressorConfig(
            summary_length=args.summary, segment_min=args.segment, segment_max=args.segment)).eval(),
    }
    kinds = args.kinds.split(",")
    ids = torch.tensor([token_stream(tok, args.prompt)])
    print(f"prompt {args.prompt} tokens of python-docs, {args.new} new tokens greedy, segment {args.segment}, "
          f"summary {args.summary}, {args.threads} thread(s), torch {torch.__version__}", flush=True)
    for kind in kinds:
        m = models[kind]
        times: dict[bool, list[float]] = {True: [], False: []}
        outs: dict[bool, torch.Tensor] = {}
        for _ in range(args.repeats):
            for cached in (True, False):
                t = time.perf_counter()
                outs[cached] = m.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                                          use_cache=cached, pad_token_id=tok.eos_token_id)
                times[cached].append(time.perf_counter() - t)
        c, u = statistics.median(times[True]), statistics.median(times[False])
        same = torch.equal(outs[True], outs[False])
        print(f"{kind:15s} cached {args.new / c:6.2f} tok/s   uncached {args.new / u:6.2f} tok/s   speed-up {u / c:5.2f}x   "
              f"same tokens: {same}   (s cached {[round(x, 1) for x in times[True]]}, "
              f"uncached {[round(x, 1) for x in times[False]]})", flush=True)
    out = Path(args.out)
    for kind in kinds:
        if kind == "base":
            continue
        d = out / kind
        models[kind].save_pretrained(d)
        with torch.inference_mode():
            torch.save(models[kind](ids).logits, d / "logits.pt")
        torch.save(ids, d / "ids.pt")
        (out / "child.py").write_text(CHILD)
        env = {**os.environ, "HF_MODULES_CACHE": str(out / "modules"), "OMP_NUM_THREADS": str(args.threads)}
        p = subprocess.run([sys.executable, "-I", "-S", str(out / "child.py"), str(d), sysconfig.get_paths()["purelib"]],
                           capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
        line = [x for x in p.stdout.splitlines() if "ROUNDTRIP" in x]
        print(f"{kind:15s} round trip: {line[0].split('ROUNDTRIP ')[1] if line else 'FAILED ' + p.stderr[-500:]}", flush=True)


if __name__ == "__main__":
    main()
