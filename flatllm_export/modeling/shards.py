"""Write a model's tensors shard by shard, one decoder layer in memory at a time, in the Hugging Face layout
(``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``). The hf and
gptq exporters use it for in-memory and streamed models alike, so both write the same bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from .streaming import LAYER_PREFIX, StreamError, layers_of, write_tensors

MAX_SHARD_BYTES = 2**30  # a shard holds whole layers up to 1 GiB (one layer more when a single layer is larger)
StateFn = Callable[[nn.Module], dict[str, torch.Tensor]]


def model_parts(model, state_fn: StateFn) -> Iterator[dict[str, torch.Tensor]]:
    """``state_fn`` of the model without its decoder layers (embeddings, final norm, lm_head), then of each decoder
    layer in turn (names prefixed ``model.layers.i.``), loading and releasing one layer at a time."""
    core = model.model
    layers, core.layers = core.layers, nn.ModuleList()
    try:
        yield state_fn(model)
    finally:
        core.layers = layers
    store = layers_of(model)
    for i in range(len(store)):
        layer = store.load(i)
        part = {f"{LAYER_PREFIX}{i}.{k}": v for k, v in state_fn(layer).items()}
        store.release(i, layer)
        del layer
        yield part


def _check_written(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """What was written reads back bit for bit. The file is opened once per tensor: the pages of a memory-mapped
    file that were read stay resident (and count in RSS) until it is closed, so one open for the whole check
    would hold the whole shard (up to MAX_SHARD_BYTES) on top of the tensors being written."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    if keys != set(tensors):
        raise StreamError(f"{path} holds {sorted(keys ^ set(tensors))[:3]} it should not (or lacks them)")
    for k, v in tensors.items():
        with safe_open(str(path), framework="pt") as f:
            got = f.get_tensor(k)
            same = got.dtype == v.dtype and torch.equal(got, v.cpu())
            del got
        if not same:
            raise StreamError(f"{path}: {k} on disk differs from the model's tensor")


def write_sharded(out: Path, parts, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Write the parts (dicts of tensors, e.g. from ``model_parts``) into shards of whole parts; each shard is
    read back and compared before the next part is taken. Returns {'files', 'bytes', 'tensors'}."""
    out.mkdir(parents=True, exist_ok=True)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    total = 0

    def flush():
        path = out / f"shard-{len(shards):05d}.partial.safetensors"
        write_tensors(path, pending)
        _check_written(path, pending)
        shards.append((path, list(pending)))
        pending.clear()

    for part in parts:
        size = sum(v.numel() * v.element_size() for v in part.values())
        if pending and sum(v.numel() * v.element_size() for v in pending.values()) + size > max_shard_bytes:
            flush()
        pending.update({k: v.detach().cpu().contiguous() for k, v in part.items()})
        total += size
        del part
    if pending or not shards:
        flush()
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for (path, _), name in zip(shards, names):
        os.replace(path, out / name)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for (_, keys), name in zip(shards, names) for k in sorted(keys)}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"files": names, "bytes": sum((out / name).stat().st_size for name in names),
            "tensors": sum(len(keys) for _, keys in shards)}
