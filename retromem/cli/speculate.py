"""Command: `retromem retro speculate`, generation with tree speculative decoding (the library is
:mod:`retromem.retro.speculative` and :mod:`retromem.retro.drafters`): REST drafts from an n-gram
index in process or through the retrieval service, a draft model (the target's early exit), prompt
lookup, or RASD's fused tree; optionally beside plain greedy decoding."""

from __future__ import annotations

import click

from retromem.cli._common import handle_errors

# RestConfig's defaults, shown in --help (the CLI does not import torch to print help); a test checks
# that they match the dataclass
DEFAULTS = {"max_suffix": 16, "min_suffix": 2, "max_occurrences": 256, "depth": 8, "max_nodes": 32, "min_share": 0.0}
DRAFTERS = ("rest", "lookup", "draft-model", "rasd", "rest+lookup")


@click.command("speculate")
@click.argument("prompt")
@click.option("--ngram-index", default=None, type=click.Path(exists=True, file_okay=False),
              help="n-gram index (`retromem index ngram build`) over a datastore tokenized with the model's tokenizer.")
@click.option("--server", default=None, help="Retrieval service address (host:port): REST drafts over gRPC instead.")
@click.option("--drafter", type=click.Choice(DRAFTERS), default="rest", show_default=True,
              help="rest: suffix-array drafts; lookup: the context itself; draft-model: the target's early exit; "
                   "rasd: draft-model tree fused with the REST tree; rest+lookup: both retrieval trees fused.")
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
@click.option("--draft-layers", type=int, default=2, show_default=True, help="Early-exit draft model: layers kept.")
@click.option("--draft-min-prob", type=float, default=0.05, show_default=True,
              help="Prune draft-model nodes whose path probability is below this.")
@click.option("--compare-greedy", is_flag=True, help="Also run plain greedy decoding; report speed and exactness.")
@click.option("--sample", is_flag=True, help="Sample (speculative acceptance rule) instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0: no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@handle_errors
def speculate(prompt: str, ngram_index: str | None, server: str | None, drafter: str, model: str, max_new_tokens: int,
              max_suffix: int, min_suffix: int, max_occurrences: int, depth: int, max_nodes: int, min_share: float,
              draft_layers: int, draft_min_prob: float, compare_greedy: bool, sample: bool, temperature: float,
              top_k: int, top_p: float, seed: int, threads: int) -> None:
    """Continue PROMPT with tree speculative decoding; greedy text is the model's own greedy text, and
    sampled text follows the model's own distribution."""
    import time

    import torch

    from retromem.errors import ConfigError
    from retromem.models import load_causal_lm
    from retromem.retro.drafters import ContextDrafter, FusedDrafter, ModelDraftConfig, ModelDrafter
    from retromem.retro.speculative import RestConfig, RestDrafter, check_index_tokenizer, speculative_generate

    cfg = RestConfig(max_suffix=max_suffix, min_suffix=min_suffix, max_occurrences=max_occurrences, depth=depth,
                     max_nodes=max_nodes, min_share=min_share)
    torch.set_num_threads(threads)
    lm, tok = load_causal_lm(model)
    source = None
    if drafter in ("rest", "rasd", "rest+lookup"):
        if (ngram_index is None) == (server is None):
            raise ConfigError(f"--drafter {drafter} needs exactly one of --ngram-index and --server")
        if server is not None:
            from retromem.service.client import RetrievalClient

            source = RetrievalClient(server)
        else:
            from retromem.index.ngram import NgramIndex

            source = NgramIndex(ngram_index)
            check_index_tokenizer(source, tok, lm)
    parts = {
        "rest": lambda: RestDrafter(source, cfg),
        "lookup": lambda: ContextDrafter(depth=depth, max_nodes=max_nodes),
        "draft-model": lambda: ModelDrafter.early_exit(lm, draft_layers, ModelDraftConfig(min_prob=draft_min_prob)),
    }
    if drafter == "rasd":
        d = FusedDrafter([parts["draft-model"](), parts["rest"]()])
    elif drafter == "rest+lookup":
        d = FusedDrafter([parts["lookup"](), parts["rest"]()], max_nodes)
    else:
        d = parts[drafter]()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    gen = {"max_new_tokens": max_new_tokens, "do_sample": sample}
    if sample:
        gen.update(temperature=temperature, top_k=top_k, top_p=top_p)
        torch.manual_seed(seed)
    out, st = speculative_generate(lm, ids, d, **gen)
    n_prompt = ids.shape[1]
    click.echo(prompt + click.style(tok.decode(out[0, n_prompt:]), fg="green"))
    click.echo(f"{drafter:<8} {st.new_tokens} tokens in {st.total_seconds:.2f}s ({st.new_tokens / st.total_seconds:.2f} "
               f"tok/s), {st.steps + 1} forward passes: mean accepted length {st.mean_accepted:.2f}, "
               f"{st.mean_draft_nodes:.1f} draft nodes per step, drafting {st.retrieval_seconds:.2f}s, "
               f"tree passes {st.forward_seconds:.2f}s", err=True)
    if compare_greedy and not sample:
        t = time.perf_counter()
        with torch.inference_mode():
            g = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        sec = time.perf_counter() - t
        n = g.shape[1] - n_prompt
        same = g[0].tolist() == out[0].tolist()
        click.echo(f"greedy   {n} tokens in {sec:.2f}s ({n / sec:.2f} tok/s); speculative "
                   f"{(st.new_tokens / st.total_seconds) / (n / sec):.2f}x; identical output: {'yes' if same else 'NO'}",
                   err=True)
    if server is not None and source is not None:
        source.close()
