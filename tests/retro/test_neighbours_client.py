"""The neighbours job's own retrieval client: a client the job opens from a ``--server`` spec is
closed when the job ends (finished or failed); a retriever the caller passed stays open (the
caller's to close). A real server on loopback, no stand-ins."""

from __future__ import annotations

import pytest

from retromem.errors import ConfigError
from retromem.retro.neighbours import NeighboursConfig, RetrieverSpec, compute_neighbours


def test_a_client_opened_from_a_server_spec_is_closed_with_the_job(retro_ds, retro_index, tmp_path):
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    opened = []

    class Recorded(RetrieverSpec):  # the spec's own open(), noting what it returned
        def open(self, ds):
            opened.append(super().open(ds))
            return opened[-1]

    kw = dict(datastore=str(retro_ds.path), k=2, split="all", query="text", max_chunks=20)
    running = start_server(ServerConfig(datastore=str(retro_ds.path), dense=str(retro_index.path), port=0, workers=2))
    try:
        res = compute_neighbours(NeighboursConfig(out=str(tmp_path / "nb"), **kw), spec=Recorded(server=running.target),
                                 progress=False)
        assert res.manifest["complete"] and len(opened) == 1
        with pytest.raises(ValueError, match="closed channel"):
            opened[0].info()
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "notes.txt").write_text("not neighbours")
        with pytest.raises(ConfigError, match="refusing to write into it"):  # a failed job closes it too
            compute_neighbours(NeighboursConfig(out=str(tmp_path / "taken"), **kw), spec=Recorded(server=running.target),
                               progress=False)
        with pytest.raises(ValueError, match="closed channel"):
            opened[1].info()
        with RetrievalClient(running.target) as mine:  # given by the caller: left open
            compute_neighbours(NeighboursConfig(out=str(tmp_path / "nb2"), **kw), mine, progress=False)
            assert mine.info().datastore.num_chunks == retro_ds.num_chunks
    finally:
        running.stop(0)
