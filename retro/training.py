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
split recorded with those neighbours, and a periodic evaluation runs on them.

The control run: ``neighbours_mode: random`` trains the same blocks (same trainable parameters,
same steps, same sequences) on the retrieved neighbours of random chunks of other documents
(:class:`retromem.retro.data.RandomNeighbourTable`, seeded by ``train.seed``), so the neighbour
slots hold real text but no retrieval signal. What such a run gains is domain adaptation of the new
weights; a retrieval run has to beat it (``retromem retro eval`` on both). The periodic evaluation
reads retrieved neighbours in both modes.

The Trainer settings (``train:``: learning rate, steps, batches, mixed precision, ``report_to``,
any other ``TrainingArguments`` field under ``train.args``), the Trainer, checkpoint resume and
multi-process runs are the shared harness's (:mod:`retromem.training`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retromem.config import fail, from_dict, one_of, optional_positive_int, positive_int
from retromem.errors import ConfigError
from retromem.retro.loading import is_retrofitted, save_model, save_retro_checkpoint
from retromem.training import TrainerSettings, TrainResult
from retromem.training import load_train_config as _load_train_config

logger = logging.getLogger(__name__)

# The command-line flags of the keys that have one (``retromem retro train``).
FLAGS = {"output_dir": "--output-dir", "datastore": "--datastore", "neighbours": "--neighbours", "model": "--model"}
NEIGHBOURS_MODES = ("retrieved", "random")


@dataclass(frozen=True)
class RetroTrainConfig:
    """One training run.

    model: base causal LM to RETROfit (built-in name, local directory or hub id); or
    from_scratch: RetroConfig fields of a RetroForCausalLM trained whole (then ``model`` must be unset);
        ``cca_placement`` and ``cca_relative_positions`` default to the paper's choice
        (``configuration_retro.PAPER_CCA``: CCA before the feed-forward, relative positions).
    retro: RETROfit retrieval settings (num_neighbours, retro_layers, encoder_*); chunk_length and
        neighbour_length (2m) always come from the datastore.
    neighbours: directories from `retromem retro neighbours` (the training split and, for periodic
        evaluation, the eval split), all computed with one document split.
    seq_chunks: chunks per training sequence (sequence length seq_chunks x chunk_length).
    eval_sequences: held-out sequences of the periodic and final evaluation.
    train: the Trainer settings (:class:`retromem.training.TrainerSettings`: lr, max_steps,
        batch_size, ..., report_to, and ``args`` for any other TrainingArguments field).
    neighbours_mode: ``retrieved`` (each training chunk reads its own neighbours) or ``random`` (the
        neighbours of a random chunk of another document: the control without retrieval signal).
    """

    output_dir: str
    datastore: str
    neighbours: tuple[str, ...] = ()
    model: str | None = None
    from_scratch: dict[str, Any] | None = None
    retro: dict[str, Any] = field(default_factory=dict)
    seq_chunks: int = 4
    eval_sequences: int = 32
    max_train_sequences: int | None = None
    train: TrainerSettings = field(default_factory=TrainerSettings)
    neighbours_mode: str = "retrieved"

    def __post_init__(self) -> None:
        neighbours = (self.neighbours,) if isinstance(self.neighbours, (str, Path)) else self.neighbours
        object.__setattr__(self, "neighbours", tuple(str(p) for p in neighbours))
        if isinstance(self.train, dict):  # built in code from a mapping, as from_dict would
            object.__setattr__(self, "train", from_dict(TrainerSettings, self.train, prefix="train."))
        if not self.neighbours:
            fail("neighbours", "name the directories written by `retromem retro neighbours`", flag=FLAGS["neighbours"])
        if (self.model is None) == (self.from_scratch is None):
            raise ConfigError("give exactly one of `model` (a base model to RETROfit) and `from_scratch` "
                              f"(RetroConfig fields); got model={self.model!r}, from_scratch={self.from_scratch!r}")
        if not isinstance(self.retro, dict) or (self.from_scratch is not None and not isinstance(self.from_scratch, dict)):
            raise ConfigError("`retro` and `from_scratch` must be mappings of RetroConfig fields")
        for key in ("chunk_length", "neighbour_length", "vocab_size"):
            if key in self.retro or key in (self.from_scratch or {}):
                raise ConfigError(f"`{key}` comes from the datastore; remove it from the config")
        positive_int(self.seq_chunks, "seq_chunks")
        positive_int(self.eval_sequences, "eval_sequences")
        optional_positive_int(self.max_train_sequences, "max_train_sequences")
        if not isinstance(self.train, TrainerSettings):
            fail("train", "be a mapping of Trainer settings", self.train)
        one_of(self.neighbours_mode, "neighbours_mode", NEIGHBOURS_MODES)


def load_train_config(path: str | Path, **overrides: Any) -> RetroTrainConfig:
    """``--config`` (a file or a packaged name such as ``retro/tiny-scratch.yaml``) with the
    command line's overrides: top-level keys, and ``train={"max_steps": 5}`` for Trainer settings."""
    return _load_train_config(path, RetroTrainConfig, required=("output_dir", "datastore"), overrides=overrides)


