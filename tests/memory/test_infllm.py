"""InfLLM on tiny real decoders: exact when the window covers the input, bounded attention memory
with the block store growing apart, one block lookup per layer by the raw dot product of the
chunk's queries with the representative keys (the one-matmul path against the sum written out),
chunked calls equal to separate calls, the paper's configuration within a budget, and generate();
the key lookup (``lookup="keys"``) against the max over every stored key written out, and a block
it finds where the representatives miss it."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError
from retromem.memory.infllm import BlockStore, InfLLM, InfLLMConfig, block_scores
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
        assert mem.win_pos[0].numel() == 16 and mem.blocks[0].reprs().shape == (mem.blocks[0].n, 4 * 16)
    assert blocks == [(64 - 20) // 8, (128 - 20) // 8, (256 - 20) // 8]
    # initial tokens (keys at their position and at 0, values) and the window (keys, values), 2 layers
    assert core == [2 * (4 * 3 + 16 * 2) * row] * 3
    assert stored[0] < stored[1] < stored[2]


def test_one_lookup_per_layer_picks_the_block_whose_representatives_match_the_queries():
    model = enable(tiny_decoder("llama"))
    mem = InfLLM(model, SMALL)
    store = mem.blocks[0]
    g = torch.Generator().manual_seed(0)
    target = torch.zeros(16)
    target[3] = 5.0
    for i in range(5):
        rep = torch.randn(4, 16, generator=g) * 0.1
        if i == 3:
            rep[1] = target  # block 3's representative for query head 1 points where the queries point
        store.add(torch.full((2, 8, 16), float(i)), torch.full((2, 8, 16), float(i)), rep.reshape(-1),
                  torch.zeros(4, 2, dtype=torch.long))
    q = target.expand(1, 4, 3, 16).clone()  # (B, H, T, D)
    k, v = mem.far_memory(0, q)
    assert k.shape == (1, 2, 2 * 8, 16)  # topk = 2 blocks of 8, the same blocks for both KV heads
    assert 3.0 in set(k[0, 0, :, 0].tolist()) and torch.equal(k[0, 0], k[0, 1])
    assert mem.selected[0][1] == 3 or mem.selected[0][0] == 3
    assert mem.misses == 2 and mem.hits == 0
    mem.far_memory(0, q)
    assert mem.hits == 2  # the same blocks again: served by the cache


def test_block_scores_are_the_raw_dot_products_of_queries_and_representatives():
    """The one-matmul lookup against Σ_t Σ_h Σ_r q_{t,h} · k_{r,h} / (T n_repr) over each block's
    representative tokens for each query head (the ones it attended most, kept by index), from a real stream."""
    model = enable(tiny_decoder("mistral"))
    mem = InfLLM(model, SMALL)
    stream(model, _ids(150), mem, segment=32)
    store = mem.blocks[1]
    assert store.n == (150 - 20) // 8
    q = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(3))
    ref = torch.zeros(store.n)
    for b in range(store.n):
        for h in range(4):
            reps = store.k[b][h // 2, store.repr_index[b, h]]  # (n_repr, D) at position 0; 2 query heads per KV head
            ref[b] += (q[0, h] @ reps.T).sum() / (5 * SMALL.n_repr)
    torch.testing.assert_close(block_scores(q, store.reprs()), ref, atol=1e-5, rtol=1e-5)
    assert mem.lookup(1, q) == sorted(ref.topk(SMALL.topk).indices.tolist())


@pytest.mark.parametrize("lookup", ["repr", "keys"])
def test_a_copied_memory_shares_its_blocks_and_goes_on_alone(monkeypatch, lookup):
    import copy

    monkeypatch.setattr(BlockStore, "PAGE", 4)  # 10 blocks at the copy: 2 full pages shared, a partial one
    cfg = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, cache_blocks=3, lookup=lookup, keys_upto=20)
    model = enable(tiny_decoder("llama"))
    ids, other = _ids(200, seed=5), _ids(100, seed=6)
    mem = InfLLM(model, cfg)
    stream(model, ids[:, :100], mem, segment=20)
    twin = copy.deepcopy(mem)
    assert mem.blocks[0].n == 10
    assert twin.blocks[0].k[0] is mem.blocks[0].k[0]  # blocks in full pages are shared, not copied ...
    assert twin.blocks[0].pages[2] is not mem.blocks[0].pages[2]  # ... the page still being written is the copy's own
    stream(model, other, twin, segment=20)  # the copy goes on with other text first ...
    got = stream(model, ids[:, 100:], mem, segment=20, keep_logits="all")  # ... and the original is untouched
    ref = stream(model, ids, InfLLM(model, cfg), segment=20, keep_logits="all")[:, 100:]
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    # and the copy's own blocks are what a fresh run over the same tokens writes
    alone = InfLLM(model, cfg)
    stream(model, ids[:, :100], alone, segment=20)
    stream(model, other, alone, segment=20)
    assert twin.blocks[0].n == alone.blocks[0].n > 10
    for b in range(alone.blocks[0].n):
        torch.testing.assert_close(twin.blocks[1].k[b], alone.blocks[1].k[b], atol=0, rtol=0)


def test_key_lookup_scores_the_attention_each_block_would_get(monkeypatch):
    """lookup="keys": block b scores the softmax attention mass its keys get among every stored key
    (the store read page by page), max over query heads and queries, for calls of at most
    keys_upto queries; longer calls use the representatives."""
    monkeypatch.setattr(BlockStore, "PAGE", 3)  # 16 blocks over 6 pages
    cfg = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=3, cache_blocks=3, lookup="keys", keys_upto=5)
    model = enable(tiny_decoder("mistral"))
    mem = InfLLM(model, cfg)
    stream(model, _ids(150), mem, segment=32)
    store = mem.blocks[1]
    assert store.n == 16 and len(store.pages) == 6
    q = torch.randn(1, 4, 5, 16, generator=torch.Generator().manual_seed(3))
    ref = torch.zeros(store.n)
    for h in range(4):
        keys = torch.cat([store.k[b][h // 2] for b in range(store.n)])  # 2 query heads per KV head
        for t in range(5):
            p = torch.softmax(q[0, h, t] @ keys.T * 0.25, -1).reshape(store.n, 8).sum(-1)  # scaling 16 ** -0.5
            ref = torch.maximum(ref, p)
    torch.testing.assert_close(store.key_scores(q[0], 0.25), ref, atol=1e-5, rtol=1e-5)
    assert mem._scaling == 0.25
    top = ref.topk(3)
    assert mem.lookup(1, q) == sorted(top.indices[top.values >= 0.5 * top.values[0]].tolist())  # min_share 0.5
    mem.relookup(min_share=0.0)
    assert mem.lookup(1, q) == sorted(top.indices.tolist())
    # the next short call of the run looks up with its own queries and the last recent_queries (16) before
    q2 = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(5))
    both = torch.cat([q, q2], 2)
    assert mem.lookup(1, q2) == sorted(store.key_scores(both[0], 0.25).topk(3).indices.tolist())
    assert torch.equal(mem.recent_q[1], both)
    q6 = torch.randn(1, 4, 6, 16, generator=torch.Generator().manual_seed(4))  # longer than keys_upto: ends the run
    assert mem.lookup(1, q6) == sorted(block_scores(q6, store.reprs()).topk(3).indices.tolist())
    assert mem.recent_q[1] is None
    for t in range(20):  # a long run keeps the last 16 queries
        mem.lookup(1, q[:, :, :1] + t)
    assert mem.recent_q[1].shape[2] == 16 and torch.equal(mem.recent_q[1][:, :, -1], q[:, :, 0] + 19)


def test_key_lookup_keeps_its_recent_queries_scores_as_computed_afresh(monkeypatch):
    """A run of short calls keeps its recent queries' per-block log-sum-exps and extends them to the
    blocks written since: the same selections and logits as recomputing them at every call."""
    monkeypatch.setattr(BlockStore, "PAGE", 3)

    class Afresh(InfLLM):
        def _run_scores(self, layer, q):
            self.recent_lse[layer] = None
            return super()._run_scores(layer, q)

    cfg = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, cache_blocks=3, lookup="keys", recent_queries=6)
    model = enable(tiny_decoder("qwen2"))
    ids = _ids(160, seed=9)
    kept, fresh = InfLLM(model, cfg), Afresh(model, cfg)
    a = stream(model, ids, kept, segment=5, keep_logits="all")  # 32 short calls, a block written every 8 tokens
    b = stream(model, ids, fresh, segment=5, keep_logits="all")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert kept.selected == fresh.selected and kept.blocks[0].n == (160 - 20) // 8
    assert kept.recent_lse[0].shape[2] == 6 and kept.blocks[0].n - 1 <= kept.recent_lse[0].shape[3] <= kept.blocks[0].n
    q = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(2))  # (H, T, D)
    whole = kept.blocks[0].block_lse(q, 0.25)
    torch.testing.assert_close(torch.cat([whole[..., :5], kept.blocks[0].block_lse(q, 0.25, start=5)], -1), whole)


def test_key_lookup_finds_one_matching_key_that_the_representatives_average_away():
    """One head of one query attends one key of block 3, which is not among its representatives:
    the paper's lookup (mean representatives, summed over heads) misses it, the key lookup fetches it."""
    g = torch.Generator().manual_seed(0)
    mems = {lk: InfLLM(enable(tiny_decoder("llama")), InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2,
                                                                    topk=2, cache_blocks=3, lookup=lk)) for lk in ("repr", "keys")}
    target = torch.zeros(16)
    target[5] = 4.0
    blocks = []
    for i in range(6):
        k = torch.randn(2, 8, 16, generator=g) * 0.3
        rep = torch.randn(4, 16, generator=g) * 0.3 + (0.3 if i != 3 else 0.0)  # the others' representatives lean to the queries
        if i == 3:
            k[1, 6] = target  # KV head 1 (query heads 2, 3), token 6: not a representative (index 0, 1)
        blocks.append((k, rep))
    for mem in mems.values():
        for k, rep in blocks:
            mem.blocks[0].add(k, k, rep.reshape(-1), torch.tensor([[0, 1]] * 4))
    q = torch.full((1, 4, 2, 16), 0.3)  # every head leans to the others' representatives ...
    q[0, 2, 1] = target  # ... and one head of one query looks for block 3's key
    assert 3 not in mems["repr"].lookup(0, q)
    assert mems["keys"].lookup(0, q) == [3]  # min_share 0.5: the other blocks get far less of that head's attention
    mems["keys"].relookup(min_share=0.0)
    picked = mems["keys"].lookup(0, q)
    assert 3 in picked and len(picked) == 2  # always topk


