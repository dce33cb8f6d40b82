"""Memory evaluation on tiny real Llamas: the knock-out is an honest ablation (the memory read is
zeroed and nothing else changes), the "memory of another document" control, the Wilson intervals,
and an end-to-end run that names every mode in results.json."""

from __future__ import annotations

import gzip
import json
import math
import random
import zlib

import pytest
import torch

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
from retromem.memory.evaluation import (MODE_LABELS, MemoryEvalConfig, evaluate, logits_for, modes_for, passkey_eval,
                                        sign_test, summarize, wilson)
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM

from .conftest import tiny_llama

SEG = 16


def infini() -> InfiniAttentionLM:
    m = InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=SEG))
    torch.manual_seed(1)
    with torch.no_grad():  # a different gate per head, as after training
        for a in m.attention_layers():
            a.memory_gate.copy_(torch.randn(a.memory_gate.shape) * 1.5)
    return m.eval()


def autocompressor() -> AutoCompressorLM:
    cfg = AutoCompressorConfig(summary_length=4, segment_min=SEG, segment_max=SEG, randomize_segments=False)
    return AutoCompressorLM(tiny_llama(), cfg).eval()


@pytest.mark.parametrize("make", [infini, autocompressor], ids=["infini", "autocompressor"])
def test_knockout_and_other_document_controls(make):
    """Memory on vs knocked out vs memory of another document, through ``logits_for``:
    - scored positions in the first segment (nothing compressed yet): all three are bitwise equal
      (the knock-out zeroes a read that is exactly zero there and runs the same operations);
    - in a later segment the memory changes the logits; another document's memory gives other logits;
      a "another document" that is this one gives exactly the memory-on logits."""
    m = make()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (1, 3 * SEG), generator=g)
    other = torch.randint(3, 128, (1, 3 * SEG), generator=g)
    first = {mode: logits_for(m, ids[:, :SEG], mode, 0, other=other) for mode in ("memory", "knocked_out", "other_doc")}
    assert torch.equal(first["memory"], first["knocked_out"])
    assert torch.equal(first["memory"], first["other_doc"])
    start = 2 * SEG + 3  # in the third segment: two segments in memory
    on = logits_for(m, ids, "memory", start)
    off = logits_for(m, ids, "knocked_out", start)
    wrong = logits_for(m, ids, "other_doc", start, other=other)
    same = logits_for(m, ids, "other_doc", start, other=ids)
    assert on.shape == off.shape == wrong.shape == (1, 3 * SEG - start, 128)
    assert (on - off).abs().max() > 1e-3
    assert (on - wrong).abs().max() > 1e-3 and (wrong - off).abs().max() > 1e-3
    assert torch.equal(on, same)
    with pytest.raises(ValueError, match="other"):
        logits_for(m, ids, "other_doc", start)


def test_infini_knockout_keeps_the_gate_and_plain_local_does_not():
    m = infini()
    ids = torch.randint(3, 128, (1, SEG))
    on = logits_for(m, ids, "memory", 0)
    plain = logits_for(m, ids, "local_ungated", 0)
    full = logits_for(m, ids, "full", 0)
    # plain local attention over one segment is the base model (full attention), and differs from
    # the gated model even with an empty memory: the confound of the old "knocked out"
    assert torch.equal(plain, full)
    assert (plain - on).abs().max() > 1e-3
    assert m.gate_mode == "learned"  # modes are restored
    assert modes_for(m) == ("memory", "knocked_out", "other_doc", "local_ungated", "full")
    assert "local_ungated" not in modes_for(autocompressor())
    with pytest.raises(ValueError, match="Infini"):
        logits_for(autocompressor(), ids, "local_ungated", 0)
    with pytest.raises(ValueError, match="mode"):
        logits_for(m, ids, "local", 0)


