"""The graph assembled one part at a time: each part (head, every decoder layer, tail) is exported on its own by
``torch.onnx.export`` and merged into one ModelProto, so the exporter never holds more than one decoder layer.

A part's values, nodes and initializers are renamed into the layer's scope (``/layers.{i}/...``, ``layers.{i}.``)
except its boundary values, which are renamed to what they connect to (the previous layer's outputs, the graph's
inputs and outputs, the lengths the head computes once per call). Every tensor of 1 KB or more is appended to the
external-data file (``model.onnx.data``) as soon as its part is merged, so the proto in memory holds small tensors
only. Identical tensors are kept once (hash of their bytes: the rotary cos/sin every layer reads, a shape constant
many nodes use). The post-processing is that of one whole export: placeholder-domain ops go to the default domain
at opset 23, Constant nodes become initializers, and a quantized embedding reads the tied lm_head's MatMulNBits
data instead of a copy of its own.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from flatllm_export.files import OutputError

from .onnx_ops import TMP_DOMAIN

OPSET = 23
EXTERNAL_BYTES = 1024  # initializers of this size and more are written to the external-data file
AXES = {"batch", "sequence", "past_sequence", "total_sequence"}  # dynamic dims named by the exporter


def normalize(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Placeholder-domain ops to the default domain at opset 23; Constant nodes become initializers."""
    g = proto.graph
    for node in g.node:
        if node.domain == TMP_DOMAIN:
            node.domain = ""
    imports = [op for op in proto.opset_import if op.domain not in ("", TMP_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", OPSET), *imports])
    consts = [n for n in g.node if n.op_type == "Constant" and n.attribute[0].name == "value"]
    for n in consts:
        t = copy.deepcopy(n.attribute[0].t)
        t.name = n.output[0]
        g.initializer.append(t)
        g.node.remove(n)
    return proto


def lm_head_weight(tail: onnx.GraphProto) -> tuple[str, str] | None:
    """(name, sha256 of the bytes) of the lm_head's MatMulNBits weight (the tail's last one), or None."""
    heads = [n for n in tail.node if n.op_type == "MatMulNBits"]
    b = next((t for t in tail.initializer if heads and t.name == heads[-1].input[1]), None)
    return None if b is None else (b.name, hashlib.sha256(_bytes(b)).hexdigest())


def tie_embedding(head: onnx.GraphProto, lm_head: tuple[str, str] | None) -> bool:
    """When the quantized embedding's table (``head``) holds the same bytes as the lm_head's MatMulNBits weight
    (``lm_head``: its graph name and digest, ``lm_head_weight``), the head reads a Reshape view of that tensor
    instead of a copy of its own."""
    gather = next((n for n in head.node if n.op_type == "GatherBlockQuantized"), None)
    data = next((t for t in head.initializer if gather is not None and t.name == gather.input[0]), None)
    if data is None or lm_head is None or hashlib.sha256(_bytes(data)).hexdigest() != lm_head[1]:
        return False
    shape = numpy_helper.from_array(np.array(list(data.dims), dtype=np.int64), "embedding_data_shape")
    head.initializer.remove(data)
    head.initializer.append(shape)
    view = helper.make_node("Reshape", [lm_head[0], shape.name], ["embedding_data"], name="embedding_data_view")
    head.node.insert(0, view)
    gather.input[0] = "embedding_data"
    return True


def _bytes(t: onnx.TensorProto) -> bytes:
    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def scoped(scope: str | None) -> Callable[[str], str]:
    """Renamer of a part's own names: ``/x`` -> ``/{scope}/x`` (values, nodes), others -> ``{scope}.x``."""
    if not scope:
        return str
    return lambda name: f"/{scope}{name}" if name.startswith("/") else f"{scope}.{name}"


class Stitcher:
    """The graph being built: parts merged in order, their large tensors appended to ``data_path``."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self.graph = onnx.GraphProto(name="main_graph")
        self.seen: dict[tuple, str] = {}  # (type, dims, sha256 of the bytes) -> initializer name
        self.names: set[str] = set()  # every value name in the graph so far
        self.initializers: set[str] = set()
        self.declared: dict[str, onnx.ValueInfoProto] = {}  # the parts' declared I/O types, by graph name
        self.offset = 0
        self.data_path.unlink(missing_ok=True)
        self.proto: onnx.ModelProto | None = None

    def add(self, proto: onnx.ModelProto, scope: str | None, connect: dict[str, str],
            nodes: list | None = None) -> dict[str, str]:
        """Merge one exported (normalized) part: ``connect`` maps its graph inputs and outputs (and names it reads
        from other parts) to graph-level names; everything else is renamed into ``scope``. ``nodes``: where its
        nodes go (default: the graph, in order). Returns the part's renames."""
        g = proto.graph
        if self.proto is None:  # model-level fields (IR version, producer) from the first part
            self.proto = onnx.ModelProto()
            self.proto.CopyFrom(proto)
            self.proto.graph.Clear()
        domains = {op.domain for op in self.proto.opset_import}
        self.proto.opset_import.extend(op for op in proto.opset_import if op.domain not in domains)
        own = scoped(scope)
        renames = dict(connect)

        def defined(local: str) -> str:  # a value the part produces: a name no other part has taken
            if local not in renames:
                name = own(local)
                while name in self.names:
                    name += "_"
                renames[local] = name
            self.names.add(renames[local])
            return renames[local]

        loose = [vi.name for vi in g.input if vi.name not in connect]
        if loose:
            raise ValueError(f"ONNX stitching: input {loose[0]} of part {scope or 'head/tail'} is connected to nothing")
        for vi in [*g.input, *g.output]:
            self.declared.setdefault(defined(vi.name), _renamed_info(vi, renames[vi.name], own))
        for t in g.initializer:
            renames[t.name] = self._initializer(t, defined(t.name))
        for node in g.node:
            node.input[:] = [renames.get(n, own(n)) if n else n for n in node.input]
            node.output[:] = [defined(n) if n else n for n in node.output]
            node.name = own(node.name)
        (self.graph.node if nodes is None else nodes).extend(g.node)
        # the part's outputs that feed another part are values of the graph: keep their declared types
        for vi in [*g.value_info, *g.output]:
            self.graph.value_info.append(_renamed_info(vi, renames[vi.name], own))
        return renames

    def _initializer(self, t: onnx.TensorProto, name: str) -> str:
        """Add ``t`` as ``name``, or return the name of an identical tensor already added. A large one is written
        to the external-data file now and kept in the proto as a reference."""
        data = _bytes(t)
        key = (t.data_type, tuple(t.dims), hashlib.sha256(data).hexdigest())
        if key in self.seen:
            return self.seen[key]
        if name in self.initializers:
            raise ValueError(f"ONNX stitching: two different tensors are named {name}")
        self.seen[key] = name
        self.initializers.add(name)
        if len(data) >= EXTERNAL_BYTES:  # a reference only: its bytes are never copied into the graph
            self._append(data)
            out = onnx.TensorProto(name=name, data_type=t.data_type, dims=t.dims,
                                   data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", self.data_path.name), ("offset", self.offset - len(data)),
                               ("length", len(data))):
                out.external_data.add(key=key, value=str(value))
        else:
            out = onnx.TensorProto()
            out.CopyFrom(t)
            out.name = name
        self.graph.initializer.append(out)
        return name

    def _append(self, data: bytes) -> None:
        try:
            with open(self.data_path, "ab") as f:
                f.write(data)
        except OSError as exc:
            raise OutputError(f"could not write {self.data_path} ({exc.strerror or exc}); free disk space or "
                              "choose another --output") from None
        self.offset += len(data)

    def finish(self, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
        """The model, with graph inputs and outputs ``inputs`` / ``outputs`` as the parts declared them."""
        missing = [n for n in inputs + outputs if n not in self.declared]
        if missing:
            raise ValueError(f"ONNX stitching: no part declares the graph's {missing[0]}")
        self.graph.input.extend(self.declared[n] for n in inputs)
        self.graph.output.extend(self.declared[n] for n in outputs)
        boundary = set(inputs) | set(outputs)
        keep = [vi for vi in self.graph.value_info if vi.name not in boundary]
        del self.graph.value_info[:]
        self.graph.value_info.extend(keep)
        self.proto.graph.CopyFrom(self.graph)
        if not self.data_path.exists():  # nothing large enough: an empty data file keeps the folder's layout
            self.data_path.touch()
        return self.proto


def _renamed_info(vi: onnx.ValueInfoProto, name: str, own: Callable[[str], str]) -> onnx.ValueInfoProto:
    """``vi`` as ``name``; a symbolic dim torch named after a value of the part (``OpType/...``) is scoped too."""
    out = onnx.ValueInfoProto()
    out.CopyFrom(vi)
    out.name = name
    for d in out.type.tensor_type.shape.dim:
        if d.HasField("dim_param") and d.dim_param not in AXES:
            op, slash, rest = d.dim_param.partition("/")
            d.dim_param = op + own("/" + rest) if slash else own(d.dim_param)
    return out
