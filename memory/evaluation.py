"""Long-context evaluation of memory models: passkey retrieval and long-document perplexity.

Every measurement is taken in these modes on the same inputs (``MODE_LABELS`` names them in
results.json and the plots):
- ``memory``: the memory model as trained (Infini-attention gates / AutoCompressor summaries);
- ``knocked_out``: the memory read is zeroed and nothing else changes (Infini gate mode
  "knockout": (1 - g) * A_local; AutoCompressor: no summaries), so every segment sees only itself
  and an input that fits in one segment gives the same logits as with memory on;
- ``other_doc``: the memory of another input of the same length (Infini: the state after another
  input's prefix; AutoCompressor: that prefix's summaries): controls for "any memory content";
- ``local_ungated`` (Infini only): plain local attention with the gate removed as well. This was the
  "knocked out" of earlier reports; it also removes the gate's damping of local attention, so it
  confounds memory with damping and differs from ``memory`` even where the memory is empty;
- ``full``: the base model's full attention over the whole input, where it fits (``full_max``).

Passkey is scored teacher-forced: an example is correct when the argmax at every answer position is
the answer token, which is exactly when greedy decoding would write the key. Accuracy is also
reported against the number of compressions the needle went through (segment boundaries between
the needle and the question). Perplexity is that of the last segment of each long document, given
everything before it through the memory (the AutoCompressor paper's protocol). The summary pairs
memory on with every other setting over the same examples (how many only one of them answers, exact
two-sided sign test) and over the same documents (per-document perplexity, sign test).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from retromem.config import fail, integer, is_int, is_number, non_negative_int, positive_int
from retromem.stats import wilson  # the interval every memory evaluation reports (re-exported)

logger = logging.getLogger(__name__)

MODES = ("memory", "knocked_out", "other_doc", "local_ungated", "full")
MODE_LABELS = {
    "memory": "memory on",
    "knocked_out": "memory read zeroed (knocked out)",
    "other_doc": "memory of another document",
    "local_ungated": "plain local attention, gate removed (not a memory ablation)",
    "full": "full attention, same weights",
}
MODE_COLORS = {"memory": "tab:green", "knocked_out": "tab:red", "other_doc": "tab:orange", "local_ungated": "tab:gray",
               "full": "tab:blue"}


def modes_for(model: Any) -> tuple[str, ...]:
    """The modes that apply to ``model``: ``local_ungated`` only exists for Infini-attention."""
    from retromem.memory.infini_attention import InfiniAttentionLM

    return MODES if isinstance(model, InfiniAttentionLM) else tuple(m for m in MODES if m != "local_ungated")


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test (exact McNemar) on the discordant pairs of a paired comparison:
    ``wins`` examples only the first setting answers, ``losses`` only the second; the p-value."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_counts(passkey: list[dict], mode: str, control: str) -> dict[str, Any]:
    """``mode`` against ``control`` over the examples both scored (same length, depth, sample)."""
    key = lambda r: (r["length"], r["depth"], r["sample"])  # noqa: E731
    a = {key(r): r["correct"] for r in passkey if r["mode"] == mode}
    b = {key(r): r["correct"] for r in passkey if r["mode"] == control}
    common = sorted(a.keys() & b.keys())
    wins = sum(a[k] and not b[k] for k in common)
    losses = sum(b[k] and not a[k] for k in common)
    both = sum(a[k] and b[k] for k in common)
    return {"n": len(common), f"{mode}_only": wins, f"{control}_only": losses, "both": both,
            "neither": len(common) - wins - losses - both, "sign_test_p": sign_test(wins, losses)}


@dataclass(frozen=True)
class MemoryEvalConfig:
    """lengths: passkey input lengths; depths: needle depths in [0, 1]; samples: examples per cell.
    ppl_length / ppl_docs: long-document perplexity on ``ppl_docs`` documents of ``ppl_length`` tokens.
    full_max: longest input run with full attention (memory and time grow with it)."""

    out: str
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 1
    ppl_length: int = 4096
    ppl_docs: int = 4
    full_max: int = 8192
    seed: int = 0
    corpus: str | None = None

    def __post_init__(self) -> None:
        if not self.lengths or not all(is_int(n) and n >= 64 for n in self.lengths):
            fail("lengths", "be passkey lengths >= 64 tokens", self.lengths, flag="--lengths")
        if not self.depths or not all(is_number(d) and 0.0 <= d <= 1.0 for d in self.depths):
            fail("depths", "lie in [0, 1]", self.depths, flag="--depths")
        # normalise the input types (lists, numpy numbers from the command line or YAML)
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        non_negative_int(self.samples, "samples", flag="--samples")
        non_negative_int(self.ppl_docs, "ppl_docs", flag="--ppl-docs")
        integer(self.ppl_length, "ppl_length", ge=64, flag="--ppl-length")
        positive_int(self.full_max, "full_max", flag="--full-max")
        integer(self.seed, "seed")


def segment_length_of(model: Any) -> int:
    cfg = model.memory_config
    return cfg.segment_length if hasattr(cfg, "segment_length") else cfg.segment_max


@torch.inference_mode()
def logits_for(model: Any, ids: torch.Tensor, mode: str, start: int, other: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (1, L - start, V) of positions start.. under ``mode`` (only those are kept).

    other: (1, >= start) ids of another input, whose prefix builds the memory in mode ``other_doc``.
    """
    from retromem.memory.infini_attention import InfiniAttentionLM

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    L = ids.shape[1]
    seg = segment_length_of(model)
    first = start // seg * seg  # the segments before this one are what the memory holds
    if mode == "other_doc":
        if other is None or other.shape[1] < first:
            raise ValueError(f"mode 'other_doc' needs `other` ids of at least {first} tokens")
        prefix = other[:, :first]
    else:
        prefix = ids[:, :first]
    if isinstance(model, InfiniAttentionLM):
        old_mode, old_cfg = model.gate_mode, model.memory_config
        try:
            if mode == "full":
                model.set_gate_mode("local")
                model.memory_config = replace(old_cfg, segment_length=L)  # one segment, local attention only = the base model
                return model(ids, keep_logits="all").logits[:, start:]
            model.set_gate_mode({"knocked_out": "knockout", "local_ungated": "local"}.get(mode, "learned"))
            # run the prefix keeping no logits (knocked out: nothing is read, skip it), then the tail
            carry = mode in ("memory", "other_doc") and first > 0
            mem = model(prefix, keep_logits="none").memory if carry else None
            return model(ids[:, first:], memory=mem, keep_logits="all").logits[:, start - first:]
        finally:
            model.set_gate_mode(old_mode)
            model.memory_config = old_cfg
    # AutoCompressor
    if mode == "local_ungated":
        raise ValueError("mode 'local_ungated' exists for Infini-attention only")
    if mode == "full":
        return model(ids, segment_lengths=[L]).logits[:, start:]
    if mode in ("memory", "other_doc"):
        sp = model.compress(prefix, segment_lengths=[seg]) if first else None
        return model(ids[:, first:], softprompt=sp, segment_lengths=[seg]).logits[:, start - first:]
    return _independent_segments(model, ids[:, first:], seg)[:, start - first:]


