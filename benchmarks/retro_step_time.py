"""Training step time of a RETROfitted model against its base model, on the same batch.

One step = forward, backward and an AdamW update. The settings run in interleaved rounds (the order
rotating each round), timed after --warmup rounds; the median of --steps rounds is reported. Batch:
--batch sequences of --seq-chunks real datastore chunks, each chunk with k=2 neighbours of 2m tokens
(chunk + continuation) read from the datastore. Three settings:

  base        the base model, every weight trainable (an ordinary fine-tuning step)
  retrofit    RETROfit as trained here: base frozen, encoder + CCA trainable, with neighbours
  retro-full  the RETROfitted model with every weight trainable, with neighbours (RETRO's own overhead
              over the base in the same training regime)

Usage:
  python benchmarks/retro_step_time.py --datastore /work/scratch/dense/ds-pydocs [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch


def batch(ds, n_seq: int, seq_chunks: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    from retromem.retro.data import neighbour_arrays

    rng = np.random.default_rng(seed)
    starts = rng.choice(ds.num_chunks - seq_chunks, n_seq, replace=False)
    ids = np.stack([np.arange(s, s + seq_chunks) for s in starts])  # (B, C)
    toks = torch.from_numpy(np.asarray(ds.token_array[ids.reshape(-1)], dtype=np.int64).reshape(n_seq, -1))
    nbr = rng.integers(0, ds.num_chunks, size=(n_seq, seq_chunks, k))  # any real chunks: timing only
    nt, nm = neighbour_arrays(ds, nbr, k)
    return {"input_ids": toks, "labels": toks.clone(), "neighbour_ids": torch.from_numpy(nt),
            "neighbour_attention_mask": torch.from_numpy(nm)}


class Stepper:
    """One training setting: a model, its batch and an AdamW over its trainable weights."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        self.model, self.inputs = model.train(), inputs
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        t0 = time.perf_counter()
        loss = self.model(**self.inputs).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if record:
            self.times.append(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datastore", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-chunks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from retromem.datastore import Datastore
    from retromem.retro import retro_config_for, retrofit, trainable_fraction
    from retromem.models import load_causal_lm

    ds = Datastore.open(args.datastore)
    base, _ = load_causal_lm(args.model)
    cfg = retro_config_for(base.config, chunk_length=ds.chunk_length, neighbour_length=2 * ds.chunk_length,
                           num_neighbours=2)
    inputs = batch(ds, args.batch, args.seq_chunks, cfg.num_neighbours)
    plain = {k: v for k, v in inputs.items() if not k.startswith("neighbour")}
    T = inputs["input_ids"].shape[1]
    print(f"model {args.model}; batch {args.batch} x {T} tokens, k={cfg.num_neighbours} neighbours x "
          f"{cfg.neighbour_length} tokens per chunk; CCA after layers {cfg.retro_layers}; {args.threads} threads; "
          f"median of {args.steps} interleaved rounds after {args.warmup} warm-up")

    m = copy.deepcopy(base)
    for p in m.parameters():
        p.requires_grad_(True)
    settings = {"base": Stepper(m, plain)}
    m = retrofit(copy.deepcopy(base), cfg)
    frac = trainable_fraction(m)
    settings["retrofit"] = Stepper(m, inputs)
    m = retrofit(copy.deepcopy(base), cfg)
    for p in m.parameters():
        p.requires_grad_(True)
    settings["retro-full"] = Stepper(m, inputs)
    # interleaved rounds, the order rotating each round: a change of load on a shared machine hits
    # every setting alike instead of whichever happened to run then
    names = list(settings)
    for r in range(args.warmup + args.steps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            settings[name].step(record=r >= args.warmup)
    base_t = statistics.median(settings["base"].times)
    for name, st in settings.items():
        t = statistics.median(st.times)
        per_round = [x / b for x, b in zip(st.times, settings["base"].times)]
        print(f"{name:<11} {t:7.3f} s/step  {args.batch * T / t:8.1f} tokens/s  ratio to base {t / base_t:.2f}  "
              f"(per-round ratios {min(per_round):.2f}-{max(per_round):.2f})")
    print(f"retrofit trains {100 * frac:.2f}% of the weights")


if __name__ == "__main__":
    main()