def test_relookup_changes_the_lookup_only():
    model = enable(tiny_decoder("llama"))
    mem = InfLLM(model, SMALL)
    assert mem.short_lookup(1) and not mem.short_lookup(65)  # keys_upto 64
    chunked = InfLLM(model, InfLLMConfig(n_init=4, n_local=100, block_size=8, chunk=70, topk=2, cache_blocks=3))
    assert chunked.short_lookup(75) and not chunked.short_lookup(140)  # chunks 70 + 5 and 70 + 70
    mem.relookup(lookup="keys", min_share=0.25)
    assert (mem.config.lookup, mem.config.min_share, mem.config.topk) == ("keys", 0.25, SMALL.topk)
    with pytest.raises(ValueError, match="topk"):
        mem.relookup(topk=4)
    with pytest.raises(ConfigError, match="infllm.min_share"):
        mem.relookup(min_share=1.5)


def test_chunked_calls_equal_separate_calls():
    model = enable(tiny_decoder("qwen2"))
    ids = _ids(130, seed=4)
    cfg = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, chunk=12, cache_blocks=3)
    whole = stream(model, ids, InfLLM(model, cfg), segment=48, keep_logits="all")  # calls of 48 in chunks of 12
    apart = stream(model, ids, InfLLM(model, cfg), segment=12, keep_logits="all")
    torch.testing.assert_close(whole, apart, atol=1e-6, rtol=1e-5)


