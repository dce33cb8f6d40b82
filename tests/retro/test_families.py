"""RETROfit across decoder families on tiny configs: the zero-gated model equals the base exactly, a
saved directory (RETRO weights alone, base pinned by hash) loads to the same logits, cached generation
equals uncached; an unsupported family is refused by name."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from retromem.errors import ConfigError
from retromem.hf_export import ModelCard
from retromem.retro import RetrofitForCausalLM, retro_config_for, retrofit
from retromem.retro.retrofit import save_retrofit

M, K, R, V = 4, 2, 8, 128
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)
FAMILIES = {
    "llama": dict(SMALL, num_key_value_heads=2),
    "mistral": dict(SMALL, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(SMALL, num_key_value_heads=2),
    "qwen3": dict(SMALL, num_key_value_heads=2, head_dim=8),
    "gemma": dict(SMALL, num_key_value_heads=1, head_dim=8),
    "gemma2": dict(SMALL, num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "gemma3_text": dict(SMALL, num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=8),
    "phi3": dict(SMALL, num_key_value_heads=2),
    "olmo2": dict(SMALL, num_key_value_heads=2),
    "smollm3": dict(SMALL, num_key_value_heads=2),
    "gpt_neox": dict(SMALL),
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1),
}


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **FAMILIES[model_type])).eval()


def test_every_family_of_the_table_is_tested() -> None:
    from retromem.retro.modeling_retro import DECODER_LAYERS

    assert set(FAMILIES) == set(DECODER_LAYERS)


FAST = ("llama", "gpt2")  # the other families carry the slow mark (a few seconds each)


@pytest.mark.parametrize("model_type", [t if t in FAST else pytest.param(t, marks=pytest.mark.slow)
                                        for t in sorted(FAMILIES)])
@torch.no_grad()
def test_family_round_trip_and_zero_gate(model_type: str, tmp_path: Path) -> None:
    base = tiny(model_type)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    x, nb = torch.randint(2, V, (2, 13), generator=g), torch.randint(0, V, (2, 3, K, R), generator=g)
    ref = copy.deepcopy(base)(x).logits
    placement = "before_mlp" if model_type in ("llama", "gemma2", "gpt_neox") else "after_layer"
    model = retrofit(base, retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                            retro_layers=[2, 4], cca_placement=placement)).eval()
    torch.testing.assert_close(model(x, neighbour_ids=nb).logits, ref, rtol=0, atol=0)  # gates at zero: the base
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    got = model(x, neighbour_ids=nb).logits
    assert (got[:, M - 1:] - ref[:, M - 1:]).abs().max() > 1e-4  # and the neighbours reach the logits
    out = save_retrofit(model, tmp_path / "rf", card=ModelCard(title="t", summary="s", model_type="retrofit"),
                        base_model_name=str(tmp_path / "base"), base_model_path=str(tmp_path / "base"))
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, RetrofitForCausalLM) and loaded.config.base_model_type == model_type
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, got, rtol=0, atol=1e-5)
    kw = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0, neighbour_ids=nb)
    assert torch.equal(loaded.generate(x[:, :6], use_cache=True, **kw), loaded.generate(x[:, :6], use_cache=False, **kw))


def test_an_unsupported_family_is_refused_by_name() -> None:
    torch.manual_seed(0)
    phi = AutoModelForCausalLM.from_config(AutoConfig.for_model("phi", **SMALL))
    with pytest.raises(ConfigError, match="supports.*got PhiForCausalLM with model_type 'phi'"):
        retrofit(phi)
    with pytest.raises(ConfigError, match="got 'falcon'"):
        retro_config_for(AutoConfig.for_model("falcon"), chunk_length=M)
