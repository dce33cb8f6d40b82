"""Speculative *sampling* with draft trees is exact: the tokens it emits follow the model's own
(processed) distribution. A tiny Llama with a 6-token vocabulary, drafts from a fixed tree with
several children per node (and from the early-exit drafter), many seeds; the empirical distribution
of the first three new tokens is compared with the exact one (enumerated from the model) by a
chi-square test, and the same test rejects samples drawn at another temperature (it has power)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from retromem.retro.drafters import ModelDraftConfig, ModelDrafter
from retromem.retro.speculative import DraftTree, speculative_generate

V = 6
PROMPT = [1, 4, 2, 5]
TEMPERATURE = 0.7


class FixedTree:
    """The same shape under any root: 3 children, 2 grandchildren under the first, 1 under the second."""

    def draft(self, context):
        return DraftTree((int(context[-1]), 0, 1, 2, 3, 4, 0), (-1, 0, 0, 0, 1, 1, 2), (0, 1, 1, 1, 2, 2, 2))


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, eos_token_id=None, pad_token_id=0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked enough that drafts are accepted often, spread enough that many triples occur
        m.lm_head.weight.mul_(6.0)
    return m


def exact_triples(model, temperature: float) -> np.ndarray:
    """P(t1, t2, t3 | prompt) for all V^3 triples, from the model's tempered distributions."""
    seqs = torch.tensor([PROMPT + list(t) for t in itertools.product(range(V), repeat=3)])
    with torch.no_grad():
        lp = torch.log_softmax(model(seqs).logits.float() / temperature, dim=-1)  # (V^3, len, V)
    n = len(PROMPT)
    tot = sum(lp[torch.arange(len(seqs)), n - 1 + j, seqs[:, n + j]] for j in range(3))
    return tot.exp().numpy()


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit, bins with expected count under 5 pooled into one."""
    exp = probs * counts.sum()
    small = exp < 5
    obs = np.append(counts[~small], counts[small].sum())
    ex = np.append(exp[~small], exp[small].sum())
    ex = ex * obs.sum() / ex.sum()
    stat = float(((obs - ex) ** 2 / ex).sum())
    # the chi-square survival function: the regularized upper incomplete gamma Q(df / 2, stat / 2)
    return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def sample_triples(model, drafter, n: int) -> tuple[np.ndarray, int]:
    counts = np.zeros(V ** 3, dtype=np.int64)
    accepted = 0
    for seed in range(n):
        torch.manual_seed(seed)
        out, st = speculative_generate(model, PROMPT, drafter, max_new_tokens=3, do_sample=True,
                                       temperature=TEMPERATURE, top_k=0, top_p=1.0)
        a, b, c = out[0, len(PROMPT):].tolist()
        counts[a * V * V + b * V + c] += 1
        accepted += sum(st.accepted)
    return counts, accepted


def test_tree_sampling_matches_the_model_distribution(model):
    probs = exact_triples(model, TEMPERATURE)
    counts, accepted = sample_triples(model, FixedTree(), 1500)
    assert accepted > 400  # the acceptance rule ran, and accepted drafts, at depth 1 and 2
    assert chi_square_p(counts, probs) > 1e-3
    # the first token alone (the root, drawn from the prefill) and the pair of drafted ones
    tv = 0.5 * np.abs(counts / counts.sum() - probs).sum()
    assert tv < 0.15
    # power: the same test rejects the distribution at another temperature
    rng = np.random.default_rng(0)
    other = rng.multinomial(1500, exact_triples(model, 1.0))
    assert chi_square_p(other, probs) < 1e-3


@pytest.mark.slow
def test_sampling_with_a_draft_model_tree_matches(model):
    drafter = ModelDrafter.early_exit(model, 1, ModelDraftConfig(depth=2, width=3, max_nodes=6, min_prob=0.0))
    counts, accepted = sample_triples(model, drafter, 1500)
    assert accepted > 200
    assert chi_square_p(counts, exact_triples(model, TEMPERATURE)) > 1e-3


def test_greedy_equals_plain_greedy_with_processors(model):
    """Processors that read the sequence (repetition penalty) see each node's own sequence."""
    ids = torch.tensor([PROMPT])
    want = model.generate(ids, max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                          attention_mask=torch.ones_like(ids), pad_token_id=0)
    got, st = speculative_generate(model, PROMPT, FixedTree(), max_new_tokens=12, do_sample=False,
                                   repetition_penalty=1.5)
    assert got.tolist() == want.tolist() and sum(st.accepted) > 0
