"""`retro eval` and `ralm eval` as Ray tasks (a local Ray) give the in-process figures exactly: the
same batches, the same threads, per-token NLLs merged in batch order. (Local worker processes run
the same task functions through the same executor interface.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from retromem.datastore.executors import LocalExecutor, RayExecutor
from retromem.retro.neighbours import NeighbourTable

from tests.retro.conftest import CHUNK, tiny_llama_dir

RALM = dict(stride=16, query_tokens=16, context_tokens=256, k=2, deep_k=24, max_docs=4, max_doc_tokens=64,
            eval_fraction=0.5, split_seed=1, decontam_ngram=8, bootstrap=200, batch_size=3)


@pytest.fixture(scope="module")
def retro_dirs(tmp_path_factory):
    """A tiny Llama base on disk and its RETROfit (blocks moved off zero) saved beside it: paths a task
    loads from."""
    from retromem.retro import retro_config_for, retrofit
    from retromem.retro.loading import save_model
    from retromem.models import load_causal_lm

    root = tmp_path_factory.mktemp("eval-models")
    base_dir = tiny_llama_dir(root / "base")
    base, tok = load_causal_lm(str(base_dir))
    model = retrofit(copy.deepcopy(base), retro_config_for(base.config, chunk_length=CHUNK, neighbour_length=2 * CHUNK,
                                                            retro_layers=[2], encoder_num_layers=1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    out = save_model(model, tok, root / "retro", str(base_dir))
    return str(base_dir), str(out)


def _retro_eval(retro_dirs, retro_ds, retro_neighbours, out, executor=None, shards=1):
    from retromem.models import load_causal_lm
    from retromem.retro.evaluation import EvalModels, RetroEvalConfig, ShardRunner, evaluate
    from retromem.retro.loading import load_retro_model

    base_dir, model_dir = retro_dirs
    model = load_retro_model(model_dir)[0]
    base = load_causal_lm(base_dir)[0]
    cfg = RetroEvalConfig(out=str(out), seq_chunks=3, max_sequences=7, batch_size=2, overlap_ngram=4, bootstrap=200)
    runner = None if executor is None else ShardRunner(executor, EvalModels(model_dir, base=base_dir, threads=1), shards)
    s = evaluate(model, retro_ds, NeighbourTable(retro_neighbours, retro_ds), cfg, base=base, progress=False,
                 runner=runner)
    chunks = (out / "chunks.jsonl").read_bytes()
    for key in ("seconds", "plot"):
        s.pop(key)
    s["config"].pop("out")
    return s, chunks


def _ralm_eval(llama_dir, retro_ds, retro_index, executor=None, shards=1):
    from retromem.models import load_causal_lm
    from retromem.retro.ralm import RalmConfig, RalmModel, RalmRunner, evaluate_ralm

    model, tok = load_causal_lm(llama_dir)
    runner = None if executor is None else RalmRunner(executor, RalmModel(llama_dir, threads=1), shards)
    res = evaluate_ralm(model, tok, retro_index, retro_ds, RalmConfig(**RALM, fractions=(0.5, 1.0), seeds=(0, 1)),
                        runner=runner)
    return json.dumps(res.as_dict(), sort_keys=True), res


@pytest.mark.slow
def test_retro_and_ralm_eval_on_a_local_ray_equal_in_process(retro_dirs, retro_ds, retro_neighbours, retro_index,
                                                             tmp_path):
    pytest.importorskip("ray")
    ray_exec = RayExecutor(workers=2)
    try:
        local, local_chunks = _retro_eval(retro_dirs, retro_ds, retro_neighbours, tmp_path / "local")
        assert local["sequences"] == 7  # 4 batches of 2, the last one short, cut into 3 tasks
        on_ray, ray_chunks = _retro_eval(retro_dirs, retro_ds, retro_neighbours, tmp_path / "ray", ray_exec, 3)
        assert on_ray == local and ray_chunks == local_chunks
        assert set(local["settings"]) == {"base", "retro", "retro_random", "retro_off"}
        plain, _ = _ralm_eval(retro_dirs[0], retro_ds, retro_index)
        sharded, _ = _ralm_eval(retro_dirs[0], retro_ds, retro_index, ray_exec, 4)
        assert sharded == plain  # every setting, difference, interval and scaling row
    finally:
        ray_exec.ray.shutdown()


@pytest.mark.slow
def test_runner_refuses_models_that_give_other_settings(retro_dirs, retro_ds, retro_neighbours, tmp_path):
    """Tasks that would score a base model this process does not have (or the reverse) are refused,
    not merged into a summary of mismatched settings."""
    from retromem.errors import ConfigError
    from retromem.retro.evaluation import EvalModels, RetroEvalConfig, ShardRunner, evaluate
    from retromem.retro.loading import load_retro_model

    base_dir, model_dir = retro_dirs
    model = load_retro_model(model_dir)[0]
    cfg = RetroEvalConfig(out=str(tmp_path / "e"), seq_chunks=3, max_sequences=2, batch_size=2, bootstrap=50)
    runner = ShardRunner(LocalExecutor(1), EvalModels(model_dir, base=base_dir, threads=1), 1)
    with pytest.raises(ConfigError, match="same base and control"):
        evaluate(model, retro_ds, NeighbourTable(retro_neighbours, retro_ds), cfg, progress=False, runner=runner)
