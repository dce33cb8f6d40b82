"""The embedding model's own prompts and similarity: a model directory derived from the offline
all-MiniLM-L6-v2 (same weights, prompts added to its config_sentence_transformers.json, or its
Normalize module removed and a similarity set) proves that chunks are embedded with the document
prompt, queries with the query prompt on every search path (Python API, CLI, gRPC server, the RETRO
neighbours job), that the similarity sets the FAISS metric, and that both are recorded; indexes
whose manifests predate these fields keep cosine and no prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retromem.errors import ConfigError, IndexFormatError
from tests.conftest import demo_records, write_jsonl

faiss = pytest.importorskip("faiss")

PROMPTS = {"query": "query: ", "passage": "passage: ", "classification": "classify this: "}
QUERIES = ["How do I read a file line by line?", "sort a list of dictionaries by a key"]


def derive_model(root: Path, *, prompts: dict | None = None, similarity: str | None = None,
                 normalize: bool = True) -> Path:
    """A sentence-transformers directory sharing all-MiniLM-L6-v2's files (symlinks), with its own
    prompts / similarity_fn_name, and without the Normalize module when ``normalize`` is False."""
    from retromem.index.embed import embedder_path

    src = Path(embedder_path("all-minilm-l6-v2"))
    root.mkdir(parents=True)
    for f in src.iterdir():
        if f.name not in ("config_sentence_transformers.json", "modules.json"):
            (root / f.name).symlink_to(f)
    cfg = json.loads((src / "config_sentence_transformers.json").read_text())
    if prompts is not None:
        cfg["prompts"] = prompts
    if similarity is not None:
        cfg["similarity_fn_name"] = similarity
    (root / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    modules = json.loads((src / "modules.json").read_text())
    if not normalize:
        modules = [m for m in modules if not m["type"].endswith("Normalize")]
    (root / "modules.json").write_text(json.dumps(modules))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"prompts": derive_model(root / "prompts", prompts=PROMPTS),
            "dot": derive_model(root / "dot", similarity="dot", normalize=False),
            "manhattan": derive_model(root / "manhattan", similarity="manhattan")}


@pytest.fixture(scope="module")
def base():
    """The plain model: the reference that the derived ones are checked against."""
    from retromem.index.embed import Embedder

    return Embedder("all-minilm-l6-v2", batch_size=64)


def raw(base, texts: list[str], normalize: bool = True) -> np.ndarray:
    """The plain model's vectors of exactly these strings (prompt text already prepended)."""
    return base.model.encode(texts, convert_to_numpy=True, normalize_embeddings=normalize, prompt="")


def small_datastore(root: Path, docs: tuple[int, ...]):
    from retromem.datastore import BuildConfig, Datastore, build

    recs = demo_records()
    write_jsonl(root / "docs.jsonl", [{"id": recs[i]["id"], "text": recs[i]["text"]} for i in docs])
    cfg = BuildConfig(inputs=(str(root / "docs.jsonl"),), out=str(root / "ds"), tokenizer="gpt2", workers=1)
    build(cfg)
    return Datastore.open(cfg.out)


@pytest.fixture(scope="module")
def tiny_ds(tmp_path_factory):
    """Three short real documents (19 chunks), GPT-2 tokens."""
    return small_datastore(tmp_path_factory.mktemp("ds"), (8, 3, 27))


def embed_and_build(ds, root: Path, model: Path, factory: str = "Flat", **cfg) -> Path:
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    emb = embed_datastore(EmbedConfig(datastore=str(ds.path), out=str(root / "emb"), model=str(model), batch_size=64,
                                      **cfg), progress=False)
    return build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(root / "idx"), factory=factory,
                                        tune=factory != "Flat", tune_queries=40), progress=False).out


@pytest.fixture(scope="module")
def prompt_index(tiny_ds, models, tmp_path_factory) -> Path:
    return embed_and_build(tiny_ds, tmp_path_factory.mktemp("prompt-index"), models["prompts"])


# -- the embedder ----------------------------------------------------------------------------


def test_prompts_reach_the_encoder(models, base):
    from retromem.index.embed import Embedder

    e = Embedder(str(models["prompts"]), batch_size=64)
    assert e.info.weights_sha256 == base.info.weights_sha256  # same weights: only the prompts differ
    assert (e.info.query_prompt_name, e.info.query_prompt) == ("query", "query: ")
    assert (e.info.document_prompt_name, e.info.document_prompt) == ("passage", "passage: ")  # encode_document's order
    q, d = e.encode_queries(QUERIES), e.encode_documents(QUERIES)
    np.testing.assert_allclose(q, raw(base, ["query: " + t for t in QUERIES]), atol=1e-5)
    np.testing.assert_allclose(d, raw(base, ["passage: " + t for t in QUERIES]), atol=1e-5)
    plain = base.encode(QUERIES)
    assert np.abs(q - plain).max() > 0.02 and np.abs(q - d).max() > 0.02
    np.testing.assert_array_equal(e.encode(QUERIES), q)  # encode() is the query side every search path calls


