"""What an export computes that the PyTorch model does not: each runtime's approximations, as functions of tensors.

An exported model is not always the PyTorch model's exact twin. By design, a runtime may

- quantize the **activations** entering a quantized matmul (onnxruntime's MatMulNBits at ``accuracy_level`` 4:
  MLAS's ``CompInt8`` path, ``mlas_int8``);
- store the **embedding** or the **lm_head** as quantized blocks (round-to-nearest at export, or a tied embedding
  read from the GPTQ-quantized lm_head's table: ``head_tables``).

An ``Arithmetic`` names the approximations one export makes (read from its metadata, ``of_onnx``). The float64
reference (``reference.py``) and PyTorch's own noise floor both compute *that* arithmetic: the reference in
float64, the floor at the runtime's float precision (``emulated_layer``). A runtime is then judged on what it
was asked to compute, with the fp32 floor, and what the approximations cost in accuracy is reported apart.

llama.cpp's arithmetic (Q8_0 activations into its Q4_0 / Q8_0 matmuls, ``ggml_q8_0``) is the other entry of
``ACTIVATIONS``; ``of_gguf`` names it for a GGUF export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .modeling.packing import QuantizedWeight
from .quantize.gptq import quantize_rtn
from .modeling.qlinear import QuantLinear

TABLE_BITS = {"float": None, "int8": 8, "int4": 4}  # the export's formats of the embedding / an lm_head it rounds


def _int8_blocks(x: torch.Tensor, block: int, scale_dtype: torch.dtype | None) -> torch.Tensor:
    """Symmetric int8 quantization of ``x`` in blocks of ``block`` along the last dim (a last partial block on its
    own), dequantized: scale amax/127 (stored as ``scale_dtype`` when given), codes round-half-to-even of
    x x 127/amax (the reciprocal from the unrounded amax, one product per value). The arithmetic runs in ``x``'s
    dtype (float32: a kernel's own roundings; float64: the reference); float16 / bfloat16 inputs in float32."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    k = work.shape[-1]
    blocks = F.pad(work, (0, -k % block)).unflatten(-1, (-1, block))
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)
    scale = amax / 127.0
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).to(work.dtype)
    return (q * scale).flatten(-2)[..., :k].to(x.dtype)


def mlas_int8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Activations as MLAS's ``CompInt8`` path quantizes them (onnxruntime ``QuantizeARow_CompInt8``, MatMulNBits
    at accuracy_level 4 on CPU), dequantized: each row of A, block by block of the node's ``block_size`` along K,
    gets the scale amax/127 (kept in float32); values are multiplied by 127/amax (one product with the reciprocal
    computed once, as the kernel does) and rounded half to even; the int8 x int-N products of a block are then
    summed exactly and scaled by both scales."""
    return _int8_blocks(x, block, None)


def ggml_q8_0(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Activations as llama.cpp's CPU backend quantizes them before a Q4_0 / Q8_0 matmul (``quantize_row_q8_0``,
    the ``vec_dot_type`` of both), dequantized: blocks of 32 along K, d = amax/127 stored as float16, codes
    round(x x 127/amax) (the reciprocal from the float32 amax, rounded to nearest); a block's integer dot product is
    scaled by both blocks' float16 scales."""
    return _int8_blocks(x, block, torch.float16)


ACTIVATIONS = {"mlas-int8": mlas_int8, "ggml-q8_0": ggml_q8_0}


