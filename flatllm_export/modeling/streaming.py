"""Where decoder layers come from: memory, or the model's safetensors files, one layer at a time.

The calibration engine, evaluation and the exporters ask a layer store for layer i (``load``) and hand it back
when done (``release``). ``MemoryLayers`` is the model's own ``nn.ModuleList``. ``DiskLayers`` (``model.stream``)
keeps only meta-device skeletons in the model (right shapes, no data): ``load`` reads the layer's tensors from its
safetensors file (memory-mapped, ``safe_open``, opened and closed per layer so no mapping outlives the read) into a
fresh module, and ``release(changed=True)`` writes a changed layer to its own file in the store's work folder and
frees it. So at most the layer being worked on is materialized, and the methods never know which store they have.
"""

from __future__ import annotations

import copy
import json
import os
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from ..errors import UserError

LAYER_PREFIX = "model.layers."


class StreamError(UserError, OSError):
    """A streamed layer cannot be read or written; the message names the file and the fix."""


class MemoryLayers:
    """The in-memory store: the model's own layers."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.live = 0  # materialized layers this store handed out and that are still alive (memory: always 0)

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, index: int) -> nn.Module:
        return self.layers[index]

    def release(self, index: int, layer: nn.Module, changed: bool = False) -> None:
        self.layers[index] = layer


def layers_of(model) -> "MemoryLayers | DiskLayers":
    """The layer store of ``model``: its DiskLayers when it was loaded with ``stream``, else its own layers."""
    return getattr(model, "layer_store", None) or MemoryLayers(model.model.layers)


def is_streamed(model) -> bool:
    return getattr(model, "layer_store", None) is not None


def tensor_files(folder: Path) -> dict[str, Path]:
    """name -> safetensors file of every tensor of a model folder (single file or sharded index); a shard the
    index lists but the folder lacks is named."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: folder / v for k, v in weight_map.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StreamError(f"{index} is not a safetensors index ({exc}); restore the model folder") from None
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise StreamError(f"{index} lists the shard {path.name}, which is missing from {folder}; copy the whole "
                              "model folder again")
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own errors on a cut or overwritten file
        raise StreamError(f"{path} is truncated or corrupt ({exc}); download or copy the model again") from None


def _by_file(files: dict[str, Path], names) -> dict[Path, list[str]]:
    """``names`` grouped by the file that holds them, so each file is opened once."""
    out: dict[Path, list[str]] = {}
    for n in names:
        out.setdefault(files[n], []).append(n)
    return out


def meta_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """Meta tensors (shape and dtype from the file headers, no data) for ``names``."""
    out = {}
    for path, keys in _by_file(files, names).items():
        with _open(path) as f:
            for k in keys:
                sl = f.get_slice(k)
                out[k] = torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()], device="meta")
    return out


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_tensors(files: dict[str, Path], names) -> dict[str, torch.Tensor]:
    """The tensors ``names``, read into memory (each file opened and closed once)."""
    out = {}
    for path, keys in _by_file(files, names).items():
        try:
            with _open(path) as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        except StreamError:
            raise
        except Exception as exc:
            raise StreamError(f"{path} could not be read ({exc}); copy the model again") from None
    return out


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One safetensors file, written to a temporary name and renamed: a full disk leaves no file that looks
    whole, and the error names the path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    except Exception as exc:  # OSError, or safetensors' own error type for a failed write
        tmp.unlink(missing_ok=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise StreamError(f"could not write {path} ({why}); free disk space or choose another folder") from None


class DiskLayers:
    """Layers read from safetensors files one at a time; changed layers written to ``work_dir``.

    ``model.model.layers[i]`` stays a meta skeleton (what shape questions are answered from); ``load(i)`` builds
    a real copy of the skeleton on the host (the engine moves it to the device) filled from the layer's current
    file, in the skeleton's dtype."""

    def __init__(self, model, files: dict[str, Path], work_dir: Path | None):
        # work_dir None: a read-only store (a reloaded export); releasing a changed layer is then refused
        self.model, self.work_dir = model, Path(work_dir) if work_dir else None
        self.files: list[dict[str, Path]] = [{} for _ in model.model.layers]
        for name, path in files.items():
            if name.startswith(LAYER_PREFIX):
                index = int(name[len(LAYER_PREFIX):].split(".", 1)[0])
                self.files[index][name[len(LAYER_PREFIX):].split(".", 1)[1]] = path
        self.versions = [0] * len(self.files)
        self.live = 0  # materialized layers alive now
        self.peak_live = 0  # the most that were alive at once
        self.loads = 0

    def __len__(self) -> int:
        return len(self.files)

    def _count(self, layer: nn.Module) -> None:
        self.live += 1
        self.loads += 1
        self.peak_live = max(self.peak_live, self.live)
        weakref.finalize(layer, self._freed)

    def _freed(self) -> None:
        self.live -= 1

    def load(self, index: int) -> nn.Module:
        skeleton = self.model.model.layers[index]
        layer = copy.deepcopy(skeleton)  # meta: the tensors read below are assigned, not copied into it
        prefix = f"{LAYER_PREFIX}{index}."
        ref = skeleton.state_dict()  # name -> meta tensor of the dtype the layer computes in
        files = {f"{prefix}{k}": p for k, p in self.files[index].items()}
        missing = [k for k in ref if f"{prefix}{k}" not in files]
        if missing:
            raise StreamError(f"layer {index}: {prefix}{missing[0]} is in no safetensors file of the model; copy the "
                              "whole model folder again")
        state = {k[len(prefix):]: v.to(ref[k[len(prefix):]].dtype) if v.is_floating_point() else v
                 for k, v in read_tensors(files, [f"{prefix}{k}" for k in ref]).items()}
        layer.load_state_dict(state, strict=True, assign=True)
        layer.eval()
        self._count(layer)
        return layer

    def release(self, index: int, layer: nn.Module, changed: bool = False) -> None:
        """Done with ``layer``: a changed one is written to the work folder first; the model keeps its skeleton."""
        if changed:
            if self.work_dir is None:
                raise StreamError(f"layer {index} changed in a model streamed without a work folder; load it with "
                                  "work_dir")
            self.versions[index] += 1
            path = self.work_dir / f"layer-{index:05d}.v{self.versions[index]}.safetensors"
            self.work_dir.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu() for k, v in layer.state_dict().items()}
            write_tensors(path, {f"{LAYER_PREFIX}{index}.{k}": v for k, v in state.items()})
            old = set(self.files[index].values())
            self.files[index] = {k: path for k in state}
            for p in old:  # an earlier version of this layer in the work folder (never the input model's files)
                if p.parent == self.work_dir and p != path:
                    p.unlink(missing_ok=True)
            layer.to("meta")  # its data is on disk now; the caller's reference is to a skeleton from here on
            self.model.model.layers[index] = copy.deepcopy(layer)
