"""RETROfit: turn a pretrained Hugging Face decoder into a RETRO model by inserting a neighbour
encoder and chunked cross-attention blocks, with the base model frozen.

``retrofit(model, config)`` wraps a Hugging Face causal LM of a supported family (Llama, Mistral,
Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3, OLMo-2, SmolLM3, GPT-NeoX, GPT-2; any other is refused
by name) in a :class:`~retromem.retro.modeling_retro.RetrofitForCausalLM`: the new blocks hang on the
chosen decoder layers of the model itself (no copy), every base parameter gets
``requires_grad=False``, and the CCA output projections start at zero, so the retrofitted model's
logits equal the base model's exactly until training moves them. Afterwards
``model(input_ids, neighbour_ids=...)`` retrieves (with ``neighbour_attention_mask`` for padded
neighbours); without ``neighbour_ids`` it is the base model; ``model.generate(...)`` decodes with a
key/value cache, reading fixed ``neighbour_ids`` and/or calling a ``retriever`` at each chunk boundary.

Saving: ``save_retrofit(model, dir, weights="retro" | "full")`` writes a Hugging Face directory
(``model_type: retrofit``, ``auto_map`` and the standalone modeling code, a model card, checksums)
that ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` opens in a process without
retromem; with ``weights="retro"`` it holds the RETRO weights alone and names its base (name, local
path and the sha256 of its weights), and loading refuses a base with another hash. The older
``save_retro_weights`` / ``load_retro_weights`` (``retro_weights.safetensors`` + ``retro_config.json``,
what training checkpoints hold) still work; their tensor names are the base model's
(``model.layers.3.retro_cca...``).

``cca_placement`` (a ``retro_config_for`` setting) works for every family: ``before_mlp`` (the
paper's) hooks the layer's self-attention module (``self_attn``, GPT-2's ``attn``, GPT-NeoX's
``attention``), so CCA's update joins the residual before the layer's feed-forward (in families with a
norm after attention, Gemma2's, it goes through that norm; in GPT-NeoX's parallel residual the
feed-forward reads the layer input), and the neighbour encoder reads the first RETRO layer's residual
after its self-attention; ``after_layer`` adds CCA to the layer's output and the encoder reads that
output. Unset, RETROfit keeps ``after_layer`` without relative positions (what its saved weights were
trained with); see ``RetroConfig``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from retromem.errors import ConfigError
from retromem.retro.configuration_retro import RetroConfig, RetrofitConfig
from retromem.retro.modeling_retro import DECODER_LAYERS, RetrofitForCausalLM, base_weights_sha256, decoder_layers

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(sorted(DECODER_LAYERS))
WEIGHTS_FILE = "retro_weights.safetensors"
CONFIG_FILE = "retro_config.json"
# decoder fields a RetroConfig takes from the base model's config
_DECODER_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _model_type(model: Any) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def check_family(model: Any) -> str:
    """The model_type of a supported base model; ConfigError naming the family otherwise."""
    model_type = _model_type(model)
    if model_type not in DECODER_LAYERS:
        raise ConfigError(f"RETROfit supports Hugging Face causal LMs of model_type {', '.join(SUPPORTED_MODEL_TYPES)} "
                          f"(e.g. LlamaForCausalLM, GPT2LMHeadModel); got {type(model).__name__} with model_type "
                          f"{model_type!r}")
    try:
        decoder_layers(model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return model_type


def retro_config_for(model_config: Any, **retrieval: Any) -> RetroConfig:
    """A RetroConfig whose decoder fields are the base model's (``model_config``: its HF config), with
    ``retrieval`` settings (chunk_length, num_neighbours, retro_layers, encoder_*, ...) and ``gated=True``."""
    model_type = getattr(model_config, "model_type", None)
    if model_type not in DECODER_LAYERS:
        raise ConfigError(f"RETROfit supports model_type {', '.join(SUPPORTED_MODEL_TYPES)}, got {model_type!r}")
    clash = set(retrieval) & {*_DECODER_FIELDS, "gated"}
    if clash:
        raise ConfigError(f"{sorted(clash)} come from the base model's config and cannot be overridden in RETROfit")
    decoder = {name: getattr(model_config, name) for name in _DECODER_FIELDS}
    decoder["intermediate_size"] = getattr(model_config, "intermediate_size", None) or 4 * decoder["hidden_size"]
    eps = next((getattr(model_config, name) for name in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")
                if isinstance(getattr(model_config, name, None), float)), 1e-5)
    decoder["rms_norm_eps"] = eps
    decoder["num_key_value_heads"] = getattr(model_config, "num_key_value_heads", None) or decoder["num_attention_heads"]
    decoder["max_position_embeddings"] = (getattr(model_config, "max_position_embeddings", None)
                                          or getattr(model_config, "n_positions", None) or 2048)
    return RetroConfig(**decoder, **retrieval, gated=True)


def _check_matches(config: RetroConfig, model: nn.Module) -> None:
    for name in _DECODER_FIELDS:
        want, got = getattr(model.config, name), getattr(config, name)
        if want != got:
            raise ConfigError(f"RetroConfig `{name}` is {got} but the base model has {want}; build the config with "
                              f"retro.retrofit.retro_config_for(model.config, ...)")


def retrofit(model: nn.Module, config: RetroConfig | None = None, **retrieval: Any) -> RetrofitForCausalLM:
    """A :class:`RetrofitForCausalLM` around ``model`` (whose layers receive the RETRO blocks; its own
    parameters are frozen).

    config: from :func:`retro_config_for` (its decoder fields must match the model); None builds one
        from ``model.config`` and ``retrieval`` keyword settings.
    After this, ``wrapped(input_ids, neighbour_ids=(B, n_chunks, k, r) ids, ...)`` runs with retrieval.
    """
    if isinstance(model, RetrofitForCausalLM):
        raise ConfigError(f"{type(model).__name__} is already RETROfitted; retrofit a fresh base model")
    check_family(model)
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
    name = getattr(model.config, "_name_or_path", None) or None
    try:
        wrapped = RetrofitForCausalLM(RetrofitConfig.for_base(model.config, config, base_model_name=name), base=model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    logger.info("RETROfitted %s at layers %s: %.2f%% of parameters trainable", type(model).__name__,
                config.retro_layers, 100 * trainable_fraction(wrapped))
    return wrapped


def retro_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inserted (RETRO) parameters of a retrofitted model, by their names in the base model."""
    _require_retrofitted(model)
    return model.retro_state_dict()


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
    (out / "base_model.json").write_text(json.dumps({"class": type(model.base).__name__,
                                                     "model_type": _model_type(model.base)}) + "\n")
    return out