@dataclass(frozen=True)
class Arithmetic:
    """The approximations an export makes by design (none: the PyTorch model's own arithmetic).

    ``activations``: a key of ``ACTIVATIONS``, applied to the input of every quantized linear (the lm_head too
    when it is quantized); ``embedding``: float | int8 | int4 (a tied int-N embedding reads the quantized lm_head's
    table, see ``head_tables``); ``lm_head``: float | int8 | int4 (rounded to nearest at export; a GPTQ lm_head is
    the model's own and stays as it is); ``block_size``: the block of the tables rounded at export."""

    activations: str | None = None
    embedding: str = "float"
    lm_head: str = "float"
    block_size: int = 32
    runtime: str = "torch"

    def __post_init__(self):
        if self.activations is not None and self.activations not in ACTIVATIONS:
            raise ValueError(f"unknown activation arithmetic {self.activations!r}; known: {list(ACTIVATIONS)}")
        for key in ("embedding", "lm_head"):
            if getattr(self, key) not in TABLE_BITS:
                raise ValueError(f"unknown {key} format {getattr(self, key)!r}; known: {list(TABLE_BITS)}")

    @property
    def exact(self) -> bool:
        return self.activations is None and self.embedding == "float" and self.lm_head == "float"

    @classmethod
    def of_onnx(cls, meta: dict) -> "Arithmetic":
        """The arithmetic of an ONNX export, from its metadata (``flatllm_onnx.json``)."""
        level4 = bool(meta.get("int4")) and meta.get("accuracy_level") == 4
        head = meta.get("lm_head", "float")
        return cls(activations="mlas-int8" if level4 else None, embedding=meta.get("embedding", "float"),
                   lm_head=head if head in TABLE_BITS else "float", block_size=int(meta.get("head_block_size", 32)),
                   runtime="onnxruntime")

    @classmethod
    def of_gguf(cls, traits: dict) -> "Arithmetic":
        """The arithmetic of a GGUF file in llama.cpp, from ``runtime.llamacpp.gguf_traits``: Q8_0 activations into
        every Q4_0 / Q8_0 matmul, and the embedding / output tables as the export rounded them (``head_tables``;
        a GPTQ output is the model's own: ``int<bits>-gptq``)."""
        if traits["embedding"] != "float" and not traits["quantized"]:
            raise ValueError(f"a GGUF with a {traits['embedding']} table has quantized weights")
        head = traits.get("lm_head", "float")
        return cls(activations="ggml-q8_0" if traits["quantized"] else None, embedding=traits["embedding"],
                   lm_head=head if head in TABLE_BITS else "float", runtime="llama.cpp")

    def approximations(self) -> dict[str, "Arithmetic"]:
        """Each approximation of this arithmetic on its own: label -> an arithmetic making only that one."""
        out = {}
        if self.activations:
            out[f"{self.activations} activations"] = Arithmetic(activations=self.activations, runtime=self.runtime)
        if self.embedding != "float":
            out[f"{self.embedding} embedding"] = replace(self, activations=None, lm_head="float")
        if self.lm_head != "float":
            out[f"{self.lm_head} lm_head"] = replace(self, activations=None, embedding="float")
        return out

    def describe(self) -> str:
        return ", ".join(self.approximations()) or "exact"


class QuantizedInput(nn.Module):
    """A quantized linear whose input is first quantized as the runtime does (``ACTIVATIONS``), per block; with
    ``segment``, the input is runs of ``segment`` values (value heads that the export pads to the key head dim:
    llama.cpp's attn_output), each blocked from its own start."""

    def __init__(self, linear: nn.Module, activations: str, block: int, segment: int | None = None):
        super().__init__()
        self.linear, self.activations, self.block, self.segment = linear, activations, block, segment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = ACTIVATIONS[self.activations]
        if self.segment is None:
            return self.linear(fn(x, self.block))
        return self.linear(fn(x.unflatten(-1, (-1, self.segment)), self.block).flatten(-2))


# onnxruntime (1.32, x86-64) quantizes A in blocks of at most 256 whatever the node's block_size: measured with one
# MatMulNBits node (block_size 512 and 1024 match this emulation at 256 to fp32 noise; tests/test_emulation.py)
MLAS_MAX_ACTIVATION_BLOCK = 256


ACTIVATION_BLOCKS = {"ggml-q8_0": 32}  # fixed blocks; MatMulNBits' depend on the node (``activation_block``)


def activation_block(q: QuantizedWeight | QuantLinear, arith: "Arithmetic | None" = None) -> int:
    """The block along K in which the runtime of ``arith`` quantizes a quantized linear's activations (default:
    onnxruntime's MatMulNBits node)."""
    from .quantize.matmulnbits import block_size_for

    if arith is not None and arith.activations in ACTIVATION_BLOCKS:
        return ACTIVATION_BLOCKS[arith.activations]
    return min(block_size_for(q.quantized() if isinstance(q, QuantLinear) else q), MLAS_MAX_ACTIVATION_BLOCK)


def wrap_quantized(arith: Arithmetic, linear: nn.Module, block: int, segment: int | None = None) -> nn.Module:
    """``linear`` (the stand-in of a quantized linear) with the arithmetic's activation quantization, if any."""
    return QuantizedInput(linear, arith.activations, block, segment) if arith.activations else linear


