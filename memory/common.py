"""Pieces shared by the memory wrappers: errors, architecture checks, wrapper save/load, and the
segment-wise next-token loss.

A wrapper (Infini-attention, AutoCompressor) is an ``nn.Module`` holding a Hugging Face causal LM
(``self.base``) plus its own small parameters. It is saved as one directory: the base model's
``config.json``, the wrapper's own JSON config, and every weight in ``model.safetensors`` (written
by ``safetensors.torch.save_model``, which drops the duplicate of tied embeddings). That file is
also what Hugging Face ``Trainer`` reads back when resuming, so checkpoints and ``from_pretrained``
share one format and no hub access is ever needed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from retromem.errors import RetromemError, UnsupportedModelError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MEMORY_CONFIG_FILE = "memory_config.json"  # the wrapper's kind and config; marks a saved memory model


def check_architecture(model: Any, allowed: set[str], what: str) -> str:
    """The model_type of ``model``, or an UnsupportedModelError naming what is allowed."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in allowed:
        raise UnsupportedModelError(
            f"{what} supports Hugging Face causal LMs of model_type {sorted(allowed)}, got "
            f"{type(model).__name__} (model_type={model_type!r})")
    return model_type


def check_input_ids(input_ids: Any) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"`input_ids` must be an integer torch.Tensor of shape (batch, length), got {type(input_ids).__name__}"
                        + (f" of dtype {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else ""))
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"`input_ids` must have shape (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    return input_ids.long()


def segment_bounds(length: int, segment_lengths: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] covering ``length`` tokens: the given lengths, then the last one repeated."""
    bounds, start, i = [], 0, 0
    while start < length:
        n = segment_lengths[min(i, len(segment_lengths) - 1)]
        bounds.append((start, min(start + n, length)))
        start += n
        i += 1
    return bounds


class SegmentLoss:
    """Next-token cross-entropy accumulated segment by segment.

    The last logit of segment s predicts the first label of segment s+1, so the loss over a
    segmented pass equals the loss of one pass over the whole sequence (labels shifted by one,
    -100 ignored) while only one segment's logits exist at a time.

    ``weights`` (same shape as labels, >= 0) weight each label's cross-entropy: the loss is then
    Σ w·CE / Σ w over the labels that are not ignored (None: every label weighs 1, the mean).
    """

    def __init__(self, labels: torch.Tensor | None, weights: torch.Tensor | None = None) -> None:
        if weights is not None:
            if labels is None or weights.shape != labels.shape:
                raise ValueError(f"`label_weights` must have the shape of labels "
                                 f"{None if labels is None else tuple(labels.shape)}, got {tuple(weights.shape)}")
            if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
                raise ValueError("`label_weights` must be finite and >= 0")
        self.labels = labels
        self.weights = weights
        self.total: torch.Tensor | None = None
        self.count: torch.Tensor | float = 0.0

    def add(self, logits: torch.Tensor, start: int, end: int) -> None:
        if self.labels is None:
            return
        labels = self.labels[:, start + 1:end + 1]  # (B, <=T): the last segment has one fewer target
        target = labels.reshape(-1)
        w = (target != -100).float()
        if not bool(w.any()):
            return
        if self.weights is not None:
            w = w * self.weights[:, start + 1:end + 1].reshape(-1).float()
        logits = logits[:, :labels.shape[1]]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target, ignore_index=-100, reduction="none")
        loss = (ce * w).sum()
        self.total = loss if self.total is None else self.total + loss
        self.count = self.count + w.sum()

    def value(self) -> torch.Tensor | None:
        if self.total is None:
            return None
        return self.total / self.count


def save_wrapper(module: torch.nn.Module, out_dir: str | Path, kind: str, config: dict[str, Any]) -> Path:
    """Write ``module`` (a memory wrapper around ``module.base``) as a self-contained directory."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = module.base
    base.config.save_pretrained(out)
    (out / MEMORY_CONFIG_FILE).write_text(json.dumps({"kind": kind, "config": config}, indent=2))
    save_model(module, str(out / WEIGHTS_FILE))
    return out


def read_wrapper_config(path: str | Path, kind: str) -> dict[str, Any]:
    p = Path(path) / MEMORY_CONFIG_FILE
    if not p.is_file():
        raise RetromemError(f"{path} is not a saved memory model: {p.name} is missing")
    data = json.loads(p.read_text())
    if data.get("kind") != kind:
        raise RetromemError(f"{path} holds a {data.get('kind')!r} model, not {kind!r}")
    return data["config"]


def base_from_config(path: str | Path):
    """An untrained base causal LM built from the config.json in ``path`` (weights loaded later)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    return AutoModelForCausalLM.from_config(config)


class WrapperOutput:
    """What a memory wrapper's ``forward`` returns (a dataclass with ``loss`` and ``logits`` first),
    readable the way Hugging Face ``Trainer`` reads model outputs: ``outputs["loss"]``,
    ``outputs[0]`` (the loss when there is one), ``outputs.keys()``."""

    def __getitem__(self, key: str | int | slice):  # Trainer reads outputs[0] as the loss
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(getattr(self, k) for k in self.keys())[key]

    def keys(self):
        return [k for k in ("loss", "logits") if getattr(self, k) is not None]


class MemoryWrapper(torch.nn.Module):
    """Base of the memory wrappers: a Hugging Face causal LM (``self.base``) plus the wrapper's own
    parameters and ``memory_config``; saved and loaded as one directory (see the module docstring)."""

    kind: ClassVar[str]  # recorded in memory_config.json
    config_class: ClassVar[type]  # the wrapper's own config dataclass

    def save_pretrained(self, out_dir: str | Path) -> Path:
        return save_wrapper(self, out_dir, self.kind, asdict(self.memory_config))

    @classmethod
    def from_pretrained(cls, path: str | Path):
        cfg = cls.config_class(**read_wrapper_config(path, cls.kind))
        model = cls(base_from_config(path), cfg)
        load_weights(model, path)
        model.eval()
        return model


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    from safetensors.torch import load_model

    missing, unexpected = load_model(module, str(Path(path) / WEIGHTS_FILE), strict=False)
    # tied weights are stored once; anything else missing is a real mismatch
    real_missing = [k for k in missing if "lm_head" not in k and "wte" not in k and "embed_tokens" not in k]
    if real_missing or unexpected:
        raise RetromemError(f"weights in {path} do not fit the model: missing {real_missing[:5]}, unexpected {list(unexpected)[:5]}")
