"""Command: `retromem retro speculate`, greedy generation with REST drafts from an n-gram index (the
library is :mod:`retromem.retro.speculative`), optionally beside plain greedy decoding."""

from __future__ import annotations

import click

from retromem.cli._common import handle_errors

# RestConfig's defaults, shown in --help (the CLI does not import torch to print help); a test checks
# that they match the dataclass
DEFAULTS = {"max_suffix": 16, "min_suffix": 2, "max_occurrences": 256, "depth": 8, "max_nodes": 32, "min_share": 0.0}


@click.command("speculate")
@click.argument("prompt")
@click.option("--ngram-index", required=True, type=click.Path(exists=True, file_okay=False),
              help="n-gram index (`retromem index ngram build`) over a datastore tokenized with the model's tokenizer.")
@click.option("--model", default="smollm2-135m", show_default=True,
              help="Causal LM: a built-in name, a local directory or a hub id.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--max-suffix", type=int, default=DEFAULTS["max_suffix"], show_default=True,
              help="Longest context suffix looked up in the index.")
@click.option("--min-suffix", type=int, default=DEFAULTS["min_suffix"], show_default=True,
              help="Shortest suffix worth drafting from.")
@click.option("--max-occurrences", type=int, default=DEFAULTS["max_occurrences"], show_default=True,
              help="Occurrences of the suffix read (evenly sampled).")
@click.option("--depth", type=int, default=DEFAULTS["depth"], show_default=True, help="Deepest draft token.")
@click.option("--max-nodes", type=int, default=DEFAULTS["max_nodes"], show_default=True,
              help="Draft tokens verified per forward pass.")
@click.option("--min-share", type=float, default=DEFAULTS["min_share"], show_default=True,
              help="Drop draft nodes followed by under this share of the occurrences read.")
@click.option("--compare-greedy", is_flag=True, help="Also run plain greedy decoding; report speed and exactness.")
@click.option("--sample", is_flag=True, help="Sampling (refused: REST here is greedy only).")
@click.option("--threads", type=int, default=2, show_default=True)
@handle_errors
def speculate(prompt: str, ngram_index: str, model: str, max_new_tokens: int, max_suffix: int, min_suffix: int,
              max_occurrences: int, depth: int, max_nodes: int, min_share: float, compare_greedy: bool, sample: bool,
              threads: int) -> None:
    """Continue PROMPT greedily with REST: drafts from the n-gram index, verified as a tree in one
    forward pass per step; the text is the model's own greedy text."""
    import time

    import torch

    from retromem.index.ngram import NgramIndex
    from retromem.models import load_causal_lm
    from retromem.retro.speculative import RestConfig, check_index_tokenizer, generate_rest

    cfg = RestConfig(max_suffix=max_suffix, min_suffix=min_suffix, max_occurrences=max_occurrences, depth=depth,
                     max_nodes=max_nodes, min_share=min_share)
    torch.set_num_threads(threads)
    idx = NgramIndex(ngram_index)
    lm, tok = load_causal_lm(model)
    check_index_tokenizer(idx, tok, lm)
    ids, st = generate_rest(lm, tok, idx, prompt, max_new_tokens, cfg, do_sample=sample, check_tokenizer=False)
    n_prompt = ids.shape[1] - st.new_tokens
    click.echo(prompt + click.style(tok.decode(ids[0, n_prompt:]), fg="green"))
    click.echo(f"rest     {st.new_tokens} tokens in {st.total_seconds:.2f}s ({st.new_tokens / st.total_seconds:.2f} "
               f"tok/s), {st.steps + 1} forward passes: mean accepted length {st.mean_accepted:.2f}, "
               f"{st.mean_draft_nodes:.1f} draft nodes per step, retrieval {st.retrieval_seconds:.2f}s, "
               f"tree passes {st.forward_seconds:.2f}s", err=True)
    if compare_greedy:
        x = ids[:, :n_prompt]
        t = time.perf_counter()
        with torch.inference_mode():
            g = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        sec = time.perf_counter() - t
        n = g.shape[1] - n_prompt
        same = g[0].tolist() == ids[0].tolist()
        click.echo(f"greedy   {n} tokens in {sec:.2f}s ({n / sec:.2f} tok/s); REST "
                   f"{(st.new_tokens / st.total_seconds) / (n / sec):.2f}x; identical output: {'yes' if same else 'NO'}",
                   err=True)