def test_prompt_names_choose_or_refuse(models, base):
    from retromem.index.embed import EmbedConfig, Embedder

    e = Embedder(str(models["prompts"]), query_prompt_name="classification", document_prompt_name="none")
    assert e.info.query_prompt == "classify this: " and e.info.document_prompt is None
    np.testing.assert_allclose(e.encode_documents(QUERIES), base.encode(QUERIES), atol=1e-5)
    # all-MiniLM-L6-v2 has empty prompts: recorded as none, as older manifests were built
    assert base.info.query_prompt is None and base.info.document_prompt is None and base.info.similarity == "cosine"
    with pytest.raises(ConfigError, match=r"`query_prompt_name` \(--query-prompt-name\) must name one of"):
        Embedder(str(models["prompts"]), query_prompt_name="nope")
    with pytest.raises(ConfigError, match=r"`similarity` \(--similarity\) must be one of"):
        EmbedConfig(datastore="x", similarity="manhattan")
    with pytest.raises(ConfigError, match=r"`document_prompt_name` \(--document-prompt-name\)"):
        EmbedConfig(datastore="x", document_prompt_name="")
    with pytest.raises(ConfigError, match="manhattan.*FAISS"):
        Embedder(str(models["manhattan"]))  # the model's own choice, refused by name
    assert Embedder(str(models["manhattan"]), similarity="cosine").info.similarity == "cosine"


# -- recorded, and used at query time ---------------------------------------------------------


def test_manifests_record_prompts_and_chunks_carry_the_document_prompt(tiny_ds, prompt_index, base):
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    idx = DenseIndex.open(prompt_index)
    emb = Embeddings(idx.meta["embeddings_path"])
    for rec in (emb.manifest["embedder"], idx.meta["embedder"]):
        assert rec["query_prompt"] == "query: " and rec["document_prompt"] == "passage: "
        assert rec["similarity"] == "cosine" and rec["normalized"] is True
    assert idx.meta["metric"] == "inner_product"
    ids = np.array([0, 7, tiny_ds.num_chunks - 1])
    texts = tiny_ds.chunk_texts(ids)
    np.testing.assert_allclose(emb.get(ids), raw(base, ["passage: " + t for t in texts]), atol=3e-3)  # float16


def test_search_embeds_queries_with_the_query_prompt(prompt_index, base):
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    idx = DenseIndex.open(prompt_index)
    res = idx.search(QUERIES, 5)
    stored = np.concatenate([b for _, b in Embeddings(idx.meta["embeddings_path"]).iter_blocks()])
    want = raw(base, ["query: " + t for t in QUERIES]) @ stored.T  # exact scores of the prompted queries
    for r in range(len(QUERIES)):
        np.testing.assert_allclose(res.scores[r], want[r][res.chunk_ids[r]], atol=1e-4)
        np.testing.assert_allclose(res.scores[r], np.sort(want[r])[::-1][:5], atol=1e-4)
    plain = base.encode(QUERIES) @ stored.T
    assert np.abs(res.scores - np.take_along_axis(plain, res.chunk_ids, 1)).max() > 1e-3
    # an embedder that would embed queries otherwise is refused, not silently used
    with pytest.raises(IndexFormatError, match="query prompt"):
        DenseIndex.open(prompt_index).attach_embedder(base)


def test_an_index_without_the_new_fields_keeps_cosine_and_no_prompts(prompt_index, base, tmp_path):
    """A manifest written before prompts were recorded: searched as it was built (no prompt)."""
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    old = tmp_path / "old"
    shutil.copytree(prompt_index, old)
    meta = json.loads((old / "index.json").read_text())
    meta["embeddings_path"] = str(Embeddings(DenseIndex.open(prompt_index).meta["embeddings_path"]).path)
    meta["datastore_path"] = DenseIndex.open(prompt_index).meta["datastore_path"]
    for key in ("similarity", "query_prompt_name", "query_prompt", "document_prompt_name", "document_prompt"):
        meta["embedder"].pop(key)
    (old / "index.json").write_text(json.dumps(meta))
    idx = DenseIndex.open(old)
    res = idx.search(QUERIES, 3)
    assert idx.embedder.info.query_prompt is None and idx.embedder.info.similarity == "cosine"
    stored = np.concatenate([b for _, b in Embeddings(meta["embeddings_path"]).iter_blocks()])
    want = base.encode(QUERIES) @ stored.T
    np.testing.assert_allclose(res.scores, np.sort(want, axis=1)[:, ::-1][:, :3], atol=1e-4)


