"""The one training harness: Hugging Face ``Trainer`` runs of every model retromem trains.

litgpt's ``TrainArgs`` pattern: each model's run config (``RetroTrainConfig``,
``MemoryTrainConfig``) nests one frozen, validated :class:`TrainerSettings` under ``train:``::

    train:
      lr: 1.0e-3
      max_steps: 150
      batch_size: 2
      report_to: tensorboard        # or none (default), wandb, [tensorboard, wandb], all
      args:                         # any other transformers.TrainingArguments field
        max_grad_norm: 0.5
        adam_beta2: 0.95

``train.args`` reaches ``TrainingArguments`` as it is: a key that is not one of its fields is
refused by name (`` `train.args.foo` ``), and a field the harness sets from its own key
(``learning_rate`` from ``train.lr``, ...) is refused with a pointer to that key, so that one
setting never has two spellings.

The rest is what both trainers shared: :func:`build_training_arguments`, one ``Trainer``
subclass whose checkpoint save/load is parametrised by the model's own functions
(:func:`checkpoint_trainer_class`), :func:`run` (resume, train, evaluate, save the final model
once), :class:`TrainResult`, and :func:`load_train_config` (``--config`` a file or a config
packaged with retromem).

Several processes: ``torchrun --nproc_per_node 2 -m retromem.cli memory train --config ...``
(or ``accelerate launch``) trains data-parallel (NCCL on GPUs, gloo on CPU); checkpoints, the
final model, ``log_history.json`` and the command's summary come from rank 0 alone.

torch and transformers are imported inside the functions that use them: the settings can be
built and checked without them where ``train.args`` and ``train.report_to`` are empty.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from retromem.config import (fail, load_yaml, non_negative_int, number, one_of, optional_positive_int,
                             positive_int)
from retromem.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRECISIONS = ("auto", "no", "bf16", "fp16")

# The command-line flags of the settings that have one (``retromem retro|memory train``).
FLAGS = {"max_steps": "--max-steps"}

# TrainingArguments fields the harness sets itself, and the key that sets each: refused under
# ``train.args`` so that one setting never has two spellings.
OWNED_ARGS: dict[str, str] = {
    "output_dir": "output_dir",
    "learning_rate": "train.lr",
    "weight_decay": "train.weight_decay",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "eval_steps": "train.eval_steps",
    "eval_strategy": "train.eval_steps",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "report_to": "train.report_to",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing": "train.gradient_checkpointing",
}
# ... and those no key changes: the models take every column of their examples.
FIXED_ARGS = {"remove_unused_columns": False}


@dataclass(frozen=True)
class TrainerSettings:
    """The Trainer settings every training run shares: the ``train:`` mapping of a run's config.

    lr_scheduler: a transformers ``SchedulerType`` (linear, cosine, constant_with_warmup, ...).
    eval_steps: evaluate on the held-out set every this many steps (null: at the end only; a run
        without a held-out set ignores it).
    threads: torch CPU threads of each process.
    mixed_precision: auto = bf16 (else fp16) on a GPU, none on CPU.
    report_to: "none", an integration name ("tensorboard": event files under
        ``<output_dir>/runs/``), a list of them, or "all" (every installed one).
    args: further ``transformers.TrainingArguments`` fields, passed as they are.

    The defaults are RETRO's; a model whose runs differ subclasses this class with its own
    defaults (``MemoryTrainerSettings``), so that a YAML ``train:`` mapping gets them too.
    """

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
    report_to: str | tuple[str, ...] = "none"
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        number(self.lr, "train.lr", gt=0)
        number(self.weight_decay, "train.weight_decay", ge=0)
        for name in ("max_steps", "batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit",
                     "threads"):
            positive_int(getattr(self, name), f"train.{name}", flag=FLAGS.get(name))
        non_negative_int(self.warmup_steps, "train.warmup_steps")
        optional_positive_int(self.eval_steps, "train.eval_steps")
        non_negative_int(self.seed, "train.seed")
        one_of(self.mixed_precision, "train.mixed_precision", PRECISIONS)
        if not isinstance(self.gradient_checkpointing, bool):
            fail("train.gradient_checkpointing", "be true or false", self.gradient_checkpointing)
        _check_scheduler(self.lr_scheduler)
        if isinstance(self.report_to, list):  # built in code rather than by from_dict
            object.__setattr__(self, "report_to", tuple(self.report_to))
        _check_report_to(self.report_to)
        if not isinstance(self.args, Mapping):
            fail("train.args", "be a mapping of transformers.TrainingArguments fields", self.args)
        object.__setattr__(self, "args", dict(self.args))
        check_training_args(self.args)

    @property
    def reporters(self) -> list[str]:
        """``report_to`` as a list of integration names ([] for none)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [] if names == ["none"] else names


