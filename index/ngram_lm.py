"""The ∞-gram language model interpolated with a neural causal LM, as the infini-gram paper does it.

For each held-out token, the ∞-gram LM gives P(token | longest suffix of its prefix that occurs in
the datastore) from the suffix-array index, and a Hugging Face causal LM gives its own probability.
The paper mixes them with two weights, one for *sparse* ∞-gram estimates (the longest suffix is
followed by only one distinct token in the datastore) and one for the rest::

    p = λ_sparse · p_∞ + (1 − λ_sparse) · p_LM    where the ∞-gram estimate is sparse
    p = λ_dense  · p_∞ + (1 − λ_dense)  · p_LM    elsewhere

Both weights are tuned on a validation split of held-out documents (each minimises the validation
perplexity of its own tokens, so the two searches are independent) and then applied to test
documents disjoint from it. Documents are scored whole (capped at ``max_tokens``); the figure over
each document's first ``prefix_tokens`` tokens, where text is most boilerplate, is reported beside
it with the same weights. The perplexity difference against the LM alone comes with a paired
bootstrap interval over documents. Both models must share the datastore's tokenizer (the offline
default SmolLM2-135M with the default datastore tokenizer), so that they score the same tokens.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from retromem.config import fail, integer, is_int, is_number, number, positive_int
from retromem.errors import ConfigError
from retromem.stats import BootstrapResult, paired_bootstrap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterpolationConfig:
    model: str = "smollm2-135m"
    max_docs: int = 24  # documents per split (validation, test)
    max_tokens: int = 2048  # whole documents, each capped at this many tokens (the LM sees the document so far)
    prefix_tokens: int = 384  # the first-N-token figure reported beside the whole-document one
    lambdas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # grid for each weight
    validation_fraction: float = 0.5  # share of the held-out documents tuned on, when no validation file is given
    bootstrap: int = 1000  # resamples of documents for the interval
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lambdas", tuple(self.lambdas))
        positive_int(self.max_docs, "max_docs", flag="--max-docs")
        if not is_int(self.max_tokens) or self.max_tokens < 2:
            fail("max_tokens", "be an integer >= 2 (the first token has no context)", self.max_tokens, flag="--max-tokens")
        integer(self.prefix_tokens, "prefix_tokens", ge=2, flag="--prefix-tokens")
        if not self.lambdas or not all(is_number(x) and 0.0 <= x < 1.0 for x in self.lambdas):
            fail("lambdas", "be weights in [0, 1) (λ = 1 gives the ∞-gram LM alone, whose zero probabilities "
                 "make perplexity infinite)", self.lambdas, flag="--lambdas")
        number(self.validation_fraction, "validation_fraction", gt=0, lt=1, flag="--validation-fraction")
        positive_int(self.bootstrap, "bootstrap", flag="--bootstrap")
        integer(self.seed, "seed", flag="--seed")


@dataclass(frozen=True)
class ScoredTokens:
    """Every scored token of a set of documents (the first token of each has no context and is not
    scored); all arrays have shape (T,)."""

    p_lm: np.ndarray  # P_LM(token | document so far)
    p_inf: np.ndarray  # ∞-gram P(token | longest suffix found)
    sparse: np.ndarray  # bool: that suffix is followed by one distinct token only
    suffix_len: np.ndarray
    doc: np.ndarray  # index of the document
    position: np.ndarray  # index of the token in its document (>= 1)

    def where(self, mask: np.ndarray) -> "ScoredTokens":
        return ScoredTokens(**{k: v[mask] for k, v in self.__dict__.items()})

    def mixture(self, lam_sparse: float, lam_dense: float) -> np.ndarray:
        lam = np.where(self.sparse, lam_sparse, lam_dense)
        return lam * self.p_inf + (1 - lam) * self.p_lm


def _ppl(p: np.ndarray) -> float:
    return float(math.exp(-np.mean(np.log(p))))


@dataclass(frozen=True)
class SplitFigures:
    """Perplexities on one set of tokens, and the paired difference interpolated − LM alone in mean
    per-token NLL (nats), bootstrapped over documents; exp of it is the perplexity ratio."""

    documents: int
    tokens: int
    lm_perplexity: float
    interpolated_perplexity: float  # the two weights
    single_lambda_perplexity: float  # one weight (tuned on validation too), for comparison
    nll_difference: BootstrapResult
    sparse_fraction: float  # share of tokens whose ∞-gram estimate is sparse
    sparse_correct: float  # of those, the share where the one continuation is the actual token
    nonzero_fraction: float  # share of tokens with a nonzero ∞-gram probability
    mean_suffix_len: float

    @property
    def ratio(self) -> tuple[float, float, float]:
        """Perplexity ratio interpolated / LM alone and its interval."""
        d = self.nll_difference
        return math.exp(d.mean), math.exp(d.low), math.exp(d.high)


def _figures(t: ScoredTokens, lam_sparse: float, lam_dense: float, lam_single: float,
             cfg: "InterpolationConfig") -> SplitFigures:
    mix = t.mixture(lam_sparse, lam_dense)
    diff = paired_bootstrap(-np.log(mix), -np.log(t.p_lm), groups=t.doc, n=cfg.bootstrap, seed=cfg.seed)
    n_sparse = int(t.sparse.sum())
    return SplitFigures(
        documents=len(np.unique(t.doc)), tokens=len(t.p_lm), lm_perplexity=_ppl(t.p_lm),
        interpolated_perplexity=_ppl(mix), single_lambda_perplexity=_ppl(t.mixture(lam_single, lam_single)),
        nll_difference=diff, sparse_fraction=n_sparse / len(t.p_lm),
        sparse_correct=float((t.p_inf[t.sparse] == 1.0).mean()) if n_sparse else float("nan"),
        nonzero_fraction=float((t.p_inf > 0).mean()), mean_suffix_len=float(t.suffix_len.mean()),
    )


@dataclass(frozen=True)
class InterpolationResult:
    """Weights tuned on validation documents, figures on test documents disjoint from them."""

    lambda_sparse: float
    lambda_dense: float
    lambda_single: float
    validation: SplitFigures
    test: SplitFigures  # whole documents (capped at max_tokens)
    test_prefix: SplitFigures  # each test document's first prefix_tokens tokens, same weights
    prefix_tokens: int
    lambdas: tuple[float, ...]
    validation_perplexities: tuple[float, ...]  # one weight for every token, over the grid
    test_perplexities: tuple[float, ...]

    # the test split's headline figures
    documents = property(lambda self: self.test.documents)
    tokens = property(lambda self: self.test.tokens)
    lm_perplexity = property(lambda self: self.test.lm_perplexity)
    perplexities = property(lambda self: self.test_perplexities)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("validation", "test", "test_prefix"):
            d[name]["perplexity_ratio"] = getattr(self, name).ratio
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


def _token_after(ds, doc_id: int, offset: int) -> int | None:
    """The datastore's token at ``offset`` in document ``doc_id``, or None past its end."""
    first, last = int(ds.doc_first_chunk_array[doc_id]), int(ds.doc_first_chunk_array[doc_id + 1])
    c, k = first + offset // ds.chunk_length, offset % ds.chunk_length
    if c >= last or k >= int(ds.chunk_ntokens_array[c]):
        return None
    return int(ds.token_array[c, k])


