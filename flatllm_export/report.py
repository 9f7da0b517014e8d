"""Readable reports: Markdown from the JSON report, and the allocation plot."""

from __future__ import annotations

from pathlib import Path


def plot_allocation(section: dict, path: Path) -> None:
    """Bar plot of per-layer importance (block influence) and kept ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in section["layers"]]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(layers) + 3), 3.2))
    width = 0.4
    ax.bar([i - width / 2 for i in layers], [r["kept_ratio"] for r in section["layers"]], width, label="kept ratio")
    if section["layers"][0].get("importance") is not None:
        imp = [r["importance"] for r in section["layers"]]
        top = max(imp) or 1.0
        ax.bar([i + width / 2 for i in layers], [v / top for v in imp], width, label="importance (relative)")
    ax.set_xlabel("decoder layer")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{section['method']} {section.get('allocation', '')}: requested {section['requested_ratio']:.0%}, "
                 f"achieved {section['achieved_ratio']:.2%}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(rep: dict) -> str:
    m = rep["model"]
    lines = [f"# flatllm-export report: {m['path']}", "",
             f"- layers: {m['layers']}, parameters: {m['parameters']:,}"
             + (f" -> {m['parameters_after']:,}" if "parameters_after" in m else ""),
             f"- decoder linear-weight parameters: {m['decoder_linear_params']:,}", ""]
    if "perplexity" in rep:
        lines += perplexity_markdown(rep)
    if "tasks" in rep:
        lines += ["## Task accuracy (lm-evaluation-harness)", "", tasks_markdown(rep["tasks"]), ""]
    if "compression" in rep:
        c = rep["compression"]
        lines += ["## Compression", "",
                  f"- method {c['method']}, allocation {c.get('allocation')}, qk {c.get('qk')}, round_to {c.get('round_to')}",
                  f"- requested ratio {c['requested_ratio']:.4f}, achieved {c['achieved_ratio']:.4f} "
                  f"({c['decoder_linear_params_before']:,} -> {c['decoder_linear_params_after']:,} decoder linear params)",
                  "", "![allocation](allocation.png)", "",
                  _table(c["layers"], list(c["layers"][0].keys())), ""]
        if c.get("damping"):
            lines += [f"- damping needed: {c['damping']}", ""]
    if "quantization" in rep:
        q = rep["quantization"]
        lines += ["## Quantization", "", "\n".join(f"- {k}: {_fmt(v)}" for k, v in q.items() if k != "layers"), ""]
    if "exports" in rep:
        lines += ["## Exports", "", _table([{"target": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, dict)}}
                                            for k, v in rep["exports"].items()],
                                           ["target", "path", "bytes", "max_abs_logit_diff", "noise_floor",
                                            "tolerance", "seconds"]), ""]
    if "validation" in rep:
        lines += [validation_markdown(rep["validation"])]
    lines += ["## Stages", "", _table([{"stage": k, "seconds": s["seconds"], "peak_rss_mb": s["peak_rss_mb"]}
                                       for k, s in rep["stages"].items()], ["stage", "seconds", "peak_rss_mb"]), ""]
    return "\n".join(lines)


def perplexity_markdown(rep: dict) -> list[str]:
    """One row per point (dense, compressed, quantized), one column per evaluation dataset."""
    ev = rep["recipe"].get("evaluation", {})
    by_dataset = rep.get("perplexity_by_dataset") or {str(ev.get("dataset")): rep["perplexity"]}
    windows = rep.get("stages", {}).get("evaluate_dense", {}).get("datasets", {})
    sizes = ", ".join(f"{name}: {windows[name]['windows']} windows" for name in by_dataset if name in windows)
    rows = [{"model": point, **{name: ppl.get(point) for name, ppl in by_dataset.items()}} for point in rep["perplexity"]]
    return ["## Perplexity", "",
            f"{ev.get('split')} split of each dataset, windows of {ev.get('seqlen')} tokens" + (f" ({sizes})" if sizes
                                                                                              else ""), "",
            _table(rows, ["model", *by_dataset]), ""]


def _pm(value, stderr) -> str:
    return "-" if value is None else f"{value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, float) else "")


def tasks_markdown(tasks: dict) -> str:
    """{point (dense, compressed, quantized): {task: metrics}} as one table: accuracy ± stderr."""
    rows = [{"task": task, "model": point, "acc": _pm(m.get("acc"), m.get("acc_stderr")),
             "acc_norm": _pm(m.get("acc_norm"), m.get("acc_norm_stderr")), "items": m["items"],
             "num_fewshot": m.get("num_fewshot")}
            for point, by_task in tasks.items() for task, m in by_task.items()]
    rows.sort(key=lambda r: r["task"])  # stable: dense, compressed, quantized within a task
    return _table(rows, ["task", "model", "acc", "acc_norm", "items", "num_fewshot"])


def validation_markdown(v: dict) -> str:
    cols = ["dataset", "runtime", "ppl", "ppl_increase", "logit_dev_f64", "logit_tol", "logit_rows_f64",
            "logit_rows_tol", "ppl_dev_f64", "ppl_tol", "layers", "greedy", "floor", "note", "ok"]
    if any("acc" in r for r in v["rows"]):  # task rows (lm-eval): accuracy, and the items scored differently
        cols[-3:-3] = ["acc", "acc_norm", "items", "acc_diff", "acc_tol", "items_differ"]
    s = v["sample"]
    floors = "; ".join(f"{kind}: logits {f['logits']:.3g}, ppl {f['ppl']:.3g}" for kind, f in v["floors"].items())
    lines = ["## Validation", "", "### Parity: does each runtime compute what its export defines?", "",
             f"Each runtime's deviation from the float64 reference of the model as exported (on {s['windows']} "
             f"{s['dataset']} window(s), {s['tokens']} predicted tokens; greedy: {s['generate_tokens']} tokens after "
             f"a {s['prompt_tokens']}-token prompt) is judged against k = {v['noise_k']:g} x the noise floor + one "
             "float32 ulp. The reference and the floor compute the export's own arithmetic (`floor` names it: the "
             "precision, and the approximations the export makes by design, emulated); the floor is PyTorch's "
             "deviation from float64 at that precision (the `torch` row: shown, not judged). `layers`: each decoder "
             "layer and the head on the runtime's own inputs (median over token rows of each row's largest "
             "deviation; prefill and decode rows apart), tolerance from PyTorch on the same inputs. `logit_rows`: the "
             "same median end to end. With int8 activations the arithmetic is discontinuous (a rounding jump moves a "
             "maximum, a perplexity or a greedy token), so those figures are `reported` and the verdict rests on "
             "`layers`, or `logit_rows` for a runtime that cannot show its layers (docs/parity.md). `*_dev_f64` "
             "and `*_tol` are on the sample."
             + ("" if "task_tolerance" not in v else " Task rows (lm-eval): an fp32 runtime of the exact arithmetic "
                "must score every item as torch does (`acc_tol` 0); others may differ in accuracy by `acc_tol` = "
                f"{v['task_tolerance']:g}; `items_differ` lists the doc ids scored differently from torch."), "",
             _table(v["rows"], cols), "", f"- noise floors: {floors}",
             f"- float64 reference: {v['float64_seconds']} s of the validation's {v['seconds']} s", ""]
    for rt, layer_rows in (v.get("layers") or {}).items():
        table = [{"layer": r["layer"], **{f"{p} {what}": r[p][key] for p in ("prefill", "decode") if p in r
                                          for what, key in (("deviation", "deviation"), ("floor", "floor"))},
                  "max deviation": r["max_deviation"]} for r in layer_rows]
        lines += [f"<details><summary>{rt}, layer by layer on its own inputs (median row deviation from float64 "
                  "and PyTorch's floor)</summary>", "", _table(table, list(table[0])), "", "</details>", ""]
    cost = v.get("accuracy_cost") or []
    lines += ["### Accuracy cost: what the export's approximations cost against the PyTorch model", "",
              "`ppl_increase` in the table above: each runtime's perplexity over all evaluation windows relative to "
              "torch's. Each approximation alone, by PyTorch (fp32) emulating only it, on the first dataset:", ""]
    lines += ([_table(cost, ["runtime", "approximation", "ppl_emulated", "ppl_increase", "ppl_runtime"]), ""]
              if cost else ["(no runtime approximates: every export computes the PyTorch model's arithmetic)", ""])
    budget = v.get("max_ppl_increase")
    lines += [f"- budget `validation.max_ppl_increase`: {'not set (reported, not enforced)' if budget is None else budget}",
              "", f"**{'PASS' if v['passed'] else 'FAIL'}**" + ("" if v["passed"] else ":")]
    lines += [f"- {msg}" for msg in v["failures"]]
    return "\n".join(lines + [""])
