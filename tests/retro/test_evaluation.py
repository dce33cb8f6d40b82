"""Evaluation on held-out documents: three settings on the same sequences, bits per byte, the leakage
analysis and its plot."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from retromem.retro import retro_config_for, retrofit
from retromem.retro.neighbours import NeighbourTable
from retromem.retro.evaluation import RetroEvalConfig, bucket_of, chunk_overlap, evaluate
from retromem.errors import ConfigError

from tests.retro.conftest import CHUNK


def test_chunk_overlap_counts_tokens_covered_by_shared_ngrams():
    chunk = np.arange(10, 30)
    same = np.stack([np.arange(0, 40), np.arange(100, 140)])
    mask = np.ones_like(same, dtype=bool)
    assert chunk_overlap(chunk, same, mask, 4) == 1.0
    assert chunk_overlap(chunk, same + 1000, mask, 4) == 0.0
    half = np.stack([np.concatenate([np.arange(10, 20), np.full(30, 999)]), np.arange(100, 140)])
    assert chunk_overlap(chunk, half, mask, 4) == 0.5
    masked = mask.copy()
    masked[0, :30] = False  # padding does not count: what is left of row 0 (30..39) misses the chunk
    assert chunk_overlap(chunk, same, masked, 4) == 0.0
    edges = (0.0, 0.25, 0.5, 1.0)
    assert [bucket_of(x, edges) for x in (0.0, 0.1, 0.25, 0.3, 1.0)] == [0, 1, 1, 2, 3]


def test_difference_has_no_interval_over_a_single_group():
    from retromem.retro.evaluation import difference, format_difference

    rng = np.random.default_rng(0)
    nll = {"retro": rng.normal(2, 1, 200), "retro_random": rng.normal(2.5, 1, 200)}
    cfg = RetroEvalConfig(out="x", bootstrap=200)
    one = difference(nll, "retro", "retro_random", np.zeros(200, dtype=np.int64), cfg)
    assert one["groups"] == 1 and one["low"] is None and one["high"] is None and not one["excludes_zero"]
    assert one["mean_nll"] == pytest.approx(float(np.mean(nll["retro"] - nll["retro_random"])))
    assert "no interval" in format_difference(one, "documents")
    many = difference(nll, "retro", "retro_random", np.arange(200) % 10, cfg)
    assert many["groups"] == 10 and many["low"] <= many["mean_nll"] <= many["high"] and many["excludes_zero"]
    assert format_difference(many).startswith(f"{many['mean_nll']:+.4f} [")
    half = difference(nll, "retro", "retro_random", np.arange(200) % 10, cfg, select=np.arange(200) < 100)
    assert half["tokens"] == 100
    assert difference(nll, "retro", "retro_random", np.arange(200), cfg, select=np.zeros(200, bool)) is None


def tiny_retrofit(seed: int = 1, move: float = 0.3):
    """A tiny Llama base and its RETROfit with the gated blocks moved off zero (as training would)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    model = retrofit(copy.deepcopy(base), retro_config_for(base.config, chunk_length=CHUNK, neighbour_length=2 * CHUNK,
                                                            retro_layers=[2], encoder_num_layers=1))
    if move:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * move)
    return base, model


