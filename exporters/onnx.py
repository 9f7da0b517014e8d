"""Exporter ``onnx``: one lean decoder graph with KV cache whose layers each keep their own cache shape.

I/O names are the conventional ones (input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value ->
logits, present.{i}.key/.value); batch, sequence and past lengths are dynamic. The graph (``onnx_graph.py``) is
written from export-time stand-ins (``onnx_ops.py``), one onnxruntime node each: fused residual + RMSNorm,
RotaryEmbedding, the standard opset-23 Attention (it takes a value head dim of its own, with the cache), fused
Q/K/V and gate/up matmuls. GPTQ-quantized linears become com.microsoft MatMulNBits nodes carrying the GPTQ
integers, scales and zero points unchanged; embedding and lm_head may be block-quantized too (GatherBlockQuantized
and MatMulNBits; a tied pair is written once). ``flatllm_onnx.json`` beside the graph lists every layer's cache
shape, so a runtime can allocate the past without guessing. The exporter runs the written graph in onnxruntime
against the same computation in PyTorch (a prefill and a decode step) before it reports success.

The graph is exported part by part (head, each decoder layer from the model's layer store, tail) and stitched
(``onnx_stitch.py``): one decoder layer is held at a time, and its tensors go to ``model.onnx.data`` at once.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from flatllm_export.emulation import Arithmetic, head_label, table_formats
from flatllm_export.modeling.streaming import layers_of
from flatllm_export.parity import DEFAULT_K, DTYPE_OF_KIND, judge_layers, judge_logits, onnx_floor_kind
from flatllm_export.runtime.ort import META_FILE, META_FORMAT

from . import DEFAULT_ACCURACY_LEVEL, ExportContext, ExportError, register
from . import onnx_graph
from flatllm_export.reference import layer_deviations

from .onnx_graph import GraphOptions, empty_past, graph_ends
from .onnx_stitch import OPSET, Stitcher, lm_head_weight, normalize, tie_embedding

SELF_CHECK_PREFILL = 6  # of the self-check's 13 tokens; the other 7 are decoded one by one


def io_names(n_layers: int, positions: bool = False) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *(["position_ids"] if positions else []), *past], ["logits", *present]


def cache_layout(config, pad_value_cache: bool = False) -> list[dict]:
    """Per-layer KV cache shapes: [batch, num_kv_heads, past, key_dim] and [..., value_dim]. ``v_head_dim`` is
    what o_proj reads; ``value_dim`` the cache's width (the key's when the value cache is padded)."""
    return [{"num_kv_heads": s["num_kv_heads"], "key_dim": config.head_dim,
             "value_dim": config.head_dim if pad_value_cache else s["v_head_dim"], "v_head_dim": s["v_head_dim"]}
            for s in config.layer_shapes]


def options(model, ctx: ExportContext) -> GraphOptions:
    dtype = {"float32": torch.float32, "float16": torch.float16}[ctx.dtype]
    qc = getattr(model.config, "quantization_config", None) or {}
    block = qc.get("group_size", 32) if qc.get("group_size", -1) > 0 else 32
    head = ctx.extra.get("lm_head", "float")
    embedding, _ = table_formats(model, ctx.extra.get("embedding", "float"), head)
    return GraphOptions(dtype=dtype, accuracy_level=int(ctx.extra.get("accuracy_level", DEFAULT_ACCURACY_LEVEL)),
                        embedding=embedding, lm_head=head,
                        block_size=int(ctx.extra.get("head_block_size", block)),
                        pad_value_cache=bool(ctx.extra.get("pad_value_cache", False)),
                        attention=ctx.extra.get("attention", "gqa"))


# dynamic dims of the graph's and the parts' inputs and outputs
AXES = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
        "past_key_values.0.key": {0: "batch", 2: "past_sequence"}, "seqlens_k": {0: "batch"},
        "attention_bias": {0: "batch", 2: "sequence", 3: "total_sequence"},
        **{n: {0: "batch", 2: "past_sequence"} for n in ("past_key", "past_value")},
        **{n: {0: "batch", 2: "total_sequence"} for n in ("present_key", "present_value")},
        **{n: {0: "batch", 1: "sequence"} for n in ("embeddings", "x", "residual", "x_out", "residual_out")}}
SHARED = {"gqa": ["seqlens_k", "total_sequence_length"], "standard": ["attention_bias"]}  # computed by the head


def export_part(tmp: Path, module, args: tuple, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """One part of the graph exported on its own (TorchScript), normalized (opset 23, constants as initializers)."""
    scratch = tmp / "part.onnx"
    torch.onnx.export(module, args, str(scratch), input_names=inputs, output_names=outputs,
                      dynamic_axes={n: AXES[n] for n in inputs + outputs if n in AXES}, opset_version=17,
                      dynamo=False, do_constant_folding=True)  # custom domains: version 1
    proto = onnx.load(str(scratch), load_external_data=True)
    for f in tmp.iterdir():
        f.unlink()
    return normalize(proto)


def hidden_name(i: int) -> str:  # the graph's value between decoder layers i and i + 1 (-1: the embeddings)
    return "embeddings" if i < 0 else f"/layers.{i}/hidden"


def residual_name(i: int) -> str | None:
    return None if i < 0 else f"/layers.{i}/residual"


def export_ends(stitch: Stitcher, tmp: Path, head, tail, sample: tuple, shared: list[str],
                n_layers: int) -> tuple[list, bool]:
    """Merge the tail (its nodes kept apart: they go last) and the head (embeddings and the ``shared`` values),
    tail first so that its tensors are on disk before the head's are made, and a tied embedding can read the
    lm_head's. Returns (tail nodes, tied)."""
    x = head(*sample)[0]
    proto = export_part(tmp, tail, (x, x), ["x", "residual"], ["logits"])
    tail_nodes = []
    renames = stitch.add(proto, None, {"x": hidden_name(n_layers - 1), "residual": residual_name(n_layers - 1),
                                       "logits": "logits"}, nodes=tail_nodes)
    lm_head = lm_head_weight(proto.graph)
    del proto
    inputs = ["input_ids", "attention_mask", *(["past_key_values.0.key"] if head.takes_positions else [])]
    outputs = ["embeddings", *shared]
    proto = export_part(tmp, head, sample, inputs, outputs)
    tied = tie_embedding(proto.graph, lm_head and (renames[lm_head[0]], lm_head[1]))
    stitch.add(proto, None, {n: n for n in inputs + outputs})
    return tail_nodes, tied


