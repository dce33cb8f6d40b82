"""Saved models are artifacts too (issue 15): `checksums.json` records every file when the model is
saved; loading checks it, so flipped, cut or grown weights are an error naming the file instead of
a model that loads and quietly answers wrong; `retromem index verify` checks a model directory."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from retromem.datastore.integrity import verify_artifact
from retromem.errors import ArtifactCorruptError
from retromem.retro import RetroConfig, RetroForCausalLM
from retromem.retro.loading import load_retro_model, save_model


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":  # weights, past the safetensors header
        mid = len(data) * 3 // 4
        data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        data += b"\0" * 64
    path.write_bytes(bytes(data))


def _tokenizer():
    from retromem.datastore.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer("gpt2")  # built in, offline; the tokenizer files are sealed with the weights


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    cfg = RetroConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, chunk_length=4, num_neighbours=2, neighbour_length=8, retro_layers=[2],
                      encoder_num_layers=1)
    return save_model(RetroForCausalLM(cfg).eval(), _tokenizer(), tmp_path / "model", None)


@pytest.mark.parametrize("how", ["flip", "truncate", "extend"])
def test_a_damaged_saved_model_is_refused_naming_the_file(saved, how):
    assert (saved / "checksums.json").is_file()
    model, _ = load_retro_model(saved)  # intact: loads
    assert verify_artifact(saved).ok and verify_artifact(saved).kind == "model"
    _damage(saved / "model.safetensors", how)
    with pytest.raises(ArtifactCorruptError, match="model.safetensors") as err:
        load_retro_model(saved)
    assert "saved model is damaged" in str(err.value)
    rep = verify_artifact(saved)
    assert [rel for rel, _ in rep.problems] == ["model.safetensors"]


def test_cli_verify_names_the_damaged_weights(saved):
    from retromem.cli import main

    r = CliRunner().invoke(main, ["index", "verify", str(saved)])
    assert r.exit_code == 0, r.output
    _damage(saved / "model.safetensors", "flip")
    r = CliRunner().invoke(main, ["index", "verify", str(saved)])
    assert r.exit_code == 2 and "model.safetensors" in r.output


def test_memory_models_are_sealed_and_checked(tmp_path):
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.loading import load_memory_model
    from retromem.memory.training import save_memory_model
    from tests.memory.test_infini_attention import tiny_llama

    target = save_memory_model(InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8)), _tokenizer(),
                               tmp_path / "mem")
    assert (target / "checksums.json").is_file()
    load_memory_model(str(target))
    _damage(target / "model.safetensors", "flip")
    with pytest.raises(ArtifactCorruptError, match="model.safetensors"):
        load_memory_model(str(target))
