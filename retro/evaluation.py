"""RETRO evaluation on held-out documents (``retromem retro eval``): perplexity and bits per byte in
four settings on the same tokens, paired bootstrap intervals for the differences that decide whether
the model reads its neighbours, and the paper's leakage analysis.

Settings, all on the same token sequences of the held-out split (:mod:`retromem.retro.data`):

* ``base``: the base model alone (for RETROfit: the pretrained model, loaded separately);
* ``retro``: the RETRO model with its retrieved neighbours;
* ``retro_random``: the RETRO model with the retrieved neighbours of a random other chunk (a chunk
  of the training split, and neither it nor its neighbours from the evaluated chunk's document;
  :class:`~retromem.retro.data.RandomNeighbourTable`): same k, same token length, real neighbour
  sets, no retrieval signal. This controls for "any text in the neighbour slots";
* ``retro_off``: the RETRO model with the neighbours removed (for RETROfit this must equal ``base``:
  the run reports the difference as a check);
* ``control`` (when a control model is given): the model trained the same way without retrieval
  signal (``neighbours_mode: random`` in :mod:`retromem.retro.training`: same blocks, sequences and
  steps), reading the same retrieved neighbours. It measures domain adaptation of the new weights
  separately from retrieval.

Differences (``differences`` in results.json), each the mean per-token negative log-likelihood of
the first setting minus the second (nats; negative = the first is better; ``exp`` of it is the
perplexity ratio) with a paired bootstrap interval (:func:`retromem.stats.paired_bootstrap`,
resampling whole held-out documents, or sequences with ``groups="sequence"``):

* ``retro - retro_random``: what retrieval adds over arbitrary neighbours; the claim "RETRO reads
  its neighbours" needs this interval below zero;
* ``retro - retro_off`` and ``retro_random - retro_off``: neighbours against none;
* ``retro_off - base``: what training changed without neighbours (domain adaptation);
* ``retro - control`` and ``control - base``: retrieval training against the control run, and the
  control run against the base.

Bits per byte = total negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the predicted tokens
(byte-level BPE: each token's byte length from the vocabulary), so it compares across tokenizers.

Leakage analysis (Borgeaud et al. 2021, section 4.4): with the causal shift, the tokens of chunk u
are predicted by positions that attend to the neighbours of chunk u-1 (retrieved with chunk u-1,
each with its continuation). For every chunk u >= 1 the overlap is the fraction of its tokens
covered by an ``overlap_ngram``-token n-gram that also occurs in one of those neighbours; chunks
are bucketed by overlap and each bucket's bits per byte reported for every setting, with the gain
of retrieved over random neighbours and its interval. A gain that only appears at high overlap is
copying of leaked text, not better language modelling; a gain flat across buckets and equal with
random neighbours is not retrieval at all.
"""

from __future__ import annotations

import functools
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

from retromem.config import fail, integer, is_int, is_number, number, one_of, optional_positive_int, positive_int
from retromem.errors import ConfigError
from retromem.stats import paired_bootstrap

logger = logging.getLogger(__name__)

SETTINGS = ("base", "retro", "retro_random", "retro_off", "control")
# (first, second): reported as first - second, when both settings ran
DIFFERENCES = (("retro", "retro_random"), ("retro", "retro_off"), ("retro_random", "retro_off"), ("retro_off", "base"),
               ("retro", "control"), ("control", "base"))
DEFAULT_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)
GROUPS = ("document", "sequence")


@dataclass(frozen=True)
class RetroEvalConfig:
    """seq_chunks: chunks per evaluated sequence; max_sequences: spread evenly over the held-out split
    (None: all); overlap_ngram: n-gram length of the leakage analysis; edges: overlap bucket edges (a
    bucket of exactly 0 overlap comes first, then (e_i, e_i+1]); seed: of the random neighbours and the
    bootstrap; bootstrap: resamples; level: interval coverage; groups: the bootstrap's resampling unit
    (held-out ``document`` or evaluated ``sequence``)."""

    out: str
    seq_chunks: int = 4
    max_sequences: int | None = 64
    batch_size: int = 2
    overlap_ngram: int = 8
    edges: tuple[float, ...] = DEFAULT_EDGES
    seed: int = 0
    bootstrap: int = 1000
    level: float = 0.95
    groups: str = "document"

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
        integer(self.seed, "seed", flag="--seed")
        positive_int(self.bootstrap, "bootstrap", flag="--bootstrap")
        number(self.level, "level", gt=0, lt=1, flag="--level")
        one_of(self.groups, "groups", GROUPS, flag="--groups")


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


