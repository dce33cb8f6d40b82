"""generate() of the memory models on a tiny real Llama: greedy, sampling, beam search, a streamer
and padded batches, with the cache (Infini-attention: memory + the open segment's keys and values;
AutoCompressor: summary vectors + keys and values) equal to generation without it, token for token."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
from retromem.memory.common import MemoryCache
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM

from .conftest import tiny_llama

KINDS = ["infini", "autocompressor"]


def make(kind: str):
    if kind == "infini":
        return InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8, gate_init=0.0)).eval()
    return AutoCompressorLM(tiny_llama(), AutoCompressorConfig(summary_length=3, segment_min=8, segment_max=8)).eval()


@pytest.fixture(scope="module")
def models():
    return {k: make(k) for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_cached_generation_equals_uncached_greedy_sampling_and_beams(models, kind):
    m = models[kind]
    ids = torch.randint(3, 128, (2, 13))  # the prompt ends inside its second segment; 20 new tokens cross two more
    greedy = m.generate(ids, max_new_tokens=20, do_sample=False)
    assert greedy.shape == (2, 33) and torch.equal(greedy[:, :13], ids)
    assert torch.equal(greedy, m.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False))
    # greedy = the argmax of a teacher-forced pass over the same tokens, at every step
    with torch.no_grad():
        logits = m(greedy[:, :-1]).logits
    assert torch.equal(logits[:, 12:].argmax(-1), greedy[:, 13:])
    torch.manual_seed(3)
    sampled = m.generate(ids, max_new_tokens=20, do_sample=True, top_k=20)
    torch.manual_seed(3)
    assert torch.equal(sampled, m.generate(ids, max_new_tokens=20, do_sample=True, top_k=20, use_cache=False))
    assert not torch.equal(sampled, greedy)
    beams = m.generate(ids, max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, 25) and torch.equal(beams[::2, :13], ids) and torch.equal(beams[1::2, :13], ids)
    assert bool(((beams >= 0) & (beams < 128)).all())
    assert torch.equal(beams, m.generate(ids, max_new_tokens=12, num_beams=3, num_return_sequences=2,
                                         do_sample=False, use_cache=False))
    # the best beam scores at least as well as greedy under the model's own sequence log-probability
    with torch.no_grad():
        def logprob(seq):
            lp = torch.log_softmax(m(seq[:, :-1]).logits.float(), -1)
            return lp[:, 12:].gather(-1, seq[:, 13:, None]).sum((1, 2))
        assert bool((logprob(beams[::2]) >= logprob(greedy[:, :25]) - 1e-4).all())


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_equals_each_prompt_alone(models, kind):
    m = models[kind]
    prompts = [torch.randint(3, 128, (n,)) for n in (5, 11, 17)]
    L = max(len(p) for p in prompts)
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as for decoder-only generation
        ids[i, L - len(p):] = p
        mask[i, L - len(p):] = 1
    for use_cache in (True, False):
        batch = m.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           use_cache=use_cache)
        for i, p in enumerate(prompts):
            alone = m.generate(p[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, L:], alone[0, len(p):]), (use_cache, i)


@pytest.mark.parametrize("kind", KINDS)
def test_streamer_receives_every_new_token(models, kind):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    m = models[kind]
    ids = torch.randint(3, 128, (1, 10))
    s = Collect()
    out = m.generate(ids, max_new_tokens=9, do_sample=False, streamer=s)
    assert s.ended and s.chunks[0] == ids[0].tolist()  # the prompt first, then one token per step
    assert [t for c in s.chunks[1:] for t in c] == out[0, 10:].tolist()


def test_the_cache_holds_bounded_state_and_reorders_for_beams(models):
    m = models["infini"]
    ids = torch.randint(3, 128, (2, 30))
    with torch.no_grad():
        out = m(ids, use_cache=True)
    assert isinstance(out.cache, MemoryCache) and out.cache.get_seq_length() == 30
    mem = out.cache.lanes[0]
    assert mem.segments_seen == 3 and mem.open_tokens == 6  # 3 segments in memory, 6 tokens open
    assert all(k.shape[2] == 6 for k in mem.local_k.values())  # keys of the open segment only
    before = {k: v.clone() for k, v in mem.M.items()}
    out.cache.reorder_cache(torch.tensor([1, 1]))
    assert all(torch.equal(mem.M[k][0], before[k][1]) and torch.equal(mem.M[k][1], before[k][1]) for k in before)
    # AutoCompressor: the summaries of the past segments and the open segment's keys and values
    ac = models["autocompressor"]
    with torch.no_grad():
        out = ac(ids, use_cache=True)
        state = out.cache.lanes[0]
        assert len(state.summaries) == 3 and state.summaries[0].shape == (2, 3, 64) and state.open_tokens == 6
        assert state.kv.get_seq_length() == 9 + 6  # the soft prompt (3 summaries of 3) + the open segment
        assert_close(out.logits, ac(ids).logits, rtol=1e-4, atol=1e-5)


def test_softprompt_and_memory_start_generation(models):
    ac = models["autocompressor"]
    ctx, prompt = torch.randint(3, 128, (1, 16)), torch.randint(3, 128, (1, 5))
    sp = ac.compress(ctx, segment_lengths=[8])
    a = ac.generate(prompt, softprompt=sp, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, ac.generate(prompt, softprompt=sp, max_new_tokens=10, do_sample=False, use_cache=False))
    with torch.no_grad():
        first = ac(prompt, softprompt=sp).logits[:, -1].argmax(-1)
    assert int(first) == int(a[0, 5])
    m = models["infini"]
    with torch.no_grad():
        mem = m(ctx).memory
    b = m.generate(prompt, memory=mem, max_new_tokens=10, do_sample=False)
    assert torch.equal(b, m.generate(prompt, memory=mem, max_new_tokens=10, do_sample=False, use_cache=False))
    assert mem.segments_seen == 2 and mem.open_tokens == 0  # generation with a cache left the caller's memory alone