def sparse_estimates(idx, ids: Sequence[int], scores) -> np.ndarray:
    """For each TokenScore of ``ids[1:]``: is the ∞-gram estimate sparse, i.e. is the longest suffix
    followed by one distinct token only, in all its occurrences? Exact, from counts: when the actual
    token follows every occurrence, yes; when it follows some, no; when it follows none, take the
    token after one occurrence and check that it follows all of them (two binary searches, where a
    next-token distribution would read up to ``max_support`` occurrences)."""
    out = np.zeros(len(scores), dtype=bool)
    for j, s in enumerate(scores):
        i = j + 1  # s scores ids[i] given ids[:i]
        if s.suffix_len == 0 or s.prompt_count == 0:
            continue  # unigram estimate: never one token only
        if s.cont_count == s.prompt_count:
            out[j] = True
        elif s.cont_count == 0:  # a sparse estimate that is wrong, or several other continuations
            suffix = list(ids[i - s.suffix_len : i])
            occ = idx.find(suffix, limit=1).occurrences
            nxt = _token_after(idx.datastore, occ[0].doc_id, occ[0].offset + len(suffix)) if occ else None
            out[j] = nxt is not None and idx.count(suffix + [nxt]).count == s.prompt_count
    return out


def score_documents(idx, model, texts: Sequence[str], max_tokens: int, *, progress: bool = True,
                    desc: str = "documents") -> ScoredTokens:
    """Both models' probabilities of every token after the first of each text (capped at ``max_tokens``)."""
    from tqdm.auto import tqdm

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ScoredTokens.__dataclass_fields__}
    d = 0
    for text in tqdm(list(texts), desc=desc, disable=not progress):
        ids = idx.encode(text)[:max_tokens]
        if len(ids) < 2:
            continue
        scores = idx.score(ids)[1:]
        cols["p_lm"].append(lm_token_probs(model, ids))
        cols["p_inf"].append(np.array([s.prob for s in scores], dtype=np.float64))
        cols["sparse"].append(sparse_estimates(idx, ids, scores))
        cols["suffix_len"].append(np.array([s.suffix_len for s in scores], dtype=np.int64))
        cols["doc"].append(np.full(len(scores), d, dtype=np.int64))
        cols["position"].append(np.arange(1, len(ids), dtype=np.int64))
        d += 1
    if not d:
        raise ConfigError(f"no {desc} document has 2 tokens or more")
    out = {k: np.concatenate(v) for k, v in cols.items()}
    out["p_lm"] = np.maximum(out["p_lm"], 1e-30)  # float32 softmax can underflow to 0 on a very unlikely token
    return ScoredTokens(**out)


