"""SirLLM (Yao et al. 2024, "SirLLM: Streaming Infinite Retentive LLM") for any RoPE decoder from
Hugging Face, with no weight changed.

StreamingLLM keeps attention sinks and the most recent tokens; SirLLM also keeps the tokens that
carried the most information, so facts stated early in a long dialogue survive. A token's score
is its token entropy, the model's own surprise at it, e_t = -log p(x_t | x_<t), computed from the
logits the model produces anyway (:meth:`SirLLM.observe`). Scores decay (multiplied by ``decay``
every ``decay_every`` tokens) so that old key tokens eventually give way to new ones.

Each layer keeps ``n_sink`` sinks + the ``n_keep`` highest-scored middle tokens + the ``n_local``
most recent tokens, re-positioned inside the cache as StreamingLLM does
(:class:`~retromem.memory.kv_budget.CachePositionMemory`). All layers keep the same tokens.
The paper's runs keep no recent window (``n_local = 0``) and decay per dialogue turn
(``decay_per="call"`` with one call per turn; otherwise per ``decay_every`` tokens); its code prunes
once before each turn, so the turn being read is whole in the cache, as here before each call. On SmolLM2-135M that split recalled nothing of facts beyond the window,
while half the budget as a window recalled some (BENCHMARKS.md, issue 20): isolated tokens packed
side by side are text a small model cannot read, a contiguous window keeps it fluent.
Feed input through :func:`~retromem.memory.kv_budget.stream` (or
:func:`~retromem.memory.kv_budget.generate`), which hands every position's logits to the memory;
a token never scored counts as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from retromem.config import number, one_of
from retromem.memory.kv_budget import CachePositionMemory, check_budget


@dataclass(frozen=True)
class SirLLMConfig:
    """n_sink: attention sinks; n_keep: entropy-selected tokens; n_local: recent window;
    decay: factor applied to every kept score each ``decay_every`` tokens (``decay_per`` =
    ``tokens``) or once per call (``call``: per dialogue turn when each turn is one call, the
    paper's); 1 = no decay."""

    n_sink: int = 4
    n_keep: int = 512
    n_local: int = 512
    decay: float = 0.9
    decay_every: int = 512
    decay_per: str = "tokens"

    def __post_init__(self) -> None:
        check_budget(self.n_sink, "sirllm.n_sink", "--n-sink", minimum=0)
        check_budget(self.n_keep, "sirllm.n_keep", "--n-keep", minimum=0)
        check_budget(self.n_local, "sirllm.n_local", "--n-local", minimum=0)
        number(self.decay, "sirllm.decay", gt=0, le=1, flag="--decay")
        check_budget(self.decay_every, "sirllm.decay_every", "--decay-every")
        one_of(self.decay_per, "sirllm.decay_per", ("tokens", "call"), flag="--decay-per")

    @property
    def budget_tokens(self) -> int:
        return self.n_sink + self.n_keep + self.n_local


class SirLLM(CachePositionMemory):
    """The SirLLM cache: a transformers Cache for one stream (batch of one, no padding)."""

    max_batch = 1

    def __init__(self, model: Any, config: SirLLMConfig | None = None) -> None:
        self.config = c = config or SirLLMConfig()
        super().__init__(model, c.n_sink, c.n_local)
        self.score_pos = torch.zeros(0, dtype=torch.long)  # positions of scored tokens still kept (ascending)
        self.score_val = torch.zeros(0)  # their decayed token entropies
        self.last_logprobs: torch.Tensor | None = None  # (V,) log p(. | everything so far)
        self.scored_until = 0

    @property
    def budget_tokens(self) -> int:
        return self.config.budget_tokens

    def observe(self, input_ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Score the tokens of ``input_ids`` (1, T) from ``logits`` (1, T' <= T, V) of the last T'
        positions: token t's entropy comes from the logits of position t - 1."""
        ids = input_ids[0].cpu()
        T, Tl = ids.numel(), logits.shape[1]
        lg = logits[0].float()  # (T', V)
        # -log p(x_t) = logsumexp(logits_{t-1}) - logits_{t-1}[x_t]: no (T, V) log-softmax is built
        ent = torch.zeros(T)  # a token never predicted (the first one, or logits not kept) scores 0
        if Tl > 1:
            nxt = ids[T - Tl + 1:].to(lg.device)
            ent[T - Tl + 1:] = (lg[:-1].logsumexp(-1) - lg[:-1].gather(1, nxt[:, None])[:, 0]).cpu()
        if self.last_logprobs is not None:
            ent[0] = -self.last_logprobs[ids[0]]
        per_call = self.config.decay_per == "call"
        self.score_val = self.score_val * self.config.decay ** (1 if per_call else T / self.config.decay_every)
        start = self.scored_until
        self.score_pos = torch.cat([self.score_pos, torch.arange(start, start + T)])
        self.score_val = torch.cat([self.score_val, ent])
        self.scored_until += T
        self.last_logprobs = torch.log_softmax(lg[-1], -1).cpu() if Tl else None

    def keep(self, layer: int, pos: torch.Tensor) -> torch.Tensor:
        base = super().keep(layer, pos)  # sinks and recent window
        middle = (~base).nonzero().flatten()
        keep = base.clone()
        if middle.numel() and self.config.n_keep:
            mp = pos[middle].cpu()
            i = torch.searchsorted(self.score_pos, mp).clamp(max=max(self.score_pos.numel() - 1, 0))
            found = self.score_pos.numel() > 0
            score = torch.where(self.score_pos[i] == mp, self.score_val[i], torch.zeros(())) if found else torch.zeros(mp.numel())
            top = score.topk(min(self.config.n_keep, middle.numel())).indices
            keep[middle[top.to(middle.device)]] = True
        if layer == self.num_layers - 1:  # all layers dropped the same tokens: forget their scores
            kept = pos[keep].cpu()
            still = torch.isin(self.score_pos, kept) | (self.score_pos > int(pos.max()))
            self.score_pos, self.score_val = self.score_pos[still], self.score_val[still]
        return keep
