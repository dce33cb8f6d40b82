"""Trained memories (Infini-attention, AutoCompressor) in the one long-context evaluation: the
passkey tree advances their states over shared prefixes and gives the logits of the memory
evaluation's own path (:func:`retromem.memory.evaluation.logits_for`), greedy decoding through the
state writes what ``generate()`` writes, and ``evaluate`` runs a saved checkpoint beside the
training-free methods on the same examples."""

from __future__ import annotations

import json

import pytest
import torch

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
from retromem.memory.evaluation import logits_for
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
from retromem.memory.long_context_eval import (LongEvalConfig, TrainedMemory, evaluate, greedy_table, passkey_examples,
                                               summarize, trained_passkey, walk_prefix_tree)

from .conftest import tiny_decoder

SEG = 16


def infini() -> InfiniAttentionLM:
    m = InfiniAttentionLM(tiny_decoder("llama", vocab=50304), InfiniAttentionConfig(segment_length=SEG))
    torch.manual_seed(1)
    with torch.no_grad():  # a different gate per head, as after training: the memory read matters
        for a in m.attention_layers():
            a.memory_gate.copy_(torch.randn(a.memory_gate.shape) * 1.5)
    return m.eval()


def autocompressor() -> AutoCompressorLM:
    cfg = AutoCompressorConfig(summary_length=4, segment_min=SEG, segment_max=SEG, randomize_segments=False)
    return AutoCompressorLM(tiny_decoder("llama", vocab=50304), cfg).eval()


@pytest.fixture(scope="module")
def gpt2_tok():
    from retromem.datastore.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")


CFG = dict(methods=(), tasks=("passkey",), segment=64, lengths=(256, 512), depths=(0.25, 0.5), samples=1)


@pytest.mark.slow
@pytest.mark.parametrize("make", [infini, autocompressor], ids=["infini", "autocompressor"])
def test_tree_of_states_gives_the_memory_evaluations_logits(make, gpt2_tok, tmp_path):
    model = make()
    tm = TrainedMemory(model)
    _, meta, examples = next(passkey_examples(gpt2_tok, LongEvalConfig(out=str(tmp_path), **CFG)))
    assert len(examples) == 4 and examples[0][0].shape[1] == 256

    def leaf(state, pos, i):
        first = (meta[i][1].answer_start - 1) // SEG * SEG
        return first, tm.logits(tm.advance(state, examples[i][0][:, pos:first]) if first > pos else state,
                                examples[i][0][:, first:], "memory")

    got = dict(walk_prefix_tree(examples, 64, None, tm.advance, lambda st: st, leaf))
    assert sorted(got) == [0, 1, 2, 3]
    for i, (ids, _) in enumerate(examples):
        first, logits = got[i]
        with torch.inference_mode():
            ref = logits_for(model, ids, "memory", first)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        # and the memory is read: another state (none) changes the logits
        assert not torch.allclose(logits, tm.logits(None, ids[:, first:], "memory"), atol=1e-3)


@pytest.mark.slow
def test_greedy_through_the_state_is_generate(gpt2_tok, tmp_path):
    model = infini()
    rows: list[dict] = []
    trained_passkey(TrainedMemory(model), gpt2_tok, LongEvalConfig(out=str(tmp_path), **{**CFG, "lengths": (256,)}),
                    rows.append)
    assert {r["method"] for r in rows} == {"infini_attention", "infini_attention_knocked_out"}
    _, meta, _ = next(passkey_examples(gpt2_tok, LongEvalConfig(out=str(tmp_path), **{**CFG, "lengths": (256,)})))
    for r, (n, ex, depth) in zip([r for r in rows if r["method"] == "infini_attention"], meta):
        with torch.inference_mode():
            out = model.generate(torch.tensor([ex.input_ids[:ex.answer_start]]), max_new_tokens=8, do_sample=False,
                                 min_new_tokens=8)
        assert r["generated"] == gpt2_tok.decode(out[0, ex.answer_start:]) and r["depth"] == round(depth, 4)
        assert r["attention_mib"] > 0 and r["tokens"] + r["shared_tokens"] == n


@pytest.mark.slow
def test_evaluate_runs_a_saved_checkpoint_beside_the_methods(gpt2_tok, tmp_path):
    model = infini()
    model.save_pretrained(tmp_path / "ckpt")
    gpt2_tok.save_pretrained(tmp_path / "ckpt")
    from retromem.memory.kv_budget import enable

    base = enable(tiny_decoder("llama", vocab=50304))
    cfg = LongEvalConfig(out=str(tmp_path / "ev"), **{**CFG, "methods": ("full",), "lengths": (256,),
                                                      "tasks": ("passkey", "perplexity"), "ppl_lengths": (256,),
                                                      "ppl_score": 64, "budget": 64},
                         trained=(str(tmp_path / "ckpt"),))
    summary = evaluate(base, gpt2_tok, cfg)
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    pk = {(r["method"], r["depth"]) for r in rows if r["task"] == "passkey"}
    # the same examples for the base model's full attention and both modes of the checkpoint
    assert pk == {(m, d) for m in ("full", "infini_attention", "infini_attention_knocked_out")
                  for d in {r["depth"] for r in rows if r["task"] == "passkey"}}
    ppl = [r for r in rows if r["task"] == "perplexity"]
    assert {r["method"] for r in ppl} == {"full", "infini_attention", "infini_attention_knocked_out"}
    assert all(r["perplexity"] > 1 and r["scored"] == 63 for r in ppl)
    table = greedy_table(summarize(rows))
    assert "| Infini-attention (fine-tuned), memory on | 256 | 2 |" in table
    assert "| Infini-attention, memory read zeroed (same weights) | 256 | 1 |" in table  # perplexity: one stream
    assert summary["config"]["trained"] == (str(tmp_path / "ckpt"),)


@pytest.mark.parametrize("kind", ["infini", "autocompressor"])
def test_a_checkpoint_with_the_tied_matrix_under_the_heads_name_loads(kind, tmp_path):
    """The issue-7 checkpoints (saved before issue 17) keep the tied embedding as ``base.lm_head.weight``."""
    from safetensors.torch import load_file, save_file

    from .test_hf_models import _legacy_directory, make

    m = make(kind)
    _legacy_directory(m, tmp_path / "old")
    weights = load_file(str(tmp_path / "old" / "model.safetensors"))
    weights["base.lm_head.weight"] = weights.pop("base.model.embed_tokens.weight")
    save_file(weights, str(tmp_path / "old" / "model.safetensors"))
    back = type(m).from_pretrained(tmp_path / "old")
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits)
