"""An onnxruntime decoder session: per-layer past buffers allocated from flatllm_onnx.json, prefill and decode,
greedy and sampled generation, and a logits function for perplexity on the same windows as PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

META_FILE = "flatllm_onnx.json"


class OrtDecoder:
    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        meta_path = self.folder / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} is missing: {folder} is not an onnx export of flatllm-export")
        self.meta = json.loads(meta_path.read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.folder / self.meta["filename"]), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.np_dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        self.layers = self.meta["layers"]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        past = []
        for layer in self.layers:
            h = layer["num_kv_heads"]
            past += [np.zeros((batch, h, 0, layer["key_dim"]), self.np_dtype),
                     np.zeros((batch, h, 0, layer["value_dim"]), self.np_dtype)]
        return past

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: input_ids (B, T) after ``past`` (per-layer arrays, or None) -> logits (B, T, V), presents."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = self.empty_past(batch) if past is None else past
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        if position_ids is None:
            position_ids = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
        feed = {"input_ids": input_ids, "attention_mask": attention_mask.astype(np.int64),
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feed.update(zip(self.meta["inputs"][3:], past))
        outs = self.session.run(None, feed)
        return outs[0], outs[1:]

    def logits_fn(self):
        def logits(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.forward(batch.numpy())[0].astype(np.float32))

        return logits

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_id: int | None = None
                 ) -> np.ndarray:
        """Prefill the prompt, then decode one token at a time with the per-layer cache."""
        rng = np.random.default_rng(seed)
        ids = np.asarray(input_ids, dtype=np.int64)
        logits, past = self.forward(ids)
        out = [ids]
        for _ in range(max_new_tokens):
            nxt = pick_next(logits[:, -1].astype(np.float64), do_sample, temperature, top_k, rng)
            out.append(nxt[:, None])
            if eos_token_id is not None and (nxt == eos_token_id).all():
                break
            logits, past = self.forward(nxt[:, None], past)
        return np.concatenate(out, axis=1)


def pick_next(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, rng) -> np.ndarray:
    if not do_sample:
        return logits.argmax(-1)
    z = logits / max(temperature, 1e-6)
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])
