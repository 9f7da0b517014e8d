"""Quality on the reference models: held-out perplexity of dense, FLAT-LLM with IPRS and with uniform
allocation, FLAP (WIFV, AL-AM) and SVD-LLM at 10..60% compression (one parameter accounting for all), with calibration wall time and peak memory.

    python scripts/bench_flatllm.py        # writes docs/bench_flatllm.{md,json} and docs/bench_flatllm.png
"""

from __future__ import annotations

import argparse

import torch
from common import DOCS, load_model, ppl, save, table, timed, windows

from flatllm_export.compress import compress_flap, compress_flatllm, compress_svdllm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--models", default="ref-llama,ref-gqa")
    ap.add_argument("--max-windows", type=int, default=128, help="evaluation windows of 256 tokens (test plays)")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for name in args.models.split(","):
        test, calib = windows(name)[: args.max_windows], windows(name, "train", nsamples=args.nsamples)
        dense = ppl(load_model(name), test)
        for ratio in ratios:
            row = {"model": name, "ratio": ratio, "dense": dense}
            methods = {"iprs": lambda m: compress_flatllm(m, calib, ratio, "iprs"),
                       "uniform": lambda m: compress_flatllm(m, calib, ratio, "uniform"),
                       "flap": lambda m: compress_flap(m, calib, ratio, "WIFV", "AL-AM"),
                       "svd-llm": lambda m: compress_svdllm(m, calib, ratio)}
            for alloc, fn in methods.items():
                model = load_model(name)
                rep, secs, peak = timed(lambda: fn(model))
                row[alloc] = ppl(model, test)
                row[f"{alloc} achieved"] = rep["achieved_ratio"]
                row[f"{alloc} s"] = secs
                row[f"{alloc} MiB"] = peak
            rows.append(row)
            print(row, flush=True)
    rounding = []
    for name in args.models.split(","):
        test, calib = windows(name)[: args.max_windows], windows(name, "train", nsamples=args.nsamples)
        for round_to in (1, 8, 32):
            model = load_model(name)
            rep = compress_flatllm(model, calib, 0.3, "iprs", round_to=round_to)
            rounding.append({"model": name, "round_to": round_to, "achieved": rep["achieved_ratio"],
                             "ppl": ppl(model, test),
                             "value head dims": " ".join(str(r["v_head_dim"]) for r in rep["layers"]),
                             "MLP sizes": " ".join(str(r["intermediate_size"]) for r in rep["layers"])})
            print(rounding[-1], flush=True)
    plot(rows)
    cols = ["model", "ratio", "dense", "iprs", "uniform", "flap", "svd-llm", "iprs achieved", "flap achieved",
            "svd-llm achieved", "iprs s", "iprs MiB", "flap s", "svd-llm s", "svd-llm MiB"]
    md = (f"Compression methods on the reference models: held-out ppl on the first {args.max_windows} windows of 256 "
          f"tokens of the test plays ({args.max_windows * 255} predicted tokens), calibration "
          f"{args.nsamples} x 256 tokens of the train plays; time and peak RSS of the whole compression (IPRS "
          "includes its block-influence pass).\n\n![ppl vs ratio](bench_flatllm.png)\n\n" + table(rows, cols)
          + "\n\nWhat rounding costs (30%, IPRS): `compression.round_to` makes every value head dim and MLP size a "
          "multiple of it; the solver re-balances to keep the ratio.\n\n"
          + table(rounding, ["model", "round_to", "achieved", "ppl", "value head dims", "MLP sizes"]))
    rows = rows + [dict(r, table="rounding") for r in rounding]
    save("bench_flatllm", rows, md)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.3), squeeze=False)
    for ax, name in zip(axes[0], names):
        rs = [r for r in rows if r["model"] == name]
        x = [r["ratio"] for r in rs]
        ax.plot(x, [r["iprs"] for r in rs], "o-", label="FLAT-LLM (IPRS)")
        ax.plot(x, [r["uniform"] for r in rs], "s--", label="FLAT-LLM (uniform)")
        ax.plot(x, [r["flap"] for r in rs], "^:", label="FLAP (WIFV, AL-AM)")
        ax.plot(x, [r["svd-llm"] for r in rs], "v-.", label="SVD-LLM")
        ax.axhline(rs[0]["dense"], color="gray", lw=1, label="dense")
        ax.set(title=name, xlabel="compression ratio", ylabel="held-out ppl", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "bench_flatllm.png", dpi=110)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
