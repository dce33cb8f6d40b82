"""The memory models as Hugging Face models: their own config and model_type, registered with the
Auto classes, saved with auto_map, the modeling code and a model card; a plain base-model load of
a saved directory fails loudly; directories saved before still load through retromem; a fresh
process where retromem cannot be imported loads them with transformers alone (trust_remote_code)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM, AutoCompressorLMConfig
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM, InfiniAttentionLMConfig

from .conftest import tiny_llama

KINDS = ["infini", "autocompressor"]


def make(kind: str):
    if kind == "infini":
        m = InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8, update="linear"))
        with torch.no_grad():  # gates as after training: different per head and layer
            for i, a in enumerate(m.attention_layers()):
                a.memory_gate.copy_(torch.linspace(-1, 1, 4) + i)
        return m.eval()
    m = AutoCompressorLM(tiny_llama(), AutoCompressorConfig(summary_length=3, segment_min=8, segment_max=8))
    with torch.no_grad():
        m.summary_embeddings.add_(torch.randn_like(m.summary_embeddings))
    return m.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_saved_directory_is_a_hugging_face_model_of_its_own_type(kind, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    m = make(kind)
    m.save_pretrained(tmp_path / "m")
    files = set(os.listdir(tmp_path / "m"))
    code = "infini_attention.py" if kind == "infini" else "autocompressor.py"
    assert {"config.json", "model.safetensors", "README.md", "common.py", code} <= files
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    model_type = "infini_attention" if kind == "infini" else "autocompressor"
    assert cfg["model_type"] == model_type and cfg["base_config_type"] == "llama"
    stem = code[:-3]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"{stem}.{type(m).__name__}"
    assert cfg["auto_map"]["AutoConfig"] == f"{stem}.{type(m.config).__name__}"
    # a base config class would adopt a nested dict of its own model_type, and take a top-level vocab_size
    assert cfg["vocab_size"] is None and "model_type" not in cfg["base_config"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "m"), (InfiniAttentionLMConfig, AutoCompressorLMConfig))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(back) is type(m) and back.memory_config == m.memory_config
    ids = torch.randint(3, 128, (1, 30))
    with torch.no_grad():
        assert_close(back(ids).logits, m(ids).logits)
    # the plain base class refuses loudly instead of loading a Llama with random weights
    with pytest.raises(Exception, match="vocab_size"):
        LlamaForCausalLM.from_pretrained(tmp_path / "m")


def _legacy_directory(m, path: Path) -> None:
    """The layout of before issue 17: the base config.json (model_type llama), memory_config.json, and
    every weight under the old names (``base.`` prefix, attention parts and gate directly under self_attn)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    path.mkdir()
    m.base.config.save_pretrained(path)
    kind = "infini_attention" if isinstance(m, InfiniAttentionLM) else "autocompressor"
    (path / "memory_config.json").write_text(json.dumps({"kind": kind, "config": asdict(m.memory_config)}))
    old = {}
    for k, v in m.state_dict().items():
        if k == "base.lm_head.weight":
            continue  # tied: stored once
        k = k.replace("self_attn.inner.", "self_attn.").replace("self_attn.infini_gate.", "self_attn.")
        old[k.replace("summary.summary_embeddings", "summary_embeddings")] = v.contiguous()
    save_file(old, str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_directories_saved_before_load_through_retromem(kind, tmp_path):
    from retromem.memory.loading import memory_model_class, saved_kind

    m = make(kind)
    _legacy_directory(m, tmp_path / "old")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["model_type"] == "llama"
    ids = torch.randint(3, 128, (1, 30))
    assert memory_model_class(saved_kind(tmp_path / "old")) is type(m)  # how load_memory_model picks the class
    back = type(m).from_pretrained(tmp_path / "old")
    assert type(back) is type(m) and back.memory_config == m.memory_config
    with torch.no_grad():
        assert_close(back(ids).logits, m(ids).logits)
    other = AutoCompressorLM if kind == "infini" else InfiniAttentionLM
    with pytest.raises(Exception, match="holds a"):
        other.from_pretrained(tmp_path / "old")


def test_model_card_records_base_training_and_memory_settings(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from retromem.hf_export import read_card_facts
    from retromem.memory.loading import load_memory_model
    from retromem.memory.training import MemoryTrainConfig, save_memory_model, training_facts

    m = make("infini")
    cfg = MemoryTrainConfig(output_dir=str(tmp_path / "run"), model="smollm2-135m", data="text", train_length=64,
                            num_examples=4, infini={"segment_length": 8})
    m.config.retromem_training = training_facts(cfg)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0")))
    target = save_memory_model(m, tok, tmp_path / "final")
    facts = read_card_facts(target)
    assert facts["model_type"] == "infini_attention" and facts["base_model"] == "smollm2-135m"
    assert "4 text examples of 64 tokens" in facts["training_data"]
    assert facts["infini.segment_length"] == 8 and facts["infini.update"] == "linear"
    assert facts["training.memory_lr"] == cfg.memory_lr and facts["base_model_type"] == "llama"
    card = (target / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| infini.segment_length | `8` |" in card
    assert (target / "checksums.json").is_file()
    back, _ = load_memory_model(str(target))  # checksums checked, then loaded as saved
    assert back.config.retromem_training["base_model"] == "smollm2-135m"
    # a model never trained by retromem says so
    m2 = make("autocompressor")
    m2.save_pretrained(tmp_path / "ac")
    facts = read_card_facts(tmp_path / "ac")
    assert facts["training_data"] is None and facts["autocompressor.summary_length"] == 3
    assert "have not been trained by retromem" in (tmp_path / "ac" / "README.md").read_text()


CHILD = """
import sys
sys.path.append(sys.argv[2])  # site-packages only: no .pth files, so retromem's editable install is not found
import importlib.util
assert importlib.util.find_spec("retromem") is None, "retromem is importable"
import torch
from transformers import AutoModelForCausalLM
path = sys.argv[1]
try:
    AutoModelForCausalLM.from_pretrained(path)
    raise SystemExit("loaded without trust_remote_code")
except ValueError as exc:
    assert "trust_remote_code" in str(exc), exc
m = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids = torch.load(path + "/ids.pt")
with torch.no_grad():
    diff = (m(ids).logits - torch.load(path + "/logits.pt")).abs().max().item()
out = m.generate(ids, max_new_tokens=6, do_sample=False)
assert torch.equal(out, torch.load(path + "/generated.pt")), (out, torch.load(path + "/generated.pt"))
print("DIFF", diff, type(m).__name__)
"""


@pytest.mark.slow  # a second Python process importing torch and transformers
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_process_with_only_transformers_loads_it(kind, tmp_path):
    m = make(kind)
    d = tmp_path / "m"
    m.save_pretrained(d)
    ids = torch.randint(3, 128, (2, 21))
    with torch.no_grad():
        torch.save(m(ids).logits, d / "logits.pt")
    torch.save(ids, d / "ids.pt")
    torch.save(m.generate(ids, max_new_tokens=6, do_sample=False), d / "generated.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "child.py"), str(d), sysconfig.get_paths()["purelib"]],
                       capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    found = re.search(r"DIFF (\S+) (\S+)", p.stdout)  # after transformers' trust_remote_code prompt, on its line
    assert found, p.stdout[-2000:] + p.stderr[-4000:]
    # the child runs at one thread: float sums may differ in the last bits from a multi-threaded parent
    assert float(found.group(1)) < 1e-5 and found.group(2) == type(m).__name__
