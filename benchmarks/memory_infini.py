"""Benchmark: peak memory and throughput of Infini-attention inference with SmolLM2-135M on CPU,
against the base model with full attention, in the same run.

Each (mode, length) runs in its own child process so that the process-wide peak resident set size
(``ru_maxrss``) belongs to that run alone. Inputs are real text (python-docs), processed under
``torch.inference_mode()``; only the last position's logits are kept in both modes (full logits of
64K tokens would be 12.9 GB on their own and measure the LM head, not attention).

    .venv/bin/python benchmarks/memory_infini.py --lengths 2048,4096,8192,16384,32768,65536 \
        --full-max 8192 --segment 2048 --out /work/scratch/memory/bench_infini
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(mode: str, length: int, segment: int, threads: int) -> dict:
    import psutil
    import torch

    torch.set_num_threads(threads)
    from retromem.memory.infini_attention import InfiniAttentionConfig, InfiniAttentionLM
    from retromem.memory.passkey import token_stream
    from retromem.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    ids = torch.tensor([token_stream(tok, length)])
    if mode == "infini":
        model = InfiniAttentionLM(model, InfiniAttentionConfig(segment_length=segment)).eval()
    rss_loaded = psutil.Process().memory_info().rss
    # reset the kernel's high-water mark so that VmHWM covers the forward pass only, not the
    # transients of loading the model and tokenizing the text (Linux; absent elsewhere)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    with torch.inference_mode():
        if mode == "infini":
            out = model(ids, keep_logits="last")
            state = out.memory.nbytes()
        else:
            model(ids, logits_to_keep=1, use_cache=False)
            state = 0
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    forward_peak = None
    if hwm_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                forward_peak = int(line.split()[1]) * 1024
    return {"mode": mode, "length": length, "seconds": seconds, "tokens_per_s": length / seconds,
            "peak_rss_mib": peak / 2**20, "loaded_rss_mib": rss_loaded / 2**20,
            "peak_over_loaded_mib": (peak - rss_loaded) / 2**20, "memory_state_bytes": state,
            "forward_peak_rss_mib": forward_peak / 2**20 if forward_peak else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192,16384,32768,65536")
    ap.add_argument("--full-max", type=int, default=8192, help="Longest input run with full attention.")
    ap.add_argument("--segment", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/out/memory_infini")
    ap.add_argument("--modes", default="full,infini", help="Which modes to run (results of others in --out are kept).")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.segment, args.threads)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    old = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    rows = [r for r in old if r["mode"] not in modes]  # earlier runs of the other modes (marked as such)
    for r in rows:
        r["earlier_run"] = True
    runs = [("full", n) for n in lengths if n <= args.full_max and "full" in modes] + \
        [("infini", n) for n in lengths if "infini" in modes]
    for mode, n in runs:
        proc = subprocess.run([sys.executable, __file__, "--child", mode, str(n), "--segment", str(args.segment),
                               "--threads", str(args.threads)], capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            print(f"{mode} {n}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{mode:6s} {n:6d} tokens  {row['seconds']:8.1f} s  {row['tokens_per_s']:7.1f} tok/s  "
              f"peak RSS {row['peak_rss_mib']:7.0f} MiB  (+{row['peak_over_loaded_mib']:6.0f} over loaded model)  "
              f"state {row['memory_state_bytes'] / 2**20:.2f} MiB"
              + (f"  forward-only peak RSS {row['forward_peak_rss_mib']:7.0f} MiB" if row.get("forward_peak_rss_mib") else ""),
              flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    inf = [r for r in rows if r["mode"] == "infini"]
    if inf:
        peaks = [r["peak_rss_mib"] for r in inf]
        print(f"infini peak RSS {min(peaks):.0f}..{max(peaks):.0f} MiB: max/min = {max(peaks) / min(peaks):.3f}")
        for r in inf:
            base = next((f for f in rows if f["mode"] == "full" and f["length"] == r["length"]
                         and not f.get("earlier_run")), None)
            if base:
                print(f"length {r['length']}: infini/full tokens/s = {r['tokens_per_s'] / base['tokens_per_s']:.3f}, "
                      f"peak RSS infini/full = {r['peak_rss_mib'] / base['peak_rss_mib']:.3f}")
    plot(rows, out / "memory_infini.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("full", "o--"), ("infini", "s-")):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["length"])
        if rs:
            ax[0].plot([r["length"] for r in rs], [r["peak_rss_mib"] for r in rs], style, label=mode)
            ax[1].plot([r["length"] for r in rs], [r["tokens_per_s"] for r in rs], style, label=mode)
    for a, t in zip(ax, ("peak RSS (MiB)", "tokens/s")):
        a.set_xscale("log", base=2)
        a.set_xlabel("input tokens")
        a.set_ylabel(t)
        a.legend()
    fig.suptitle("SmolLM2-135M on CPU: Infini-attention (segment 2048) vs full attention")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
