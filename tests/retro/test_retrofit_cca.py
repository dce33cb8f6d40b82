"""RETROfit of tiny Llama and GPT-2 models with the paper's CCA placement (between self-attention and
feed-forward) and relative positions: exact parity with the base at start, causality, the weights-alone
round trip, and old saved RETRO weights keeping their behaviour."""

from __future__ import annotations

import json

import pytest
import torch

from retromem.retro import load_retro_weights, retro_config_for, retrofit, save_retro_weights
from retromem.retro.retrofit import CONFIG_FILE
from tests.retro.test_retrofit import K, M, V, inputs, perturb_retro_weights, tiny_base

PAPER = {"cca_placement": "before_mlp", "cca_relative_positions": True}


def retrofitted(kind: str, **options) -> torch.nn.Module:
    base = tiny_base(kind)
    return retrofit(base, retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=2 * M,
                                           retro_layers=[2, 4], **options))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_fresh_retrofit_before_mlp_equals_base(kind: str) -> None:
    x, nb = inputs()
    ref = tiny_base(kind)(x).logits
    model = retrofitted(kind, **PAPER)
    torch.testing.assert_close(model(x, neighbour_ids=nb).logits, ref, rtol=0, atol=0)
    perturb_retro_weights(model)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    assert (model(x, neighbour_ids=nb).logits[:, M - 1:] - ref[:, M - 1:]).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_retrofit_before_mlp_is_causal_in_the_neighbours(kind: str) -> None:
    model = retrofitted(kind, **PAPER)
    perturb_retro_weights(model)
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    for u in range(nb.shape[1]):
        changed = nb.clone()
        changed[:, u] = (changed[:, u] + 1) % V
        out = model(x, neighbour_ids=changed).logits
        first = u * M + M - 1
        torch.testing.assert_close(out[:, :first], ref[:, :first], rtol=0, atol=0)
        assert (out[:, first] - ref[:, first]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_placements_differ_only_through_the_feed_forward(kind: str) -> None:
    after, before = retrofitted(kind, cca_placement="after_layer"), retrofitted(kind, cca_placement="before_mlp")
    perturb_retro_weights(after)
    before.load_state_dict(after.state_dict())
    x, nb = inputs()
    assert not torch.allclose(after(x, neighbour_ids=nb).logits, before(x, neighbour_ids=nb).logits)
    layers = after.model.layers if kind == "llama" else after.transformer.h
    twins = before.model.layers if kind == "llama" else before.transformer.h
    for number in (2, 4):  # zero the RETRO layers' feed-forward: then CCA before it or after it is one sum
        for layer in (layers[number - 1], twins[number - 1]):
            mlp = layer.mlp
            (mlp.down_proj.weight if kind == "llama" else mlp.c_proj.weight).zero_()
            if kind == "gpt2":
                mlp.c_proj.bias.zero_()
    torch.testing.assert_close(after(x, neighbour_ids=nb).logits, before(x, neighbour_ids=nb).logits)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@torch.no_grad()
def test_weights_round_trip_keeps_the_options_and_old_weights_their_behaviour(kind: str, tmp_path) -> None:
    model = retrofitted(kind, **PAPER)
    perturb_retro_weights(model)
    x, nb = inputs()
    save_retro_weights(model, tmp_path / "new")
    loaded = load_retro_weights(tiny_base(kind), tmp_path / "new")
    assert loaded.retro_config.cca_placement == "before_mlp" and loaded.retro_config.cca_relative_positions
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits)

    old = retrofitted(kind)  # no options: the behaviour of weights saved before they existed
    perturb_retro_weights(old)
    save_retro_weights(old, tmp_path / "old")
    saved = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    for key in PAPER:
        saved.pop(key, None)
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(saved))
    reloaded = load_retro_weights(tiny_base(kind), tmp_path / "old")
    assert reloaded.retro_config.cca_placement == "after_layer" and not reloaded.retro_config.cca_relative_positions
    torch.testing.assert_close(reloaded(x, neighbour_ids=nb).logits, old(x, neighbour_ids=nb).logits)
