"""SirLLM on tiny real decoders: token entropy from the model's own logits, the kept set (sinks,
highest decayed entropy, recent window), bounded memory, exactness with a large budget."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError
from retromem.memory.kv_budget import enable, generate, stream
from retromem.memory.sirllm import SirLLM, SirLLMConfig

from .conftest import tiny_decoder


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_large_budget_is_full_attention():
    model = tiny_decoder("qwen2")
    ids = _ids(50)
    with torch.no_grad():
        ref = model(ids).logits
    enable(model)
    out = stream(model, ids, SirLLM(model, SirLLMConfig(n_sink=4, n_keep=64, n_local=16)), segment=16, keep_logits="all")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_scores_are_token_entropies_and_the_kept_tokens_are_the_most_surprising():
    model = enable(tiny_decoder("llama"))
    ids = _ids(96)
    cfg = SirLLMConfig(n_sink=2, n_keep=8, n_local=16, decay=1.0)
    mem = SirLLM(model, cfg)
    logits = stream(model, ids, mem, segment=16, keep_logits="all")  # the model's logits under this memory
    logp = torch.log_softmax(logits[0].float(), -1)
    surprise = -logp[:-1].gather(1, ids[0, 1:, None])[:, 0]  # -log p(x_t | x_<t) for t = 1..95
    assert mem.score_pos[-1] == 95
    i = torch.searchsorted(mem.score_pos, torch.arange(80, 96))
    torch.testing.assert_close(mem.score_val[i], surprise[79:], atol=1e-4, rtol=1e-4)
    # the next call prunes: sinks, the 16 most recent, and the 8 most surprising of the rest (at scoring time)
    stream(model, ids[:, :1], mem, segment=1)
    kept = mem.pos[0][:-1]  # the stored tokens before this call's own
    recent = set(range(96 - 16, 96))
    middle = [p for p in kept.tolist() if p >= 2 and p not in recent]
    candidates = torch.arange(2, 80)
    best = set(candidates[surprise[candidates - 1].topk(8).indices].tolist())
    assert set(middle) == best and {0, 1} <= set(kept.tolist()) and recent <= set(kept.tolist())
    assert all(torch.equal(mem.pos[0], p) for p in mem.pos)  # every layer keeps the same tokens


def test_decay_and_bounded_memory():
    model = enable(tiny_decoder("mistral"))
    cfg = SirLLMConfig(n_sink=2, n_keep=8, n_local=8, decay=0.5, decay_every=16)
    held = []
    for n in (64, 192):
        mem = SirLLM(model, cfg)
        stream(model, _ids(n), mem, segment=16)
        held.append(mem.held_tokens(0))
        assert mem.score_pos.numel() <= cfg.budget_tokens + 16
    assert held == [cfg.budget_tokens + 16] * 2  # the budget plus the call in flight
    mem = SirLLM(model, cfg)
    mem.observe(_ids(4), torch.zeros(1, 4, 128))
    before = mem.score_val.clone()
    mem.observe(_ids(16, 1), torch.zeros(1, 16, 128))
    torch.testing.assert_close(mem.score_val[:4], before * 0.5)  # 16 tokens later: one decay step


def test_generate_scores_decoded_tokens_and_refusals():
    model = enable(tiny_decoder("qwen3"))
    mem = SirLLM(model, SirLLMConfig(n_sink=2, n_keep=8, n_local=8))
    out = generate(model, _ids(40), mem, segment=16, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 45) and int(mem.score_pos[-1]) == 43  # the last decoded token is not fed back
    with pytest.raises(ConfigError, match="sirllm.decay"):
        SirLLMConfig(decay=1.5)


def test_decay_per_call_is_one_step_per_turn():
    model = enable(tiny_decoder("llama"))
    mem = SirLLM(model, SirLLMConfig(n_sink=2, n_keep=8, n_local=0, decay=0.5, decay_per="call"))
    mem.observe(_ids(4), torch.zeros(1, 4, 128))
    before = mem.score_val.clone()
    mem.observe(_ids(100, 1), torch.zeros(1, 100, 128))  # one turn of 100 tokens: one step, whatever its length
    torch.testing.assert_close(mem.score_val[:4], before * 0.5)
    mem.observe(_ids(3, 2), torch.zeros(1, 3, 128))
    torch.testing.assert_close(mem.score_val[:4], before * 0.25)
    with pytest.raises(ConfigError, match="sirllm.decay_per"):
        SirLLMConfig(decay_per="turn")
