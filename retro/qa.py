"""Question answering on gcide-qa (``retromem ralm qa``): the retriever's own quality, and whether a frozen
causal LM answers better with retrieved dictionary entries in its prompt, against controls.

Items are ``{query, answer_id, answer}`` (``../shared/corpora/gcide-qa.jsonl.gz``): the query is a
definition with the headword masked as ``___``, ``answer_id`` the source id of the entry it comes from
and ``answer`` its headword. An item whose entry is not in the datastore (not sampled, or dropped by
dedup) is counted as missing and left out of everything.

Retrieval (:func:`recall_report`): each retriever (anything with ``search(queries, k, fetch=...)``: a
:class:`retromem.index.dense.DenseIndex`, a :class:`retromem.index.lexical.LexicalIndex`, the gRPC
client) returns ``search_k`` chunks per query; they are turned into a ranking of distinct entries
(documents, each at the rank of its best chunk). Recall@k is the share of questions whose answer entry
is among the first k entries, i.e. a hit counts when its chunk belongs to document ``answer_id``.

Answering (:func:`evaluate_qa`): the same few-shot prompt in every setting (:data:`FEW_SHOT`, three
hand-written examples in the form ``Which word is defined: ...\\nAnswer: Word``), with a block of
dictionary entries before the question in every setting but ``closed_book``:

* ``closed_book``: no entries;
* ``dense`` / ``bm25`` (one per retriever): the top ``k`` distinct entries of that retriever, best last
  (nearest the question);
* ``oracle``: the answer entry alone (an upper bound: what the model does when it is given the answer);
* ``random``: ``k`` random entries of the datastore other than the answer entry, seeded per question
  (rules out "any dictionary text in the prompt helps").

Entries are shown as stored, GCIDE markup included (pronunciation ``\\Al"lo*cate\\``, ``{...}``
cross-references), with whitespace runs collapsed to one space and cut to ``entry_chars`` characters.
An entry's first word is its headword, so with the answer entry in the prompt the task is known-item
lookup and copying, which is what this measures.

Greedy decoding of ``max_new_tokens`` tokens. The answer rule (:func:`normalize_answer`, :func:`is_correct`):
take the first non-empty line of the generated text, split it on whitespace, keep as many words as the
gold headword has, strip the characters ``.,;:!?"'`()[]{}*\\`` from both ends of each word, lowercase,
join with single spaces; the answer is correct when that equals the gold headword normalized the same way.

Statistics: every accuracy and recall with a Wilson score interval (:func:`wilson`); every paired
comparison (retrieval vs closed book, retrieval vs random, dense vs bm25) with the difference of
accuracies, a paired bootstrap interval over questions (:func:`retromem.stats.paired_bootstrap`) and
an exact McNemar test on the discordant questions (:func:`mcnemar_p`).
"""

from __future__ import annotations

import gzip
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from retromem.config import integer, number, positive_int
from retromem.errors import ConfigError
from retromem.stats import mcnemar_p, paired_bootstrap

logger = logging.getLogger(__name__)

FEW_SHOT = (
    ("A small domesticated carnivorous mammal with soft fur, kept as a pet or for catching mice.", "Cat"),
    ("A large natural stream of water flowing in a channel to the sea or a lake.", "River"),
    ("To speak very softly, using one's breath rather than one's voice.", "Whisper"),
)
INSTRUCTION = "Each definition below comes from a dictionary; the defined word is replaced by ___. Give the word."
_STRIP = ".,;:!?\"'`()[]{}*\\"


@dataclass(frozen=True)
class QaItem:
    query: str
    answer_id: str  # source id of the answer entry, e.g. "gcide/Stake#2"
    answer: str  # its headword


