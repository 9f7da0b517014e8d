"""GPTQ on the real model (SmolLM2-135M): perplexity and decoder size of dense, FLAT-LLM (30% by default),
GPTQ 4-/3-bit alone, and FLAT-LLM + GPTQ 4-/3-bit; quantization wall time and peak memory. Interrupted runs
resume (out/bench_cache).

    python scripts/bench_gptq.py           # writes docs/bench_gptq.{md,json}
"""

from __future__ import annotations

import argparse

import torch
from common import REAL, Resume, load_model, ppl, save, table, timed, windows

from flatllm_export import accounting
from flatllm_export.compress import compress_flatllm
from flatllm_export.quantize import quantize_model
from flatllm_export.recipe import QuantizationSection


def decoder_mb(model, bits: int | None, group: int) -> float:
    """Decoder linear weights as stored: fp16, or packed ints plus one fp16 scale per group and output."""
    n = accounting.decoder_linear_params(model.config)
    return (2 * n if bits is None else n * bits / 8 + 2 * n / group) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=REAL)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--max-windows", type=int, default=24)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--ratios", default="0.3", help="FLAT-LLM ratios before GPTQ (e.g. 0.15,0.3)")
    args = ap.parse_args()
    name, g = args.model, args.group_size
    done = Resume("bench_gptq", f"{name}-{args.seqlen}-{args.nsamples}-{args.max_windows}-{g}")
    test = windows(name, seqlen=args.seqlen)[: args.max_windows]
    calib = windows(name, "train", seqlen=args.seqlen, nsamples=args.nsamples)

    def measure(ratio: float, bits: int | None, dtype: str = "float32") -> dict:
        model = load_model(name, dtype=dtype)
        if ratio:  # ranks aligned to the group size, as a recipe with a quantization section does
            compress_flatllm(model, calib, ratio, "iprs", linear_multiple=32 if bits is None else max(32, g))
        row = {"decoder MB": decoder_mb(model, bits, g)}
        if bits is not None:
            _, secs, peak = timed(lambda: quantize_model(model, calib, QuantizationSection(bits=bits, group_size=g)))
            row.update({"quantize s": secs, "peak MiB": peak})
        return {"ppl": ppl(model, test, 4), **row}

    rows = []
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [("dense fp32 (fp16 size)", 0, None, "float32")]
    variants += [(f"FLAT-LLM {round(r * 100)}%", r, None, "float32") for r in ratios]
    variants += [((f"FLAT-LLM {round(r * 100)}% + " if r else "") + f"GPTQ {b}-bit g{g}", r, b, "float32")
                 for r in [0.0] + ratios for b in (4, 3)]
    for label, ratio, bits, dtype in variants:
        r = done.get(label, lambda: measure(ratio, bits, dtype))
        rows.append({"variant": label, **r})
        print(rows[-1], flush=True)
    md = (f"{name} (dequantized from its Q4_1 GGUF): perplexity on the first {len(test)} windows of {args.seqlen} "
          f"tokens of the test plays; calibration {args.nsamples} x {args.seqlen} tokens of the train plays for "
          f"FLAT-LLM (IPRS) and GPTQ (symmetric, group {g}, damp 1%, true-sequential). 'decoder MB' counts the "
          "decoder's linear weights as a GPTQ checkpoint stores them (fp16 unquantized; packed ints + fp16 "
          "scales); the embedding (28.3M parameters, tied) is the same for every row.\n\n"
          + table(rows, ["variant", "ppl", "decoder MB", "quantize s", "peak MiB"]))
    save("bench_gptq", rows, md)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
