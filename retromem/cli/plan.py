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
@click.option("--factory", default="OPQ64_384,IVF262144_HNSW32,PQ64", show_default=True)
@click.option("--unit-costs", type=click.Path(dir_okay=False), default=None,
              help="JSON of unit costs (default: the ones measured for this release; see --measure).")
@click.option("--measure", is_flag=True, help="Measure unit costs on this machine first (about a minute).")
@click.option("--nprobe", type=int, default=64, show_default=True,
              help="Inverted lists one query scans (for the bytes read per query from on-disk lists).")
@click.option("--measure-from", "measure_from", type=click.Path(file_okay=False), default=None,
              help="A built datastore: take text, document and disk ratios from it instead of the shipped ones.")
@click.option("--fm", type=click.Path(file_okay=False), default=None, help="With --measure-from: its FM-index (bytes per text byte).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the predicted curves (1e6..1e13 tokens) to this PNG.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def plan_cmd(tokens: str, chunk_length: int, dim: int, factory: str, unit_costs: str | None, measure: bool,
             nprobe: int, measure_from: str | None, fm: str | None, plot: str | None, as_json: bool) -> None:
    """Predict disk, memory and CPU/GPU hours of every part of the stack for a datastore of --tokens."""
    from retromem.errors import ConfigError
    from retromem.index.plan import (StackCosts, UnitCosts, describe_stack, measure_unit_costs, plot_plan, predict,
                                     predict_stack, stack_costs_from_artifacts)

    n_tokens = parse_number(tokens, "--tokens", int, example="1e12")
    if fm and not measure_from:
        raise ConfigError("--fm needs --measure-from (the datastore it was built from)")
    costs = measure_unit_costs() if measure else UnitCosts.load(unit_costs)
    stack_costs = StackCosts.load(unit_costs)
    if measure_from:
        stack_costs = stack_costs_from_artifacts(measure_from, fm, base=stack_costs)
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