def difference(nll: dict[str, np.ndarray], first: str, second: str, groups: np.ndarray, cfg: RetroEvalConfig,
               select: np.ndarray | None = None) -> dict[str, Any] | None:
    """Mean per-token NLL of ``first`` minus ``second`` (nats) with its paired bootstrap interval over
    ``groups``, on the tokens ``select`` (bool, default all); also as a perplexity ratio."""
    a, b, g = nll[first], nll[second], groups
    if select is not None:
        a, b, g = a[select], b[select], g[select]
    if len(a) == 0:
        return None
    r = paired_bootstrap(a, b, groups=g, n=cfg.bootstrap, seed=cfg.seed, level=cfg.level)
    # resampling a single document (or sequence) always redraws the same tokens: no interval to give
    has = r.n_groups >= 2
    return {"first": first, "second": second, "mean_nll": r.mean, "low": r.low if has else None,
            "high": r.high if has else None, "ppl_ratio": math.exp(r.mean),
            "ppl_ratio_low": math.exp(r.low) if has else None, "ppl_ratio_high": math.exp(r.high) if has else None,
            "excludes_zero": has and r.excludes_zero(), "level": r.level, "tokens": r.n_items, "groups": r.n_groups,
            "resamples": r.n_resamples}


def format_difference(d: dict[str, Any] | None, unit: str = "groups") -> str:
    """``-0.0020 [-0.0042, +0.0001]`` (nats/token) for a :func:`difference`; says so when there is none."""
    if d is None:
        return "no tokens"
    if d["low"] is None:
        return f"{d['mean_nll']:+.4f} [no interval: one of {unit} only]"
    return f"{d['mean_nll']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


