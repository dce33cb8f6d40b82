"""Does the Infini-attention memory path learn? Passkey retrieval on a tiny Llama trained on CPU.

A diagnostic for the memory modules when fine-tuning SmolLM2 is out of reach (BENCHMARKS.md,
"Memory modules"): a 2-layer Llama built from a config, wrapped with :class:`InfiniAttentionLM`, is
trained from scratch on synthetic passkey sequences in which the key always lies in an *earlier*
segment than the question, so local attention alone cannot answer: only the memory can carry it.

Sequence: random filler tokens; somewhere in the first ``L - segment`` tokens the marker KEY and
``--digits`` digit tokens; at the very end the marker QUERY and the same digits (the labels: only
those digits). Evaluation at the training length and at longer inputs (more compressions between
key and question): accuracy = every digit predicted right (greedy, teacher-forced within the
answer), with the memory on and knocked out (gate mode "knockout": the memory read is zeroed and the
gate's (1 - g) damping of local attention kept, nothing read or written; issue 16: the earlier
"gate forced local" also removed the damping, which confounds memory with it).
Chance is 10^-digits.

    python benchmarks/memory_passkey_tiny.py --steps 1500 --out passkey-tiny.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

KEY, QUERY, FILLER0 = 10, 11, 16
VOCAB = 64


def batch(n: int, length: int, segment: int, digits: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(FILLER0, VOCAB, (n, length), generator=g)
    key = torch.randint(0, 10, (n, digits), generator=g)
    labels = torch.full((n, length), -100)
    hi = length - segment - digits - 1  # the key ends before the question's segment starts
    for i in range(n):
        p = int(torch.randint(0, hi, (1,), generator=g))
        ids[i, p] = KEY
        ids[i, p + 1:p + 1 + digits] = key[i]
    ids[:, -digits - 1] = QUERY
    ids[:, -digits:] = key
    labels[:, -digits:] = key
    return ids, labels


@torch.no_grad()
def accuracy(model, length: int, segment: int, digits: int, n: int, mode: str, seed: int) -> tuple[float, float]:
    """(share of keys with every digit right, share of digits right)."""
    model.eval()
    model.set_gate_mode(mode)
    g = torch.Generator().manual_seed(seed)
    ids, _ = batch(n, length, segment, digits, g)
    logits = model(ids, keep_logits="all").logits  # (n, L, V)
    pred = logits[:, -digits - 1:-1].argmax(-1)
    model.set_gate_mode("learned")
    model.train()
    right = pred == ids[:, -digits:]
    return float(right.all(dim=1).float().mean()), float(right.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=128, help="training input length")
    ap.add_argument("--segment", type=int, default=32)
    ap.add_argument("--digits", type=int, default=4)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine decay to 10%% after 100 warm-up steps)")
    ap.add_argument("--gate-lr", type=float, default=3e-2)
    ap.add_argument("--update", choices=["linear", "delta"], default="delta")
    ap.add_argument("--eval-lengths", default="128,256,512,1024")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the figures here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256))
    model = InfiniAttentionLM(base, InfiniAttentionConfig(segment_length=args.segment, update=args.update,
                                                          bptt_segments=None))
    gates = set(map(id, model.memory_parameters()))
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if id(p) not in gates], "lr": args.lr},
                             {"params": model.memory_parameters(), "lr": args.gate_lr, "weight_decay": 0.0}])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama {n_params:,} parameters; Infini-attention ({args.update}), segments of {args.segment}; "
          f"training inputs of {args.length} tokens, key >= 1 segment before the question; {args.digits} digits")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps))))
    g = torch.Generator().manual_seed(args.seed)
    log = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids, labels = batch(args.batch, args.length, args.segment, args.digits, g)
        loss = model(ids, labels=labels, keep_logits="none").loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps:
            acc, digit_acc = accuracy(model, args.length, args.segment, args.digits, 100, "learned", seed=10_000 + step)
            gm = model.gates()
            log.append({"step": step, "loss": loss.item(), "acc": acc, "digit_acc": digit_acc, "gate_mean": float(gm.mean()),
                        "gate_max": float(gm.max())})
            print(f"step {step:5d}  loss {loss.item():.3f}  accuracy {acc:.2f} (digits {digit_acc:.2f})  gates mean {float(gm.mean()):.3f} "
                  f"max {float(gm.max()):.3f}  {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    results = {}
    print(f"{'length':>7} {'compressions':>13} {'memory on':>10} {'knocked out':>12}   keys with every digit right "
          f"(digits right), n={args.eval_n} each; chance {10.0 ** -args.digits:g} (0.1)")
    for L in [int(x) for x in args.eval_lengths.split(",")]:
        on = accuracy(model, L, args.segment, args.digits, args.eval_n, "learned", seed=L)
        off = accuracy(model, L, args.segment, args.digits, args.eval_n, "knockout", seed=L)
        results[L] = {"memory": on[0], "knocked_out": off[0], "memory_digits": on[1], "knocked_out_digits": off[1]}
        print(f"{L:>7} {f'1-{L // args.segment - 1}':>13} {on[0]:>6.3f} ({on[1]:.2f}) {off[0]:>6.3f} ({off[1]:.2f})")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "train_seconds": train_s, "log": log, "eval": results}, fh, indent=2)


if __name__ == "__main__":
    main()
