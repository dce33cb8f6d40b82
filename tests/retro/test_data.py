"""Document splits, the neighbour table and the dataset read from the datastore's token array; a
datastore made with another tokenizer is refused."""

from __future__ import annotations

import numpy as np
import pytest

from retromem.retro.data import RetroDataset, check_datastore_tokenizer
from retromem.retro.neighbours import NeighbourTable
from retromem.retro.splits import SplitSpec
from retromem.errors import ConfigError

from tests.retro.conftest import SPLIT


def test_split_is_by_document_deterministic_and_disjoint(retro_ds):
    spec = SplitSpec(SPLIT["eval_fraction"], SPLIT["split_seed"])
    train, held = spec.doc_ids(retro_ds.num_documents, "train"), spec.doc_ids(retro_ds.num_documents, "eval")
    assert len(train) and len(held) and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(retro_ds.num_documents))
    assert (SplitSpec(SPLIT["eval_fraction"], SPLIT["split_seed"]).is_eval(held)).all()  # same answer every time
    train_chunks = spec.chunk_ids(retro_ds, "train")
    assert not np.isin(retro_ds.chunk_doc_array[train_chunks], held).any()
    # the fraction is honoured on many documents
    frac = SplitSpec(0.1, 3).is_eval(np.arange(20_000)).mean()
    assert 0.09 < frac < 0.11
    with pytest.raises(ConfigError, match="eval_fraction"):
        SplitSpec(1.5)


def test_dataset_items_are_chunks_with_their_neighbours(retro_ds, retro_neighbours):
    table = NeighbourTable(retro_neighbours, retro_ds)
    spec = table.split_spec
    assert spec == SplitSpec(SPLIT["eval_fraction"], SPLIT["split_seed"])
    ids = spec.chunk_ids(retro_ds, "train")
    data = RetroDataset(retro_ds, ids, seq_chunks=3, table=table)
    m = retro_ds.chunk_length
    assert len(data) == len(ids) // 3
    for i in (0, len(data) - 1):
        item = data[i]
        win = data.windows[i]
        assert item["input_ids"].shape == (3 * m,) and item["neighbour_ids"].shape == (3, 2, 2 * m)
        toks, lens = retro_ds.tokens(win)
        assert item["input_ids"].view(3, m).numpy().tolist() == np.asarray(toks, dtype=np.int64).tolist()
        labels = item["labels"].view(3, m).numpy()
        for c in range(3):
            assert (labels[c, lens[c]:] == -100).all() and (labels[c, :lens[c]] == toks[c, :lens[c]]).all()
        nb_ids = table.lookup(win)  # (3, k)
        nt, nl = retro_ds.neighbour_tokens(nb_ids.reshape(-1))
        assert item["neighbour_ids"].reshape(6, 2 * m).numpy().tolist() == np.asarray(nt, dtype=np.int64).tolist()
        assert item["neighbour_attention_mask"].reshape(6, 2 * m).sum(1).numpy().tolist() == nl.tolist()
        # a neighbour may come from the document of another chunk of the window, never from its own chunk's
        assert (retro_ds.chunk_doc_array[nb_ids] != retro_ds.chunk_doc_array[win][:, None]).all()


def test_missing_neighbours_and_bad_sizes_are_named(retro_ds, retro_neighbours):
    table = NeighbourTable(retro_neighbours[:1], retro_ds)  # train split only
    held = table.split_spec.chunk_ids(retro_ds, "eval")
    with pytest.raises(ConfigError, match="no neighbours for chunk"):
        RetroDataset(retro_ds, held, 2, table)
    with pytest.raises(ConfigError, match="num_neighbours"):
        RetroDataset(retro_ds, table.chunk_ids, 2, table, k=5)
    with pytest.raises(ConfigError, match="seq_chunks"):
        RetroDataset(retro_ds, table.chunk_ids, 0, table)


def test_a_datastore_of_another_tokenizer_is_refused(retro_ds):
    from retromem.datastore.tokenizer import load_hf_tokenizer

    check_datastore_tokenizer(retro_ds, load_hf_tokenizer("gpt2"), 50257)  # its own: fine
    with pytest.raises(ConfigError, match="tokenized with 'gpt2'.*rebuild the datastore"):
        check_datastore_tokenizer(retro_ds, load_hf_tokenizer("smollm2-135m"))
    with pytest.raises(ConfigError, match="vocabulary has 1000"):
        check_datastore_tokenizer(retro_ds, None, 1000)
