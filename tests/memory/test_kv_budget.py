"""The bounded memories' attention core against its written-out reference: the flash-attention
groups merged by log-sum-exp equal one softmax over all groups (probabilities included), full
attention's two-call path equals the plain model, and whole streams through LM-Infinite and InfLLM
give the logits the reference attention gives."""

from __future__ import annotations

import pytest
import torch

import retromem.memory.kv_budget as kv
from retromem.memory.infllm import InfLLM, InfLLMConfig
from retromem.memory.kv_budget import FullAttention, enable, group_attention, reference_group_attention, stream
from retromem.memory.lm_infinite import LMInfinite, LMInfiniteConfig

from .conftest import tiny_decoder


def _group(g: torch.Generator, n: int, B: int = 1, H: int = 6, Hkv: int = 2, T: int = 9, D: int = 16):
    q = torch.randn(B, H, T, D, generator=g)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    return q, k, v, torch.rand(T, n, generator=g) > 0.5


def test_merged_groups_equal_one_softmax_with_probabilities():
    g = torch.Generator().manual_seed(0)
    groups = [_group(g, 12), _group(g, 5), _group(g, 0)]
    groups[0][3][:, 0] = True  # every row sees some key ...
    groups[1][3][0] = False  # ... though not in every group
    out, probs = group_attention(groups, 0.25, want_probs=True)
    ref, ref_probs = reference_group_attention(groups, 0.25, want_probs=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for p, rp in zip(probs, ref_probs):
        torch.testing.assert_close(p, rp, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sum(p.sum(-1) for p in probs), torch.full((1, 2, 9), 3.0))  # 3 query heads per KV head


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_attention_in_segments_and_steps_equals_the_plain_model(family):
    model = tiny_decoder(family)
    ids = torch.randint(3, 128, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    enable(model)
    mem = FullAttention(model)
    got = torch.cat([stream(model, ids[:, :64], mem, segment=16, keep_logits="all"),
                     *[stream(model, ids[:, i:i + 1], mem, keep_logits="all") for i in range(64, 70)]], 1)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [
    lambda m: LMInfinite(m, LMInfiniteConfig(n_global=4, n_local=24)),
    lambda m: InfLLM(m, InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, cache_blocks=3)),
], ids=["lm_infinite", "infllm"])
def test_streams_equal_the_reference_attention(make, monkeypatch):
    model = enable(tiny_decoder("mistral"))
    ids = torch.randint(3, 128, (1, 150), generator=torch.Generator().manual_seed(2))
    fast = stream(model, ids, make(model), segment=32, keep_logits="all")
    monkeypatch.setattr(kv, "group_attention", reference_group_attention)
    ref = stream(model, ids, make(model), segment=32, keep_logits="all")
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)
    assert bool((fast.argmax(-1) == ref.argmax(-1)).all())
