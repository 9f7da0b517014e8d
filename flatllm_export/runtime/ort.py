"""An onnxruntime decoder session: per-layer KV caches shaped from flatllm_onnx.json, prefill and decode, greedy
and sampled generation, and a logits function for perplexity on the same windows as PyTorch.

Nothing is copied between steps: every call goes through an IO binding and the logits are written by
onnxruntime straight into a numpy buffer the caller owns, so a decode step reads one row of vocab logits and
nothing else. With a GroupQueryAttention graph (the default export) generation allocates each layer's cache once
at its final length and binds the same OrtValue as past and present: onnxruntime appends the new keys and values
in place. Graphs of the standard Attention op concatenate past and new inside the graph (present = concat(past,
new)); their presents stay in onnxruntime's memory and are bound back as the next step's past.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import read_json

META_FILE = "flatllm_onnx.json"
META_FORMAT = "flatllm-onnx/2"  # its "format" key: a file of any other format is refused by name
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class ExportFormatError(UserError, ValueError):
    """An export folder's files are not what this version of flatllm-export writes (edited, cut, or another
    version's); the message names the file and the key."""


# key -> (what it must be, test); layers' entries are checked one by one
_META_KEYS = {
    "filename": ("a file name", lambda v: isinstance(v, str) and v != ""),
    "dtype": ("'float32' or 'float16'", lambda v: v in ("float32", "float16")),
    "vocab_size": ("a positive integer", lambda v: type(v) is int and v > 0),
    "context_length": ("a positive integer", lambda v: type(v) is int and v > 0),
    "num_hidden_layers": ("a positive integer", lambda v: type(v) is int and v > 0),
    "inputs": ("a list of input names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "outputs": ("a list of output names starting with 'logits'",
                lambda v: isinstance(v, list) and v[:1] == ["logits"] and all(isinstance(x, str) for x in v)),
    "layers": ("a list of per-layer cache shapes", lambda v: isinstance(v, list)),
    "int4": ("true or false", lambda v: isinstance(v, bool)),
    "shared_kv_buffer": ("true or false (GroupQueryAttention graphs: the cache may be updated in place)",
                         lambda v: isinstance(v, bool)),
}
_LAYER_KEYS = ("num_kv_heads", "key_dim", "value_dim")


def read_meta(folder: str | Path) -> dict:
    """``flatllm_onnx.json`` of an onnx export, checked key by key: every runtime reads the export through it."""
    folder = Path(folder)
    path = folder / META_FILE
    fix = "re-export the model (flatllm-export run) or restore the file"
    if not path.is_file():
        raise ExportFormatError(f"{path} is missing: {folder} is not an onnx export of flatllm-export")
    meta = read_json(path, ExportFormatError, fix)
    if meta.get("format") != META_FORMAT:
        raise ExportFormatError(f"{path} has format {meta.get('format')!r}, this version of flatllm-export reads "
                                f"{META_FORMAT!r}: the export was written by another version; re-export the model "
                                "with this version (flatllm-export run)")
    for key, (want, ok) in _META_KEYS.items():
        if key not in meta:
            raise ExportFormatError(f"{path}: key '{key}' is missing (it must be {want}); {fix}")
        if not ok(meta[key]):
            raise ExportFormatError(f"{path}: key '{key}' must be {want}, got {meta[key]!r}; {fix}")
    n = meta["num_hidden_layers"]
    if len(meta["layers"]) != n:
        raise ExportFormatError(f"{path}: key 'layers' lists {len(meta['layers'])} layers but 'num_hidden_layers' "
                                f"is {n}; {fix}")
    for i, layer in enumerate(meta["layers"]):
        for key in _LAYER_KEYS:
            value = layer.get(key) if isinstance(layer, dict) else None
            if type(value) is not int or value <= 0:
                raise ExportFormatError(f"{path}: key 'layers[{i}].{key}' must be a positive integer, got "
                                        f"{value!r}; {fix}")
    past = [x for x in meta["inputs"] if x.startswith("past_key_values.")]
    present = [x for x in meta["outputs"] if x.startswith("present.")]
    if len(past) != 2 * n or len(present) != 2 * n:
        raise ExportFormatError(f"{path}: keys 'inputs' / 'outputs' name {len(past)} past and {len(present)} "
                                f"present tensors, {2 * n} expected for {n} layers; {fix}")
    if not (folder / meta["filename"]).is_file():
        raise ExportFormatError(f"{path}: key 'filename' names {meta['filename']}, which is missing from {folder}")
    return meta


