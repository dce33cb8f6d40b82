"""`retromem memory train` / `eval` on tiny real models: Trainer run with LoRA, the memory parameter
group, telemetry and warnings, checkpoints and resume, evaluation modes and plots, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from retromem.cli import main

from .conftest import tiny_llama

pytestmark = pytest.mark.slow  # training runs

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "memory"


def gpt2_vocab_llama(tmp_path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=50256, bos_token_id=50256, tie_word_embeddings=True)
    d = tmp_path / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return gpt2_vocab_llama(tmp_path_factory.mktemp("models"))


def test_parameter_groups_give_memory_params_their_own_lr_and_no_decay():
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.training import MemoryTrainConfig, add_lora, parameter_groups, set_trainable

    cfg = MemoryTrainConfig(output_dir="x", lora={"r": 2}, memory_lr=3e-2, train={"lr": 1e-4, "weight_decay": 0.1})
    m = InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8))
    add_lora(m, cfg.lora)
    counts = set_trainable(m, cfg)
    groups = {g["name"]: g for g in parameter_groups(m, cfg)}
    mem = groups["memory"]
    assert mem["lr"] == 3e-2 and mem["weight_decay"] == 0.0
    assert {id(p) for p in mem["params"]} == {id(a.memory_gate) for a in m.attention_layers()}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["decay"]["lr"] == 1e-4
    assert all(p.requires_grad for g in groups.values() for p in g["params"])
    assert counts["memory"] == 2 * 4 and 0 < counts["other"] < 10_000  # gates + LoRA only; base frozen
    assert not m.base.model.embed_tokens.weight.requires_grad


def test_gate_telemetry_warns_at_half_and_saturation():
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.training import gate_warnings, memory_telemetry

    m = InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8, gate_init=0.0))
    tel = memory_telemetry(m)
    assert tel["gate_frac_at_half"] == 1.0
    assert any("sit at 0.5" in w for w in gate_warnings(tel, 100, 10))
    assert gate_warnings(tel, 5, 10) == []  # too early to judge
    with torch.no_grad():
        for a in m.attention_layers():
            a.memory_gate.fill_(6.0)
    tel = memory_telemetry(m)
    assert any("saturated" in w for w in gate_warnings(tel, 100, 10))
    m2 = InfiniAttentionLM(tiny_llama(), InfiniAttentionConfig(segment_length=8))
    assert gate_warnings(memory_telemetry(m2), 100, 10) == []


def test_train_infini_with_lora_checkpoints_resume_and_eval(tmp_path, tiny_dir, caplog):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(CONFIGS / "tiny-infini.yaml"),
                                  "--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    assert (out / "checkpoint-2" / "model.safetensors").is_file()
    tel = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert tel and all("gate_mean" in t and "memory_M_norm" in t for t in tel)
    assert any(t.get("memory_M_norm", 0) > 0 for t in tel)
    # gates moved from their init (they get gradient and their own learning rate)
    from retromem.memory.infini_attention import InfiniAttentionLM

    trained = InfiniAttentionLM.from_pretrained(out / "final")
    assert (trained.gates() - torch.sigmoid(torch.tensor(-2.0))).abs().max() > 1e-3
    assert not any("lora" in k for k in trained.state_dict())  # LoRA merged into the saved model
    # resume: continues from checkpoint-2 up to step 4
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(CONFIGS / "tiny-infini.yaml"),
                                  "--model", str(tiny_dir), "--output-dir", str(out), "--max-steps", "4", "--resume"])
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "checkpoint-2" in r.output and "trained 4 steps" in r.output
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # evaluation of the saved model in all three modes, with plots
    ev = tmp_path / "eval"
    r = CliRunner().invoke(main, ["memory", "eval", "--model", str(out / "final"), "--lengths", "96,160",
                                  "--depths", "0,1", "--ppl-length", "96", "--ppl-docs", "1", "--out", str(ev)])
    assert r.exit_code == 0, r.output
    res = json.loads((ev / "results.json").read_text())
    modes = {row["mode"] for row in res["passkey"]}
    assert modes == {"memory", "knocked_out", "other_doc", "local_ungated", "full"}  # issue 16: honest knock-out + controls
    comps = {row["compressions"] for row in res["passkey"]}
    assert max(comps) == 4 and min(comps) >= 0  # needle at 0% of 160 tokens, segments of 32: 4 boundaries
    assert set(res["summary"]["perplexity"]) == {"memory", "knocked_out", "other_doc", "local_ungated", "full"}
    assert (ev / "passkey.png").stat().st_size > 1000 and (ev / "perplexity.png").is_file()
    # continuing from the saved model: its own settings rule, and a config that contradicts them is refused
    cont = tmp_path / "continue.yaml"
    cont.write_text(f"output_dir: {tmp_path / 'cont'}\nmodel: {out / 'final'}\ntokenizer: gpt2\nmodule: infini\n"
                    "infini:\n  segment_length: 64\n")
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(cont)])
    assert r.exit_code == 2 and "segment_length=64" in r.output and "segment_length=32" in r.output, r.output


def test_train_autocompressor_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=2, n_head=2, n_positions=256)).save_pretrained(d)
    out = tmp_path / "ac"
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(CONFIGS / "tiny-autocompressor.yaml"),
                                  "--model", str(d), "--output-dir", str(out), "--max-steps", "2"])
    assert r.exit_code == 0, r.output
    from retromem.memory.autocompressor import AutoCompressorLM

    m = AutoCompressorLM.from_pretrained(out / "final")
    base = GPT2LMHeadModel.from_pretrained(d)
    eos = base.get_input_embeddings().weight[50256]
    assert (m.summary_embeddings.detach() - eos).abs().max() > 1e-4  # the summary embeddings learned
    tel = [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]
    assert all("summary_embedding_norm" in t for t in tel)


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nmodule: infini\ninfini:\n  segment_length: 0\n")
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "segment_length" in r.output and "error:" in r.output
    bad.write_text("output_dir: x\nmodule: infini\nlearning_rate: 1\n")
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "learning_rate" in r.output
    bad.write_text("output_dir: x\nmodule: infini\ninfini:\n  gate_init: -100\n")
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "gate_init" in r.output
    r = CliRunner().invoke(main, ["memory", "eval", "--lengths", "abc"])
    assert r.exit_code == 2 and "--lengths" in r.output
    # an unsupported architecture through the command line (GPT-2 is supported since issue 17; OPT is not)
    from transformers import OPTConfig, OPTForCausalLM

    d = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                             word_embed_proj_dim=32, max_position_embeddings=256)).save_pretrained(d)
    bad.write_text(f"output_dir: {tmp_path / 'o'}\nmodel: {d}\ntokenizer: gpt2\nmodule: infini\n")
    r = CliRunner().invoke(main, ["memory", "train", "--config", str(bad)])
    assert r.exit_code == 2 and "model_type" in r.output


def test_passkey_needle_min_compressions_puts_every_needle_in_an_earlier_segment(tmp_path):
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.memory.passkey import NEEDLE
    from retromem.memory.training import MemoryDataset, MemoryTrainConfig
    from retromem.errors import ConfigError

    tok = load_hf_tokenizer("gpt2")

    def spans(cfg, seg=32):  # (segment of the first answer prediction, segment of the needle's last token)
        ds = MemoryDataset(cfg, tok)
        assert len(ds.passkeys) == cfg.num_examples
        for ex, (ids, labels) in zip(ds.passkeys, ds.items):
            assert ids[ex.needle_start:ex.needle_start + ex.needle_len] == tok(NEEDLE.format(key=ex.key))["input_ids"]
            assert labels[ex.answer_start - 1] == -100 and labels[ex.answer_start] == ids[ex.answer_start]
        return [((ex.answer_start - 1) // seg, (ex.needle_start + ex.needle_len - 1) // seg) for ex in ds.passkeys]

    base = dict(output_dir=str(tmp_path), module="infini", infini={"segment_length": 32}, train_length=160,
                num_examples=40)
    anywhere = spans(MemoryTrainConfig(**base))
    assert any(q == n for q, n in anywhere)  # without the option some needles share the question's segment
    for min_back in (1, 3):
        placed = spans(MemoryTrainConfig(**base, needle_min_compressions=min_back))
        assert all(q - n >= min_back for q, n in placed), placed
    with pytest.raises(ConfigError, match="needle_min_compressions"):
        MemoryDataset(MemoryTrainConfig(**base, needle_min_compressions=5), tok)  # 160 tokens cannot hold 5 boundaries
    # a share of the needles in the question's own segment, the rest at least one boundary back
    mixed = spans(MemoryTrainConfig(**{**base, "infini": {"segment_length": 64}, "train_length": 192},
                                    needle_min_compressions=1, local_needle_share=0.3), seg=64)
    n_local = sum(q == n for q, n in mixed)
    assert 0 < n_local < len(mixed) and all(q == n or q - n >= 1 for q, n in mixed)
    with pytest.raises(ConfigError, match="needle_min_compressions"):
        MemoryTrainConfig(**base, needle_min_compressions=-1)
    with pytest.raises(ConfigError, match="local_needle_share"):
        MemoryTrainConfig(**base, local_needle_share=1.5)
    with pytest.raises(ConfigError, match="question's segment"):  # 32 tokens cannot hold needle and question
        MemoryDataset(MemoryTrainConfig(**base, local_needle_share=0.5), tok)
    with pytest.raises(ConfigError, match="passkey"):
        MemoryTrainConfig(**{**base, "data": "text"}, needle_min_compressions=1)
    with pytest.raises(ConfigError, match="fixed segment length"):
        MemoryDataset(MemoryTrainConfig(output_dir=str(tmp_path), module="autocompressor", train_length=160,
                                        num_examples=2, needle_min_compressions=1,
                                        autocompressor={"segment_min": 32, "segment_max": 48}), tok)


def test_passkey_text_weight_splits_each_example_loss_between_text_and_answer(tmp_path):
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.memory.training import MemoryDataset, MemoryTrainConfig
    from retromem.errors import ConfigError

    tok = load_hf_tokenizer("gpt2")
    cfg = MemoryTrainConfig(output_dir=str(tmp_path), infini={"segment_length": 32}, train_length=96, num_examples=6,
                            passkey_text_weight=0.25)
    ds = MemoryDataset(cfg, tok)
    for i, ex in enumerate(ds.passkeys):
        item = ds[i]
        w = item["label_weights"]
        assert torch.equal(item["labels"], item["input_ids"])  # every token is a target
        assert w[0] == 0 and torch.isclose(w.sum(), torch.tensor(1.0))
        assert torch.isclose(w[ex.answer_start:].sum(), torch.tensor(0.75))  # the answer keeps 1 - 0.25
        assert torch.isclose(w[1:ex.answer_start].sum(), torch.tensor(0.25))
    plain = MemoryDataset(MemoryTrainConfig(output_dir=str(tmp_path), infini={"segment_length": 32}, train_length=96,
                                            num_examples=6), tok)
    assert "label_weights" not in plain[0] and int((plain[0]["labels"] != -100).sum()) == 96 - plain.passkeys[0].answer_start
    with pytest.raises(ConfigError, match="passkey_text_weight"):
        MemoryTrainConfig(output_dir=str(tmp_path), passkey_text_weight=1.0)
    with pytest.raises(ConfigError, match="applies to `data: passkey`"):
        MemoryTrainConfig(output_dir=str(tmp_path), data="text", passkey_text_weight=0.5)


def test_segment_loss_weights_each_label():
    import torch.nn.functional as F

    from retromem.memory.common import SegmentLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 10, 7)
    labels = torch.randint(0, 7, (2, 10))
    labels[0, 3] = -100
    w = torch.rand(2, 10)
    loss = SegmentLoss(labels, w)
    for start in range(0, 10, 4):  # segments of 4: the same loss as one pass over the whole input
        loss.add(logits[:, start:start + 4], start, min(start + 4, 10))
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none")
    keep = (labels[:, 1:] != -100).reshape(-1).float()
    expected = (ce * w[:, 1:].reshape(-1) * keep).sum() / (w[:, 1:].reshape(-1) * keep).sum()
    torch.testing.assert_close(loss.value(), expected)
    ones = SegmentLoss(labels, torch.ones(2, 10))
    plain = SegmentLoss(labels)
    for seg_loss in (ones, plain):
        seg_loss.add(logits, 0, 10)
    torch.testing.assert_close(ones.value(), plain.value())
    with pytest.raises(ValueError, match="label_weights"):
        SegmentLoss(labels, torch.ones(2, 9))
    with pytest.raises(ValueError, match="label_weights"):
        SegmentLoss(labels, -torch.ones(2, 10))
