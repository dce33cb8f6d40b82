"""Training RETRO models with Hugging Face ``Trainer``: ``retromem retro train --config``.

Two kinds of run, one config:

* RETROfit (``model:`` a base causal LM): the base is frozen, only the neighbour encoder and the
  chunked cross-attention blocks train (``retromem.retro.retrofit``). Checkpoints hold those weights alone
  (``retro_weights.safetensors``, a few MB) plus Trainer's optimizer/scheduler/RNG state, and
  ``--resume`` reads them back.
* From scratch (``from_scratch:`` RetroConfig fields): a ``RetroForCausalLM`` trained whole,
  checkpointed with ``save_pretrained``.

Data: sequences of ``seq_chunks`` chunks of the datastore's training documents with the neighbours
computed by ``retromem retro neighbours`` (:mod:`retromem.retro.data`); the held-out documents come from the
split recorded with those neighbours, and a periodic evaluation runs on them. Mixed precision
(bf16, else fp16) is on when a GPU is present.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from retromem.errors import ConfigError
from retromem.retro.loading import is_retrofitted, save_model

logger = logging.getLogger(__name__)

@dataclass
class RetroTrainConfig:
    """One training run.

    model: base causal LM to RETROfit (built-in name, local directory or hub id); or
    from_scratch: RetroConfig fields of a RetroForCausalLM trained whole (then ``model`` must be unset).
    retro: RETROfit retrieval settings (num_neighbours, retro_layers, encoder_*); chunk_length and
        neighbour_length (2m) always come from the datastore.
    neighbours: directories from `retromem retro neighbours` (the training split and, for periodic
        evaluation, the eval split), all computed with one document split.
    seq_chunks: chunks per training sequence (sequence length seq_chunks x chunk_length).
    mixed_precision: auto = bf16 (or fp16) on a GPU, none on CPU.
    """

    output_dir: str
    datastore: str
    neighbours: list[str] = field(default_factory=list)
    model: str | None = None
    from_scratch: dict[str, Any] | None = None
    retro: dict[str, Any] = field(default_factory=dict)
    seq_chunks: int = 4
    eval_sequences: int = 32
    max_train_sequences: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_steps: int = 100
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int = 2
    eval_steps: int | None = 50
    seed: int = 0
    threads: int = 2
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.neighbours, str):
            self.neighbours = [self.neighbours]
        self.neighbours = [str(p) for p in self.neighbours]
        if not self.neighbours:
            raise ConfigError("`neighbours` must name the directories written by `retromem retro neighbours`")
        if (self.model is None) == (self.from_scratch is None):
            raise ConfigError("give exactly one of `model` (a base model to RETROfit) and `from_scratch` "
                              f"(RetroConfig fields); got model={self.model!r}, from_scratch={self.from_scratch!r}")
        if not isinstance(self.retro, dict) or (self.from_scratch is not None and not isinstance(self.from_scratch, dict)):
            raise ConfigError("`retro` and `from_scratch` must be mappings of RetroConfig fields")
        for key in ("chunk_length", "neighbour_length", "vocab_size"):
            if key in self.retro or key in (self.from_scratch or {}):
                raise ConfigError(f"`{key}` comes from the datastore; remove it from the config")
        for name in ("seq_chunks", "eval_sequences", "max_steps", "batch_size", "grad_accum", "logging_steps",
                     "save_steps", "save_total_limit", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"`{name}` must be a positive integer, got {v!r}")
        for name in ("eval_steps", "max_train_sequences"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"`{name}` must be a positive integer or null, got {v!r}")
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ConfigError(f"`lr` must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("`weight_decay` and `warmup_steps` must be >= 0")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"`mixed_precision` must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")


def load_train_config(path: str | Path, **overrides: Any) -> RetroTrainConfig:
    from retromem.config import load_yaml

    return load_yaml(path, RetroTrainConfig, required=("output_dir", "datastore"), **overrides)


# -- models ------------------------------------------------------------------------------------------


def build_model(cfg: RetroTrainConfig, ds: Any) -> tuple[torch.nn.Module, Any]:
    """(model ready to train, tokenizer), with the datastore's tokenizer checked against the model's."""
    from retromem.retro import RetroConfig, RetroForCausalLM, retro_config_for, retrofit
    from retromem.retro.data import check_datastore_tokenizer

    m = ds.chunk_length
    if cfg.from_scratch is not None:
        tok = ds.tokenizer
        try:
            config = RetroConfig(vocab_size=int(ds.manifest["tokenizer"]["vocab_size"]), chunk_length=m,
                                 neighbour_length=2 * m, pad_token_id=ds.pad_token_id,
                                 eos_token_id=ds.manifest["tokenizer"].get("eos_token_id"), **cfg.from_scratch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"`from_scratch`: {exc}") from exc
        return RetroForCausalLM(config), tok
    from retromem.models import load_causal_lm

    base, tok = load_causal_lm(cfg.model)
    check_datastore_tokenizer(ds, tok, base.config.vocab_size)
    try:
        config = retro_config_for(base.config, chunk_length=m, neighbour_length=2 * m, **cfg.retro)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"`retro`: {exc}") from exc
    return retrofit(base, config), tok


# -- the run ---------------------------------------------------------------------------------------------


def _precision(cfg: RetroTrainConfig) -> dict[str, bool]:
    if cfg.mixed_precision == "no" or (cfg.mixed_precision == "auto" and not torch.cuda.is_available()):
        return {}
    if cfg.mixed_precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"`mixed_precision` {cfg.mixed_precision} needs a GPU; use auto or no on CPU")
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and torch.cuda.is_bf16_supported()):
        return {"bf16": True}
    return {"fp16": True}


def make_trainer(cfg: RetroTrainConfig, model: torch.nn.Module, tokenizer: Any, train_ds: Any, eval_ds: Any | None):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from retromem.retro.retrofit import load_retro_weights

    retrofitted = is_retrofitted(model)

    class RetroTrainer(Trainer):
        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            target = Path(output_dir or self.args.output_dir)
            if retrofitted:
                save_model(self.model, self.processing_class, target, cfg.model)
            else:
                super()._save(str(target), state_dict)

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
            if retrofitted:
                load_retro_weights(model if model is not None else self.model, resume_from_checkpoint)
            else:
                super()._load_from_checkpoint(resume_from_checkpoint, model)

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            metrics = super().evaluate(*args, **kwargs)
            if "eval_loss" in metrics:
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
                self.log({"eval_perplexity": metrics["eval_perplexity"]})
            return metrics

    do_eval = eval_ds is not None and cfg.eval_steps is not None
    args = TrainingArguments(
        output_dir=cfg.output_dir, max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, lr_scheduler_type=cfg.lr_scheduler,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if do_eval else "no", eval_steps=cfg.eval_steps if do_eval else None,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(), activation_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=False, **_precision(cfg))
    return RetroTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if do_eval else None,
                        processing_class=tokenizer, data_collator=default_data_collator)


@dataclass(frozen=True)
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    trainable_parameters: int
    total_parameters: int
    train_sequences: int
    resumed_from: str | None
    log_history: list[dict[str, Any]]


def datasets(cfg: RetroTrainConfig, ds: Any, k: int) -> tuple[Any, Any | None]:
    from retromem.retro.data import RetroDataset
    from retromem.retro.neighbours import NeighbourTable

    table = NeighbourTable(cfg.neighbours, ds)
    spec = table.split_spec
    train_ids = table.chunk_ids[~spec.is_eval(ds.chunk_doc_array[table.chunk_ids])] if len(table.chunk_ids) else table.chunk_ids
    if len(train_ids) == 0:
        raise ConfigError(f"the neighbours {cfg.neighbours} cover no chunk of the training split: run "
                          "`retromem retro neighbours --split train`")
    # sequences never cross a gap in the covered chunks (e.g. a --max-chunks run)
    train = RetroDataset(ds, train_ids, cfg.seq_chunks, table, k=k, max_sequences=cfg.max_train_sequences)
    eval_ids = spec.chunk_ids(ds, "eval")
    covered = eval_ids[np.isin(eval_ids, table.chunk_ids)]
    eval_ds = None
    if len(covered) >= cfg.seq_chunks:
        eval_ds = RetroDataset(ds, covered, cfg.seq_chunks, table, k=k, max_sequences=cfg.eval_sequences)
    elif cfg.eval_steps is not None:
        logger.warning("no neighbours for the eval split in %s: periodic evaluation is off", cfg.neighbours)
    return train, eval_ds


def train(cfg: RetroTrainConfig, resume: bool = False) -> TrainResult:
    """Trains; with ``resume`` continues from the newest checkpoint in ``output_dir``."""
    from transformers.trainer_utils import get_last_checkpoint

    from retromem.datastore import Datastore
    from retromem.retro.retrofit import trainable_fraction

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
    ds = Datastore.open(cfg.datastore)
    model, tok = build_model(cfg, ds)
    k = (model.retro_config if is_retrofitted(model) else model.config).num_neighbours
    train_ds, eval_ds = datasets(cfg, ds, k)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trainable = round(trainable_fraction(model) * total)
    logger.info("training %s: %d of %d parameters trainable (%.2f%%), %d sequences of %d tokens",
                type(model).__name__, trainable, total, 100 * trainable / total, len(train_ds),
                cfg.seq_chunks * ds.chunk_length)
    model.train()
    trainer = make_trainer(cfg, model, tok, train_ds, eval_ds)
    last = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if resume and last is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    result = trainer.train(resume_from_checkpoint=last)
    eval_loss = None
    if eval_ds is not None:
        eval_loss = trainer.evaluate(eval_dataset=eval_ds).get("eval_loss")
    model.eval()
    final = save_model(model, tok, out / "final", cfg.model)
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    return TrainResult(out, final, trainer.state.global_step, getattr(result, "training_loss", None), eval_loss,
                       trainable, total, len(train_ds), last, history)
