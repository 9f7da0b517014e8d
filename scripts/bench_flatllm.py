"""Quality on the real model (SmolLM2-135M by default): perplexity of dense, FLAT-LLM with IPRS and with uniform
allocation, FLAP (WIFV, AL-AM) and SVD-LLM at 10..60% compression (one parameter accounting for all), with
compression wall time and peak memory, and what rounding ranks costs. Interrupted runs resume (out/bench_cache).

    python scripts/bench_flatllm.py        # writes docs/bench_flatllm.{md,json} and docs/bench_flatllm.png
"""

from __future__ import annotations

import argparse

import torch
from common import DOCS, REAL, Resume, load_model, ppl, save, table, timed, windows

from flatllm_export.compress import compress_flap, compress_flatllm, compress_svdllm
from flatllm_export.compress.flatllm import VARIANTS

PAPER = VARIANTS["paper"]  # this table is FLAT-LLM as published; scripts/bench_ablation.py measures the default
METHODS = {"iprs": lambda m, c, r: compress_flatllm(m, c, r, "iprs", options=PAPER),
           "uniform": lambda m, c, r: compress_flatllm(m, c, r, "uniform", options=PAPER),
           "flap": lambda m, c, r: compress_flap(m, c, r, "WIFV", "AL-AM"),
           "svd-llm": lambda m, c, r: compress_svdllm(m, c, r)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6")
    ap.add_argument("--model", default=REAL)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen (train plays)")
    ap.add_argument("--max-windows", type=int, default=24, help="evaluation windows of --seqlen (test plays)")
    ap.add_argument("--report-only", action="store_true", help="write the tables from what is measured so far")
    args = ap.parse_args()
    name, ratios = args.model, [float(r) for r in args.ratios.split(",")]
    done = Resume("bench_flatllm", f"{name}-{args.seqlen}-{args.nsamples}-{args.max_windows}")
    test = windows(name, seqlen=args.seqlen)[: args.max_windows]
    calib = windows(name, "train", seqlen=args.seqlen, nsamples=args.nsamples)
    if args.report_only:
        done.get = lambda rid, fn: done.rows.get(rid)
    dense = done.get("dense", lambda: {"ppl": ppl(load_model(name), test, 4)})["ppl"]

    def measure(method: str, ratio: float, **kw) -> dict:
        model = load_model(name)
        fn = (lambda: compress_flatllm(model, calib, ratio, "iprs", options=PAPER, **kw)) if kw else \
            (lambda: METHODS[method](model, calib, ratio))
        rep, secs, peak = timed(fn)
        return {"ppl": ppl(model, test, 4), "achieved": rep["achieved_ratio"], "s": secs, "MiB": peak,
                "v": " ".join(str(r.get("v_head_dim", "")) for r in rep["layers"]),
                "mlp": " ".join(str(r.get("intermediate_size", "")) for r in rep["layers"])}

    for ratio in ratios:  # measured in the order given; the table is sorted by ratio
        for method in METHODS:
            print(method, ratio, done.get(f"{method}-{ratio}", lambda: measure(method, ratio)), flush=True)
    rows = []
    for ratio in sorted(r for r in ratios if all(f"{m}-{r}" in done.rows for m in METHODS)):
        row = {"model": name, "ratio": ratio, "dense": dense}
        for method in METHODS:
            r = done.rows[f"{method}-{ratio}"]
            row.update({method: r["ppl"], f"{method} achieved": r["achieved"], f"{method} s": r["s"],
                        f"{method} MiB": r["MiB"]})
        rows.append(row)
    rounding = []
    for round_to in (1, 8, 32):
        r = done.get(f"round-{round_to}", lambda: measure("iprs", 0.3, round_to=round_to))
        if r is None:
            continue
        rounding.append({"round_to": round_to, "achieved": r["achieved"], "ppl": r["ppl"],
                         "value head dims": r["v"], "MLP sizes": r["mlp"]})
    if not rows:
        raise SystemExit("no ratio has all four methods measured yet")
    plot(rows, name)
    cols = ["ratio", "dense", "iprs", "uniform", "flap", "svd-llm", "iprs achieved", "flap achieved",
            "svd-llm achieved", "iprs s", "uniform s", "flap s", "svd-llm s", "iprs MiB", "svd-llm MiB"]
    md = (f"{name}: perplexity on the first {len(test)} windows of {args.seqlen} tokens of the test plays "
          f"({len(test) * (args.seqlen - 1)} predicted tokens), calibration {args.nsamples} x {args.seqlen} tokens "
          "of the train plays; time (s) and peak RSS (MiB) of the whole compression (IPRS includes its "
          "block-influence pass). The dense model is SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF: every "
          "method compresses the same weights.\n\n![ppl vs ratio](bench_flatllm.png)\n\n" + table(rows, cols)
          + "\n\nWhat rounding costs (30%, IPRS): `compression.round_to` makes every value head dim and MLP size a "
          "multiple of it; the solver re-balances to keep the ratio.\n\n"
          + table(rounding, ["round_to", "achieved", "ppl", "value head dims", "MLP sizes"]))
    save("bench_flatllm", rows + [dict(r, table="rounding") for r in rounding], md)


def plot(rows, name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    x = [r["ratio"] for r in rows]
    for key, style, label in (("iprs", "o-", "FLAT-LLM (IPRS)"), ("uniform", "s--", "FLAT-LLM (uniform)"),
                              ("flap", "^:", "FLAP (WIFV, AL-AM)"), ("svd-llm", "v-.", "SVD-LLM")):
        ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.axhline(rows[0]["dense"], color="gray", lw=1, label="dense")
    ax.set(title=name, xlabel="compression ratio (decoder linear weights removed)", ylabel="test ppl",
           yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "bench_flatllm.png", dpi=110)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