def padded_segments(layer: nn.Module, arith: Arithmetic) -> dict[int, int]:
    """{id(o_proj): value head dim} where the runtime pads narrow value heads to the key head dim before o_proj
    (llama.cpp: its one head size), so that its activation blocks start at every head."""
    attn = getattr(layer, "self_attn", None)
    if arith.runtime != "llama.cpp" or attn is None or getattr(attn, "v_head_dim", None) in (None, attn.head_dim):
        return {}
    return {id(attn.o_proj): attn.v_head_dim}


def emulated_layer(layer: nn.Module, arith: Arithmetic, dtype: torch.dtype, as_linear=None) -> nn.Module:
    """A throwaway copy of one decoder layer computing ``arith`` in ``dtype``: each QuantLinear becomes
    ``as_linear(q)`` (default: a copy of itself) behind the activation quantization."""
    as_linear = as_linear or copy.deepcopy
    segments = padded_segments(layer, arith)
    memo = {id(m): wrap_quantized(arith, as_linear(m), activation_block(m, arith), segments.get(id(m)))
            for m in layer.modules() if isinstance(m, QuantLinear)}
    return copy.deepcopy(layer, memo).to(dtype)


def table_formats(model, embedding: str, lm_head: str) -> tuple[str, str]:
    """(embedding, lm_head) formats an export writes for the recipe's ``export.embedding`` / resolved
    ``export.lm_head``: ``auto`` embedding is the lm_head's quantized table when the two are tied (written once),
    else float; a GPTQ-quantized lm_head is written as it is (its format: ``int<bits>``)."""
    own = f"int{model.lm_head.bits}" if isinstance(model.lm_head, QuantLinear) else lm_head
    if embedding == "auto":
        embedding = own if model.config.tie_word_embeddings and own != "float" else "float"
    return embedding, own


def head_label(model, lm_head: str) -> str:
    """The lm_head format an export records in its metadata: ``int<bits>-gptq`` for the model's own GPTQ head
    (written as it is), else the format it rounds to (``Arithmetic`` reads the former as no approximation)."""
    return f"int{model.lm_head.bits}-gptq" if isinstance(model.lm_head, QuantLinear) else lm_head


def head_tables(model, embedding: str, lm_head: str, block: int, dtype: torch.dtype = torch.float32
                ) -> tuple[torch.Tensor | QuantizedWeight, nn.Module | QuantizedWeight]:
    """The embedding table and the lm_head as an export with these formats stores them: (embedding: a float
    tensor in ``dtype`` or a QuantizedWeight, lm_head: the model's own module or a QuantizedWeight rounded here).
    A tied, equally quantized pair is one table: the embedding reads the lm_head's quantized weight."""
    head = model.lm_head
    head_q = head.quantized() if isinstance(head, QuantLinear) else None
    if head_q is None and TABLE_BITS[lm_head]:
        head_q = quantize_rtn(head.weight.detach().to(dtype), TABLE_BITS[lm_head], block)
    bits = TABLE_BITS[embedding]
    emb_w = model.model.embed_tokens.weight.detach()
    if bits is None:
        table = emb_w.to(dtype)
    elif model.config.tie_word_embeddings and head_q is not None and head_q.bits == bits:
        table = head_q
    else:
        table = quantize_rtn(emb_w.to(dtype).float(), bits, block)
    return table, (head_q if head_q is not None and not isinstance(head, QuantLinear) else head)


def exported_tables(model, arith: Arithmetic, dtype: torch.dtype) -> tuple[nn.Embedding, nn.Module]:
    """(embedding, lm_head) modules in ``dtype`` computing what the export's tables compute under ``arith``."""
    table, head = head_tables(model, arith.embedding, arith.lm_head, arith.block_size, dtype)
    weight = table.dequantize(torch.float32) if isinstance(table, QuantizedWeight) else table
    embed = nn.Embedding.from_pretrained(weight.to(dtype))
    if isinstance(head, QuantizedWeight):
        lin = nn.Linear(head.codes.shape[1], head.codes.shape[0], bias=model.lm_head.bias is not None)
        lin.weight.data = head.dequantize(torch.float32).to(dtype)
        if lin.bias is not None:
            lin.bias.data = model.lm_head.bias.detach().to(dtype)
        return embed, wrap_quantized(arith, lin, activation_block(head, arith))
    if isinstance(head, QuantLinear):
        return embed, wrap_quantized(arith, copy.deepcopy(head).to(dtype), activation_block(head, arith))
    return embed, head
