"""Loading memory models: a saved memory wrapper (Infini-attention or AutoCompressor, recognised by its
``memory_config.json``), or any causal LM wrapped in a fresh, untrained one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from retromem.errors import ConfigError
from retromem.memory.common import MEMORY_CONFIG_FILE


def is_saved_memory_model(path: str | Path) -> bool:
    return (Path(path) / MEMORY_CONFIG_FILE).is_file()


def load_memory_model(model_path: str, module: Literal["infini", "autocompressor"] = "infini",
                      segment_length: int = 2048) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer): a saved memory model as it was trained, or the causal LM at ``model_path``
    (built-in name, local directory or hub id) wrapped in ``module`` with segments of ``segment_length``."""
    from retromem.datastore.integrity import check_model_dir
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.models import load_causal_lm

    if is_saved_memory_model(model_path):
        check_model_dir(model_path)
        kind = json.loads((Path(model_path) / MEMORY_CONFIG_FILE).read_text()).get("kind")
        wrappers = {cls.kind: cls for cls in (InfiniAttentionLM, AutoCompressorLM)}
        if kind not in wrappers:
            raise ConfigError(f"{model_path}: {MEMORY_CONFIG_FILE} names kind {kind!r}; known: {sorted(wrappers)}")
        return wrappers[kind].from_pretrained(model_path), load_hf_tokenizer(model_path)
    if module not in ("infini", "autocompressor"):
        raise ConfigError(f"`--module` must be infini or autocompressor, got {module!r}")
    try:
        base, tok = load_causal_lm(model_path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if module == "infini":
        return InfiniAttentionLM(base, InfiniAttentionConfig(segment_length=segment_length)), tok
    return AutoCompressorLM(base, AutoCompressorConfig(segment_min=segment_length, segment_max=segment_length)), tok
