"""The ONNX graph on a real model, before and after the lean graph: node count, file MB, decode tok/s and ppl.

    .venv/bin/python scripts/bench_onnx_graph.py [MODEL_DIR] [--before]

MODEL_DIR defaults to the converted SmolLM2-135M folder. Variants: dense int4 g32 and FLAT-LLM 30% + int4 g32
(calibration 16 x 256 train-play tokens); the int4 integers come from GPTQ, or with ``--rtn`` from round-to-nearest
(same graph, same sizes and speed, cheaper to make: GPTQ of SmolLM2 takes ~20 min on a shared 2-core machine); each exported with float or int4 embedding/lm_head and
accuracy_level 0 or 4. ``--before`` also exports with the main branch's exporter (``/work/main``, run in a
subprocess on the gptq checkpoint) for the before column. Decode: batch 1, 2 threads, 128-token prompt, then 128
greedy tokens with the cache; ppl on 8 test windows of 512 tokens. Writes docs/bench_onnx_graph.{md,json}.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters import ExportContext, export  # noqa: E402
from flatllm_export import data  # noqa: E402
from flatllm_export.compress import compress_flatllm  # noqa: E402
from flatllm_export.evaluate import perplexity  # noqa: E402
from flatllm_export.modeling import load_model, load_tokenizer  # noqa: E402
from flatllm_export.quantize import (SEQUENTIAL_GROUPS, QuantLinear, checkpoint_format, linear_names,  # noqa: E402
                                     quantization_config, quantize_model, set_submodule)
from flatllm_export.quantize.gptq import quantize_rtn  # noqa: E402
from flatllm_export.recipe import QuantizationSection  # noqa: E402
from flatllm_export.runtime.ort import OrtDecoder  # noqa: E402

OLD_EXPORT = """
import sys; sys.path.insert(0, '/work/main')
from pathlib import Path
from exporters import ExportContext, export
from flatllm_export.modeling import load_model
export('onnx', load_model(sys.argv[1]), None, Path(sys.argv[2]), ExportContext(extra={'accuracy_level': 0}))
"""


def graph_stats(folder: Path) -> dict:
    g = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    mb = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 1e6
    return {"nodes": len(g.node), "constant": ops["Constant"], "unsqueeze": ops["Unsqueeze"], "concat": ops["Concat"],
            "file_mb": round(mb, 1)}


def decode_speed(folder: Path, prompt: np.ndarray, new: int = 128) -> float:
    dec = OrtDecoder(folder, threads=2)
    dec.forward(prompt[:, :8])  # warm-up
    logits, past = dec.forward(prompt)
    t = time.perf_counter()
    for _ in range(new):
        nxt = logits[:, -1].argmax(-1)[:, None]
        logits, past = dec.forward(nxt, past)
    return new / (time.perf_counter() - t)


def measure(folder: Path, prompt, windows) -> dict:
    row = graph_stats(folder)
    row["decode_tok_s"] = round(decode_speed(folder, prompt), 1)
    row["ppl"] = round(perplexity(OrtDecoder(folder, threads=2).logits_fn(), windows, 4, desc="ppl")["ppl"], 3)
    return row


def rtn_int4(model) -> None:
    """Every decoder linear as a symmetric int4 g32 QuantLinear by round-to-nearest."""
    section = QuantizationSection(bits=4, group_size=32)
    for layer in model.model.layers:
        for group in SEQUENTIAL_GROUPS:
            for name in (n for g in group for n in linear_names(layer, g)):
                m = layer.get_submodule(name)
                q = quantize_rtn(m.weight, 4, 32)
                set_submodule(layer, name, QuantLinear.from_quantized(q, m.bias, checkpoint_format(True)))
    model.config.quantization_config = quantization_config(section)


def main(model_dir: str, before: bool, rtn: bool) -> None:
    out = Path("/tmp/bench_onnx_graph")
    out.mkdir(exist_ok=True)
    tok = load_tokenizer(model_dir)
    calib = data.calibration_windows(data.tokenize(tok, data.shakespeare_text("train")[:2_000_000]), 16, 256, 0)
    test = data.tokenize(tok, data.shakespeare_text("test"))
    windows = data.evaluation_windows(test, 512, 8)
    prompt = test[None, :128].numpy()
    rows = []
    for variant in ("dense", "flatllm30"):
        model = load_model(model_dir)
        if variant == "flatllm30":
            compress_flatllm(model, calib, 0.3, "iprs", linear_multiple=32)
        if rtn:
            rtn_int4(model)
        else:
            quantize_model(model, calib, QuantizationSection(bits=4, group_size=32))
        if before:
            export("gptq", model, None, out / f"{variant}-gptq", ExportContext())
            subprocess.run([sys.executable, "-c", OLD_EXPORT, str(out / f"{variant}-gptq"), str(out / f"{variant}-old")],
                           check=True)
            rows.append({"variant": variant, "quantizer": "rtn" if rtn else "gptq", "graph": "before (main)", "head": "float", "accuracy_level": 0,
                         **measure(out / f"{variant}-old", prompt, windows)})
            print(rows[-1], flush=True)
        for head, level in (("float", 0), ("int4", 0), ("int4", 4)):
            folder = out / f"{variant}-{head}-{level}"
            export("onnx", model, None, folder, ExportContext(extra={"embedding": head, "lm_head": head,
                                                                     "accuracy_level": level}))
            rows.append({"variant": variant, "quantizer": "rtn" if rtn else "gptq", "graph": "lean", "head": head, "accuracy_level": level,
                         **measure(folder, prompt, windows)})
            print(rows[-1], flush=True)
        del model
    docs = ROOT / "docs"
    (docs / "bench_onnx_graph.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(rows[0])
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (docs / "bench_onnx_graph.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.set_num_threads(2)
    main(args[0] if args else "/root/.cache/flatllm-export/smollm2-135m", "--before" in sys.argv, "--rtn" in sys.argv)
