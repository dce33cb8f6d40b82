"""RETRO evaluation on held-out documents (``retromem retro eval``): perplexity and bits per byte in
three settings on the same sequences, and the paper's leakage analysis.

Settings, all on the same token sequences of the held-out split (:mod:`retromem.retro.data`):

* ``base``: the base model alone (for RETROfit: the pretrained model, loaded separately);
* ``retro``: the RETRO model with its retrieved neighbours;
* ``retro_off``: the RETRO model with the neighbours removed (for RETROfit this must equal ``base``:
  the run reports the difference as a check).

Bits per byte = total negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the predicted tokens
(byte-level BPE: each token's byte length from the vocabulary), so it compares across tokenizers.

Leakage analysis (Borgeaud et al. 2021, section 4.4): with the causal shift, the tokens of chunk u
are predicted by positions that attend to the neighbours of chunk u-1 (retrieved with chunk u-1,
each with its continuation). For every chunk u >= 1 the overlap is the fraction of its tokens
covered by an ``overlap_ngram``-token n-gram that also occurs in one of those neighbours; chunks
are bucketed by overlap and each bucket's bits per byte reported for every setting. A gain that only
appears at high overlap is copying of leaked text, not better language modelling.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from retromem.config import fail, is_int, is_number, optional_positive_int, positive_int
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

SETTINGS = ("base", "retro", "retro_off")
DEFAULT_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class RetroEvalConfig:
    """seq_chunks: chunks per evaluated sequence; max_sequences: spread evenly over the held-out split
    (None: all); overlap_ngram: n-gram length of the leakage analysis; edges: overlap bucket edges (a
    bucket of exactly 0 overlap comes first, then (e_i, e_i+1])."""

    out: str
    seq_chunks: int = 4
    max_sequences: int | None = 64
    batch_size: int = 2
    overlap_ngram: int = 8
    edges: tuple[float, ...] = DEFAULT_EDGES

    def __post_init__(self) -> None:
        if not is_int(self.seq_chunks) or self.seq_chunks < 2:
            fail("seq_chunks", "be an integer >= 2 (chunk 0 never sees neighbours)", self.seq_chunks, flag="--seq-chunks")
        optional_positive_int(self.max_sequences, "max_sequences", flag="--max-sequences")
        positive_int(self.batch_size, "batch_size", flag="--batch-size")
        positive_int(self.overlap_ngram, "overlap_ngram", flag="--overlap-ngram")
        e = tuple(self.edges)
        if not e or not all(is_number(x) for x in e) or list(e) != sorted(e) or e[0] != 0.0 or e[-1] != 1.0:
            fail("edges", "rise from 0 to 1", e)
        object.__setattr__(self, "edges", tuple(float(x) for x in e))  # normalise the input type (a YAML list)


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, **kw: Any) -> torch.Tensor:
    """(B, T) negative log-likelihood of token t given tokens < t (column 0 and -100 labels: nan)."""
    logits = model(input_ids=input_ids, **kw).logits.float()  # (B, T, V)
    target = labels[:, 1:]
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.clamp(min=0).reshape(-1),
                          reduction="none").view(target.shape)  # (B, T-1)
    nll = torch.where(target == -100, torch.full_like(nll, float("nan")), nll)
    return F.pad(nll, (1, 0), value=float("nan"))


def chunk_overlap(chunk: np.ndarray, neighbours: np.ndarray, mask: np.ndarray, n: int) -> float:
    """Fraction of ``chunk``'s tokens inside an n-gram that occurs in a neighbour (rows of ``neighbours``
    (k, r), real tokens where ``mask``)."""
    from retromem.retro.neighbours import ngram_hashes

    if len(chunk) < n:
        return 0.0
    have = np.unique(np.concatenate([ngram_hashes(row[m], n) for row, m in zip(neighbours, mask)]))
    h = ngram_hashes(chunk, n)
    if len(have) == 0:
        return 0.0
    pos = np.minimum(np.searchsorted(have, h), len(have) - 1)
    hit = have[pos] == h
    covered = np.zeros(len(chunk), dtype=bool)
    for i in np.flatnonzero(hit):
        covered[i: i + n] = True
    return float(covered.mean())


def bucket_labels(edges: tuple[float, ...]) -> list[str]:
    return ["0"] + [f"({a:.2f}, {b:.2f}]" for a, b in zip(edges[:-1], edges[1:])]


def bucket_of(overlap: float, edges: tuple[float, ...]) -> int:
    if overlap <= 0.0:
        return 0
    return 1 + min(int(np.searchsorted(edges, overlap, side="left")) - 1, len(edges) - 2)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, ds: Any, table: Any, cfg: RetroEvalConfig, base: torch.nn.Module | None = None,
             title: str = "RETRO", progress: bool = True) -> dict[str, Any]:
    """Runs every setting on the held-out sequences; writes results.json, chunks.jsonl and leakage.png
    under ``cfg.out``; returns the summary."""
    from tqdm.auto import tqdm

    from retromem.datastore.tokenizer import byte_length_table
    from retromem.retro.data import RetroDataset

    t0 = time.perf_counter()
    retro_cfg = model.retro_config if getattr(model, "retro_config", None) is not None else model.config
    if retro_cfg.chunk_length != ds.chunk_length:
        raise ConfigError(f"the model's chunk_length is {retro_cfg.chunk_length} but the datastore's is {ds.chunk_length}")
    k = retro_cfg.num_neighbours
    spec = table.split_spec
    eval_ids = spec.chunk_ids(ds, "eval")
    covered = eval_ids[np.isin(eval_ids, table.chunk_ids)]
    if len(covered) < cfg.seq_chunks:
        raise ConfigError("the neighbours cover no held-out sequence: run `retromem retro neighbours --split eval` "
                          "with the same --eval-fraction/--split-seed")
    data = RetroDataset(ds, covered, cfg.seq_chunks, table, k=k, max_sequences=cfg.max_sequences)
    nbytes_of = torch.from_numpy(byte_length_table(ds.tokenizer.backend_tokenizer))
    m = ds.chunk_length
    models = {"retro": model, "retro_off": model}
    if base is not None:
        models["base"] = base
    for mod in {id(x): x for x in models.values()}.values():
        mod.eval()
    totals = {s: [0.0, 0, 0] for s in models}  # nll nats, tokens, bytes
    chunks: list[dict[str, Any]] = []
    max_abs_off_base = 0.0
    bar = tqdm(total=len(data), unit="seq", desc="retro eval", disable=not progress)
    for start in range(0, len(data), cfg.batch_size):
        items = [data[i] for i in range(start, min(start + cfg.batch_size, len(data)))]
        batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
        x, y = batch["input_ids"], batch["labels"]
        nll = {
            "retro": token_nll(model, x, y, neighbour_ids=batch["neighbour_ids"],
                               neighbour_attention_mask=batch["neighbour_attention_mask"]),
            "retro_off": token_nll(model, x, y),
        }
        if base is not None:
            nll["base"] = token_nll(base, x, y)
            max_abs_off_base = max(max_abs_off_base, float(np.nanmax((nll["base"] - nll["retro_off"]).abs().numpy())))
        ok = ~torch.isnan(nll["retro"])
        nb = nbytes_of[x.clamp(max=len(nbytes_of) - 1)].float()
        for s, v in nll.items():
            totals[s][0] += float(v[ok].double().sum())
            totals[s][1] += int(ok.sum())
            totals[s][2] += int(nb[ok].sum())
        nt, nm = batch["neighbour_ids"].numpy(), batch["neighbour_attention_mask"].numpy()
        for b in range(len(items)):
            win = data.windows[start + b]
            for u in range(1, cfg.seq_chunks):
                sl = slice(u * m, (u + 1) * m)
                sel = ok[b, sl]
                if not bool(sel.any()):
                    continue
                toks = x[b, sl][sel].numpy()
                rec = {"chunk_id": int(win[u]), "doc_id": int(ds.chunk_doc_array[win[u]]), "tokens": int(sel.sum()),
                       "bytes": int(nb[b, sl][sel].sum()),
                       "overlap": chunk_overlap(toks, nt[b, u - 1], nm[b, u - 1], cfg.overlap_ngram)}
                for s, v in nll.items():
                    rec[f"nll_{s}"] = float(v[b, sl][sel].double().sum())
                chunks.append(rec)
        bar.update(len(items))
    bar.close()

    def metrics(nats: float, tokens: int, nbytes: int) -> dict[str, float]:
        return {"perplexity": math.exp(nats / max(tokens, 1)), "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
                "tokens": tokens, "bytes": nbytes}

    settings = {s: metrics(*totals[s]) for s in SETTINGS if s in totals}
    labels = bucket_labels(cfg.edges)
    buckets = []
    for i, label in enumerate(labels):
        rows = [c for c in chunks if bucket_of(c["overlap"], cfg.edges) == i]
        entry: dict[str, Any] = {"overlap": label, "chunks": len(rows)}
        nbytes = sum(c["bytes"] for c in rows)
        for s in settings:
            entry[f"bpb_{s}"] = (sum(c[f"nll_{s}"] for c in rows) / math.log(2) / nbytes) if nbytes else None
        buckets.append(entry)
    cumulative = []
    for e in cfg.edges:  # the paper's view: only chunks with overlap <= e
        rows = [c for c in chunks if c["overlap"] <= e]
        nbytes = sum(c["bytes"] for c in rows)
        entry = {"max_overlap": e, "chunks": len(rows)}
        for s in settings:
            entry[f"bpb_{s}"] = (sum(c[f"nll_{s}"] for c in rows) / math.log(2) / nbytes) if nbytes else None
        cumulative.append(entry)
    summary = {
        "title": title, "sequences": len(data), "sequence_tokens": cfg.seq_chunks * m, "num_neighbours": k,
        "held_out_documents": int(len(np.unique(ds.chunk_doc_array[data.windows.reshape(-1)]))),
        "split": spec.as_dict(), "settings": settings, "leakage_buckets": buckets, "leakage_cumulative": cumulative,
        "max_abs_token_nll_difference_base_vs_retro_off": max_abs_off_base if base is not None else None,
        "config": asdict(cfg), "seconds": time.perf_counter() - t0,
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    with (out / "chunks.jsonl").open("w") as fh:
        for c in chunks:
            fh.write(json.dumps(c) + "\n")
    summary["plot"] = str(plot_leakage(summary, out / "leakage.png"))
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_leakage(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if s in summary["settings"]]
    names = {"base": "base model", "retro": "RETRO, with neighbours", "retro_off": "RETRO, neighbours removed"}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    buckets = summary["leakage_buckets"]
    x = np.arange(len(buckets))
    w = 0.8 / len(settings)
    for i, s in enumerate(settings):
        vals = [b[f"bpb_{s}"] if b[f"bpb_{s}"] is not None else np.nan for b in buckets]
        a1.bar(x + (i - (len(settings) - 1) / 2) * w, vals, w, label=names[s])
    a1.set_xticks(x, [f"{b['overlap']}\n{b['chunks']} chunks" for b in buckets], fontsize=8)
    a1.set_xlabel(f"overlap of the chunk with its neighbours ({summary['config']['overlap_ngram']}-gram token coverage)")
    a1.set_ylabel("bits per byte")
    a1.set_title("bits per byte by overlap bucket")
    a1.legend(fontsize=8)
    cum = summary["leakage_cumulative"]
    xs = [c["max_overlap"] for c in cum]
    for s in settings:
        a2.plot(xs, [c[f"bpb_{s}"] if c[f"bpb_{s}"] is not None else np.nan for c in cum], marker="o", label=names[s])
    a2.set_xlabel("max overlap of the chunks counted")
    a2.set_ylabel("bits per byte")
    a2.set_title("chunks with overlap <= x (the paper's leakage curve)")
    a2.legend(fontsize=8)
    fig.suptitle(f"{summary['title']}: {summary['sequences']} held-out sequences of {summary['sequence_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
