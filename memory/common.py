"""Pieces shared by the memory models (Infini-attention, AutoCompressor): errors and validators,
architecture checks, the segment-wise next-token loss, the generation cache, and the Hugging Face
model base class with its save / load (including directories saved before these were Hugging Face
models).

A memory model is a ``PreTrainedModel`` with ``GenerationMixin`` holding a Hugging Face causal LM
(``self.base``) plus its own small parameters; its config has its own ``model_type`` with the base
model's config nested. Saved with ``save_pretrained`` it is a directory with ``auto_map`` and the
modeling code (this file and the model's file), so a process with only ``transformers`` loads it
with ``trust_remote_code=True``. For that reason this file and the model files import nothing of
retromem outside ``try`` blocks (transformers checks the imports of remote code), and use relative
imports among themselves (transformers copies those files along).

Batched prompts with padding: a memory model cuts every row into segments counted from the row's
first real token, so rows padded to a common length have different segment boundaries. Such a
batch is run row by row ("lanes"), each lane without its padding, which makes a padded batch give
exactly what each prompt gives alone; a batch without padding runs as one lane.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

try:  # inside retromem: its error classes and validators
    from retromem.config import (boolean, fail, integer, is_int, is_number, non_negative_int, number, one_of,
                                 optional_non_negative_int, positive_int)
    from retromem.errors import ConfigError, RetromemError, UnsupportedModelError
except ImportError:  # the copy saved beside a model, loaded by transformers alone (trust_remote_code=True)
    import math
    import numbers

    class RetromemError(Exception):  # type: ignore[no-redef]
        pass

    class ConfigError(RetromemError, ValueError):  # type: ignore[no-redef]
        pass

    class UnsupportedModelError(RetromemError, TypeError):  # type: ignore[no-redef]
        pass

    def fail(key: str, must: str, value: Any = ..., *, flag: str | None = None):  # type: ignore[no-redef]
        raise ConfigError(f"`{key}`{f' ({flag})' if flag else ''} must {must}" + ("" if value is ... else f", got {value!r}"))

    def is_int(value: Any) -> bool:  # type: ignore[no-redef]
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:  # type: ignore[no-redef]
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    def positive_int(value: Any, key: str, *, flag: str | None = None) -> int:  # type: ignore[no-redef]
        if not is_int(value) or value < 1:
            fail(key, "be a positive integer", value, flag=flag)
        return value

    def non_negative_int(value: Any, key: str, *, flag: str | None = None) -> int:  # type: ignore[no-redef]
        if not is_int(value) or value < 0:
            fail(key, "be a non-negative integer", value, flag=flag)
        return value

    def optional_non_negative_int(value: Any, key: str, *, flag: str | None = None):  # type: ignore[no-redef]
        return value if value is None else non_negative_int(value, key, flag=flag)

    def integer(value: Any, key: str, **_: Any) -> int:  # type: ignore[no-redef]
        if not is_int(value):
            fail(key, "be an integer", value)
        return value

    def boolean(value: Any, key: str, *, flag: str | None = None) -> bool:  # type: ignore[no-redef]
        if not isinstance(value, bool):
            fail(key, "be true or false", value, flag=flag)
        return value

    def number(value: Any, key: str, *, gt: float | None = None, **_: Any) -> float:  # type: ignore[no-redef]
        if not is_number(value) or (gt is not None and value <= gt):
            fail(key, "be a finite number" + (f" > {gt}" if gt is not None else ""), value)
        return value

    def one_of(value: Any, key: str, choices: Any, *, flag: str | None = None) -> Any:  # type: ignore[no-redef]
        if value not in choices:
            fail(key, f"be one of {', '.join(map(str, choices))}", value, flag=flag)
        return value

from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "RetromemError", "UnsupportedModelError", "boolean", "fail", "integer", "is_int", "is_number",
           "non_negative_int", "number", "one_of", "optional_non_negative_int", "positive_int"]

WEIGHTS_FILE = "model.safetensors"
MEMORY_CONFIG_FILE = "memory_config.json"  # marks a directory saved before the models were Hugging Face models


def check_architecture(model: Any, allowed: set[str] | dict[str, Any], what: str) -> str:
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


def keep_mode(keep_logits: str | None, logits_to_keep: int | torch.Tensor) -> str:
    """"all" | "last" | "none": ``keep_logits`` if given, else Hugging Face's ``logits_to_keep``
    (0: every position, 1: the last; generate() passes 1)."""
    if keep_logits is not None:
        if keep_logits not in ("all", "last", "none"):
            raise ValueError(f"`keep_logits` must be 'all', 'last' or 'none', got {keep_logits!r}")
        return keep_logits
    if isinstance(logits_to_keep, int) and logits_to_keep == 1:
        return "last"
    return "all"


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

    def merge(self, other: "SegmentLoss") -> None:
        """Add another row group's sums (padded batches run row by row; the loss stays a token mean)."""
        if other.total is not None:
            self.total = other.total if self.total is None else self.total + other.total
            self.count = self.count + other.count

    def value(self) -> torch.Tensor | None:
        if self.total is None:
            return None
        return self.total / self.count


