"""Command: `retromem plan` (disk, memory and build time of a datastore and its dense index at any size)."""

from __future__ import annotations

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
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the predicted curves (1e6..1e13 tokens) to this PNG.")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def plan_cmd(tokens: str, chunk_length: int, dim: int, factory: str, unit_costs: str | None, measure: bool,
             plot: str | None, as_json: bool) -> None:
    """Predict chunks, embedding and index bytes, search RAM and build time for a datastore of --tokens."""
    from retromem.index.plan import UnitCosts, measure_unit_costs, plot_plan, predict

    n_tokens = parse_number(tokens, "--tokens", int, example="1e12")
    costs = measure_unit_costs() if measure else UnitCosts.load(unit_costs)
    p = predict(n_tokens, chunk_length=chunk_length, dim=dim, factory=factory, costs=costs)
    if as_json:
        click.echo(json.dumps(p.as_dict(), indent=2))
    else:
        for line in p.describe():
            click.echo(line)
    if plot:
        plot_plan(plot, chunk_length=chunk_length, dim=dim, factory=factory, costs=costs)
        click.echo(f"plot        {plot}")
