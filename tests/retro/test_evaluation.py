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


def test_three_settings_on_the_same_held_out_sequences(retro_ds, retro_neighbours, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    model = retrofit(copy.deepcopy(base), retro_config_for(base.config, chunk_length=CHUNK, neighbour_length=2 * CHUNK,
                                                            retro_layers=[2], encoder_num_layers=1))
    with torch.no_grad():  # move the gated blocks off zero, as training would
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    table = NeighbourTable(retro_neighbours, retro_ds)
    cfg = RetroEvalConfig(out=str(tmp_path / "eval"), seq_chunks=3, max_sequences=6, batch_size=2, overlap_ngram=4)
    s = evaluate(model, retro_ds, table, cfg, base=base, progress=False)
    st = s["settings"]
    assert set(st) == {"base", "retro", "retro_off"} and s["sequences"] == 6
    assert s["max_abs_token_nll_difference_base_vs_retro_off"] < 1e-4  # RETROfit without neighbours is the base
    assert st["retro"]["perplexity"] != pytest.approx(st["base"]["perplexity"], rel=1e-4)
    for v in st.values():  # one count of tokens and bytes, two units
        assert v["tokens"] == st["base"]["tokens"] and v["bytes"] == st["base"]["bytes"]
        assert v["bits_per_byte"] * v["bytes"] * math.log(2) == pytest.approx(math.log(v["perplexity"]) * v["tokens"])
    # held-out text only: every evaluated chunk is from a held-out document
    chunks = [json.loads(line) for line in (tmp_path / "eval" / "chunks.jsonl").read_text().splitlines()]
    assert table.split_spec.is_eval([c["doc_id"] for c in chunks]).all()
    assert sum(b["chunks"] for b in s["leakage_buckets"]) == len(chunks) == 6 * 2
    assert s["leakage_cumulative"][-1]["chunks"] == len(chunks)
    assert (tmp_path / "eval" / "leakage.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="seq_chunks"):
        RetroEvalConfig(out="x", seq_chunks=1)