def test_four_settings_on_the_same_held_out_sequences(retro_ds, retro_neighbours, tmp_path):
    base, model = tiny_retrofit()
    control = tiny_retrofit(seed=2)[1]  # stands for the run trained with random neighbours
    table = NeighbourTable(retro_neighbours, retro_ds)
    cfg = RetroEvalConfig(out=str(tmp_path / "eval"), seq_chunks=3, max_sequences=6, batch_size=2, overlap_ngram=4,
                          groups="sequence", bootstrap=300)
    s = evaluate(model, retro_ds, table, cfg, base=base, progress=False, control=control)
    st = s["settings"]
    assert set(st) == {"base", "retro", "retro_random", "retro_off", "control"} and s["sequences"] == 6
    assert s["max_abs_token_nll_difference_base_vs_retro_off"] < 1e-4  # RETROfit without neighbours is the base
    assert st["retro"]["perplexity"] != pytest.approx(st["base"]["perplexity"], rel=1e-4)
    # the model reads its neighbours, so other neighbours give other figures
    assert st["retro"]["perplexity"] != pytest.approx(st["retro_random"]["perplexity"], rel=1e-4)
    for v in st.values():  # one count of tokens and bytes, two units
        assert v["tokens"] == st["base"]["tokens"] and v["bytes"] == st["base"]["bytes"]
        assert v["bits_per_byte"] * v["bytes"] * math.log(2) == pytest.approx(math.log(v["perplexity"]) * v["tokens"])
    d = s["differences"]
    assert set(d) == {"retro - retro_random", "retro - retro_off", "retro_random - retro_off", "retro_off - base",
                      "retro - control", "control - base"}
    assert st["control"]["perplexity"] != pytest.approx(st["retro"]["perplexity"], rel=1e-4)
    for name, v in d.items():
        a, b = name.split(" - ")
        assert v["low"] <= v["mean_nll"] <= v["high"]
        # the mean difference is the difference of the two settings' mean NLL (log perplexities)
        assert v["mean_nll"] == pytest.approx(math.log(st[a]["perplexity"]) - math.log(st[b]["perplexity"]), abs=1e-9)
        assert v["tokens"] == st["base"]["tokens"] and v["groups"] == 6 and v["resamples"] == 300
    assert d["retro_off - base"]["high"] - d["retro_off - base"]["low"] < 1e-4  # identical models: no spread
    assert d["retro - retro_off"]["high"] - d["retro - retro_off"]["low"] > 1e-4
    # held-out text only: every evaluated chunk is from a held-out document
    chunks = [json.loads(line) for line in (tmp_path / "eval" / "chunks.jsonl").read_text().splitlines()]
    assert table.split_spec.is_eval([c["doc_id"] for c in chunks]).all()
    # the random neighbours were lent by training chunks of other documents
    assert s["random_neighbours"]["donor_split"] == "train"
    donors = np.array([c["random_donor"] for c in chunks])
    donor_docs = np.asarray(retro_ds.chunk_doc_array)[donors]
    assert not table.split_spec.is_eval(donor_docs).any()
    assert (donor_docs != np.array([c["doc_id"] for c in chunks])).all()
    assert sum(b["chunks"] for b in s["leakage_buckets"]) == len(chunks) == 6 * 2
    assert sum(b["retro - retro_random"]["tokens"] for b in s["leakage_buckets"] if b["chunks"]) == \
        sum(c["tokens"] for c in chunks)
    assert s["leakage_cumulative"][-1]["chunks"] == len(chunks)
    assert (tmp_path / "eval" / "leakage.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="seq_chunks"):
        RetroEvalConfig(out="x", seq_chunks=1)
    with pytest.raises(ConfigError, match=r"`groups` \(--groups\) must be one of"):
        RetroEvalConfig(out="x", groups="token")
    with pytest.raises(ConfigError, match="--bootstrap"):
        RetroEvalConfig(out="x", bootstrap=0)


def test_random_neighbours_are_other_documents_retrieved_sets(retro_ds, retro_neighbours):
    from retromem.retro.data import RandomNeighbourTable

    table = NeighbourTable(retro_neighbours, retro_ds)
    doc_of = np.asarray(retro_ds.chunk_doc_array)
    chunks = table.split_spec.chunk_ids(retro_ds, "eval")
    rnd = RandomNeighbourTable(table, retro_ds, chunks, seed=0)
    rows, donors = rnd.lookup(chunks), rnd.donor_of(chunks)
    assert rows.shape == (len(chunks), table.k) and rnd.k == table.k
    # a donor's row is its own retrieved neighbours, unchanged
    np.testing.assert_array_equal(rows, table.lookup(donors))
    assert rnd.donor_split == "train" and not table.split_spec.is_eval(doc_of[donors]).any()
    assert (doc_of[donors] != doc_of[chunks]).all()
    assert (doc_of[rows] != doc_of[chunks][:, None]).all()  # nothing of the evaluated document leaks in
    retrieved = table.lookup(chunks)
    assert (rows != retrieved).any(axis=1).mean() > 0.9
    again = RandomNeighbourTable(table, retro_ds, chunks, seed=0)
    np.testing.assert_array_equal(again.donors, rnd.donors)
    assert not np.array_equal(RandomNeighbourTable(table, retro_ds, chunks, seed=1).donors, rnd.donors)
    # with only held-out neighbours, other held-out documents lend theirs
    eval_only = NeighbourTable(retro_neighbours[1], retro_ds)
    rnd = RandomNeighbourTable(eval_only, retro_ds, chunks, seed=0)
    assert rnd.donor_split == "all"
    rows, donors = rnd.lookup(chunks), rnd.donor_of(chunks)
    assert (doc_of[donors] != doc_of[chunks]).all() and (doc_of[rows] != doc_of[chunks][:, None]).all()
    with pytest.raises(ConfigError, match="outside the chunks"):
        rnd.lookup(table.split_spec.chunk_ids(retro_ds, "train")[:1])


def test_a_model_blind_to_neighbour_content_shows_no_retrieval_gain(retro_ds, retro_neighbours, tmp_path):
    # the encoder's input projection at zero: CCA still adds something (from the chunk's own states),
    # but nothing of what the neighbours say; retrieved and random neighbours must then tie
    base, model = tiny_retrofit()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("retro_encoder.in_proj.weight"):
                p.zero_()
    table = NeighbourTable(retro_neighbours, retro_ds)
    cfg = RetroEvalConfig(out=str(tmp_path / "blind"), seq_chunks=3, max_sequences=6, overlap_ngram=4,
                          groups="sequence", bootstrap=300)
    d = evaluate(model, retro_ds, table, cfg, base=base, progress=False)["differences"]
    assert d["retro - retro_random"]["low"] <= 0.0 <= d["retro - retro_random"]["high"]
    assert abs(d["retro - retro_random"]["mean_nll"]) < 1e-5
    # it does read the neighbour slots (the outputs move), just not their content
    assert d["retro - retro_off"]["high"] - d["retro - retro_off"]["low"] > 1e-3

    # zero-gated (untrained) blocks: every setting is the base model
    base, fresh = tiny_retrofit(move=0.0)
    d = evaluate(fresh, retro_ds, table, cfg, base=base, progress=False)["differences"]
    for v in d.values():
        assert abs(v["low"]) < 1e-6 and abs(v["high"]) < 1e-6
