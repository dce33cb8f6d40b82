import pytest
import numpy as np

from retromem.datastore.tokenizer import BatchTokenizer, load_hf_tokenizer
from tests.conftest import demo_records

TEXTS = [
    "plain ascii text " * 40,
    "Ünïcödé wörds, emoji 🙂🙂 and CJK 漢字かな mixed with ascii; " * 12,
    "  leading spaces and trailing   \n\n\ttabs\t",
    "a <|endoftext|> literal special token is text",
    demo_records()[0]["text"][:5000],
]


def test_byte_level_boundaries_match_tokenizer_offsets(tmp_path):
    tok = load_hf_tokenizer("gpt2")
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    bt = BatchTokenizer(tmp_path / "tokenizer.json", chunk_length=16)
    assert bt.byte_level
    fast = bt.encode(TEXTS)
    for text, (ids, starts) in zip(TEXTS, fast):
        ref_ids, ref_starts = bt._encode_with_offsets(text)
        np.testing.assert_array_equal(ids, ref_ids)
        # offsets may put a split multi-byte character in either chunk; both tile the text
        assert starts[0] == 0 and np.all(np.diff(starts) > 0) and starts[-1] < len(text)
        assert np.abs(starts - ref_starts).max() <= 1
        assert tok.decode(ids.tolist()) == text


def test_special_token_strings_in_text_are_not_control_tokens(tmp_path):
    tok = load_hf_tokenizer("gpt2")
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    bt = BatchTokenizer(tmp_path / "tokenizer.json", chunk_length=64)
    ids, _ = bt.encode(["x <|endoftext|> y"])[0]
    assert tok.eos_token_id not in ids.tolist()


@pytest.mark.slow  # SmolLM2-135M's tokenizer on real text
def test_tiktoken_twin_reproduces_the_default_tokenizer_on_real_text(tmp_path):
    """The fast path (tiktoken) must give exactly the tokenizers library's ids, for both built-ins."""
    texts = [r["text"] for r in demo_records()]
    for name in ("smollm2-135m", "gpt2"):
        tok = load_hf_tokenizer(name)
        tok.backend_tokenizer.save(str(tmp_path / f"{name}.json"))
        bt = BatchTokenizer(tmp_path / f"{name}.json", chunk_length=64)
        assert bt.engine == "tiktoken"
        reference = [e.ids for e in bt.backend.encode_batch(texts, add_special_tokens=False)]
        assert bt.encode_ids(texts) == reference


def test_characters_outside_a_pruned_vocabulary_fall_back_to_tokenizers(tmp_path):
    tok = load_hf_tokenizer("smollm2-135m")
    tok.backend_tokenizer.save(str(tmp_path / "t.json"))
    bt = BatchTokenizer(tmp_path / "t.json", chunk_length=64)
    # U+4xxxx encodes with lead byte 0xF1, which SmolLM2's vocabulary lacks; \x04 likewise
    texts = ["plain text", "rare \U00041234 plane-4 char", "control \x04 byte", "more plain text"]
    assert bt.encode_ids(texts) == [e.ids for e in bt.backend.encode_batch(texts, add_special_tokens=False)]


def test_a_tokenizer_worker_never_imports_transformers(tmp_path):
    """Workers load tokenizer.json with the tokenizers library alone: importing transformers cost each
    build process 1.2-1.4 CPU-seconds (issue 19). The byte table it used to supply is kept here and
    must equal transformers' own."""
    import subprocess
    import sys

    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    from retromem.datastore.tokenizer import bytes_to_unicode

    assert bytes_to_unicode() == reference()
    load_hf_tokenizer("gpt2").backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    code = (
        "import sys\n"
        "from retromem.datastore.tokenizer import BatchTokenizer\n"
        f"bt = BatchTokenizer({str(tmp_path / 'tokenizer.json')!r}, chunk_length=16)\n"
        "assert bt.byte_level and len(bt.encode(['hello world'])[0][0]) == 2\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


@pytest.mark.parametrize("threads", ["1", "2"])
def test_flat_batch_encoding_equals_the_per_document_encoding(tmp_path, monkeypatch, threads):
    """encode_flat (the build's path, vectorized over a batch, tiktoken in slices on threads) gives
    each document's ids and chunk starts exactly as encode() does, and byte starts at characters."""
    monkeypatch.setenv("RAYON_NUM_THREADS", threads)
    tok = load_hf_tokenizer("gpt2")
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    bt = BatchTokenizer(tmp_path / "tokenizer.json", chunk_length=16)
    texts = TEXTS + ["x", "é" * 40, "naïve café " * 30, "🙂" * 33] + [r["text"][:800] for r in demo_records()[1:9]]
    flat = bt.encode_flat(texts)
    per_doc = bt.encode(texts)
    np.testing.assert_array_equal(flat.ids, np.concatenate([ids for ids, _ in per_doc]))
    np.testing.assert_array_equal(flat.ntok, [len(ids) for ids, _ in per_doc])
    np.testing.assert_array_equal(flat.char_starts, np.concatenate([starts for _, starts in per_doc]))
    np.testing.assert_array_equal(flat.doc_bytes, [len(t.encode()) for t in texts])
    byte_starts = np.concatenate([[len(t[:c].encode()) for c in starts] for t, (_, starts) in zip(texts, per_doc)])
    np.testing.assert_array_equal(flat.byte_starts, byte_starts)


def test_datastore_tokenizer_files_from_the_cache_equal_a_fresh_save(tmp_path, monkeypatch):
    """The first build fills the cache with save_pretrained's files; later builds copy the same bytes."""
    from retromem.datastore.tokenizer import save_datastore_tokenizer

    monkeypatch.setenv("RETROMEM_CACHE", str(tmp_path / "cache"))
    fresh, copied = tmp_path / "fresh", tmp_path / "copied"
    fresh.mkdir()
    copied.mkdir()
    save_datastore_tokenizer("gpt2", fresh)
    assert [p.name for p in (tmp_path / "cache" / "tokenizers").glob("gpt2-datastore-*/retromem_tokenizer.json")]
    save_datastore_tokenizer("gpt2", copied)
    names = sorted(p.name for p in fresh.iterdir())
    assert "tokenizer.json" in names and names == sorted(p.name for p in copied.iterdir())
    assert all((fresh / n).read_bytes() == (copied / n).read_bytes() for n in names)