def _independent_segments(model: Any, ids: torch.Tensor, seg: int) -> torch.Tensor:
    parts = [model(ids[:, s:s + seg], segment_lengths=[seg]).logits for s in range(0, ids.shape[1], seg)]
    return torch.cat(parts, 1)


def passkey_eval(model: Any, tokenizer: Any, cfg: MemoryEvalConfig, modes: tuple[str, ...] | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """One row per (example, mode). In mode ``other_doc`` the memory comes from another example of
    the same length and depth with a different key; ``other_key`` says whether that key was answered."""
    from tqdm import tqdm

    from retromem.memory.passkey import make_passkey, token_stream

    modes = modes_for(model) if modes is None else modes
    rng = random.Random(cfg.seed)
    other_rng = random.Random(cfg.seed + 7919)  # its own stream: the scored examples are those of earlier runs
    hay = token_stream(tokenizer, max(cfg.lengths) + 1000, cfg.corpus)
    seg = segment_length_of(model)
    jobs = [(n, d, s) for n in cfg.lengths for d in cfg.depths for s in range(cfg.samples)]
    rows = []
    for n, depth, s in tqdm(jobs, desc="passkey", disable=not progress):
        ex = make_passkey(tokenizer, n, depth, hay, rng)
        ids = torch.tensor([ex.input_ids])
        answer = ids[:, ex.answer_start:]
        compressions = ex.answer_start // seg - ex.needle_start // seg
        other = None
        if "other_doc" in modes:
            other = make_passkey(tokenizer, n, depth, hay, other_rng)
            while other.key == ex.key:
                other = make_passkey(tokenizer, n, depth, hay, other_rng)
            other_compressions = other.answer_start // seg - other.needle_start // seg
        for mode in modes:
            if mode == "full" and n > cfg.full_max:
                continue
            other_ids = torch.tensor([other.input_ids]) if mode == "other_doc" else None
            logits = logits_for(model, ids, mode, ex.answer_start - 1, other=other_ids)[:, :-1]  # predictions of answer tokens
            pred = logits.argmax(-1)
            row = {"length": n, "depth": depth, "sample": s, "mode": mode, "correct": bool((pred == answer).all()),
                   "compressions": compressions, "key": ex.key}
            if mode == "other_doc":
                other_answer = torch.tensor([other.input_ids[other.answer_start:]])
                row["other_key"] = other.key
                row["other_compressions"] = other_compressions  # where the other input's needle sat
                row["answered_other_key"] = bool(other_answer.shape == pred.shape and (pred == other_answer).all())
            rows.append(row)
    return rows


def perplexity_eval(model: Any, tokenizer: Any, cfg: MemoryEvalConfig, modes: tuple[str, ...] | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """One row per (document, mode). In mode ``other_doc`` the memory comes from the next long
    document of the corpus (one extra document is read so that the last scored one has a partner)."""
    from tqdm import tqdm

    from retromem.memory.passkey import long_documents

    modes = modes_for(model) if modes is None else modes
    seg = segment_length_of(model)
    pool = long_documents(tokenizer, cfg.ppl_length, cfg.ppl_docs + 1, cfg.corpus)
    docs = pool[:cfg.ppl_docs]
    if len(docs) < cfg.ppl_docs:
        logger.warning("only %d documents of %d tokens in the corpus", len(docs), cfg.ppl_length)
    if "other_doc" in modes and len(pool) < 2:
        logger.warning("one long document only: no other document for mode 'other_doc'")
        modes = tuple(m for m in modes if m != "other_doc")
    start = max(cfg.ppl_length - seg, 1)  # score the last segment
    rows = []
    for i, doc in enumerate(tqdm(docs, desc="perplexity", disable=not progress)):
        ids = torch.tensor([doc])
        other = torch.tensor([pool[(i + 1) % len(pool)]])
        for mode in modes:
            if mode == "full" and cfg.ppl_length > cfg.full_max:
                continue
            logits = logits_for(model, ids, mode, start - 1, other=other)[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, start:], reduction="sum")
            rows.append({"doc": i, "mode": mode, "tokens": int(ids.shape[1] - start), "nll": float(nll)})
    return rows


def summarize(passkey: list[dict], ppl: list[dict]) -> dict[str, Any]:
    acc: dict[str, dict] = defaultdict(dict)
    by: dict[tuple, list[bool]] = defaultdict(list)
    by_comp: dict[tuple, list[bool]] = defaultdict(list)
    for r in passkey:
        by[(r["mode"], r["length"])].append(r["correct"])
        by_comp[(r["mode"], r["compressions"])].append(r["correct"])
    intervals: dict[str, dict] = defaultdict(dict)
    for (mode, n), v in sorted(by.items()):
        acc[mode][n] = sum(v) / len(v)
        intervals[mode][n] = {"correct": sum(v), "n": len(v), "wilson95": list(wilson(sum(v), len(v)))}
    comp: dict[str, dict] = defaultdict(dict)
    comp_intervals: dict[str, dict] = defaultdict(dict)
    for (mode, c), v in sorted(by_comp.items()):
        comp[mode][c] = sum(v) / len(v)
        comp_intervals[mode][c] = {"correct": sum(v), "n": len(v), "wilson95": list(wilson(sum(v), len(v)))}
    other = [r for r in passkey if r["mode"] == "other_doc"]
    # memory on against every other setting on the same examples: discordant counts and sign test
    paired = {c: paired_counts(passkey, "memory", c) for c in MODES[1:] if "memory" in acc and c in acc}
    ppl_out = {}
    for mode in MODES:
        rs = [r for r in ppl if r["mode"] == mode]
        if rs:
            ppl_out[mode] = math.exp(sum(r["nll"] for r in rs) / sum(r["tokens"] for r in rs))
    by_doc: dict[str, dict[int, float]] = defaultdict(dict)
    for r in ppl:
        by_doc[r["mode"]][r["doc"]] = math.exp(r["nll"] / r["tokens"])
    ppl_paired = {}
    for c in MODES[1:]:
        if "memory" in by_doc and c in by_doc:
            docs = sorted(by_doc["memory"].keys() & by_doc[c].keys())
            lower = sum(by_doc["memory"][d] < by_doc[c][d] for d in docs)
            higher = sum(by_doc["memory"][d] > by_doc[c][d] for d in docs)
            ppl_paired[c] = {"docs": len(docs), "memory_lower": lower, "memory_higher": higher,
                             "sign_test_p": sign_test(lower, higher)}
    return {"modes": {m: MODE_LABELS[m] for m in MODES if m in acc or m in ppl_out},
            "passkey_accuracy_by_length": acc, "passkey_accuracy_by_compressions": comp,
            "passkey_counts_by_length": intervals, "passkey_counts_by_compressions": comp_intervals,
            "passkey_paired": paired,
            "other_doc_answered_other_key": sum(r["answered_other_key"] for r in other) if other else None,
            "perplexity": ppl_out, "perplexity_by_doc": dict(by_doc), "perplexity_paired": ppl_paired}


def plot(passkey: list[dict], summary: dict[str, Any], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    modes = [m for m in MODES if any(r["mode"] == m for r in passkey)]
    if modes:
        lengths = sorted({r["length"] for r in passkey})
        depths = sorted({r["depth"] for r in passkey})
        fig, axes = plt.subplots(1, len(modes) + 1, figsize=(4.2 * (len(modes) + 1), 3.6))
        for ax, mode in zip(axes, modes):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for i, d in enumerate(depths):
                for j, n in enumerate(lengths):
                    v = [r["correct"] for r in passkey if r["mode"] == mode and r["depth"] == d and r["length"] == n]
                    if v:
                        grid[i, j] = sum(v) / len(v)
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("input tokens")
            ax.set_ylabel("needle depth")
            ax.set_title(MODE_LABELS[mode], fontsize=8)
        ax = axes[-1]
        for mode in modes:  # the order and colours of MODES, not alphabetical
            v = summary["passkey_accuracy_by_compressions"][mode]
            ks = sorted(v)
            ax.plot(ks, [v[k] for k in ks], "o-", label=MODE_LABELS[mode], color=MODE_COLORS[mode])
        ax.set_xlabel("compressions the needle went through")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=6)
        fig.suptitle(title)
        fig.tight_layout()
        p = out / "passkey.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    if summary["perplexity"]:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        names = list(summary["perplexity"])
        ax.bar([MODE_LABELS[m].replace(" (", "\n(").replace(", ", ",\n") for m in names],
               [summary["perplexity"][m] for m in names], color=[MODE_COLORS[m] for m in names])
        ax.tick_params(axis="x", labelsize=6)
        ax.set_ylabel("perplexity of the last segment")
        ax.set_title(title)
        fig.tight_layout()
        p = out / "perplexity.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def evaluate(model: Any, tokenizer: Any, cfg: MemoryEvalConfig, title: str = "", progress: bool = True) -> dict[str, Any]:
    """Run passkey and perplexity in every mode; write results.json and the plots under cfg.out."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    passkey = passkey_eval(model, tokenizer, cfg, progress=progress) if cfg.samples else []
    ppl = perplexity_eval(model, tokenizer, cfg, progress=progress) if cfg.ppl_docs else []
    summary = summarize(passkey, ppl)
    summary["config"] = asdict(cfg)
    summary["segment_length"] = segment_length_of(model)
    summary["plots"] = [str(p) for p in plot(passkey, summary, out, title or type(model).__name__)]
    (out / "results.json").write_text(json.dumps({"summary": summary, "passkey": passkey, "perplexity": ppl}, indent=2))
    return summary
