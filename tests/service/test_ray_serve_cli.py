"""`retromem serve --engine ray --deployment FILE` end to end: the command, run as its own process,
starts a local Ray of its own, deploys the shard and the fan-out as Ray Serve deployments and
serves the gRPC front; a real call through that front answers as the shard's index in process; on
SIGTERM the command drains, deletes the application, stops the Ray it started (no process of that
Ray is left) and exits 0."""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def _ray_processes(temp_dir: str) -> list[int]:
    """Processes whose command line names ``temp_dir`` (every process of a Ray started there)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float, seen: list[str]) -> re.Match | None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            seen.append(line)
            m = re.search(pattern, line)
            if m:
                return m
    return None


@pytest.mark.slow  # a local Ray and Serve start in a subprocess (about a minute on 2 loaded cores)
def test_serve_engine_ray_from_the_command_line(stores, tmp_path):
    pytest.importorskip("ray.serve")
    from retromem.index.ngram import NgramIndex
    from retromem.service.client import RetrievalClient

    a = stores["a"]
    ngram = NgramIndex(a.ngram)
    dep = tmp_path / "ray.yaml"
    app = f"t{uuid.uuid4().hex[:8]}"  # never another session's application
    dep.write_text(f"app: {app}\nshards:\n  - name: a\n    datastore: {a.datastore}\n    ngram: {a.ngram}\n"
                   f"    datastore_id: {ngram.datastore.datastore_id}\n    first_doc: 0\n    first_chunk: 0\n"
                   f"    num_cpus: 0\n")
    ray_tmp = tempfile.mkdtemp(prefix="rr", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    # --ray-address local: a Ray of its own, never one another process on this machine runs
    proc = subprocess.Popen([sys.executable, "-m", "retromem.cli", "serve", "--engine", "ray", "--deployment", str(dep),
                             "--ray-address", "local", "--port", "0", "--workers", "2", "--grace", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: list[str] = []
    try:
        m = _read_until(proc, r"serving ray-serve on 127\.0\.0\.1:(\d+)", 300, seen)
        assert m, "".join(seen[-40:])
        assert _ray_processes(ray_tmp), "the command runs a Ray of its own"
        with RetrievalClient(f"127.0.0.1:{m.group(1)}", timeout=60) as c:
            info = c.info()
            assert info.role == "router" and [s.target for s in info.shards] == ["serve:a"]
            assert info.datastore.num_chunks == ngram.datastore.num_chunks
            for q in (" the", " file", "zzqx"):
                assert c.count(q).count == ngram.count(q).count
            assert c.count(" the").count > 0 and c.health() == "SERVING"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        seen.append(rest)
        assert proc.returncode == 0, "".join(seen[-40:])
        assert "stopped: in-flight requests drained" in rest
        deadline = time.monotonic() + 30
        while _ray_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _ray_processes(ray_tmp), "the Ray the command started is stopped with it"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in _ray_processes(ray_tmp):  # only that Ray's processes, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
