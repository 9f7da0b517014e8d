"""FLAT-LLM ablations on the real model (SmolLM2-135M by default): the paper-faithful method, each option of
``FlatLLMOptions`` changed alone, and variant ablation (the best single changes combined), at 30% and 50%. Perplexity on the
validation plays (Macbeth, Twelfth Night: what choices are made on) and on the test plays (what is reported),
calibration time and peak memory. Block influence depends only on the dense model and the calibration windows:
it is measured once per window count and shared by every IPRS row (its time is added to each row's calibration
time). Interrupted runs resume (out/bench_cache).

    python scripts/bench_ablation.py                       # every row, in the order of ROWS
    python scripts/bench_ablation.py --only paper,greedy   # some rows (ratio and name: see ROWS)
    python scripts/bench_ablation.py --report-only         # docs/bench_ablation.{md,json} from what is measured
"""

from __future__ import annotations

import argparse
import time

import torch
from common import REAL, Resume, load_model, ppl, save, table, timed, windows

from flatllm_export.compress.flatllm import VARIANTS, block_influence, compress_flatllm, resolve_options

PAPER = dict(variant="paper")
# name -> (what changes against the paper, compress_flatllm keyword arguments); the calibration size rows change
# the calibration set instead ('nsamples', 'seqlen')
CHANGES = {
    "paper": ("nothing: the official code's choices", PAPER),
    "ridge-trace": ("MLP leverage ridge = 1.0 x trace(C)/n instead of an absolute 1.0",
                    dict(PAPER, ridge_scale="trace")),
    "greedy": ("MLP channels chosen greedily by the down_proj output error they leave",
               dict(PAPER, mlp_select="greedy")),
    "attention": ("V/O basis: PCA of o_proj's input (attention-weighted values) instead of v_proj's output",
                  dict(PAPER, vo_basis="attention")),
    "o-lstsq": ("o_proj re-solved by least squares on its input instead of folded", dict(PAPER, o_proj="lstsq")),
    "weighted": ("V/O basis whitened by o_proj's input and weighted by o_proj, o_proj by least squares",
                 dict(PAPER, vo_basis="weighted", o_proj="lstsq")),
    "vo-1.5": ("V/O keeps 1.5x the layer's kept ratio (capped at 1); the MLP gives way", dict(PAPER, vo_scale=1.5)),
    "smooth-0.5": ("IPRS on importance + 0.5 x mean importance (middle layers less starved)",
                   dict(PAPER, iprs_smoothing=0.5)),
    "qk": ("head-wise low-rank Q/K at the same total ratio", dict(PAPER, qk=True)),
    "fast-stats": ("float32 products for the covariances, block influence on 8 windows (speed)",
                   dict(PAPER, stats_dtype="float32", importance_windows=8)),
    "ablation": ("variant ablation: the best single changes combined (chosen on the validation plays)", dict(variant="ablation")),
    "ablation-128": ("variant ablation, calibration 128 x 512 tokens", dict(variant="ablation", nsamples=128)),
    "ablation-2048": ("variant ablation, calibration 32 x 2048 tokens", dict(variant="ablation", seqlen=2048)),
}
ROWS = [(0.3, n) for n in CHANGES if not n.startswith("ablation-")] + \
    [(0.5, n) for n in ("paper", "ablation", "smooth-0.5", "vo-1.5")] + [(0.3, "ablation-128"), (0.3, "ablation-2048")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=REAL)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of --seqlen (train plays)")
    ap.add_argument("--max-windows", type=int, default=24, help="evaluation windows (validation and test plays)")
    ap.add_argument("--only", default="", help="comma list of ROW names (e.g. 0.3:paper,0.5:ablation) or names")
    ap.add_argument("--report-only", action="store_true", help="write the tables from what is measured so far")
    args = ap.parse_args()
    name = args.model
    done = Resume("bench_ablation", f"{name}-{args.seqlen}-{args.nsamples}-{args.max_windows}")
    evals = {split: windows(name, split, seqlen=args.seqlen)[: args.max_windows] for split in ("validation", "test")}
    if args.report_only:
        done.get = lambda rid, fn: done.rows.get(rid)
    dense = done.get("dense", lambda: {s: ppl(load_model(name), w, 4) for s, w in evals.items()})

    def influence(calib, n_windows: int) -> dict:
        def measure():
            t0 = time.time()
            return {"scores": block_influence(load_model(name), calib, n_windows), "s": time.time() - t0}
        return done.get(f"influence-{len(calib)}x{calib.shape[1]}-{n_windows}", measure)

    def measure(ratio: float, change: str) -> dict:
        kw = dict(CHANGES[change][1])
        nsamples, seqlen = kw.pop("nsamples", args.nsamples), kw.pop("seqlen", args.seqlen)
        qk, variant = kw.pop("qk", False), kw.pop("variant")
        opt = resolve_options(variant, **kw)
        calib = windows(name, "train", seqlen=seqlen, nsamples=nsamples)
        imp = influence(calib, opt.importance_windows)
        model = load_model(name)
        rep, secs, peak = timed(lambda: compress_flatllm(model, calib, ratio, "iprs", qk, options=opt,
                                                         importance=imp["scores"]))
        return {**{s: ppl(model, w, 4) for s, w in evals.items()}, "achieved": rep["achieved_ratio"],
                "calibration s": imp["s"] + secs, "influence s": imp["s"], "MiB": peak, "options": rep["options"],
                "qk": qk, "calibration": f"{nsamples}x{seqlen}",
                "v": " ".join(str(r["v_head_dim"]) for r in rep["layers"]),
                "mlp": " ".join(str(r["intermediate_size"]) for r in rep["layers"])}

    only = [s for s in args.only.split(",") if s]
    for ratio, change in ROWS:
        if only and change not in only and f"{ratio}:{change}" not in only:
            continue
        r = done.get(f"{ratio}:{change}", lambda: measure(ratio, change))
        if r is not None:
            print(ratio, change, {k: r[k] for k in ("validation", "test", "calibration s")}, flush=True)
    report(done, dense, args)


