"""Saving and loading RETRO models: RETROfit weights with the base model they belong to, or a whole
``RetroForCausalLM``; and the model that generation uses when none is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from retromem.datastore.integrity import check_model_dir, seal_model_dir
from retromem.errors import ConfigError

BASE_FILE = "retro_base.json"  # which base model a directory of RETROfit weights belongs to
DEFAULT_BASE_MODEL = "smollm2-135m"


def is_retrofitted(model: torch.nn.Module) -> bool:
    return getattr(model, "retro_config", None) is not None


def save_model(model: torch.nn.Module, tokenizer: Any, out: str | Path, base: str | None) -> Path:
    """RETROfit: the RETRO weights alone + which base they belong to; from scratch: save_pretrained."""
    from retromem.retro.retrofit import save_retro_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_retrofitted(model):
        save_retro_weights(model, out)
        (out / BASE_FILE).write_text(json.dumps({"base_model": base}) + "\n")
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    seal_model_dir(out)
    return out


def load_retro_model(path: str | Path, base_model: str | None = None) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer) from a directory written by :func:`save_model` (or Trainer checkpoint).

    RETROfit weights are loaded onto ``base_model`` (default: the base recorded with them)."""
    from retromem.retro.retrofit import CONFIG_FILE, WEIGHTS_FILE, load_retro_weights
    from retromem.models import load_causal_lm

    p = Path(path)
    check_model_dir(p)
    if (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file():
        base_name = base_model or recorded_base_model(p)
        if base_name is None:
            raise ConfigError(f"{p} holds RETROfit weights but not the base model they belong to; pass --base-model")
        base, tok = load_causal_lm(base_name)
        return load_retro_weights(base, p).eval(), tok
    if (p / "config.json").is_file():
        import retromem.retro  # noqa: F401  registers model_type "retro"
        from transformers import AutoModelForCausalLM

        from retromem.datastore.tokenizer import load_hf_tokenizer

        model = AutoModelForCausalLM.from_pretrained(str(p)).eval()
        if getattr(model.config, "model_type", None) != "retro":
            raise ConfigError(f"{p} holds a {model.config.model_type!r} model, not a RETRO model (RETROfit weights or "
                              "a RetroForCausalLM)")
        return model, load_hf_tokenizer(str(p))
    raise ConfigError(f"{p} holds no RETRO model: expected RETROfit weights (retro_weights.safetensors) or a "
                      "saved RetroForCausalLM (config.json)")


def recorded_base_model(path: str | Path) -> str | None:
    """The base model recorded beside RETROfit weights at ``path``, or None."""
    f = Path(path) / BASE_FILE
    return json.loads(f.read_text())["base_model"] if f.is_file() else None


def load_generation_model(model_path: str | None, base_model: str | None, chunk_length: int) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) to generate with: a trained RETRO model from ``model_path``, else
    ``base_model`` (default SmolLM2-135M) RETROfitted with untrained, zero-gated blocks, so that its
    text equals the base model's until it is trained."""
    from retromem.models import load_causal_lm
    from retromem.retro.retrofit import retrofit

    if model_path:
        return load_retro_model(model_path, base_model)
    base, tok = load_causal_lm(base_model or DEFAULT_BASE_MODEL)
    return retrofit(base, chunk_length=chunk_length, neighbour_length=2 * chunk_length).eval(), tok
