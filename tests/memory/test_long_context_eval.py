"""The long-context evaluation of the bounded memories: budgets, the multi-turn dialogue, every task
and method end to end on a tiny decoder, and the `retromem memory long-eval` command."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from retromem.errors import ConfigError
from retromem.memory.long_context_eval import METHODS, LongEvalConfig, build_memory, evaluate, make_dialogue, markdown_table

from .conftest import tiny_decoder


@pytest.fixture(scope="module")
def gpt2_tok():
    from retromem.datastore.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")


def test_every_bounded_method_keeps_to_the_budget():
    model = tiny_decoder("llama")
    for method in METHODS[1:]:
        mem = build_memory(method, model, 1024)
        assert 900 <= mem.budget_tokens <= 1024 + 63, method  # InfLLM may hold one partial block more
    assert build_memory("full", model, 1024).budget_tokens == -1
    with pytest.raises(ConfigError, match=r"`methods` \(--methods\)"):
        LongEvalConfig(out="x", methods=("full", "h2o"))
    with pytest.raises(ConfigError, match=r"`fractions` \(--fractions\)"):
        LongEvalConfig(out="x", fractions=(0.0,))


def test_dialogue_states_every_fact_and_asks_each_once(gpt2_tok):
    filler = gpt2_tok("The module returns a value of the function. " * 400)["input_ids"]
    body, questions = make_dialogue(gpt2_tok, 900, 4, filler, random.Random(0))
    text = gpt2_tok.decode(body)
    assert len(body) + sum(len(q[0]) for q in questions) == 900 and len(questions) == 4
    for ids, a, b in questions:
        q = gpt2_tok.decode(ids)
        name = q.split("What is ")[1].split("'s")[0]
        key = gpt2_tok.decode(ids[a:b]).strip()
        assert f"{name}'s locker number is {key}." in text and key.isdigit()


@pytest.mark.slow
def test_evaluate_runs_every_task_and_method_and_the_command(tmp_path, gpt2_tok):
    from retromem.cli import main

    model = tiny_decoder("llama", vocab=50304)
    cfg = LongEvalConfig(out=str(tmp_path / "ev"), budget=64, segment=64, lengths=(256,), ppl_lengths=(256,),
                         ppl_score=32, recall_length=384, recall_facts=2, qa_length=256, qa_questions=2,
                         fractions=(1.0, 0.5))
    summary = evaluate(model, gpt2_tok, cfg, title="tiny")
    rows = [json.loads(x) for x in (tmp_path / "ev" / "rows.jsonl").read_text().splitlines()]
    assert {(r["task"], r["method"]) for r in rows} >= {(t, m) for t in ("passkey", "perplexity", "recall") for m in METHODS}
    assert {r["method"] for r in rows if r["task"] == "qa"} == {"full", "squeezed"}
    bounded = [r for r in rows if r["task"] == "passkey" and r["method"] != "full"]
    full = [r for r in rows if r["task"] == "passkey" and r["method"] == "full"][0]
    assert all(r["attention_mib"] < full["attention_mib"] for r in bounded)
    ppl = {(r["method"], r["length"]): r["perplexity"] for r in rows if r["task"] == "perplexity"}
    assert ppl[("full", 256)] == pytest.approx(ppl[("lm_infinite", 256)], rel=0.5) and all(v > 1 for v in ppl.values())
    assert "| passkey | InfLLM | 256 |" in markdown_table(summary)
    assert (tmp_path / "ev" / "accuracy_vs_length.png").stat().st_size > 1000
    # the command, on the same tiny model saved as a directory
    model.save_pretrained(tmp_path / "m")
    gpt2_tok.save_pretrained(tmp_path / "m")
    res = CliRunner().invoke(main, ["memory", "long-eval", "--model", str(tmp_path / "m"), "--tasks", "passkey",
                                   "--methods", "full,infllm", "--lengths", "256", "--budget", "64", "--segment", "64",
                                   "--threads", "1", "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "| passkey | InfLLM | 256 | 1 |" in res.output
    bad = CliRunner().invoke(main, ["memory", "long-eval", "--methods", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--methods" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_shared_prefix_gives_the_logits_of_separate_runs(method):
    from retromem.memory.kv_budget import enable
    from retromem.memory.long_context_eval import run_pieces, run_shared_prefix

    model = enable(tiny_decoder("llama"))
    g = torch.Generator().manual_seed(3)
    hay = torch.randint(3, 128, (1, 200), generator=g)
    question = torch.randint(3, 128, (1, 6), generator=g)
    examples = []
    # needles in the first segment, twice in one segment, and one needle place at two lengths
    for needle, length in ((20, 200), (40, 200), (130, 200), (135, 200), (40, 100)):
        needle_ids = torch.full((1, 4), needle % 100 + 3)
        ids = torch.cat([hay[:, :needle], needle_ids, hay[:, needle:length - 10], question], 1)
        examples.append((ids, length - 6))
    ends = [ids.shape[1] - 3 for ids, _ in examples]  # greedy decoding after all but 3 question tokens
    got = {i: (logits, st) for i, logits, st in run_shared_prefix(model, lambda: build_memory(method, model, 64),
                                                                   examples, segment=32, greedy=(ends, 3))}
    assert sorted(got) == [0, 1, 2, 3, 4]
    for i, (ids, cut) in enumerate(examples):
        ref, _ = run_pieces(model, build_memory(method, model, 64), [ids[:, :cut], ids[:, cut:]], 32, {1})
        assert torch.equal(got[i][0], ref[1])
        assert got[i][1]["tokens"] + got[i][1]["shared_tokens"] == ids.shape[1]
        if method == "full":  # greedy decoding through the memory is plain greedy generate
            plain = model.generate(ids[:, :ends[i]], max_new_tokens=3, do_sample=False, min_new_tokens=3)
            assert got[i][1]["generated"] == plain[0, ends[i]:].tolist()
    assert [got[i][1]["shared_tokens"] for i in range(5)] == [0, 64, 128, 128, 64]


def test_infllm_lookups_on_one_prefill_equal_their_own_runs():
    """The InfLLM lookups share one prefill per example tree (only the last partial segment, the
    question and the greedy answer run per lookup): each gives the logits and greedy tokens of a
    fresh run with its own lookup, and the lookups do differ."""
    from retromem.memory.infllm import InfLLM, InfLLMConfig
    from retromem.memory.kv_budget import enable
    from retromem.memory.long_context_eval import INFLLM_LOOKUPS, _greedy, run_pieces, run_shared_prefix

    model = enable(tiny_decoder("llama"))
    base = InfLLMConfig(n_init=4, n_local=32, block_size=8, n_repr=2, topk=3, chunk=32, cache_blocks=6, keys_upto=8)
    segment = 32
    assert not InfLLM(model, base).short_lookup(segment)  # full segments take the paper's lookup whatever the variant
    g = torch.Generator().manual_seed(5)
    hay = torch.randint(3, 128, (1, 300), generator=g)
    question = torch.randint(3, 128, (1, 6), generator=g)
    examples = []
    for needle, length in ((30, 300), (150, 300), (155, 300), (150, 230)):  # cuts leave 4 or 6 tokens after a boundary
        ids = torch.cat([hay[:, :needle], torch.full((1, 4), needle % 100 + 3), hay[:, needle:length - 10], question], 1)
        examples.append((ids, ids.shape[1] - 6))
    ends = [ids.shape[1] - 3 for ids, _ in examples]
    names = list(INFLLM_LOOKUPS)
    variants = [lambda mem, m=m: mem.relookup(**INFLLM_LOOKUPS[m]) for m in names]
    got = {}
    for i, logits, st in run_shared_prefix(model, lambda: InfLLM(model, base), examples, segment,
                                           greedy=(ends, 3), variants=variants):
        got[i, st["variant"]] = (logits, st)
    assert len(got) == len(examples) * len(names)
    for i, (ids, cut) in enumerate(examples):
        for v, m in enumerate(names):
            cfg = replace(base, **INFLLM_LOOKUPS[m])
            ref, _ = run_pieces(model, InfLLM(model, cfg), [ids[:, :cut], ids[:, cut:]], segment, {1})
            torch.testing.assert_close(got[i, v][0], ref[1], atol=1e-5, rtol=1e-5)
            fresh = InfLLM(model, cfg)
            run_pieces(model, fresh, [ids[:, :cut]], segment, set())
            assert got[i, v][1]["generated"] == _greedy(model, fresh, ids[:, cut:ends[i]], 3)
    differ = [not torch.equal(got[i, 0][0], got[i, v][0]) for i in range(len(examples)) for v in (1, 2)]
    assert any(differ)


def test_paired_passkey_matches_examples_across_runs_and_counts_the_discordant_ones():
    from retromem.memory.long_context_eval import paired_passkey, paired_table

    rows = []
    # two runs (seeds) with the same sample numbers: only (run, sample, length, depth) tells examples apart
    for run in (0, 1):
        for depth, a, b in ((0.1, True, False), (0.5, True, True), (0.9, False, False)):
            for method, right in (("infllm_keys", a), ("infllm", b)):
                rows.append({"task": "passkey", "method": method, "length": 8192, "depth": depth, "sample": 0,
                             "run": run, "greedy": right})
    rows.append({"task": "passkey", "method": "infllm_keys", "length": 32768, "depth": 0.5, "sample": 0, "greedy": True})
    pairs = {(p["other"], p["length"]): p for p in paired_passkey(rows, "infllm_keys")}
    p = pairs["infllm", 8192]
    assert (p["n"], p["method_right"], p["other_right"], p["method_only"], p["other_only"]) == (6, 4, 2, 2, 0)
    assert p["mcnemar_p"] == 0.5 and abs(p["diff"] - 1 / 3) < 1e-9 and p["low"] <= p["diff"] <= p["high"]
    assert pairs["infllm", "all"]["n"] == 6  # the 32K row has no partner
    assert "| 8192 | 6 | 4 / 2 |" in paired_table(list(pairs.values()))
    with pytest.raises(ConfigError, match="paired"):
        paired_passkey(rows, "sirllm")
    # rows that record their seed and key: one seed's methods in two files (runs) pair up; the same
    # (seed, sample, length, depth) with another key (another depth set drew it) does not
    rows = [{"task": "passkey", "method": "infllm_keys", "length": 4096, "depth": 0.5, "sample": 0, "seed": 3,
             "key": "12345", "run": 0, "greedy": True},
            {"task": "passkey", "method": "infllm", "length": 4096, "depth": 0.5, "sample": 0, "seed": 3,
             "key": "12345", "run": 1, "greedy": False},
            {"task": "passkey", "method": "infllm", "length": 4096, "depth": 0.5, "sample": 0, "seed": 3,
             "key": "67890", "run": 2, "greedy": True}]
    p = {(p["other"], p["length"]): p for p in paired_passkey(rows, "infllm_keys")}["infllm", 4096]
    assert (p["n"], p["method_only"], p["other_only"]) == (1, 1, 0)


def test_passkey_task_labels_each_grouped_infllm_lookup_with_its_own_rows(gpt2_tok):
    """passkey_task runs the InfLLM lookups requested together on one prefill per example tree and
    labels each variant's rows with its method: every row equals the one the method gives run on
    its own (scores, greedy text, needle, key). (On this tiny random decoder the three lookups give
    equal scores, so this checks the grouping and that each method gets all of its rows; a swap of
    two lookups' labels would need a model whose answer depends on what was looked up.)"""
    from retromem.memory.long_context_eval import INFLLM_LOOKUPS, infllm_config, passkey_task, summarize

    model = tiny_decoder("llama", vocab=50304)
    names = list(INFLLM_LOOKUPS)
    cfg = LongEvalConfig(out="unused", methods=tuple(names), tasks=("passkey",), budget=256, segment=128,
                         lengths=(512, 640), depths=(0.2, 0.7))
    assert not any(infllm_config(m, cfg.budget).short_lookup(cfg.segment) for m in names)  # so they are grouped
    grouped: list[dict] = []
    passkey_task(model, gpt2_tok, cfg, grouped.append)
    alone: list[dict] = []
    for m in names:
        passkey_task(model, gpt2_tok, replace(cfg, methods=(m,)), alone.append)
    fields = ("correct", "strict", "key_logprob", "greedy", "generated", "needle_at", "key")

    def by_example(rows):
        return {(r["method"], r["length"], r["depth"], r["sample"]): tuple(r[f] for f in fields) for r in rows}

    got, want = by_example(grouped), by_example(alone)
    assert len(got) == len(grouped) == len(names) * 4
    assert got == want
    # the summary carries the graded score beside the three right-or-wrong ones
    table = summarize(grouped)["table"]
    for row in table:
        rs = [r for r in grouped if (r["method"], r["length"]) == (row["method"], row["length"])]
        assert row["key_logprob"] == pytest.approx(sum(r["key_logprob"] for r in rs) / len(rs)) and row["key_logprob"] < 0
