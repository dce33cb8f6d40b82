"""Retrieved-context compression (TCRA-LLM): every compressor keeps within ceil(ratio * n) tokens and
keeps what it should (the sentence like the query, the most surprising words, in their order), the
summary compressor generates within its budget, and the in-context retrieval paths (gcide-qa answering,
RALM scoring, their command lines) read compressed retrieved text with fewer prompt tokens."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from retromem.errors import ConfigError
from retromem.retro.compress import (CompressConfig, ExtractiveCompressor, SimilarityCompressor, SummaryCompressor,
                                     SurprisalCompressor, TruncateCompressor, make_compressor, sentences)
from tests.retro.test_qa import ITEMS, bm25, dict_ds, lm  # noqa: F401  (module fixtures)
from tests.retro.test_ralm import CFG

PASSAGE = ("Kettle \\Ket\"tle\\, n. A metallic vessel for boiling water, usually with a spout and a lid. "
           "It was sold in the market of the town on Tuesdays. -- A kettle drum is a drum of brass. "
           "The weather that year was cold and wet.")
QUERY = "A metallic vessel for boiling water, usually with a spout and a lid."


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0


def test_sentences_keep_abbreviations_together():
    assert sentences("Stake (v. t.) To fasten. To mark; as, to stake out -- with out.") == \
        ["Stake (v. t.) To fasten.", "To mark;", "as, to stake out", "with out."]


@pytest.fixture(scope="module")
def embedder():
    from retromem.index.embed import Embedder

    return Embedder(device="cpu").model


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8, 1.0])
def test_every_compressor_keeps_within_the_budget(lm, embedder, ratio):
    model, tok = lm
    n = n_tokens(tok, PASSAGE)
    comps = [ExtractiveCompressor(tok, ratio), SimilarityCompressor(tok, ratio, embedder),
             SurprisalCompressor(tok, ratio, model), SummaryCompressor(tok, ratio, model), TruncateCompressor(tok, ratio)]
    for c in comps:
        (out,) = c.compress(QUERY, [PASSAGE])
        assert 0 < n_tokens(tok, out) <= math.ceil(ratio * n), (c.method, out)
        if ratio == 1.0 and c.method != "summary":
            assert out == " ".join(PASSAGE.split())
    assert n_tokens(tok, SimilarityCompressor(tok, 0.2, embedder).compress(QUERY, [""])[0]) == 0


def test_similarity_keeps_the_sentence_like_the_query(lm, embedder):
    _, tok = lm
    (out,) = SimilarityCompressor(tok, 0.45, embedder).compress(QUERY, [PASSAGE])
    assert "metallic vessel for boiling water" in out and "weather" not in out


def test_surprisal_drops_the_least_surprising_words_in_order(lm):
    model, tok = lm
    c = SurprisalCompressor(tok, 0.5, model)
    words, s = c.word_surprisal(QUERY, PASSAGE)
    (out,) = c.compress(QUERY, [PASSAGE])
    kept = out.split()
    assert kept and len(kept) < len(words)
    it = iter(w.strip() for w in words)
    assert all(any(k == w for w in it) for k in kept)  # a subsequence: original order
    dropped = [sc for w, sc in zip(words, s) if w.strip() not in kept]
    assert np.mean([sc for w, sc in zip(words, s) if w.strip() in kept]) > np.mean(dropped)


def test_config_and_factory(lm):
    _, tok = lm
    with pytest.raises(ConfigError, match="--compress-ratio"):
        CompressConfig("similarity", 0.0)
    with pytest.raises(ConfigError, match="--compress"):
        CompressConfig("zip", 0.5)
    assert make_compressor(CompressConfig("none"), tok) is None
    (head,) = make_compressor(CompressConfig("truncate", 0.25), tok).compress(QUERY, [PASSAGE])
    assert " ".join(PASSAGE.split()).startswith(head) and n_tokens(tok, head) == math.ceil(0.25 * n_tokens(tok, PASSAGE))
    assert make_compressor(CompressConfig("extractive", 0.3), tok).describe() == {"method": "extractive", "ratio": 0.3}


def test_qa_with_compressed_entries_reads_fewer_prompt_tokens(lm, dict_ds, bm25, tmp_path):  # noqa: F811
    from retromem.retro.qa import QaConfig, evaluate_qa

    model, tok = lm
    cfg = QaConfig(k=2, search_k=10, max_new_tokens=2, bootstrap=50, entry_chars=120)
    plain = evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg)
    comp = evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg, compressor=ExtractiveCompressor(tok, 0.4),
                       cache_dir=tmp_path / "gen")
    assert comp["prompt_tokens"]["bm25"] < plain["prompt_tokens"]["bm25"]
    for s in ("closed_book", "oracle", "random"):  # the controls are not compressed
        assert comp["prompt_tokens"][s] == plain["prompt_tokens"][s]
        assert comp["generated"][s] == plain["generated"][s]
    again = evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg, compressor=ExtractiveCompressor(tok, 0.4),
                        cache_dir=tmp_path / "gen")
    assert again["prompt_tokens"] == comp["prompt_tokens"] and again["generated"] == comp["generated"]
    with pytest.raises(ConfigError, match="other settings"):  # another compressor: other generations
        evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg, compressor=ExtractiveCompressor(tok, 0.6),
                    cache_dir=tmp_path / "gen")


@pytest.mark.slow
def test_ralm_retrieved_prefix_is_compressed(lm, retro_ds, retro_index):  # noqa: F811
    from retromem.retro.ralm import RalmConfig, evaluate_ralm

    model, tok = lm
    cfg = RalmConfig(**{**CFG, "max_docs": 2}, fractions=(1.0,), seeds=(0,))
    plain = evaluate_ralm(model, tok, retro_index, retro_ds, cfg)
    comp = evaluate_ralm(model, tok, retro_index, retro_ds, cfg, compressor=ExtractiveCompressor(tok, 0.3))
    assert 0 < comp.prefix_tokens["retrieved"] < 0.5 * plain.prefix_tokens["retrieved"]
    assert comp.prefix_tokens["random"] == plain.prefix_tokens["random"]
    assert comp.retrievals == plain.retrievals
    np.testing.assert_allclose(np.concatenate(comp.nll["none"]), np.concatenate(plain.nll["none"]))


def test_cli_qa_compress_flags(lm, dict_ds, bm25, tmp_path):  # noqa: F811
    from click.testing import CliRunner

    from retromem.cli import main
    from tests.conftest import write_jsonl
    from tests.retro.conftest import tiny_llama_dir

    model_dir = str(tiny_llama_dir(tmp_path / "llama"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": q.query, "answer_id": q.answer_id, "answer": q.answer}
                                              for q in ITEMS])
    args = ["ralm", "qa", "--model", model_dir, "--datastore", str(dict_ds.path), "--qa", str(qa),
            "--lexical-index", str(bm25.path), "--out", str(tmp_path / "out"), "-k", "2", "--search-k", "10",
            "--lm-questions", "3", "--max-new-tokens", "2", "--bootstrap", "50", "--threads", "1"]
    r = CliRunner().invoke(main, args + ["--compress", "extractive", "--compress-ratio", "0.3"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rep["prompt_tokens"]["bm25"] < rep["prompt_tokens"]["oracle"] + 60 and "prompt tokens" in r.output
    bad = CliRunner().invoke(main, args + ["--compress", "similarity", "--compress-ratio", "1.5"])
    assert bad.exit_code == 2 and "--compress-ratio" in bad.output
