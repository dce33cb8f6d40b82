"""∞-gram + SmolLM2-135M interpolation on a tiny real datastore (default tokenizer), CPU only.

The weight tuning, the validation split and the config checks run in the fast loop on small
arrays; tests that build the index or load SmolLM2-135M are marked slow."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from retromem.errors import ConfigError
from retromem.index.ngram_lm import InterpolationConfig, ScoredTokens, split_validation, tune_weights
from tests.conftest import demo_records, write_jsonl


def _tokens(rng: np.random.Generator, n: int = 400) -> ScoredTokens:
    sparse = rng.random(n) < 0.4
    # sparse estimates right 70% of the time (p = 1), the others spread thin
    p_inf = np.where(sparse, (rng.random(n) < 0.7).astype(float), rng.random(n) * 0.3 * (rng.random(n) < 0.5))
    return ScoredTokens(p_lm=rng.uniform(0.01, 0.6, n), p_inf=p_inf, sparse=sparse, suffix_len=rng.integers(0, 9, n),
                        doc=np.repeat(np.arange(4), n // 4), position=np.tile(np.arange(1, n // 4 + 1), 4))


def test_the_two_weights_minimise_perplexity_over_the_whole_grid():
    t = _tokens(np.random.default_rng(0))
    grid = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    ls, ld, l1 = tune_weights(t, grid)

    def nll(a: float, b: float) -> float:
        return float(-np.log(t.mixture(a, b)).sum())

    # reference: brute force over every pair (the objective splits, so tuning each alone must agree)
    assert nll(ls, ld) == pytest.approx(min(nll(a, b) for a, b in itertools.product(grid, grid)))
    assert nll(l1, l1) == pytest.approx(min(nll(a, a) for a in grid))
    assert ls > ld  # sparse estimates, right 70% of the time, earn the larger weight (as in the paper)
    assert nll(ls, ld) <= nll(l1, l1)


def test_validation_split_is_disjoint_and_reproducible():
    docs = [f"document {i}" for i in range(10)]
    val, test = split_validation(docs, 0.5, seed=3)
    assert len(val) == len(test) == 5 and not set(val) & set(test) and sorted(val + test) == sorted(docs)
    assert split_validation(docs, 0.5, seed=3) == (val, test)
    assert split_validation(docs, 0.5, seed=4) != (val, test)


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--prefix-tokens"):
        InterpolationConfig(prefix_tokens=1)
    with pytest.raises(ConfigError, match="--validation-fraction"):
        InterpolationConfig(validation_fraction=1.0)
    with pytest.raises(ConfigError, match="lambdas"):
        InterpolationConfig(lambdas=(0.5, 1.0))


@pytest.fixture(scope="module")
def smol_index(tmp_path_factory):
    from retromem.datastore import BuildConfig, build
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index

    d = tmp_path_factory.mktemp("lm")
    recs = demo_records()
    write_jsonl(d / "train.jsonl", [{"id": r["id"], "text": r["text"]} for r in recs[:4]])
    build(BuildConfig(inputs=(str(d / "train.jsonl"),), out=str(d / "ds"), workers=1))  # smollm2-135m tokenizer
    build_ngram_index(d / "ds", d / "ng", NgramBuildConfig(cpus=1), progress=False)
    held = [r["text"] for r in recs[20:22]]  # documents the datastore never saw
    val = [r["text"] for r in recs[22:24]]
    return NgramIndex(d / "ng"), held, val


@pytest.mark.slow  # loads SmolLM2-135M
def test_lm_alone_matches_the_models_own_loss_and_weights_come_from_validation(smol_index, tmp_path):
    import torch

    from retromem.index.ngram_lm import evaluate_interpolation, plot_interpolation
    from retromem.models import load_causal_lm

    idx, held, val = smol_index
    cfg = InterpolationConfig(max_docs=2, max_tokens=48, prefix_tokens=16, lambdas=(0.0, 0.1, 0.3, 0.6), bootstrap=200)
    res = evaluate_interpolation(idx, held, cfg, validation=val, progress=False)
    assert res.test.documents == 2 and res.test.tokens == 2 * 47
    assert res.validation.documents == 2 and res.test_prefix.tokens == 2 * 15
    # reference: the model's own cross-entropy loss on the same tokens
    model, _ = load_causal_lm("smollm2-135m")
    nll = []
    for text in held:
        ids = torch.tensor([idx.encode(text)[:48]])
        with torch.inference_mode():
            nll.append(model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1))
    assert res.test.lm_perplexity == pytest.approx(math.exp(sum(nll) / res.test.tokens), rel=1e-3)
    assert res.test_perplexities[0] == pytest.approx(res.test.lm_perplexity)
    # the weights are the best pair on validation: at least as good there as any single weight
    assert res.lambda_sparse in cfg.lambdas and res.lambda_dense in cfg.lambdas
    assert res.validation.interpolated_perplexity <= min(res.validation_perplexities) * (1 + 1e-9)
    # the paired difference is the perplexity ratio on the same tokens
    assert res.test.ratio[0] == pytest.approx(res.test.interpolated_perplexity / res.test.lm_perplexity)
    assert res.test.nll_difference.n_groups == 2
    f = res.test
    assert 0 < f.nonzero_fraction < 1 and f.mean_suffix_len > 0 and 0 <= f.sparse_fraction < 1
    assert all(math.isfinite(p) for p in res.test_perplexities)
    png = plot_interpolation(res, tmp_path / "p.png")
    assert png.stat().st_size > 1000


@pytest.mark.slow  # builds a datastore with the SmolLM2 tokenizer
def test_sparse_estimates_match_a_scan_of_the_datastore(smol_index):
    """Sparse (the longest suffix is followed by one distinct token everywhere it occurs), from
    counts and one lookup, against a brute-force scan of every document's tokens."""
    from retromem.index.ngram_lm import sparse_estimates

    idx, held, _ = smol_index
    ds = idx.datastore
    docs = []
    for d in range(ds.num_documents):
        toks, n = ds.tokens(ds.document_chunk_ids(d))
        docs.append(np.concatenate([t[:k] for t, k in zip(toks, n)]).tolist())

    def followers(suffix: list[int]) -> set:
        out = set()
        for doc in docs:
            for p in range(len(doc) - len(suffix) + 1):
                if doc[p : p + len(suffix)] == suffix:
                    out.add(doc[p + len(suffix)] if p + len(suffix) < len(doc) else None)  # None: document end
        return out

    inside = ds.document_text(1)[:1500]  # text the datastore holds: long suffixes, many sparse
    for text in (held[0][:1500], inside):
        ids = idx.encode(text)[:150]
        scores = idx.score(ids)[1:]
        got = sparse_estimates(idx, ids, scores)
        ref = []
        for i, s in zip(range(1, len(ids)), scores):
            f = followers(ids[i - s.suffix_len : i]) if s.suffix_len else {None, -1}
            ref.append(len(f) == 1 and None not in f)
        assert got.tolist() == ref
        assert 0 < got.sum() < len(got)
        # some sparse estimates are wrong (the one continuation is another token): they count as sparse
        if text is held[0][:1500]:
            assert any(g and s.prob == 0 for g, s in zip(got, scores))


@pytest.mark.slow
def test_validation_and_test_must_be_disjoint(smol_index):
    from retromem.index.ngram_lm import evaluate_interpolation

    idx, held, _ = smol_index
    with pytest.raises(ConfigError, match="both the validation and the test"):
        evaluate_interpolation(idx, held, InterpolationConfig(max_docs=2), validation=held[:1], progress=False)


@pytest.mark.slow
def test_tokenizer_mismatch_is_refused(built, tmp_path):
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index
    from retromem.index.ngram_lm import evaluate_interpolation

    build_ngram_index(built[1].out, tmp_path / "ng", NgramBuildConfig(cpus=1), progress=False)  # a gpt2 datastore
    with pytest.raises(ConfigError, match="tokenizer differs"):
        evaluate_interpolation(NgramIndex(tmp_path / "ng"), ["some text"], InterpolationConfig(max_docs=1),
                               validation=["other text"], progress=False)


@pytest.mark.slow
def test_held_out_documents_in_the_datastore_are_left_out(smol_index):
    from retromem.index.ngram_lm import drop_documents_in_datastore

    idx, held, _ = smol_index
    inside = idx.datastore.document_text(0)
    assert drop_documents_in_datastore(idx.datastore, [inside] + held) == held
