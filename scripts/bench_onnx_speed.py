"""Speed, size and quality of deployable exports side by side, from one run, on a real model (SmolLM2-135M):

- onnxruntime-genai's own model builder on the dense model (fp32 and int4), run by onnxruntime-genai: the
  reference point every ratio is taken against (its int4 build);
- this project's exports: dense fp32, dense GPTQ int4, FLAT-LLM 10/20/30/50% + GPTQ int4, FLAP 30% + GPTQ int4,
  each run by our onnxruntime wrapper and by onnxruntime-genai where it can hold the export.

Columns: prefill ms (128-token prompt), decode tokens/s after it (128 greedy tokens) and at a 1,024-token
context, file MB, peak RSS, perplexity on the same test windows. Batch 1, 2 threads, each measurement in a fresh
process (bench_speed_measure.py). A second table keeps the scaled random-weight 0.54B Llama (hidden 2048,
vocab 32000), where the lm_head is a smaller share of the weights (onnxruntime vs PyTorch eager).

Stages (each cached under ~/.cache/flatllm-export/bench-speed, so a later run redoes only what is missing):

    python scripts/bench_onnx_speed.py                      # build + measure + report (tens of minutes)
    python scripts/bench_onnx_speed.py --quick              # 4 rows, short decode: a smoke run of minutes
    python scripts/bench_onnx_speed.py --stage build        # compress / quantize / export / genai builder only
    python scripts/bench_onnx_speed.py --stage report       # tables and plot from cached measurements
    python scripts/bench_onnx_speed.py --remeasure          # measure again even where cached
    python scripts/bench_onnx_speed.py --scaled             # also the scaled random-weight table

Compressed models are cached as GPTQ checkpoints; ONNX exports are cached per version of the exporter's code,
so merging a new graph re-exports without compressing again. Writes docs/bench_speed.{md,json} and
docs/bench_frontier.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, ROOT, ppl, save, table  # noqa: E402

from exporters import ExportContext, export  # noqa: E402
from flatllm_export import accounting, data  # noqa: E402
from flatllm_export.compress import compress  # noqa: E402
from flatllm_export.modeling import load_model, load_tokenizer  # noqa: E402
from flatllm_export.modeling.loading import resolve_model_path  # noqa: E402
from flatllm_export.recipe import CompressionSection, QuantizationSection  # noqa: E402
from flatllm_export.runtime.genai import genai_blocker, load_meta  # noqa: E402

CACHE = Path.home() / ".cache" / "flatllm-export" / "bench-speed"
BUILDER_VENV = Path.home() / ".cache" / "flatllm-export" / "genai-builder-venv"
# onnxruntime-genai 0.18's builder imports torch, onnx_ir and transformers 5.x (AutoConfig / AutoTokenizer) at the
# top of builder.py, and onnx in some of its passes; torch pinned to the CPU build this machine has on disk
BUILDER_PACKAGES = ["torch==2.13.0", "transformers>=5", "onnxruntime-genai==0.18.*", "onnx", "onnx_ir"]
MODEL = "smollm2-135m"
MEASURE = Path(__file__).resolve().parent / "bench_speed_measure.py"
GROUP = 32
REFERENCE = "genai builder int4"  # every ratio is taken against this row (run by onnxruntime-genai)


@dataclass(frozen=True)
class Variant:
    label: str
    method: str | None = None  # flatllm | flap | None (dense)
    ratio: float = 0.0
    int4: bool = True
    head: str = "gptq"  # int4 rows: embedding + lm_head GPTQ int4 (tied: one table), or rtn (int4 RTN at export)
    level: int | None = None  # MatMulNBits accuracy_level; None: --accuracy-level
    genai: bool = True  # also run by onnxruntime-genai (the comparison rows are ours only)

    @property
    def model_slug(self) -> str:
        parts = (self.method or "dense", f"{self.ratio:.0%}".rstrip("%") if self.method else "",
                 "int4" if self.int4 else "fp32", "gptqhead" if self.int4 and self.head == "gptq" else "")
        return "-".join(p for p in parts if p)

    def slug(self, level: int) -> str:
        return self.model_slug + (f"-a{level}" if self.int4 else "")


VARIANTS = [Variant("dense fp32", int4=False), Variant("dense GPTQ int4"),
            Variant("dense GPTQ int4, accuracy_level 0", level=0, genai=False),
            Variant("dense GPTQ int4, RTN head", head="rtn", genai=False),
            *[Variant(f"FLAT-LLM {r:.0%} + int4", "flatllm", r) for r in (0.1, 0.2, 0.3, 0.5)],
            Variant("FLAT-LLM 30% + int4, accuracy_level 0", "flatllm", 0.3, level=0, genai=False),
            Variant("FLAP 30% + int4", "flap", 0.3)]
QUICK = {"dense fp32", "dense GPTQ int4", "FLAT-LLM 30% + int4", "genai builder int4"}


def graph_key() -> str:
    """Version of the exporter's graph code: exports are cached per version."""
    files = sorted((ROOT / "exporters").glob("onnx*.py")) + [ROOT / "exporters/genai.py",
                                                            ROOT / "flatllm_export/quantize/matmulnbits.py"]
    return hashlib.sha1(b"".join(f.read_bytes() for f in files if f.exists())).hexdigest()[:10]


