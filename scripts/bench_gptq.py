"""What each GPTQ setting buys on the real model (SmolLM2-135M): int4, group 32, symmetric (what ONNX int4 and
llama.cpp's Q4_0 hold), one setting changed per row, scored on two kinds of text.

Protocol: calibration ``--nsamples`` windows of ``--seqlen`` tokens of the general corpus's train split (seed 0);
perplexity on the first ``--max-windows`` windows of 512 tokens of the general test split and of the Shakespeare
test plays (a kind of text kept out of calibration), every token of a window scored. The decoder's linears are
quantized; the tied embedding / lm_head stays float unless the row says otherwise, so rows differ only in the
decoder. Each linear's Hessian is taken once from the dense model's inputs (one forward pass, every layer at
once): a screening protocol that makes each row cost one quantization and two evaluations. A recipe's GPTQ is
true-sequential (each layer's Hessians from the already-quantized layers before it); its figures are in the
report of the run (``perplexity_by_dataset``).

The first token of each window is counted apart in the Hessians, so any first-token weight is a combination of
the same two sums (``gptq.weight_first_tokens`` gives what a run uses).

    python scripts/bench_gptq.py          # writes docs/bench_gptq.{md,json}; resumes (out/bench_cache)
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import REAL, Resume, commit, load_model, load_tokenizer, ppl, save, table
from torch import nn

from flatllm_export import data
from flatllm_export.modeling.qlinear import QuantLinear
from flatllm_export.quantize import SEQUENTIAL_GROUPS, set_submodule
from flatllm_export.quantize.gptq import accumulate_hessian, quantize_rtn, quantize_weight
from flatllm_export.recipe import QuantizationSection

TEXTS = ("general", "shakespeare")
DEFAULT = QuantizationSection(group_size=32)  # the recipe's defaults at the group Q4_0 holds
OLD = dict(scale="minmax", desc_act=False, static_groups=False, first_token_weight=1.0)  # plain GPTQ

# (label, method, settings changed from DEFAULT, head): method 'gptq' or 'rtn' (round to nearest on the same grid)
ROWS = [
    ("GPTQ as published (min/max grid, no act-order, every token alike)", "gptq", OLD, "float"),
    ("round to nearest, min/max grid", "rtn", OLD, "float"),
    ("round to nearest, searched grid (importance = H's diagonal)", "rtn", {**OLD, "scale": "search"}, "float"),
    ("GPTQ, searched grid", "gptq", {**OLD, "scale": "search"}, "float"),
    ("GPTQ, searched grid, act-order (static groups)", "gptq", {**OLD, "scale": "search", "desc_act": True,
                                                                 "static_groups": True}, "float"),
    ("GPTQ, searched grid, first token x16", "gptq", {**OLD, "scale": "search", "first_token_weight": 16.0},
     "float"),
    ("GPTQ, searched grid, first token x64", "gptq", {**OLD, "scale": "search", "first_token_weight": 64.0},
     "float"),
    ("**default**: searched grid, act-order (static), first token x64", "gptq", {}, "float"),
    ("default, act-order (static), first token x512", "gptq", {"first_token_weight": 512.0}, "float"),
    ("default, lm_head / embedding int4 too (GPTQ head)", "gptq", {}, "int4"),
    ("default, lm_head / embedding int8 (round to nearest, g32)", "gptq", {}, "int8"),
]


@torch.no_grad()
def hessians(model, calib: torch.Tensor, batch_size: int = 4) -> dict:
    """{linear or 'lm_head': (H of every token but the first of each window, H of the first tokens, their
    token counts)} from one pass of the dense model; a group's linears share their input's Hessian."""
    sums, hooks = {}, []

    def hook_for(key):
        def hook(_mod, args):
            x = args[0]
            rest, first = x[:, 1:].reshape(-1, x.shape[-1]), x[:, 0]
            h = sums.setdefault(key, [torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64) for _ in "ab"]
                                + [0, 0])
            h[2] = accumulate_hessian(h[0], rest, h[2])
            h[3] = accumulate_hessian(h[1], first, h[3])
        return hook

    for i, layer in enumerate(model.model.layers):
        for group in SEQUENTIAL_GROUPS:
            hooks.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook_for(f"{i}.{group[0]}")))
    hooks.append(model.lm_head.register_forward_pre_hook(hook_for("lm_head")))
    for b in calib.split(batch_size):
        model(b)
    for h in hooks:
        h.remove()
    return sums


def combined(parts, first_weight: float) -> torch.Tensor:
    """The Hessian with each window's first token counted ``first_weight`` times (as weight_first_tokens does)."""
    rest, first, n_rest, n_first = parts
    return (rest * n_rest + first * n_first * first_weight) / (n_rest + n_first)


