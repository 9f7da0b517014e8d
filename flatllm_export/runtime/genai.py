"""onnxruntime-genai as a runtime for our ONNX exports: the genai_config.json it needs beside the graph, whether
an export can run in it at all, and a decoder with greedy generation and full-window logits (perplexity).

onnxruntime-genai allocates each layer's value cache with the shape of the layer's *key* cache (KV heads and
head dim of the past key input). Per-layer KV head counts (FLAP) therefore work as they are; a value head dim
smaller than the key's (FLAT-LLM) only once the graph pads the value cache to the key dim.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .ort import read_meta
from ..errors import InputError

CONFIG_FILE = "genai_config.json"


load_meta = read_meta  # flatllm_onnx.json, checked key by key


def genai_blocker(meta: dict) -> str | None:
    """Why onnxruntime-genai cannot run this export, or None when it can."""
    bad = [i for i, m in enumerate(meta["layers"]) if m["value_dim"] != m["key_dim"]]
    if bad:
        return (f"layers {bad} have a value cache narrower than the key cache (value dims "
                f"{[meta['layers'][i]['value_dim'] for i in bad]}, key dim {meta['layers'][bad[0]]['key_dim']}); "
                "onnxruntime-genai shapes the value cache like the key cache, so the export must pad it")
    return None


def write_genai_config(folder: str | Path, meta: dict | None = None, share_buffer: bool | None = None,
                       threads: int | None = None, **model_fields) -> Path:
    """Write genai_config.json for the export in ``folder`` from its flatllm_onnx.json. ``share_buffer``: the
    graph updates a max-length cache in place (GroupQueryAttention) instead of concatenating past and new;
    None: as the export's metadata says.
    ``model_fields`` (e.g. hidden_size, num_attention_heads) are added to the decoder section."""
    folder = Path(folder)
    meta = meta or load_meta(folder)
    if share_buffer is None:
        share_buffer = bool(meta.get("shared_kv_buffer", False))
    reason = genai_blocker(meta)
    if reason:
        raise InputError(f"{folder}: {reason}")
    layers = meta["layers"]
    names = set(meta["inputs"])
    inputs = {k: k for k in ("input_ids", "attention_mask", "position_ids") if k in names}
    inputs.update(past_key_names="past_key_values.%d.key", past_value_names="past_key_values.%d.value")
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    if threads:
        session.update(intra_op_num_threads=threads, inter_op_num_threads=1)
    decoder = {"session_options": session, "filename": meta["filename"],
               "head_size": max(m["key_dim"] for m in layers),
               "num_key_value_heads": max(m["num_kv_heads"] for m in layers),
               "num_hidden_layers": meta["num_hidden_layers"], "inputs": inputs,
               "outputs": {"logits": meta["outputs"][0], "present_key_names": "present.%d.key",
                           "present_value_names": "present.%d.value"}, **model_fields}
    eos = meta.get("eos_token_id")
    config = {
        "model": {"type": "llama", "context_length": meta["context_length"], "vocab_size": meta["vocab_size"],
                  "bos_token_id": meta.get("bos_token_id"), "eos_token_id": eos,
                  "pad_token_id": eos[0] if isinstance(eos, list) else eos, "decoder": decoder},
        "search": {"do_sample": False, "num_beams": 1, "max_length": meta["context_length"],
                   "past_present_share_buffer": share_buffer},
    }
    path = folder / CONFIG_FILE
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


class GenaiDecoder:
    """An export run by onnxruntime-genai: ``generate`` (greedy) and ``logits_fn`` (perplexity windows)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise InputError("onnxruntime-genai is not installed: pip install 'flatllm-export[genai]'") from None
        self.og, self.folder = og, Path(folder)
        if not (self.folder / CONFIG_FILE).exists():
            write_genai_config(self.folder)
        cfg = og.Config(str(self.folder))
        if threads:
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.context_length = json.loads((self.folder / CONFIG_FILE).read_text())["model"]["context_length"]

    def generator(self, max_length: int, fixed_length: bool = False, **search):
        """A generator, greedy unless ``search`` says otherwise (do_sample, temperature, top_k, random_seed);
        ``fixed_length`` ignores EOS (min_length = max_length), for timing."""
        params = self.og.GeneratorParams(self.model)
        opts = {"do_sample": False, "max_length": max_length, "batch_size": 1, **search}
        if fixed_length:
            opts["min_length"] = max_length
        params.set_search_options(**opts)
        return self.og.Generator(self.model, params)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, fixed_length: bool = False,
                 **search) -> np.ndarray:
        """New tokens after each prompt row (one row at a time, rows padded with -1 when one stops early at
        EOS); greedy unless ``search`` asks for sampling."""
        rows = []
        for prompt in np.asarray(input_ids, dtype=np.int32):
            gen = self.generator(len(prompt) + max_new_tokens, fixed_length, **search)
            gen.append_tokens(prompt[None])
            new = []
            while len(new) < max_new_tokens and not gen.is_done():
                gen.generate_next_token()
                new.append(int(gen.get_next_tokens()[0]))
            rows.append(np.concatenate([prompt, np.array(new, dtype=np.int32)]).astype(np.int64))
        width = max(len(r) for r in rows)
        return np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])

    def logits_fn(self):
        """Logits of every position of each window: the prompt is appended and the graph's logits output read."""
        def logits(batch: torch.Tensor) -> torch.Tensor:
            out = []
            for row in batch.numpy().astype(np.int32):
                gen = self.generator(len(row) + 1)
                gen.append_tokens(row[None])
                out.append(np.asarray(gen.get_output("logits"), dtype=np.float32).reshape(len(row), -1))
            return torch.from_numpy(np.stack(out))

        return logits