# -- generation cache -----------------------------------------------------------------------------

class MemoryCache:
    """What ``generate()`` carries from step to step: the model's state for each lane of rows.

    A lane state (``InfiniMemory``, ``AutoCompressorState``) holds the compressed past (memory /
    summary vectors) and the open segment's key/value cache for its rows; ``per_row`` says whether
    every row is its own lane (a padded batch) or the whole batch is one. ``seen`` counts the input
    columns consumed, padding included (what ``get_seq_length`` tells ``generate``).
    """

    is_compileable = False
    is_linear = (False,)

    def __init__(self) -> None:
        self.lanes: list[Any] = []
        self.per_row = False
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row i of the next step continues row ``beam_idx[i]`` of this one."""
        if not self.per_row:
            for lane in self.lanes:
                lane.select_(beam_idx.to(torch.long))
            return
        taken: set[int] = set()
        lanes = []
        for i in beam_idx.tolist():
            # a row picked twice needs its own copy: lanes are updated in place as they grow
            lanes.append(self.lanes[i] if i not in taken else self.lanes[i].clone())
            taken.add(i)
        self.lanes = lanes


def real_token_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor] | None:
    """None when no row has padding among the new tokens' columns; else, per row, the column indices
    (of ``input_ids``) of its real tokens. ``attention_mask`` covers past + new columns."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -input_ids.shape[1]:]
    if bool(mask.all()):
        return None
    return [torch.nonzero(mask[b], as_tuple=False).flatten() for b in range(input_ids.shape[0])]


def run_lanes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: MemoryCache | None,
              fresh_state: Callable[[int | None], Any], run: Callable[..., tuple[SegmentLoss, torch.Tensor | None]],
              keep: str, labels: torch.Tensor | None, label_weights: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Any]]:
    """(loss, logits, lane states): ``run(ids, state, keep, labels, weights)`` over the whole batch
    as one lane, or row by row without padding (see the module docstring). ``fresh_state(b)`` makes
    the state of row ``b``'s lane (None: the whole batch's) when the cache has none yet."""
    B, T = input_ids.shape
    rows = real_token_rows(input_ids, attention_mask)
    if cache is not None and not cache.lanes:
        cache.per_row = rows is not None
        cache.lanes = [fresh_state(b) for b in range(B)] if cache.per_row else [fresh_state(None)]
    if cache is not None and cache.per_row and rows is None:
        rows = [torch.arange(T, device=input_ids.device) for _ in range(B)]
    if rows is None:
        state = cache.lanes[0] if cache is not None else fresh_state(None)
        loss, logits = run(input_ids, state, keep, labels, label_weights)
        return loss.value(), logits, [state]
    total = SegmentLoss(None)
    out = None
    states = []
    # padded labels: keep every position's logits to place them, the loss is taken per row
    for b, cols in enumerate(rows):
        state = cache.lanes[b] if cache is not None else fresh_state(b)
        states.append(state)
        if cols.numel() == 0:
            continue
        ids = input_ids[b:b + 1, cols]
        lab = labels[b:b + 1, cols] if labels is not None else None
        w = label_weights[b:b + 1, cols] if label_weights is not None else None
        loss, logits = run(ids, state, keep, lab, w)
        total.merge(loss)
        if logits is None:
            continue
        if out is None:
            out = logits.new_zeros((B, T if keep == "all" else 1, logits.shape[-1]))
        if keep == "all":
            out[b, cols] = logits[0]
        else:
            out[b, -1] = logits[0, -1]  # the row's last real token
    return total.value(), out, states


