"""StreamingLLM from the field's libraries (``kvpress``'s StreamingLLMPress, ``attention-sinks``) on
the passkey examples of the long-context evaluation, as baselines beside retromem's own rows.

Both libraries pin a transformers older than retromem's (kvpress 0.5.5: < 5.3; attention-sinks
0.4.0: == 4.34.0), so this script runs in its own environment and imports nothing from retromem:
the examples come from ``benchmarks/memory_long_context.py --export-passkey FILE`` (token ids,
where the question starts, the key) and the model from a Hugging Face directory (SmolLM2-135M
converted once from the offline GGUF by ``retromem.models``). The score is the evaluation's greedy
rule: greedy decoding of 8 tokens after the question; right when the first number written is the
key. The budget is the same: 4 sinks + the most recent tokens, 1,024 KV tokens per layer.

- ``kvpress``: the library's own use, a press over one prefill of the context (everything before
  the question), which attends to the whole context and then keeps 4 sinks + the last 1,020 keys;
  the question and the answer attend to those (positions as in the library: the question goes on
  from the context's length). Its peak KV is the whole context's; what it holds after is the budget.
- ``attention_sinks``: the model wrapped by attention-sinks, the context streamed in segments
  (``--segment``) with the cache cut to 4 sinks + 1,020 recent after each call and positions taken
  inside the cache, as the paper; then the question and greedy decoding.

    OMP_NUM_THREADS=1 /work/scratch/h20table/venv/bin/python benchmarks/library_streaming_llm.py \\
        --library kvpress --examples passkey.jsonl --model ~/.cache/retromem/models/smollm2-135m --out kvpress.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace


class ByteLevelDecoder:
    """Decoding only, from a byte-level BPE tokenizer.json's vocabulary (GPT-2's byte-to-character
    map): for environments whose ``tokenizers`` cannot read a file written by a newer one. The map
    is ``retromem.datastore.tokenizer.bytes_to_unicode``'s, written out again because this script
    runs in the libraries' own environments and imports nothing from retromem."""

    def __init__(self, path: Path) -> None:
        data = json.loads(Path(path).read_text())
        self.vocab = {i: t for t, i in data["model"]["vocab"].items()}
        self.special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        codes = chars[:]
        n = 0
        for b in range(256):
            if b not in chars:
                chars.append(b)
                codes.append(256 + n)
                n += 1
        self.byte_of = {chr(c): b for b, c in zip(chars, codes)}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if not (skip_special_tokens and int(i) in self.special)]
        raw = bytes(self.byte_of[ch] for i in ids for ch in self.vocab[i])
        return raw.decode("utf-8", errors="replace")


