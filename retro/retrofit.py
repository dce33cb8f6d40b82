"""RETROfit: turn a pretrained Hugging Face decoder into a RETRO model by inserting a neighbour
encoder and chunked cross-attention blocks, with the base model frozen.

``retrofit(model, config)`` works in place on a ``LlamaForCausalLM`` (and the Llama-shaped
Mistral / Qwen2 classes) or a ``GPT2LMHeadModel``: the new blocks hang on the chosen decoder
layers (see :mod:`retromem.retro.modeling_retro`), every base parameter gets ``requires_grad=False``, and
the CCA output projections start at zero, so the retrofitted model's logits equal the base
model's exactly until training moves them. Afterwards ``model(input_ids, neighbour_ids=...)``
retrieves (with ``neighbour_attention_mask`` for padded neighbours); without ``neighbour_ids``
it is the base model. ``model.generate(..., neighbour_ids=...)`` decodes with fixed neighbours. The base parameter names are
unchanged; the new ones contain ``retro_cca`` / ``retro_encoder``, and
``save_retro_weights`` / ``load_retro_weights`` store and restore them alone (a few MB instead
of the whole model).

``cca_placement`` (a ``retro_config_for`` setting) works for both families: ``before_mlp`` (the
paper's) hooks the layer's self-attention module (``self_attn`` of Llama-style layers, ``attn`` of
GPT-2), so CCA's update joins the residual before the layer's feed-forward, and the neighbour
encoder reads the first RETRO layer's residual after its self-attention; ``after_layer`` adds CCA to
the layer's output and the encoder reads that output. Unset, RETROfit keeps ``after_layer`` without
relative positions (what its saved weights were trained with); see ``RetroConfig``.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retromem.retro.configuration_retro import RetroConfig
from retromem.retro.modeling_retro import (CCA_ATTR, ENCODER_ATTR, RetroContext, RetroState, attach_retro_blocks,
                                  check_neighbour_ids, check_neighbour_mask, check_no_cache_with_neighbours)
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2")
WEIGHTS_FILE = "retro_weights.safetensors"
CONFIG_FILE = "retro_config.json"
# decoder fields a RetroConfig takes from the base model's config
_DECODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """(decoder layers, token embedding) of a supported model; ConfigError for any other."""
    model_type = _model_type(model)
    if model_type in LLAMA_LIKE and hasattr(model, "model") and hasattr(model.model, "layers"):
        return model.model.layers, model.get_input_embeddings()
    if model_type == "gpt2" and hasattr(model, "transformer"):
        return model.transformer.h, model.get_input_embeddings()
    raise ConfigError(f"RETROfit supports Hugging Face causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
                      f"(e.g. LlamaForCausalLM, GPT2LMHeadModel); got {type(model).__name__} with model_type "
                      f"{model_type!r}")


def retro_config_for(model_config: Any, **retrieval: Any) -> RetroConfig:
    """A RetroConfig whose decoder fields are the base model's (``model_config``: its HF config), with
    ``retrieval`` settings (chunk_length, num_neighbours, retro_layers, encoder_*, ...) and ``gated=True``."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"RETROfit supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    clash = set(retrieval) & {*_DECODER_FIELDS, "gated"}
    if clash:
        raise ConfigError(f"{sorted(clash)} come from the base model's config and cannot be overridden in RETROfit")
    decoder = {name: getattr(model_config, name) for name in _DECODER_FIELDS}
    decoder["intermediate_size"] = getattr(model_config, "intermediate_size", None) or 4 * decoder["hidden_size"]
    decoder["rms_norm_eps"] = getattr(model_config, "rms_norm_eps", None) or getattr(model_config, "layer_norm_epsilon", 1e-5)
    if model_type == "gpt2":  # GPT-2 has no KV groups; its config only has n_positions
        decoder["max_position_embeddings"] = model_config.n_positions
    else:
        decoder["num_key_value_heads"] = model_config.num_key_value_heads
        decoder["max_position_embeddings"] = model_config.max_position_embeddings
    return RetroConfig(**decoder, **retrieval, gated=True)


def _check_matches(config: RetroConfig, model: nn.Module) -> None:
    for name in _DECODER_FIELDS:
        want, got = getattr(model.config, name), getattr(config, name)
        if want != got:
            raise ConfigError(f"RetroConfig `{name}` is {got} but the base model has {want}; build the config with "
                              f"retro.retrofit.retro_config_for(model.config, ...)")


