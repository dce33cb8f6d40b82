"""Fine-tuning memory modules with Hugging Face ``Trainer``: ``retromem memory train --config``.

What this adds to a plain Trainer run:
- the memory parameters (Infini-attention gates ``*.memory_gate``, AutoCompressor
  ``summary_embeddings``) are their own optimizer group with their own learning rate and no weight
  decay (Hugging Face's Infini-attention reproduction had gates stuck at 0.5 without this);
- optional LoRA through ``peft`` (adapters injected in place, merged back into the weights when
  training ends, so the saved model is an ordinary memory wrapper);
- gate and memory telemetry in every log line and in ``telemetry.jsonl``, with a warning when the
  gates sit at 0.5 or saturate;
- checkpoints and the final model as Hugging Face directories with the modeling code, a model card
  recording the run and checksums (``save_memory_model``); Trainer reads them back on ``--resume``.

The Trainer settings (``train:``), the Trainer itself, resume and multi-process runs are the
shared harness's (:mod:`retromem.training`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from retromem.config import fail, from_dict, integer, non_negative_int, number, one_of, positive_int
from retromem.errors import ConfigError
from retromem.memory.loading import is_saved_memory_model
from retromem.training import TrainerSettings, TrainResult
from retromem.training import load_train_config as _load_train_config

logger = logging.getLogger(__name__)

MEMORY_PARAM_NAMES = ("memory_gate", "summary_embeddings")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        positive_int(self.r, "lora.r")
        number(self.dropout, "lora.dropout", ge=0.0, lt=1.0)


@dataclass(frozen=True)
class MemoryTrainerSettings(TrainerSettings):
    """The shared Trainer settings with memory fine-tuning's defaults: a constant learning rate
    after warmup, no held-out set (so no ``eval_steps``), full precision."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "constant_with_warmup"
    logging_steps: int = 5
    eval_steps: int | None = None
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"


@dataclass(frozen=True)
class MemoryTrainConfig:
    """One fine-tuning run. ``module`` settings go to InfiniAttentionConfig / AutoCompressorConfig.

    model: base causal LM (built-in name, local directory) or a saved memory model directory.
    tokenizer: defaults to the model's own; a built-in name ("smollm2-135m", "gpt2") or directory.
    data: "passkey" (loss on the answer, see passkey_text_weight) or "text" (next-token loss on real long text).
    train_base: with no LoRA, also train every base weight (else only the memory parameters).
    memory_lr: learning rate of the gates / summary embeddings (weight decay 0 for them).
    gate_warn_after: steps after which gates still at 0.5 (or saturated) raise a warning.
    needle_min_compressions: passkey data only: the whole needle lies at least this many segment
        boundaries before the question (0: anywhere, so some examples are answerable by local
        attention alone and teach the memory nothing). Needs a fixed segment length (Infini-attention,
        or an AutoCompressor with segment_min == segment_max).
    local_needle_share: passkey data only: this share of the examples have their needle in the
        question's own segment (so that the model keeps answering from local attention when the
        needle is near); needle_min_compressions applies to the rest.
    passkey_text_weight: passkey data only: the share of each example's loss given to next-token
        prediction of its text (haystack, needle, question); the answer gets the rest. 0 trains on
        the answer alone, which lets the model forget language modelling (perplexity explodes).
    train: the Trainer settings (:class:`MemoryTrainerSettings`: lr of the other trained weights,
        max_steps, batch_size, ..., report_to, and ``args`` for any other TrainingArguments field);
        ``train.seed`` also draws the examples.
    """

    output_dir: str
    model: str = "smollm2-135m"
    tokenizer: str | None = None
    module: Literal["infini", "autocompressor"] = "infini"
    infini: dict[str, Any] = field(default_factory=dict)
    autocompressor: dict[str, Any] = field(default_factory=dict)
    data: Literal["passkey", "text"] = "passkey"
    corpus: str | None = None
    train_length: int = 1024
    num_examples: int = 256
    lora: LoraSettings | None = None
    train_base: bool = False
    memory_lr: float = 1e-2
    gate_warn_after: int = 20
    needle_min_compressions: int = 0
    local_needle_share: float = 0.0
    passkey_text_weight: float = 0.0
    train: MemoryTrainerSettings = field(default_factory=MemoryTrainerSettings)

    def __post_init__(self) -> None:
        # mappings given in code become their settings objects, as from_dict would build them
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", from_dict(LoraSettings, self.lora, prefix="lora."))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", from_dict(MemoryTrainerSettings, self.train, prefix="train."))
        one_of(self.module, "module", ("infini", "autocompressor"))
        one_of(self.data, "data", ("passkey", "text"))
        positive_int(self.train_length, "train_length")
        positive_int(self.num_examples, "num_examples")
        number(self.memory_lr, "memory_lr", gt=0)
        integer(self.gate_warn_after, "gate_warn_after")
        n = non_negative_int(self.needle_min_compressions, "needle_min_compressions")
        if n and self.data != "passkey":
            raise ConfigError("`needle_min_compressions` applies to `data: passkey` only")
        for name in ("local_needle_share", "passkey_text_weight"):
            v = number(getattr(self, name), name, ge=0.0, lt=1.0)
            if v and self.data != "passkey":
                raise ConfigError(f"`{name}` applies to `data: passkey` only")
        if not isinstance(self.train, TrainerSettings):
            fail("train", "be a mapping of Trainer settings", self.train)
        if self.train.eval_steps is not None:
            fail("train.eval_steps", "be null: memory fine-tuning has no held-out set (`retromem memory eval` "
                 "evaluates the saved model)", self.train.eval_steps)
        self.module_config()  # validate the module's own settings now, not after the model loads

    def module_config(self):
        from retromem.memory.autocompressor import AutoCompressorConfig
        from retromem.memory.infini_attention import InfiniAttentionConfig

        cls, kw = (InfiniAttentionConfig, self.infini) if self.module == "infini" else (AutoCompressorConfig, self.autocompressor)
        return from_dict(cls, kw, prefix=f"{self.module}.")


