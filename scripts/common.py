"""Shared helpers of the benchmark scripts: models, windows, perplexity, timing, tables."""

from __future__ import annotations

import json
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


def windows(name: str, split: str = "test", seqlen: int = 256, nsamples: int = 128, seed: int = 0):
    tok = load_tokenizer(name)
    tokens = data.tokenize(tok, data.shakespeare_text(split))
    if split == "train":
        return data.calibration_windows(tokens, nsamples, seqlen, seed)
    return data.evaluation_windows(tokens, seqlen)


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
