"""Metadata (issue 18): the inputs' extra fields become typed columns of the documents Parquet,
declared in the manifest, read back per document and per hit, and filtered on; mixed types are an
error naming the field (int64 and double widen to double)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retromem.datastore import BuildConfig, Datastore, build
from retromem.datastore.pipeline import add
from retromem.errors import ConfigError, InputError
from tests.conftest import shared_records, write_jsonl


def records(n: int) -> list[dict]:
    """The first ``n`` gcide entries longer than 200 characters."""
    return shared_records("gcide", n, 200, 10**9)


@pytest.fixture(scope="module")
def meta_ds(tmp_path_factory) -> tuple[Path, list[dict]]:
    """gcide entries with their own fields (title, source, license) plus typed extras."""
    d = tmp_path_factory.mktemp("meta")
    recs = records(30)
    for i, r in enumerate(recs):
        r["year"] = 1990 + i % 3  # int64
        r["score"] = i if i % 2 else i + 0.5  # int and float: widens to double
        r["open"] = i % 4 == 0  # bool
        r["tags"] = ["a", str(i % 2)]  # nested: JSON text
        if i == 7:
            del r["year"]  # missing: null
    write_jsonl(d / "in.jsonl", recs)
    out = d / "ds"
    build(BuildConfig(inputs=(str(d / "in.jsonl"),), out=str(out), tokenizer="gpt2", workers=1))
    return out, recs


def test_metadata_round_trip_with_types(meta_ds):
    out, recs = meta_ds
    ds = Datastore.open(out)
    assert ds.metadata_fields == {"license": "string", "open": "bool", "score": "double", "source": "string",
                                  "tags": "json", "title": "string", "year": "int64"}
    schema = pq.read_schema(out / "documents" / "shard-00000.parquet")
    assert schema.field("metadata.year").type == pa.int64() and schema.field("metadata.score").type == pa.float64()
    assert schema.field("metadata.source").type == pa.string() and schema.field("source").type == pa.string()  # no clash
    by_source = {r["id"]: r for r in recs}
    for d in range(ds.num_documents):
        doc = ds.document(d)
        r = by_source[doc.source_id]
        assert doc.metadata["title"] == r["title"] and doc.metadata["license"] == r["license"]
        assert doc.metadata["year"] == r.get("year") and doc.metadata["score"] == float(r["score"])
        assert doc.metadata["open"] is r["open"] and json.loads(doc.metadata["tags"]) == r["tags"]
    ids = np.arange(ds.num_documents)
    assert ds.metadata(ids[::-1]) == [ds.document(int(d)).metadata for d in ids[::-1]]
    assert ds.source_ids([2, 0]) == [ds.document(2).source_id, ds.document(0).source_id]
    first = ds.document_chunk_ids(4)[0]
    assert ds.chunks([first])[0].source_id == ds.document(4).source_id


def test_docs_matching_equality_and_membership(meta_ds):
    out, recs = meta_ds
    ds = Datastore.open(out)
    years = np.asarray([r.get("year", -1) for r in recs])
    order = [ds.document(d).source_id for d in range(ds.num_documents)]
    year_of = {r["id"]: r.get("year") for r in recs}
    got = ds.docs_matching({"year": 1991})
    assert got.tolist() == [d for d, s in enumerate(order) if year_of[s] == 1991] and len(got) == (years == 1991).sum()
    got = ds.docs_matching({"year": [1990, 1992], "open": True})
    want = [d for d, s in enumerate(order) if year_of[s] in (1990, 1992) and ds.document(d).metadata["open"]]
    assert got.tolist() == want and len(want) > 0
    assert len(ds.docs_matching({"license": "no such licence"})) == 0
    np.testing.assert_array_equal(ds.chunk_ids_of_docs([1, 3]),
                                  np.concatenate([ds.document_chunk_ids(1), ds.document_chunk_ids(3)]))
    with pytest.raises(ConfigError, match="'lang' is not declared"):
        ds.docs_matching({"lang": "en"})
    with pytest.raises(ConfigError, match="'year'"):
        ds.docs_matching({"year": "nineteen"})


def test_mixed_types_are_an_error_naming_the_field(tmp_path):
    recs = records(4)
    recs[0]["year"] = 1999
    recs[2]["year"] = "1999"
    write_jsonl(tmp_path / "in.jsonl", recs)
    with pytest.raises(InputError, match=r"metadata field 'year' is string here but int64 at .*in.jsonl:1"):
        build(BuildConfig(inputs=(str(tmp_path / "in.jsonl"),), out=str(tmp_path / "ds"), tokenizer="gpt2", workers=1))


def test_added_segment_widens_and_adds_fields_and_parquet_inputs_keep_theirs(tmp_path, meta_ds):
    out, _ = meta_ds
    ds_path = tmp_path / "ds"
    shutil.copytree(out, ds_path)
    new = records(40)[30:]
    table = pa.table({"id": [r["id"] + "-p" for r in new], "text": [r["text"] + " (again)" for r in new],
                      "year": pa.array([2000.5] * len(new), pa.float64()), "lang": ["en"] * len(new)})
    pq.write_table(table, tmp_path / "new.parquet")
    add(ds_path, [str(tmp_path / "new.parquet")], workers=1)
    ds = Datastore.open(ds_path)
    assert ds.metadata_fields["year"] == "double" and ds.metadata_fields["lang"] == "string"
    old_doc, new_doc = ds.document(0), ds.document(ds.num_documents - 1)
    assert isinstance(old_doc.metadata["year"], float) and old_doc.metadata["lang"] is None
    assert new_doc.metadata["year"] == 2000.5 and new_doc.metadata["lang"] == "en" and new_doc.metadata["title"] is None
    assert len(ds.docs_matching({"lang": "en"})) == ds.segments[1].n_docs
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "b", "text": records(41)[-1]["text"], "open": "yes"}])
    with pytest.raises(InputError, match="metadata field 'open' is string here but bool"):
        add(ds_path, [str(bad)], workers=1)