# -- models ------------------------------------------------------------------------------------------


def build_model(cfg: RetroTrainConfig, ds: Any) -> tuple[torch.nn.Module, Any]:
    """(model ready to train, tokenizer), with the datastore's tokenizer checked against the model's."""
    from retromem.retro import RetroConfig, RetroForCausalLM, retro_config_for, retrofit
    from retromem.retro.data import check_datastore_tokenizer

    m = ds.chunk_length
    if cfg.from_scratch is not None:
        from retromem.retro.configuration_retro import PAPER_CCA

        tok = ds.tokenizer
        try:  # a new model: the paper's CCA placement and positions unless the config says otherwise
            config = RetroConfig(vocab_size=int(ds.manifest["tokenizer"]["vocab_size"]), chunk_length=m,
                                 neighbour_length=2 * m, pad_token_id=ds.pad_token_id,
                                 eos_token_id=ds.manifest["tokenizer"].get("eos_token_id"),
                                 **{**PAPER_CCA, **cfg.from_scratch})
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


def make_trainer(cfg: RetroTrainConfig, model: torch.nn.Module, tokenizer: Any, train_ds: Any, eval_ds: Any | None):
    """The shared harness's Trainer; a RETROfit checkpoints its RETRO weights alone."""
    from transformers import default_data_collator

    from retromem.retro.retrofit import load_retro_checkpoint
    from retromem.training import build_training_arguments, checkpoint_trainer_class

    retrofitted = is_retrofitted(model)
    do_eval = eval_ds is not None and cfg.train.eval_steps is not None
    args = build_training_arguments(cfg.train, cfg.output_dir, evaluate=do_eval)
    hooks: dict[str, Any] = {}
    if retrofitted:
        hooks = {"save_checkpoint": lambda m, tok, target: save_retro_checkpoint(m, tok, target, cfg.model),
                 "load_checkpoint": load_retro_checkpoint}
    return checkpoint_trainer_class()(model=model, args=args, train_dataset=train_ds,
                                      eval_dataset=eval_ds if do_eval else None, processing_class=tokenizer,
                                      data_collator=default_data_collator, **hooks)


def card(cfg: RetroTrainConfig, model: torch.nn.Module, ds: Any = None) -> Any:
    """The model card of a run's saves: the datastore, the neighbours and the Trainer settings it trained on."""
    from retromem.retro.loading import model_card

    datastore_id = getattr(ds, "datastore_id", None)
    training = (f"datastore {cfg.datastore}, neighbours {', '.join(cfg.neighbours)} ({cfg.neighbours_mode}), "
                f"sequences of {cfg.seq_chunks} chunks")
    return model_card(model, datastore_id=datastore_id, training_data=training,
                      extra={"max_steps": cfg.train.max_steps, "learning_rate": cfg.train.lr})


def datasets(cfg: RetroTrainConfig, ds: Any, k: int) -> tuple[Any, Any | None]:
    from retromem.retro.data import RandomNeighbourTable, RetroDataset
    from retromem.retro.neighbours import NeighbourTable

    table = NeighbourTable(cfg.neighbours, ds)
    spec = table.split_spec
    train_ids = table.chunk_ids[~spec.is_eval(ds.chunk_doc_array[table.chunk_ids])] if len(table.chunk_ids) else table.chunk_ids
    if len(train_ids) == 0:
        raise ConfigError(f"the neighbours {cfg.neighbours} cover no chunk of the training split: run "
                          "`retromem retro neighbours --split train`")
    # sequences never cross a gap in the covered chunks (e.g. a --max-chunks run)
    train_table = table
    if cfg.neighbours_mode == "random":  # the control: real neighbour sets, retrieved for other chunks
        train_table = RandomNeighbourTable(table, ds, train_ids, seed=cfg.train.seed)
    train = RetroDataset(ds, train_ids, cfg.seq_chunks, train_table, k=k, max_sequences=cfg.max_train_sequences)
    eval_ids = spec.chunk_ids(ds, "eval")
    covered = eval_ids[np.isin(eval_ids, table.chunk_ids)]
    eval_ds = None
    if len(covered) >= cfg.seq_chunks:
        eval_ds = RetroDataset(ds, covered, cfg.seq_chunks, table, k=k, max_sequences=cfg.eval_sequences)
    elif cfg.train.eval_steps is not None:
        logger.warning("no neighbours for the eval split in %s: periodic evaluation is off", cfg.neighbours)
    return train, eval_ds


def train(cfg: RetroTrainConfig, resume: bool = False) -> TrainResult:
    """Trains; with ``resume`` continues from the newest checkpoint in ``output_dir``."""
    from retromem.datastore import Datastore
    from retromem.retro.retrofit import trainable_fraction
    from retromem.training import run, start_run

    out = start_run(cfg, cfg.train, cfg.output_dir)
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
    return run(trainer, out, resume=resume, eval_dataset=eval_ds,
               save_final=lambda final: save_model(model, tok, final, cfg.model, card=card(cfg, model, ds)),
               trainable={"retro" if is_retrofitted(model) else "model": trainable}, total_parameters=total,
               train_examples=len(train_ds))