def _check_scheduler(name: Any) -> None:
    from transformers import SchedulerType

    one_of(name, "train.lr_scheduler", [s.value for s in SchedulerType])


def _check_report_to(value: Any) -> None:
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, tuple) or not names or not all(isinstance(n, str) for n in names):
        fail("train.report_to", "be 'none', an integration name or a list of them", value)
    if names in (("none",), ("all",)):
        return
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    choices = ["none", "all", *INTEGRATION_TO_CALLBACK] if len(names) == 1 else list(INTEGRATION_TO_CALLBACK)
    installed = get_available_reporting_integrations()
    for name in names:
        one_of(name, "train.report_to", choices)
        if name not in installed:
            fail("train.report_to", f"name an installed integration ({name!r} needs its package; installed: "
                                    f"{', '.join(installed) or 'none'})", value)


def _training_args_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the TrainingArguments field type ``tp``; True where the type is not
    a plain one (enums, unions of strings and enums, dicts): TrainingArguments checks those."""
    members = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None:
        return type(None) in members
    plain = [m for m in members if m in (bool, int, float, str)]
    if len(plain) != len([m for m in members if m is not type(None)]):
        return True
    return any((isinstance(value, bool) if m is bool
                else isinstance(value, int) and not isinstance(value, bool) if m is int
                else isinstance(value, (int, float)) and not isinstance(value, bool) if m is float
                else isinstance(value, str)) for m in plain)


def check_training_args(args: Mapping[str, Any]) -> None:
    """Refuse ``train.args`` keys that are not TrainingArguments fields, fields the harness sets
    from its own keys, and values of the wrong plain type, naming each by its dotted key."""
    if not args:
        return
    known = _training_args_fields()
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        raise ConfigError(f"unknown keys {['train.args.' + k for k in unknown]}: `train.args` takes "
                          "transformers.TrainingArguments fields (see its documentation)")
    for key, value in args.items():
        if key in OWNED_ARGS:
            raise ConfigError(f"`train.args.{key}` is set by `{OWNED_ARGS[key]}`; set that instead")
        if key in FIXED_ARGS:
            raise ConfigError(f"`train.args.{key}` is fixed at {FIXED_ARGS[key]!r} by the training harness")
        tp = known[key].type
        if not isinstance(tp, str) and not _fits(value, tp):
            fail(f"train.args.{key}", f"fit TrainingArguments.{key} ({getattr(tp, '__name__', tp)})", value)


# -- TrainingArguments ---------------------------------------------------------------------------


def mixed_precision_args(settings: TrainerSettings) -> dict[str, bool]:
    """``{"bf16": True}``, ``{"fp16": True}`` or ``{}`` for ``train.mixed_precision`` on this machine."""
    import torch

    mp = settings.mixed_precision
    if mp == "no" or (mp == "auto" and not torch.cuda.is_available()):
        return {}
    if mp in ("bf16", "fp16") and not torch.cuda.is_available():
        fail("train.mixed_precision", "be auto or no on a machine without a GPU", mp)
    if mp == "bf16" or (mp == "auto" and torch.cuda.is_bf16_supported()):
        return {"bf16": True}
    return {"fp16": True}


def build_training_arguments(settings: TrainerSettings, output_dir: str | Path, *, evaluate: bool = False,
                             defaults: Mapping[str, Any] | None = None):
    """``transformers.TrainingArguments`` of a run.

    evaluate: the run has a held-out set (periodic evaluation every ``train.eval_steps``).
    defaults: TrainingArguments values this kind of run wants unless ``train.args`` says otherwise
        (e.g. memory training's ``optim: adamw_torch``).
    """
    import torch
    from transformers import TrainingArguments

    periodic = evaluate and settings.eval_steps is not None
    kwargs: dict[str, Any] = {"dataloader_num_workers": 0, "use_cpu": not torch.cuda.is_available(),
                              "disable_tqdm": False}
    kwargs.update(defaults or {})
    kwargs.update(settings.args)
    kwargs.update(FIXED_ARGS)
    kwargs.update(
        output_dir=str(output_dir), learning_rate=settings.lr, weight_decay=settings.weight_decay,
        max_steps=settings.max_steps, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup_steps, lr_scheduler_type=settings.lr_scheduler,
        logging_steps=settings.logging_steps, save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit, eval_strategy="steps" if periodic else "no",
        eval_steps=settings.eval_steps if periodic else None, seed=settings.seed, data_seed=settings.seed,
        report_to=settings.reporters or "none", activation_checkpointing=settings.gradient_checkpointing,
        **mixed_precision_args(settings))
    try:
        return TrainingArguments(**kwargs)
    except (TypeError, ValueError) as exc:  # a train.args value TrainingArguments refuses, or a clash of several
        raise ConfigError(f"`train.args`: {exc}") from exc


# -- the Trainer ---------------------------------------------------------------------------------

SaveFn = Callable[[Any, Any, Path], Any]  # (model, tokenizer, directory)
LoadFn = Callable[[Any, str], Any]  # (model, checkpoint directory)
GroupsFn = Callable[[Any], list[dict[str, Any]]]  # model -> optimizer parameter groups


@lru_cache(maxsize=None)
def checkpoint_trainer_class() -> type:
    """``CheckpointTrainer``: a ``transformers.Trainer`` whose checkpoints are written and read by
    the model's own functions (defined on first use, so that transformers loads lazily).

    ``CheckpointTrainer(..., save_checkpoint=fn(model, tokenizer, dir), load_checkpoint=fn(model, dir),
    param_groups=fn(model), mean_loss=False)``: each left None keeps Trainer's own behaviour.
    ``param_groups`` gives the optimizer's parameter groups (their own learning rates and weight
    decay); the optimizer itself is still the one ``train.args.optim`` names. ``mean_loss``: the
    model returns the mean loss of its own batch and ignores ``num_items_in_batch``, so Trainer
    must average over accumulation steps and processes itself (else it takes the loss as already
    normalised by the global token count: accumulated gradients would add up, and each of N
    processes would scale its loss by N). Evaluation also reports ``eval_perplexity``.
    """
    import torch
    from transformers import Trainer

    class CheckpointTrainer(Trainer):
        def __init__(self, *args: Any, save_checkpoint: SaveFn | None = None, load_checkpoint: LoadFn | None = None,
                     param_groups: GroupsFn | None = None, mean_loss: bool = False, **kwargs: Any) -> None:
            self._save_checkpoint_fn = save_checkpoint
            self._load_checkpoint_fn = load_checkpoint
            self._param_groups_fn = param_groups
            super().__init__(*args, **kwargs)
            if mean_loss:  # Trainer reads a `**kwargs` forward as one that normalises by num_items_in_batch
                self.model_accepts_loss_kwargs = False

        def create_optimizer(self, model: torch.nn.Module | None = None):
            if self._param_groups_fn is None:
                return super().create_optimizer(model)
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                self.optimizer = cls(self._param_groups_fn(opt_model), **kwargs)
            return self.optimizer

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            if self._save_checkpoint_fn is None:
                return super()._save(output_dir, state_dict)
            if not self.args.should_save:  # Trainer calls _save on every rank; rank 0 writes
                return None
            target = Path(output_dir or self.args.output_dir)
            target.mkdir(parents=True, exist_ok=True)
            self._save_checkpoint_fn(self.model, self.processing_class, target)
            return None

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
            if self._load_checkpoint_fn is None:
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            self._load_checkpoint_fn(model if model is not None else self.model, resume_from_checkpoint)
            return None

        def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
            metrics = super().evaluate(*args, **kwargs)
            if "eval_loss" in metrics:
                metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
                self.log({"eval_perplexity": metrics["eval_perplexity"]})
            return metrics

    return CheckpointTrainer


# -- the run -------------------------------------------------------------------------------------


def is_main_process() -> bool:
    """Rank 0 of a ``torchrun`` / ``accelerate launch`` job, or the only process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_run(cfg: Any, settings: TrainerSettings, output_dir: str | Path) -> Path:
    """Threads and seed of this process; the output directory, with ``train_config.json`` (rank 0)."""
    import torch

    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))
        if world_size() > 1:
            logger.info("training on %d processes (data parallel): global batch %d x %d", world_size(),
                        settings.batch_size * world_size(), settings.grad_accum)
    return out


