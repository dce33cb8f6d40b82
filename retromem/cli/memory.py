"""Commands: `retromem memory train|eval|compress` (memory modules), and the demo step that streams a
document through Infini-attention and compresses a passage with an AutoCompressor."""

from __future__ import annotations

import json
from pathlib import Path

import click

from retromem.cli._common import handle_errors, parse_list, train_options
from retromem.errors import ConfigError


@click.group("memory")
def group() -> None:
    """Memory modules (AutoCompressor, Infini-attention): fine-tuning and long-context evaluation."""


@group.command("train")
@train_options("memory/infini-smollm2-passkey.yaml")
@click.option("--model", default=None, help="Override `model` (built-in name, local directory, saved memory model).")
@click.option("--tokenizer", default=None, help="Override `tokenizer`.")
@handle_errors
def memory_train(config_path: str, output_dir: str | None, model: str | None, tokenizer: str | None,
                 max_steps: int | None, resume: bool) -> None:
    """Fine-tune an Infini-attention or AutoCompressor model with Hugging Face Trainer.

    On several processes: torchrun --nproc_per_node N -m retromem.cli memory train --config ...
    (or accelerate launch); rank 0 alone writes the final model and prints this summary."""
    from retromem.memory.training import load_train_config, train

    cfg = load_train_config(config_path, output_dir=output_dir, model=model, tokenizer=tokenizer,
                            train={"max_steps": max_steps})
    result = train(cfg, resume=resume)
    if not result.main_process:
        return
    click.echo(f"trained {result.steps} steps (loss {result.train_loss if result.train_loss is None else round(result.train_loss, 4)}); "
               f"trainable: {result.trainable['memory']:,} memory + {result.trainable['other']:,} other parameters"
               + (f"; resumed from {result.resumed_from}" if result.resumed_from else ""))
    click.echo(f"model: {result.final_dir}   telemetry: {result.output_dir / 'telemetry.jsonl'}")


@group.command("eval")
@click.option("--model", "model_path", default="smollm2-135m", show_default=True,
              help="A saved memory model directory, or a base model (wrapped untrained with --module).")
@click.option("--module", type=click.Choice(["infini", "autocompressor"]), default="infini", show_default=True,
              help="Wrapper for a base model (ignored for a saved memory model).")
@click.option("--segment-length", type=int, default=2048, show_default=True, help="Segment length when wrapping a base model.")
@click.option("--lengths", default="1024,2048,4096", show_default=True, help="Passkey input lengths.")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="Needle depths (fractions).")
@click.option("--samples", type=int, default=1, show_default=True, help="Examples per (length, depth); 0 skips passkey.")
@click.option("--ppl-length", type=int, default=4096, show_default=True, help="Tokens per long document.")
@click.option("--ppl-docs", type=int, default=4, show_default=True, help="Long documents for perplexity; 0 skips it.")
@click.option("--full-max", type=int, default=8192, show_default=True, help="Longest input run with full attention.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", default="memory-eval", show_default=True, help="Directory for results.json and plots.")
@handle_errors
def memory_eval(model_path: str, module: str, segment_length: int, lengths: str, depths: str, samples: int,
                ppl_length: int, ppl_docs: int, full_max: int, threads: int, out: str) -> None:
    """Passkey retrieval and long-document perplexity with memory on, knocked out, and full attention."""
    import torch

    from retromem.memory.evaluation import MemoryEvalConfig, evaluate
    from retromem.memory.loading import load_memory_model

    torch.set_num_threads(threads)
    cfg = MemoryEvalConfig(out=out, lengths=parse_list(lengths, "--lengths"), depths=parse_list(depths, "--depths", float),
                           samples=samples, ppl_length=ppl_length, ppl_docs=ppl_docs, full_max=full_max)
    model, tok = load_memory_model(model_path, module, segment_length)
    summary = evaluate(model, tok, cfg, title=f"{Path(model_path).name} ({type(model).__name__})")
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))


@group.command("long-eval")
@click.option("--config", "config_path", default=None,
              help="YAML of LongEvalConfig fields (configs/memory/long-context-smollm2.yaml); flags given win.")
