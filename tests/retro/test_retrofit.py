"""RETROfit of tiny Llama and GPT-2 models: exact parity at start, frozen base, causal shift,
weights-alone round trip, the trainable fraction, and bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from retromem.retro import RetroConfig, load_retro_weights, retro_config_for, retrofit, save_retro_weights, trainable_fraction
from retromem.retro.retrofit import WEIGHTS_FILE, retro_state_dict
from retromem.errors import ConfigError

M, K, R, V = 4, 2, 8, 97



def tiny_base(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def retrofitted(kind: str, seed: int = 0) -> torch.nn.Module:
    base = tiny_base(kind, seed)
    return retrofit(base, retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                           retro_layers=[2, 4]))


def inputs(T: int = 16, B: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T // M, K, R), generator=g)


def perturb_retro_weights(model: torch.nn.Module, seed: int = 3) -> None:
    """Moves the new weights off their gated start (what training would do), so CCA has an effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_fresh_retrofit_equals_base(kind: str) -> None:
    x, nb = inputs()
    ref = tiny_base(kind)(x).logits
    model = retrofitted(kind)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    torch.testing.assert_close(model(x, neighbour_ids=nb).logits, ref, rtol=0, atol=0)
    # and it is not equal by accident: once the new weights move, neighbours change the logits
    perturb_retro_weights(model)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)  # no neighbours: still the base model
    assert (model(x, neighbour_ids=nb).logits[:, M - 1:] - ref[:, M - 1:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_base_is_frozen_and_new_blocks_learn(kind: str) -> None:
    model = retrofitted(kind)
    x, nb = inputs()
    model(x, neighbour_ids=nb, labels=x).loss.backward()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("retro_cca" in n or "retro_encoder" in n for n in names)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    o_proj = model.get_decoder().layers[1] if kind == "llama" else model.transformer.h[1]
    assert o_proj.retro_cca.attn.o_proj.weight.grad.abs().sum() > 0  # the zero-initialised output gets gradient
    assert 0 < trainable_fraction(model) < 0.5


@torch.no_grad()
def test_retrofitted_llama_is_causal() -> None:
    model = retrofitted("llama")
    perturb_retro_weights(model)
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    for t in (2, 5, 9, 14):  # change tokens after t
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % V
        torch.testing.assert_close(model(changed, neighbour_ids=nb).logits[:, : t + 1], ref[:, : t + 1])
    for u in range(nb.shape[1]):  # change neighbours of chunk u, complete at its last token
        changed = nb.clone()
        changed[:, u] = (changed[:, u] + 1) % V
        out = model(x, neighbour_ids=changed).logits
        first = u * M + M - 1
        torch.testing.assert_close(out[:, :first], ref[:, :first])
        assert (out[:, first] - ref[:, first]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_retro_weights_alone_round_trip(kind: str, tmp_path) -> None:
    model = retrofitted(kind)
    perturb_retro_weights(model)
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    save_retro_weights(model, tmp_path)
    saved = (tmp_path / WEIGHTS_FILE).stat().st_size
    assert saved < 4 * sum(p.numel() for p in model.parameters())  # the new weights only, not the base
    loaded = load_retro_weights(tiny_base(kind), tmp_path)
    assert set(retro_state_dict(loaded)) == set(retro_state_dict(model))
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, ref)
    assert trainable_fraction(loaded) == trainable_fraction(model)


def test_smollm2_config_trains_under_ten_percent() -> None:
    # SmolLM2-135M's architecture, on the meta device: no weights needed to count parameters
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    with torch.device("meta"):
        model = retrofit(LlamaForCausalLM(cfg))
    assert model.retro_config.retro_layers == list(range(9, 31, 3))
    assert 0.01 < trainable_fraction(model) < 0.10


def test_unsupported_architecture() -> None:
    bert = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64))
    with pytest.raises(ConfigError, match="model_type 'bert'"):
        retrofit(bert)
    with pytest.raises(ConfigError, match="got Linear"):
        retrofit(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("layers", [[0], [5], [3, 3]])
def test_retro_layers_outside_the_base(layers: list[int]) -> None:
    with pytest.raises(ValueError, match=r"`retro_layers`"):
        retrofit(tiny_base("gpt2"), retro_layers=layers, chunk_length=M)


def test_config_of_another_model_is_refused() -> None:
    other = RetroConfig(vocab_size=V, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, retro_layers=[4],
                        gated=True)
    with pytest.raises(ConfigError, match="`hidden_size` is 64 but the base model has 32"):
        retrofit(tiny_base("llama"), other)
    with pytest.raises(ConfigError, match="cannot be overridden"):
        retro_config_for(tiny_base("llama").config, hidden_size=64)


def test_retrofit_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="already RETROfitted"):
        retrofit(retrofitted("llama"))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bad_neighbour_shape(kind: str) -> None:
    model = retrofitted(kind)
    x, nb = inputs()
    with pytest.raises(ValueError, match=r"`neighbour_ids` must have shape \(batch=2, n_chunks>=1, num_neighbours=2, "
                                         r"neighbour_length=8\), got \(2, 4, 2, 7\)"):
        model(x, neighbour_ids=nb[..., :7])
    # the failed call leaves no neighbours behind: the next plain forward is the base model
    torch.testing.assert_close(model(x).logits, tiny_base(kind)(x).logits, rtol=0, atol=0)