@dataclass(frozen=True)
class TrainResult:
    """What a run did. ``trainable``: trainable parameters by group (RETROfit: ``retro``; from
    scratch: ``model``; memory: ``memory`` and ``other``). ``main_process``: False on the other
    ranks of a multi-process run, which print and write nothing."""

    output_dir: Path
    final_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    trainable: dict[str, int]
    total_parameters: int
    train_examples: int
    resumed_from: str | None
    log_history: list[dict[str, Any]]
    main_process: bool = True

    @property
    def trainable_parameters(self) -> int:
        return sum(self.trainable.values())


def run(trainer: Any, out: Path, *, resume: bool, save_final: Callable[[Path], Any], eval_dataset: Any | None = None,
        before_save: Callable[[], Any] | None = None, trainable: dict[str, int], total_parameters: int,
        train_examples: int) -> TrainResult:
    """Train (with ``resume``: from the newest checkpoint in ``out``), evaluate on ``eval_dataset``
    when there is one, then on rank 0 alone save the final model to ``out/final`` with
    ``save_final(dir)`` and the log history to ``out/log_history.json``.

    before_save: runs on every rank after training, before the final save (e.g. merging LoRA).
    """
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if resume and last is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", out)
    result = trainer.train(resume_from_checkpoint=last)
    eval_loss = None if eval_dataset is None else trainer.evaluate(eval_dataset=eval_dataset).get("eval_loss")
    if before_save is not None:
        before_save()
    trainer.model.eval()
    final = out / "final"
    history = trainer.state.log_history
    main = trainer.is_world_process_zero()
    if main:
        save_final(final)
        (out / "log_history.json").write_text(json.dumps(history, indent=1))
        logger.info("final model saved to %s", final)
    trainer.accelerator.wait_for_everyone()  # every rank returns once the final model exists
    return TrainResult(out, final, trainer.state.global_step, getattr(result, "training_loss", None), eval_loss,
                       trainable, total_parameters, train_examples, last, history, main)


