"""Training through Hugging Face Trainer on real datastore text: a tiny from-scratch RETRO model's loss
falls; a killed run resumed from its checkpoint ends where an uninterrupted one does; RETROfit runs
checkpoint the RETRO weights alone and keep the base frozen; bad configs are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from retromem.retro.loading import load_retro_model
from retromem.retro.training import RetroTrainConfig, load_train_config, train
from retromem.errors import ConfigError
from retromem.training import TrainerSettings

from tests.retro.conftest import tiny_llama_dir

pytestmark = pytest.mark.slow  # training runs

REPO = Path(__file__).resolve().parents[2]


def _losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


def test_tiny_model_learns_and_a_killed_run_resumes_to_the_same_weights(retro_ds, retro_neighbours, tmp_path):
    out = tmp_path / "run"
    cfg = load_train_config(REPO / "configs/retro/tiny-scratch.yaml", output_dir=str(out), datastore=str(retro_ds.path),
                            neighbours=[str(p) for p in retro_neighbours], train={"max_steps": 10})
    assert cfg.train.max_steps == 10 and cfg.train.save_steps == 4  # the override merges into the file's `train:`
    res = train(cfg)
    losses = _losses(res.log_history)
    assert res.steps == 10 and len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses  # from ~ln(50257) = 10.8 down
    assert res.eval_loss is not None and any("eval_perplexity" in h for h in res.log_history)
    done = {k: v.clone() for k, v in load_retro_model(res.final_dir)[0].state_dict().items()}

    # kill after the step-8 checkpoint: remove what came later, resume
    shutil.rmtree(out / "checkpoint-10")
    shutil.rmtree(out / "final")
    again = train(cfg, resume=True)
    assert again.resumed_from is not None and again.resumed_from.endswith("checkpoint-8") and again.steps == 10
    resumed = load_retro_model(again.final_dir)[0].state_dict()
    for name, t in done.items():
        torch.testing.assert_close(resumed[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_retrofit_run_trains_only_the_retro_blocks_and_checkpoints_them_alone(retro_ds, retro_neighbours, tmp_path):
    base_dir = tiny_llama_dir(tmp_path / "base")
    cfg = RetroTrainConfig(output_dir=str(tmp_path / "run"), datastore=str(retro_ds.path),
                           neighbours=[str(p) for p in retro_neighbours], model=str(base_dir),
                           retro={"retro_layers": [2], "encoder_num_layers": 1, "num_neighbours": 2}, seq_chunks=2,
                           train=TrainerSettings(max_steps=3, save_steps=2, logging_steps=1, eval_steps=None, threads=1))
    res = train(cfg)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "retro_weights.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "optimizer.pt").is_file()
    assert res.trainable_parameters < res.total_parameters
    model, _ = load_retro_model(res.final_dir)  # the base recorded with the weights
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    own = model.base.state_dict()  # the RETROfit wraps its base: the base's own tensor names
    for name, t in fresh.state_dict().items():
        torch.testing.assert_close(own[name], t, msg=name)  # frozen
    moved = [n for n, t in own.items() if "retro_cca" in n and n.endswith("o_proj.weight")]
    assert moved and all(own[n].abs().sum() > 0 for n in moved)  # the zero-initialised gates trained
    shutil.rmtree(tmp_path / "run" / "checkpoint-3")
    assert train(cfg, resume=True).resumed_from.endswith("checkpoint-2")


def test_bad_configs_are_named(tmp_path, retro_ds, retro_neighbours):
    kw = dict(output_dir=str(tmp_path), datastore=str(retro_ds.path), neighbours=[str(p) for p in retro_neighbours])
    with pytest.raises(ConfigError, match="exactly one of `model`"):
        RetroTrainConfig(**kw, model="x", from_scratch={"hidden_size": 8})
    with pytest.raises(ConfigError, match="`chunk_length` comes from the datastore"):
        RetroTrainConfig(**kw, model="x", retro={"chunk_length": 16})
    with pytest.raises(ConfigError, match="`train.max_steps` \\(--max-steps\\) must be a positive integer, got 0"):
        RetroTrainConfig(**kw, model="x", train={"max_steps": 0})
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: a\ndatastore: b\nneighbours: [c]\nmodel: m\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="retro_layers"):  # a layer the base does not have
        train(RetroTrainConfig(**kw, model=str(tiny_llama_dir(tmp_path / "base")), retro={"retro_layers": [7]}))
    with pytest.raises(ConfigError, match="tokenized with 'gpt2'"):  # the datastore of another tokenizer
        train(RetroTrainConfig(**kw, model="smollm2-135m"))


def test_training_arguments_fields_set_in_the_yaml_reach_the_trainer(retro_ds, retro_neighbours, tmp_path):
    from retromem.retro.training import build_model, datasets, make_trainer
    from retromem.datastore import Datastore

    path = tmp_path / "c.yaml"  # `train:` is the file's last mapping: extend it
    path.write_text((REPO / "configs/retro/tiny-scratch.yaml").read_text()
                    + "  args:\n    adam_beta2: 0.95\n    max_grad_norm: 0.5\n")
    cfg = load_train_config(path, output_dir=str(tmp_path / "run"), datastore=str(retro_ds.path),
                            neighbours=[str(p) for p in retro_neighbours])
    ds = Datastore.open(cfg.datastore)
    model, tok = build_model(cfg, ds)
    trainer = make_trainer(cfg, model, tok, *datasets(cfg, ds, model.config.num_neighbours))
    assert trainer.args.adam_beta2 == 0.95 and trainer.args.max_grad_norm == 0.5
    assert trainer.args.learning_rate == 3e-3 and trainer.args.eval_strategy == "steps"  # the harness's own keys
    assert all(g["betas"] == (0.9, 0.95) for g in trainer.create_optimizer().param_groups)


def test_random_neighbours_mode_trains_the_same_blocks_without_retrieval_signal(retro_ds, retro_neighbours, tmp_path):
    # the control "fine-tuned the same way without retrieval": same sequences, same parameters, same steps;
    # each training chunk reads the retrieved neighbours of a random chunk of another document
    import numpy as np

    from retromem.datastore import Datastore
    from retromem.retro.training import build_model, datasets

    ds = Datastore.open(retro_ds.path)
    doc_of = np.asarray(ds.chunk_doc_array)
    kw = dict(datastore=str(retro_ds.path), neighbours=[str(p) for p in retro_neighbours], train={"max_steps": 3})
    runs = {}
    for mode in ("retrieved", "random"):
        cfg = load_train_config(REPO / "configs/retro/tiny-scratch.yaml", output_dir=str(tmp_path / mode),
                                neighbours_mode=mode, **kw)
        assert cfg.neighbours_mode == mode
        model, _ = build_model(cfg, ds)
        train_ds, eval_ds = datasets(cfg, ds, model.config.num_neighbours)
        runs[mode] = (cfg, train_ds, eval_ds)
    (_, retrieved, eval_r), (cfg, rand, eval_x) = runs["retrieved"], runs["random"]
    np.testing.assert_array_equal(rand.windows, retrieved.windows)  # the same training tokens
    assert not np.array_equal(rand.neighbours, retrieved.neighbours)
    nb = rand.neighbours  # (sequences, C, k) neighbour chunk ids
    have = nb >= 0
    own = np.broadcast_to(doc_of[rand.windows][..., None], nb.shape)
    assert (doc_of[nb[have]] != own[have]).all()  # never the chunk's own document
    assert (nb != retrieved.neighbours).any(axis=-1).mean() > 0.9
    np.testing.assert_array_equal(eval_x.neighbours, eval_r.neighbours)  # periodic eval: retrieved in both
    item = rand[0]
    assert item["neighbour_ids"].shape == retrieved[0]["neighbour_ids"].shape

    res = {mode: train(runs[mode][0]) for mode in ("retrieved", "random")}
    assert res["random"].steps == res["retrieved"].steps == 3
    assert res["random"].trainable_parameters == res["retrieved"].trainable_parameters
    a = load_retro_model(res["retrieved"].final_dir)[0].state_dict()
    b = load_retro_model(res["random"].final_dir)[0].state_dict()
    assert any(not torch.equal(a[n], b[n]) for n in a if "retro_encoder" in n)  # other neighbours, other weights
    with pytest.raises(ConfigError, match="`neighbours_mode` must be one of"):
        RetroTrainConfig(output_dir="x", datastore="y", neighbours=["z"], model="m", neighbours_mode="none")