def kv_token_bytes(config) -> int:
    """Bytes of one token's keys and values over all layers at the model's dtype (fp32 here)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * 4


def run_kvpress(model, tok, ids, question_start: int, answer_start: int, budget: int, sinks: int, new_tokens: int):
    import torch
    from kvpress import StreamingLLMPress
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    ctx, question = ids[:, :question_start], ids[:, question_start:answer_start]
    n = ctx.shape[1]
    # kvpress keeps int(n * (1 - ratio)) keys: the half token makes that exactly the budget
    press = StreamingLLMPress(compression_ratio=(n - budget - 0.5) / n, n_sink=sinks)
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with torch.inference_mode(), press(model):
        model.model(input_ids=ctx, past_key_values=cache)
    prefill_s = time.perf_counter() - t0
    held = cache.get_seq_length()  # the budget (recorded in the row, checked there)
    with torch.inference_mode():  # the library pipeline's own greedy decoding, on our token ids
        text = KVPressTextGenerationPipeline.generate_answer(SimpleNamespace(model=model, tokenizer=tok), question,
                                                            cache, n, new_tokens)
    return text, prefill_s, held, n


def run_attention_sinks(model, tok, ids, question_start: int, answer_start: int, budget: int, sinks: int,
                        new_tokens: int, segment: int):
    import torch

    ctx, question = ids[:, :question_start], ids[:, question_start:answer_start]
    past = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, ctx.shape[1], segment):
            past = model(input_ids=ctx[:, s:s + segment], past_key_values=past, use_cache=True).past_key_values
        prefill_s = time.perf_counter() - t0
        held = past[0][0].shape[-2]
        out = model(input_ids=question, past_key_values=past, use_cache=True)
        past, generated = out.past_key_values, [int(out.logits[0, -1].argmax())]
        for _ in range(new_tokens - 1):
            out = model(input_ids=torch.tensor([[generated[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            generated.append(int(out.logits[0, -1].argmax()))
    return tok.decode(generated, skip_special_tokens=True), prefill_s, held, ctx.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", required=True, choices=("kvpress", "attention_sinks"))
    ap.add_argument("--examples", required=True, help="JSONL from memory_long_context.py --export-passkey.")
    ap.add_argument("--model", required=True, help="A Hugging Face directory of the evaluated model.")
    ap.add_argument("--budget", type=int, default=1024, help="KV tokens per layer kept: sinks + recent.")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--segment", type=int, default=512, help="attention_sinks: context tokens per call.")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--lengths", default="", help="Only examples of these lengths (comma-separated).")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True, help="Rows (JSONL), appended as each example completes.")
    a = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(a.threads)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
    except Exception:  # files written by a newer transformers / tokenizers: decode with the vocabulary alone
        tok = ByteLevelDecoder(Path(a.model) / "tokenizer.json")
    if a.library == "kvpress":
        model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                                                  attn_implementation="sdpa").eval()
        version = __import__("importlib.metadata").metadata.version("kvpress")
    else:
        from attention_sinks import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32, attention_sink_size=a.sinks,
                                                     attention_sink_window_size=a.budget - a.sinks).eval()
        version = __import__("importlib.metadata").metadata.version("attention_sinks")
    per_token = kv_token_bytes(model.config)
    lengths = {int(x) for x in a.lengths.split(",") if x}
    examples = [json.loads(x) for x in Path(a.examples).read_text().splitlines() if x.strip()]
    done = set()
    if Path(a.out).is_file():  # resume: examples already scored are skipped
        done = {(r["length"], r["depth"], r["sample"]) for r in map(json.loads, Path(a.out).read_text().splitlines())}
    with open(a.out, "a") as fh:
        for ex in examples:
            if (lengths and ex["length"] not in lengths) or (ex["length"], ex["depth"], ex["sample"]) in done:
                continue
            ids = torch.tensor([ex["input_ids"]])
            if a.library == "kvpress":
                text, prefill_s, held, n = run_kvpress(model, tok, ids, ex["question_start"], ex["answer_start"],
                                                       a.budget, a.sinks, a.new_tokens)
            else:
                text, prefill_s, held, n = run_attention_sinks(model, tok, ids, ex["question_start"], ex["answer_start"],
                                                               a.budget, a.sinks, a.new_tokens, a.segment)
            found = re.findall(r"\d+", text)
            row = {"task": "passkey", "method": "kvpress_streaming_llm" if a.library == "kvpress" else "attention_sinks",
                   "length": ex["length"], "depth": ex["depth"], "sample": ex["sample"], "needle_at": ex["needle_at"],
                   "greedy": bool(found) and found[0] == ex["key"], "correct": bool(found) and found[0] == ex["key"],
                   "generated": text, "seconds": round(prefill_s, 3), "tokens": n,
                   "tokens_per_s": round(n / prefill_s, 2), "attention_mib": round(held * per_token / 2 ** 20, 3),
                   "prefill_peak_mib": round((n if a.library == "kvpress" else held + a.segment) * per_token / 2 ** 20, 3),
                   "store_mib": 0.0, "held_tokens": held, "library": f"{a.library} {version}", "transformers": transformers.__version__}
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            print(json.dumps({k: v for k, v in row.items() if k != "generated"}), repr(text), flush=True)


if __name__ == "__main__":
    main()
