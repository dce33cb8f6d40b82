"""The plain ``transformers.Trainer`` and ``peft`` on the memory models, with no retromem code in
between: checkpoints saved and resumed with tied embeddings, and LoRA adapters saved and loaded
with the memory parameters (Infini gates, AutoCompressor summary embeddings) trained and saved
through ``modules_to_save=list(model.memory_modules)``."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM

from .conftest import tiny_llama

KINDS = ["infini", "autocompressor"]


def make(kind: str):
    if kind == "infini":
        return InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8))
    return AutoCompressorLM(tiny_llama(), AutoCompressorConfig(summary_length=2, segment_min=8, segment_max=8,
                                                               randomize_segments=False))


class Texts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def memory_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "memory_gate" in n or "summary_embeddings" in n]


@pytest.mark.slow  # two short Trainer runs per kind
@pytest.mark.parametrize("kind", KINDS)
def test_plain_trainer_checkpoints_and_resumes_with_tied_embeddings(kind, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, seed=0)
    straight = make(kind).train()
    before = [p.detach().clone() for p in memory_params(straight)]
    Trainer(model=straight, args=args, train_dataset=Texts()).train()
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoint-2" / "config.json").is_file()
    assert any((a - b).abs().max() > 0 for a, b in zip(before, memory_params(straight)))  # the memory learned
    resumed = make(kind).train()
    Trainer(model=resumed, args=args, train_dataset=Texts()).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    base = resumed.base
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        assert_close(resumed.eval()(ids).logits, straight.eval()(ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_lora_trains_and_saves_the_memory_parameters(kind, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = make(kind)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                          modules_to_save=list(type(model).memory_modules)))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    mem = [n for n in trainable if "memory_gate" in n or "summary_embeddings" in n]
    assert mem and len(mem) == (2 if kind == "infini" else 1)  # every gate / the summary embeddings
    assert not any("embed_tokens" in n or "mlp" in n for n in trainable)  # the base stays frozen
    # a few steps of plain SGD on the peft model
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    batch = Texts()[0]
    for _ in range(3):
        loss = pm(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("memory_gate" in k or "summary_embeddings" in k for k in saved)
    back = PeftModel.from_pretrained(make(kind), tmp_path / "adapter").eval()
    pm.eval()
    ids = torch.randint(3, 128, (1, 20))
    with torch.no_grad():
        assert_close(back(input_ids=ids).logits, pm(input_ids=ids).logits)
        assert (back(input_ids=ids).logits - make(kind).eval()(ids).logits).abs().max() > 1e-4
    # and it generates like the model it wraps
    assert back.generate(input_ids=ids, max_new_tokens=5, do_sample=False).shape == (1, 25)