def retrofit(model: nn.Module, config: RetroConfig | None = None, **retrieval: Any) -> nn.Module:
    """Inserts RETRO blocks into ``model`` (in place; also returned) and freezes its own parameters.

    config: from :func:`retro_config_for` (its decoder fields must match the model); None builds one
        from ``model.config`` and ``retrieval`` keyword settings.
    After this, ``model(input_ids, neighbour_ids=(B, n_chunks, k, r) ids, ...)`` runs with retrieval.
    """
    layers, _ = _decoder_parts(model)
    if getattr(model, "retro_config", None) is not None:
        raise ConfigError(f"{type(model).__name__} is already RETROfitted; retrofit a fresh base model")
    if config is None:
        config = retro_config_for(model.config, **retrieval)
    elif retrieval:
        raise TypeError(f"give either `config` or retrieval keyword settings, not both (got {sorted(retrieval)})")
    if not isinstance(config, RetroConfig):
        raise TypeError(f"`config` must be a RetroConfig, got {type(config).__name__}")
    _check_matches(config, model)
    if not config.gated:
        raise ConfigError("RETROfit needs `gated=True` (CCA output projections start at zero, so the model starts "
                          "equal to the base model); build the config with retro_config_for")

    for p in model.parameters():
        p.requires_grad_(False)
    context = RetroContext()
    ref = next(model.parameters())
    attach_retro_blocks(layers, config, config.hidden_size, context)
    for module in layers:  # new blocks on the base model's device and dtype
        for name in (CCA_ATTR, ENCODER_ATTR):
            if hasattr(module, name):
                getattr(module, name).to(device=ref.device, dtype=ref.dtype)

    # hooks and the generate() adapter read the config and context from the model they run on (no closures),
    # so a deep copy of a retrofitted model is an independent retrofitted model
    model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_for_generation, model)
    model.register_forward_pre_hook(_before_forward, with_kwargs=True)
    model.register_forward_hook(_after_forward, with_kwargs=True, always_call=True)
    model.retro_config = config
    model.retro_context = context
    trainable = trainable_fraction(model)
    logger.info("RETROfitted %s at layers %s: %.2f%% of parameters trainable", type(model).__name__,
                config.retro_layers, 100 * trainable)
    return model


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Takes ``neighbour_ids`` / ``neighbour_attention_mask`` out of the call and into the RETRO context."""
    config, context = model.retro_config, model.retro_context
    neighbour_ids = kwargs.pop("neighbour_ids", None)
    neighbour_mask = kwargs.pop("neighbour_attention_mask", None)
    context.state = None
    if neighbour_mask is not None and neighbour_ids is None:
        raise ValueError("`neighbour_attention_mask` was given without `neighbour_ids`")
    if neighbour_ids is not None:
        tokens = args[0] if args else kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        check_neighbour_ids(neighbour_ids, tokens.shape[0], config)
        check_no_cache_with_neighbours(kwargs.get("past_key_values"))
        kwargs["use_cache"] = False
        mask = None if neighbour_mask is None else check_neighbour_mask(neighbour_mask, neighbour_ids)
        embeds = model.get_input_embeddings()(neighbour_ids)  # (B, C, k, r, D), the frozen shared embedding
        context.state = RetroState(embeds, mask)
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    model.retro_context.state = None  # a later forward without neighbours must not see these


def _prepare_inputs_for_generation(model: nn.Module, input_ids: torch.Tensor, past_key_values: Any = None,
                                   neighbour_ids: torch.Tensor | None = None,
                                   neighbour_attention_mask: torch.Tensor | None = None, **kwargs: Any) -> dict:
    """generate() accepts only the model kwargs this signature names. With fixed neighbours every step
    re-reads the whole sequence (no key/value cache, see retro.modeling_retro)."""
    if neighbour_ids is None:
        return type(model).prepare_inputs_for_generation(model, input_ids, past_key_values=past_key_values, **kwargs)
    return {"input_ids": input_ids, "neighbour_ids": neighbour_ids, "attention_mask": kwargs.get("attention_mask"),
            "neighbour_attention_mask": neighbour_attention_mask, "use_cache": False}


def retro_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inserted (RETRO) parameters of a retrofitted model, by their names in the model."""
    _require_retrofitted(model)
    return {name: t for name, t in model.state_dict().items() if f".{CCA_ATTR}." in name or f".{ENCODER_ATTR}." in name}


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters / all parameters (shared tensors counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    return sum(p.numel() for p in params if p.requires_grad) / total


def save_retro_weights(model: nn.Module, path: str | Path) -> Path:
    """Writes the inserted weights alone (safetensors) and the RetroConfig into directory ``path``."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in retro_state_dict(model).items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_FILE))
    model.retro_config.to_json_file(str(out / CONFIG_FILE))
    (out / "base_model.json").write_text(json.dumps({"class": type(model).__name__,
                                                     "model_type": _model_type(model)}) + "\n")
    return out


def load_retro_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Retrofits ``model`` (a base model, or one already retrofitted with the same config) with the weights
    saved by :func:`save_retro_weights` at ``path``; returns it."""
    from safetensors.torch import load_file

    src = Path(path)
    if not (src / WEIGHTS_FILE).is_file() or not (src / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{src} holds no RETRO weights: expected {WEIGHTS_FILE} and {CONFIG_FILE} "
                                f"(written by save_retro_weights)")
    config = RetroConfig.from_json_file(str(src / CONFIG_FILE))
    if getattr(model, "retro_config", None) is None:
        retrofit(model, config)
    elif model.retro_config.to_dict() != config.to_dict():
        raise ConfigError(f"{type(model).__name__} is retrofitted with another RetroConfig than the one in {src}")
    tensors = load_file(str(src / WEIGHTS_FILE))
    own = retro_state_dict(model)
    if set(tensors) != set(own):
        raise ConfigError(f"RETRO weights in {src} do not fit this model: missing {sorted(set(own) - set(tensors))[:5]}, "
                          f"unexpected {sorted(set(tensors) - set(own))[:5]}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected  # checked above
    return model


def _require_retrofitted(model: nn.Module) -> None:
    if getattr(model, "retro_config", None) is None:
        raise ConfigError(f"{type(model).__name__} is not RETROfitted; call retro.retrofit(model, config) first")
