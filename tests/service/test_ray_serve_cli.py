"""`retromem serve --engine ray --deployment FILE` end to end: the command, run as its own process,
starts a local Ray of its own, deploys the shard and the fan-out as Ray Serve deployments and
serves the gRPC front; a real call through that front answers as the shard's index in process; on
SIGTERM the command drains, deletes the application, stops the Ray it started (no process of that
Ray is left) and exits 0."""

from __future__ import annotations

import os
import re
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    """The first line of ``proc``'s output matching ``pattern``, or None once ``timeout`` passed or it
    exited. Lines come from a reader thread: a select() on the pipe misses lines that an earlier
    readline() already pulled into the file object's buffer (two lines written together)."""
    lines: queue.Queue = getattr(proc, "_lines", None) or queue.Queue()
    if not hasattr(proc, "_lines"):
        proc._lines = lines  # type: ignore[attr-defined]

        def reader() -> None:
            for x in iter(proc.stdout.readline, ""):
                lines.put(x)
            lines.put(None)  # end of the output

        threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            lines.put(None)  # a later call sees the end too
            return None
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
        stopped = _read_until(proc, r"stopped: ", 120, seen)
        proc.wait(120)
        assert proc.returncode == 0, "".join(seen[-40:])
        assert stopped and "stopped: in-flight requests drained" in stopped.string, "".join(seen[-40:])
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
