"""LM-Infinite and the shared bounded-KV machinery on tiny real decoders of four families: exact
where the window covers the input, the Lambda mask and bounded memory where it does not, and
composition with generate()."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError, UnsupportedModelError
from retromem.memory.kv_budget import FullAttention, Rope, StreamingLLM, enable, find_rotary, generate, stream
from retromem.memory.lm_infinite import LMInfinite, LMInfiniteConfig

from .conftest import tiny_decoder, tiny_gpt2

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def _ids(n: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_window_covering_the_input_is_full_attention(family):
    model = tiny_decoder(family)
    ids = _ids(70)
    with torch.no_grad():
        ref = model(ids).logits
    enable(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)  # enabled without a memory: unchanged
    for mem in (LMInfinite(model, LMInfiniteConfig(n_global=4, n_local=70)), FullAttention(model),
                StreamingLLM(model, n_sink=4, n_local=70)):
        out = stream(model, ids, mem, segment=16, keep_logits="all")
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_equals_plain_generate_and_sampling_runs(family):
    model = tiny_decoder(family)
    ids = _ids(40)
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    enable(model)
    got = generate(model, ids, LMInfinite(model, LMInfiniteConfig(n_local=64)), segment=16, max_new_tokens=6,
                   do_sample=False)
    assert torch.equal(got, plain)
    # transformers' own generate with the memory as its cache, a short window, sampling
    mem = LMInfinite(model, LMInfiniteConfig(n_global=2, n_local=8))
    torch.manual_seed(0)
    out = model.generate(ids, cache=mem, max_new_tokens=6, do_sample=True, top_k=20)
    assert out.shape == (1, 46) and mem.get_seq_length() == 45 and mem.held_tokens() == 10


def test_lambda_mask_ignores_the_middle_and_keeps_the_starting_tokens():
    """Two layers, window 8: token j reaches the last position only through the window (within
    2 x 8 tokens) or as a starting token."""
    model = enable(tiny_decoder("llama"))
    ids = _ids(64)
    last = lambda x, mem: stream(model, x, mem, segment=8, keep_logits="last")  # noqa: E731
    cfg = LMInfiniteConfig(n_global=2, n_local=8)
    base = last(ids, LMInfinite(model, cfg))
    middle = ids.clone()
    middle[0, 20] = 3 if ids[0, 20] != 3 else 4
    torch.testing.assert_close(last(middle, LMInfinite(model, cfg)), base)  # 43 tokens back: never seen
    start = ids.clone()
    start[0, 1] = 3 if ids[0, 1] != 3 else 4
    assert not torch.allclose(last(start, LMInfinite(model, cfg)), base)  # a starting token: always seen


def test_memory_held_does_not_grow_with_the_input():
    model = enable(tiny_decoder("qwen2"))
    cfg = LMInfiniteConfig(n_global=4, n_local=16)
    held = []
    for n in (64, 160, 400):
        mem = LMInfinite(model, cfg)
        stream(model, _ids(n), mem, segment=16)
        held.append(mem.attention_bytes())
        assert mem.held_tokens(0) == cfg.budget_tokens == 20 and mem.get_seq_length() == n
    # two layers x (keys at their position + keys at position 0 for the 4 starts, and values) x 2 kv heads x 16 dims
    per_layer = (4 * 3 + 16 * 2) * 2 * 16 * 4
    assert held == [2 * per_layer] * 3


def test_rope_shift_moves_keys_as_the_model_would_rotate_them():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_decoder("llama")
    rotary = find_rotary(model)
    rope = Rope(rotary.inv_freq)
    x = torch.randn(1, 2, 5, 16)
    pos = torch.tensor([[3, 40, 7, 100, 0]])
    cos, sin = rotary(x, pos)
    at_pos, _ = apply_rotary_pos_emb(x, x, cos, sin)
    cos2, sin2 = rotary(x, pos + 250)
    moved, _ = apply_rotary_pos_emb(x, x, cos2, sin2)
    torch.testing.assert_close(rope.shift(at_pos, torch.full((5,), 250)), moved, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope.shift(at_pos, -pos[0]), x, atol=1e-5, rtol=1e-5)  # back to position 0


def test_refusals_name_the_problem():
    with pytest.raises(ConfigError, match="lm_infinite.cap"):
        LMInfiniteConfig(n_local=64, cap=32)
    with pytest.raises(ConfigError, match="lm_infinite.n_local"):
        LMInfiniteConfig(n_local=0)
    with pytest.raises(UnsupportedModelError, match="rotary"):
        enable(tiny_gpt2())
    model = enable(tiny_decoder("llama"))
    with pytest.raises(ConfigError, match="padded"):
        model(_ids(8).repeat(2, 1), attention_mask=torch.tensor([[1] * 8, [0] + [1] * 7]),
              cache=LMInfinite(model))