def quantize(base, sums, method: str, s: QuantizationSection, head: str) -> nn.Module:
    model = copy.deepcopy(base)
    for i, layer in enumerate(model.model.layers):
        for group in SEQUENTIAL_GROUPS:
            h = combined(sums[f"{i}.{group[0]}"], s.first_token_weight)
            for name in group:
                w = layer.get_submodule(name).weight
                if method == "rtn":
                    q = quantize_rtn(w, s.bits, s.group_size, s.sym, s.scale, torch.diagonal(h).float())
                else:
                    q, _ = quantize_weight(w, h, s.bits, s.group_size, s.sym, s.desc_act, s.damp_percent,
                                           s.block_size, name, s.scale, s.static_groups)
                set_submodule(layer, name, QuantLinear.from_quantized(q, None, "gptq"))
    if head != "float":
        w, h = model.lm_head.weight.detach().clone(), combined(sums["lm_head"], 1.0)
        if head == "int4":
            q, _ = quantize_weight(w, h, 4, s.group_size, s.sym, s.desc_act, s.damp_percent, s.block_size,
                                   "lm_head", s.scale, s.static_groups)
        else:
            q = quantize_rtn(w, 8, s.group_size, True)
        model.lm_head = QuantLinear.from_quantized(q, None, "gptq")  # the tied embedding reads the same table
        model.model.embed_tokens.weight = nn.Parameter(q.dequantize().to(w.dtype), requires_grad=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=24)
    ap.add_argument("--measured-only", action="store_true", help="write the tables from the rows measured so far "
                    "(out/bench_cache), marking the others as not measured, without measuring anything")
    args = ap.parse_args()
    done = Resume("bench_gptq", f"{args.nsamples}-{args.seqlen}-{args.max_windows}")
    tok = load_tokenizer(REAL)
    test = {t: data.evaluation_windows(data.tokenize(tok, data.load_text(t, "test")), 512, args.max_windows)
            for t in TEXTS}
    calib = data.calibration_windows(data.tokenize(tok, data.load_text("general", "train")), args.nsamples,
                                     args.seqlen, 0)
    base = load_model(REAL, dtype="float32")
    rows = [{"setting": "dense fp32", **done.get("dense", lambda: {t: ppl(base, w, 4) for t, w in test.items()})}]
    sums = None
    for label, method, changes, head in ROWS:
        if args.measured_only and label not in done.rows:
            rows.append({"setting": label, "note": "not measured yet"})
            continue

        def measure():
            nonlocal sums
            sums = sums or hessians(base, calib)
            model = quantize(base, sums, method, DEFAULT.model_copy(update=changes), head)
            return {t: ppl(model, w, 4) for t, w in test.items()}

        rows.append({"setting": label, **done.get(label, measure)})
        print(rows[-1], flush=True)
    for r in (r for r in rows[1:] if TEXTS[0] in r):
        r.update({f"{t} x dense": r[t] / rows[0][t] for t in TEXTS})
    md = ("## GPTQ settings on SmolLM2-135M (`python scripts/bench_gptq.py`)\n\n"
          f"Commit {commit()}. int4, group 32, symmetric; calibration {args.nsamples} x {args.seqlen} tokens of "
          f"the general corpus's train split (seed 0); perplexity on the first {args.max_windows} windows of 512 "
          "tokens of each test text, every token scored. Hessians from the dense model in one pass (screening: "
          "a recipe's GPTQ is true-sequential). The decoder is quantized; the tied embedding / lm_head stays "
          "float unless the row says otherwise. SmolLM2-135M here is dequantized from a Q4_1 GGUF (its weights "
          "already sit on an asymmetric 4-bit grid of group 32).\n\n"
          + table(rows, ["setting", *TEXTS, *(f"{t} x dense" for t in TEXTS), "note"]))
    save("bench_gptq", rows, md)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