def test_wilson_interval():
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    lo, hi = wilson(10, 20)
    assert (lo, hi) == (pytest.approx(0.2993, abs=1e-4), pytest.approx(0.7007, abs=1e-4))
    lo, hi = wilson(20, 20)
    assert hi == 1.0 and lo == pytest.approx(0.8389, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


class WordTokenizer:
    """Whitespace-separated words to ids 3..127 (the tiny Llama's vocabulary), EOS = 2: short inputs."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + zlib.crc32(w.encode()) % 125 for w in text.split()]}


def corpus(tmp_path) -> str:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "module", "function", "returns", "value", "the", "of"]
    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for _ in range(4):
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(800))}) + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("make", [infini, autocompressor], ids=["infini", "autocompressor"])
def test_evaluate_names_every_mode_and_reports_intervals(tmp_path, make):
    m = make()
    cfg = MemoryEvalConfig(out=str(tmp_path / "ev"), lengths=(96,), depths=(0.0,), samples=2, ppl_length=64,
                           ppl_docs=2, corpus=corpus(tmp_path))
    summary = evaluate(m, WordTokenizer(), cfg, progress=False)
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    modes = modes_for(m)
    assert {r["mode"] for r in res["passkey"]} == set(modes)
    assert set(res["summary"]["perplexity"]) == set(modes)
    assert res["summary"]["modes"] == {k: MODE_LABELS[k] for k in modes}
    for mode in modes:
        counts = summary["passkey_counts_by_length"][mode][96]
        assert counts["n"] == 2 and 0.0 <= counts["wilson95"][0] <= counts["correct"] / 2 <= counts["wilson95"][1] <= 1.0
    other = [r for r in res["passkey"] if r["mode"] == "other_doc"]
    assert all(r["other_key"] != r["key"] and isinstance(r["answered_other_key"], bool) for r in other)
    # the scored examples do not depend on the control: the same keys as a run without it
    plain = MemoryEvalConfig(out=str(tmp_path / "ev2"), lengths=(96,), depths=(0.0,), samples=2, ppl_docs=0,
                             corpus=cfg.corpus)
    keys = [r["key"] for r in passkey_eval(m, WordTokenizer(), plain, modes=("memory",), progress=False)]
    assert keys == [r["key"] for r in res["passkey"] if r["mode"] == "memory"]
    assert (tmp_path / "ev" / "passkey.png").stat().st_size > 1000 and (tmp_path / "ev" / "perplexity.png").is_file()


def test_sign_test_is_the_exact_binomial():
    assert sign_test(0, 0) == 1.0 and sign_test(4, 4) == 1.0
    assert sign_test(13, 0) == pytest.approx(2 / 2 ** 13)
    assert sign_test(4, 0) == pytest.approx(0.125)
    assert sign_test(48, 1) == pytest.approx(2 * 50 / 2 ** 49)
    assert sign_test(3, 7) == sign_test(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 2 ** 10)


def test_autocompressor_other_input_control_matches_length_and_depth(tmp_path):
    """The "summaries of another input" control reads an input of the same length with its needle
    at the same depth (so through as many compressions) and another key; the summary pairs every
    setting with memory on over the same examples."""
    m = autocompressor()
    cfg = MemoryEvalConfig(out=str(tmp_path / "ev"), lengths=(64, 96), depths=(0.0, 0.5, 1.0), samples=2, ppl_docs=0,
                           corpus=corpus(tmp_path))
    rows = passkey_eval(m, WordTokenizer(), cfg, modes=("memory", "knocked_out", "other_doc"), progress=False)
    other = [r for r in rows if r["mode"] == "other_doc"]
    assert len(other) == 2 * 3 * 2
    assert all(r["other_key"] != r["key"] and r["other_compressions"] == r["compressions"] for r in other)
    assert {r["compressions"] for r in other} != {0}  # the needle does go through compressions here
    summary = summarize(rows, [])
    for control in ("knocked_out", "other_doc"):
        p = summary["passkey_paired"][control]
        assert p["n"] == 12 and p["memory_only"] + p[f"{control}_only"] + p["both"] + p["neither"] == 12
        on = {(r["length"], r["depth"], r["sample"]): r["correct"] for r in rows if r["mode"] == "memory"}
        ctl = {(r["length"], r["depth"], r["sample"]): r["correct"] for r in rows if r["mode"] == control}
        assert p["memory_only"] == sum(on[k] and not ctl[k] for k in on)
        assert p["sign_test_p"] == sign_test(p["memory_only"], p[f"{control}_only"])
    assert set(summary["passkey_paired"]) == {"knocked_out", "other_doc"}


def test_perplexity_is_paired_by_document():
    rows = []
    for doc, (on, off) in enumerate([(2.0, 2.5), (3.0, 3.1), (1.0, 0.9), (2.2, 2.4)]):
        rows += [{"doc": doc, "mode": "memory", "tokens": 10, "nll": 10 * on},
                 {"doc": doc, "mode": "knocked_out", "tokens": 10, "nll": 10 * off}]
    s = summarize([], rows)
    assert s["perplexity_paired"]["knocked_out"] == {"docs": 4, "memory_lower": 3, "memory_higher": 1,
                                                     "sign_test_p": pytest.approx(0.625)}
    assert s["perplexity_by_doc"]["memory"][0] == pytest.approx(math.exp(2.0))
    assert s["perplexity"]["knocked_out"] == pytest.approx(math.exp((2.5 + 3.1 + 0.9 + 2.4) / 4))
