"""LM-Infinite (Han et al. 2023, "LM-Infinite: Zero-Shot Extreme Length Generalization for Large
Language Models") for any RoPE decoder from Hugging Face, with no weight changed.

Two changes to attention, nothing else:
- a Lambda-shaped mask: each token attends to the first ``n_global`` tokens of the stream and to
  the ``n_local`` most recent tokens (itself included), never to the middle;
- a distance cap: a starting token further away than the local window is seen at distance
  ``cap`` (the paper sets n_local = cap = the trained length L_pretrain). With RoPE this is done
  by rotating the query to position ``cap`` and the starting keys to position 0
  (:class:`~retromem.memory.kv_budget.TwoBranchMemory`), so no relative distance the model sees
  exceeds what it was trained on.

Time and memory are O(n): a layer keeps n_global + n_local keys and values whatever the input
length. With ``n_local`` at least the input length the memory is exact full attention.

Usage::

    enable(model)                                   # once: the retromem_kv attention function
    mem = LMInfinite(model, LMInfiniteConfig(n_global=4, n_local=2048))
    logits = stream(model, ids, mem, keep_logits="all")          # ids may be far longer than trained
    out = generate(model, prompt, LMInfinite(model, cfg), max_new_tokens=20)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from retromem.config import fail
from retromem.memory.kv_budget import TwoBranchMemory, check_budget


@dataclass(frozen=True)
class LMInfiniteConfig:
    """n_global: starting tokens always attended; n_local: local window (tokens, itself included);
    cap: the distance starting tokens beyond the window are seen at (None: n_local)."""

    n_global: int = 4
    n_local: int = 2048
    cap: int | None = None

    def __post_init__(self) -> None:
        check_budget(self.n_global, "lm_infinite.n_global", "--n-global", minimum=0)
        check_budget(self.n_local, "lm_infinite.n_local", "--n-local")
        if self.cap is not None:
            check_budget(self.cap, "lm_infinite.cap", "--cap")
            if self.cap < self.n_local:
                fail("lm_infinite.cap", f"be >= n_local ({self.n_local}): keys beyond the window are further away",
                     self.cap, flag="--cap")

    @property
    def budget_tokens(self) -> int:
        return self.n_global + self.n_local


class LMInfinite(TwoBranchMemory):
    """The LM-Infinite cache: a transformers Cache for one stream (any batch size, no padding)."""

    def __init__(self, model: Any, config: LMInfiniteConfig | None = None) -> None:
        self.config = config or LMInfiniteConfig()
        cap = self.config.cap if self.config.cap is not None else self.config.n_local
        super().__init__(model, self.config.n_global, self.config.n_local, far_distance=cap)

    @property
    def budget_tokens(self) -> int:
        return self.config.budget_tokens
