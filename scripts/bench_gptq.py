"""GPTQ on the reference models: held-out perplexity and size on disk of dense fp32/fp16, FLAT-LLM 30%,
GPTQ 4-/3-bit alone, and FLAT-LLM 30% + GPTQ 4-/3-bit; quantization wall time and peak memory.

    python scripts/bench_gptq.py           # writes docs/bench_gptq.{md,json}
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from common import load_model, ppl, save, table, timed, windows

from exporters import ExportContext, export
from flatllm_export.compress import compress_flatllm
from flatllm_export.recipe import QuantizationSection
from flatllm_export.quantize import quantize_model


def disk_mb(model, target: str, dtype: str = "float32") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        export(target, model, None, Path(tmp) / target, ExportContext(dtype=dtype))
        return sum(f.stat().st_size for f in (Path(tmp) / target).glob("*.safetensors")) / 2**20


def main() -> None:
    rows = []
    for name in ("ref-llama", "ref-gqa"):
        test, calib = windows(name)[:128], windows(name, "train", nsamples=128)

        def row(label, model, target="hf", dtype="float32", **extra):
            r = {"model": name, "variant": label, "ppl": ppl(model, test), "MB on disk": disk_mb(model, target, dtype),
                 **extra}
            rows.append(r)
            print(r, flush=True)

        row("dense fp32", load_model(name))
        row("dense fp16", load_model(name, dtype="float16"), dtype="float16")
        flat = load_model(name)
        compress_flatllm(flat, calib, 0.3, "iprs", linear_multiple=32)
        row("FLAT-LLM 30%", flat)
        for compressed in (False, True):
            for bits in (4, 3):
                model = load_model(name)
                if compressed:
                    compress_flatllm(model, calib, 0.3, "iprs", linear_multiple=32)
                rep, secs, peak = timed(lambda: quantize_model(model, calib, QuantizationSection(bits=bits, group_size=128)))
                label = ("FLAT-LLM 30% + " if compressed else "") + f"GPTQ {bits}-bit g128"
                row(label, model, "gptq", "float16", **{"quantize s": secs, "peak MiB": peak})
    md = ("Held-out ppl on the first 128 windows of 256 tokens of the test plays. GPTQ (symmetric, group 128, damp 1%, true-sequential, 128 x 256 calibration tokens) on the reference "
          "models; size is the safetensors on disk (gptq target for quantized rows: packed int32 + fp16 scales, the "
          "rest fp16). The embedding and lm_head (2.1M of ~6.5M parameters) stay fp16 and dominate the small "
          "models' size.\n\n" + table(rows, ["model", "variant", "ppl", "MB on disk", "quantize s", "peak MiB"]))
    save("bench_gptq", rows, md)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
