"""∞-gram + SmolLM2-135M interpolation on a tiny real datastore (default tokenizer), CPU only."""

from __future__ import annotations

import math

import pytest

from tests.conftest import demo_records, write_jsonl

pytestmark = pytest.mark.slow  # loads SmolLM2-135M


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
    return NgramIndex(d / "ng"), held


def test_lm_alone_matches_the_models_own_loss_and_mixtures_are_scored(smol_index, tmp_path):
    import torch

    from retromem.index.ngram_lm import InterpolationConfig, evaluate_interpolation, plot_interpolation
    from retromem.models import load_causal_lm

    idx, held = smol_index
    cfg = InterpolationConfig(max_docs=2, max_tokens=48, lambdas=(0.0, 0.1, 0.3))
    res = evaluate_interpolation(idx, held, cfg, progress=False)
    assert res.documents == 2 and res.tokens == 2 * 47
    # reference: the model's own cross-entropy loss on the same tokens
    model, _ = load_causal_lm("smollm2-135m")
    nll = []
    for text in held:
        ids = torch.tensor([idx.encode(text)[:48]])
        with torch.inference_mode():
            nll.append(model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1))
    assert res.lm_perplexity == pytest.approx(math.exp(sum(nll) / res.tokens), rel=1e-3)
    assert res.perplexities[0] == pytest.approx(res.lm_perplexity)
    assert 0 < res.nonzero_fraction < 1 and res.mean_suffix_len > 0
    assert all(math.isfinite(p) for p in res.perplexities)
    png = plot_interpolation(res, tmp_path / "p.png")
    assert png.stat().st_size > 1000


def test_tokenizer_mismatch_is_refused(built, tmp_path):
    from retromem.index.ngram import NgramIndex
    from retromem.index.ngram_build import NgramBuildConfig, build_ngram_index
    from retromem.index.ngram_lm import InterpolationConfig, evaluate_interpolation
    from retromem.errors import ConfigError

    build_ngram_index(built[1].out, tmp_path / "ng", NgramBuildConfig(cpus=1), progress=False)  # a gpt2 datastore
    with pytest.raises(ConfigError, match="tokenizer differs"):
        evaluate_interpolation(NgramIndex(tmp_path / "ng"), ["some text"], InterpolationConfig(max_docs=1), progress=False)
    with pytest.raises(ConfigError, match="lambdas"):
        InterpolationConfig(lambdas=(0.5, 1.0))


def test_held_out_documents_in_the_datastore_are_left_out(smol_index):
    from retromem.index.ngram_lm import drop_documents_in_datastore

    idx, held = smol_index
    inside = idx.datastore.document_text(0)
    assert drop_documents_in_datastore(idx.datastore, [inside] + held) == held
