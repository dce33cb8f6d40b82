"""`retro eval` and `ralm eval` in process against the same commands on a local Ray (`--executor ray
--workers N`), same run, same inputs: wall time of each and whether the results are identical.

A small setting built here (the demo corpus's first ``--docs`` documents, GPT-2 tokens, 32-token
chunks, all-MiniLM-L6-v2 in a Flat index, k=2 neighbours), a tiny Llama over GPT-2's vocabulary
and its RETROfit (blocks moved off zero) saved to disk, so that Ray tasks load them by path. The
Ray start is timed apart from the evaluations (the commands join the running Ray).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/eval_ray.py --work /work/scratch/h19io/eval-ray
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path


def setting(work: Path, docs: int) -> dict[str, str]:
    """Datastore, index, neighbours (train and eval splits) and the two model directories."""
    import gzip

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from retromem.assets import demo_corpus
    from retromem.datastore import BuildConfig, build
    from retromem.datastore.tokenizer import load_hf_tokenizer
    from retromem.index.dense import DenseIndex
    from retromem.index.dense_build import DenseBuildConfig, build_dense
    from retromem.index.embed import EmbedConfig, embed_datastore
    from retromem.retro import retro_config_for, retrofit
    from retromem.retro.loading import save_model
    from retromem.retro.neighbours import NeighboursConfig, compute_neighbours

    work.mkdir(parents=True, exist_ok=True)
    with gzip.open(demo_corpus(), "rt") as fh:
        recs = [json.loads(line) for line in fh][:docs]
    (work / "docs.jsonl").write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:4000]}) + "\n" for r in recs))
    ds = str(work / "ds")
    build(BuildConfig(inputs=(str(work / "docs.jsonl"),), out=ds, tokenizer="gpt2", chunk_length=32, workers=1))
    emb = embed_datastore(EmbedConfig(datastore=ds, out=str(work / "emb"), batch_size=64), progress=False)
    idx = build_dense(DenseBuildConfig(embeddings=str(emb.out), out=str(work / "idx"), factory="Flat", tune=False),
                      progress=False).out
    index = DenseIndex.open(idx)
    nb = []
    for split in ("train", "eval"):
        cfg = NeighboursConfig(datastore=ds, out=str(work / f"nb-{split}"), k=2, split=split, shard_chunks=256,
                               eval_fraction=0.25, split_seed=0)
        nb.append(str(compute_neighbours(cfg, index, progress=False).out))
    tok = load_hf_tokenizer("gpt2")
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    base.save_pretrained(work / "base")
    tok.save_pretrained(str(work / "base"))
    model = retrofit(copy.deepcopy(base), retro_config_for(base.config, chunk_length=32, neighbour_length=64,
                                                            retro_layers=[2, 4], encoder_num_layers=1))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    save_model(model, tok, work / "retro", str(work / "base"))
    return {"ds": ds, "idx": str(idx), "nb_train": nb[0], "nb_eval": nb[1], "base": str(work / "base"),
            "retro": str(work / "retro")}


def run(args: list[str]) -> float:
    from click.testing import CliRunner

    from retromem.cli import main as cli

    t = time.perf_counter()
    res = CliRunner().invoke(cli, args)
    if res.exit_code != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed: {res.output[-2000:]}\n{res.exception!r}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--docs", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-sequences", type=int, default=48)
    ap.add_argument("--max-docs", type=int, default=8)
    a = ap.parse_args()
    t = time.perf_counter()
    s = setting(a.work, a.docs)
    print(f"setting built in {time.perf_counter() - t:.0f}s")
    retro = ["retro", "eval", "--model", s["retro"], "--datastore", s["ds"], "--neighbours", s["nb_train"],
             "--neighbours", s["nb_eval"], "--seq-chunks", "4", "--max-sequences", str(a.max_sequences),
             "--batch-size", "4", "--bootstrap", "300", "--threads", "1"]
    ralm = ["ralm", "eval", "--model", s["base"], "--datastore", s["ds"], "--index", s["idx"], "--stride", "32",
            "--query-tokens", "32", "--context-tokens", "256", "-k", "2", "--deep-k", "20", "--max-docs",
            str(a.max_docs), "--max-doc-tokens", "256", "--eval-fraction", "0.25", "--fractions", "0.5,1",
            "--bootstrap", "300", "--batch-size", "4", "--threads", "1"]
    times = {}
    times["retro local"] = run(retro + ["--out", str(a.work / "retro-local")])
    times["ralm local"] = run(ralm + ["--out", str(a.work / "ralm-local")])
    from retromem.datastore.executors import init_ray

    t = time.perf_counter()
    ray = init_ray(None, a.workers)
    times["ray start"] = time.perf_counter() - t
    ray_flags = ["--executor", "ray", "--workers", str(a.workers)]
    times["retro ray"] = run(retro + ray_flags + ["--out", str(a.work / "retro-ray")])
    times["ralm ray"] = run(ralm + ray_flags + ["--out", str(a.work / "ralm-ray")])
    times["retro ray again"] = run(retro + ray_flags + ["--out", str(a.work / "retro-ray2")])  # workers warm
    ray.shutdown()

    def same(kind: str) -> bool:
        def load(d: str) -> dict:
            r = json.loads((a.work / d / "results.json").read_text())
            for key in ("seconds", "plot", "config", "title"):
                r.pop(key, None)
            return r

        return load(f"{kind}-local") == load(f"{kind}-ray") and (
            kind != "retro" or (a.work / "retro-local/chunks.jsonl").read_bytes() == (a.work / "retro-ray/chunks.jsonl").read_bytes())

    r = json.loads((a.work / "retro-local" / "results.json").read_text())
    q = json.loads((a.work / "ralm-local" / "results.json").read_text())
    print(f"retro eval: {r['sequences']} sequences of {r['sequence_tokens']} tokens, settings {', '.join(r['settings'])}")
    print(f"ralm eval: {len(q['doc_ids'])} documents, {q['tokens_scored']} tokens scored, {len(q['scaling'])} scaling rows")
    for name, v in times.items():
        print(f"{name:<18} {v:7.1f} s")
    print(f"identical results: retro {same('retro')}, ralm {same('ralm')}")


if __name__ == "__main__":
    main()