@torch.inference_mode()
def evaluate(model: torch.nn.Module, ds: Any, table: Any, cfg: RetroEvalConfig, base: torch.nn.Module | None = None,
             title: str = "RETRO", progress: bool = True, control: torch.nn.Module | None = None, *,
             runner: "ShardRunner | None" = None) -> dict[str, Any]:
    """Runs every setting on the held-out sequences; writes results.json, chunks.jsonl and leakage.png
    under ``cfg.out``; returns the summary. ``control``: the model trained with random neighbours.

    ``runner`` (:class:`ShardRunner`): the forward passes run as its executor's tasks (local processes
    or Ray), each loading the models from paths; this process keeps the rest (sequences, neighbours,
    overlaps, sums, intervals) and the summary equals the in-process one exactly (the same batches,
    the same thread count; tested). ``model``/``base``/``control`` are then only read for their configs.

    ``table`` must cover the held-out chunks; the random neighbours are lent by its training-split
    chunks (pass the training neighbours too, as ``retromem retro eval --neighbours nb-train
    --neighbours nb-eval`` does), or by other held-out documents' chunks when it has none."""
    from tqdm.auto import tqdm

    from retromem.datastore.tokenizer import byte_length_table
    from retromem.retro.data import RandomNeighbourTable, RetroDataset

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
    random_table = RandomNeighbourTable(table, ds, data.windows.reshape(-1), seed=cfg.seed)
    random_data = RetroDataset(ds, covered, cfg.seq_chunks, random_table, k=k, max_sequences=cfg.max_sequences)
    assert np.array_equal(data.windows, random_data.windows)  # the same tokens, only the neighbours differ
    nbytes_of = torch.from_numpy(byte_length_table(ds.tokenizer.backend_tokenizer))
    doc_of = np.asarray(ds.chunk_doc_array)
    m = ds.chunk_length
    models = {"retro": model, "retro_random": model, "retro_off": model}
    if base is not None:
        models["base"] = base
    if control is not None:
        control_cfg = control.retro_config if getattr(control, "retro_config", None) is not None else control.config
        if (control_cfg.chunk_length, control_cfg.num_neighbours) != (retro_cfg.chunk_length, k):
            raise ConfigError(f"the control model reads {control_cfg.num_neighbours} neighbours per "
                              f"{control_cfg.chunk_length}-token chunk, the RETRO model {k} per {retro_cfg.chunk_length}")
        models["control"] = control
    for mod in {id(x): x for x in models.values()}.values():
        mod.eval()
    models_by_role = {"model": model, "base": base, "control": control}
    # per predicted token: its NLL in every setting, its bytes, its resampling group, its chunk record (-1: chunk 0)
    tok_nll: dict[str, list[np.ndarray]] = {s: [] for s in models}
    tok_bytes, tok_group, tok_chunk = [], [], []
    chunks: list[dict[str, Any]] = []
    max_abs_off_base = 0.0
    bar = tqdm(total=len(data), unit="seq", desc="retro eval", disable=not progress)
    starts = list(range(0, len(data), cfg.batch_size))
    remote_nll: list[dict[str, torch.Tensor]] = []
    if runner is not None:  # every forward pass in the runner's tasks; the rest below on the merged NLLs
        remote_nll = runner.score([_batch(data, random_data, start, cfg.batch_size) for start in starts])
        if remote_nll and list(remote_nll[0]) != list(models):
            raise ConfigError(f"the tasks' models give the settings {', '.join(remote_nll[0])}, this process's "
                              f"{', '.join(models)}: pass the same base and control models to both")
    for bi, start in enumerate(starts):
        batch, rbatch = _batch(data, random_data, start, cfg.batch_size)
        n_items = len(batch["input_ids"])
        x = batch["input_ids"]
        nll = remote_nll[bi] if runner is not None else batch_nll(models_by_role, batch, rbatch)
        if base is not None:
            max_abs_off_base = max(max_abs_off_base, float(np.nanmax((nll["base"] - nll["retro_off"]).abs().numpy())))
        ok = ~torch.isnan(nll["retro"])  # (B, T)
        nb = nbytes_of[x.clamp(max=len(nbytes_of) - 1)].float()  # (B, T)
        nt, nm = batch["neighbour_ids"].numpy(), batch["neighbour_attention_mask"].numpy()
        rt, rm = rbatch["neighbour_ids"].numpy(), rbatch["neighbour_attention_mask"].numpy()
        for b in range(n_items):
            win = data.windows[start + b]
            chunk_of_pos = np.full(x.shape[1], -1, dtype=np.int64)  # (T,) chunk record of each position
            for u in range(1, cfg.seq_chunks):
                sl = slice(u * m, (u + 1) * m)
                sel = ok[b, sl]
                if not bool(sel.any()):
                    continue
                toks = x[b, sl][sel].numpy()
                rec = {"chunk_id": int(win[u]), "doc_id": int(doc_of[win[u]]), "tokens": int(sel.sum()),
                       "bytes": int(nb[b, sl][sel].sum()),
                       "overlap": chunk_overlap(toks, nt[b, u - 1], nm[b, u - 1], cfg.overlap_ngram),
                       "overlap_random": chunk_overlap(toks, rt[b, u - 1], rm[b, u - 1], cfg.overlap_ngram),
                       "random_donor": int(random_table.donor_of([win[u - 1]])[0])}
                for s, v in nll.items():
                    rec[f"nll_{s}"] = float(v[b, sl][sel].double().sum())
                chunk_of_pos[sl] = len(chunks)
                chunks.append(rec)
            keep = ok[b].numpy()
            for s, v in nll.items():
                tok_nll[s].append(v[b].double().numpy()[keep])
            tok_bytes.append(nb[b].numpy()[keep])
            tok_chunk.append(chunk_of_pos[keep])
            if cfg.groups == "document":
                group = doc_of[np.repeat(win, m)]  # (T,) the document of each position's chunk
            else:
                group = np.full(x.shape[1], start + b, dtype=np.int64)
            tok_group.append(group[keep])
        bar.update(n_items)
    bar.close()

    nll_all = {s: np.concatenate(v) for s, v in tok_nll.items()}
    nbytes_all, groups, chunk_all = np.concatenate(tok_bytes), np.concatenate(tok_group), np.concatenate(tok_chunk)

    def metrics(nats: float, tokens: int, nbytes: int) -> dict[str, float]:
        return {"perplexity": math.exp(nats / max(tokens, 1)), "bits_per_byte": nats / math.log(2) / max(nbytes, 1),
                "tokens": tokens, "bytes": nbytes}

    settings = {s: metrics(float(nll_all[s].sum()), len(nll_all[s]), int(nbytes_all.sum()))
                for s in SETTINGS if s in nll_all}
    differences = {f"{a} - {b}": difference(nll_all, a, b, groups, cfg) for a, b in DIFFERENCES
                   if a in nll_all and b in nll_all}
    labels = bucket_labels(cfg.edges)
    bucket_of_chunk = np.array([bucket_of(c["overlap"], cfg.edges) for c in chunks], dtype=np.int64)
    bucket_of_token = np.where(chunk_all >= 0, bucket_of_chunk[np.clip(chunk_all, 0, None)] if len(chunks) else -1, -1)
    buckets = []
    for i, label in enumerate(labels):
        rows = [c for c, bi in zip(chunks, bucket_of_chunk) if bi == i]
        entry: dict[str, Any] = {"overlap": label, "chunks": len(rows)}
        nbytes = sum(c["bytes"] for c in rows)
        for s in settings:
            entry[f"bpb_{s}"] = (sum(c[f"nll_{s}"] for c in rows) / math.log(2) / nbytes) if nbytes else None
        sel = bucket_of_token == i
        entry["retro - retro_random"] = difference(nll_all, "retro", "retro_random", groups, cfg, sel)
        entry["retro - retro_off"] = difference(nll_all, "retro", "retro_off", groups, cfg, sel)
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
        "held_out_documents": int(len(np.unique(doc_of[data.windows.reshape(-1)]))),
        "split": spec.as_dict(), "settings": settings, "differences": differences,
        "random_neighbours": {"donor_split": random_table.donor_split, "seed": cfg.seed,
                              "mean_overlap_retrieved": float(np.mean([c["overlap"] for c in chunks])) if chunks else None,
                              "mean_overlap_random": float(np.mean([c["overlap_random"] for c in chunks])) if chunks else None},
        "leakage_buckets": buckets, "leakage_cumulative": cumulative,
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


