"""The ∞-gram language model interpolated with a neural causal LM (the infini-gram paper's use).

For each held-out token, the ∞-gram LM gives P(token | longest suffix of its prefix that occurs in
the datastore) from the suffix-array index, and a Hugging Face causal LM gives its own probability;
the mixture ``λ·p_∞ + (1 − λ)·p_LM`` is scored for a grid of ``λ`` and reported as perplexity next to
the LM alone (``λ = 0``). Both models must share the datastore's tokenizer (the offline default
SmolLM2-135M with the default datastore tokenizer), so that they score the same tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retromem.config import fail, is_int, is_number, positive_int
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterpolationConfig:
    model: str = "smollm2-135m"
    max_docs: int = 20
    max_tokens: int = 512  # tokens scored per document: its first ones (the LM's context is the document so far)
    lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lambdas", tuple(self.lambdas))
        positive_int(self.max_docs, "max_docs", flag="--max-docs")
        if not is_int(self.max_tokens) or self.max_tokens < 2:
            fail("max_tokens", "be an integer >= 2 (the first token has no context)", self.max_tokens, flag="--max-tokens")
        if not self.lambdas or not all(is_number(x) and 0.0 <= x < 1.0 for x in self.lambdas):
            fail("lambdas", "be weights in [0, 1) (λ = 1 gives the ∞-gram LM alone, whose zero probabilities "
                 "make perplexity infinite)", self.lambdas, flag="--lambdas")


@dataclass(frozen=True)
class InterpolationResult:
    documents: int
    tokens: int
    lm_perplexity: float
    lambdas: tuple[float, ...]
    perplexities: tuple[float, ...]
    nonzero_fraction: float  # share of tokens with a nonzero ∞-gram probability
    mean_suffix_len: float

    @property
    def best_lambda(self) -> float:
        return self.lambdas[int(np.argmin(self.perplexities))]

    @property
    def best_perplexity(self) -> float:
        return float(min(self.perplexities))

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(best_lambda=self.best_lambda, best_perplexity=self.best_perplexity)
        return d


def read_heldout(path: str | Path, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Texts of a JSONL file (plain, .gz or .zst), normalized as the datastore normalizes its input."""
    from retromem.datastore.normalize import normalize
    from retromem.datastore.readers import InputFile, iter_records
    from retromem.errors import InputError

    texts = []
    for rec in iter_records(InputFile(str(path), "jsonl", 0, 0), text_field, None):
        if isinstance(rec, InputError):
            raise rec
        texts.append(normalize(rec.text))
        if max_docs is not None and len(texts) >= max_docs:
            break
    if not texts:
        raise ConfigError(f"--heldout {path} holds no documents")
    return texts


def drop_documents_in_datastore(ds, texts: Sequence[str]) -> list[str]:
    """``texts`` without those the datastore holds verbatim (by its content hash): scoring a document
    the ∞-gram LM has seen would measure memorisation, not held-out perplexity."""
    import hashlib

    # the datastore keeps blake2b-128 of each normalized document, as hex
    held = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in texts]
    want = set(held)
    seen = {h for row in ds.iter_documents(columns=["content_hash"]) if (h := row["content_hash"]) in want}
    if seen:
        logger.warning("%d of %d held-out documents are in the datastore; they are left out", len(seen), len(texts))
    return [t for t, h in zip(texts, held) if h not in seen]


def lm_token_probs(model, ids: Sequence[int]) -> np.ndarray:
    """P_LM(ids[i] | ids[:i]) for i = 1..n-1, shape (n - 1,)."""
    import torch

    with torch.inference_mode():
        x = torch.tensor([list(ids)], dtype=torch.long, device=model.device)
        logits = model(input_ids=x).logits[0, :-1].float()  # (n - 1, vocab)
        logp = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
    return logp.exp().cpu().numpy().astype(np.float64)


def infgram_token_probs(idx, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(∞-gram P(ids[i] | ids[:i]), suffix length used) for i = 1..n-1."""
    scores = idx.score(list(ids))[1:]
    return np.array([s.prob for s in scores]), np.array([s.suffix_len for s in scores])


def _check_same_tokenizer(idx, tok) -> None:
    probe = "The quick brown fox: def f(x): return x ** 2  # über"
    a = idx.datastore.tokenizer.encode(probe, add_special_tokens=False)
    b = tok.encode(probe, add_special_tokens=False)
    if list(a) != list(b):
        raise ConfigError("the model's tokenizer differs from the datastore's; build the datastore with the model's "
                          "tokenizer (the default smollm2-135m datastore tokenizer matches the default model)")


def evaluate_interpolation(idx, texts: Sequence[str], cfg: InterpolationConfig | None = None, *,
                           progress: bool = True) -> InterpolationResult:
    """Perplexity of ``cfg.model`` alone and mixed with the ∞-gram LM of ``idx`` on ``texts``."""
    from tqdm.auto import tqdm

    from retromem.models import load_causal_lm

    cfg = cfg or InterpolationConfig()
    texts = drop_documents_in_datastore(idx.datastore, texts)
    model, tok = load_causal_lm(cfg.model)
    _check_same_tokenizer(idx, tok)
    p_lm, p_inf, suf = [], [], []
    docs = 0
    for text in tqdm(list(texts)[: cfg.max_docs], desc="held-out documents", disable=not progress):
        ids = idx.encode(text)[: cfg.max_tokens]
        if len(ids) < 2:
            continue
        docs += 1
        p_lm.append(lm_token_probs(model, ids))
        pi, sl = infgram_token_probs(idx, ids)
        p_inf.append(pi)
        suf.append(sl)
    if not docs:
        raise ConfigError("no held-out document has 2 tokens or more")
    lm, inf, sl = np.concatenate(p_lm), np.concatenate(p_inf), np.concatenate(suf)
    lm = np.maximum(lm, 1e-30)  # float32 softmax can underflow to 0 on a very unlikely token

    def ppl(lam: float) -> float:
        return float(math.exp(-np.mean(np.log(lam * inf + (1 - lam) * lm))))

    lams = tuple(float(x) for x in cfg.lambdas)
    return InterpolationResult(
        documents=docs, tokens=int(len(lm)), lm_perplexity=ppl(0.0), lambdas=lams,
        perplexities=tuple(ppl(x) for x in lams), nonzero_fraction=float((inf > 0).mean()),
        mean_suffix_len=float(sl.mean()),
    )


def plot_interpolation(res: InterpolationResult, path: str | Path) -> Path:
    """PNG of held-out perplexity against the ∞-gram weight λ, with the LM alone as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(res.lambdas, res.perplexities, marker="o", label="LM + ∞-gram")
    ax.axhline(res.lm_perplexity, color="grey", linestyle="--", label=f"LM alone ({res.lm_perplexity:.2f})")
    ax.set_xlabel("λ (weight of the ∞-gram LM)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"held-out perplexity, {res.documents} documents, {res.tokens:,} tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
