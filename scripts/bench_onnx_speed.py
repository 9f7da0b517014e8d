"""Speed on onnxruntime CPU (and PyTorch eager beside it), batch 1: prefill latency for 128 tokens, decode
tokens/s for 128 new tokens, peak memory and file size, for dense, FLAT-LLM 30% and 50%, each also with int4
(GPTQ -> MatMulNBits). Speed depends on shapes, not values, and the reference models are too small for it to
mean anything, so this uses a random-weight model with Llama-2-7B's proportions scaled to this machine
(hidden 2048, 16 heads, MLP 5504, 8 layers, vocab 32000: ~0.54B parameters), compressed by the same pipeline
with calibration on the bundled corpus. Every measurement runs in a fresh process (clean peak RSS).

    python scripts/bench_onnx_speed.py                 # writes docs/bench_speed.{md,json}
    python scripts/bench_onnx_speed.py --small         # a quick smoke run on a tiny model
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, save, table, windows  # noqa: E402

from exporters import ExportContext, export  # noqa: E402
from flatllm_export import accounting  # noqa: E402
from flatllm_export.compress import compress_flatllm  # noqa: E402
from flatllm_export.modeling.loading import flat_config_from_hf  # noqa: E402
from flatllm_export.modeling.modeling_flatllm import FlatLlamaForCausalLM  # noqa: E402
from flatllm_export.quantize import quantize_model  # noqa: E402
from flatllm_export.recipe import QuantizationSection  # noqa: E402

PROMPT, NEW = 128, 128


def build(small: bool) -> FlatLlamaForCausalLM:
    from transformers import LlamaConfig

    dims = dict(hidden_size=256, num_attention_heads=4, intermediate_size=704, num_hidden_layers=2) if small else \
        dict(hidden_size=2048, num_attention_heads=16, intermediate_size=5504, num_hidden_layers=8)
    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    model = FlatLlamaForCausalLM(flat_config_from_hf(cfg)).eval()
    for p in model.parameters():  # random but well-scaled: activations stay finite through every layer
        torch.nn.init.normal_(p, 0.0, 0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


def measure(kind: str, path: str, threads: int) -> dict:
    """Runs in a child process: prefill and decode timings, peak RSS."""
    torch.set_num_threads(threads)
    ids = np.random.default_rng(0).integers(0, 4000, (1, PROMPT))
    if kind == "onnxruntime":
        from flatllm_export.runtime.ort import OrtDecoder

        dec = OrtDecoder(path, threads=threads)
        prefill = lambda: dec.forward(ids)  # noqa: E731

        def decode():
            dec.generate(ids, NEW)
    else:
        from flatllm_export.modeling import load_model
        from flatllm_export.validate import greedy_torch

        model = load_model(path)
        t_ids = torch.from_numpy(ids)

        def prefill():
            with torch.no_grad():
                model(t_ids, use_cache=True)

        def decode():
            greedy_torch(model, t_ids, NEW)
    prefill()  # warm-up
    pre = []
    for _ in range(3):
        t0 = time.perf_counter()
        prefill()
        pre.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    decode()
    total = time.perf_counter() - t0
    decode_s = max(total - statistics.median(pre), 1e-9)
    return {"prefill_ms": 1000 * statistics.median(pre), "decode_tok_s": NEW / decode_s, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bandwidth_gbs() -> float:
    a = np.ones(256 * 2**20 // 8)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t0))
    return best / 1e9


def bytes_per_token(model, int4: bool, group: int) -> float:
    """Weights read once per decoded token: decoder linears (int4: 0.5 B + fp16 scale per group) + lm_head."""
    lin = accounting.decoder_linear_params(model.config)
    per = 0.5 + 2 / group if int4 else 4.0
    return lin * per + model.config.vocab_size * model.config.hidden_size * 4


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.threads)))
        return
    torch.set_num_threads(args.threads)
    calib = windows("ref-llama", "train", seqlen=128, nsamples=16)
    bw = bandwidth_gbs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in (0.0, 0.3, 0.5):
            model = build(args.small)
            if ratio:  # random weights: block influence means nothing, so uniform ranks
                compress_flatllm(model, calib, ratio, "uniform", linear_multiple=32)
            for int4 in (False, True):
                if int4:  # the same compressed model, GPTQ on top
                    quantize_model(model, calib[:8], QuantizationSection(bits=4, group_size=128))
                label = ("dense" if not ratio else f"FLAT-LLM {ratio:.0%}") + (" + int4" if int4 else "")
                out = Path(tmp) / label.replace(" ", "_").replace("%", "").replace("+", "")
                export("onnx", model, None, out / "onnx", ExportContext())
                if not int4:
                    export("hf", model, None, out / "hf", ExportContext())
                bpt = bytes_per_token(model, int4, 128)
                for kind, path in (("onnxruntime", out / "onnx"), ("torch", out / "hf")):
                    if kind == "torch" and int4:
                        continue
                    res = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--measure",
                                          kind, str(path)], capture_output=True, text=True, check=True, cwd=ROOT)
                    m = json.loads(res.stdout.strip().splitlines()[-1])
                    size = sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model")) / 2**20
                    row = {"model": label, "runtime": kind, "params (M)": (accounting.decoder_linear_params(model.config) + 2 * model.config.vocab_size * model.config.hidden_size) / 1e6,
                           **m, "file MB": size, "bound tok/s": bw * 1e9 / bpt}
                    rows.append(row)
                    print(row, flush=True)
                shutil.rmtree(out)
            del model
    dense = {r["runtime"]: r["decode_tok_s"] for r in rows if r["model"] == "dense"}
    for r in rows:
        r["decode vs dense"] = r["decode_tok_s"] / dense[r["runtime"]] if r["runtime"] in dense else None
    shape = "tiny smoke shape" if args.small else "hidden 2048, 16 heads, MLP 5504, 8 layers, vocab 32000"
    md = (f"Batch 1 on this machine's CPU ({args.threads} threads), random-weight Llama ({shape}); prefill = "
          f"{PROMPT} prompt tokens, decode = {NEW} new tokens with the KV cache. 'bound tok/s' = measured memory "
          f"bandwidth ({bw:.1f} GB/s, numpy copy) / bytes of weights read per decoded token.\n\n"
          + table(rows, ["model", "runtime", "params (M)", "prefill_ms", "decode_tok_s", "decode vs dense",
                         "bound tok/s", "peak_rss_mb", "file MB"]))
    save("bench_speed_small" if args.small else "bench_speed", rows, md)


if __name__ == "__main__":
    main()