def tune_weights(t: ScoredTokens, grid: Sequence[float]) -> tuple[float, float, float]:
    """(λ_sparse, λ_dense, λ_single) minimising the perplexity of ``t``: each of the two on its own
    tokens (the objective splits), and one weight for all tokens, for comparison."""

    def best(mask: np.ndarray) -> float:
        if not mask.any():
            return 0.0
        nll = [-np.log(lam * t.p_inf[mask] + (1 - lam) * t.p_lm[mask]).sum() for lam in grid]
        return float(grid[int(np.argmin(nll))])

    return best(t.sparse), best(~t.sparse), best(np.ones_like(t.sparse))


def split_validation(texts: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(validation, test): the documents shuffled with ``seed`` and cut at ``fraction``."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, min(len(texts) - 1, round(fraction * len(texts))))
    return [texts[i] for i in order[:cut]], [texts[i] for i in order[cut:]]


def evaluate_interpolation(idx, texts: Sequence[str], cfg: InterpolationConfig | None = None, *,
                           validation: Sequence[str] | None = None, progress: bool = True) -> InterpolationResult:
    """Tune the two weights on ``validation`` documents, apply them to the test documents ``texts``.

    Without ``validation``, ``texts`` is split by document (``cfg.validation_fraction``, ``cfg.seed``).
    Each split keeps at most ``cfg.max_docs`` documents; documents the datastore holds verbatim are
    left out of both, and a document in both splits is refused.
    """
    from retromem.models import load_causal_lm

    cfg = cfg or InterpolationConfig()
    texts = list(texts)
    if validation is None:
        if len(texts) < 2:
            raise ConfigError("need at least 2 held-out documents to split into validation and test (or give --validation)")
        validation, texts = split_validation(texts, cfg.validation_fraction, cfg.seed)
    validation = list(validation)
    if set(validation) & set(texts):
        raise ConfigError(f"{len(set(validation) & set(texts))} document(s) are in both the validation and the test "
                          "split: the weights must be tuned on documents disjoint from those they are tested on")
    validation = drop_documents_in_datastore(idx.datastore, validation)[: cfg.max_docs]
    texts = drop_documents_in_datastore(idx.datastore, texts)[: cfg.max_docs]
    model, tok = load_causal_lm(cfg.model)
    _check_same_tokenizer(idx, tok)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_tokens > context:
        fail("max_tokens", f"be at most the model's context of {context} tokens", cfg.max_tokens, flag="--max-tokens")
    val = score_documents(idx, model, validation, cfg.max_tokens, progress=progress, desc="validation")
    test = score_documents(idx, model, texts, cfg.max_tokens, progress=progress, desc="test")
    lams = tuple(float(x) for x in cfg.lambdas)
    ls, ld, l1 = tune_weights(val, lams)
    logger.info("weights tuned on %d validation tokens: λ_sparse %.2f, λ_dense %.2f (one weight: %.2f)",
                len(val.p_lm), ls, ld, l1)
    return InterpolationResult(
        lambda_sparse=ls, lambda_dense=ld, lambda_single=l1,
        validation=_figures(val, ls, ld, l1, cfg), test=_figures(test, ls, ld, l1, cfg),
        test_prefix=_figures(test.where(test.position < cfg.prefix_tokens), ls, ld, l1, cfg),
        prefix_tokens=cfg.prefix_tokens, lambdas=lams,
        validation_perplexities=tuple(_ppl(val.mixture(x, x)) for x in lams),
        test_perplexities=tuple(_ppl(test.mixture(x, x)) for x in lams),
    )


def plot_interpolation(res: InterpolationResult, path: str | Path) -> Path:
    """PNG of perplexity against one ∞-gram weight λ on validation and test, with the LM alone and
    the two-weight mixture tuned on validation as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, curve, color in (("validation", res.validation_perplexities, "tab:orange"),
                               ("test", res.test_perplexities, "tab:blue")):
        ax.plot(res.lambdas, curve, marker="o", color=color, label=f"{name}: LM + ∞-gram, one λ")
    ax.axhline(res.test.lm_perplexity, color="grey", linestyle="--", label=f"test: LM alone ({res.test.lm_perplexity:.2f})")
    ax.axhline(res.test.interpolated_perplexity, color="tab:green", linestyle=":",
               label=f"test: λ_sparse {res.lambda_sparse}, λ_dense {res.lambda_dense} ({res.test.interpolated_perplexity:.2f})")
    ax.set_xlabel("λ (weight of the ∞-gram LM)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"whole documents: test {res.test.documents} docs, {res.test.tokens:,} tokens", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
