"""Cross-runtime parity, judged against the float64 reference.

Every runtime (PyTorch in memory, the reloaded GPTQ checkpoint, onnxruntime) is a logits function plus a greedy
generator. On a sample of the evaluation windows (``validation.sample_windows``, full length) each runtime's logits
and perplexity are compared with the float64 reference of the model, and PyTorch's own deviation at the runtime's
precision is the noise floor; greedy tokens are checked against float64's top-1 on the runtime's own prefix. The
verdict is ``parity.judge`` (the function the exporters' self-checks use too). Perplexity over all evaluation
windows is reported beside it for every runtime.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .evaluate import nll_sum, torch_logits_fn
from .modeling.streaming import is_streamed
from .parity import (DTYPE_OF_KIND, KIND_OF_DTYPE, SampleStats, base_kind, floors_from, greedy_divergence, judge,
                     onnx_floor_kind)
from .reference import float64_hidden, float64_logits, float64_project, with_dtype

PROMPT_TOKENS = 16


@torch.no_grad()
def greedy_torch(model, ids: torch.Tensor, new_tokens: int) -> np.ndarray:
    """Greedy decoding with the model's KV cache, exactly ``new_tokens`` tokens (no EOS stop). A streamed model
    recomputes the whole sequence each step (each layer is read once per step; no cache outlives a layer)."""
    if is_streamed(model):
        logits_fn, seq = torch_logits_fn(model), ids
        for _ in range(new_tokens):
            seq = torch.cat([seq, logits_fn(seq)[:, -1].argmax(-1, keepdim=True)], 1)
        return seq.numpy()
    device = next(model.parameters()).device
    out = model(ids.to(device), use_cache=True)
    seq = [ids]
    for _ in range(new_tokens):
        nxt = out.logits[:, -1].float().argmax(-1, keepdim=True).cpu()
        seq.append(nxt)
        out = model(nxt.to(device), past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(seq, 1).numpy()


class Runtime:
    """A named runtime: a logits function for perplexity, a greedy generator, and the kind of noise floor
    (``parity.DTYPE_OF_KIND`` or ``int8``) its arithmetic is judged against."""

    def __init__(self, name: str, logits_fn, generate_fn, floor_kind: str = "fp32", note: str = ""):
        self.name, self.logits_fn, self.generate_fn = name, logits_fn, generate_fn
        self.floor_kind, self.note = floor_kind, note


def torch_runtime(name: str, model, note: str = "") -> Runtime:
    kind = KIND_OF_DTYPE.get(next(model.parameters()).dtype, "fp32")
    return Runtime(name, torch_logits_fn(model), lambda ids, n: greedy_torch(model, ids, n), kind, note)


def _onnx_traits(meta: dict) -> tuple[str, str]:
    """(floor kind, note) of an ONNX export from its metadata."""
    level = meta.get("accuracy_level") if meta["int4"] else None
    note = ("int4 MatMulNBits" + (f" accuracy_level {level}" if level else "") if meta["int4"] else "") \
        + f" {meta['dtype']}"
    if meta.get("approximate_head"):  # embedding / lm_head rounded at export: PyTorch has no such model; the
        return "int8", (note + " rounded embedding/lm_head").strip()  # loose floor, as for int8 activations
    return onnx_floor_kind(meta["dtype"], meta["int4"], level), note.strip()


def onnx_runtime(folder: Path) -> Runtime:
    from .runtime.ort import OrtDecoder

    dec = OrtDecoder(folder)
    kind, note = _onnx_traits(dec.meta)
    return Runtime("onnxruntime", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), kind, note)


def genai_runtime(folder: Path) -> Runtime:
    """The same export run by onnxruntime-genai (its own generation loop and KV cache)."""
    from .runtime.genai import GenaiDecoder, genai_blocker, load_meta

    meta = load_meta(folder)
    reason = genai_blocker(meta)
    if reason:
        raise ValueError(f"validation runtime 'onnxruntime-genai' cannot run {folder}: {reason}")
    dec = GenaiDecoder(folder)
    kind, note = _onnx_traits(meta)
    return Runtime("onnxruntime-genai", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), kind, note)


class _Clock:
    """Adds up the time spent in the calls it wraps (the float64 reference's share of the validation)."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _greedy_label(g: dict, agree: int) -> str:
    if g["first"] is None:
        return f"{g['steps']}/{g['steps']} = float64, {agree}/{g['steps']} = torch"
    return (f"float64 top-1 until step {g['first']} (margin {g['first_margin']:.2g}); worst margin "
            f"{g['max_margin']:.2g} at step {g['worst']}; {agree}/{g['steps']} = torch")


def parity(model, others: list[Runtime], windows: dict[str, torch.Tensor], settings, batch_size: int = 8,
           note: str = "in memory") -> dict:
    """The validation section of the report: ``model`` is the PyTorch model as exported (its float64 reference and
    its noise floors are computed from it); ``others`` the runtimes reading the exported files; ``windows``:
    dataset name -> evaluation windows (n, seqlen); ``settings``: the recipe's validation section."""
    start = time.perf_counter()
    reference = torch_runtime("torch", model, note)
    judged = [reference, *others]
    floor_runtimes = {reference.floor_kind: reference}
    for kind in sorted({base_kind(rt.floor_kind) for rt in judged} - set(floor_runtimes)):
        floor_runtimes[kind] = torch_runtime(f"torch {kind}", with_dtype(model, DTYPE_OF_KIND[kind]), "noise floor")
    extra = [rt for kind, rt in floor_runtimes.items() if rt is not reference]
    clock = _Clock()
    first_name = next(iter(windows))
    n_sample = min(settings.sample_windows, windows[first_name].shape[0])
    # one float64 layer loop over the whole sample; logits are projected one window at a time
    hidden64 = clock(float64_hidden, model, windows[first_name][:n_sample], n_sample)
    stats = {rt.name: SampleStats() for rt in judged + extra}

    rows, ppl = [], {}
    for name, win in windows.items():
        sample = list(win[:n_sample].split(1)) if name == first_name else []
        rest = list(win[len(sample):].split(batch_size))
        nll = {rt.name: 0.0 for rt in judged}
        for i, chunk in enumerate(sample + rest):
            truth_chunk = clock(float64_project, model, hidden64[i : i + 1]) if i < len(sample) else None
            for rt in judged + (extra if truth_chunk is not None else []):
                logits = rt.logits_fn(chunk)
                if rt in judged:
                    nll[rt.name] += nll_sum(logits, chunk)
                if truth_chunk is not None:
                    stats[rt.name].add(logits, truth_chunk, chunk)
        tokens = win.numel() - win.shape[0]
        ppl[name] = {rt.name: float(np.exp(nll[rt.name] / tokens)) for rt in judged}

    floors = floors_from({kind: stats[rt.name] for kind, rt in floor_runtimes.items()})
    prompt = windows[first_name][:1, :PROMPT_TOKENS]
    gens = {rt.name: torch.from_numpy(np.asarray(rt.generate_fn(prompt, settings.generate_tokens))) for rt in judged}
    # float64 on every runtime's own greedy prefix, all runtimes in one layer loop
    truth_gen = clock(float64_logits, model, torch.cat([g[:, :-1] for g in gens.values()]), len(gens))
    k, verdicts, failures = settings.noise_k, {}, []
    for j, rt in enumerate(judged):
        s, f = stats[rt.name], floors[rt.floor_kind]
        g = greedy_divergence(gens[rt.name], truth_gen[j : j + 1], prompt.shape[1])
        new, new_ref = gens[rt.name][0, prompt.shape[1]:], gens[reference.name][0, prompt.shape[1]:]
        agree = int(torch.cumprod((new == new_ref).long(), 0).sum())
        where = f" at step {g['worst']}" if g["worst"] is not None else ""
        v = [judge(rt.name, "logits", s.max_dev, f["logits"], rt.floor_kind, k, s.scale),
             judge(rt.name, "ppl", s.ppl_dev, f["ppl"], rt.floor_kind, k, s.nll64 / max(s.tokens, 1)),
             judge(rt.name, "greedy", g["max_margin"], f["logits"], rt.floor_kind, k, g["scale"], where)]
        verdicts[rt.name] = [x.as_dict() for x in v]
        failures += [x.message for x in v if not x.ok]
        for name in windows:
            first = name == first_name
            rows.append({"dataset": name, "runtime": rt.name, "ppl": ppl[name][rt.name],
                         "ppl_rel_diff": abs(ppl[name][rt.name] / ppl[name][reference.name] - 1),
                         "logit_dev_f64": s.max_dev if first else None,
                         "logit_tol": v[0].tolerance if first else None,
                         "ppl_dev_f64": s.ppl_dev if first else None, "ppl_tol": v[1].tolerance if first else None,
                         "greedy": _greedy_label(g, agree) if first else None,
                         "floor": rt.floor_kind, "note": rt.note,
                         "ok": all(x.ok for x in v) if first else None})
    for rt in extra:
        s = stats[rt.name]
        rows.append({"dataset": first_name, "runtime": rt.name, "ppl": None, "logit_dev_f64": s.max_dev,
                     "ppl_dev_f64": s.ppl_dev, "floor": base_kind(rt.floor_kind), "note": "noise floor only"})
    s_ref = stats[reference.name]
    rows.append({"dataset": first_name, "runtime": "float64 reference", "ppl": None, "logit_dev_f64": 0.0,
                 "ppl_dev_f64": 0.0, "note": f"sample ppl {s_ref.ppl64:.6g} over {n_sample} windows"})
    return {"rows": rows, "passed": not failures, "failures": failures, "verdicts": verdicts, "noise_k": k,
            "floors": floors, "sample": {"dataset": first_name, "windows": n_sample, "tokens": s_ref.tokens,
                                         "ppl_float64": s_ref.ppl64, "prompt_tokens": int(prompt.shape[1]),
                                         "generate_tokens": settings.generate_tokens},
            "float64_seconds": round(clock.seconds, 2), "seconds": round(time.perf_counter() - start, 2)}
