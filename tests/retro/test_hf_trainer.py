"""The plain transformers Trainer (checkpoint save and resume, tied embeddings) and peft LoRA (adapters
saved and loaded, CCA blocks trainable through ``modules_to_save``) on RETRO models, with no
project-specific Trainer or peft code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from retromem.retro import RetroConfig, RetroForCausalLM, retro_config_for, retrofit

M, K, R, V, T = 4, 2, 8, 97, 12


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.nb = torch.randint(0, V, (n, T // M, K, R), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i], "neighbour_ids": self.nb[i]}


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "retro":
        return RetroForCausalLM(RetroConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, chunk_length=M, num_neighbours=K,
                                            neighbour_length=R, retro_layers=[2], tie_word_embeddings=True,
                                            cca_placement="before_mlp", cca_relative_positions=True))
    base = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1))
    return retrofit(base, retro_config_for(base.config, chunk_length=M, num_neighbours=K, neighbour_length=R,
                                           retro_layers=[2]))


def args(out: Path, steps: int = 4) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, save_only_model=False, disable_tqdm=True)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow  # two short training runs per kind
@pytest.mark.parametrize("kind", ["retro", "retrofit"])
def test_plain_trainer_checkpoints_and_resumes(kind: str, tmp_path: Path) -> None:
    data = Sequences()
    model = make(kind)
    before = trainable(model)
    Trainer(model=model, args=args(tmp_path / "run"), train_dataset=data).train()
    after = trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    if kind == "retrofit":  # only the new blocks train; the tied base stays as it was
        assert after and all("retro_cca" in n or "retro_encoder" in n for n in after)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    # a new run resumes from checkpoint-2 and lands on the same weights as the uninterrupted one
    again = make(kind)
    Trainer(model=again, args=args(tmp_path / "run"), train_dataset=data).train(resume_from_checkpoint=str(ckpt))
    for name, t in trainable(again).items():
        torch.testing.assert_close(t, after[name], rtol=1e-5, atol=1e-6, msg=name)
    emb = again.get_input_embeddings().weight
    assert again.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied after the resume


@pytest.mark.parametrize("kind", ["retro", pytest.param("retrofit", marks=pytest.mark.slow)])
def test_lora_adapters_with_trainable_cca_save_and_load(kind: str, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    data = Sequences()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["retro_cca", "retro_encoder"])
    model = get_peft_model(make(kind), lora)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names)
    assert any("retro_cca" in n and "o_proj" in n for n in names)  # the gates stay trainable under peft
    Trainer(model=model, args=args(tmp_path / "lora", steps=3), train_dataset=data).train()
    model.eval()
    batch = data[0]
    x, nb = batch["input_ids"][None], batch["neighbour_ids"][None]
    with torch.no_grad():
        want = model(input_ids=x, neighbour_ids=nb).logits
        plain = make(kind).eval()(x, neighbour_ids=nb).logits
    assert (want - plain).abs().max() > 1e-4  # training moved the adapters and the CCA copies
    model.save_pretrained(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(make(kind), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, neighbour_ids=nb).logits, want, rtol=1e-5, atol=1e-5)
        out = loaded.generate(input_ids=x[:, :5], neighbour_ids=nb, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
