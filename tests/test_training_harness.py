"""The one training harness (:mod:`retromem.training`): Trainer settings nested under `train:` and
checked by name, any TrainingArguments field set from the YAML and reaching the Trainer,
TensorBoard reporting, configs packaged with retromem, and a 2-process torchrun on CPU in which
rank 0 alone writes the final model and prints the summary."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from retromem.cli import main
from retromem.errors import ConfigError
from retromem.training import TrainerSettings, build_training_arguments, load_train_config

REPO = Path(__file__).resolve().parents[1]
TINY_INFINI = REPO / "configs" / "memory" / "tiny-infini.yaml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.memory.test_training import gpt2_vocab_llama

    return gpt2_vocab_llama(tmp_path_factory.mktemp("models"))


def tiny_infini(tmp_path: Path, train_lines: str) -> Path:
    """configs/memory/tiny-infini.yaml with ``train_lines`` added to its `train:` mapping (its last)."""
    path = tmp_path / "tiny-infini.yaml"
    path.write_text(TINY_INFINI.read_text() + train_lines)
    return path


def test_settings_are_checked_and_named():
    from retromem.memory.training import MemoryTrainConfig

    with pytest.raises(ConfigError, match=r"`train.max_steps` \(--max-steps\) must be a positive integer, got 0"):
        TrainerSettings(max_steps=0)
    with pytest.raises(ConfigError, match="`train.lr` must be > 0, got 0"):
        TrainerSettings(lr=0)
    with pytest.raises(ConfigError, match="`train.lr_scheduler` must be one of 'linear', 'cosine'"):
        TrainerSettings(lr_scheduler="cosine2")
    with pytest.raises(ConfigError, match="`train.mixed_precision`"):
        TrainerSettings(mixed_precision="fp8")
    with pytest.raises(ConfigError, match="`train.report_to` must be one of 'none', 'all'"):
        TrainerSettings(report_to="nonesuch")
    with pytest.raises(ConfigError, match="`train.eval_steps` must be null: memory fine-tuning has no held-out set"):
        MemoryTrainConfig(output_dir="x", train={"eval_steps": 10})
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainerSettings().lr = 1.0  # type: ignore[misc]
    s = TrainerSettings(report_to=["tensorboard"], args={"max_grad_norm": 0.5})
    assert s.report_to == ("tensorboard",) and s.reporters == ["tensorboard"] and TrainerSettings().reporters == []


def test_yaml_train_mapping_keeps_each_models_defaults_and_refuses_unknown_keys(tmp_path):
    from retromem.memory.training import MemoryTrainConfig, MemoryTrainerSettings
    from retromem.memory.training import load_train_config as load_memory

    cfg = load_memory(TINY_INFINI)
    assert isinstance(cfg.train, MemoryTrainerSettings)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.logging_steps, cfg.train.save_steps) == (1e-3, 4, 1, 2)
    # the keys the file leaves out take memory training's defaults, not RETRO's
    assert (cfg.train.weight_decay, cfg.train.lr_scheduler, cfg.train.mixed_precision) == (0.01, "constant_with_warmup", "no")
    assert MemoryTrainConfig(output_dir="x").train == MemoryTrainerSettings()
    over = load_memory(TINY_INFINI, train={"max_steps": 7, "lr": None})  # None: the file's value stays
    assert over.train.max_steps == 7 and over.train.lr == 1e-3 and over.train.save_steps == 2
    with pytest.raises(ConfigError, match=r"unknown keys \['train.lr2'\]; allowed under `train`"):
        load_memory(tiny_infini(tmp_path, "  lr2: 1\n"))
    bad = tmp_path / "flat.yaml"  # the layout before `train:`: a trainer key at the top level is named
    bad.write_text("output_dir: x\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['max_steps'\]"):
        load_memory(bad)


def test_train_args_refuse_unknown_and_harness_owned_keys_by_name(tmp_path):
    from retromem.memory.training import MemoryTrainConfig

    def load(lines: str):
        return load_train_config(tiny_infini(tmp_path, "  args:\n" + lines), MemoryTrainConfig)

    with pytest.raises(ConfigError, match=r"unknown keys \['train.args.adam_beta3'\]"):
        load("    adam_beta3: 0.9\n")
    with pytest.raises(ConfigError, match="`train.args.learning_rate` is set by `train.lr`"):
        load("    learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="`train.args.per_device_train_batch_size` is set by `train.batch_size`"):
        load("    per_device_train_batch_size: 4\n")
    with pytest.raises(ConfigError, match="`train.args.output_dir` is set by `output_dir`"):
        load("    output_dir: elsewhere\n")
    with pytest.raises(ConfigError, match="`train.args.remove_unused_columns` is fixed"):
        load("    remove_unused_columns: true\n")
    with pytest.raises(ConfigError, match="`train.args.max_grad_norm` must fit TrainingArguments.max_grad_norm"):
        load("    max_grad_norm: big\n")
    with pytest.raises(ConfigError, match="`train.args` must be a mapping"):
        TrainerSettings(args=["max_grad_norm"])
    # a value only TrainingArguments itself can judge is named when the arguments are built
    cfg = load("    optim: nonesuch\n")
    with pytest.raises(ConfigError, match="`train.args`: .*nonesuch"):
        build_training_arguments(cfg.train, tmp_path / "o")
    # through the command line: one error line naming the key, exit status 2
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(tiny_infini(tmp_path, "  args:\n    adam_beta3: 0.9\n"))])
    assert r.exit_code == 2 and "error:" in r.output and "train.args.adam_beta3" in r.output, r.output


def test_a_training_arguments_field_from_the_yaml_reaches_the_trainer(tmp_path, tiny_dir):
    from retromem.memory.training import (MemoryDataset, build_model, fixed_segment_length, make_trainer,
                                          set_trainable)
    from retromem.memory.training import load_train_config as load_memory

    cfg = load_memory(tiny_infini(tmp_path, "  args:\n    adam_beta2: 0.95\n    max_grad_norm: 0.5\n"),
                      model=str(tiny_dir), output_dir=str(tmp_path / "run"))
    model, tok = build_model(cfg)
    set_trainable(model, cfg)
    trainer = make_trainer(cfg, model, tok, MemoryDataset(cfg, tok, fixed_segment_length(model.memory_config)))
    assert trainer.args.adam_beta2 == 0.95 and trainer.args.max_grad_norm == 0.5
    assert trainer.args.optim == "adamw_torch"  # memory training's default: plain AdamW, as before the harness
    groups = {g["name"]: g for g in trainer.create_optimizer().param_groups}
    assert groups["memory"]["lr"] == 5e-2 and groups["memory"]["weight_decay"] == 0.0  # the memory group stays
    assert all(g["betas"] == (0.9, 0.95) for g in groups.values())


def test_packaged_configs_are_found_by_name(tmp_path, monkeypatch):
    from retromem.assets import config_file
    from retromem.retro.training import RetroTrainConfig

    path = config_file("memory/infini-smollm2-passkey.yaml")
    assert path.is_file() and path.read_text() == (REPO / "configs/memory/infini-smollm2-passkey.yaml").read_text()
    with pytest.raises(ConfigError, match="retro/nope.yaml does not exist.*packaged: .*retro/tiny-scratch.yaml"):
        config_file("retro/nope.yaml")
    monkeypatch.chdir(tmp_path)  # no configs/ here: the names resolve inside the package
    cfg = load_train_config("retro/tiny-scratch.yaml", RetroTrainConfig,
                            overrides={"datastore": "d", "neighbours": ["n"], "train": {"max_steps": 2}})
    assert cfg.train.max_steps == 2 and cfg.train.lr == 3e-3 and cfg.from_scratch["hidden_size"] == 64
    r = CliRunner().invoke(main, ["memory", "train", "--config", "memory/nope.yaml"])
    assert r.exit_code == 2 and "memory/tiny-infini.yaml" in r.output, r.output


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(tmp_path, tiny_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(tiny_infini(tmp_path, "  report_to: tensorboard\n")),
                                  "--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    events = sorted(out.glob("runs/*/events.out.tfevents.*"))
    assert events, sorted(p.relative_to(out) for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert "train/gate_mean" in acc.Tags()["scalars"]  # the memory telemetry reaches TensorBoard too


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_rank0_alone_writes_and_prints(tmp_path, tiny_dir):
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "retromem.cli", "memory", "train", "--config", "memory/tiny-infini.yaml",  # a packaged config
           "--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "2"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "training on 2 processes" in p.stderr  # really data-parallel
    assert p.stdout.count("trained 2 steps") == 1 and p.stdout.count("model: ") == 1, p.stdout  # rank 0's summary
    assert p.stderr.count("final model saved to") == 1, p.stderr[-3000:]  # written once
    assert (out / "final" / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    tel = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert sum("train_runtime" in t for t in tel) == 1 and [t["step"] for t in tel if "loss" in t] == [1, 2]
    # each process's loss is a mean: Trainer averages it over the 2 processes (not 2 x ~ln(50257))
    losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 2 and all(9.0 < v < 12.0 for v in losses), losses
    from retromem.memory.infini_attention import InfiniAttentionLM

    InfiniAttentionLM.from_pretrained(out / "final")  # a whole, loadable model