class OrtDecoder:
    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        graph = self.folder / self.meta["filename"]
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own errors: a cut or overwritten file, a graph it cannot run
            raise ExportFormatError(f"onnxruntime cannot load {graph} ({type(exc).__name__}: "
                                    f"{str(exc).strip()[:300]}); re-export the model") from None
        self.np_dtype = np.float16 if self.meta["dtype"] == "float16" else np.float32
        self.layers = self.meta["layers"]
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in self.meta["inputs"] if n.startswith("past_key_values.")]
        self.present_names = [n for n in self.meta["outputs"] if n.startswith("present.")]
        self.logits_name = self.meta["outputs"][0]
        self.takes_mask = "attention_mask" in graph_inputs
        self.takes_positions = "position_ids" in graph_inputs
        self.shared_buffer = bool(self.meta.get("shared_kv_buffer", False))
        self.context_length = int(self.meta.get("context_length") or 0)
        logits_type = next(o.type for o in self.session.get_outputs() if o.name == self.logits_name)
        self.logits_dtype = _NP_TYPES.get(logits_type, np.float32)
        self.vocab_size = int(self.meta["vocab_size"])
        self._check_cache_shapes(graph_inputs)

    def _check_cache_shapes(self, graph_inputs: dict) -> None:
        """The metadata's per-layer cache dims must be the graph's where the graph states them."""
        for name, shape in zip(self.past_names, self.cache_shapes(1, 0)):
            if name not in graph_inputs:
                raise ExportFormatError(f"{self.folder / META_FILE} names the input {name}, which the graph "
                                        f"{self.meta['filename']} does not have: metadata and graph disagree")
            declared = graph_inputs[name].shape
            for axis in (1, 3):
                if isinstance(declared[axis], int) and declared[axis] != shape[axis]:
                    raise ExportFormatError(f"{self.folder}: {META_FILE} gives {name} dim {axis} = {shape[axis]}, "
                                     f"the graph declares {declared[axis]}: metadata and graph disagree")

    def cache_shapes(self, batch: int, length: int) -> list[tuple[int, int, int, int]]:
        """[batch, kv_heads, length, dim] of every past input, in input order (key, value per layer)."""
        shapes = []
        for layer in self.layers:
            h = layer["num_kv_heads"]
            shapes += [(batch, h, length, layer["key_dim"]), (batch, h, length, layer["value_dim"])]
        return shapes

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros(s, self.np_dtype) for s in self.cache_shapes(batch, 0)]

    def shared_past(self, batch: int, length: int) -> list:
        """Each layer's cache as one OrtValue of ``length`` positions, for ``run(..., past_len=...)`` to update
        in place (GroupQueryAttention graphs only)."""
        import onnxruntime as ort

        if not self.shared_buffer:
            raise ValueError(f"{self.folder}: this graph concatenates past and new keys; it has no shared buffer")
        return [ort.OrtValue.ortvalue_from_numpy(np.zeros(s, self.np_dtype)) for s in self.cache_shapes(batch, length)]

    def run(self, input_ids: np.ndarray, past: list, logits_out: np.ndarray,
            attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None,
            past_len: int | None = None, extras: dict | None = None) -> list:
        """One step through an IO binding. ``past``: per-layer OrtValues (a previous run's presents) or arrays;
        ``logits_out``: the buffer onnxruntime writes the logits into, (B, T, V). ``past_len``: the valid
        length of ``past`` when it is a ``shared_past`` buffer, updated in place (then returned as it is);
        otherwise the presents come back as new OrtValues that stay in onnxruntime memory. ``extras``: graph
        values (outputs of a ``probe`` session) to fetch too, filled in place as name -> array."""
        batch, seq = input_ids.shape
        if batch == 0 or seq == 0:  # onnxruntime's attention kernels divide by these (SIGFPE, no error)
            raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} hold no tokens: give at least one row of "
                             "one token")
        shared = past_len is not None
        past_len = past_len if shared else _length(past[0])
        if self.shared_buffer and attention_mask is not None and not _right_padded(attention_mask):
            raise ValueError("this graph (GroupQueryAttention) takes right-padded rows only: each attention_mask "
                             "row must be ones followed by zeros")
        io = self.session.io_binding()
        alive = [np.ascontiguousarray(input_ids, dtype=np.int64)]  # bound by pointer: kept until run returns
        io.bind_cpu_input("input_ids", alive[0])
        if self.takes_mask:
            mask = np.ones((batch, past_len + seq), np.int64) if attention_mask is None else attention_mask
            alive.append(np.ascontiguousarray(mask, dtype=np.int64))
            io.bind_cpu_input("attention_mask", alive[-1])
        if self.takes_positions:
            pos = (np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
                   if position_ids is None else position_ids)
            alive.append(np.ascontiguousarray(pos, dtype=np.int64))
            io.bind_cpu_input("position_ids", alive[-1])
        for name, value in zip(self.past_names, past):
            if isinstance(value, np.ndarray):
                alive.append(np.ascontiguousarray(value, dtype=self.np_dtype))
                io.bind_cpu_input(name, alive[-1])
            else:
                io.bind_ortvalue_input(name, value)
        if logits_out.shape != (batch, seq, self.vocab_size) or logits_out.dtype != self.logits_dtype \
                or not logits_out.flags.c_contiguous:
            raise ValueError(f"logits buffer {logits_out.shape} {logits_out.dtype} does not fit "
                             f"({batch}, {seq}, {self.vocab_size}) {np.dtype(self.logits_dtype)}")
        io.bind_output(self.logits_name, "cpu", 0, self.logits_dtype, list(logits_out.shape),
                       logits_out.ctypes.data)
        for name, value in zip(self.present_names, past):
            if shared:
                io.bind_ortvalue_output(name, value)  # the same buffer: new keys/values written in place
            else:
                io.bind_output(name, "cpu")  # onnxruntime allocates; the values come back as OrtValues
        for name in extras or ():
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        for name, value in zip(extras or (), outputs[1 + len(self.present_names):]):
            extras[name] = value.numpy()
        return past if shared else outputs[1 : 1 + len(self.present_names)]

    def layer_streams(self, ids: np.ndarray, prefill: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The residual stream entering every decoder layer and leaving the last, float64 (B, T, hidden), as
        onnxruntime computes it for ``ids`` (B, T): a prefill of the first ``prefill`` tokens, then one decode
        step per token, each reading the cache. The graph's values between layers (the embeddings, then each
        layer's ``/layers.{i}/hidden`` + ``/layers.{i}/residual``) become outputs of a second session over the same
        weights file. Returns (streams, the logits of every position)."""
        import os
        import shutil
        import tempfile

        import onnx
        import onnxruntime as ort

        n = self.meta["num_hidden_layers"]
        names = ["embeddings"] + [f"/layers.{i}/{part}" for i in range(n) for part in ("hidden", "residual")]
        graph = self.folder / self.meta["filename"]
        proto = onnx.load(str(graph), load_external_data=False)
        elem = onnx.TensorProto.FLOAT16 if self.np_dtype == np.float16 else onnx.TensorProto.FLOAT
        proto.graph.output.extend(onnx.helper.make_tensor_value_info(x, elem, None) for x in names)
        # the probe graph, with hard links to the export's weights files (onnxruntime refuses weights outside the
        # graph's folder), in a temporary folder on the export's own file system
        with tempfile.TemporaryDirectory(dir=self.folder.parent, prefix=".flatllm-probe-") as tmp:
            for f in self.folder.iterdir():
                if f.name.startswith(graph.name + "."):
                    try:
                        os.link(f, Path(tmp) / f.name)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(f, Path(tmp) / f.name)
            onnx.save(proto, str(Path(tmp) / graph.name))
            del proto
            session, self.session = self.session, ort.InferenceSession(str(Path(tmp) / graph.name),
                                                                       providers=["CPUExecutionProvider"])
        try:
            steps, logits = [], []
            past = self.empty_past(ids.shape[0])
            for part in [ids[:, :prefill]] + [ids[:, t : t + 1] for t in range(prefill, ids.shape[1])]:
                steps.append(dict.fromkeys(names))
                logits.append(self.logits_buffer(*part.shape))
                past = self.run(part, past, logits[-1], extras=steps[-1])
        finally:
            self.session = session
        joined = {x: np.concatenate([st[x] for st in steps], axis=1).astype(np.float64) for x in names}
        streams = [joined["embeddings"]] + [joined[f"/layers.{i}/hidden"] + joined[f"/layers.{i}/residual"]
                                            for i in range(n)]
        return streams, np.concatenate(logits, axis=1)

    def logits_buffer(self, batch: int, seq: int) -> np.ndarray:
        return np.empty((batch, seq, self.vocab_size), self.logits_dtype)

    def forward(self, input_ids: np.ndarray, past: list | None = None,
                attention_mask: np.ndarray | None = None, position_ids: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call: input_ids (B, T) after ``past`` (per-layer arrays or OrtValues, or None) -> logits (B, T, V)
        and the presents as numpy arrays (for callers that inspect them; generate() keeps OrtValues)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        logits = self.logits_buffer(batch, seq)
        presents = self.run(input_ids, self.empty_past(batch) if past is None else past, logits,
                            attention_mask, position_ids)
        return logits, [p.numpy() for p in presents]

    def logits_fn(self):
        """For perplexity: full-window logits, presents left in onnxruntime memory and dropped."""
        def logits(batch: torch.Tensor) -> torch.Tensor:
            ids = batch.numpy()
            out = self.logits_buffer(*ids.shape)
            self.run(ids, self.empty_past(ids.shape[0]), out)
            return torch.from_numpy(out.astype(np.float32, copy=False))

        return logits

    def prefill(self, input_ids: np.ndarray, max_new_tokens: int) -> tuple["Cache", np.ndarray]:
        """Run a prompt (B, T); returns the cache ``step`` continues from and the last position's logits (B, V).
        A GroupQueryAttention graph gets one buffer per layer at the final length (prompt + max_new_tokens,
        at most the context), written in place from then on."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = ids.shape
        logits = self.logits_buffer(batch, length)
        if self.shared_buffer:
            total = length + max_new_tokens
            past = self.shared_past(batch, max(min(total, self.context_length or total), length))
            self.run(ids, past, logits, past_len=0)
        else:
            past = self.run(ids, self.empty_past(batch), logits)
        return Cache(past, length, self.logits_buffer(batch, 1)), logits[:, -1]

    def step(self, cache: "Cache", tokens: np.ndarray) -> np.ndarray:
        """One decode step for tokens (B,); returns the new last logits (B, V) (a view of the cache's buffer)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)
        if self.shared_buffer:
            if cache.length >= _length(cache.past[0]):
                raise ValueError(f"the cache holds {cache.length} positions and is full: prefill with a larger "
                                 "max_new_tokens")
            if cache.binding is None:  # bound once: caches (as past and present) and the logits buffer
                cache.binding = self._bind_cache(cache)
            cache.inputs = (ids, np.ones((ids.shape[0], cache.length + 1), np.int64))  # alive until the next step
            cache.binding.bind_cpu_input("input_ids", cache.inputs[0])
            cache.binding.bind_cpu_input("attention_mask", cache.inputs[1])
            self.session.run_with_iobinding(cache.binding)
        else:
            cache.past = self.run(ids, cache.past, cache.logits)
        cache.length += 1
        return cache.logits[:, -1]

    def _bind_cache(self, cache: "Cache"):
        """An IO binding a decode step reuses: each layer's buffer as its past and its present, the step logits
        buffer as the output; a step then rebinds only input_ids and attention_mask."""
        io = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, cache.past):
            io.bind_ortvalue_input(past, value)
            io.bind_ortvalue_output(present, value)
        io.bind_output(self.logits_name, "cpu", 0, self.logits_dtype, list(cache.logits.shape), cache.logits.ctypes.data)
        return io

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_id: int | None = None
                 ) -> np.ndarray:
        """Prefill the prompt, then decode one token at a time; the cache never leaves onnxruntime."""
        rng = np.random.default_rng(seed)
        ids = np.asarray(input_ids, dtype=np.int64)
        cache, last = self.prefill(ids, max_new_tokens)
        out = [ids]
        for i in range(max_new_tokens):
            nxt = pick_next(last.astype(np.float64), do_sample, temperature, top_k, rng)
            out.append(nxt[:, None])
            if (eos_token_id is not None and (nxt == eos_token_id).all()) or i == max_new_tokens - 1:
                break
            if self.shared_buffer and cache.length >= _length(cache.past[0]):
                break  # the context is full
            last = self.step(cache, nxt)
        return np.concatenate(out, axis=1)


@dataclass
class Cache:
    """A generation's KV cache (per-layer OrtValues), its valid length, the step logits buffer (B, 1, V), and
    (shared buffers) the IO binding every step reuses with the arrays it points to."""
    past: list
    length: int
    logits: np.ndarray
    binding: object = None
    inputs: tuple = ()


def _length(value) -> int:
    """Sequence length (dim 2) of a cache tensor: a numpy array or an OrtValue."""
    shape = value.shape if isinstance(value, np.ndarray) else value.shape()
    return int(shape[2])


def _right_padded(mask: np.ndarray) -> bool:
    """Every row is ones then zeros (what GroupQueryAttention's seqlens_k can express)."""
    m = np.asarray(mask) != 0
    return bool((m[:, 1:] <= m[:, :-1]).all())


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
