"""Batch-job inputs and outputs on fsspec filesystems (retromem.storage): real fsspec implementations
(``memory://`` inside one process, ``file://`` across worker processes), no stand-ins. A build from
``memory://`` inputs to a ``memory://`` output equals the same build to a local directory byte for
byte; the manifest goes last; a failed job resumes from its staging directory; bad URLs are named."""

from __future__ import annotations

import gzip
import json
import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from retromem import storage
from retromem.errors import ConfigError

from tests.conftest import demo_records


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETROMEM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def mem():
    """A fresh prefix of the process's memory filesystem."""
    root = f"t{uuid.uuid4().hex[:10]}"
    fs = fsspec.filesystem("memory")
    yield fs, root
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


def _records(n: int = 6, chars: int = 3000) -> list[str]:
    return [json.dumps({"id": r["id"], "text": r["text"][:chars]}) + "\n" for r in demo_records()[:n]]


def test_bad_urls_and_missing_inputs_are_named():
    with pytest.raises(ConfigError, match=r"`--out` 'zzz://x': unknown protocol 'zzz'"):
        storage.url_fs("zzz://x", "--out")
    with pytest.raises(ConfigError, match="must be a path or a URL"):
        storage.url_fs("memory://", "--out")
    with pytest.raises(ConfigError, match="input not found: 'memory://nowhere/x.jsonl'"):
        storage.list_inputs("memory://nowhere/x.jsonl")
    with pytest.raises(ConfigError, match="matches no file"):
        storage.list_inputs("memory://nowhere/*.jsonl")
    with pytest.raises(ConfigError, match="holds no file"):
        storage.local_dir("memory://nowhere/ds", "--datastore")
    import importlib.util

    if importlib.util.find_spec("s3fs") is None:  # the implementation is not installed here: say so, no traceback
        with pytest.raises(ConfigError, match="s3:// filesystem is not installed"):
            storage.url_fs("s3://bucket/ds", "--out")
    from retromem.datastore.job import open_job

    for out in ("memory://x/out", storage.Path("memory://x/out")):  # never a local folder named "memory:"
        with pytest.raises(ConfigError, match="is a URL"):
            open_job(out, "datastore")
    assert storage.local_dir("/some/path") == storage.Path("/some/path") and not storage.is_url("/a/b")
    from click.testing import CliRunner

    from retromem.cli import main as cli

    res = CliRunner().invoke(cli, ["index", "fm", "build", "memory://nowhere/ds", "--out", "zzz://bucket/fm"])
    assert res.exit_code == 2 and res.output.startswith("error: `--out` 'zzz://bucket/fm': unknown protocol 'zzz'")
    res = CliRunner().invoke(cli, ["index", "fm", "build", "memory://nowhere/ds", "--out", "memory://nowhere/fm"])
    assert res.exit_code == 2 and "'memory://nowhere/ds' holds no file" in res.output


