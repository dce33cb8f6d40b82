"""RetroForCausalLM: causal shift, neighbour use, parity with the plain decoder, generate, save/load,
training on real text, and bad input."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from retromem.retro import RetroConfig, RetroForCausalLM
from retromem.retro.modeling_retro import decoder_config

M, K, R = 4, 2, 8  # chunk length, neighbours per chunk, neighbour length


def tiny_config(**overrides) -> RetroConfig:
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, chunk_length=M, num_neighbours=K, neighbour_length=R, retro_layers=[2, 4],
                  encoder_num_layers=2)
    fields.update(overrides)
    return RetroConfig(**fields)



@pytest.fixture(scope="module")
def model() -> RetroForCausalLM:
    torch.manual_seed(0)
    return RetroForCausalLM(tiny_config()).eval()


def inputs(T: int = 16, B: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 97, (B, T), generator=g)
    nb = torch.randint(0, 97, (B, T // M, K, R), generator=g)  # (B, n_chunks, k, r)
    return x, nb


@torch.no_grad()
def test_future_tokens_do_not_change_past_logits(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    for t in range(x.shape[1] - 1):
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 97
        out = model(changed, neighbour_ids=nb).logits
        torch.testing.assert_close(out[:, : t + 1], ref[:, : t + 1])
        assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:])


@torch.no_grad()
def test_neighbours_of_chunk_u_reach_only_positions_from_its_last_token(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    for u in range(nb.shape[1]):
        changed = nb.clone()
        changed[:, u] = (changed[:, u] + 1) % 97
        out = model(x, neighbour_ids=changed).logits
        first = u * M + M - 1  # chunk u is complete at its last token
        torch.testing.assert_close(out[:, :first], ref[:, :first])
        # the last token of chunk u is the first to see them (the test fails if neighbours are ignored)
        assert (out[:, first] - ref[:, first]).abs().max() > 1e-4


@torch.no_grad()
def test_neighbours_of_incomplete_chunks_are_ignored(model: RetroForCausalLM) -> None:
    x, nb = inputs(T=14)  # 3 complete chunks and half of a 4th
    nb = torch.cat([nb, nb[:, :1]], dim=1)  # neighbours for the incomplete 4th chunk too
    ref = model(x, neighbour_ids=nb).logits
    changed = nb.clone()
    changed[:, 3] = (changed[:, 3] + 5) % 97
    torch.testing.assert_close(model(x, neighbour_ids=changed).logits, ref)


@torch.no_grad()
def test_without_neighbours_it_is_the_plain_llama_decoder(model: RetroForCausalLM) -> None:
    x, _ = inputs()
    llama = LlamaForCausalLM(decoder_config(model.config)).eval()
    missing, unexpected = llama.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("retro_" in k for k in unexpected) and unexpected
    torch.testing.assert_close(model(x).logits, llama(x).logits)


@torch.no_grad()
def test_generate_matches_greedy_loop(model: RetroForCausalLM) -> None:
    x, nb = inputs(T=16, B=1)
    prompt = x[:, :5]
    for kwargs in ({}, {"neighbour_ids": nb}):
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
        seq = prompt
        for _ in range(8):
            nxt = model(seq, **kwargs).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(out, seq), kwargs.keys()
    # the neighbours reach generate's scores (a random tiny model may still pick the same tokens)
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    plain, retro = model.generate(prompt, **common), model.generate(prompt, neighbour_ids=nb, **common)
    assert (plain.scores[-1] - retro.scores[-1]).abs().max() > 1e-4


@torch.no_grad()
def test_save_pretrained_round_trip(model: RetroForCausalLM, tmp_path) -> None:
    x, nb = inputs()
    model.save_pretrained(tmp_path)
    loaded = RetroForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.retro_layers == [2, 4] and loaded.config.neighbour_length == R
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # model_type "retro" is registered
    assert isinstance(auto, RetroForCausalLM)
    torch.testing.assert_close(auto(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits)


@torch.no_grad()
def test_tied_embeddings_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    tied = RetroForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    x, nb = inputs()
    tied.save_pretrained(tmp_path)
    loaded = RetroForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, tied(x, neighbour_ids=nb).logits)


def cca_out_projections(model: RetroForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("retro_cca.attn.o_proj.weight")}


@torch.no_grad()
def test_gated_model_starts_exactly_without_retrieval(tmp_path) -> None:
    # transformers initialises the decoder's sub-modules with LlamaModel's own _init_weights, which
    # once re-drew the zeroed projections (max |W| ~ 0.07, logits off by up to 0.07)
    torch.manual_seed(0)
    gated = RetroForCausalLM(tiny_config(gated=True)).eval()
    proj = cca_out_projections(gated)
    assert len(proj) == 2 and all(bool((p == 0).all()) for p in proj.values())
    x, nb = inputs()
    assert torch.equal(gated(x, neighbour_ids=nb).logits, gated(x).logits)
    # the rest of the blocks is initialised as usual: only the output projection is zero
    enc = dict(gated.named_parameters())["model.layers.1.retro_encoder.in_proj.weight"]
    assert 0.005 < float(enc.std()) < 0.05
    with torch.no_grad():  # a second initialisation leaves weights that moved alone (as transformers does)
        first = next(iter(proj.values()))
        first.fill_(0.5)
        gated.init_weights()
        assert bool((first == 0.5).all())
        first.zero_()
    torch.manual_seed(0)
    ungated = RetroForCausalLM(tiny_config(gated=False))
    assert all(float(p.abs().max()) > 0.01 for p in cca_out_projections(ungated).values())

    gated.save_pretrained(tmp_path / "fresh")
    loaded = RetroForCausalLM.from_pretrained(tmp_path / "fresh").eval()
    assert all(bool((p == 0).all()) for p in cca_out_projections(loaded).values())
    assert torch.equal(loaded(x, neighbour_ids=nb).logits, loaded(x).logits)
    torch.testing.assert_close(loaded(x).logits, gated(x).logits)

    # trained projections survive loading (initialisation only touches what the checkpoint lacks)
    for p in cca_out_projections(gated).values():
        p.normal_(0, 0.1)
    gated.save_pretrained(tmp_path / "trained")
    loaded = RetroForCausalLM.from_pretrained(tmp_path / "trained").eval()
    for n, p in cca_out_projections(loaded).items():
        torch.testing.assert_close(p, cca_out_projections(gated)[n])
    assert not torch.allclose(loaded(x, neighbour_ids=nb).logits, loaded(x).logits)

    # a checkpoint without the projections: the missing ones start at zero again
    from safetensors.torch import load_file, save_file

    path = tmp_path / "trained" / "model.safetensors"
    state = {n: t for n, t in load_file(path).items() if not n.endswith("retro_cca.attn.o_proj.weight")}
    save_file(state, path, metadata={"format": "pt"})
    loaded = RetroForCausalLM.from_pretrained(tmp_path / "trained").eval()
    assert all(bool((p == 0).all()) for p in cca_out_projections(loaded).values())
    assert torch.equal(loaded(x, neighbour_ids=nb).logits, loaded(x).logits)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    # transformers 5.x checkpoints a decoder layer's forward, not its __call__: the RETRO hooks run outside the
    # checkpoint, so the replay in backward cannot miss the CCA update (its context is gone by then)
    x, nb = inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = RetroForCausalLM(tiny_config()).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(x, neighbour_ids=nb, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_loss_falls_on_real_text_with_neighbours() -> None:
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.assets import demo_corpus

    torch.manual_seed(0)
    with gzip.open(demo_corpus(), "rt", encoding="utf-8") as fh:
        text = json.loads(fh.readline())["text"]
    tok = load_hf_tokenizer("gpt2")
    gpt2_ids = torch.tensor(tok(text[:12000], verbose=False)["input_ids"])
    # a compact vocabulary of the ids that occur keeps the tiny model's output layer small (and fast)
    used, ids = torch.unique(gpt2_ids, return_inverse=True)
    m, T, B = 8, 32, 8
    cfg = tiny_config(vocab_size=len(used), chunk_length=m, neighbour_length=2 * m)
    model = RetroForCausalLM(cfg).train()
    chunks = ids[: len(ids) // m * m].view(-1, m)  # (n_total, m)
    n_total = chunks.shape[0]

    def neighbours(chunk_index: torch.Tensor) -> torch.Tensor:
        # other chunks of the same text (never the chunk itself), each with its continuation
        out = []
        for i in range(K):
            j = (chunk_index + 17 * (i + 1)) % (n_total - 1)
            out.append(torch.cat([chunks[j], chunks[j + 1]], dim=-1))  # (..., 2m)
        return torch.stack(out, dim=-2)  # (..., k, 2m)

    starts = torch.arange(B) * (T // m)  # chunk index of each sequence's start
    chunk_index = starts[:, None] + torch.arange(T // m)  # (B, n_chunks)
    x = chunks[chunk_index].reshape(B, T)  # (B, T)
    nb = neighbours(chunk_index)  # (B, n_chunks, k, r)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model(x, neighbour_ids=nb, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # starts near ln(vocab) ~ 6.3; 20 steps reach ~0.64x
    enc = model.model.layers[1].retro_encoder.in_proj.weight
    assert enc.grad is not None and enc.grad.abs().sum() > 0  # the encoder learns through CCA


@torch.no_grad()
def test_padded_neighbour_tokens_are_ignored(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    mask = torch.ones_like(nb)
    mask[:, :, 1, 5:] = 0  # the 2nd neighbour of every chunk has a continuation cut short: 3 padding tokens
    ref = model(x, neighbour_ids=nb, neighbour_attention_mask=mask).logits
    changed = nb.clone()
    changed[:, :, 1, 5:] = (changed[:, :, 1, 5:] + 7) % 97  # other ids under the padding
    torch.testing.assert_close(model(x, neighbour_ids=changed, neighbour_attention_mask=mask).logits, ref)
    # the mask is used at all (without it the padding ids would count) and all-ones equals no mask
    assert (model(x, neighbour_ids=changed).logits - ref)[:, M - 1:].abs().max() > 1e-4
    torch.testing.assert_close(model(x, neighbour_ids=nb, neighbour_attention_mask=torch.ones_like(nb)).logits,
                               model(x, neighbour_ids=nb).logits)


def test_bad_neighbour_mask(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    with pytest.raises(ValueError, match=r"`neighbour_attention_mask` must have the shape of neighbour_ids"):
        model(x, neighbour_ids=nb, neighbour_attention_mask=torch.ones(2, 4, 2, 7))
    empty = torch.ones_like(nb)
    empty[0, 1, 0] = 0
    with pytest.raises(ValueError, match="no tokens"):
        model(x, neighbour_ids=nb, neighbour_attention_mask=empty)
    with pytest.raises(ValueError, match="without `neighbour_ids`"):
        model(x, neighbour_attention_mask=empty)


@pytest.mark.parametrize("shape, why", [
    ((2, 4, 3, R), "num_neighbours=2"),
    ((2, 4, K, R + 1), f"neighbour_length={R}"),
    ((3, 4, K, R), "batch=2"),
    ((2, 4, K * R), "n_chunks>=1"),
    ((2, 0, K, R), "n_chunks>=1"),
])
def test_bad_neighbour_shape(model: RetroForCausalLM, shape: tuple, why: str) -> None:
    x, _ = inputs()
    with pytest.raises(ValueError, match=r"`neighbour_ids` must have shape") as err:
        model(x, neighbour_ids=torch.zeros(shape, dtype=torch.long))
    assert why in str(err.value) and str(shape) in str(err.value)


def test_neighbour_ids_outside_the_vocabulary(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    nb[0, 1, 0, 3] = 97
    with pytest.raises(ValueError, match=r"token ids in \[0, 97\).*got values in \[\d+, 97\]"):
        model(x, neighbour_ids=nb)


def test_bad_neighbour_dtype(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    with pytest.raises(TypeError, match="integer token ids"):
        model(x, neighbour_ids=nb.float())


def test_neighbours_with_a_cache_are_refused(model: RetroForCausalLM) -> None:
    x, nb = inputs()
    cache = model(x[:, :8], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="use_cache=False"):
        model(x[:, 8:], neighbour_ids=nb, past_key_values=cache)


@pytest.mark.parametrize("layers", [[0], [5], [2, 2], []])
def test_retro_layers_outside_the_model(layers: list[int]) -> None:
    with pytest.raises(ValueError, match="`retro_layers`"):
        tiny_config(retro_layers=layers)


def test_default_retro_layers_follow_the_paper() -> None:
    assert tiny_config(num_hidden_layers=12, retro_layers=None).retro_layers == [6, 9, 12]
    assert tiny_config(num_hidden_layers=30, retro_layers=None).retro_layers == list(range(9, 31, 3))


@pytest.mark.parametrize("field, value", [("chunk_length", 0), ("num_neighbours", -1), ("neighbour_length", 0),
                                          ("encoder_hidden_size", 30)])
def test_bad_config_fields(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**{field: value})


# -- CCA placement and relative positions (issue 16: the paper's choices) ----------------------------------

CCA_OPTIONS = [("after_layer", False), ("before_mlp", False), ("after_layer", True), ("before_mlp", True)]


def options_model(placement: str, relative: bool, gated: bool = False, seed: int = 0) -> RetroForCausalLM:
    torch.manual_seed(seed)
    return RetroForCausalLM(tiny_config(cca_placement=placement, cca_relative_positions=relative, gated=gated)).eval()


@pytest.mark.parametrize("placement,relative", CCA_OPTIONS)
@torch.no_grad()
def test_gated_start_is_exact_for_every_cca_option(placement: str, relative: bool) -> None:
    gated = options_model(placement, relative, gated=True)
    x, nb = inputs()
    assert torch.equal(gated(x, neighbour_ids=nb).logits, gated(x).logits)
    # and not by accident: once the projections move, the neighbours reach the logits
    for p in cca_out_projections(gated).values():
        p.normal_(0, 0.1)
    assert (gated(x, neighbour_ids=nb).logits - gated(x).logits)[:, M - 1:].abs().amax(-1).min() > 1e-5


@pytest.mark.parametrize("placement,relative", CCA_OPTIONS)
@torch.no_grad()
def test_future_neighbours_never_change_earlier_logits(placement: str, relative: bool) -> None:
    model = options_model(placement, relative)
    x, nb = inputs()
    ref = model(x, neighbour_ids=nb).logits
    for u in range(nb.shape[1]):
        changed = nb.clone()
        changed[:, u] = (changed[:, u] + 1) % 97
        out = model(x, neighbour_ids=changed).logits
        first = u * M + M - 1  # chunk u is complete at its last token
        torch.testing.assert_close(out[:, :first], ref[:, :first], rtol=0, atol=0)
        assert (out[:, first] - ref[:, first]).abs().max() > 1e-4
    for t in range(x.shape[1] - 1):  # and future tokens never change earlier logits
        changed = x.clone()
        changed[:, t + 1:] = (changed[:, t + 1:] + 1) % 97
        torch.testing.assert_close(model(changed, neighbour_ids=nb).logits[:, : t + 1], ref[:, : t + 1])


@torch.no_grad()
def test_before_mlp_places_cca_between_attention_and_feed_forward() -> None:
    # With the RETRO layers' feed-forward zeroed, CCA before it or on the layer's output is the same sum
    # (h + attn + CCA(h + attn)); with a live feed-forward, before_mlp feeds CCA's update through it.
    after, before = options_model("after_layer", False), options_model("before_mlp", False, seed=1)
    before.load_state_dict(after.state_dict())
    x, nb = inputs()
    assert not torch.allclose(after(x, neighbour_ids=nb).logits, before(x, neighbour_ids=nb).logits)
    torch.testing.assert_close(after(x).logits, before(x).logits, rtol=0, atol=0)  # no neighbours: one decoder
    for model in (after, before):
        for number in model.config.retro_layers:
            model.model.layers[number - 1].mlp.down_proj.weight.zero_()
    torch.testing.assert_close(after(x, neighbour_ids=nb).logits, before(x, neighbour_ids=nb).logits)


@torch.no_grad()
def test_relative_positions_make_cca_depend_on_neighbour_token_order() -> None:
    from retromem.retro.modeling_retro import ChunkedCrossAttention

    torch.manual_seed(0)
    hidden = torch.randn(2, 3 * M, 32)  # (B, T, D)
    encoded = torch.randn(2, 3, K * R, 16)  # (B, C, k*r, d): encoder width 16 (half the decoder's)
    perm = torch.randperm(K * R)
    for relative in (False, True):
        cca = ChunkedCrossAttention(tiny_config(cca_relative_positions=relative), 32).eval()
        same = torch.allclose(cca(hidden, encoded), cca(hidden, encoded[:, :, perm]), atol=1e-6)
        assert same != relative  # without positions the keys are a set; with them, an ordered sequence
    # rotary: only the offset counts (queries and keys shifted together give the same scores)
    from retromem.retro.modeling_retro import rotary_cos_sin, rotate

    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(qp: int, kp: int) -> torch.Tensor:
        rq = rotate(q, *rotary_cos_sin(torch.tensor([qp]), 8, 10000.0, q))
        rk = rotate(k, *rotary_cos_sin(torch.tensor([kp]), 8, 10000.0, k))
        return (rq * rk).sum()
    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 3))


@pytest.mark.parametrize("placement,relative", [("before_mlp", True), ("after_layer", True)])
def test_cca_options_round_trip(placement: str, relative: bool, tmp_path) -> None:
    model = options_model(placement, relative)
    x, nb = inputs()
    model.save_pretrained(tmp_path)
    loaded = RetroForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.cca_placement, loaded.config.cca_relative_positions) == (placement, relative)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, model(x, neighbour_ids=nb).logits)


def test_a_config_saved_before_the_cca_options_loads_with_the_old_behaviour(tmp_path) -> None:
    old = options_model("after_layer", False)
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("cca_placement", "cca_relative_positions"):
        saved.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = RetroForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.cca_placement, loaded.config.cca_relative_positions) == ("after_layer", False)
    x, nb = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, neighbour_ids=nb).logits, old(x, neighbour_ids=nb).logits)
    assert RetroConfig.from_dict({}).cca_placement == "after_layer"  # a missing key: the old behaviour


@pytest.mark.parametrize("field,value", [("cca_placement", "between"), ("cca_relative_positions", "yes")])
def test_bad_cca_options(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        tiny_config(**{field: value})


def test_gradient_checkpointing_gives_the_same_gradients_before_mlp() -> None:
    # before_mlp's CCA runs inside the layer's forward, which checkpointing replays in backward
    x, nb = inputs()
    grads = []
    for checkpointing in (False, True):
        model = options_model("before_mlp", True).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(x, neighbour_ids=nb, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
