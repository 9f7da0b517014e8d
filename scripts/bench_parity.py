"""Parity against float64 on SmolLM2-135M: compress (or not), GPTQ int4 g32, export gptq + onnx, validate.

For every configuration: each runtime's deviation from the float64 reference next to PyTorch fp32's own (the noise
floor), their ratio (what k must cover), the exporters' self-check figures, the verdict at the recipe's k, and the
float64 reference's share of the validation time.

    python scripts/bench_parity.py                       # every configuration -> docs/bench_parity.{md,json}
    python scripts/bench_parity.py dense-int4-al4          # after dense-int4: its checkpoint at accuracy_level 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DOCS, table

from flatllm_export.api import run
from flatllm_export.modeling.loading import SHORT_NAMES
from flatllm_export.recipe import parse_recipe

MODEL = "smollm2-135m" if "smollm2-135m" in SHORT_NAMES else str(Path.home() / ".cache/flatllm-export/smollm2-135m")
CONFIGS = {
    "dense-int4": None,
    "flatllm30-int4": {"method": "flatllm", "ratio": 0.3},
    "flatllm50-int4": {"method": "flatllm", "ratio": 0.5},
    "flap30-int4": {"method": "flap", "ratio": 0.3},
    "svdllm30-int4": {"method": "svd-llm", "ratio": 0.3},
}
AL4 = "dense-int4-al4"  # dense-int4's checkpoint exported again with MatMulNBits accuracy_level 4 (int8 activations)
OUT = Path("/tmp/flatllm-bench-parity")


def recipe(name: str, k: float | None) -> dict:
    raw = {"model": {"path": MODEL},
           "calibration": {"dataset": "shakespeare", "nsamples": 16, "seqlen": 256, "seed": 0},
           "evaluation": {"dataset": "shakespeare", "split": "test", "seqlen": 512, "max_windows": 8},
           "quantization": {"method": "gptq", "bits": 4, "group_size": 32},
           "export": {"targets": ["gptq", "onnx"]},
           "validation": {"runtimes": ["torch", "onnxruntime"], "generate_tokens": 64}}
    if CONFIGS[name]:
        raw["compression"] = CONFIGS[name]
    if k is not None:
        raw["validation"]["noise_k"] = k
    return raw


def accuracy_level_4(k: float | None) -> dict:
    """dense-int4's GPTQ checkpoint, exported to ONNX at accuracy_level 4 and validated (no GPTQ rerun)."""
    from exporters import ExportContext, export
    from flatllm_export.api import evaluation_windows, validate_outputs
    from flatllm_export.modeling import load_model, load_tokenizer
    from flatllm_export.parity import DEFAULT_K

    src, out = OUT / "dense-int4", OUT / AL4
    rec = parse_recipe(recipe("dense-int4", k), AL4)
    model, tok = load_model(str(src / "gptq")), load_tokenizer(str(src / "gptq"))
    ctx = ExportContext(sample=evaluation_windows(rec, tok)[:2, :64], noise_k=k or DEFAULT_K,
                        extra={"accuracy_level": 4})
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    exp = export("onnx", model, tok, out / "onnx", ctx)
    exp["seconds"] = round(time.time() - t0, 1)
    val = validate_outputs(out, rec, tok, model, "reloaded dense-int4 gptq/")
    rep = {"exports": {"onnx": exp}, "validation": val, "perplexity": {}}
    (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
    return rep


def rows_of(name: str, rep: dict) -> list[dict]:
    v = rep["validation"]
    rows = []
    for rt, verdicts in v["verdicts"].items():
        row = {"config": name, "runtime": rt, "k": v["noise_k"], "ok": all(x["ok"] for x in verdicts),
               "ppl": next(r["ppl"] for r in v["rows"] if r["runtime"] == rt)}
        for x in verdicts:
            f = x["figure"]
            row[f"{f}_dev"], row[f"{f}_floor"], row[f"{f}_kind"] = x["deviation"], x["floor"], x["floor_kind"]
            row[f"{f}_ratio"] = x["deviation"] / x["floor"] if x["floor"] else None
        row["greedy"] = next(r["greedy"] for r in v["rows"] if r["runtime"] == rt)
        rows.append(row)
    for target, e in rep["exports"].items():
        rows.append({"config": name, "runtime": f"self-check {target}", "logits_dev": e["max_abs_logit_diff"],
                     "logits_floor": e["noise_floor"], "logits_kind": e["floor_kind"],
                     "logits_ratio": e["max_abs_logit_diff"] / e["noise_floor"], "ok": True})
    rows.append({"config": name, "runtime": "(timing)", "validation_s": v["seconds"],
                 "float64_s": v["float64_seconds"],
                 "float64_overhead": v["float64_seconds"] / max(v["seconds"] - v["float64_seconds"], 1e-9),
                 "achieved_ratio": rep.get("compression", {}).get("achieved_ratio"),
                 "ppl": rep["perplexity"].get("quantized"), "ok": v["passed"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=[*CONFIGS, AL4])
    ap.add_argument("--k", type=float, default=None, help="validation.noise_k (default: the package's)")
    ap.add_argument("--collect", action="store_true", help="only rebuild the tables from the runs' report.json")
    args = ap.parse_args()
    path = DOCS / "bench_parity.json"
    if args.collect:
        runs = {n: json.loads((OUT / n / "report.json").read_text()) for n in [*CONFIGS, AL4]
                if (OUT / n / "report.json").exists()}
        old = json.loads(path.read_text()) if path.exists() else {}
        results = {n: {"rows": rows_of(n, rep), "seconds": old.get(n, {}).get("seconds"),
                       "failures": rep["validation"]["failures"]} for n, rep in runs.items()}
        for n in results:  # `flatllm-export validate DIR` reruns (current code, the folder's recipe.yaml)
            for f in sorted((OUT / n).glob("validation*.json")):
                v = json.loads(f.read_text())
                f64, total = v["float64_seconds"], v["seconds"]
                results[n]["rows"].append({"config": f"{n} ({f.stem}, {v['sample']['windows']} sample window(s))",
                                           "runtime": "(timing)", "validation_s": total, "float64_s": f64,
                                           "float64_overhead": f64 / (total - f64), "ok": v["passed"]})
        path.write_text(json.dumps(results, indent=1) + "\n")
        return write_md(results)
    for name in args.configs:
        t0 = time.time()
        rep = accuracy_level_4(args.k) if name == AL4 else run(parse_recipe(recipe(name, args.k), name), OUT / name,
                                                                overwrite=True)
        results = json.loads(path.read_text()) if path.exists() else {}  # re-read: configurations may run in parallel
        results[name] = {"rows": rows_of(name, rep), "seconds": round(time.time() - t0, 1),
                         "failures": rep["validation"]["failures"]}
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(name, "done", results[name]["seconds"], "s", rep["validation"]["failures"], flush=True)
    write_md(json.loads(path.read_text()))


def write_md(results: dict) -> None:
    rows = [r for v in results.values() for r in v["rows"]]
    cols = ["config", "runtime", "ppl", "logits_dev", "logits_floor", "logits_ratio", "logits_kind", "ppl_dev",
            "ppl_floor", "ppl_ratio", "greedy_dev", "greedy", "k", "ok"]
    timing = ["config", "achieved_ratio", "ppl", "validation_s", "float64_s", "float64_overhead", "ok"]
    md = [f"# Parity against float64: {MODEL.rsplit('/', 1)[-1]}, GPTQ int4 g32, calibration 16 x 256, "
          "8 test windows of 512, 64 greedy tokens; one thread each, on a shared 2-core machine", "",
          "Ratios are deviation / floor: what k must cover. These runs compared 2 sample windows (the default "
          "then; now 1). `k` is the recipe's at the time: flatllm50-int4 ran at 1e6 by mistake (its largest "
          "ratio, 2.98, passes k = 8); dense-int4-al4 ran at 1e6 on purpose to measure int8 activations, "
          "with the int8 factor then 200 (the int8 ratios below are against 200 x the fp32 floor).", "",
          table([r for r in rows if r["runtime"] != "(timing)"], cols), "", "## Time", "",
          table([r for r in rows if r["runtime"] == "(timing)"], timing)]
    (DOCS / "bench_parity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