def test_inputs_read_through_fsspec_equal_local_files(tmp_path, mem):
    """A prefix, a glob and single files, plain, .gz, .zst and Parquet: the same records as from disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from retromem.datastore.readers import expand_inputs, iter_records

    fs, root = mem
    lines = _records(6, 400)
    blobs = {"a.jsonl": "".join(lines[:2]).encode(), "b.jsonl.gz": gzip.compress("".join(lines[2:4]).encode()),
             "c.jsonl.zst": zstandard.ZstdCompressor().compress("".join(lines[4:]).encode())}
    (tmp_path / "in").mkdir()
    for name, blob in blobs.items():
        fs.pipe(f"/{root}/in/{name}", blob)
        (tmp_path / "in" / name).write_bytes(blob)
    table = pa.table({"id": ["p1", "p2"], "text": ["first parquet row", "second"]})
    pq.write_table(table, tmp_path / "in" / "d.parquet")
    fs.pipe(f"/{root}/in/d.parquet", (tmp_path / "in" / "d.parquet").read_bytes())
    fs.pipe(f"/{root}/in/.hidden", b"skipped")

    def texts(files):
        return [(r.source_id, r.text, r.metadata) for f in files for r in iter_records(f)]

    local = expand_inputs([str(tmp_path / "in")])
    remote = expand_inputs([f"memory://{root}/in/"])
    assert [f.path.rsplit("/", 1)[1] for f in remote] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    assert [(f.format, f.size) for f in remote] == [(f.format, f.size) for f in local]
    assert texts(remote) == texts(local) and len(texts(remote)) == 8
    globbed = expand_inputs([f"memory://{root}/in/*.jsonl*", f"memory://{root}/in/a.jsonl"])  # a.jsonl once
    assert [f.path.rsplit("/", 1)[1] for f in globbed] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst"]


class RecordingMemoryFS(MemoryFileSystem):
    """The memory filesystem (its own store), logging every put and delete in order."""

    protocol = "recmem"
    store: dict = {}
    pseudo_dirs = [""]
    log: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path[len("recmem://"):] if path.startswith("recmem://") else path)

    def put_file(self, lpath, rpath, *args, **kwargs):
        type(self).log.append(("put", rpath.rsplit("/", 1)[-1]))
        return super().put_file(lpath, rpath, *args, **kwargs)

    def rm_file(self, path):
        type(self).log.append(("rm", path.rsplit("/", 1)[-1]))
        return super().rm_file(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        if mode == "rb":  # MemoryFile.close() does nothing (the store keeps the bytes): note the call instead
            f.close_called = False
            f.close = lambda: setattr(f, "close_called", True)
            type(self).opened.append(f)
        return f

    opened: list = []


fsspec.register_implementation("recmem", RecordingMemoryFS, clobber=True)


def test_put_tree_removes_then_puts_the_manifest_last(tmp_path):
    log = RecordingMemoryFS.log
    log.clear()
    local = tmp_path / "job"
    (local / "data").mkdir(parents=True)
    (local / "data" / "a.bin").write_bytes(b"a" * 10)
    (local / "manifest.json").write_text("{}")
    (local / ".retromem.lock").write_text("pid")  # a machine's lock: never put
    assert storage.put_tree(local, "recmem://bucket/out") == 2
    assert log == [("put", "a.bin"), ("put", "manifest.json")]
    log.clear()
    assert storage.put_tree(local, "recmem://bucket/out") == 0  # nothing changed: only the manifest again
    assert log == [("put", "manifest.json")]
    log.clear()
    (local / "data" / "b.bin").write_bytes(b"b")
    (local / "manifest.json").write_text('{"v": 2}')
    storage.put_tree(local, "recmem://bucket/out")
    # while the tree changes there is no manifest: a reader sees "unfinished", never half a tree
    assert log == [("rm", "manifest.json"), ("put", "b.bin"), ("put", "manifest.json")]
    fs = fsspec.filesystem("recmem")
    assert sorted(p.rsplit("/", 1)[1] for p in fs.find("/bucket/out")) == ["a.bin", "b.bin", "manifest.json"]
    log.clear()
    (local / "data" / "a.bin").unlink()  # a file the job dropped stays (another artifact may share the prefix)
    (local / "manifest.json").write_text('{"v": 2}')
    storage.put_tree(local, "recmem://bucket/out")
    assert log == [("rm", "manifest.json"), ("put", "manifest.json")] and fs.exists("/bucket/out/data/a.bin")
    mirror = storage.local_dir("recmem://bucket/out")
    assert (mirror / "manifest.json").read_text() == '{"v": 2}' and (mirror / "data" / "b.bin").read_bytes() == b"b"
    fs.pipe("/bucket/out/data/b.bin", b"B")  # changed remotely: the mirror fetches it again
    assert (storage.local_dir("recmem://bucket/out") / "data" / "b.bin").read_bytes() == b"B"


def test_output_dir_puts_only_on_success_and_resumes(mem):
    fs, root = mem
    url = f"memory://{root}/out"
    with pytest.raises(RuntimeError):
        with storage.output_dir(url) as staging:
            (staging / "_work").mkdir()
            (staging / "_work" / "unit-1.json").write_text("done")
            raise RuntimeError("killed")
    assert not fs.exists(f"/{root}/out")  # nothing put by a failed job
    with storage.output_dir(url) as again:
        assert again == staging and (again / "_work" / "unit-1.json").is_file()  # the same staging: resume
        (again / "manifest.json").write_text("{}")
    assert fs.cat(f"/{root}/out/_work/unit-1.json") == b"done" and fs.exists(f"/{root}/out/manifest.json")
    storage.clear_staging(url)  # another machine: the staging is pulled from the URL first
    with storage.output_dir(url) as fresh:
        assert (fresh / "_work" / "unit-1.json").read_text() == "done"
    with storage.output_dir("file://" + str(staging.parent / "plain")) as local:  # file:// is written in place
        assert local == staging.parent / "plain"


def _build(cli_args, inputs, out, workers=1):
    from click.testing import CliRunner

    from retromem.cli import main as cli

    res = CliRunner().invoke(cli, ["datastore", "build", *inputs, "--out", out, "--tokenizer", "gpt2",
                                   "--chunk-length", "32", "--shard-size", "4000", "--workers", str(workers), *cli_args])
    assert res.exit_code == 0, res.output
    return res


def _tree(fs, root: str) -> dict[str, bytes]:
    root = root.rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root) if not p.endswith(".retromem.lock")}


@pytest.mark.slow
def test_build_from_memory_to_memory_equals_a_local_build_byte_for_byte(tmp_path, mem):
    """datastore build and the FM-index job, memory:// in and out, against the same jobs writing local
    directories; the artifacts then open from their URLs. Worker processes read file:// inputs."""
    from click.testing import CliRunner

    from retromem.cli import main as cli
    from retromem.datastore import Datastore
    from retromem.index.fm_index import FMIndex

    fs, root = mem
    lines = _records()
    fs.pipe(f"/{root}/in/a.jsonl.gz", gzip.compress("".join(lines[:3]).encode()))
    fs.pipe(f"/{root}/in/b.jsonl", "".join(lines[3:]).encode())
    _build([], [f"memory://{root}/in/"], f"memory://{root}/ds")
    _build([], [f"memory://{root}/in/"], str(tmp_path / "ds"))
    local_fs = fsspec.filesystem("file")
    remote = _tree(fs, f"/{root}/ds")
    assert "manifest.json" in remote and len(remote) > 20
    assert remote == _tree(local_fs, str(tmp_path / "ds"))  # every file, byte for byte
    again = _build([], [f"memory://{root}/in/"], f"memory://{root}/ds")  # resumes in its staging directory
    assert "already complete" in again.output
    storage.clear_staging(f"memory://{root}/ds")  # another machine: pulled from the URL, found complete
    assert "already complete" in _build([], [f"memory://{root}/in/"], f"memory://{root}/ds").output
    assert _tree(fs, f"/{root}/ds") == remote
    ds = Datastore.open(f"memory://{root}/ds")
    assert ds.datastore_id == Datastore.open(tmp_path / "ds").datastore_id and ds.num_documents == 6

    for out in (f"memory://{root}/fm", str(tmp_path / "fm")):  # an index job reading the datastore URL
        res = CliRunner().invoke(cli, ["index", "fm", "build", f"memory://{root}/ds", "--out", out,
                                       "--shard-size", "8000"])
        assert res.exit_code == 0, res.output
    assert _tree(fs, f"/{root}/fm") == _tree(local_fs, str(tmp_path / "fm"))
    fm = FMIndex(f"memory://{root}/fm")  # its datastore found from the recorded URL
    assert fm.count("the") == FMIndex(tmp_path / "fm").count("the") > 0

    # two worker processes (spawned: memory:// is empty there) read the inputs through file:// URLs
    (tmp_path / "in").mkdir()
    for name in ("a.jsonl.gz", "b.jsonl"):
        (tmp_path / "in" / name).write_bytes(fs.cat_file(f"/{root}/in/{name}"))
    url = "file://" + str(tmp_path / "in")
    _build([], [url], str(tmp_path / "ds-1"))
    _build([], [url], str(tmp_path / "ds-2"), workers=2)
    assert _tree(local_fs, str(tmp_path / "ds-2")) == _tree(local_fs, str(tmp_path / "ds-1"))


