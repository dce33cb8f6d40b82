"""CPU backends of the embedder on the offline all-MiniLM-L6-v2 (in a copy of its directory, so the
export lands in tmp): ONNX Runtime and OpenVINO give the fp32 vectors, the int8 ones close vectors;
the export happens once, beside the model, and again when the weights change; the embedding job
records the backend and the index embeds queries with it; bad choices are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retromem.errors import ConfigError
from tests.conftest import demo_records, write_jsonl

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

TEXTS = ["How do I read a file line by line?", "sort a list of dictionaries by a key",
         "The kernel's memory allocator hands out pages in powers of two. " * 6, "stake: to fasten with stakes"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """all-MiniLM-L6-v2's files linked into a fresh directory (without any earlier export)."""
    from retromem.index.embed import embedder_path

    src = Path(embedder_path("all-minilm-l6-v2"))
    root = tmp_path_factory.mktemp("model") / "minilm"
    root.mkdir()
    for f in src.iterdir():
        if f.name != "retromem-backends":
            (root / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def fp32(model_dir):
    from retromem.index.embed import Embedder

    e = Embedder(str(model_dir), device="cpu")
    return e.encode_documents(TEXTS), e.encode_queries(TEXTS), e.info.weights_sha256


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_fp32_runtimes_give_the_torch_vectors(model_dir, fp32, backend):
    from retromem.index.embed import Embedder

    e = Embedder(str(model_dir), device="cpu", backend=backend)
    assert e.info.backend == backend and e.info.weights_sha256 == fp32[2]  # the hash names the weights, not the runtime
    np.testing.assert_allclose(e.encode_documents(TEXTS), fp32[0], atol=2e-5)
    np.testing.assert_allclose(e.encode_queries(TEXTS), fp32[1], atol=2e-5)
    assert (model_dir / "retromem-backends" / "model.onnx").is_file()  # exported beside the model


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["onnx-int8", "torch-int8"])
def test_int8_backends_are_close_not_equal(model_dir, fp32, backend):
    from retromem.index.embed import Embedder

    x = Embedder(str(model_dir), device="cpu", backend=backend).encode_documents(TEXTS)
    cos = (x * fp32[0]).sum(axis=1)
    assert cos.min() > 0.95 and np.abs(x - fp32[0]).max() > 1e-4


@pytest.mark.slow
def test_export_happens_once_and_again_for_other_weights(model_dir, fp32):
    from retromem.index.embed import Embedder
    from retromem.index.embed_backends import export_onnx

    Embedder(str(model_dir), device="cpu", backend="onnx")  # exported by now
    path = model_dir / "retromem-backends" / "model.onnx"
    stamp = json.loads((model_dir / "retromem-backends" / "model.onnx.json").read_text())
    assert stamp["weights_sha256"] == fp32[2]
    before = path.stat().st_mtime_ns
    Embedder(str(model_dir), device="cpu", backend="onnx")
    assert path.stat().st_mtime_ns == before  # reused
    e = Embedder(str(model_dir), device="cpu")
    export_onnx(e.model[0].model, model_dir / "retromem-backends", "0" * 64)  # as if the weights had changed
    assert path.stat().st_mtime_ns != before
    assert json.loads((model_dir / "retromem-backends" / "model.onnx.json").read_text())["weights_sha256"] == "0" * 64


@pytest.mark.slow
def test_job_records_the_backend_and_search_uses_it(model_dir, fp32, tmp_path):
    from retromem.datastore import BuildConfig, Datastore, build
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, Embeddings, embed_datastore

    recs = demo_records()
    write_jsonl(tmp_path / "docs.jsonl", [{"id": recs[i]["id"], "text": recs[i]["text"]} for i in (8, 3)])
    build(BuildConfig(inputs=(str(tmp_path / "docs.jsonl"),), out=str(tmp_path / "ds"), tokenizer="gpt2", workers=1))
    ds = Datastore.open(tmp_path / "ds")
    emb = embed_datastore(EmbedConfig(datastore=str(ds.path), out=str(tmp_path / "emb"), model=str(model_dir),
                                      device="cpu", backend="onnx"), progress=False)
    assert emb.manifest["embedder"]["backend"] == "onnx"
    from retromem.index.embed import Embedder

    ref = Embedder(str(model_dir), device="cpu").encode_documents(ds.chunk_texts(np.arange(ds.num_chunks)))
    np.testing.assert_allclose(Embeddings(emb.out).get(np.arange(ds.num_chunks)), ref, atol=2e-3)  # float16
    idx = DenseIndex.open(build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(tmp_path / "idx"), factory="Flat",
                                                       tune=False), progress=False).out)
    assert idx.meta["embedder"]["backend"] == "onnx" and idx.embedder.info.backend == "onnx"
    res = idx.search(TEXTS[:2], 3)
    want = fp32[1][:2] @ Embeddings(emb.out).get(np.arange(ds.num_chunks)).T
    np.testing.assert_allclose(res.scores, np.sort(want, axis=1)[:, ::-1][:, :3], atol=1e-3)


def test_bad_backends_are_refused(model_dir):
    from retromem.index.embed import EmbedConfig, Embedder

    with pytest.raises(ConfigError, match=r"`backend` \(--backend\) must be one of"):
        EmbedConfig(datastore="x", backend="tensorrt")
    with pytest.raises(ConfigError, match=r"`backend` \(--backend\) must be one of 'torch', 'onnx', 'openvino'"):
        EmbedConfig(datastore="x", backend="onnx-int8")  # measured short of fp32's recall: not offered
    with pytest.raises(ConfigError, match=r"`backend` \(--backend\) 'onnx' runs on the CPU in fp32 only"):
        Embedder(str(model_dir), device="cpu", fp16=True, backend="onnx")