def export_layer(stitch: Stitcher, tmp: Path, i: int, graph, x: torch.Tensor, lengths: dict, past_len: int,
                 g: torch.Generator) -> None:
    """Merge decoder layer i (``graph``, a GraphLayer) between layers i - 1 and i + 1. ``lengths``: the sample
    values every layer reads (graph input position_ids, the head's shared values), by graph name."""
    shared = list(lengths)
    inputs = ["x", *(["residual"] if i else []), *shared, "past_key", "past_value"]
    args = (x, x if i else None, tuple(lengths.values()), *empty_past(graph, x.shape[0], past_len, g))
    proto = export_part(tmp, graph, args, inputs, ["x_out", "residual_out", "present_key", "present_value"])
    stitch.add(proto, f"layers.{i}", {
        **{n: n for n in shared}, "rotary.cos": "rotary.cos", "rotary.sin": "rotary.sin",
        "x": hidden_name(i - 1), "residual": residual_name(i - 1), "x_out": hidden_name(i),
        "residual_out": residual_name(i), "past_key": f"past_key_values.{i}.key",
        "past_value": f"past_key_values.{i}.value", "present_key": f"present.{i}.key",
        "present_value": f"present.{i}.value"})


def export_graph(model, path: Path, opts: GraphOptions) -> dict:
    """Write the graph (``path``) and its tensors (``path``.data) part by part: head (embedding + lengths), each
    decoder layer (taken from the model's layer store, exported, merged, handed back), tail (norm + lm_head).
    Returns {"tied_embedding": whether the embedding reads the lm_head's quantized table}."""
    cfg = model.config
    store = layers_of(model)
    head, tail, rotary = graph_ends(model, opts)
    standard = head.takes_positions
    batch, seq, past_len = 2, 3, 4  # >= 2 so no dynamic dim is specialised
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    first = cache_layout(cfg, opts.pad_value_cache)[0]  # the mask reads layer 0's past length
    past0 = [torch.zeros(batch, first["num_kv_heads"], past_len, first["key_dim"], dtype=opts.dtype)] * standard
    sample = (ids, torch.ones(batch, past_len + seq, dtype=torch.long), *past0)
    stitch, g = Stitcher(path.with_name(path.name + ".data")), torch.Generator().manual_seed(1)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        x, *computed = head(*sample)
        lengths = {**({"position_ids": torch.arange(past_len, past_len + seq).expand(batch, -1)} if standard
                      else {}), **dict(zip(SHARED[opts.attention], computed))}
        tail_nodes, tied = export_ends(stitch, Path(tmp), head, tail, sample, SHARED[opts.attention], len(store))
        del head, tail
        for i in range(len(store)):
            layer = store.load(i)
            graph = onnx_graph.graph_layer(layer, rotary, opts)
            store.release(i, layer)
            del layer
            export_layer(stitch, Path(tmp), i, graph, x, lengths, past_len, g)
            del graph
    stitch.graph.node.extend(tail_nodes)
    onnx.save(stitch.finish(*io_names(cfg.num_hidden_layers, standard)), str(path))
    return {"tied_embedding": tied}