def test_node_path_keeps_urls_and_names_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds").mkdir()
    assert storage.node_path("ds") == str(tmp_path / "ds")  # a worker's cwd is not the driver's
    assert storage.node_path("s3://bucket/ds") == "s3://bucket/ds"  # not s3:/bucket/ds under the cwd
    assert storage.node_path("memory://b/ds") == "memory://b/ds"
    assert storage.node_path("gpt2") == "gpt2" and storage.node_path(None) is None  # a hub id / built-in name


def test_every_input_file_read_from_a_url_is_closed(tmp_path):
    """Parquet, JSONL (.gz, .zst) and text from a URL: each stream is closed when its records are read,
    and when the reader is abandoned part way (pyarrow leaves a file object it is given open)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from retromem.datastore.readers import expand_inputs, iter_records

    fs = fsspec.filesystem("recmem")
    root = f"/c{uuid.uuid4().hex[:8]}"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "id": ["1", "2", "3"]}), tmp_path / "d.parquet")
    fs.pipe(f"{root}/d.parquet", (tmp_path / "d.parquet").read_bytes())
    lines = "".join(_records(3)).encode()
    fs.pipe(f"{root}/a.jsonl.gz", gzip.compress(lines))
    fs.pipe(f"{root}/b.jsonl.zst", zstandard.ZstdCompressor().compress(lines))
    fs.pipe(f"{root}/c.txt", b"one\n\ntwo\n")
    RecordingMemoryFS.opened.clear()
    files = expand_inputs([f"recmem://{root}/"])
    assert [len(list(iter_records(f))) for f in files] == [3, 3, 1 if files[2].format == "text" else 2, 3]
    reader = iter_records(files[-1])  # d.parquet
    next(reader)
    reader.close()  # abandoned after one record
    assert [(f.path.rsplit("/", 1)[1], f.close_called) for f in RecordingMemoryFS.opened] == [
        (name, True) for name in ("a.jsonl.gz", "b.jsonl.zst", "c.txt", "d.parquet", "d.parquet")]