@dataclass(frozen=True)
class QaConfig:
    k: int = 3  # entries in the prompt
    recall_at: tuple[int, ...] = (1, 10)
    search_k: int = 50  # chunks retrieved per question, ranked into distinct entries
    entry_chars: int = 160  # characters of each entry shown
    max_new_tokens: int = 5
    batch_size: int = 8  # prompts per generate call
    search_batch: int = 32  # queries per search call
    block: int = 25  # questions per saved block of generations (cache_dir)
    random_seed: int = 0
    bootstrap: int = 1000
    level: float = 0.95

    def __post_init__(self) -> None:
        positive_int(self.k, "k", flag="-k")
        object.__setattr__(self, "recall_at", tuple(self.recall_at))
        for r in self.recall_at:
            positive_int(r, "recall_at", flag="--recall-at")
        positive_int(self.search_k, "search_k", flag="--search-k")
        if self.search_k < max(self.k, *self.recall_at):
            raise ConfigError(f"`search_k` (--search-k) must be at least k and every recall_at "
                              f"({max(self.k, *self.recall_at)}), got {self.search_k}")
        positive_int(self.entry_chars, "entry_chars", flag="--entry-chars")
        positive_int(self.max_new_tokens, "max_new_tokens", flag="--max-new-tokens")
        positive_int(self.batch_size, "batch_size", flag="--batch-size")
        positive_int(self.search_batch, "search_batch", flag="--search-batch")
        positive_int(self.block, "block", flag="--block")
        integer(self.random_seed, "random_seed", flag="--random-seed")
        positive_int(self.bootstrap, "bootstrap", flag="--bootstrap")
        number(self.level, "level", gt=0, lt=1, flag="--level")


# ---------------------------------------------------------------------------------------------
# items, entries, answers


def load_qa_items(path: str | Path, *, limit: int | None = None) -> list[QaItem]:
    """The first ``limit`` items of a gcide-qa JSONL file (plain or .gz), in file order."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"`--qa` {p} does not exist")
    opener = gzip.open if p.suffix == ".gz" else open
    out: list[QaItem] = []
    with opener(p, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                out.append(QaItem(str(r["query"]), str(r["answer_id"]), str(r["answer"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{p}:{n}: not a gcide-qa item {{query, answer_id, answer}}: {exc}") from exc
    if not out:
        raise ConfigError(f"`--qa` {p} holds no items")
    return out


def doc_ids_by_source(ds: Any) -> dict[str, int]:
    """source_id -> doc_id over the datastore's documents."""
    return {r["source_id"]: i for i, r in enumerate(ds.iter_documents(columns=["source_id"]))}


def entry_text(ds: Any, doc_id: int, chars: int) -> str:
    """Document ``doc_id`` as shown in a prompt: whitespace runs collapsed, cut to ``chars`` characters."""
    t = " ".join(ds.document_text(int(doc_id)).split())
    return t if len(t) <= chars else t[:chars].rstrip() + " ..."


def normalize_answer(text: str, words: int = 1) -> str:
    """The first non-empty line of ``text``, its first ``words`` words, each stripped of surrounding
    punctuation, lowercased, joined by single spaces (the rule in the module doc)."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    parts = [w.strip(_STRIP) for w in line.split()[:max(words, 1)]]
    return " ".join(w for w in parts if w).lower()


def is_correct(generated: str, answer: str) -> bool:
    """True when the generated text's normalized first words equal the normalized gold headword."""
    gold = normalize_answer(answer, len(answer.split()))
    return bool(gold) and normalize_answer(generated, len(answer.split())) == gold


def build_prompt(query: str, entries: Sequence[str] = ()) -> str:
    """The few-shot prompt: instruction, the examples, then (when given) the entries, then the question."""
    parts = [INSTRUCTION, ""]
    for q, a in FEW_SHOT:
        parts += [f"Which word is defined: {q}", f"Answer: {a}", ""]
    if entries:
        parts.append("Dictionary entries:")
        parts += [f"- {e}" for e in entries]
        parts.append("")
    parts += [f"Which word is defined: {query}", "Answer:"]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# statistics