def test_budget_gives_the_papers_proportions():
    assert InfLLMConfig.for_budget(6399) == InfLLMConfig.paper()
    paper = InfLLMConfig.paper()
    assert (paper.n_init, paper.n_local, paper.block_size, paper.n_repr, paper.topk, paper.chunk) == \
        (128, 4096, 128, 4, 16, 512)
    for budget in (64, 300, 1024, 2048, 6399, 10000):
        c = InfLLMConfig.for_budget(budget)
        assert budget - c.block_size < c.budget_tokens <= budget, budget
        assert c.chunk <= c.n_local and c.topk >= 1
    with pytest.raises(ConfigError, match="budget"):
        InfLLMConfig.for_budget(32)


def test_generate_and_refusals():
    model = enable(tiny_decoder("qwen2"))
    ids = _ids(80)
    out = generate(model, ids, InfLLM(model, SMALL), segment=16, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 84)
    torch.manual_seed(0)
    assert generate(model, ids, InfLLM(model, SMALL), segment=16, max_new_tokens=4, do_sample=True).shape == (1, 84)
    keys = InfLLMConfig(n_init=4, n_local=16, block_size=8, n_repr=2, topk=2, cache_blocks=3, lookup="keys")
    assert generate(model, ids, InfLLM(model, keys), segment=16, max_new_tokens=4, do_sample=False).shape == (1, 84)
    with pytest.raises(ConfigError, match="infllm.cache_blocks"):
        InfLLMConfig(topk=8, cache_blocks=4)
    with pytest.raises(ConfigError, match="infllm.chunk"):
        InfLLMConfig(chunk=0)
    with pytest.raises(ConfigError, match="infllm.n_repr"):
        InfLLMConfig(block_size=4, n_repr=8)
    with pytest.raises(ConfigError, match="infllm.lookup"):
        InfLLMConfig(lookup="exact")
    with pytest.raises(ConfigError, match="infllm.recent_queries"):
        InfLLMConfig(lookup="keys", recent_queries=-1)
    with pytest.raises(ConfigError, match="infllm.keys_upto"):
        InfLLMConfig(lookup="keys", keys_upto=0)
    with pytest.raises(ConfigError, match="infllm.min_share"):
        InfLLMConfig(lookup="keys", min_share=-0.1)
    with pytest.raises(ConfigError, match="at most 1"):
        stream(model, ids.repeat(2, 1), InfLLM(model, SMALL))


def test_attention_received_per_query_head_sums_to_the_kv_heads():
    from retromem.memory.kv_budget import group_attention, reference_group_attention

    g = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(1, 4, 5, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(4)
    _, per_kv = group_attention([(q, k, v, mask)], 0.25, want_probs=True)
    _, per_q = group_attention([(q, k, v, mask)], 0.25, want_probs=True, per_query_head=True)
    _, ref = reference_group_attention([(q, k, v, mask)], 0.25, want_probs=True, per_query_head=True)
    assert per_q[0].shape == (1, 4, 5, 9)
    torch.testing.assert_close(per_q[0], ref[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(per_q[0].reshape(1, 2, 2, 5, 9).sum(2), per_kv[0], atol=1e-6, rtol=1e-5)
