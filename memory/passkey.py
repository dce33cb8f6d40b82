"""Long-context data from real text: haystacks, passkey-retrieval examples and long documents.

Text comes from the shared English corpora (``/work/shared/corpora`` or ``$RETROMEM_SHARED``) or
the built-in demo corpus; a haystack is real documentation prose, concatenated and cut to length,
never repeated filler sentences (a model can learn to skip filler, which makes passkey too easy).
"""

from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

PREFIX = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


def default_corpus() -> Path:
    """python-docs from the shared corpora if present, else the built-in demo corpus."""
    shared = Path(os.environ.get("RETROMEM_SHARED", "/work/shared")) / "corpora" / "python-docs.jsonl.gz"
    if shared.is_file():
        return shared
    from retromem.assets import demo_corpus

    return demo_corpus()


def iter_texts(path: str | Path, min_chars: int = 2000) -> Iterator[str]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line)["text"]
            if len(text) >= min_chars:
                yield text


def token_stream(tokenizer: Any, n_tokens: int, corpus: str | Path | None = None, skip_docs: int = 0) -> list[int]:
    """``n_tokens`` token ids of real text: documents of ``corpus`` concatenated (separated by EOS)."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for i, text in enumerate(iter_texts(corpus or default_corpus())):
        if i < skip_docs:
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise ValueError(f"the corpus {corpus or default_corpus()} holds fewer than {n_tokens} tokens after skipping {skip_docs} documents")


def long_documents(tokenizer: Any, min_tokens: int, count: int, corpus: str | Path | None = None) -> list[list[int]]:
    """Up to ``count`` single documents of at least ``min_tokens`` tokens each (cut to min_tokens)."""
    out = []
    for text in iter_texts(corpus or default_corpus(), min_chars=min_tokens * 2):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            out.append(ids[:min_tokens])
            if len(out) == count:
                break
    return out


@dataclass(frozen=True)
class PasskeyExample:
    input_ids: list[int]  # the whole example, answer included
    answer_start: int  # index of the first answer token
    needle_start: int  # index of the first needle token
    key: str
    needle_len: int  # tokens of the needle


def make_passkey(tokenizer: Any, length: int, depth: float, haystack: list[int], rng: random.Random,
                 digits: int = 5) -> PasskeyExample:
    """A passkey example of exactly ``length`` tokens with the needle at ``depth`` (0..1) of the haystack."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1], got {depth}")
    key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, needle, question, answer = enc(PREFIX), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(" " + key)
    n_hay = length - len(prefix) - len(needle) - len(question) - len(answer)
    if n_hay < 0:
        raise ValueError(f"`length` {length} is too short for a passkey example (needs > {length - n_hay} tokens)")
    if len(haystack) < n_hay:
        raise ValueError(f"the haystack has {len(haystack)} tokens, {n_hay} needed")
    offset = rng.randrange(0, len(haystack) - n_hay + 1)
    hay = haystack[offset:offset + n_hay]
    cut = round(depth * n_hay)
    ids = prefix + hay[:cut] + needle + hay[cut:] + question + answer
    assert len(ids) == length
    return PasskeyExample(ids, length - len(answer), len(prefix) + cut, key, len(needle))
