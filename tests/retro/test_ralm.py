"""In-context retrieval augmentation: the no-retrieval scores are the model's own loss, retrieval never
reads an evaluated document, the random control has the retrieved chunks' lengths, subsampling and
decontamination filter what they should, and the gRPC service gives the in-process results."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from retromem.errors import ConfigError
from retromem.retro.ralm import (RalmConfig, evaluate_ralm, in_subsample, random_tokens, shares_ngram, ngram_set,
                                 top_k_kept)

from tests.retro.conftest import tiny_llama_dir

# small: ~4 held-out documents of the 8, 96 tokens each, 3 blocks of 16 tokens per document
CFG = dict(stride=16, query_tokens=16, context_tokens=256, k=2, deep_k=24, max_docs=4, max_doc_tokens=64,
           eval_fraction=0.5, split_seed=1, decontam_ngram=8, bootstrap=200)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(tiny_llama_dir(tmp_path_factory.mktemp("ralm-llama")))


@pytest.fixture(scope="module")
def lm(llama_dir):
    from retromem.models import load_causal_lm

    return load_causal_lm(llama_dir)


@pytest.fixture(scope="module")
def result(lm, retro_ds, retro_index):
    model, tok = lm
    return evaluate_ralm(model, tok, retro_index, retro_ds, RalmConfig(**CFG, fractions=(0.5, 1.0), seeds=(0, 1)))


@torch.no_grad()
def test_no_retrieval_scores_are_the_models_own_loss(lm, retro_ds, result):
    model, tok = lm
    assert len(result.doc_ids) >= 2
    for i, d in enumerate(result.doc_ids):
        ids = tok(retro_ds.document_text(d), add_special_tokens=False)["input_ids"][:CFG["max_doc_tokens"]]
        logits = model(torch.tensor([ids])).logits[0]
        own = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        torch.testing.assert_close(torch.from_numpy(result.nll["none"][i]).float(), own[CFG["query_tokens"] - 1:],
                                   atol=1e-4, rtol=1e-4)
    assert result.settings["none"]["tokens"] == sum(len(v) for v in result.nll["none"]) == result.tokens_scored


def test_retrieved_chunks_never_come_from_an_evaluated_document(retro_ds, result):
    for setting in ("retrieved", "other_query"):
        ids = [c for doc in result.retrievals[setting] for block in doc for c in block]
        assert ids, setting
        assert not set(retro_ds.doc_ids(ids).tolist()) & set(result.doc_ids)
    assert all(len(block) == CFG["k"] for doc in result.retrievals["retrieved"] for block in doc)
    # every setting scores the same tokens; retrieval changes the scores
    for s in ("retrieved", "random", "other_query"):
        assert [len(v) for v in result.nll[s]] == [len(v) for v in result.nll["none"]]
    assert not np.allclose(np.concatenate(result.nll["retrieved"]), np.concatenate(result.nll["none"]))
    assert {(d["a"], d["b"]) for d in result.differences} >= {("retrieved", "none"), ("retrieved", "random"),
                                                              ("retrieved", "other_query")}
    for d in result.differences:
        assert d["low"] <= d["delta_nll"] <= d["high"]


def test_random_chunks_have_the_requested_length(lm, retro_ds, result):
    _, tok = lm
    assert result.prefix_tokens["random"] == result.prefix_tokens["retrieved"] > 0
    eligible = np.arange(10, 30)
    cache: dict[int, list[int]] = {}
    for n in (1, 7, 100, 333):
        assert len(random_tokens(retro_ds, tok, eligible, n, np.random.default_rng(n), cache)) == n
    assert set(cache) <= set(eligible.tolist())


def test_subsample_keeps_only_sampled_documents_and_fraction_one_is_the_full_retrieval(result):
    docs = np.arange(1000)
    half = in_subsample(docs, 0.3, seed=5)
    assert 200 < half.sum() < 400
    assert not (in_subsample(docs, 0.1, seed=5) & ~half).any()  # nested across fractions, same seed
    assert (in_subsample(docs, 0.3, seed=6) != half).any()
    assert in_subsample(docs, 1.0, seed=5).all()
    hits = np.array([7, 3, 9, 1, -1])
    keep = np.array([False, True, True, True, True])
    assert top_k_kept(hits, keep, 2).tolist() == [3, 9]
    assert top_k_kept(hits, np.ones(5, bool), 4).tolist() == [7, 3, 9, 1]
    rows = {(r["fraction"], r["seed"]): r for r in result.scaling}
    assert set(rows) == {(0.5, 0), (0.5, 1), (1.0, 0)}
    assert rows[1.0, 0]["ppl"] == result.settings["retrieved"]["ppl"]
    assert rows[1.0, 0]["datastore_tokens"] == result.datastore_tokens
    assert all(rows[0.5, s]["datastore_tokens"] < result.datastore_tokens for s in (0, 1))
    assert all(rows[0.5, s]["mean_chunks"] <= CFG["k"] for s in (0, 1))


class _Planting:
    """A retriever that rewrites the best hit of every query into the first query's text, a passage
    of the first evaluated document: contaminated datastore chunks."""

    def __init__(self, index):
        self.index = index
        self.text: str | None = None
        self.planted: set[int] = set()

    def search(self, queries, k, **kw):
        res = self.index.search(queries, k, **kw)
        self.text = self.text or queries[0]
        self.planted |= {pays[0].chunk_id for pays in res.payloads}
        for pays in res.payloads:  # a chunk's text wherever it appears
            pays[:] = [dataclasses.replace(p, text=self.text, continuation_text=None) if p.chunk_id in self.planted
                       else p for p in pays]
        return res


def test_decontamination_drops_a_planted_overlapping_chunk(lm, retro_ds, retro_index):
    model, tok = lm
    cfg = RalmConfig(**{**CFG, "max_docs": 1})
    planting = _Planting(retro_index)
    res = evaluate_ralm(model, tok, planting, retro_ds, cfg)
    first_doc = {c for block in res.retrievals["retrieved"][0] for c in block}
    assert planting.planted and not planting.planted & first_doc
    assert res.decontamination["dropped_from_top_k"] >= len(res.retrievals["retrieved"][0])
    off = evaluate_ralm(model, tok, _Planting(retro_index), retro_ds, dataclasses.replace(cfg, decontam_ngram=0))
    assert all(block[0] in planting.planted for block in off.retrievals["retrieved"][0])
    assert off.decontamination["dropped_candidates"] == 0
    grams = ngram_set([1, 2, 3, 4, 5], 3)
    assert shares_ngram([9, 3, 4, 5], grams, 3) and not shares_ngram([9, 3, 4, 6], grams, 3)


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match=r"`deep_k` \(--deep-k\)"):
        RalmConfig(k=8, deep_k=4)
    with pytest.raises(ConfigError, match=r"`fractions` \(--fractions\)"):
        RalmConfig(fractions=(0.0,))
    with pytest.raises(ConfigError, match=r"`stride` \(--stride\)"):
        RalmConfig(stride=0)
    with pytest.raises(ConfigError, match=r"--eval-fraction"):
        RalmConfig(eval_fraction=0)


def test_through_the_service_equals_in_process(lm, retro_ds, retro_index, result):
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server
    from retromem.service.servicer import Backend

    model, tok = lm
    running = start_server(ServerConfig(datastore=str(retro_ds.path), dense=str(retro_index.path), port=0, workers=2),
                           Backend(retro_ds, retro_index, None))
    try:
        with RetrievalClient(running.target, timeout=60) as client:
            remote = evaluate_ralm(model, tok, client, retro_ds, RalmConfig(**CFG, fractions=(0.5, 1.0), seeds=(0, 1)))
    finally:
        running.stop(0)
    assert remote.retrievals == result.retrievals
    assert remote.decontamination == result.decontamination
    for s in result.nll:
        for a, b in zip(remote.nll[s], result.nll[s]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert [r["ppl"] for r in remote.scaling] == pytest.approx([r["ppl"] for r in result.scaling], abs=1e-4)


def test_cli_writes_results_and_plot(llama_dir, retro_ds, retro_index, tmp_path):
    import json

    from click.testing import CliRunner

    from retromem.cli import main

    args = ["ralm", "eval", "--model", llama_dir, "--datastore", str(retro_ds.path), "--out", str(tmp_path / "r"),
            "--stride", "16", "--query-tokens", "16", "-k", "2", "--deep-k", "16", "--max-docs", "2",
            "--max-doc-tokens", "48", "--eval-fraction", "0.5", "--split-seed", "1", "--fractions", "0.5,1",
            "--bootstrap", "50", "--threads", "1"]
    res = CliRunner().invoke(main, args + ["--index", str(retro_index.path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "results.json").read_text())
    assert set(report["settings"]) == {"none", "retrieved", "random", "other_query"}
    assert [r["fraction"] for r in report["scaling"]] == [0.5, 1.0]
    assert (tmp_path / "r" / "scaling.png").stat().st_size > 1000
    assert "retrieved - none" in res.output
    bad = CliRunner().invoke(main, args + ["--index", str(retro_index.path), "--deep-k", "1"])
    assert bad.exit_code == 2 and "`deep_k` (--deep-k) must be at least k (2)" in bad.output
    assert CliRunner().invoke(main, args).exit_code == 2  # neither --index nor --server


@pytest.fixture(scope="module")
def retro_bm25(retro_ds, tmp_path_factory):
    from retromem.index.lexical import LexicalIndex, build_lexical_index

    out = tmp_path_factory.mktemp("ralm-bm25") / "bm25"
    build_lexical_index(retro_ds.path, out, progress=False)
    return LexicalIndex.open(out, datastore=retro_ds)


def test_lexical_retriever_gives_bm25_hits_with_the_same_controls(lm, retro_ds, retro_bm25, result):
    model, tok = lm
    lex = evaluate_ralm(model, tok, retro_bm25, retro_ds, RalmConfig(**CFG))
    assert lex.doc_ids == result.doc_ids and lex.tokens_scored == result.tokens_scored
    np.testing.assert_allclose(np.concatenate(lex.nll["none"]), np.concatenate(result.nll["none"]))
    ids = [c for doc in lex.retrievals["retrieved"] for block in doc for c in block]
    assert ids and not set(retro_ds.doc_ids(ids).tolist()) & set(lex.doc_ids)
    assert lex.retrievals["retrieved"] != result.retrievals["retrieved"]  # BM25's hits, not the dense ones
    # the first block's chunks are BM25's own top hits for that query (decontaminated ones left out)
    first = lex.retrievals["retrieved"][0][0]
    q = tok.decode(tok(retro_ds.document_text(lex.doc_ids[0]), add_special_tokens=False)["input_ids"][:CFG["query_tokens"]])
    top = retro_bm25.search([q], CFG["deep_k"], exclude_doc_ids=[lex.doc_ids]).chunk_ids[0].tolist()
    assert first == [c for c in top if c in first][:len(first)] and set(first) <= set(top)
    assert lex.prefix_tokens["random"] == lex.prefix_tokens["retrieved"] > 0


def test_cli_lexical_retriever_and_config_file(llama_dir, retro_ds, retro_index, retro_bm25, tmp_path):
    import json

    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.cli.ralm import DEFAULTS

    assert {k: getattr(RalmConfig(), k) for k in DEFAULTS} == DEFAULTS  # the help shows the real defaults
    cfg = tmp_path / "ralm.yaml"
    cfg.write_text("stride: 16\nquery_tokens: 16\nk: 2\ndeep_k: 16\nmax_docs: 2\nmax_doc_tokens: 48\n"
                   "eval_fraction: 0.5\nsplit_seed: 1\nfractions: [1.0]\nbootstrap: 50\n")
    base = ["ralm", "eval", "--model", llama_dir, "--datastore", str(retro_ds.path), "--config", str(cfg),
            "--threads", "1"]
    res = CliRunner().invoke(main, base + ["--retriever", "lexical", "--lexical-index", str(retro_bm25.path),
                                           "--out", str(tmp_path / "r"), "-k", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "results.json").read_text())
    assert report["retriever"] == "lexical" and report["retriever_source"].startswith("bm25 ")
    assert report["config"]["stride"] == 16 and report["config"]["k"] == 1  # from the file; the flag wins
    blocks = [block for doc in report["retrievals"]["retrieved"] for block in doc]
    assert all(len(b) <= 1 for b in blocks) and any(len(b) == 1 for b in blocks)  # decontamination may drop one
    (tmp_path / "bad.yaml").write_text("stride: 16\nstrides: 8\n")
    bad = CliRunner().invoke(main, ["ralm", "eval", "--model", llama_dir, "--datastore", str(retro_ds.path),
                                    "--config", str(tmp_path / "bad.yaml"), "--index", str(retro_index.path),
                                    "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "unknown keys ['strides']" in bad.output
    bad = CliRunner().invoke(main, base + ["--retriever", "lexical", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--lexical-index" in bad.output
    bad = CliRunner().invoke(main, base + ["--lexical-index", str(retro_bm25.path), "--index", str(retro_index.path),
                                           "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--retriever lexical" in bad.output


@pytest.mark.slow  # two spawned worker processes, each loading the model
def test_cli_with_two_workers_writes_the_in_process_figures(llama_dir, retro_ds, retro_index, tmp_path):
    """`ralm eval --workers 2`: the scoring as tasks of two local worker processes (the model loaded
    from its path in each), cut into as many tasks as the executor runs at once; the same figures."""
    import json

    from click.testing import CliRunner

    from retromem.cli import main

    args = ["ralm", "eval", "--model", llama_dir, "--datastore", str(retro_ds.path), "--index", str(retro_index.path),
            "--stride", "16", "--query-tokens", "16", "-k", "2", "--deep-k", "16", "--max-docs", "2",
            "--max-doc-tokens", "48", "--eval-fraction", "0.5", "--split-seed", "1", "--fractions", "0.5,1",
            "--bootstrap", "50", "--threads", "1"]
    figures = []
    for out, extra in (("one", []), ("two", ["--workers", "2"])):
        res = CliRunner().invoke(main, args + ["--out", str(tmp_path / out)] + extra)
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / out / "results.json").read_text())
        figures.append({key: report[key] for key in ("settings", "differences", "scaling", "tokens_scored")})
    assert figures[0]["settings"] and figures[1] == figures[0]
    bad = CliRunner().invoke(main, args + ["--out", str(tmp_path / "bad"), "--workers", "-1"])
    assert bad.exit_code == 2 and "`workers` (--workers) must be an integer >= 0, got -1" in bad.output