def load_retro_weights(model: nn.Module, path: str | Path) -> RetrofitForCausalLM:
    """Retrofits ``model`` (a base model, or one already retrofitted with the same config) with the weights
    saved by :func:`save_retro_weights` at ``path``; returns the retrofitted model."""
    from safetensors.torch import load_file

    src = Path(path)
    if not (src / WEIGHTS_FILE).is_file() or not (src / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{src} holds no RETRO weights: expected {WEIGHTS_FILE} and {CONFIG_FILE} "
                                f"(written by save_retro_weights)")
    config = RetroConfig.from_json_file(str(src / CONFIG_FILE))
    if not isinstance(model, RetrofitForCausalLM):
        model = retrofit(model, config)
    elif model.retro_config.to_dict() != config.to_dict():
        raise ConfigError(f"{type(model).__name__} is retrofitted with another RetroConfig than the one in {src}")
    tensors = load_file(str(src / WEIGHTS_FILE))
    own = retro_state_dict(model)
    if set(tensors) != set(own):
        raise ConfigError(f"RETRO weights in {src} do not fit this model: missing {sorted(set(own) - set(tensors))[:5]}, "
                          f"unexpected {sorted(set(tensors) - set(own))[:5]}")
    missing, unexpected = model.base.load_state_dict(tensors, strict=False)
    assert not unexpected, unexpected  # checked above
    return model