def write_metadata(model, out: Path, dtype: str, opts: GraphOptions, int4: bool) -> dict:
    cfg = model.config
    inputs, outputs = io_names(cfg.num_hidden_layers, opts.attention != "gqa")
    lm_head = head_label(model, opts.lm_head)
    meta = {
        "format": META_FORMAT,
        "model_type": cfg.model_type, "filename": "model.onnx", "dtype": dtype, "opset": OPSET,
        "vocab_size": cfg.vocab_size, "context_length": cfg.max_position_embeddings,
        "eos_token_id": cfg.eos_token_id, "bos_token_id": cfg.bos_token_id,
        "num_hidden_layers": cfg.num_hidden_layers,
        "inputs": inputs, "outputs": outputs,
        "kv_cache_shape": "[batch, num_kv_heads, sequence, dim]",
        # gqa: GroupQueryAttention; the past may be a max-length buffer bound as the present too (in place),
        # attention_mask right-padded. standard: opset-23 Attention, present = past + new (any padding)
        "attention": opts.attention, "shared_kv_buffer": opts.attention == "gqa",
        "pad_value_cache": opts.pad_value_cache,
        "layers": cache_layout(cfg, opts.pad_value_cache),
        "int4": int4, "accuracy_level": opts.accuracy_level if int4 else None,
        "embedding": opts.embedding, "lm_head": lm_head, "head_block_size": opts.block_size,
        # embedding / lm_head rounded at export (RTN): the graph is no longer the PyTorch model's exact twin
        "approximate_head": opts.embedding != "float" or lm_head in ("int8", "int4"),
        "quantization_config": getattr(cfg, "quantization_config", None) if int4 else None,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def self_check(model, dec, dtype: str, int4: bool, accuracy_level: int, noise_k: float = DEFAULT_K) -> dict:
    """Prefill 2 x 6 tokens, then decode 7 tokens one by one from the cache, in onnxruntime; judge, with the shared
    parity verdict, every decoder layer and the head on onnxruntime's own inputs (``layers``) and the logits
    (``logits``) against the float64 reference of ``model`` computing what the export computes by design (its
    ``emulation.Arithmetic``: int8 activations, quantized tables), PyTorch's own deviation at the graph's
    precision, computing the same, being the floor."""
    arith = Arithmetic.of_onnx(dec.meta)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    streams, got = dec.layer_streams(ids.numpy(), SELF_CHECK_PREFILL)
    kind = onnx_floor_kind(dtype, int4, accuracy_level)
    rows = layer_deviations(model, ids, streams, got, SELF_CHECK_PREFILL, arith, DTYPE_OF_KIND[kind])
    layers = judge_layers("onnxruntime", rows, kind, noise_k)
    logits = judge_logits("onnxruntime", torch.from_numpy(got.astype(np.float32)), model, ids, kind, noise_k,
                          arith=arith)
    judged = [layers] + ([] if arith.activations else [logits])  # int8 activations: see validate.judged_figures
    for v in judged:
        if not v.ok:
            raise ExportError(f"onnx export at {dec.folder} fails its parity check (prefill 6 + decode 7 tokens): "
                              f"{v.message}")
    return {"max_abs_logit_diff": logits.deviation, "tolerance": logits.tolerance, "noise_floor": logits.floor,
            "figure": logits.figure, "judged": logits in judged, "floor_kind": kind, "arithmetic": arith.describe(),
            "layers": {"deviation": layers.deviation, "tolerance": layers.tolerance, "where": layers.where.strip()}}


def write_onnx(model, tokenizer, out: Path, ctx: ExportContext, opts: GraphOptions):
    """Graph + metadata + tokenizer, self-checked; shared by the ``onnx`` and ``genai`` targets. Returns the report
    and the onnxruntime session (an ``OrtDecoder``) that checked it."""
    from flatllm_export.runtime.ort import OrtDecoder

    out.mkdir(parents=True, exist_ok=True)
    export_graph(model, out / "model.onnx", opts)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    int4 = any(n.op_type == "MatMulNBits" for n in graph.node)
    meta = write_metadata(model, out, ctx.dtype, opts, int4)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    report = {"path": out.name, "dtype": ctx.dtype, "int4": int4, "nodes": len(graph.node),
              "embedding": meta["embedding"], "lm_head": meta["lm_head"],
              "bytes": sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))}
    dec = OrtDecoder(out)
    report.update(self_check(model, dec, ctx.dtype, int4, opts.accuracy_level, ctx.noise_k))
    return report, dec


@register("onnx")
def export_onnx(model, tokenizer, out: Path, ctx: ExportContext) -> dict:
    report, ctx.opened["onnx"] = write_onnx(model, tokenizer, out, ctx, options(model, ctx))
    return report
