"""The re-measured SirLLM and Squeezed Attention settings (issue 20): dialogues whose facts all lie
beyond the window, SirLLM with every non-sink slot entropy-selected (the paper's runs), Squeezed
Attention's always-attended sinks and tail, fraction changes without re-clustering, and the QA task
over several contexts with per-question results."""

from __future__ import annotations

import random

import pytest
import torch

from retromem.errors import ConfigError
from retromem.memory.kv_budget import enable, stream
from retromem.memory.long_context_eval import FACT_KINDS, LongEvalConfig, build_dialogue, qa_task
from retromem.memory.sirllm import SirLLM, SirLLMConfig
from retromem.memory.squeezed import SqueezedAttention, SqueezedConfig

from .conftest import tiny_decoder


@pytest.fixture(scope="module")
def gpt2_tok():
    from retromem.datastore.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_dialogue_facts_end_beyond_the_window_and_mix_numbers_and_words(gpt2_tok):
    filler = gpt2_tok("The module returns a value of the function. " * 400)["input_ids"]
    d = build_dialogue(gpt2_tok, 1200, 6, filler, random.Random(0), kinds=("number", "word"), far=300)
    assert len(d.body) + sum(len(q[0]) for q in d.questions) == 1200
    assert sorted(d.kinds) == ["number"] * 3 + ["word"] * 3
    assert all(len(d.body) - e >= 300 for e in d.fact_end)
    for (ids, a, b), kind, end in zip(d.questions, d.kinds, d.fact_end):
        q = gpt2_tok.decode(ids)
        name = q.split("What is ")[1].split("'s")[0]
        value = gpt2_tok.decode(ids[a:b]).strip()
        assert value.isdigit() == (kind == "number")
        # the fact turn ends exactly at fact_end
        assert gpt2_tok.decode(d.body[:end]).endswith(f"{name}'s {FACT_KINDS[kind]} is {value}.\nAssistant: Noted.\n")
    with pytest.raises(ConfigError, match=r"`recall_length` \(--recall-length\) must leave room"):
        build_dialogue(gpt2_tok, 400, 6, filler, random.Random(0), far=300)


def test_sirllm_without_a_window_keeps_sinks_and_the_most_surprising_tokens():
    model = enable(tiny_decoder("llama"))
    ids = _ids(96)
    mem = SirLLM(model, SirLLMConfig(n_sink=2, n_keep=8, n_local=0, decay=1.0))
    logits = stream(model, ids, mem, segment=16, keep_logits="all")
    surprise = -torch.log_softmax(logits[0].float(), -1)[:-1].gather(1, ids[0, 1:, None])[:, 0]  # token t = 1..95
    stream(model, ids[:, :1], mem, segment=1)  # prunes before attending
    kept = mem.pos[0][:-1].tolist()
    candidates = torch.arange(2, 96)
    best = set(candidates[surprise[candidates - 1].topk(8).indices].tolist())
    assert set(kept) == {0, 1} | best and mem.held_tokens(0) == 2 + 8 + 1


def test_squeezed_always_attends_sinks_and_tail_and_changes_fraction_without_reclustering():
    model = tiny_decoder("llama")
    ids = _ids(140)
    with torch.no_grad():
        ref = model(ids).logits[:, 128:]
    enable(model)
    mem = SqueezedAttention.prefill(model, ids[:, :128], SqueezedConfig(fraction=0.05, cluster_size=4, n_sink=4,
                                                                          n_tail=8), segment=64)
    q = torch.randn(1, 4, 3, 16)
    sel = mem.select(0, q)  # (Hkv, T, n)
    assert sel[..., :4].all() and sel[..., -8:].all()
    centroids = [c.clone() for c in mem.centroids]
    stream(model, ids[:, 128:], mem, segment=1)
    assert mem.attended_fraction() == pytest.approx(12 / 128)  # 0.05 of 128 keys: the fixed ones alone
    mem.set_fraction(1.0)
    mem.reset_queries()
    out = stream(model, ids[:, 128:], mem, segment=1, keep_logits="all")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert mem.attended_fraction() == 1.0 and all(torch.equal(a, b) for a, b in zip(centroids, mem.centroids))


@pytest.mark.slow
def test_qa_task_asks_every_context_at_every_fraction(tmp_path, gpt2_tok):
    model = enable(tiny_decoder("llama", vocab=50304))
    cfg = LongEvalConfig(out=str(tmp_path), tasks=("qa",), qa_length=256, qa_questions=2, qa_contexts=2,
                         segment=128, fractions=(1.0, 0.25))
    rows: list[dict] = []
    qa_task(model, gpt2_tok, cfg, rows.append)
    assert [(r["context"], r["fraction"]) for r in rows] == [(0, 1.0), (0, 0.25), (1, 1.0), (1, 0.25)]
    assert all(len(r["right"]) == 2 and r["questions"] == 2 for r in rows)
    assert [r["method"] for r in rows] == ["full", "squeezed"] * 2
    assert rows[0]["attended_fraction"] == 1.0 and rows[1]["attended_fraction"] < 0.5


