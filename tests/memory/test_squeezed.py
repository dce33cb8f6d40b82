"""Squeezed Attention on tiny real decoders: full attention at fraction 1, the fraction of keys
attended, the decoding (gather) path equal to the masked path, and k-means itself."""

from __future__ import annotations

import pytest
import torch

from retromem.errors import ConfigError
from retromem.memory.kv_budget import enable, stream
from retromem.memory.squeezed import SqueezedAttention, SqueezedConfig, kmeans

from .conftest import tiny_decoder


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fraction_one_is_full_attention_for_questions_and_decoding(family):
    model = tiny_decoder(family)
    ids = _ids(100)
    with torch.no_grad():
        ref = model(ids).logits[:, 80:]
    enable(model)
    mem = SqueezedAttention.prefill(model, ids[:, :80], SqueezedConfig(fraction=1.0, cluster_size=8), segment=32)
    torch.testing.assert_close(stream(model, ids[:, 80:], mem, segment=20, keep_logits="all"), ref, atol=2e-5, rtol=1e-4)
    mem.reset_queries()
    one = stream(model, ids[:, 80:], mem, segment=1, keep_logits="all")  # token by token: the gather path
    torch.testing.assert_close(one, ref, atol=2e-5, rtol=1e-4)
    assert mem.attended_fraction() == 1.0


def test_a_quarter_of_the_keys_and_the_gather_path_equals_the_mask_path():
    model = enable(tiny_decoder("llama"))
    ids = _ids(140)
    cfg = SqueezedConfig(fraction=0.25, cluster_size=4)
    mem = SqueezedAttention.prefill(model, ids[:, :128], cfg, segment=64)
    masked = stream(model, ids[:, 128:], mem, segment=12, keep_logits="all")
    assert 0.25 <= mem.attended_fraction() < 0.45
    mem.reset_queries()
    gathered = stream(model, ids[:, 128:], mem, segment=1, keep_logits="all")
    torch.testing.assert_close(gathered, masked, atol=2e-5, rtol=1e-4)
    assert mem.budget_tokens == 32 and mem.held_tokens() == 128 + 12
    with torch.no_grad():
        full = model(ids).logits[:, 128:]
    assert not torch.allclose(masked, full, atol=1e-4)  # it did leave keys out


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0], [0, 10.0], [-10.0, -10.0]])
    x = torch.cat([c + torch.randn(30, 2, generator=g) for c in centres])
    c, a = kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(a).tolist()) == [30, 30, 30]
    assert all(len(set(a[i * 30:(i + 1) * 30].tolist())) == 1 for i in range(3))


def test_refusals():
    with pytest.raises(ConfigError, match="squeezed.fraction"):
        SqueezedConfig(fraction=0)
    model = enable(tiny_decoder("llama"))
    with pytest.raises(ConfigError, match="prefill"):
        SqueezedAttention(model).freeze()


def test_per_query_head_selection_gathers_what_it_masks_and_heads_differ():
    model = enable(tiny_decoder("llama"))
    ids = _ids(140, seed=1)
    cfg = SqueezedConfig(fraction=0.25, cluster_size=4, heads="query", n_sink=2, n_tail=4)
    mem = SqueezedAttention.prefill(model, ids[:, :128], cfg, segment=64)
    q = torch.randn(1, 4, 3, 16, generator=torch.Generator().manual_seed(0))
    sel = mem.select(0, q)  # (H, T, n): one selection per query head
    assert sel.shape == (4, 3, 128)
    assert not torch.equal(sel[0], sel[1])  # query heads sharing KV head 0 chose differently
    masked = stream(model, ids[:, 128:], mem, segment=12, keep_logits="all")
    assert 0.25 <= mem.attended_fraction() < 0.3
    mem.reset_queries()
    gathered = stream(model, ids[:, 128:], mem, segment=1, keep_logits="all")
    torch.testing.assert_close(gathered, masked, atol=2e-5, rtol=1e-4)
    # the same clusters selected per KV head give other logits: the per-query-head selection changed what is attended
    mem.reset_queries()
    mem.set_fraction(0.25, heads="kv")
    kv = stream(model, ids[:, 128:], mem, segment=12, keep_logits="all")
    assert not torch.allclose(kv, masked, atol=1e-4)