# -- the Hugging Face model base ------------------------------------------------------------------

def nested_base_config(base_config: Any, base_config_type: str | None = None) -> PretrainedConfig | None:
    """The base model's config from a config object or its dict (config.json keeps its model_type
    beside it, as ``base_config_type``: see :class:`NestedBaseConfig`)."""
    if base_config is None or isinstance(base_config, PretrainedConfig):
        return base_config
    if isinstance(base_config, dict):
        d = dict(base_config)
        model_type = d.pop("model_type", None) or base_config_type
        if model_type is None:
            raise ValueError("`base_config` has no model_type: give `base_config_type`")
        return AutoConfig.for_model(model_type, **d)
    raise TypeError(f"`base_config` must be a transformers config or its dict, got {type(base_config).__name__}")


class NestedBaseConfig(PretrainedConfig):
    """A memory model's config: the base model's config nested (``base_config``, saved without its
    model_type, which goes beside it as ``base_config_type``) and the memory settings
    (``settings_key``). Two things make loading the directory as a plain base model fail loudly
    instead of giving a base model with random weights: a base config class would adopt a nested
    dict carrying its own model_type, and the top-level ``vocab_size`` is null, which every base
    config class refuses."""

    settings_key: ClassVar[str]
    settings_class: ClassVar[type]

    def __init__(self, base_config: Any = None, base_config_type: str | None = None, **kwargs: Any) -> None:
        from dataclasses import asdict

        base_config = nested_base_config(base_config, base_config_type)
        settings = asdict(self.settings_class(**(kwargs.pop(self.settings_key, None) or {})))
        if base_config is not None:
            # what generation and Trainer read from a model's own config (special tokens, tied embeddings)
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
                if key not in kwargs and getattr(base_config, key, None) is not None:
                    kwargs[key] = getattr(base_config, key)
        kwargs.pop("vocab_size", None)
        super().__init__(**kwargs)
        self.vocab_size = None  # the base model's is in base_config
        setattr(self, self.settings_key, settings)
        # set after the parent's init, which would reset the nested config's attention kernel to None
        self.base_config = base_config
        self.base_config_type = base_config.model_type if base_config is not None else base_config_type

    @staticmethod
    def _nested_without_type(d: dict[str, Any]) -> dict[str, Any]:
        if isinstance(d.get("base_config"), dict):
            d["base_config"] = {k: v for k, v in d["base_config"].items() if k != "model_type"}
        return d

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if isinstance(self.base_config, PretrainedConfig):
            d["base_config"] = self.base_config.to_dict()
        return self._nested_without_type(d)

    def to_diff_dict(self) -> dict[str, Any]:
        d = super().to_diff_dict()
        if isinstance(self.base_config, PretrainedConfig):
            d["base_config"] = self.base_config.to_dict()
        d["vocab_size"] = None
        return self._nested_without_type(d)