# -- configs -------------------------------------------------------------------------------------


def config_path(path: str | Path) -> Path:
    """``--config``: a YAML file, or the name of one packaged with retromem (``memory/tiny-infini.yaml``)."""
    from retromem.assets import config_file

    p = Path(path)
    return p if p.is_file() else config_file(str(path))


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the ``overrides`` that are not None; nested mappings merge key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        elif isinstance(value, Mapping):
            out[key] = _merge({}, value)
        else:
            out[key] = value
    return out


def load_train_config(path: str | Path, cls: type[T], *, required: tuple[str, ...] = (),
                      overrides: Mapping[str, Any] | None = None) -> T:
    """The run config ``cls`` from the YAML ``path`` (a file or a packaged name, see :func:`config_path`).

    ``overrides`` (command-line options) win over the file where they are not None; a nested
    mapping overrides key by key: ``{"output_dir": "o", "train": {"max_steps": 5}}``.
    """
    p = config_path(path)
    given = dict(overrides or {})
    nested = [k for k, v in given.items() if isinstance(v, Mapping)]
    if nested:  # merge into the file's own sections (load_yaml replaces whole top-level keys)
        data = _read_mapping(p)
        for key in nested:
            section = data.get(key)
            given[key] = _merge(dict(section) if isinstance(section, Mapping) else {}, given[key])
    return load_yaml(p, cls, required=required, **given)


def _read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; {} where it cannot be read (then load_yaml names the problem)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