def _batch(data: Any, random_data: Any, start: int, batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The evaluated sequences ``start .. start + batch_size`` with their retrieved neighbours, and the
    random neighbours of the same sequences."""
    idx = range(start, min(start + batch_size, len(data)))
    items = [data[i] for i in idx]
    rand = [random_data[i] for i in idx]
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    rbatch = {key: torch.stack([it[key] for it in rand]) for key in ("neighbour_ids", "neighbour_attention_mask")}
    return batch, rbatch


@torch.inference_mode()
def batch_nll(models: dict[str, torch.nn.Module | None], batch: dict[str, torch.Tensor],
              rbatch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(B, T) token NLL of one batch in every setting the ``models`` (roles ``model``, ``base``,
    ``control``; None: absent) allow, in :data:`SETTINGS`' reporting order of the summary."""
    model, base, control = models["model"], models.get("base"), models.get("control")
    x, y = batch["input_ids"], batch["labels"]
    nll = {
        "retro": token_nll(model, x, y, neighbour_ids=batch["neighbour_ids"],
                           neighbour_attention_mask=batch["neighbour_attention_mask"]),
        "retro_random": token_nll(model, x, y, neighbour_ids=rbatch["neighbour_ids"],
                                  neighbour_attention_mask=rbatch["neighbour_attention_mask"]),
        "retro_off": token_nll(model, x, y),
    }
    if base is not None:
        nll["base"] = token_nll(base, x, y)
    if control is not None:
        nll["control"] = token_nll(control, x, y, neighbour_ids=batch["neighbour_ids"],
                                   neighbour_attention_mask=batch["neighbour_attention_mask"])
    return nll


@dataclass(frozen=True)
class EvalModels:
    """Where every task finds the models of a sharded evaluation: directories every node sees (or
    built-in names / hub ids that each node resolves from its own cache).

    model: the RETRO directory (:func:`retromem.retro.loading.load_retro_model`); base_model: the base
    its RETROfit weights go on (None: the recorded one); base: the model of the ``base`` setting (None:
    no such setting); control_model: the control run's directory; threads: torch threads per task
    (the in-process run's ``--threads``, so each batch is computed the same way)."""

    model: str
    base_model: str | None = None
    base: str | None = None
    control_model: str | None = None
    threads: int = 1

    def load(self) -> dict[str, torch.nn.Module | None]:
        """The models by role (``model``, ``base``, ``control``), in eval mode."""
        from retromem.models import load_causal_lm
        from retromem.retro.loading import load_retro_model

        return {"model": load_retro_model(self.model, self.base_model)[0],
                "base": load_causal_lm(self.base)[0].eval() if self.base else None,
                "control": load_retro_model(self.control_model, self.base_model)[0] if self.control_model else None}


@functools.lru_cache(maxsize=1)
def _models_of(spec: EvalModels) -> dict[str, torch.nn.Module | None]:
    # a worker process (Ray reuses them) loads the models once, not once per shard
    return spec.load()


def _score_shard(spec: EvalModels, shard: tuple[int, list[tuple[dict, dict]]]) -> list[dict[str, np.ndarray]]:
    """One task: the token NLLs of a run of whole batches (numpy, bit-exact through pickling)."""
    torch.set_num_threads(spec.threads)
    models = _models_of(spec)
    return [{s: v.numpy() for s, v in batch_nll(models, batch, rbatch).items()} for batch, rbatch in shard[1]]


class ShardRunner:
    """Runs :func:`evaluate`'s forward passes as tasks of an executor (``retromem.datastore.executors``:
    local processes or Ray): the batches are cut into ``shards`` runs of whole batches, one task each,
    and the NLLs come back in batch order. Tasks load the models from ``models`` (paths every node sees)."""

    def __init__(self, executor: Any, models: EvalModels, shards: int) -> None:
        positive_int(shards, "shards", flag="--workers")
        self.executor, self.models, self.shards = executor, models, shards

    def score(self, batches: list[tuple[dict, dict]]) -> list[dict[str, torch.Tensor]]:
        n = len(batches)
        bounds = np.linspace(0, n, min(self.shards, n) + 1).round().astype(int)
        items = [(i, batches[a:b]) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
        out: list[list[dict[str, np.ndarray]] | None] = [None] * len(items)
        for (i, _), result in self.executor.map(_score_shard, self.models, items):
            out[i] = result
        return [{s: torch.from_numpy(np.array(v)) for s, v in d.items()} for part in out for d in part]  # type: ignore[union-attr]


NAMES = {"base": "base model", "retro": "RETRO, retrieved neighbours", "retro_random": "RETRO, random neighbours",
         "retro_off": "RETRO, no neighbours", "control": "control (trained on random), retrieved"}


def plot_leakage(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if s in summary["settings"]]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(18, 4.8))
    buckets = summary["leakage_buckets"]
    x = np.arange(len(buckets))
    ticks = [f"{b['overlap']}\n{b['chunks']} chunks" for b in buckets]
    w = 0.8 / len(settings)
    for i, s in enumerate(settings):
        vals = [b[f"bpb_{s}"] if b[f"bpb_{s}"] is not None else np.nan for b in buckets]
        a1.bar(x + (i - (len(settings) - 1) / 2) * w, vals, w, label=NAMES[s])
    tallest = max((b[f"bpb_{s}"] or 0.0) for b in buckets for s in settings)
    a1.set_ylim(0, 1.4 * tallest if tallest > 0 else 1.0)  # room for the legend above the bars
    a1.set_xticks(x, ticks, fontsize=8)
    a1.set_xlabel(f"overlap of the chunk with its neighbours ({summary['config']['overlap_ngram']}-gram token coverage)")
    a1.set_ylabel("bits per byte")
    a1.set_title("bits per byte by overlap bucket")
    a1.legend(fontsize=8, loc="upper center", ncol=2)
    cum = summary["leakage_cumulative"]
    xs = [c["max_overlap"] for c in cum]
    for s in settings:
        a2.plot(xs, [c[f"bpb_{s}"] if c[f"bpb_{s}"] is not None else np.nan for c in cum], marker="o", label=NAMES[s])
    a2.set_xlabel("max overlap of the chunks counted")
    a2.set_ylabel("bits per byte")
    a2.set_title("chunks with overlap <= x (the paper's leakage curve)")
    a2.legend(fontsize=8)
    level = summary["config"]["level"]
    for j, (key, label) in enumerate((("retro - retro_random", "retrieved - random neighbours"),
                                      ("retro - retro_off", "retrieved - no neighbours"))):
        d = [b[key] for b in buckets]
        mean = np.array([v["mean_nll"] if v else np.nan for v in d])
        err = np.array([[v["mean_nll"] - v["low"], v["high"] - v["mean_nll"]] if v and v["low"] is not None
                        else [np.nan, np.nan] for v in d]).T
        a3.errorbar(x + (j - 0.5) * 0.2, mean, yerr=err, fmt="o", capsize=4, label=label)
    a3.axhline(0.0, color="grey", lw=0.8)
    a3.set_xlim(-0.5, len(buckets) - 0.5)
    a3.set_xticks(x, ticks, fontsize=8)
    a3.set_xlabel("overlap bucket (as left)")
    a3.set_ylabel("mean NLL difference, nats/token (< 0: better)")
    a3.set_title(f"gain by overlap, {level:.0%} paired bootstrap intervals")
    a3.legend(fontsize=8)
    fig.suptitle(f"{summary['title']}: {summary['sequences']} held-out sequences of {summary['sequence_tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