def wilson(correct: int, n: int, level: float = 0.95) -> dict[str, float]:
    """Rate ``correct / n`` with its Wilson score interval."""
    from statistics import NormalDist

    if n == 0:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "correct": 0, "n": 0}
    from retromem.stats import wilson as interval

    low, high = interval(correct, n, NormalDist().inv_cdf(0.5 + level / 2))
    return {"rate": correct / n, "low": low, "high": high, "correct": int(correct), "n": int(n)}


def compare(a: Sequence[bool], b: Sequence[bool], cfg: QaConfig, *, names: tuple[str, str] = ("a", "b")) -> dict[str, Any]:
    """Accuracy of ``a`` minus that of ``b`` over the same questions: paired bootstrap interval and McNemar."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    r = paired_bootstrap(x, y, n=cfg.bootstrap, seed=cfg.random_seed, level=cfg.level)
    a_only, b_only = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    return {"a": names[0], "b": names[1], "diff": r.mean, "low": r.low, "high": r.high, "level": r.level,
            "excludes_zero": r.excludes_zero(), "a_only": a_only, "b_only": b_only,
            "mcnemar_p": mcnemar_p(a_only, b_only), "n": int(len(x))}


# ---------------------------------------------------------------------------------------------
# retrieval


def rank_entries(retriever: Any, queries: Sequence[str], ds: Any, cfg: QaConfig) -> list[list[int]]:
    """For each query, distinct doc ids of datastore ``ds`` by the rank of their best chunk among
    ``search_k`` hits."""
    if not callable(getattr(retriever, "search", None)):
        raise TypeError(f"a retriever must have search(queries, k, ...), got {type(retriever).__name__}")
    theirs = getattr(retriever, "datastore_id", None)
    if isinstance(theirs, str) and theirs != ds.datastore_id:
        raise ConfigError(f"the index was built from datastore {theirs[:16]}, but --datastore {ds.path} is "
                          f"{ds.datastore_id[:16]}")
    out: list[list[int]] = []
    for s in range(0, len(queries), cfg.search_batch):
        part = list(queries[s:s + cfg.search_batch])
        res = retriever.search(part, cfg.search_k)
        for row in np.asarray(res.chunk_ids):
            ok = row[row >= 0]
            docs = ds.doc_ids(ok).tolist() if len(ok) else []
            out.append(list(dict.fromkeys(int(d) for d in docs)))  # first occurrence = best chunk
    return out


def _present(items: Sequence[QaItem], ds: Any) -> tuple[list[QaItem], list[int], int]:
    by_source = doc_ids_by_source(ds)
    kept = [q for q in items if q.answer_id in by_source]
    return kept, [by_source[q.answer_id] for q in kept], len(items) - len(kept)


def recall_report(items: Sequence[QaItem], ds: Any, retrievers: dict[str, Any], cfg: QaConfig) -> dict[str, Any]:
    """Recall@k (each of ``cfg.recall_at``) of the answer entry per retriever, with Wilson intervals, and
    the paired comparison of every pair of retrievers at each k."""
    kept, gold, missing = _present(items, ds)
    if not kept:
        raise ConfigError("none of the questions' answer entries is in the datastore")
    hits: dict[str, dict[int, list[bool]]] = {}
    out: dict[str, Any] = {"questions": len(kept), "missing": missing, "recall_at": list(cfg.recall_at),
                           "retrievers": {}, "comparisons": []}
    for name, r in retrievers.items():
        ranks = rank_entries(r, [q.query for q in kept], ds, cfg)
        hits[name] = {k: [g in rk[:k] for g, rk in zip(gold, ranks)] for k in cfg.recall_at}
        out["retrievers"][name] = {f"recall@{k}": wilson(sum(h), len(h), cfg.level) for k, h in hits[name].items()}
    names = list(retrievers)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k in cfg.recall_at:
                out["comparisons"].append({**compare(hits[a][k], hits[b][k], cfg, names=(a, b)), "at": k})
    return out


# ---------------------------------------------------------------------------------------------
# answering


@torch.inference_mode()
def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy continuations (``max_new_tokens`` tokens, decoded) of each prompt; batches of similar
    length, left-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    enc = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    out: list[str | None] = [None] * len(enc)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(enc[i]) for i in idx)
        if limit and width + max_new_tokens > limit:
            raise ConfigError(f"a prompt has {width} tokens, the model reads at most {limit}: lower -k or --entry-chars")
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(enc[i]):] = torch.tensor(enc[i])
            mask[r, width - len(enc[i]):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, num_beams=1)
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
    return out  # type: ignore[return-value]


def random_entries(n_docs: int, exclude: int, k: int, seed: int, question: int) -> list[int]:
    """``k`` distinct random doc ids other than ``exclude``, the same for the same (seed, question)."""
    rng = np.random.default_rng([seed, question])
    out: list[int] = []
    while len(out) < min(k, n_docs - 1):
        d = int(rng.integers(n_docs))
        if d != exclude and d not in out:
            out.append(d)
    return out


def evaluate_qa(model: torch.nn.Module, tokenizer: Any, items: Sequence[QaItem], ds: Any, retrievers: dict[str, Any],
                cfg: QaConfig, *, cache_dir: str | Path | None = None, progress: bool = False,
                compressor: Any = None) -> dict[str, Any]:
    """Answers every question under ``closed_book``, each retriever, ``oracle`` and ``random`` (see the
    module doc) and compares them. ``cache_dir``: generations are saved there per block of ``cfg.block``
    questions (keyed by the settings) and read back on a re-run, so a killed run carries on.
    ``compressor`` (:mod:`retromem.retro.compress`, TCRA-LLM): the retrievers' entries are compressed
    before they enter the prompt; ``prompt_tokens`` reports each setting's mean prompt length."""
    from tqdm.auto import tqdm

    bad = {"closed_book", "oracle", "random"} & set(retrievers)
    if bad:
        raise ConfigError(f"a retriever may not be named {sorted(bad)}: those are control settings")
    kept, gold, missing = _present(items, ds)
    if not kept:
        raise ConfigError("none of the questions' answer entries is in the datastore")
    ranks = {name: rank_entries(r, [q.query for q in kept], ds, cfg) for name, r in retrievers.items()}
    settings = ["closed_book", *retrievers, "oracle", "random"]

    def entries_of(setting: str, i: int) -> list[int]:
        if setting == "closed_book":
            return []
        if setting == "oracle":
            return [gold[i]]
        if setting == "random":
            return random_entries(ds.num_documents, gold[i], cfg.k, cfg.random_seed, i)
        return ranks[setting][i][:cfg.k]

    shown: dict[str, list[list[int]]] = {s: [entries_of(s, i) for i in range(len(kept))] for s in settings}
    cache = Path(cache_dir) if cache_dir is not None else None
    key = {"config": _config_dict(cfg), "datastore_id": ds.datastore_id, "few_shot": FEW_SHOT, "instruction": INSTRUCTION}
    if compressor is not None:
        key["compressor"] = compressor.describe()
    prompt_tokens: dict[str, list[int]] = {s: [] for s in settings}

    def entries_shown(s: str, i: int) -> list[str]:
        texts = [entry_text(ds, d, cfg.entry_chars) for d in reversed(shown[s][i])]
        return compressor.compress(kept[i].query, texts) if compressor is not None and s in retrievers else texts

    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        kfile = cache / "key.json"
        if kfile.is_file() and json.loads(kfile.read_text()) != json.loads(json.dumps(key)):
            raise ConfigError(f"{cache} holds generations of other settings or another datastore; choose another --out")
        kfile.write_text(json.dumps(key, indent=1) + "\n")
    generated: dict[str, list[str]] = {s: [] for s in settings}
    blocks = range(0, len(kept), cfg.block)
    for b in tqdm(blocks, desc="qa blocks", disable=not progress, unit="block"):
        idx = list(range(b, min(b + cfg.block, len(kept))))
        path = cache / f"block-{b // cfg.block:05d}.json" if cache is not None else None
        ident = [(kept[i].answer_id, {s: shown[s][i] for s in settings}) for i in idx]
        if path is not None and path.is_file():
            rec = json.loads(path.read_text())
            if rec["ident"] == json.loads(json.dumps(ident)):
                for s in settings:
                    generated[s] += rec["generated"][s]
                    prompt_tokens[s] += rec.get("prompt_tokens", {}).get(s, [])
                continue
        prompts = {s: [build_prompt(kept[i].query, entries_shown(s, i)) for i in idx] for s in settings}
        for s in settings:
            prompt_tokens[s] += [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts[s]]
        # one generation per distinct prompt: greedy decoding gives the same answer to the same prompt, and
        # the retrievers often agree (known-item lookup), so this saves most of a setting's cost
        unique = list(dict.fromkeys(p for s in settings for p in prompts[s]))
        answers = dict(zip(unique, generate_answers(model, tokenizer, unique, max_new_tokens=cfg.max_new_tokens,
                                                    batch_size=cfg.batch_size)))
        gen_block = {s: [answers[p] for p in prompts[s]] for s in settings}
        for s in settings:
            generated[s] += gen_block[s]
        if path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"ident": ident, "generated": gen_block,
                                       "prompt_tokens": {s: prompt_tokens[s][-len(idx):] for s in settings}}) + "\n")
            tmp.replace(path)
    correct = {s: [is_correct(g, q.answer) for g, q in zip(generated[s], kept)] for s in settings}
    pairs = [(r, "closed_book") for r in retrievers] + [(r, "random") for r in retrievers]
    pairs += [("oracle", "closed_book"), ("random", "closed_book")]
    names = list(retrievers)
    pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    return {
        "config": _config_dict(cfg), "questions": len(kept), "missing": missing,
        "rule": "first non-empty generated line, as many words as the headword, each stripped of "
                f"{_STRIP!r}, lowercased; equal to the headword normalized the same way",
        "entries_shown": "as stored (GCIDE markup), whitespace collapsed, cut to entry_chars characters",
        "settings": {s: wilson(sum(c), len(c), cfg.level) for s, c in correct.items()},
        "prompt_tokens": {s: float(np.mean(v)) if v else None for s, v in prompt_tokens.items()},
        "answer_in_prompt": {s: float(np.mean([g in e for g, e in zip(gold, shown[s])])) for s in settings},
        "comparisons": [compare(correct[a], correct[b], cfg, names=(a, b)) for a, b in pairs],
        "examples": [{"query": q.query, "answer": q.answer, **{s: generated[s][i] for s in settings}}
                     for i, q in enumerate(kept[:10])],
        "generated": generated, "correct": correct,
    }


