"""Generation with retrieval for a batch of prompts (left-padded, one generate() call with a key/value
cache): each prompt gets the tokens and retrievals it gets alone; beam search runs through it."""

from __future__ import annotations

import torch

from retromem.retro.generation import generate_batch_with_retrieval, generate_with_retrieval

from tests.retro.conftest import CHUNK
from tests.retro.test_generation import model_and_tok  # noqa: F401  (the fixture)


@torch.no_grad()
def test_a_batch_equals_each_prompt_alone(retro_ds, retro_index, model_and_tok):  # noqa: F811
    model, tok = model_and_tok
    prompts = [retro_ds.tokens([10])[0][0, :CHUNK - 5].tolist(), retro_ds.tokens([40])[0][0, :CHUNK + 3].tolist()]
    seen: list[tuple[int, int]] = []
    batch = generate_batch_with_retrieval(model, tok, retro_index, prompts, max_new_tokens=CHUNK + 4,
                                          on_retrieval=lambda i, r: seen.append((i, r.chunk_index)))
    for i, prompt in enumerate(prompts):
        alone = generate_with_retrieval(model, tok, retro_index, prompt, max_new_tokens=CHUNK + 4)
        assert batch[i].new_ids == alone.new_ids and batch[i].prompt_ids == prompt
        assert [(r.chunk_index, r.chunk_ids) for r in batch[i].retrievals] == \
            [(r.chunk_index, r.chunk_ids) for r in alone.retrievals]
    # each row retrieves at its own chunk boundaries: prompt 1 completes its chunk 0 in the prompt itself
    assert (1, 0) in seen and (0, 0) in seen and sorted(seen) == sorted(set(seen))
    beams = generate_batch_with_retrieval(model, tok, retro_index, prompts, max_new_tokens=CHUNK + 4, num_beams=2)
    assert [len(b.new_ids) for b in beams] == [CHUNK + 4, CHUNK + 4] and all(b.retrievals for b in beams)
