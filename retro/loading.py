"""Saving and loading RETRO models, and the model that generation uses when none is given.

:func:`save_model` writes a self-contained Hugging Face directory (``auto_map`` and the standalone
modeling code, a model card with the datastore, embedder and training data, checksums): a
``RetroForCausalLM`` whole; a RETROfit as its RETRO weights alone pinned to its base (name, path
and weights sha256), or whole with ``weights="full"``. :func:`load_retro_model` reads those, and the
older RETROfit layout (``retro_weights.safetensors`` + ``retro_config.json`` + ``retro_base.json``)."""

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


def model_card(model: torch.nn.Module, *, datastore_id: str | None = None, datastore_version: Any = None,
               embedder: str | None = None, training_data: str | None = None,
               extra: dict[str, Any] | None = None) -> Any:
    """The model card of a RETRO model (what it is, what it read, how to load it)."""
    from retromem.hf_export import ModelCard

    if is_retrofitted(model):
        rc = model.retro_config
        title = f"RETROfit of {model.config.base_model_name or model.config.base_model_type}"
        summary = (f"A pretrained {model.config.base_model_type} decoder (frozen) with a RETRO neighbour encoder and "
                   f"chunked cross-attention on layers {rc.retro_layers}: it reads k={rc.num_neighbours} retrieved "
                   f"neighbours of r={rc.neighbour_length} tokens for every chunk of m={rc.chunk_length} tokens. "
                   "Without neighbours it is the base model.")
    else:
        rc = model.config
        title = "RETRO (chunked cross-attention over retrieved neighbours)"
        summary = (f"A Llama-style decoder of {rc.num_hidden_layers} layers trained from scratch with a neighbour "
                   f"encoder and chunked cross-attention on layers {rc.retro_layers}: it reads k={rc.num_neighbours} "
                   f"retrieved neighbours of r={rc.neighbour_length} tokens for every chunk of m={rc.chunk_length} tokens.")
    usage = ("from transformers import AutoModelForCausalLM\n\n"
             "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\", trust_remote_code=True)\n"
             "# neighbour_ids: (batch, n_chunks, k, r) token ids of each chunk's neighbours; or retriever=fn(chunk_ids,\n"
             "# chunk_index, rows) -> (rows, k, r) ids, called as each chunk completes during generate()\n"
             "out = model.generate(input_ids, neighbour_ids=neighbour_ids, max_new_tokens=64)")
    return ModelCard(title=title, summary=summary, model_type=model.config.model_type, datastore_id=datastore_id,
                     datastore_version=datastore_version, embedder=embedder, training_data=training_data, usage=usage,
                     extra={"chunk_length": rc.chunk_length, "num_neighbours": rc.num_neighbours,
                            "retro_layers": list(rc.retro_layers), **(extra or {})}, tags=("retro",))


def save_retro_checkpoint(model: torch.nn.Module, tokenizer: Any, out: str | Path, base: str | None) -> Path:
    """A RETROfit training checkpoint: the RETRO weights alone (``retro_weights.safetensors``, what
    ``load_retro_checkpoint`` resumes from), which base they belong to, the tokenizer, checksums."""
    from retromem.retro.retrofit import save_retro_weights

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_retro_weights(model, out)
    (out / BASE_FILE).write_text(json.dumps({"base_model": base}) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    seal_model_dir(out)
    return out


def save_model(model: torch.nn.Module, tokenizer: Any, out: str | Path, base: str | None, *, weights: str = "retro",
               card: Any = None) -> Path:
    """A self-contained Hugging Face directory (see the module docstring); ``base`` is the name the RETROfit's
    base model was loaded by (a built-in name, a directory or a hub id); ``card``: a ModelCard (default:
    :func:`model_card` without datastore facts)."""
    from retromem.hf_export import export_model

    out = Path(out)
    card = card if card is not None else model_card(model)
    if is_retrofitted(model):
        from retromem.models import model_dir
        from retromem.retro.retrofit import save_retrofit

        path = model_dir(base) if base else None
        save_retrofit(model, out, card=card, tokenizer=tokenizer, weights=weights, base_model_name=base,
                      base_model_path=path if path and Path(path).is_dir() else None, seal=seal_model_dir)
    else:
        export_model(model, out, card=card, tokenizer=tokenizer, seal=seal_model_dir)
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
        import retromem.retro  # noqa: F401  registers model_types "retro" and "retrofit"
        from transformers import AutoModelForCausalLM

        from retromem.datastore.tokenizer import load_hf_tokenizer
        from retromem.retro.configuration_retro import RetrofitConfig

        if json.loads((p / "config.json").read_text()).get("model_type") == RetrofitConfig.model_type:
            return _load_retrofit(p, base_model)
        model = AutoModelForCausalLM.from_pretrained(str(p)).eval()
        if getattr(model.config, "model_type", None) != "retro":
            raise ConfigError(f"{p} holds a {model.config.model_type!r} model, not a RETRO model (RETROfit weights or "
                              "a RetroForCausalLM)")
        return model, load_hf_tokenizer(str(p))
    raise ConfigError(f"{p} holds no RETRO model: expected RETROfit weights (retro_weights.safetensors) or a "
                      "saved RetroForCausalLM (config.json)")


def _load_retrofit(p: Path, base_model: str | None) -> tuple[torch.nn.Module, Any]:
    """A RETROfit directory written by :func:`save_model`: RETRO weights alone go onto the recorded base
    (resolved as the project resolves model names, so built-in names work), or ``base_model``."""
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.models import load_causal_lm
    from retromem.retro.configuration_retro import RetrofitConfig
    from retromem.retro.modeling_retro import RetrofitForCausalLM

    config = RetrofitConfig.from_pretrained(str(p))
    tok = None
    try:
        if config.weights == "retro":
            name = base_model or config.base_model_name or config.base_model_path
            if name is None:
                raise ConfigError(f"{p} holds RETROfit weights but not the base model they belong to; pass --base-model")
            base, tok = load_causal_lm(name)
            model = RetrofitForCausalLM.from_pretrained(str(p), base_model=base)
        else:
            model = RetrofitForCausalLM.from_pretrained(str(p))
    except ValueError as exc:  # a base with another hash, weights that do not fit: the message says which
        raise ConfigError(str(exc)) from exc
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        tok = load_hf_tokenizer(str(p))
    if tok is None:
        raise ConfigError(f"{p} holds no tokenizer and its base model gave none")
    return model.eval(), tok


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
