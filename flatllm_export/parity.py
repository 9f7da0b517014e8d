"""One verdict for every parity check: a runtime's deviation from the float64 reference, against PyTorch's own.

The float64 reference (``reference.py``) is the model as exported, computed in float64. No runtime can be held to
it exactly: PyTorch itself, in float32, is off by some amount on the same inputs: the **noise floor** of that
precision. A runtime passes a figure when

    deviation from float64  <=  k x floor  +  one float32 ulp of the figure's scale

with ``k`` the recipe's ``validation.noise_k`` (the exporters' self-checks use the same k). Floors come in kinds,
each from PyTorch run at that precision on the same inputs:

- ``fp32``: PyTorch float32 (the in-memory model, the reloaded checkpoints, fp32 ONNX, int4 MatMulNBits at
  accuracy_level 0/1, which dequantizes to float32);
- ``fp16`` / ``bf16``: PyTorch float16 / bfloat16 (fp16 ONNX exports; MatMulNBits accuracy_level 2 / 3);
An export that approximates by design (int8 activations, quantized tables: ``emulation.Arithmetic``) is judged
against the float64 reference *of that arithmetic*, and its floor is PyTorch computing the same arithmetic at the
runtime's precision. Int8 activations make a whole model chaotic (near a rounding tie, fp32 noise moves a value by
a whole int8 step, and such jumps compound over layers), so their end-to-end floors are large (SmolLM2: logits
~2 against 1e-4 exactly); the tight figure is ``layers``: each decoder layer (and the head) on the runtime's own
inputs, the median over token rows of each row's largest deviation, for prefill rows and decode rows apart.

Figures: ``logits`` (max |logit - float64| over a sample), ``ppl`` (|log ppl - log ppl64| on the sample, whose
floor is PyTorch's, but never less than its per-token NLL noise over sqrt(tokens), so a lucky cancellation in
PyTorch's own sum cannot make the floor vanish), ``greedy`` (the float64 margin top-1 minus the runtime's token
at every step where the runtime's greedy token is not float64's top-1, against the logits floor) and ``layers``
(see above; the layer and part whose deviation is the largest multiple of its floor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DEFAULT_K = 8.0  # largest deviation / floor seen on correct exports: 3.0 (docs/parity.md)
EPS32 = float(torch.finfo(torch.float32).eps)
DTYPE_OF_KIND = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KIND_OF_DTYPE = {v: k for k, v in DTYPE_OF_KIND.items()}
FIGURES = {"logits": "max |logit - float64|", "logits_rows": "median row max |logit - float64|",
           "ppl": "|log ppl - log ppl float64|",
           "greedy": "float64 top-2 margin where greedy diverged",
           "layers": "median row deviation from float64, layer by layer on its own inputs"}


def onnx_floor_kind(dtype: str, int4: bool, accuracy_level: int | None) -> str:
    """The float precision an ONNX export computes in: its float dtype, or its MatMulNBits compute type (int8
    activations, accuracy_level 4, are an approximation of the arithmetic, not a precision: fp32)."""
    if int4 and accuracy_level in (2, 3):
        return {2: "fp16", 3: "bf16"}[accuracy_level]
    return "fp16" if dtype == "float16" else "fp32"


@dataclass
class Verdict:
    runtime: str
    figure: str
    deviation: float
    floor: float
    floor_kind: str
    k: float
    tolerance: float
    ok: bool
    where: str = ""

    @property
    def message(self) -> str:
        rel = "<=" if self.ok else ">"
        return (f"{self.runtime}: {FIGURES[self.figure]} {self.deviation:.3g}{self.where} {rel} tolerance "
                f"{self.tolerance:.3g} = {self.k:g} x noise floor {self.floor:.3g} ({self.floor_kind}) "
                f"+ {self.tolerance - self.k * self.floor:.2g}")

    def as_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def judge(runtime: str, figure: str, deviation: float, floor: float, floor_kind: str, k: float, scale: float,
          where: str = "") -> Verdict:
    """THE verdict: pass when deviation <= k x floor + one float32 ulp of ``scale`` (the figure's magnitude)."""
    if figure not in FIGURES:
        raise ValueError(f"unknown parity figure '{figure}'; known: {list(FIGURES)}")
    tol = k * floor + EPS32 * abs(scale)
    ok = math.isfinite(deviation) and deviation <= tol
    return Verdict(runtime, figure, float(deviation), float(floor), floor_kind, float(k), float(tol), bool(ok), where)


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token NLL (float64, flat) of (B, T, V) logits for (B, T) tokens."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1),
                           reduction="none")


