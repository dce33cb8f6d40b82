"""Loading memory models: a saved memory model (Infini-attention or AutoCompressor: a Hugging Face
directory of model_type ``infini_attention`` / ``autocompressor``, or one saved before, recognised
by its ``memory_config.json``), or any causal LM wrapped in a fresh, untrained one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from retromem.errors import ConfigError
from retromem.memory.common import MEMORY_CONFIG_FILE

MODEL_TYPES = ("infini_attention", "autocompressor")


def saved_kind(path: str | Path) -> str | None:
    """``infini_attention`` / ``autocompressor`` for a saved memory model directory, else None."""
    p = Path(path)
    if (p / MEMORY_CONFIG_FILE).is_file():  # saved before the models were Hugging Face models
        return json.loads((p / MEMORY_CONFIG_FILE).read_text()).get("kind")
    if (p / "config.json").is_file():
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
        return model_type if model_type in MODEL_TYPES else None
    return None


def is_saved_memory_model(path: str | Path) -> bool:
    return saved_kind(path) is not None


def memory_model_class(kind: str) -> type:
    from retromem.memory.autocompressor import AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionLM

    classes = {"infini_attention": InfiniAttentionLM, "autocompressor": AutoCompressorLM}
    if kind not in classes:
        raise ConfigError(f"a saved memory model names kind {kind!r}; known: {sorted(classes)}")
    return classes[kind]


def load_memory_model(model_path: str, module: Literal["infini", "autocompressor"] = "infini",
                      segment_length: int = 2048) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): a saved memory model as it was trained, or the causal LM at ``model_path``
    (built-in name, local directory or hub id) wrapped in ``module`` with segments of ``segment_length``."""
    from retromem.datastore.integrity import check_model_dir
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.models import load_causal_lm

    kind = saved_kind(model_path)
    if kind is not None:
        check_model_dir(model_path)
        return memory_model_class(kind).from_pretrained(model_path).eval(), load_hf_tokenizer(model_path)
    if module not in ("infini", "autocompressor"):
        raise ConfigError(f"`--module` must be infini or autocompressor, got {module!r}")
    try:
        base, tok = load_causal_lm(model_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if module == "infini":
        return InfiniAttentionLM(base, InfiniAttentionConfig(segment_length=segment_length)), tok
    return AutoCompressorLM(base, AutoCompressorConfig(segment_min=segment_length, segment_max=segment_length)), tok