def test_hierarchical_centroids_take_fine_clusters_inside_the_kept_coarse_ones():
    model = enable(tiny_decoder("qwen3"))
    ids = _ids(256, seed=2)
    cfg = SqueezedConfig(fraction=0.25, cluster_size=4, coarse_size=32, coarse_keep=1.0, heads="query")
    mem = SqueezedAttention.prefill(model, ids, cfg, segment=128)
    assert mem.coarse[0].shape[:2] == (2, 8) and int(mem.coarse_sizes[0].sum()) == 2 * 256
    q = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(0))
    take = mem.select_clusters(0, q)  # (H, T, C)
    parent = mem.parent[0].repeat_interleave(2, 0)  # (H, C) coarse cluster of each fine cluster
    for s in range(4):
        for t in range(2):
            coarse_rel = q[0, s, t] @ mem.coarse[0][s // 2].T
            # coarse clusters in rank order until they hold the budget (the fine keys a query may take)
            order = coarse_rel.argsort(descending=True)
            sizes = mem.coarse_sizes[0][s // 2][order]
            kept = set(order[(sizes.cumsum(0) - sizes) < 0.25 * 256 - 36].tolist())
            assert set(parent[s][take[s, t]].tolist()) <= kept
    flat_compared = 4 * 2 * mem.centroids[0].shape[1]
    assert mem.compared < flat_compared
    mem.set_fraction(0.25, coarse_keep=0)  # 0: the coarse level skipped, the flat selection
    flat = mem.select_clusters(0, q)
    mem.set_fraction(0.25, coarse_keep=100.0)  # every coarse cluster kept: the flat selection again
    assert torch.equal(mem.select_clusters(0, q), flat)
    with pytest.raises(ConfigError, match="squeezed.coarse_size"):
        SqueezedConfig(cluster_size=16, coarse_size=8)
    with pytest.raises(ConfigError, match="squeezed.heads"):
        SqueezedConfig(heads="all")


def test_threshold_calibrated_on_prompts_and_reclustering_share_the_prefill():
    model = enable(tiny_decoder("llama"))
    ids = _ids(160, seed=4)
    with torch.no_grad():
        ref = model(ids).logits[:, 128:]
    cfg = SqueezedConfig(fraction=0.3, cluster_size=4, n_sink=2, n_tail=4, selection="threshold", heads="query")
    mem = SqueezedAttention.prefill(model, ids[:, :128], cfg, segment=64)
    prompts = [_ids(20, seed=s) for s in (5, 6)]
    mem.calibrate(model, prompts)
    assert mem.calib_q[0].shape == (1, 4, 40, 16) and mem.held_tokens() == 128
    seen = 0.0
    for p in prompts:  # the calibration prompts themselves take about the fraction on average
        mem.reset_queries()
        mem.set_fraction(0.3)
        stream(model, p, mem, segment=20)
        seen += mem.attended_fraction() / 2
    assert abs(seen - 0.3) < 0.08  # layer 1 sees queries computed after a selective layer 0: near, not exact
    other = mem.reclustered(model, SqueezedConfig(fraction=1.0, cluster_size=8))
    assert other.ctx_k[0] is mem.ctx_k[0] and other.centroids[0].shape[1] == 16
    torch.testing.assert_close(stream(model, ids[:, 128:], other, segment=32, keep_logits="all"), ref,
                               atol=2e-5, rtol=1e-4)


def test_probe_records_the_share_of_a_span_each_layer_selected():
    model = enable(tiny_decoder("llama"))
    ids = _ids(140)
    mem = SqueezedAttention.prefill(model, ids[:, :128], SqueezedConfig(fraction=0.25, cluster_size=4), segment=64)
    mem.probe = (0, 4, 5)  # the sinks, always attended
    stream(model, ids[:, 128:], mem, segment=12)
    assert [h.tolist() for h in mem.probe_hits] == [[1.0, 1.0]] * 2
    mem.reset_queries()
    mem.probe = (40, 60, 0)
    stream(model, ids[:, 128:], mem, segment=12)
    assert all(((h >= 0) & (h <= 1)).all() for h in mem.probe_hits)