class SampleStats:
    """One runtime's deviation from float64 over the sample windows, accumulated window by window."""

    def __init__(self):
        self.max_dev, self.scale, self.nll, self.nll64, self.sq, self.tokens = 0.0, 0.0, 0.0, 0.0, 0.0, 0
        self.row_devs: list[torch.Tensor] = []

    def add(self, logits: torch.Tensor, truth: torch.Tensor, ids: torch.Tensor) -> None:
        rows = (logits.double() - truth).abs().amax(-1).flatten()  # each token row's largest deviation
        rows = torch.where(rows.isnan(), torch.full_like(rows, math.inf), rows)
        self.row_devs.append(rows)
        self.max_dev = max(self.max_dev, rows.max().item())
        self.scale = max(self.scale, truth.abs().max().item())
        nll, nll64 = token_nll(logits, ids), token_nll(truth, ids)
        self.nll += nll.sum().item()
        self.nll64 += nll64.sum().item()
        self.sq += (nll - nll64).pow(2).sum().item()
        self.tokens += nll.numel()

    @property
    def row_median(self) -> float:
        """The median over token rows of each row's largest |logit - float64|."""
        return torch.cat(self.row_devs).median().item() if self.row_devs else 0.0

    @property
    def ppl_dev(self) -> float:
        """|log ppl - log ppl64| on the sample (= the relative ppl difference, to first order)."""
        return abs(self.nll - self.nll64) / max(self.tokens, 1)

    @property
    def ppl_noise(self) -> float:
        """The per-token NLL noise scaled to a mean over the sample: rms(nll - nll64) / sqrt(tokens)."""
        return math.sqrt(self.sq / max(self.tokens, 1)) / math.sqrt(max(self.tokens, 1))

    @property
    def ppl64(self) -> float:
        return math.exp(self.nll64 / max(self.tokens, 1))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))


def floors_from(stats_by_kind: dict[str, SampleStats]) -> dict[str, dict]:
    """Floors from PyTorch's sample statistics at each precision (or arithmetic) key."""
    return {kind: {"logits": s.max_dev, "logits_rows": s.row_median, "ppl": max(s.ppl_dev, s.ppl_noise)}
            for kind, s in stats_by_kind.items()}


def greedy_divergence(tokens: torch.Tensor, truth: torch.Tensor, prompt_len: int) -> dict:
    """Where greedy tokens (1, P+N) part from float64's top-1 on the same prefix. ``truth``: float64 logits of
    tokens[:, :-1]. Returns the first divergent step and the largest float64 margin (top-1 minus the token taken)
    over every divergent step."""
    steps = truth[0, prompt_len - 1 :]  # (N, V): step s predicts tokens[P + s]
    chosen = tokens[0, prompt_len:].long()
    top = steps.max(-1).values
    margin = top - steps.gather(-1, chosen[:, None])[:, 0]
    diverged = (steps.argmax(-1) != chosen).nonzero().flatten().tolist()
    return {"steps": int(chosen.numel()), "diverged": diverged,
            "first": diverged[0] if diverged else None,
            "first_margin": float(margin[diverged[0]]) if diverged else 0.0,
            "max_margin": float(margin[diverged].max()) if diverged else 0.0,
            "worst": int(diverged[int(margin[diverged].argmax())]) if diverged else None,
            "scale": float(steps.abs().max())}


@torch.no_grad()
def judge_logits(runtime: str, got: torch.Tensor, model, ids: torch.Tensor, kind: str, k: float,
                 truth: torch.Tensor | None = None, arith=None) -> Verdict:
    """An export's self-check: logits ``got`` of ``ids`` from the written files, against the float64 reference of
    ``model`` computing ``arith`` (the export's approximations; None: none) and PyTorch's own deviation at the
    precision ``kind``, computing the same arithmetic."""
    from .evaluate import torch_logits_fn
    from .reference import emulated_logits, float64_logits, floor_perturbations, with_dtype

    exact = arith is None or arith.exact
    truth = (float64_logits(model, ids) if exact else float64_logits(model, ids, arith=arith)) if truth is None \
        else truth
    dtype = DTYPE_OF_KIND[kind]
    if exact:
        ref_model = model if next(model.parameters()).dtype == dtype else with_dtype(model, dtype)
        floor = (torch_logits_fn(ref_model)(ids).double() - truth).abs().max().item()
    else:  # the largest over PyTorch runs on its own and on slightly moved inputs (reference.floor_perturbations)
        stat = row_median if arith.activations else lambda d: d.max().item()
        floor = max(stat((emulated_logits(model, ids, arith, dtype, perturb=seed).double() - truth).abs())
                    for seed in floor_perturbations(arith))
        dev = stat((got.double() - truth).abs())
        return judge(runtime, "logits_rows" if arith.activations else "logits", dev if math.isfinite(dev) else math.inf,
                     floor, kind, k, truth.abs().max().item())
    dev = (got.double() - truth).abs().max().item()
    return judge(runtime, "logits", dev if math.isfinite(dev) else math.inf, floor, kind, k, truth.abs().max().item())


def row_median(dev: torch.Tensor) -> float:
    """The median over token rows of each row's largest deviation (dev: (..., vocab)); NaN counts as infinite."""
    rows = dev.amax(-1).flatten()
    return torch.where(rows.isnan(), torch.full_like(rows, math.inf), rows).median().item()


def judge_layers(runtime: str, rows: list[dict], kind: str, k: float) -> Verdict:
    """The ``layers`` figure over ``reference.layer_deviations`` rows: the embedding lookup, every decoder layer
    and the head, prefill and decode rows apart; the one nearest its tolerance (or furthest beyond it) is the
    verdict."""
    verdicts = [judge(runtime, "layers", r[p]["deviation"] if math.isfinite(r[p]["deviation"]) else math.inf,
                      r[p]["floor"], kind, k, r["scale"],
                      f" at {r['layer'] if isinstance(r['layer'], str) else 'layer ' + str(r['layer'])} ({p})")
                for r in rows for p in ("prefill", "decode") if p in r]
    return max(verdicts, key=lambda v: v.deviation / v.tolerance if v.tolerance > 0 else math.inf)
