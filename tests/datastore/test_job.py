"""The resumable-job helper: it never deletes what is not its own kind of artifact, a second job on
the same --out is refused at once (by a real second process), done work is skipped by the
executor, and files and directories are replaced atomically."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retromem.datastore import BuildConfig, build
from retromem.datastore.atomic import atomic_dir, atomic_path
from retromem.datastore.executors import LocalExecutor
from retromem.datastore.job import LOCK, MARKER, open_job
from retromem.errors import ConfigError, JobLockedError
from tests.conftest import write_jsonl


def _user_dir(path: Path) -> dict[str, str]:
    """A directory of a user's own files (what a mistyped --out might name)."""
    (path / "notes").mkdir(parents=True)
    files = {"thesis.tex": "chapter 1", "notes/todo.txt": "write chapter 2"}
    for name, text in files.items():
        (path / name).write_text(text)
    return files


def _survives(path: Path, files: dict[str, str]) -> None:
    assert {n: (path / n).read_text() for n in files} == files
    assert not (path / LOCK).exists() and not (path / MARKER).exists()  # not even a lock file written there


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_directory_that_is_no_artifact_is_refused_and_kept(tmp_path, overwrite):
    files = _user_dir(tmp_path / "mine")
    with pytest.raises(ConfigError, match=r"mine is not empty and holds no retromem datastore \(it holds notes/, thesis.tex\)"):
        open_job(tmp_path / "mine", "datastore", overwrite=overwrite)
    _survives(tmp_path / "mine", files)


def test_a_real_build_with_overwrite_refuses_a_users_directory(tmp_path):
    files = _user_dir(tmp_path / "mine")
    doc = write_jsonl(tmp_path / "in.jsonl", [{"text": "one short document"}])
    cfg = BuildConfig(inputs=(str(doc),), out=str(tmp_path / "mine"), tokenizer="gpt2", workers=1)
    with pytest.raises(ConfigError, match="refusing to delete it"):
        build(cfg, overwrite=True)
    _survives(tmp_path / "mine", files)


def test_another_kinds_artifact_is_refused_and_kept(tmp_path):
    out = tmp_path / "emb"
    with open_job(out, "embeddings") as job:
        (job.path / "shard-00000.npy").write_bytes(b"vectors")
    for overwrite in (True, False):
        with pytest.raises(ConfigError, match=r"emb holds a retromem embeddings \(this job writes datastore\)"):
            open_job(out, "datastore", overwrite=overwrite)
    assert (out / "shard-00000.npy").read_bytes() == b"vectors"
    assert json.loads((out / MARKER).read_text()) == {"kind": "embeddings"}
    # the builders refuse it the same way
    doc = write_jsonl(tmp_path / "in.jsonl", [{"text": "one short document"}])
    with pytest.raises(ConfigError, match="holds a retromem embeddings"):
        build(BuildConfig(inputs=(str(doc),), out=str(out), tokenizer="gpt2", workers=1), overwrite=True)
    assert (out / "shard-00000.npy").read_bytes() == b"vectors"


def test_overwrite_empties_its_own_kind_and_adopts_an_older_unmarked_artifact(tmp_path):
    out = tmp_path / "fm"
    out.mkdir()
    (out / "fm_index.json").write_text("{}")  # written before kind markers existed
    (out / "bwt.zst").write_bytes(b"old")
    with open_job(out, "fm-index", legacy=("fm_index.json",)) as job:  # adopted, kept as it is
        assert (job.path / "bwt.zst").exists()
    with open_job(out, "fm-index", overwrite=True) as job:  # now marked: no legacy names needed
        assert sorted(p.name for p in job.path.iterdir()) == sorted([LOCK, MARKER])
    with open_job(tmp_path / "new" / "dir", "fm-index") as job:  # created, parents too
        assert json.loads((job.path / MARKER).read_text()) == {"kind": "fm-index"}
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(ConfigError, match="in.txt is a file"):
        open_job(tmp_path / "in.txt", "fm-index")


_HOLDER = textwrap.dedent("""
    import sys
    from retromem.datastore.job import open_job
    with open_job(sys.argv[1], "datastore"):
        print("locked", flush=True)
        sys.stdin.read()  # hold the lock until the test closes our stdin
""")