def _config_dict(cfg: QaConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["recall_at"] = list(cfg.recall_at)
    return d


def plot_qa(report: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Bars: LM accuracy per setting and retrieval recall@k per retriever, with Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_lm = next(iter(report["settings"].values()))["n"]
    panels = [(f"answer accuracy ({n_lm} questions)", report["settings"])]
    rec = report.get("recall")
    if rec:
        panels.append((f"recall of the answer entry ({rec['questions']} questions)",
                       {f"{n} @{k}": v[f"recall@{k}"] for n, v in rec["retrievers"].items() for k in rec["recall_at"]}))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        labels = list(rows)
        rate = np.array([rows[s]["rate"] for s in labels])
        err = [rate - np.array([rows[s]["low"] for s in labels]), np.array([rows[s]["high"] for s in labels]) - rate]
        ax.bar(range(len(labels)), rate, yerr=err, capsize=3, color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(name, fontsize=9)
        for i, v in enumerate(rate):  # above the interval's upper end
            ax.text(i, v + err[1][i] + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    fig.suptitle(title or f"{report.get('questions', '?')} questions", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["FEW_SHOT", "INSTRUCTION", "QaConfig", "QaItem", "build_prompt", "compare", "doc_ids_by_source",
           "entry_text", "evaluate_qa", "generate_answers", "is_correct", "load_qa_items", "mcnemar_p",
           "normalize_answer", "plot_qa", "random_entries", "rank_entries", "recall_report", "wilson"]