def fixed_segment_length(module_config: Any) -> int | None:
    """The segment length a memory module always uses in training, or None where it varies."""
    from retromem.memory.infini_attention import InfiniAttentionConfig

    if isinstance(module_config, InfiniAttentionConfig):
        return module_config.segment_length
    mc = module_config
    return mc.segment_max if mc.segment_min == mc.segment_max or not mc.randomize_segments else None


def load_train_config(path: str | Path, **overrides: Any) -> MemoryTrainConfig:
    """``--config`` (a file or a packaged name such as ``memory/tiny-infini.yaml``) with the
    command line's overrides: top-level keys, and ``train={"max_steps": 5}`` for Trainer settings."""
    return _load_train_config(path, MemoryTrainConfig, required=("output_dir",), overrides=overrides)


# -- model and data -------------------------------------------------------------------------------

def build_model(cfg: MemoryTrainConfig):
    """(wrapper, tokenizer) for the config: a saved memory model, or a base model wrapped fresh."""
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.memory.autocompressor import AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionLM
    from retromem.models import load_causal_lm, model_dir

    cls = InfiniAttentionLM if cfg.module == "infini" else AutoCompressorLM
    if is_saved_memory_model(cfg.model):
        model = cls.from_pretrained(cfg.model)
        # a saved model keeps its own module settings; settings in the config must agree with them
        given = cfg.infini if cfg.module == "infini" else cfg.autocompressor
        saved = asdict(model.memory_config)
        clash = {k: (v, saved[k]) for k, v in given.items() if saved.get(k) != v}
        if clash:
            raise ConfigError(f"`{cfg.module}` settings {', '.join(f'{k}={v!r}' for k, (v, _) in clash.items())} differ "
                              f"from those of the saved model {cfg.model} "
                              f"({', '.join(f'{k}={s!r}' for k, (_, s) in clash.items())}); drop them or make them match")
        tok = load_hf_tokenizer(cfg.tokenizer or cfg.model)
    elif cfg.tokenizer:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir(cfg.model))
        tok = load_hf_tokenizer(cfg.tokenizer)
        model = cls(base, cfg.module_config())
    else:
        base, tok = load_causal_lm(cfg.model)
        model = cls(base, cfg.module_config())
    return model, tok