def test_cli_and_grpc_server_search_with_the_query_prompt(prompt_index):
    from click.testing import CliRunner

    from retromem.cli import main
    from retromem.index.dense import DenseIndex
    from retromem.service.client import RetrievalClient
    from retromem.service.config import ServerConfig
    from retromem.service.server import start_server
    from retromem.service.servicer import Backend

    idx = DenseIndex.open(prompt_index)
    want = idx.search(QUERIES, 4)
    out = CliRunner().invoke(main, ["index", "dense", "search", str(prompt_index), *QUERIES, "-k", "4", "--json"])
    assert out.exit_code == 0, out.output
    for r, hits in enumerate(json.loads(out.stdout)):
        assert [h["chunk_id"] for h in hits] == want.chunk_ids[r].tolist()
        np.testing.assert_allclose([h["score"] for h in hits], want.scores[r], atol=1e-4)
    cfg = ServerConfig(dense=str(prompt_index), port=0, workers=2)
    running = start_server(cfg, Backend.open(cfg))
    try:
        with RetrievalClient(running.target, timeout=60) as client:
            res = client.search(QUERIES, 4)
    finally:
        running.stop(0)
    np.testing.assert_array_equal(res.chunk_ids, want.chunk_ids)
    np.testing.assert_allclose(res.scores, want.scores, atol=1e-4)


def test_neighbours_job_reembeds_chunks_as_queries_when_prompts_differ(tiny_ds, prompt_index, tmp_path):
    """Stored chunk vectors carry the document prompt; with another query prompt the job embeds the
    chunks' texts as queries (through the index, with the query prompt) instead of reusing them."""
    from retromem.index.dense import DenseIndex
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    idx = DenseIndex.open(prompt_index, datastore=tiny_ds)
    cfg = NeighboursConfig(datastore=str(tiny_ds.path), out=str(tmp_path / "nb"), k=2, split="all", max_chunks=6)
    res = compute_neighbours(cfg, idx, progress=False)
    assert res.manifest["query"] == "text"
    forced = compute_neighbours(NeighboursConfig(datastore=str(tiny_ds.path), out=str(tmp_path / "nb2"), k=2, split="all",
                                                 max_chunks=6, query="embeddings"), idx, progress=False)
    assert forced.manifest["query"] == "embeddings"  # asked for explicitly: still allowed


# -- the similarity sets the metric -----------------------------------------------------------


@pytest.mark.slow
def test_dot_and_euclidean_set_metric_normalisation_and_scores(models, base, tmp_path):
    """About 200 chunks (tuning recall@10 needs more than ten per query), embedded twice."""
    from retromem.index.dense import DenseIndex
    from retromem.index.embed import Embeddings

    tiny_ds = small_datastore(tmp_path, (8, 3, 27, 29, 36, 21, 20, 30, 35, 0))

    dot = DenseIndex.open(embed_and_build(tiny_ds, tmp_path / "dot", models["dot"]))
    emb = Embeddings(dot.meta["embeddings_path"])
    assert emb.embedder.similarity == "dot" and emb.embedder.normalized is False and dot.meta["metric"] == "inner_product"
    stored = np.concatenate([b for _, b in emb.iter_blocks()])
    assert np.abs(np.linalg.norm(stored, axis=1) - 1).max() > 0.5  # raw vectors: no normalisation
    unit = stored[:4] / np.linalg.norm(stored[:4], axis=1, keepdims=True)  # same directions as the normalised model's
    np.testing.assert_allclose(unit, base.encode_documents(tiny_ds.chunk_texts(np.arange(4))), atol=3e-3)
    q = dot.embedder.encode_queries(QUERIES)
    assert np.abs(np.linalg.norm(q, axis=1) - 1).min() > 0.5
    np.testing.assert_allclose(q / np.linalg.norm(q, axis=1, keepdims=True), base.encode(QUERIES), atol=1e-5)
    res = dot.search(QUERIES, 5)
    np.testing.assert_allclose(res.scores, np.sort(q @ stored.T, axis=1)[:, ::-1][:, :5], rtol=1e-4)

    # euclidean (chosen over the model's dot), on an approximate index tuned against exact L2 search
    l2 = DenseIndex.open(embed_and_build(tiny_ds, tmp_path / "l2", models["dot"], factory="HNSW8", similarity="euclidean"))
    assert l2.meta["metric"] == "l2" and l2.meta["embedder"]["similarity"] == "euclidean"
    assert l2.meta["tuning"]["reached"]
    dist = np.linalg.norm(q[:, None, :] - stored[None], axis=2)
    res = l2.search(QUERIES, 5)
    np.testing.assert_allclose(res.scores, -np.take_along_axis(dist, res.chunk_ids, 1), rtol=1e-3)  # minus the distance
    exact = np.argsort(dist, axis=1)[:, :5]
    assert np.mean([len(np.intersect1d(a, e)) / 5 for a, e in zip(res.chunk_ids, exact)]) >= 0.8
    assert (res.chunk_ids[:, 0] == dist.argmin(axis=1)).all()