def test_a_second_job_on_the_same_out_is_refused_at_once(tmp_path):
    """A real second process holds the job; this one is refused with a message naming it; once the
    holder ends, the directory opens."""
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JobLockedError, match=rf"another retromem job is writing .*ds \(held by pid {holder.pid} on "):
            open_job(out, "datastore")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    with open_job(out, "datastore"):
        pass


def test_a_second_job_meets_the_lock_while_the_first_writes_its_marker(tmp_path):
    """The first job holds the lock and is writing its kind marker (its temporary is there, the
    marker not yet): the second is refused for the lock, not for a directory that holds no artifact
    (found by benchmarks/reliability.py, which paused the first job at that moment)."""
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / MARKER).rename(out / f".{MARKER}.tmp-{holder.pid}")  # as the moment before its rename
        with pytest.raises(JobLockedError, match="another retromem job is writing"):
            open_job(out, "datastore")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.slow
def test_a_second_build_on_the_same_out_is_one_error_line_and_leaves_nothing(tmp_path):
    """The issue's case: a second `datastore build` on an --out being written fails with a traceback
    and leaves .tokenizer.tmp/ behind. Now: exit 2, one `error:` line, nothing written."""
    doc = write_jsonl(tmp_path / "in.jsonl", [{"text": "one short document"}])
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "retromem.cli", "-q", "datastore", "build", str(doc), "--out", str(out), "--tokenizer", "gpt2"]
    with open_job(out, "datastore"):  # this test process is the first job
        second = subprocess.run(cmd, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert second.stderr.startswith("error: another retromem job is writing"), second.stderr
        assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER])  # no .tokenizer.tmp, no _work
    done = subprocess.run(cmd, capture_output=True, text=True)  # the lock is free again: it builds
    assert done.returncode == 0, done.stderr
    assert not list(out.glob(".tokenizer*"))


def _step(ctx: Path, item: int) -> dict:
    """A step that does not look at done-markers (the job skips done items for it); it logs each call."""
    with open(ctx / f"call-{item}", "a") as fh:
        fh.write("x")
    return {"item": item, "square": item * item}


def test_done_markers_make_the_executor_skip_finished_items(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    marker = lambda i: f"square/item-{i:03d}"  # noqa: E731
    with open_job(tmp_path / "job", "neighbours") as job:
        job.mark_done(marker(1), {"item": 1, "square": 1})  # as a killed run would have left it
        got = dict(job.map(LocalExecutor(workers=1), _step, calls, range(4), marker))
        assert got == {i: {"item": i, "square": i * i} for i in range(4)}
        assert sorted(p.name for p in calls.iterdir()) == ["call-0", "call-2", "call-3"]  # item 1 was done
        assert json.loads(job.marker(marker(2)).read_text()) == {"item": 2, "square": 4}
        assert job.done(marker(3)) == {"item": 3, "square": 9} and job.done("square/item-999") is None
    with open_job(tmp_path / "job", "neighbours") as job:  # a re-run: nothing left to do
        assert dict(job.map(LocalExecutor(workers=1), _step, calls, range(4), marker)) == got
        assert all((calls / f"call-{i}").read_text() == "x" for i in (0, 2, 3))
        job.clear_work()
        assert not job.work.exists()


def test_atomic_file_replace_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a" / "data.bin"
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half of the sec")
            raise RuntimeError("killed")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.bin"]  # no temporary left
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"second")
    assert path.read_bytes() == b"second"


def test_atomic_directory_replace_is_whole_or_nothing(tmp_path):
    path = tmp_path / "tokenizer"
    with atomic_dir(path) as tmp:
        (tmp / "vocab.json").write_text("v1")
        (tmp / "merges.txt").write_text("m1")
    with pytest.raises(RuntimeError):
        with atomic_dir(path) as tmp:
            (tmp / "vocab.json").write_text("v2")
            raise RuntimeError("killed")
    assert {p.name: p.read_text() for p in path.iterdir()} == {"vocab.json": "v1", "merges.txt": "m1"}
    (tmp_path / ".tokenizer.tmp").mkdir()  # what a kill -9 leaves behind
    (tmp_path / ".tokenizer.tmp" / "stale").write_text("x")
    with atomic_dir(path) as tmp:
        (tmp / "vocab.json").write_text("v2")
    assert {p.name: p.read_text() for p in path.iterdir()} == {"vocab.json": "v2"}  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]  # no .tmp or .old left
