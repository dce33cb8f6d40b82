"""The ``retromem`` command line: the roof of the house, which nothing imports.

One module per command group, each defining its own group; this module makes the root group
and adds them. Library errors (:class:`retromem.errors.RetromemError`) become a one-line
``error:`` message and exit status 2 (see :func:`retromem.cli._common.handle_errors`).

Command names follow one scheme, ``retromem <area> [<kind>] <verb>``:

    retromem datastore build|info|show|verify
    retromem index verify | update
    retromem index dense embed|build|search|tune|eval
    retromem index ngram build|query|score|eval-interpolation
    retromem index fm build|query
    retromem index lexical build|search
    retromem serve | retromem query <rpc>
    retromem retro neighbours|train|eval|generate|speculate
    retromem ralm eval|qa
    retromem memory train|eval|compress
    retromem plan | retromem demo

The spellings before this scheme (``index embed``, ``index build-dense``, ``index search``,
``index tune``, ``index eval-dense``, ``index build-ngram``, ``index ngram-query``,
``index build-fm``, ``index fm-query``, ``ngram score``, ``ngram eval-interpolation``) still
work as hidden aliases.
"""

from __future__ import annotations

import copy

import click

from retromem import __version__
from retromem.cli import datastore, dense, lexical, memory, ngram, plan, ralm, retro, service, speculate
from retromem.cli.demo import demo
from retromem.logging import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="retromem")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def main(verbose: int, quiet: bool) -> None:
    """retromem: datastores, retrieval indexes, a retrieval service, RETRO and memory modules."""
    setup_logging(-1 if quiet else verbose)


@click.group("index")
def index() -> None:
    """Dense (FAISS) and exact n-gram (suffix array, FM-index) indexes over a datastore."""


def _alias(group: click.Group, name: str, command: click.Command) -> None:
    """Add ``command`` to ``group`` under an old spelling, hidden from --help."""
    old = copy.copy(command)
    old.hidden = True
    group.add_command(old, name)


index.add_command(dense.group)
index.add_command(dense.index_update)
index.add_command(datastore.index_verify)
index.add_command(ngram.group)
index.add_command(ngram.fm_group)
index.add_command(lexical.group)
for _old, _group, _verb in (("embed", dense.group, "embed"), ("build-dense", dense.group, "build"),
                            ("search", dense.group, "search"), ("tune", dense.group, "tune"),
                            ("eval-dense", dense.group, "eval"), ("build-ngram", ngram.group, "build"),
                            ("ngram-query", ngram.group, "query"), ("build-fm", ngram.fm_group, "build"),
                            ("fm-query", ngram.fm_group, "query")):
    _alias(index, _old, _group.commands[_verb])

retro.group.add_command(speculate.speculate)

_old_ngram = click.Group("ngram", hidden=True, help="Old spelling of `retromem index ngram`.")
_alias(_old_ngram, "score", ngram.group.commands["score"])
_alias(_old_ngram, "eval-interpolation", ngram.group.commands["eval-interpolation"])

for _command in (datastore.group, index, service.serve, service.query, retro.group, ralm.group, memory.group,
                 plan.plan_cmd, demo, _old_ngram):
    main.add_command(_command)
