"""Command: `retromem plan` (disk, memory and build time of the whole stack at any size: datastore, dedup,
suffix array, FM-index, embeddings, dense index and the neighbours job)."""

from __future__ import annotations

import dataclasses
import json

import click

from retromem.cli._common import handle_errors, parse_number


@click.command("plan")
@click.option("--tokens", default="1e12", show_default=True, help="Datastore size in tokens (e.g. 2e12).")
@click.option("--chunk-length", type=int, default=64, show_default=True)
@click.option("--dim", type=int, default=384, show_default=True, help="Embedder dimension (all-MiniLM-L6-v2: 384).")
@click.option("--factory", default="auto", show_default=True,
              help="FAISS factory string; auto: OPQ64_384,IVF<nlist>_HNSW32,PQ64 with nlist the power of two nearest "
                   "8 sqrt(vectors), inside FAISS's guideline 4..16 sqrt(vectors).")
@click.option("--unit-costs", type=click.Path(dir_okay=False), default=None,
              help="JSON of unit costs (default: the ones measured for this release; see --measure).")
@click.option("--measure", is_flag=True, help="Measure unit costs on this machine first (about a minute).")
@click.option("--nprobe", type=int, default=64, show_default=True,
              help="Inverted lists one query scans (for the bytes read per query from on-disk lists).")
@click.option("--measure-from", "measure_from", type=click.Path(exists=True), default=None,
              help="A built datastore (text, document and disk ratios), or the rows JSONL of "
                   "benchmarks/scale_curve.py (every rate, size and memory cost of the stack measured there).")
@click.option("--fit-up-to", "fit_up_to", default=None,
              help="With rows: use only the scales up to this many tokens (check a plan on a size it did not see).")
@click.option("--ngram-shard-tokens", default=None, help="Suffix-array shard size (build-ngram --shard-tokens; default 1G, "
              "or with rows the size they were built with, 64M).")
@click.option("--fm-shard-size", default=None, help="FM-index shard size (build-fm --shard-size; default 512MiB, "
              "or with rows the size they were built with, 128MiB).")
@click.option("--fm", type=click.Path(file_okay=False), default=None, help="With --measure-from: its FM-index (bytes per text byte).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the predicted curves (1e6..1e13 tokens) to this PNG.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def plan_cmd(tokens: str, chunk_length: int, dim: int, factory: str, unit_costs: str | None, measure: bool,
             nprobe: int, measure_from: str | None, fit_up_to: str | None, ngram_shard_tokens: str | None,
             fm_shard_size: str | None, fm: str | None, plot: str | None, as_json: bool) -> None:
    """Predict disk, memory and CPU/GPU hours of every part of the stack for a datastore of --tokens."""
    from retromem.errors import ConfigError
    from pathlib import Path

    from retromem.cli._common import parse_size
    from retromem.index.plan import (StackCosts, UnitCosts, dense_costs_from_rows, describe_stack, measure_unit_costs,
                                     plot_plan, predict, predict_stack, stack_costs_from_artifacts, stack_costs_from_rows)

    n_tokens = parse_number(tokens, "--tokens", int, example="1e12")
    if fm and not measure_from:
        raise ConfigError("--fm needs --measure-from (the datastore it was built from)")
    costs = measure_unit_costs() if measure else UnitCosts.load(unit_costs)
    stack_costs = StackCosts.load(unit_costs)
    if measure_from and Path(measure_from).is_file():
        if fm:
            raise ConfigError("--fm goes with a datastore directory in --measure-from, not with scale-curve rows")
        stack_costs = stack_costs_from_rows(
            measure_from, stack_costs,
            max_tokens=parse_number(fit_up_to, "--fit-up-to", float, example="4e8") if fit_up_to else None)
        costs = dense_costs_from_rows(  # FAISS train/add rates from the rows' dense rows, where they have some
            measure_from, costs, max_tokens=parse_number(fit_up_to, "--fit-up-to", float, example="4e8") if fit_up_to else None)
    elif measure_from:
        stack_costs = stack_costs_from_artifacts(measure_from, fm, base=stack_costs)
    if fit_up_to and not (measure_from and Path(measure_from).is_file()):
        raise ConfigError("--fit-up-to needs --measure-from ROWS.jsonl (the rows of benchmarks/scale_curve.py)")
    if ngram_shard_tokens:
        stack_costs = dataclasses.replace(stack_costs, ngram_shard_tokens=parse_size(ngram_shard_tokens, "--ngram-shard-tokens"))
    if fm_shard_size:
        stack_costs = dataclasses.replace(stack_costs, fm_shard_text_bytes=parse_size(fm_shard_size, "--fm-shard-size"))
    p = predict(n_tokens, chunk_length=chunk_length, dim=dim, factory=factory, costs=costs)
    s = predict_stack(p, nprobe=nprobe, costs=stack_costs)
    if as_json:
        click.echo(json.dumps({**p.as_dict(), "stack": dataclasses.asdict(s)}, indent=2))
    else:
        for line in p.describe() + describe_stack(s, p, nprobe):
            click.echo(line)
    if plot:
        plot_plan(plot, chunk_length=chunk_length, dim=dim, factory=factory, costs=costs)
        click.echo(f"plot        {plot}")
