"""gcide-qa question answering: the answer rule, Wilson and McNemar against known values, recall@k over a
tiny dictionary datastore (fixed rankings and real BM25 / dense indexes), and the answering path with a
tiny Llama (batched greedy decoding equals one prompt at a time; controls hold what they should; a
re-run reads its saved generations back)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from retromem.errors import ConfigError
from retromem.index.types import SearchResult
from retromem.retro.qa import (QaConfig, QaItem, build_prompt, evaluate_qa, generate_answers, is_correct, load_qa_items,
                               mcnemar_p, normalize_answer, plot_qa, recall_report, wilson)

from tests.conftest import write_jsonl
from tests.retro.conftest import tiny_llama_dir

# GCIDE-style entries: headword, pronunciation in backslashes, part of speech, a definition
ENTRIES = {
    "gcide/Stake#2": "Stake \\Stake\\, v. t. To fasten, support, or defend with stakes; as, to stake vines or plants.",
    "gcide/Granatin#1": "Granatin \\Gran\"a*tin\\, n. D-mannitol; -- so called because found in the pomegranate.",
    "gcide/Kettle#1": "Kettle \\Ket\"tle\\, n. A metallic vessel for boiling water, usually with a spout and a lid.",
    "gcide/Lantern#1": "Lantern \\Lan\"tern\\, n. A case enclosing a light and protecting it from wind and rain.",
    "gcide/Orchard#1": "Orchard \\Or\"chard\\, n. An enclosure or assemblage of fruit trees grown for their fruit.",
    "gcide/Harbor#1": "Harbor \\Har\"bor\\, n. A port or haven where ships may anchor in safety from storms.",
    "gcide/Law merchant#1": "Law merchant \\Law mer\"chant\\, n. The body of commercial rules governing merchants and traders.",
    "gcide/Quill#1": "Quill \\Quill\\, n. One of the large feathers of a bird's wing, once cut into a writing pen.",
    "gcide/Thimble#1": "Thimble \\Thim\"ble\\, n. A cap of metal worn on the finger to push the needle in sewing.",
    "gcide/Anvil#1": "Anvil \\An\"vil\\, n. An iron block on which a smith hammers and shapes heated metal.",
}
ITEMS = [
    QaItem("To fasten, support, or defend with stakes; as, to ___ vines or plants.", "gcide/Stake#2", "Stake"),
    QaItem("A metallic vessel for boiling water, usually with a spout and a lid.", "gcide/Kettle#1", "Kettle"),
    QaItem("A case enclosing a light and protecting it from wind and rain.", "gcide/Lantern#1", "Lantern"),
    QaItem("The body of commercial rules governing merchants and traders.", "gcide/Law merchant#1", "Law merchant"),
    QaItem("An iron block on which a smith hammers and shapes heated metal.", "gcide/Anvil#1", "Anvil"),
    QaItem("A cap of metal worn on the finger to push the needle in sewing.", "gcide/Thimble#1", "Thimble"),
    QaItem("A thing that is not in the dictionary datastore at all.", "gcide/Missing#1", "Missing"),
]


@pytest.fixture(scope="module")
def dict_ds(tmp_path_factory):
    from retromem.datastore import BuildConfig, Datastore, build

    d = tmp_path_factory.mktemp("qa-ds")
    write_jsonl(d / "entries.jsonl", [{"id": k, "text": v} for k, v in ENTRIES.items()])
    cfg = BuildConfig(inputs=(str(d / "entries.jsonl"),), out=str(d / "ds"), tokenizer="gpt2", chunk_length=16,
                      workers=1)
    build(cfg)
    return Datastore.open(cfg.out)


@pytest.fixture(scope="module")
def bm25(dict_ds, tmp_path_factory):
    from retromem.index.lexical import LexicalIndex, build_lexical_index

    out = tmp_path_factory.mktemp("qa-bm25") / "bm25"
    build_lexical_index(dict_ds.path, out, progress=False)
    return LexicalIndex.open(out, datastore=dict_ds)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from retromem.models import load_causal_lm

    return load_causal_lm(str(tiny_llama_dir(tmp_path_factory.mktemp("qa-llama"))))


class _Fixed:
    """A retriever whose rankings are given: chunk ids per query, in order."""

    def __init__(self, rows):
        self.rows = rows

    def search(self, queries, k, **kw):
        ids = np.full((len(queries), k), -1, np.int64)
        for i, q in enumerate(queries):
            row = self.rows[q][:k]
            ids[i, :len(row)] = row
        return SearchResult(ids, np.zeros(ids.shape, np.float32))


def test_the_answer_rule():
    assert is_correct(" Stake.\nAnswer: more", "Stake")
    assert is_correct("\n\n  stake, v. t.", "Stake")
    assert is_correct('"Kettle"', "Kettle")
    assert not is_correct("Stakes", "Stake")  # an inflected form is wrong
    assert not is_correct("The stake", "Stake")  # the first word only
    assert not is_correct("", "Stake") and not is_correct("   \n ", "Stake")
    assert is_correct("law merchant, n. The body", "Law merchant")  # as many words as the headword
    assert not is_correct("law", "Law merchant")
    assert is_correct("jack-in-the-pulpit.", "jack-in-the-pulpit")
    assert normalize_answer("\n (Anvil); x", 1) == "anvil"


def test_wilson_and_mcnemar_known_values():
    w = wilson(8, 10)
    assert w["rate"] == 0.8 and w["low"] == pytest.approx(0.4902, abs=1e-4) and w["high"] == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 20)["low"] == pytest.approx(0, abs=1e-12) and 0.15 < wilson(0, 20)["high"] < 0.17
    assert mcnemar_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_p(3, 3) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(10, 2) == pytest.approx(2 * sum(__import__("math").comb(12, i) for i in range(3)) / 2 ** 12)


def test_recall_counts_a_hit_when_a_chunk_belongs_to_the_answer_entry(dict_ds):
    cfg = QaConfig(k=1, recall_at=(1, 2), search_k=4, bootstrap=100)
    first = dict_ds.doc_first_chunk_array
    by_id = {r["source_id"]: i for i, r in enumerate(dict_ds.iter_documents(columns=["source_id"]))}
    gold = [by_id[q.answer_id] for q in ITEMS[:3]]
    other = [d for d in range(dict_ds.num_documents) if d not in gold]
    # query 0: its entry's *last* chunk first; query 1: another entry's two chunks, then its own (rank 2 by
    # entry); query 2: never its entry
    rows = {ITEMS[0].query: [int(first[gold[0] + 1]) - 1, int(first[other[0]])],
            ITEMS[1].query: [int(first[other[0]]), int(first[other[0]]) + 1, int(first[gold[1]])],
            ITEMS[2].query: [int(first[other[1]])]}
    rep = recall_report(ITEMS[:3] + ITEMS[-1:], dict_ds, {"fixed": _Fixed(rows)}, cfg)
    assert rep["questions"] == 3 and rep["missing"] == 1
    assert rep["retrievers"]["fixed"]["recall@1"]["correct"] == 1
    assert rep["retrievers"]["fixed"]["recall@2"]["correct"] == 2


@pytest.mark.slow  # embeds with all-MiniLM-L6-v2: ~9 s
def test_bm25_and_dense_recall_side_by_side(dict_ds, bm25, tmp_path):
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore

    emb = embed_datastore(EmbedConfig(datastore=str(dict_ds.path), out=str(tmp_path / "emb"), batch_size=64),
                          progress=False)
    dense = DenseIndex.open(build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(tmp_path / "idx"),
                                                         factory="Flat", tune=False), progress=False).out,
                            datastore=dict_ds)
    rep = recall_report(ITEMS, dict_ds, {"dense": dense, "bm25": bm25}, QaConfig(search_k=10, bootstrap=100))
    # queries are verbatim spans of their entries: BM25 finds every one first
    assert rep["retrievers"]["bm25"]["recall@1"]["rate"] == 1.0
    assert rep["retrievers"]["dense"]["recall@10"]["rate"] == 1.0  # 10 entries: all of them
    (cmp,) = [c for c in rep["comparisons"] if c["at"] == 1]
    assert (cmp["a"], cmp["b"]) == ("dense", "bm25") and cmp["low"] <= cmp["diff"] <= cmp["high"]


@torch.no_grad()
def test_batched_greedy_generation_equals_one_prompt_at_a_time(lm):
    model, tok = lm
    prompts = [build_prompt(q.query) for q in ITEMS[:3]] + [build_prompt("short", ["an entry"])]
    batched = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=4)
    for p, got in zip(prompts, batched):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        want = tok.decode(ids[0, -4:], skip_special_tokens=True)
        assert got == want


def test_qa_settings_controls_and_resume(lm, dict_ds, bm25, tmp_path):
    model, tok = lm
    cfg = QaConfig(k=2, search_k=10, max_new_tokens=3, block=2, bootstrap=100, entry_chars=80)
    res = evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg, cache_dir=tmp_path / "gen")
    assert res["questions"] == 6 and res["missing"] == 1
    assert list(res["settings"]) == ["closed_book", "bm25", "oracle", "random"]
    assert all(s["n"] == 6 for s in res["settings"].values())
    assert res["answer_in_prompt"] == {"closed_book": 0.0, "bm25": 1.0, "oracle": 1.0, "random": 0.0}
    for s, gens in res["generated"].items():
        assert [is_correct(g, q.answer) for g, q in zip(gens, ITEMS)] == res["correct"][s]
    pairs = {(c["a"], c["b"]) for c in res["comparisons"]}
    assert {("bm25", "closed_book"), ("bm25", "random"), ("oracle", "closed_book")} <= pairs
    blocks = sorted((tmp_path / "gen").glob("block-*.json"))
    assert len(blocks) == 3
    stamp = [b.stat().st_mtime_ns for b in blocks]
    again = evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, cfg, cache_dir=tmp_path / "gen")
    assert again["generated"] == res["generated"] and [b.stat().st_mtime_ns for b in blocks] == stamp
    with pytest.raises(ConfigError, match="other settings"):
        evaluate_qa(model, tok, ITEMS, dict_ds, {"bm25": bm25}, QaConfig(k=1, search_k=10, bootstrap=100),
                    cache_dir=tmp_path / "gen")
    assert plot_qa(res, tmp_path / "qa.png").stat().st_size > 1000


def test_config_and_items_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"`search_k` \(--search-k\)"):
        QaConfig(k=5, search_k=4)
    with pytest.raises(ConfigError, match=r"`k` \(-k\)"):
        QaConfig(k=0)
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"query": "q", "answer_id": "gcide/A#1", "answer": "A"}) + "\n{\"query\": 1}\n")
    assert load_qa_items(p, limit=1) == [QaItem("q", "gcide/A#1", "A")]
    with pytest.raises(ConfigError, match=r"qa.jsonl:2: not a gcide-qa item"):
        load_qa_items(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_qa_items(tmp_path / "nope.jsonl")


def test_cli_qa_recall_and_answers(lm, dict_ds, bm25, tmp_path):
    from click.testing import CliRunner

    from retromem.cli import main

    model_dir = str(tiny_llama_dir(tmp_path / "llama"))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": q.query, "answer_id": q.answer_id, "answer": q.answer}
                                              for q in ITEMS])
    args = ["ralm", "qa", "--model", model_dir, "--datastore", str(dict_ds.path), "--qa", str(qa),
            "--lexical-index", str(bm25.path), "--out", str(tmp_path / "out"), "-k", "2", "--search-k", "10",
            "--lm-questions", "3", "--max-new-tokens", "2", "--bootstrap", "50", "--threads", "1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "out" / "results.json").read_text())
    assert rep["recall"]["retrievers"]["bm25"]["recall@1"]["rate"] == 1.0 and rep["questions"] == 3
    assert (tmp_path / "out" / "qa.png").is_file() and "oracle" in r.output
    bad = CliRunner().invoke(main, args[:8] + ["--out", str(tmp_path / "o2")])  # no retriever
    assert bad.exit_code == 2 and "--lexical-index" in bad.output
    bad = CliRunner().invoke(main, args + ["--search-k", "1"])
    assert bad.exit_code == 2 and "`search_k` (--search-k)" in bad.output