def _require_retrofitted(model: nn.Module) -> None:
    if not isinstance(model, RetrofitForCausalLM):
        raise ConfigError(f"{type(model).__name__} is not RETROfitted; call retro.retrofit(model, config) first")


def save_retrofit(model: RetrofitForCausalLM, out: str | Path, *, card: Any, tokenizer: Any = None,
                  weights: str = "retro", base_model_name: str | None = None, base_model_path: str | None = None,
                  seal: Any = None) -> Path:
    """Writes ``model`` as a self-contained Hugging Face directory (:func:`retromem.hf_export.export_model`).

    weights: ``retro`` (the RETRO blocks alone, a few MB, with the base pinned by name, local path and the
        sha256 of its weights) or ``full`` (base and blocks).
    base_model_name / base_model_path: how to find the base again (a name or hub id; a local directory).
    card: a :class:`retromem.hf_export.ModelCard` (its base-model fields are filled in here).
    """
    from dataclasses import replace

    from retromem.hf_export import export_model
    from retromem.retro.configuration_retro import RETROFIT_WEIGHTS

    _require_retrofitted(model)
    if weights not in RETROFIT_WEIGHTS:
        raise ConfigError(f"`weights` must be one of {', '.join(RETROFIT_WEIGHTS)}, got {weights!r}")
    cfg = model.config
    if cfg.base_model_sha256 is None:  # the base is frozen: hash it once
        cfg.base_model_sha256 = base_weights_sha256(model.base)
    if base_model_name is not None:
        cfg.base_model_name = base_model_name
    if base_model_path is not None:
        cfg.base_model_path = str(Path(base_model_path).resolve()) if Path(base_model_path).is_dir() else base_model_path
    if weights == "retro" and not (cfg.base_model_name or cfg.base_model_path):
        raise ConfigError("saving RETRO weights alone needs the base model's name or path (`base_model_name`), so "
                          "that loading can find it again; or save weights='full'")
    card = replace(card, base_model=cfg.base_model_name or cfg.base_model_path, base_model_sha256=cfg.base_model_sha256)
    state_dict = None
    if weights == "retro":
        state_dict = {f"base.{name}": t.detach().contiguous() for name, t in model.retro_state_dict().items()}
    previous, cfg.weights = cfg.weights, weights
    try:
        return export_model(model, out, card=card, tokenizer=tokenizer, state_dict=state_dict, seal=seal)
    finally:
        cfg.weights = previous


def load_retro_checkpoint(model: RetrofitForCausalLM, path: str | Path) -> RetrofitForCausalLM:
    """Loads, in place, the RETRO weights of a directory written by :func:`save_retrofit` (either kind) or by
    :func:`save_retro_weights` into ``model`` (retrofitted with the same settings): Trainer's resume."""
    from safetensors.torch import load_file

    _require_retrofitted(model)
    src = Path(path)
    if (src / WEIGHTS_FILE).is_file():
        return load_retro_weights(model, src)
    config = RetrofitConfig.from_pretrained(str(src))
    if config.get_retro_config().to_dict() != model.retro_config.to_dict():
        raise ConfigError(f"{type(model).__name__} is retrofitted with another RetroConfig than the one in {src}")
    tensors = load_file(str(src / "model.safetensors"))
    own = {f"base.{name}" for name in model.retro_state_dict()}
    if not own <= set(tensors):
        raise ConfigError(f"RETRO weights in {src} do not fit this model: missing {sorted(own - set(tensors))[:5]}")
    model.load_state_dict({k: tensors[k] for k in own}, strict=False)
    return model
