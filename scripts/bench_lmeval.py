"""Task accuracy through lm-evaluation-harness on SmolLM2-135M, before and after compression and quantization, and
across runtimes: the local task shakespeare_nextline (flatllm_export/tasks/: 300 next-line questions from the
held-out plays, 4 choices, chance 25%).

Three recipe runs (flatllm_export.api.run), each scoring the task after every stage and on every runtime in its
validation:
- dense-fp32: dense model, ONNX fp32 export -> torch vs onnxruntime;
- flatllm30-fp32: FLAT-LLM 30% (IPRS), ONNX fp32 -> torch vs onnxruntime;
- flatllm30-int4: FLAT-LLM 30% + GPTQ int4 g32, gptq + ONNX int4 (MatMulNBits, accuracy_level 0) exports ->
  torch vs the reloaded GPTQ checkpoint vs onnxruntime.

    nice -n 19 python scripts/bench_lmeval.py [--items 200]     # -> docs/bench_lmeval.{md,json}
A finished run's report in /tmp/flatllm-bench-lmeval/<config> is reused (delete it to measure again).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import DOCS, table

from flatllm_export.api import run
from flatllm_export.recipe import parse_recipe

MODEL = "smollm2-135m"
TASK = "shakespeare_nextline"
OUT = Path("/tmp/flatllm-bench-lmeval")
CONFIGS = {
    "flatllm30-int4": {"compression": {"method": "flatllm", "ratio": 0.3},
                       "quantization": {"method": "gptq", "bits": 4, "group_size": 32},
                       "export": {"targets": ["gptq", "onnx"]}, "runtimes": ["torch", "gptq", "onnxruntime"]},
    "dense-fp32": {"export": {"targets": ["onnx"]}, "runtimes": ["torch", "onnxruntime"]},
    "flatllm30-fp32": {"compression": {"method": "flatllm", "ratio": 0.3}, "export": {"targets": ["onnx"]},
                       "runtimes": ["torch", "onnxruntime"]},
}


def recipe(name: str, items: int) -> dict:
    cfg = dict(CONFIGS[name])
    raw = {"model": {"path": MODEL},
           "calibration": {"dataset": "shakespeare", "nsamples": 16, "seqlen": 256, "seed": 0, "batch_size": 4},
           "evaluation": {"dataset": "shakespeare", "split": "test", "seqlen": 512, "max_windows": 4,
                          "batch_size": 16, "tasks": [{"name": TASK, "limit": items}]},
           "validation": {"runtimes": cfg.pop("runtimes"), "generate_tokens": 16}}
    return raw | cfg


def measure(name: str, items: int) -> dict:
    out = OUT / name
    if (out / "report.json").exists():
        rep = json.loads((out / "report.json").read_text())
        if rep["recipe"]["evaluation"]["tasks"][0]["limit"] == items:
            return rep
    return run(parse_recipe(recipe(name, items), name), out, overwrite=True)


def rows_of(name: str, rep: dict) -> list[dict]:
    rows = []
    for point, tasks in rep["tasks"].items():  # PyTorch in memory after each stage
        m = tasks[TASK]
        rows.append({"config": name, "model": point, "runtime": "torch (in memory)", "acc": m["acc"],
                     "acc_stderr": m["acc_stderr"], "acc_norm": m["acc_norm"], "acc_norm_stderr": m["acc_norm_stderr"],
                     "items": m["items"], "items_differ": "-",
                     "ppl": rep["perplexity"][point]})
    final = list(rep["tasks"])[-1]
    for r in rep["validation"]["rows"]:  # the exported model on each runtime (the validation table's task rows)
        if r["dataset"] == f"task {TASK}" and r["runtime"] != "torch":
            rows.append({"config": name, "model": final, "runtime": r["runtime"] + f" ({r['floor']})",
                         "acc": r["acc"], "acc_stderr": r["acc_stderr"], "acc_norm": r["acc_norm"],
                         "acc_norm_stderr": None, "items": r["items"], "items_differ": r["items_differ"],
                         "ok": r["ok"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args()
    rows, seconds, verdicts = [], {}, {}
    for name in args.configs:
        t0 = time.time()
        rep = measure(name, args.items)
        seconds[name] = rep["total_seconds"]
        verdicts[name] = {"passed": rep["validation"]["passed"], "failures": rep["validation"]["failures"]}
        rows += rows_of(name, rep)
        print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    result = {"model": MODEL, "task": TASK, "items": args.items, "chance": 0.25, "rows": rows,
              "run_seconds": seconds, "validation": verdicts}
    DOCS.joinpath("bench_lmeval.json").write_text(json.dumps(result, indent=1) + "\n")
    fmt = [{**r, "acc": f"{r['acc']:.4f} ± {r['acc_stderr']:.4f}",
            "acc_norm": f"{r['acc_norm']:.4f}" + (f" ± {r['acc_norm_stderr']:.4f}" if r["acc_norm_stderr"] else "")}
           for r in rows]
    md = [f"# lm-eval task accuracy: {MODEL}, local task {TASK}", "",
          f"{args.items} next-line questions from the held-out plays (Hamlet, The Tempest, Much Ado), 4 choices "
          "(chance 0.25), zero-shot, through `lm_eval.simple_evaluate` (HFLM over the in-memory model; the exported "
          "runtimes through flatllm_export.lmeval.runtime_lm). Calibration 16 x 256 train-play tokens; ppl on 4 "
          "test windows of 512. SmolLM2's weights were Q4_1 in the GGUF they come from (dequantized to fp32). "
          "Command: `nice -n 19 python scripts/bench_lmeval.py`.", "",
          table(fmt, ["config", "model", "runtime", "acc", "acc_norm", "items", "items_differ", "ppl"]), "",
          "Validation verdicts (fp32 runtimes: every item as torch; int4 MatMulNBits at accuracy_level 0 "
          "dequantizes to fp32, so it is held to the same rule):", ""]
    md += [f"- {n}: {'PASS' if v['passed'] else 'FAIL: ' + '; '.join(v['failures'])}" for n, v in verdicts.items()]
    md += ["", f"Run seconds (2 shared cores): {seconds}", ""]
    DOCS.joinpath("bench_lmeval.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