class MemoryDataset(torch.utils.data.Dataset):
    """Fixed-length training examples of real text: passkey (the answer as labels; with
    ``passkey_text_weight`` every token, weighted) or plain text."""

    def __init__(self, cfg: MemoryTrainConfig, tokenizer: Any, segment_length: int | None = None) -> None:
        """``segment_length``: the model's fixed segment length (needle placement); default: the config's."""
        from retromem.memory.passkey import PasskeyExample, token_stream

        rng = random.Random(cfg.train.seed)
        n = cfg.train_length
        # haystack / text from documents after the first 50, so evaluation (which uses the first
        # documents' text) does not test on training text
        stream = token_stream(tokenizer, max(4 * n, min(cfg.num_examples * n, 400_000)), cfg.corpus, skip_docs=50)
        seg = None
        if cfg.needle_min_compressions or cfg.local_needle_share:
            seg = segment_length or fixed_segment_length(cfg.module_config())
            if seg is None:
                raise ConfigError("`needle_min_compressions` / `local_needle_share` need a fixed segment length; this AutoCompressor draws "
                                  "segment lengths between segment_min and segment_max")
        self.items: list[tuple[list[int], list[int]]] = []
        self.weights: list[list[float]] = []  # per-label loss weights (passkey_text_weight > 0)
        self.passkeys: list[PasskeyExample] = []  # passkey data: where each needle and answer lie
        for i in range(cfg.num_examples):
            if cfg.data == "passkey":
                local = cfg.local_needle_share > 0 and rng.random() < cfg.local_needle_share
                ex = self._passkey(tokenizer, n, stream, rng, seg, 0 if local else cfg.needle_min_compressions, local)
                self.passkeys.append(ex)
                tw = cfg.passkey_text_weight
                if tw:
                    labels = list(ex.input_ids)
                    n_text, n_answer = ex.answer_start - 1, n - ex.answer_start  # label 0 is never predicted
                    self.weights.append([0.0] + [tw / n_text] * n_text + [(1 - tw) / n_answer] * n_answer)
                else:
                    labels = [-100] * ex.answer_start + ex.input_ids[ex.answer_start:]
                self.items.append((ex.input_ids, labels))
            else:
                off = rng.randrange(0, len(stream) - n)
                ids = stream[off:off + n]
                self.items.append((ids, ids))

    @staticmethod
    def _passkey(tokenizer: Any, n: int, stream: list[int], rng: random.Random, seg: int | None, min_back: int,
                 local: bool = False):
        """A passkey example; with ``min_back`` the needle's depth is drawn from the depths that put
        the whole needle at least ``min_back`` segment boundaries before the question, with ``local``
        from those that put it inside the question's own segment."""
        from retromem.memory.passkey import make_passkey

        if not min_back and not local:
            return make_passkey(tokenizer, n, rng.random(), stream, rng)
        for _ in range(1000):
            ex = make_passkey(tokenizer, n, rng.random(), stream, rng)
            question_seg, needle_last = (ex.answer_start - 1) // seg, ex.needle_start + ex.needle_len - 1
            if (ex.needle_start // seg == question_seg) if local else (question_seg - needle_last // seg >= min_back):
                return ex
        if local:
            raise ConfigError(f"no passkey example of {n} tokens fits the needle into the question's segment of {seg} "
                              "tokens: lower `local_needle_share` to 0 or raise the segment length")
        raise ConfigError(f"no passkey example of {n} tokens puts the needle {min_back} segment(s) of {seg} tokens "
                          f"before the question: raise `train_length` or lower `needle_min_compressions`")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, labels = self.items[i]
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if self.weights:
            item["label_weights"] = torch.tensor(self.weights[i])
        return item


# -- LoRA -----------------------------------------------------------------------------------------

def add_lora(model: torch.nn.Module, lora: LoraSettings) -> None:
    """Inject LoRA adapters in place into ``model.base`` (the wrapper keeps its structure)."""
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=list(lora.target_modules)), model.base)