class MemoryPreTrainedModel(PreTrainedModel, GenerationMixin):
    """Base of the memory models: a Hugging Face causal LM (``self.base``) plus the model's own
    parameters, its settings in ``config.<settings_key>`` (also as ``memory_config``)."""

    base_model_prefix = "base"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_attention_backend = True
    settings_key: ClassVar[str]  # the config's field holding the memory settings
    legacy_kind: ClassVar[str]  # the "kind" of memory_config.json in directories saved before
    #: submodules holding the memory parameters: pass to peft as ``modules_to_save`` to train and save them
    memory_modules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own MemoryCache in forward

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def set_input_embeddings(self, value) -> None:
        self.base.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def set_output_embeddings(self, value) -> None:
        self.base.set_output_embeddings(value)

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass  # the base model initialises its own weights; the memory parameters are set in their constructors

    def _use_cache(self, use_cache: bool | None, cache: Any) -> bool:
        # a plain call runs its input whole (and Infini-attention writes all of it to memory); generate()
        # asks for the cache with use_cache=True
        return cache is not None if use_cache is None else bool(use_cache)

    card_summary: ClassVar[str] = ""

    def model_card(self):
        """The model card (``retromem.hf_export.ModelCard``) of this model: base model, memory
        settings and, when trained by retromem, the training run (``config.retromem_training``)."""
        try:
            from retromem.hf_export import ModelCard
        except ImportError as exc:  # the standalone copy: its card is the README.md saved with it
            raise RuntimeError("model_card() needs retromem installed; the saved card is README.md") from exc
        training = dict(getattr(self.config, "retromem_training", None) or {})
        base = training.pop("base_model", None) or getattr(self.config.base_config, "_name_or_path", "") or None
        data = training.pop("training_data", None)
        settings = getattr(self.config, self.settings_key)
        extra = {"base_model_type": self.config.base_config_type,
                 **{f"{self.settings_key}.{k}": v for k, v in settings.items()},
                 **{f"training.{k}": v for k, v in training.items()}}
        return ModelCard(title=f"{type(self).__name__} ({self.config.base_config_type} base)",
                         summary=self.card_summary + ("" if data else " Its memory parameters have not been "
                                                      "trained by retromem (no training run is recorded)."),
                         model_type=self.config.model_type, base_model=base, training_data=data, extra=extra,
                         tags=(self.config.model_type.replace("_", "-"), "long-context"))

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any):
        """Hugging Face ``save_pretrained`` (weights, config with ``auto_map``, the modeling code),
        plus the model card as README.md when retromem is importable."""
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            try:
                from retromem.hf_export import render_card
            except ImportError:  # the standalone copy: the card saved with the directory stays as it is
                return out
            (Path(str(save_directory)) / "README.md").write_text(render_card(self.model_card()), encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """Hugging Face ``from_pretrained``; a directory saved before the models were Hugging Face
        models (``memory_config.json``, a ``llama`` config.json) loads through :func:`load_legacy`."""
        path = Path(str(pretrained_model_name_or_path))
        if (path / MEMORY_CONFIG_FILE).is_file():
            return load_legacy(cls, path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def load_legacy(cls: type, path: Path):
    """A directory saved before: base config.json + memory_config.json + every weight in
    model.safetensors under the old names; renamed with ``cls.legacy_key`` and loaded strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data = json.loads((path / MEMORY_CONFIG_FILE).read_text())
    if data.get("kind") != cls.legacy_kind:
        raise RetromemError(f"{path} holds a {data.get('kind')!r} model, not {cls.legacy_kind!r}")
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))
    model = cls(base, cls.settings_class(**data["config"]))
    state = {cls.legacy_key(k): v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    tied = {"base.lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
    embed = "base." + next(n for n, p in base.named_parameters() if p is base.get_input_embeddings().weight)
    if tied and embed not in state and "base.lm_head.weight" in state:
        # safetensors stores a tied matrix once, and older saves kept it under the head's name
        state[embed] = state["base.lm_head.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise RetromemError(f"weights in {path} do not fit the model: missing {real_missing[:5]}, "
                            f"unexpected {list(unexpected)[:5]}")
    if tied:
        model.base.tie_weights()
    return model.eval()