def test_squeezed_threshold_is_calibrated_per_layer_to_the_fraction():
    model = enable(tiny_decoder("qwen2"))
    ids = _ids(140, seed=3)
    cfg = SqueezedConfig(fraction=0.4, cluster_size=4, n_sink=2, n_tail=4, selection="threshold", n_calib=32)
    mem = SqueezedAttention.prefill(model, ids[:, :128], cfg, segment=64)
    fixed_share = 6 / 128
    for layer in range(mem.num_layers):
        m = mem.calib_mass[layer]  # (Hkv, 32, C)
        taken = ((m >= mem.threshold(layer)) * mem.sizes[layer][:, None, :]).sum() / (m.shape[0] * 32 * 128)
        assert 0.4 - fixed_share <= float(taken) <= 0.4 - fixed_share + 0.1  # one cluster's worth over at most
    seen = []
    for f in (0.2, 0.6):
        mem.set_fraction(f)
        mem.reset_queries()
        stream(model, ids[:, 128:], mem, segment=1)
        seen.append(mem.attended_fraction())
    assert fixed_share < seen[0] < seen[1] < 1


def test_dialogue_turns_cut_the_body_at_turn_ends(gpt2_tok):
    filler = gpt2_tok("The module returns a value of the function. " * 400)["input_ids"]
    d = build_dialogue(gpt2_tok, 1200, 6, filler, random.Random(1), kinds=("number", "word"), far=300)
    turns = d.turns()
    assert sum(turns, []) == d.body and all(turns)
    assert set(d.fact_end) <= set(d.turn_ends)  # every fact is a turn of its own
    text = [gpt2_tok.decode(t) for t in turns]
    assert sum(t.startswith("User: Please remember this:") for t in text) == 6


def test_qa_variants_parse_and_refuse():
    from retromem.memory.long_context_eval import parse_variant

    assert parse_variant("4/fraction/query/2/0.25+0.125") == {
        "cluster_size": 4, "selection": "fraction", "heads": "query", "coarse_keep": 2.0, "only": (0.25, 0.125)}
    assert parse_variant("16/threshold/kv/flat")["coarse_keep"] == 0.0
    with pytest.raises(ConfigError, match="--variants"):
        parse_variant("16/fraction/kv")
    with pytest.raises(ConfigError, match="--variants"):
        parse_variant("16/fraction/heads/flat")


@pytest.mark.slow
def test_qa_task_variants_share_one_prefill_and_record_the_fact_selected(tmp_path, gpt2_tok):
    model = enable(tiny_decoder("llama", vocab=50304))
    cfg = LongEvalConfig(out=str(tmp_path), tasks=("qa",), qa_length=256, qa_questions=2, qa_contexts=1,
                         segment=128, fractions=(1.0, 0.5, 0.25))
    rows: list[dict] = []
    qa_task(model, gpt2_tok, cfg, rows.append, squeezed=SqueezedConfig(n_sink=2, n_tail=4, coarse_size=32),
            decoded=1, variants=("4/fraction/query/flat", "4/threshold/query/flat/0.25", "8/fraction/kv/2/0.25"))
    assert [(r["fraction"], r["variant"]) for r in rows] == [
        (1.0, "all keys"), (0.5, "4/fraction/query/flat"), (0.25, "4/fraction/query/flat"),
        (0.25, "4/threshold/query/flat"), (0.25, "8/fraction/kv/2")]
    assert [r["cluster_size"] for r in rows] == [4, 4, 4, 4, 8]
    for r in rows[1:]:
        assert len(r["fact_selected"]) == 2 and all(len(q) == 2 and all(0 <= x <= 1 for x in q)
                                                    for q in r["fact_selected"])
    assert "fact_selected" not in rows[0] and rows[2]["attended_fraction"] < rows[1]["attended_fraction"]


def test_recall_report_keeps_dialogues_of_other_seeds_apart(tmp_path, capsys):
    # benchmarks/memory_recall_qa.py --report over two seeds' row files: both number their dialogues
    # from 0, and a dialogue is (seed, number), so neither file's rows replace the other's
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_recall_qa.py"
    spec = importlib.util.spec_from_file_location("memory_recall_qa", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = []
    for seed, sir in ((3, [True, False]), (4, [True, True])):
        f = tmp_path / f"rec_s{seed}.jsonl"
        f.write_text("".join(json.dumps({"task": "recall", "method": m, "dialogue": 0, "feed": "turns", "seed": seed,
                                         "right": right, "kinds": ["number", "word"], "tokens_per_s": 1.0,
                                         "attention_mib": 1.0}) + "\n"
                             for m, right in (("streaming_llm", [False, False]), ("sirllm:254:0.9", sir))))
        files.append(str(f))
    bench.report(files)
    out = capsys.readouterr().out
    assert "| sirllm:254:0.9 (per turn) | 4 | 3/4 = 0.750" in out
    assert "over 4 questions (3 right only with sirllm:254:0.9 (per turn), 0 only with StreamingLLM" in out
