import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retromem.datastore.readers import Record, expand_inputs, iter_records
from retromem.errors import ConfigError, InputError
from tests.conftest import write_jsonl


def records(path, **kw):
    (f,) = expand_inputs([str(path)])
    return list(iter_records(f, **kw))


@pytest.mark.parametrize("compress", [None, "gz", "zst"])
def test_jsonl_plain_and_compressed(tmp_path, compress):
    suffix = {None: "", "gz": ".gz", "zst": ".zst"}[compress]
    p = write_jsonl(tmp_path / f"c.jsonl{suffix}", [{"id": 7, "body": "héllo"}, {"body": "two"}], compress)
    out = records(p, text_field="body")
    assert [(r.line, r.source_id, r.text) for r in out] == [(1, "7", "héllo"), (2, f"{p}:2", "two")]


def test_parquet_column_and_text_files(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"], "id": ["x", "y"]}), tmp_path / "t.parquet")
    assert [r.text for r in records(tmp_path / "t.parquet", text_field="content")] == ["a", "b"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("first doc")
    (tmp_path / "d" / "two.md.gz").write_bytes(gzip.compress(b"second doc"))
    files = expand_inputs([str(tmp_path / "d")])
    assert [f.format for f in files] == ["text", "text"]
    assert [list(iter_records(f))[0].text for f in files] == ["first doc", "second doc"]


def test_globs_and_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    files = expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt")])
    assert [f.path.rsplit("/", 1)[1] for f in files] == ["a.jsonl", "b.jsonl", "c.txt"]


def test_missing_inputs_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="input not found"):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ConfigError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.nothing")])


def test_bad_records_become_errors_naming_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": broken}\n{"text": "caf\xe9"}\n{"title": "no text"}\n[1, 2]\n{"text": 5}\n')
    out = records(p)
    assert isinstance(out[0], Record)
    kinds = [(e.line, e.kind) for e in out[1:]]
    assert kinds == [(2, "invalid_json"), (3, "invalid_utf8"), (4, "missing_field"), (5, "invalid_json"), (6, "missing_field")]
    assert all(str(p) in str(e) for e in out[1:])
    assert "0xe9" in str(out[2])


def test_corrupt_gzip_is_reported_with_the_line_reached(tmp_path):
    good = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(5000)))
    p = tmp_path / "corrupt.jsonl.gz"
    p.write_bytes(good[: len(good) // 2] + b"\x00garbage" * 10)
    out = records(p)
    assert isinstance(out[-1], InputError) and out[-1].kind == "corrupt_file"
    # a damaged deflate stream can yield a few garbled lines before zlib notices; those are
    # reported too (as bad JSON), and everything before them was read intact
    first_bad = next(i for i, r in enumerate(out) if isinstance(r, InputError))
    assert first_bad > 1000 and len(out) - first_bad <= 64
    assert all(r.text == f"line {i}" for i, r in enumerate(out[:first_bad]))