@click.option("--model", "model_path", default="smollm2-135m", show_default=True, help="Any RoPE causal LM (built-in name, directory, hub id).")
@click.option("--methods", default=None, help="Comma-separated: full,streaming_llm,lm_infinite,infllm,sirllm.")
@click.option("--tasks", default=None, help="Comma-separated: passkey,perplexity,recall,qa.")
@click.option("--budget", type=int, default=None, help="KV tokens each bounded method keeps per layer (default 1024).")
@click.option("--segment", type=int, default=None, help="Tokens per forward call (default 512).")
@click.option("--lengths", default=None, help="Passkey input lengths.")
@click.option("--depths", default=None, help="Needle depths (fractions).")
@click.option("--samples", type=int, default=None, help="Passkey examples per (length, depth).")
@click.option("--ppl-lengths", default=None, help="Context lengths for the perplexity of the same last tokens.")
@click.option("--fractions", default=None, help="Squeezed Attention key fractions for the QA task (1 = full attention).")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--out", default=None, help="Directory for rows.jsonl, results.json and the plot (default long-eval).")
@handle_errors
def memory_long_eval(config_path: str | None, model_path: str, methods: str | None, tasks: str | None, budget: int | None,
                     segment: int | None, lengths: str | None, depths: str | None, samples: int | None,
                     ppl_lengths: str | None, fractions: str | None, threads: int, out: str | None) -> None:
    """Training-free long context (LM-Infinite, InfLLM, SirLLM, Squeezed Attention) against full
    attention and StreamingLLM: passkey, long perplexity, multi-turn recall, fixed-context QA."""
    import torch

    from retromem.config import from_dict, load_yaml
    from retromem.memory.long_context_eval import LongEvalConfig, evaluate, markdown_table
    from retromem.models import load_causal_lm

    names = lambda v: None if v is None else tuple(x for x in v.replace(",", " ").split())  # noqa: E731
    flags = {"methods": names(methods), "tasks": names(tasks), "budget": budget, "segment": segment,
             "lengths": parse_list(lengths, "--lengths") if lengths else None,
             "depths": parse_list(depths, "--depths", float) if depths else None, "samples": samples,
             "ppl_lengths": parse_list(ppl_lengths, "--ppl-lengths") if ppl_lengths else None,
             "fractions": parse_list(fractions, "--fractions", float) if fractions else None, "out": out}
    if config_path:
        cfg = load_yaml(config_path, LongEvalConfig, **flags)
    else:
        cfg = from_dict(LongEvalConfig, {"out": "long-eval", **{k: v for k, v in flags.items() if v is not None}})
    torch.set_num_threads(threads)
    model, tok = load_causal_lm(model_path)
    click.echo(f"{model_path}: trained context {model.config.max_position_embeddings} tokens; budget {cfg.budget} tokens")
    summary = evaluate(model, tok, cfg, title=f"{Path(model_path).name}, budget {cfg.budget} tokens")
    click.echo(markdown_table(summary))
    click.echo(f"rows: {Path(cfg.out) / 'rows.jsonl'}   plot: {summary['plot']}")


@group.command("compress")
@click.argument("datastore_path", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", required=True, help="A saved AutoCompressor directory (or a base model, untrained summaries).")
@click.option("--docs", default="", help="Comma-separated doc_ids to compress whole.")
@click.option("--chunks", default="", help="Comma-separated chunk_ids to compress.")
@click.option("--segment-length", type=int, default=2048, show_default=True)
@click.option("--out", required=True, help="safetensors file of summary vectors keyed by content hash.")
@handle_errors
def memory_compress(datastore_path: str, model_path: str, docs: str, chunks: str, segment_length: int, out: str) -> None:
    """Precompute AutoCompressor summary vectors for datastore chunks or documents."""
    from retromem.memory.autocompressor import AutoCompressorLM, SummaryStore, datastore_texts, precompute_summaries
    from retromem.memory.loading import load_memory_model

    model, tok = load_memory_model(model_path, "autocompressor", segment_length)
    if not isinstance(model, AutoCompressorLM):
        raise ConfigError(f"`--model` {model_path} is not an AutoCompressor")
    texts = datastore_texts(datastore_path, chunk_ids=parse_list(chunks, "--chunks") or None,
                           doc_ids=parse_list(docs, "--docs"))
    if not texts:
        raise ConfigError("give `--docs` or `--chunks` to compress")
    path = precompute_summaries(model, tok, texts, out)
    click.echo(f"{len(SummaryStore(path))} summaries in {path}")


def demo(out_dir: Path, datastore_path: Path, echo) -> None:
    import copy
    import time

    import torch

    from retromem.datastore import Datastore
    from retromem.memory.autocompressor import AutoCompressorConfig, AutoCompressorLM
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.models import load_causal_lm

    torch.set_num_threads(2)
    base, tok = load_causal_lm("smollm2-135m")
    ds = Datastore.open(datastore_path)
    doc = max(range(min(ds.num_documents, 40)), key=lambda d: len(ds.document_text(d)))
    ids = tok(ds.document_text(doc), add_special_tokens=False, return_tensors="pt")["input_ids"][:, :512]
    model = InfiniAttentionLM(copy.deepcopy(base), InfiniAttentionConfig(segment_length=128)).eval()
    echo(f"Infini-attention (untrained gates, sigmoid(-2) = {float(model.gates().mean()):.3f}): streaming document "
         f"{doc} ({ids.shape[1]} tokens) in segments of 128")
    mem = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, ids.shape[1], 128):
            piece = ids[:, start:start + 128]
            out = model(piece, labels=piece, memory=mem, keep_logits="none")
            mem = out.memory
            echo(f"  {mem.tokens_seen:5d} tokens seen: memory state {mem.nbytes() / 2**20:.2f} MiB "
                 f"({len(mem.M)} layers x 3 kv heads x 64x64 M + z), segment loss {float(out.loss):.3f}")
    echo(f"  {ids.shape[1] / (time.perf_counter() - t0):.0f} tokens/s; state size is the same after every segment")
    state = out_dir / "memory" / "infini_state.safetensors"
    state.parent.mkdir(parents=True, exist_ok=True)
    mem.save(state)
    echo(f"  memory state saved for resuming the stream: {state}")
    # the untouched base (Infini-attention wrapped a copy), now as an AutoCompressor
    ac = AutoCompressorLM(base, AutoCompressorConfig(summary_length=50, segment_min=256, segment_max=256)).eval()
    passage = ids[:, :256]
    sp = ac.compress(passage, segment_lengths=[256])
    echo(f"AutoCompressor (summary tokens initialised from EOS, NOT fine-tuned: vectors are illustrative): "
         f"{passage.shape[1]} tokens -> soft prompt {tuple(sp.shape)}")
    prompt = tok("\nIn short, this page explains", add_special_tokens=False, return_tensors="pt")["input_ids"]
    gen = ac.generate(prompt, softprompt=sp, max_new_tokens=6)
    echo(f"  generate(softprompt=...): {tok.decode(gen[0, prompt.shape[1]:])!r}")
