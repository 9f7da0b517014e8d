"""Text generation from an exported model: onnxruntime (per-layer KV buffers), onnxruntime-genai or PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .modeling import load_model, load_tokenizer
from .runtime.ort import META_FILE, OrtDecoder, pick_next
from .files import finished_folder


def available(folder: Path) -> dict[str, Path]:
    """The runtimes ``folder`` (a run's output folder, or one export folder) can be generated with, and the export
    folder each reads, in the order ``--runtime auto`` prefers them."""
    found = {}
    for sub in (folder, folder / "onnx"):
        if (sub / META_FILE).exists():
            found = {"onnxruntime": sub, "onnxruntime-genai": sub}
            break
    for sub in (folder, folder / "gguf"):
        if (sub / "model.gguf").exists():
            found["llama.cpp"] = sub
            break
    for sub in (folder, folder / "gptq", folder / "hf"):
        if (sub / "config.json").exists():
            found["torch"] = sub
            break
    return found


def resolve(folder: str | Path, runtime: str) -> tuple[str, Path]:
    """(runtime, export folder) for ``--runtime``; a runtime the folder has no export for is refused by name."""
    folder = finished_folder(folder, "a run's output folder or an export folder")
    found = available(folder)
    if not found:
        raise FileNotFoundError(f"{folder} holds no export (looked for {META_FILE} or config.json in it and in onnx/, "
                                "gptq/, hf/): give a run's output folder or an export folder")
    if runtime == "auto":
        return next(iter(found.items()))
    if runtime not in found:
        raise FileNotFoundError(f"{folder} has no export for --runtime {runtime}: it can run with "
                                f"{', '.join(found)} (or --runtime auto)")
    return runtime, found[runtime]


def generate_text(folder, prompt: str, runtime: str = "auto", max_new_tokens: int = 64, sample: bool = False,
                  temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    kind, path = resolve(folder, runtime)
    if kind == "llama.cpp":  # the GGUF file alone: its own tokenizer, llama.cpp's default settings
        from .runtime.llamacpp import LlamaCppDecoder

        dec = LlamaCppDecoder(path / "model.gguf", n_ctx=min(4096, 256 + max_new_tokens), validation=False)
        ids = dec.tokenize(prompt)
        if not ids:
            raise InputError(f"--prompt {prompt!r} gives no tokens (this tokenizer adds no BOS token): give some text")
        rng = np.random.default_rng(seed)
        pick = lambda logits: int(pick_next(logits[None], sample, temperature, top_k, rng)[0])  # noqa: E731
        out = dec.generate(np.array([ids]), max_new_tokens, pick, dec.llm.token_eos())
        return dec.detokenize(out[0])
    tok = load_tokenizer(str(path))
    ids = np.array([tok(prompt)["input_ids"]], dtype=np.int64)
    if ids.size == 0:
        raise InputError(f"--prompt {prompt!r} gives no tokens (this tokenizer adds no BOS token): give some text")
    if kind == "onnxruntime":
        out = OrtDecoder(path).generate(ids, max_new_tokens, sample, temperature, top_k, seed, tok.eos_token_id)
    elif kind == "onnxruntime-genai":
        from .runtime.genai import GenaiDecoder

        search = dict(do_sample=True, temperature=temperature, top_k=top_k, random_seed=seed) if sample else {}
        out = GenaiDecoder(path).generate(ids, max_new_tokens, **search)
        out = out[:, : (out[0] >= 0).sum()]  # drop the padding after an early EOS
    else:
        model = load_model(str(path))
        rng = np.random.default_rng(seed)
        seq = torch.from_numpy(ids)
        with torch.no_grad():
            res = model(seq, use_cache=True)
            for _ in range(max_new_tokens):
                nxt = torch.from_numpy(pick_next(res.logits[:, -1].double().numpy(), sample, temperature, top_k, rng))
                seq = torch.cat([seq, nxt[:, None]], 1)
                if nxt.item() == tok.eos_token_id:
                    break
                res = model(nxt[:, None], past_key_values=res.past_key_values, use_cache=True)
        out = seq.numpy()
    return tok.decode(out[0], skip_special_tokens=True)