def file_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) / 2**20


# ---- inputs -------------------------------------------------------------------------------------------------

def make_inputs(args, tok) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The prompt, long prompt and perplexity windows every row uses (test plays), and calibration windows."""
    test = data.tokenize(tok, data.shakespeare_text("test"))
    windows = data.evaluation_windows(test, args.seqlen, args.windows)
    start = args.windows * args.seqlen  # prompts come after the perplexity windows
    path = CACHE / f"inputs-{args.windows}x{args.seqlen}.npz"
    np.savez(path, prompt=test[None, start:start + args.prompt].numpy(),
             long=test[None, start:start + args.context].numpy(), windows=windows.numpy())
    calib = data.calibration_windows(data.tokenize(tok, data.shakespeare_text("train")), args.nsamples,
                                     args.calib_seqlen, 0)
    return path, windows, calib


# ---- build --------------------------------------------------------------------------------------------------

def build_variant(v: Variant, args, tok, calib, windows) -> dict:
    """Compress + quantize once (cached as a GPTQ checkpoint), export ONNX once per graph version."""
    src = Path(resolve_model_path(MODEL))
    folder = CACHE / "models" / f"{v.model_slug}-c{args.nsamples}x{args.calib_seqlen}"
    info_path = folder / "info.json"
    if not info_path.exists():
        t0 = time.time()
        if (folder / "model" / "config.json").exists():  # checkpoint written, info not (interrupted run)
            model = load_model(str(folder / "model"))
        else:
            model = load_model(str(src))
            if v.method:
                compress(model, calib, CompressionSection(method=v.method, ratio=v.ratio), "cpu", 8,
                         math.lcm(32, GROUP))
            if v.int4:
                from flatllm_export.quantize import quantize_model

                quantize_model(model, calib, QuantizationSection(bits=4, group_size=GROUP),
                               lm_head_bits=4 if v.head == "gptq" else None)
                export("gptq", model, tok, folder / "model", ExportContext())
        params = accounting.decoder_linear_params(model.config)
        dense = accounting.decoder_linear_params(load_model(str(src)).config) if v.method else params
        info = {"label": v.label, "achieved_ratio": round(1 - params / dense, 4), "decoder_linear_params": params,
                "build_s": round(time.time() - t0, 1)}
        folder.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        print(f"built {v.label}: {info}", flush=True)
    info = json.loads(info_path.read_text())
    key = f"torch_ppl_{args.windows}x{args.seqlen}"  # PyTorch's perplexity of the model on the benchmark windows
    if key not in info:
        info[key] = ppl(load_model(str(folder / "model" if v.int4 else src)), windows, 4)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    # int4 rows as deployed: embedding and lm_head int4 too (as genai's builder); GPTQ's lm_head is written as it
    # is (the tied embedding reads its table), an RTN head is rounded at export
    level = args.accuracy_level if v.level is None else v.level
    extra = {"accuracy_level": level, "embedding": "int4", "lm_head": "int4"} if v.int4 else {}
    base = CACHE / "exports" / graph_key()
    dirs = {"onnx": base / v.slug(level), "genai": base / f"{v.slug(level)}-genai"}
    for target, out in dirs.items():
        if target == "genai" and not v.genai:
            continue
        if target == "genai" and not genai_blocker(load_meta(dirs["onnx"])):
            dirs["genai"] = dirs["onnx"]  # onnxruntime-genai runs the onnx target as it is
        elif not (out / "flatllm_onnx.json").exists():
            shutil.rmtree(out, ignore_errors=True)
            export(target, load_model(str(folder / "model" if v.int4 else src)), tok, out, ExportContext(extra=extra))
    return {**info, "torch_ppl": info[key], "onnx": str(dirs["onnx"]), "genai": str(dirs["genai"])}


def builder_python() -> Path:
    """onnxruntime-genai's builder needs transformers 5.x: its own venv, made once."""
    py = BUILDER_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BUILDER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", BUILDER_PACKAGES[0]], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *BUILDER_PACKAGES[1:]], check=True)
    return py