def merge_lora(model: torch.nn.Module) -> int:
    """Merge injected LoRA adapters into their base weights and remove them; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
            merged += 1
    return merged


def set_trainable(model: torch.nn.Module, cfg: MemoryTrainConfig) -> dict[str, int]:
    counts = {"memory": 0, "other": 0}
    for name, p in model.named_parameters():
        is_memory = any(k in name for k in MEMORY_PARAM_NAMES)
        if is_memory:
            p.requires_grad_(True)
        elif cfg.lora is not None:
            p.requires_grad_("lora_" in name)
        else:
            p.requires_grad_(cfg.train_base)
        if p.requires_grad:
            counts["memory" if is_memory else "other"] += p.numel()
    return counts


def parameter_groups(model: torch.nn.Module, cfg: MemoryTrainConfig) -> list[dict[str, Any]]:
    """Memory parameters (own lr, no decay) | other weights (decay) | biases and norms (no decay)."""
    memory, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(k in name for k in MEMORY_PARAM_NAMES):
            memory.append(p)
        elif p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": memory, "lr": cfg.memory_lr, "weight_decay": 0.0, "name": "memory"},
              {"params": decay, "lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "name": "decay"},
              {"params": no_decay, "lr": cfg.train.lr, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


# -- telemetry ------------------------------------------------------------------------------------

def memory_telemetry(model: torch.nn.Module) -> dict[str, float]:
    """Gate statistics (Infini-attention) or summary-embedding norms (AutoCompressor)."""
    out: dict[str, float] = {}
    if hasattr(model, "gates"):
        g = model.gates()  # (layers, heads)
        out.update(gate_mean=float(g.mean()), gate_min=float(g.min()), gate_max=float(g.max()),
                   gate_frac_at_half=float(((g - 0.5).abs() < 0.02).float().mean()),
                   gate_frac_saturated=float(((g < 0.01) | (g > 0.99)).float().mean()))
    if hasattr(model, "summary_embeddings"):
        out["summary_embedding_norm"] = float(model.summary_embeddings.detach().norm(dim=-1).mean())
    out.update(getattr(model, "last_memory_stats", {}) or {})
    return out


def gate_warnings(tel: dict[str, float], step: int, warn_after: int) -> list[str]:
    msgs = []
    if "gate_mean" not in tel or step < warn_after:
        return msgs
    if tel["gate_frac_at_half"] > 0.5:
        msgs.append(f"step {step}: {tel['gate_frac_at_half']:.0%} of gates sit at 0.5 (sigmoid(0)): they are not "
                    "learning; raise `memory_lr` or check that the gates get gradient")
    if tel["gate_frac_saturated"] > 0.5:
        msgs.append(f"step {step}: {tel['gate_frac_saturated']:.0%} of gates are saturated (<0.01 or >0.99): "
                    "they no longer get gradient; lower `memory_lr`")
    return msgs


# -- the run --------------------------------------------------------------------------------------

def make_trainer(cfg: MemoryTrainConfig, model: torch.nn.Module, tokenizer: Any, dataset: torch.utils.data.Dataset):
    """The shared harness's Trainer with the memory parameter group, checkpoints written by
    ``save_memory_model``, and telemetry in every log line (rank 0 writes ``telemetry.jsonl``)."""
    from transformers import default_data_collator

    from retromem.training import build_training_arguments, checkpoint_trainer_class

    telemetry_path = Path(cfg.output_dir) / "telemetry.jsonl"

    class MemoryTrainer(checkpoint_trainer_class()):
        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            tel = memory_telemetry(self.model)
            logs = {**logs, **tel}
            if self.is_world_process_zero():
                for msg in gate_warnings(tel, self.state.global_step, cfg.gate_warn_after):
                    logger.warning(msg)
                with telemetry_path.open("a") as fh:
                    fh.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")
            super().log(logs, *args, **kwargs)

    # plain AdamW over the parameter groups unless `train.args.optim` names another optimizer
    args = build_training_arguments(cfg.train, cfg.output_dir, defaults={"optim": "adamw_torch"})
    # examples are fixed-length: stack them, no padding collator (the tokenizer may have no pad token)
    return MemoryTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=default_data_collator, save_checkpoint=save_memory_model,
                         # resume: Trainer's own loading (the models are PreTrainedModels, tied embeddings included)
                         param_groups=lambda m: parameter_groups(m, cfg),
                         mean_loss=True)  # the wrappers' SegmentLoss is a mean over their own batch


def save_memory_model(model: torch.nn.Module, tokenizer: Any, target: Path) -> Path:
    """A Hugging Face directory (``retromem.hf_export``): weights, config with ``auto_map`` and the
    modeling code, the tokenizer, the model card (README.md) and checksums.json: checkpoints and the final model."""
    from retromem.datastore.integrity import seal_model_dir
    from retromem.hf_export import export_model

    return export_model(model, target, card=model.model_card(), tokenizer=tokenizer, seal=seal_model_dir)


def training_facts(cfg: MemoryTrainConfig) -> dict[str, Any]:
    """What the model card records of a run (kept in ``config.retromem_training``)."""
    data = (f"{cfg.num_examples} {cfg.data} examples of {cfg.train_length} tokens of real text from "
            f"{cfg.corpus or 'the default corpus (python-docs, else the built-in demo corpus)'}, after its first 50 documents")
    return {"base_model": cfg.model, "training_data": data, "module": cfg.module, "max_steps": cfg.train.max_steps,
            "lr": cfg.train.lr, "memory_lr": cfg.memory_lr, "seed": cfg.train.seed, "train_base": cfg.train_base,
            "lora": None if cfg.lora is None else {"r": cfg.lora.r, "alpha": cfg.lora.alpha,
                                                   "target_modules": list(cfg.lora.target_modules)},
            "needle_min_compressions": cfg.needle_min_compressions, "passkey_text_weight": cfg.passkey_text_weight}


def train(cfg: MemoryTrainConfig, resume: bool = False) -> TrainResult:
    """Fine-tune; with ``resume`` continue from the newest checkpoint in ``output_dir``."""
    from retromem.training import run, start_run

    out = start_run(cfg, cfg.train, cfg.output_dir)
    model, tok = build_model(cfg)
    model.config.retromem_training = training_facts(cfg)  # the model card's record of this run
    if cfg.lora is not None:
        add_lora(model, cfg.lora)
    trainable = set_trainable(model, cfg)
    logger.info("trainable parameters: %d memory, %d other", trainable["memory"], trainable["other"])
    model.train()
    dataset = MemoryDataset(cfg, tok, fixed_segment_length(model.memory_config))
    trainer = make_trainer(cfg, model, tok, dataset)
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return run(trainer, out, resume=resume, save_final=lambda final: save_memory_model(model, tok, final),
               before_save=(lambda: merge_lora(model)) if cfg.lora is not None else None, trainable=trainable,
               total_parameters=total, train_examples=len(dataset))
