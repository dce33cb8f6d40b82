"""The query commands read artifacts at URLs through their local mirror (retromem.storage.local_dir):
`datastore info` / `show`, `index dense search`, `index ngram query` / `score`, `index fm query`, and
`retromem serve`'s --datastore / --dense / --ngram (and a Ray deployment file's shard paths) answer
from a real fsspec ``memory://`` copy of a small real datastore and its indexes exactly as from the
local directories."""

from __future__ import annotations

import uuid

import fsspec
import pytest
from click.testing import CliRunner

from retromem import storage
from retromem.cli import main
from retromem.errors import ConfigError


@pytest.fixture
def remote(service_stores, tmp_path, monkeypatch):
    """Shard "a" of the service stores (datastore, dense and n-gram index) copied to memory://."""
    monkeypatch.setenv("RETROMEM_CACHE", str(tmp_path / "cache"))
    fs, root = fsspec.filesystem("memory"), f"q{uuid.uuid4().hex[:10]}"
    built = service_stores["a"]
    for name, local in (("ds", built.datastore), ("dense", built.dense), ("ngram", built.ngram)):
        fs.put(str(local), f"/{root}/{name}", recursive=True)
    yield built, f"memory://{root}"
    fs.rm(f"/{root}", recursive=True)


def _run(*args: str) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res.stdout  # not stderr: progress bars (model loading) differ run to run


def test_query_commands_answer_from_a_url_as_from_the_directory(remote):
    built, url = remote
    ds, ds_url = str(built.datastore), f"{url}/ds"
    info = _run("datastore", "info", ds_url)
    assert info == _run("datastore", "info", ds) and "on disk" in info
    assert _run("datastore", "show", ds_url, "7", "--json") == _run("datastore", "show", ds, "7", "--json")
    for verb in ("count", "find", "ntd"):
        args = ["index", "ngram", "query"], [" the", "--verb", verb, "--json"]
        assert _run(*args[0], f"{url}/ngram", *args[1], "--datastore", ds_url) == _run(*args[0], str(built.ngram), *args[1])
    assert _run("index", "ngram", "score", f"{url}/ngram", "so the file is", "--datastore", ds_url, "--json") == \
        _run("index", "ngram", "score", str(built.ngram), "so the file is", "--json")


@pytest.mark.slow  # loads the embedder twice
def test_dense_search_from_a_url(remote):
    built, url = remote
    q = ["index", "dense", "search"], ["how to open a file", "-k", "4", "--json"]
    got = _run(*q[0], f"{url}/dense", *q[1], "--datastore", f"{url}/ds")
    assert got == _run(*q[0], str(built.dense), *q[1]) and '"chunk_id"' in got


def test_fm_query_from_a_url_built_at_a_url(remote, tmp_path):
    built, url = remote
    _run("index", "fm", "build", f"{url}/ds", "--out", f"{url}/fm")
    _run("index", "fm", "build", str(built.datastore), "--out", str(tmp_path / "fm"))
    assert not storage._slot("staging", f"{url}/fm").exists()  # put, then the staging copy dropped
    got = _run("index", "fm", "query", f"{url}/fm", "file", "--limit", "2")
    assert got == _run("index", "fm", "query", str(tmp_path / "fm"), "file", "--limit", "2") and "occurrences" in got
    # --overwrite through the command line: the URL then holds exactly the new index's files
    fs = fsspec.filesystem("memory")
    listing = lambda: sorted(p.rsplit("/fm/", 1)[1] for p in fs.find(f"{url}/fm"))  # noqa: E731
    _run("index", "fm", "build", f"{url}/ds", "--out", f"{url}/fm", "--shard-size", "3000", "--overwrite")
    listing_one = sorted(p.relative_to(tmp_path / "fm").as_posix() for p in (tmp_path / "fm").rglob("*")
                         if p.is_file() and p.name != ".retromem.lock")  # the one-shard build's files
    assert len(listing()) > len(listing_one)
    assert _run("index", "fm", "query", f"{url}/fm", "file", "--limit", "2") == got  # same answers, more shards
    _run("index", "fm", "build", f"{url}/ds", "--out", f"{url}/fm", "--overwrite")
    assert listing() == listing_one  # the sharded build's files are gone, not left beside the new ones


def test_serve_opens_urls(remote):
    """The server's backend opened from URLs answers as the one opened from the directories; the
    command line hands URLs to the openers (a URL with nothing there is one error line naming it)."""
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server

    built, url = remote
    servers = [start_server(ServerConfig(datastore=f"{url}/ds", dense=f"{url}/dense", ngram=f"{url}/ngram", port=0,
                                         workers=2)),
               start_server(ServerConfig(datastore=str(built.datastore), dense=str(built.dense), ngram=str(built.ngram),
                                         port=0, workers=2))]
    try:
        with RetrievalClient(servers[0].target) as a, RetrievalClient(servers[1].target) as b:
            assert a.info().datastore == b.info().datastore and a.info().dense.ntotal == b.info().dense.ntotal > 0
            assert a.count(" the") == b.count(" the") and a.count(" the").count > 0
            assert a.search(["open a file"], 3).chunk_ids.tolist() == b.search(["open a file"], 3).chunk_ids.tolist()
    finally:
        for s in servers:
            s.stop(0)
    res = CliRunner().invoke(main, ["serve", "--datastore", f"{url}/nothing", "--port", "0"])
    assert res.exit_code == 2 and f"'{url}/nothing' holds no file" in res.output


def test_ray_deployment_file_takes_urls(remote):
    from retromem.service.ray_serve import parse_ray_deployment

    _, url = remote
    shard = {"name": "a", "datastore": f"{url}/ds", "ngram": f"{url}/ngram", "datastore_id": "x", "first_doc": 0,
             "first_chunk": 0}
    dep = parse_ray_deployment({"shards": [shard]})
    assert (dep.shards[0].datastore, dep.shards[0].ngram) == (f"{url}/ds", f"{url}/ngram")  # each replica mirrors them
    with pytest.raises(ConfigError, match=r"`shards\[0\].ngram` must be a URL that holds the artifact"):
        parse_ray_deployment({"shards": [dict(shard, ngram=f"{url}/nothing")]})
    with pytest.raises(ConfigError, match=r"`shards\[0\].dense` .*unknown protocol 'zzz'"):
        parse_ray_deployment({"shards": [dict(shard, dense="zzz://b/dense")]})