def build_genai(precision: str) -> Path:
    out = CACHE / "genai-builds" / f"{MODEL}-{precision}"
    if not (out / "genai_config.json").exists():
        cmd = [str(builder_python()), "-m", "onnxruntime_genai.models.builder", "-i", resolve_model_path(MODEL),
               "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(CACHE / "genai-builds" / "hf-cache")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"onnxruntime-genai's builder failed ({' '.join(cmd)}):\n{res.stderr[-2000:]}")
    return out


def builds(args, tok, calib, windows) -> list[dict]:
    """Every row to measure: (label, runtime, folder, info)."""
    rows = []
    for precision in ("fp32", "int4"):
        label = f"genai builder {precision}"
        if (not args.quick or label in QUICK) and (not args.only or f"genai-{precision}" in args.only):
            rows.append({"export": label, "runtime": "onnxruntime-genai", "path": str(build_genai(precision))})
    for v in VARIANTS:
        level = args.accuracy_level if v.level is None else v.level
        if (args.quick and v.label not in QUICK) or (args.only and v.slug(level) not in args.only):
            continue
        info = build_variant(v, args, tok, calib, windows)
        for rt, target in (("onnxruntime", "onnx"), ("onnxruntime-genai", "genai"))[: 2 if v.genai else 1]:
            row = {"export": v.label, "runtime": rt, "path": info[target], "ppl PyTorch": info["torch_ppl"],
                   "achieved ratio": info["achieved_ratio"]}
            if rt == "onnxruntime-genai":  # the same graph as the row before (value cache padded for FLAT-LLM)
                row.update(skip_ppl=True, note="ppl: same graph as our runtime's row" + (
                    "" if info["genai"] == info["onnx"] else ", genai target (value cache padded)"))
            rows.append(row)
    return rows


# ---- measure ------------------------------------------------------------------------------------------------

def measure(row: dict, inputs: Path, args, ppl: bool = True) -> dict:
    cmd = [sys.executable, str(MEASURE), row["runtime"], row["path"], "--inputs", str(inputs), "--threads",
           str(args.threads), "--new", str(args.new), "--new-long", str(args.new_long)]
    cmd += ["--no-ppl"] if row.get("skip_ppl") or not ppl else []
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        return {"note": "failed: " + res.stderr.strip().splitlines()[-1][:200]}
    return json.loads(res.stdout.strip().splitlines()[-1])


TIMED = ("prefill_ms", "decode_tok_s", "decode_long_tok_s", "peak_rss_mb")


def measure_all(rows: list[dict], inputs: Path, args, cached_only: bool = False) -> list[dict]:
    """Every row ``--rounds`` times, round-robin (row 1..n, then again), so a change of load on the shared
    machine hits every row alike; the timed figures are the medians over rounds, perplexity is from round 1."""
    cache_path = CACHE / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    keys = [f"{row['path']}|{row['runtime']}|{inputs.name}|{args.new}|{args.new_long}|{args.threads}" for row in rows]
    todo = [] if cached_only else [k for k in keys if k not in cache or args.remeasure]
    for k in todo:
        cache[k] = {"rounds": []}
    for rnd in range(args.rounds):
        for row, key in zip(rows, keys):
            if key not in todo or "cannot run" in row.get("note", ""):
                continue
            got = measure(row, inputs, args, ppl=rnd == 0)
            cache[key]["rounds"].append(got)
            cache[key]["measured"] = time.strftime("%Y-%m-%d %H:%M")
            cache_path.write_text(json.dumps(cache, indent=1) + "\n")
            print(f"round {rnd + 1}/{args.rounds}", row["export"], row["runtime"],
                  {k: v for k, v in got.items() if k != "tokens"}, flush=True)
    for row, key in zip(rows, keys):
        if key not in cache:
            continue
        rounds = cache[key].get("rounds") or [cache[key]]  # older cache entries: one measurement
        row.update(rounds[0])
        for f in TIMED:
            vals = [r[f] for r in rounds if f in r]
            if vals:
                row[f] = float(np.median(vals))
        row["rounds"] = len(rounds)
        row["file MB"] = file_mb(Path(row["path"]))
    for ours, genai in zip(rows, rows[1:]):  # same export, both runtimes: do they pick the same greedy tokens?
        if ours["export"] == genai["export"] and "tokens" in ours and "tokens" in genai:
            same = int(np.cumprod(np.array(ours["tokens"]) == np.array(genai["tokens"])).sum())
            genai["note"] = f"{genai['note']}; greedy tokens equal to ours: {same}/{len(ours['tokens'])}"
    return rows


# ---- report -------------------------------------------------------------------------------------------------

def add_ratios(rows: list[dict]) -> None:
    ref = next((r for r in rows if r["export"] == REFERENCE and "decode_tok_s" in r), None)
    torch_dense = next((r["ppl PyTorch"] for r in rows if r["export"] == "dense fp32"), None)
    for r in rows:
        if r["export"] == "genai builder fp32":  # the same dense model, built by genai's builder
            r["ppl PyTorch"] = torch_dense
        if ref and "decode_tok_s" in r:
            r["decode vs genai int4"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["MB vs genai int4"] = r["file MB"] / ref["file MB"]
            if "decode_long_tok_s" in r and "decode_long_tok_s" in ref:
                r["1k decode vs genai int4"] = r["decode_long_tok_s"] / ref["decode_long_tok_s"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, x, xlabel in ((axes[0], "decode_tok_s", "decode tokens/s (128-token prompt, batch 1, 2 threads)"),
                          (axes[1], "file MB", "file MB")):
        for rt, marker in (("onnxruntime", "o"), ("onnxruntime-genai", "s")):
            pts = [r for r in rows if r["runtime"] == rt and "ppl" in r and x in r]
            ax.scatter([r[x] for r in pts], [r["ppl"] for r in pts], marker=marker,
                       label="our runtime" if rt == "onnxruntime" else "onnxruntime-genai")
            for r in pts:
                ax.annotate(r["export"], (r[x], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity (test plays)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title("quality vs decode speed (up and left is worse)")
    axes[1].set_title("quality vs size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


COLS = ["export", "runtime", "achieved ratio", "prefill_ms", "decode_tok_s", "decode_long_tok_s", "decode vs genai int4",
        "1k decode vs genai int4", "file MB", "MB vs genai int4", "peak_rss_mb", "ppl", "ppl PyTorch", "note"]


def report(rows: list[dict], args, scaled_md: str) -> None:
    add_ratios(rows)
    md = (f"SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152, tied embedding; "
          f"weights dequantized from the Q4_1 GGUF, so every variant starts from the same dequantized model). "
          f"Batch 1, {args.threads} threads, each measurement in a fresh process; every row measured "
          f"{args.rounds} times round-robin (all rows, then all again), the timed columns are medians over the "
          f"rounds. prefill = {args.prompt}-token prompt (median of 3); decode_tok_s = 1 / median step time over {args.new} greedy tokens after it; "
          f"decode_long_tok_s = the same over {args.new_long} tokens after a {args.context}-token prompt. ppl: "
          f"{args.windows} windows of {args.seqlen} tokens of the test plays, computed by the row's runtime; "
          f"'ppl PyTorch' is the in-memory model on the same windows. Our int4 = GPTQ (sym, group {GROUP}, "
          f"calibration {args.nsamples} x {args.calib_seqlen} train-play tokens) as MatMulNBits, accuracy_level "
          f"{args.accuracy_level} unless the row says otherwise; the lm_head GPTQ int4 too and the tied embedding "
          f"read from its table (GatherBlockQuantized), except the 'RTN head' row (int4 round-to-nearest at "
          f"export, block 32); genai builder int4 = its RTN MatMulNBits (block 32, accuracy_level 4). "
          f"Ratios are against '{REFERENCE}' run by onnxruntime-genai. Exporter graph version "
          f"{graph_key()}.\n\n" + table(rows, COLS))
    DOCS.mkdir(exist_ok=True)
    plot(rows, DOCS / "bench_frontier.png")
    md += "\n\n![frontier](bench_frontier.png)\n"
    if scaled_md:
        md += "\n" + scaled_md
    save("bench_speed", [{k: v for k, v in r.items() if k != "path"} for r in rows], md)


# ---- the scaled random-weight model (second table) ----------------------------------------------------------

def scaled_model():
    from transformers import LlamaConfig

    from flatllm_export.modeling.loading import flat_config_from_hf
    from flatllm_export.modeling.modeling_flatllm import FlatLlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                      hidden_size=2048, num_attention_heads=16, intermediate_size=5504, num_hidden_layers=8)
    torch.manual_seed(0)
    model = FlatLlamaForCausalLM(flat_config_from_hf(cfg)).eval()
    for p in model.parameters():  # random but well-scaled: activations stay finite through every layer
        torch.nn.init.normal_(p, 0.0, 0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


def scaled(args) -> str:
    """Speed only (random weights have no perplexity): dense / FLAT-LLM 30% / 50%, fp32 and int4."""
    from flatllm_export.compress import compress_flatllm
    from flatllm_export.quantize import quantize_model

    calib = data.calibration_windows(data.tokenize(load_tokenizer("ref-llama"), data.shakespeare_text("train")),
                                     16, 128, 0)
    rng = np.random.default_rng(0)
    inputs = CACHE / "inputs-scaled.npz"
    np.savez(inputs, prompt=rng.integers(0, 32000, (1, args.prompt)), long=rng.integers(0, 32000, (1, args.context)))
    rows, tmp = [], CACHE / "scaled-tmp"
    for ratio in (0.0, 0.3, 0.5):
        model = scaled_model()
        if ratio:  # random weights: block influence means nothing, so uniform ranks
            compress_flatllm(model, calib, ratio, "uniform", linear_multiple=32)
        for int4 in (False, True):
            if int4:
                quantize_model(model, calib[:8], QuantizationSection(bits=4, group_size=128))
            label = ("dense" if not ratio else f"FLAT-LLM {ratio:.0%}") + (" + int4" if int4 else "")
            shutil.rmtree(tmp, ignore_errors=True)
            ctx = ExportContext(extra={"accuracy_level": args.accuracy_level if int4 else 0})
            export("onnx", model, None, tmp / "onnx", ctx)
            if not int4:
                export("hf", model, None, tmp / "hf", ExportContext())
            for rt, path in (("onnxruntime", tmp / "onnx"), ("torch", tmp / "hf")):
                if rt == "torch" and int4:
                    continue
                row = {"export": label, "runtime": rt, "path": str(path),
                       "params (M)": accounting.model_params(model) / 1e6}
                row.update(measure(row, inputs, args))
                row["file MB"] = file_mb(tmp / "onnx")
                rows.append(row)
                print({k: v for k, v in row.items() if k not in ("path", "tokens")}, flush=True)
        del model
    shutil.rmtree(tmp, ignore_errors=True)
    dense = {r["runtime"]: r["decode_tok_s"] for r in rows if r["export"] == "dense" and "decode_tok_s" in r}
    for r in rows:
        if r["runtime"] in dense and "decode_tok_s" in r:
            r["decode vs dense"] = r["decode_tok_s"] / dense[r["runtime"]]
    (CACHE / "scaled.json").write_text(json.dumps(rows, indent=1) + "\n")
    return scaled_table(rows, args)


def scaled_table(rows: list[dict], args) -> str:
    return (f"### Scaled random-weight Llama (0.54B)\n\nRandom weights (hidden 2048, 16 heads, MLP 5504, 8 layers, "
            f"vocab 32000, untied lm_head: 12% of the weights against 42% in SmolLM2), our exports, our runtime "
            f"and PyTorch eager; same timing protocol ({args.threads} threads). Speed only: random weights have no "
            "meaningful perplexity.\n\n"
            + table(rows, ["export", "runtime", "params (M)", "prefill_ms", "decode_tok_s", "decode_long_tok_s",
                           "decode vs dense", "peak_rss_mb", "file MB", "note"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["all", "build", "report"], default="all")
    ap.add_argument("--quick", action="store_true", help="4 rows, 32 decode tokens, 2 windows")
    ap.add_argument("--remeasure", action="store_true")
    ap.add_argument("--only", type=lambda v: v.split(","), default=[],
                    help="comma-separated rows: genai-fp32, genai-int4, dense-fp32, dense-int4-gptqhead-a4, "
                         "flatllm-30-int4-gptqhead-a0, dense-int4-a4 (RTN head), ...")
    ap.add_argument("--scaled", action="store_true", help="also measure the scaled random-weight model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="measurements per row, round-robin; medians reported")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-long", type=int, default=16)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--accuracy-level", type=int, default=4, choices=[0, 1, 2, 3, 4],
                    help="MatMulNBits accuracy_level of our int4 rows (the '..., accuracy_level 0' rows compare)")
    args = ap.parse_args()
    if args.quick:
        args.new, args.new_long, args.windows, args.rounds = 32, 8, 2, 1
    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(MODEL)
    inputs, windows, calib = make_inputs(args, tok)
    rows = builds(args, tok, calib, windows)
    if args.stage == "build":
        return
    if args.stage == "all":
        rows = measure_all(rows, inputs, args)
        scaled_md = scaled(args) if args.scaled else ""
    else:
        rows = measure_all(rows, inputs, args, cached_only=True)
        scaled_md = ""
    if not scaled_md and (CACHE / "scaled.json").exists():
        scaled_md = scaled_table(json.loads((CACHE / "scaled.json").read_text()), args)
    report(rows, args, scaled_md)


if __name__ == "__main__":
    main()