@torch.no_grad()
def test_generate_without_neighbours_is_the_base_models() -> None:
    x, _ = inputs(B=1)
    model = retrofitted("llama")
    perturb_retro_weights(model)  # CCA is skipped without neighbours, whatever its weights
    out = model.generate(x[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(out, tiny_base("llama").generate(x[:, :5], max_new_tokens=6, do_sample=False))


@torch.no_grad()
def test_retrofitted_gpt2_ignores_padded_neighbour_tokens() -> None:
    model = retrofitted("gpt2")
    perturb_retro_weights(model)
    x, nb = inputs()
    mask = torch.ones_like(nb)
    mask[:, :, 0, 6:] = 0
    ref = model(x, neighbour_ids=nb, neighbour_attention_mask=mask).logits
    changed = nb.clone()
    changed[:, :, 0, 6:] = (changed[:, :, 0, 6:] + 7) % V
    torch.testing.assert_close(model(x, neighbour_ids=changed, neighbour_attention_mask=mask).logits, ref)
    assert (model(x, neighbour_ids=changed).logits - ref)[:, M - 1:].abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_generate_with_fixed_neighbours_matches_greedy_loop(kind: str) -> None:
    x, nb = inputs(B=1)
    model = retrofitted(kind)
    perturb_retro_weights(model)
    common = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    out = model.generate(x[:, :5], neighbour_ids=nb, **common)
    seq = x[:, :5]
    for _ in range(8):
        seq = torch.cat([seq, model(seq, neighbour_ids=nb).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)
    plain = model.generate(x[:, :5], **common)
    assert (plain.scores[-1] - out.scores[-1]).abs().max() > 1e-4  # the neighbours reached generate


@torch.no_grad()
def test_deep_copy_is_an_independent_retrofitted_model() -> None:
    import copy

    model = retrofitted("llama")
    perturb_retro_weights(model)
    twin = copy.deepcopy(model)
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    torch.testing.assert_close(twin(x, neighbour_ids=nb).logits, ref)
    perturb_retro_weights(twin, seed=9)  # training the copy leaves the original alone
    assert (twin(x, neighbour_ids=nb).logits - ref).abs().max() > 1e-4
    torch.testing.assert_close(model(x, neighbour_ids=nb).logits, ref)
    assert twin.retro_context is not model.retro_context
    assert twin.model.layers[1].retro_context is twin.retro_context
