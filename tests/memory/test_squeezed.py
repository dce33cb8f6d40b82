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
