"""Cross-runtime parity: every runtime on the same windows, one table (ppl, relative difference to PyTorch, max
|logit| difference on a sample batch, greedy-generation agreement), pass or fail against the recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .evaluate import perplexity, torch_logits_fn


@torch.no_grad()
def greedy_torch(model, ids: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the model's KV cache, exactly ``new_tokens`` tokens (no EOS stop)."""
    device = next(model.parameters()).device
    out = model(ids.to(device), use_cache=True)
    seq = [ids]
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True).cpu()
        seq.append(nxt)
        out = model(nxt.to(device), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(seq, 1).numpy()


class Runtime:
    """A named runtime: a logits function for perplexity and a greedy generator."""

    def __init__(self, name: str, logits_fn, generate_fn, approximate: bool, note: str = ""):
        self.name, self.logits_fn, self.generate_fn = name, logits_fn, generate_fn
        self.approximate, self.note = approximate, note


def torch_runtime(name: str, model, note: str = "") -> Runtime:
    return Runtime(name, torch_logits_fn(model), lambda ids, n: greedy_torch(model, ids, n), False, note)


def onnx_runtime(folder: Path) -> Runtime:
    from .runtime.ort import OrtDecoder

    dec = OrtDecoder(folder)
    approx = dec.meta["dtype"] != "float32" or (dec.meta["int4"] and dec.meta.get("accuracy_level")) \
        or dec.meta.get("approximate_head", False)  # embedding / lm_head rounded at export
    note = ("int4 MatMulNBits" if dec.meta["int4"] else "") + (f" {dec.meta['dtype']}")
    return Runtime("onnxruntime", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), bool(approx),
                   note.strip())


def parity(reference: Runtime, others: list[Runtime], windows: dict[str, torch.Tensor], settings,
           batch_size: int = 8) -> dict:
    """The parity section of the report. ``windows``: dataset name -> evaluation windows (n, seqlen)."""
    rows, passed = [], True
    first = next(iter(windows.values()))
    sample = first[:2, : min(128, first.shape[1])]
    prompt = first[:1, :16]
    ref_logits = reference.logits_fn(sample)
    ref_gen = reference.generate_fn(prompt, settings.generate_tokens)
    for name, win in windows.items():
        ref_ppl = perplexity(reference.logits_fn, win, batch_size, desc=f"ppl {reference.name}")["ppl"]
        rows.append({"dataset": name, "runtime": reference.name, "ppl": ref_ppl, "ppl_rel_diff": 0.0,
                     "max_abs_logit_diff": 0.0, "greedy_agree": f"{settings.generate_tokens}/{settings.generate_tokens}",
                     "note": reference.note, "ok": True})
        for rt in others:
            ppl = perplexity(rt.logits_fn, win, batch_size, desc=f"ppl {rt.name}")["ppl"]
            rel = abs(ppl - ref_ppl) / ref_ppl
            diff = float((rt.logits_fn(sample) - ref_logits).abs().max())
            gen = rt.generate_fn(prompt, settings.generate_tokens)
            new_ref, new = ref_gen[0, prompt.shape[1]:], gen[0, prompt.shape[1]:]
            agree = int(np.cumprod(new_ref == new).sum())  # tokens identical before the first divergence
            if rt.approximate:
                ok = rel <= settings.max_ppl_rel_diff_lowp
            else:
                ok = rel <= settings.max_ppl_rel_diff and diff <= settings.max_logit_diff \
                    and agree == settings.generate_tokens
            passed &= ok
            rows.append({"dataset": name, "runtime": rt.name, "ppl": ppl, "ppl_rel_diff": rel,
                         "max_abs_logit_diff": diff, "greedy_agree": f"{agree}/{settings.generate_tokens}",
                         "note": rt.note, "ok": ok})
    return {"rows": rows, "passed": bool(passed), "tolerance": settings.max_ppl_rel_diff,
            "tolerance_lowp": settings.max_ppl_rel_diff_lowp, "max_logit_diff": settings.max_logit_diff}
