"""InfLLM on tiny real decoders: exact when the window covers the input, bounded attention memory
with the block store growing apart, block lookup by representative keys, and generate()."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError
from retromem.memory.infllm import InfLLM, InfLLMConfig
from retromem.memory.kv_budget import enable, generate, stream

from .conftest import tiny_decoder

SMALL = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, cache_blocks=3)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_window_covering_the_input_is_full_attention(family):
    model = tiny_decoder(family)
    ids = _ids(60)
    with torch.no_grad():
        ref = model(ids).logits
    enable(model)
    mem = InfLLM(model, InfLLMConfig(n_init=4, n_local=64, block_size=8, n_repr=2, topk=2, cache_blocks=2))
    torch.testing.assert_close(stream(model, ids, mem, segment=16, keep_logits="all"), ref, atol=2e-5, rtol=1e-4)
    assert mem.store_bytes() == 0


def test_attention_memory_is_bounded_and_the_block_store_grows_apart():
    model = enable(tiny_decoder("mistral"))
    core, stored, blocks = [], [], []
    row = 2 * 16 * 4  # bytes of one token's key (or value) in one layer: 2 kv heads x 16 dims x float32
    for n in (64, 128, 256):
        mem = InfLLM(model, SMALL)
        stream(model, _ids(n), mem, segment=32)
        pending = sum(p.numel() * 4 * 2 for p in mem.pend_k)
        assert mem.cache_bytes() <= 2 * SMALL.cache_blocks * 8 * row * 2  # layers x blocks x block tokens x (k, v)
        core.append(mem.attention_bytes() - mem.cache_bytes() - pending)
        stored.append(mem.store_bytes())
        blocks.append(mem.blocks[0].n)
        # every token is somewhere: initial, window, pending, or a block
        assert 4 + mem.win_pos[0].numel() + mem.pend_k[0].shape[-2] + 8 * mem.blocks[0].n == n
        assert mem.win_pos[0].numel() == 16 and mem.blocks[0].repr.shape == (2, mem.blocks[0].n, 2, 16)
    assert blocks == [(64 - 20) // 8, (128 - 20) // 8, (256 - 20) // 8]
    # initial tokens (keys at their position and at 0, values) and the window (keys, values), 2 layers
    assert core == [2 * (4 * 3 + 16 * 2) * row] * 3
    assert stored[0] < stored[1] < stored[2]


def test_lookup_picks_the_block_whose_representatives_match_the_query():
    model = enable(tiny_decoder("llama"))
    mem = InfLLM(model, SMALL)
    store = mem.blocks[0]
    g = torch.Generator().manual_seed(0)
    reps = [torch.randn(2, 2, 16, generator=g) * 0.1 for _ in range(5)]
    target = torch.zeros(16)
    target[3] = 5.0
    reps[3][:, 0] = target  # block 3's first representative points where the queries point
    for i, r in enumerate(reps):
        store.add(torch.full((2, 8, 16), float(i)), torch.full((2, 8, 16), float(i)), r)
    q = target.expand(1, 4, 3, 16).clone()  # (B, H, T, D)
    k, v = mem.far_memory(0, q)
    assert k.shape == (1, 2, 2 * 8, 16)  # topk = 2 blocks of 8 per kv head
    assert 3.0 in set(k[0, 0, :, 0].tolist()) and 3.0 in set(k[0, 1, :, 0].tolist())
    assert mem.misses == 4 and mem.hits == 0
    mem.far_memory(0, q)
    assert mem.hits == 4  # the same blocks again: served by the cache


def test_generate_and_refusals():
    model = enable(tiny_decoder("qwen2"))
    ids = _ids(80)
    out = generate(model, ids, InfLLM(model, SMALL), segment=16, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 84)
    torch.manual_seed(0)
    assert generate(model, ids, InfLLM(model, SMALL), segment=16, max_new_tokens=4, do_sample=True).shape == (1, 84)
    with pytest.raises(ConfigError, match="infllm.cache_blocks"):
        InfLLMConfig(topk=8, cache_blocks=4)
    with pytest.raises(ConfigError, match="infllm.n_repr"):
        InfLLMConfig(block_size=4, n_repr=8)
    with pytest.raises(ConfigError, match="at most 1"):
        stream(model, ids.repeat(2, 1), InfLLM(model, SMALL))