def report(done: Resume, dense: dict, args) -> None:
    rows = []
    for ratio, change in ROWS:
        r = done.rows.get(f"{ratio}:{change}")
        paper = done.rows.get(f"{ratio}:paper")
        if r is None:
            continue
        row = {"ratio": ratio, "row": change, "change": CHANGES[change][0],
               "validation": "not measured" if r["validation"] is None else r["validation"],
               "test": r["test"], "calibration": r["calibration"], "achieved": r["achieved"],
               "calibration s": r["calibration s"], "peak MiB": r["MiB"]}
        if paper:
            for split in ("validation", "test"):
                if r[split] is not None and paper[split] is not None:
                    row[f"{split} vs paper"] = r[split] - paper[split]
        row["test rise"] = r["test"] - dense["test"]
        rows.append(row)
    if not rows:
        raise SystemExit("nothing measured yet")
    cols = ["ratio", "row", "validation", "validation vs paper", "test", "test vs paper", "test rise", "calibration",
            "achieved", "calibration s", "peak MiB", "change"]
    default = {k: v for k, v in vars(VARIANTS["ablation"]).items() if v != getattr(VARIANTS["paper"], k)}
    md = (f"{args.model}: FLAT-LLM (IPRS) ablations. Perplexity on the first {args.max_windows} windows of "
          f"{args.seqlen} tokens of the validation plays (Macbeth, Twelfth Night: choices are made on these) and of "
          f"the test plays (Hamlet, The Tempest, Much Ado: reported); dense {dense['validation']:.2f} / "
          f"{dense['test']:.2f}. Calibration {args.nsamples} x {args.seqlen} train-play tokens unless the row says "
          "otherwise. 'calibration s' = block influence (measured once per calibration set, shared by the rows) + "
          "compression, wall time on a shared 2-core machine; peak MiB = the process's peak RSS during "
          "compression. 'test rise' = test ppl - dense. Variant ablation differs from the paper in: "
          f"`{default}`.\n\n" + table(rows, cols))
    save("bench_ablation", rows, md)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
