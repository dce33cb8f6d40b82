"""`retromem serve` as a real process and `retromem query` against it: every query command, human
and --json output, errors as exit status 2, and SIGTERM draining an in-flight stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from retromem.cli import main
from retromem.service.v1 import retrieval_pb2 as pb

REPO = Path(__file__).resolve().parents[2]


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", "--port", "0", "--torch-threads", "1", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving"):
            port = line.split(" on ")[1].split()[0].rsplit(":", 1)[1]
            return proc, f"127.0.0.1:{port}"
    proc.kill()
    raise AssertionError("server did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def served(service_stores):
    u = service_stores["union"]
    proc, target = _start(["--datastore", str(u.datastore), "--dense", str(u.dense), "--ngram", str(u.ngram)])
    yield proc, target
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def q(target: str, *args: str):
    return CliRunner().invoke(main, ["query", "--target", target, *args], catch_exceptions=False)


def test_every_query_command(served):
    _, t = served
    r = q(t, "info")
    assert r.exit_code == 0 and "datastore" in r.output and "Flat" in r.output and "limits" in r.output
    assert q(t, "health").output.strip() == "SERVING"
    r = q(t, "search", "read a file line by line", "-k", "3")
    assert r.exit_code == 0 and r.output.count("  chunk ") == 3
    hits = json.loads(q(t, "--json", "search", "read a file", "-k", "2").output)
    assert len(hits["results"][0]["chunk_ids"]) == 2 and "text" in hits["results"][0]["chunks"][0]
    r = q(t, "chunks", "5", "6")
    assert r.exit_code == 0 and "chunk 5" in r.output
    count = json.loads(q(t, "--json", "count", " the").output)
    assert int(count["count"]) > 0
    ids = ",".join(str(i) for i in count["token_ids"])
    assert json.loads(q(t, "--json", "count", ids, "--ids").output)["count"] == count["count"]
    assert "P(' Python' | ' the')" in q(t, "prob", " the", "--next", " Python").output
    assert "longest occurring suffix" in q(t, "infgram-prob", "so the Python", "--next", " the").output
    assert len(json.loads(q(t, "--json", "ntd", " the", "--top", "4").output)["tokens"]) == 4
    assert q(t, "infgram-ntd", "in the", "--top", "2").exit_code == 0
    assert "occurrences of ' the'" in q(t, "find", " the", "--limit", "2").output
    assert "matches" in q(t, "search-docs", " file OR  files AND  open").output


def test_query_errors_exit_2_naming_the_field(served):
    _, t = served
    r = CliRunner().invoke(main, ["query", "--target", t, "count", "999999999", "--ids"])
    assert r.exit_code == 2 and "OUT_OF_RANGE" in r.output and "query.ids" in r.output
    r = CliRunner().invoke(main, ["query", "--target", t, "search", "x", "-k", "0"])
    assert r.exit_code == 2 and "INVALID_ARGUMENT" in r.output and "`k`" in r.output


@pytest.mark.slow
def test_sigterm_drains_in_flight_stream_then_exits(service_stores):
    from retromem.service.client import RetrievalClient

    u = service_stores["union"]
    proc, target = _start(["--datastore", str(u.datastore), "--dense", str(u.dense), "--grace", "20"])
    with RetrievalClient(target, retries=0) as c:
        x = c.search(["warm up"], 1).chunk_ids  # noqa: F841  (the server is up)
        gate = threading.Event()

        def requests():
            yield pb.SearchRequest(queries=[pb.Query(text=b"read a file")], k=2)
            gate.wait(20)  # the stream stays open across SIGTERM
            yield pb.SearchRequest(queries=[pb.Query(text=b"sort a list")], k=2)

        stream = c.stub.SearchStream(requests(), timeout=30)
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        from retromem.service.client import ServiceCallError

        with pytest.raises(ServiceCallError):  # new calls are refused while draining
            c.get_chunks([0], timeout=2)
        gate.set()
        rest = list(stream)  # the in-flight stream finishes
    assert first.request_index == 0 and [m.request_index for m in rest] == [1]
    assert proc.wait(30) == 0
    assert "stopped: in-flight requests drained" in proc.stdout.read()
