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

from .errors import InputError
from .evaluate import nll_sum, torch_logits_fn
from .modeling.streaming import is_streamed
from .emulation import Arithmetic
from .parity import (DTYPE_OF_KIND, KIND_OF_DTYPE, SampleStats, floors_from, greedy_divergence, judge, judge_layers,
                     onnx_floor_kind)
from .reference import (EXACT, emulated_logits_fn, float64_hidden, float64_logits, float64_project,
                        floor_perturbations, layer_deviations, with_dtype)

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
    """A named runtime: a logits function for perplexity, a greedy generator, the float precision its arithmetic
    is judged at (``parity.DTYPE_OF_KIND``), the approximations its export makes by design (``arith``), and, where
    the runtime can show its values between decoder layers, ``streams_fn(ids, prefill) -> (streams, logits)``
    (``OrtDecoder.layer_streams``) for the layer-by-layer figure."""

    def __init__(self, name: str, logits_fn, generate_fn, floor_kind: str = "fp32", note: str = "",
                 arith: Arithmetic = EXACT, streams_fn=None, sample_only: bool = False):
        self.name, self.logits_fn, self.generate_fn = name, logits_fn, generate_fn
        self.floor_kind, self.note, self.arith, self.streams_fn = floor_kind, note, arith, streams_fn
        self.sample_only = sample_only  # a floor run measured on the parity sample only

    @property
    def key(self) -> tuple:
        """What its reference and floor depend on: (arithmetic, precision)."""
        return self.arith, self.floor_kind


def torch_runtime(name: str, model, note: str = "") -> Runtime:
    kind = KIND_OF_DTYPE.get(next(model.parameters()).dtype, "fp32")
    return Runtime(name, torch_logits_fn(model), lambda ids, n: greedy_torch(model, ids, n), kind, note)


def _onnx_traits(meta: dict) -> tuple[str, str, Arithmetic]:
    """(precision, note, arithmetic) of an ONNX export from its metadata."""
    level = meta.get("accuracy_level") if meta["int4"] else None
    note = ("int4 MatMulNBits" + (f" accuracy_level {level}" if level else "") if meta["int4"] else "") \
        + f" {meta['dtype']}"
    arith = Arithmetic.of_onnx(meta)
    note = note.strip() + ("" if arith.exact else f"; emulated: {arith.describe()}")
    return onnx_floor_kind(meta["dtype"], meta["int4"], level), note, arith


def onnx_runtime(folder: Path, dec=None) -> Runtime:
    """An ONNX export run by our onnxruntime decoder (``dec``: one already open on ``folder``)."""
    from .runtime.ort import OrtDecoder

    dec = OrtDecoder(folder) if dec is None else dec
    kind, note, arith = _onnx_traits(dec.meta)
    return Runtime("onnxruntime", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), kind, note, arith,
                   lambda ids, prefill: dec.layer_streams(ids.numpy(), prefill))


def genai_runtime(folder: Path) -> Runtime:
    """The same export run by onnxruntime-genai (its own generation loop and KV cache)."""
    from .runtime.genai import GenaiDecoder, genai_blocker, load_meta

    meta = load_meta(folder)
    reason = genai_blocker(meta)
    if reason:
        raise InputError(f"validation runtime 'onnxruntime-genai' cannot run {folder}: {reason}")
    dec = GenaiDecoder(folder)
    kind, note, arith = _onnx_traits(meta)
    return Runtime("onnxruntime-genai", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), kind, note,
                   arith)


def llamacpp_runtime(folder: Path, n_ctx: int) -> Runtime:
    """A GGUF export run by llama.cpp (through llama-cpp-python), with a float32 KV cache."""
    from .runtime.llamacpp import LlamaCppDecoder, gguf_traits

    path = folder / "model.gguf"
    if not path.is_file():
        raise InputError(f"validation runtime 'llama.cpp' needs {path}: export target 'gguf' writes it")
    dec = LlamaCppDecoder(path, n_ctx=n_ctx)
    traits = gguf_traits(path)
    arith = Arithmetic.of_gguf(traits)
    note = "/".join(traits["types"]) + ("" if arith.exact else f"; emulated: {arith.describe()}")
    return Runtime("llama.cpp", dec.logits_fn(), lambda ids, n: dec.generate(ids.numpy(), n), "fp32", note, arith)


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


def _greedy_label(g: dict, agree: int, compared: int) -> str:
    if g["first"] is None:
        return f"{g['steps']}/{g['steps']} = float64, {agree}/{compared} = torch"
    return (f"float64 top-1 until step {g['first']} (margin {g['first_margin']:.2g}); worst margin "
            f"{g['max_margin']:.2g} at step {g['worst']}; {agree}/{compared} = torch")


def _floor_runtimes(model, reference: Runtime, arith: Arithmetic, kind: str) -> list[Runtime]:
    """PyTorch computing ``arith`` at precision ``kind``: the noise floor of every runtime with that key. An
    arithmetic that quantizes activations gets the largest of several runs (``reference.floor_perturbations``):
    the first on its own inputs, the others on slightly moved ones (those only on the sample)."""
    if arith.exact and kind == reference.floor_kind:
        return [reference]
    if arith.exact:
        return [torch_runtime(f"torch {kind}", with_dtype(model, DTYPE_OF_KIND[kind]), "noise floor")]
    return [Runtime(f"torch {kind} emulating {arith.runtime}" + ("" if seed is None else f" (moved {seed})"),
                    emulated_logits_fn(model, arith, DTYPE_OF_KIND[kind], perturb=seed), None, kind,
                    f"noise floor: {arith.describe()}" + ("" if seed is None else "; inputs moved by ~1 ulp"),
                    arith, sample_only=seed is not None) for seed in floor_perturbations(arith)]


def parity(model, others: list[Runtime], windows: dict[str, torch.Tensor], settings, batch_size: int = 8,
           note: str = "in memory") -> dict:
    """The validation section of the report: ``model`` is the PyTorch model as exported (its float64 reference and
    its noise floors are computed from it); ``others`` the runtimes reading the exported files; ``windows``:
    dataset name -> evaluation windows (n, seqlen); ``settings``: the recipe's validation section.

    Parity (does each runtime compute what its export defines?) is judged per runtime against the float64
    reference of its export's arithmetic, with PyTorch computing the same at the runtime's precision as the
    floor; the in-memory PyTorch model is the floor of the exact arithmetic (shown, not judged). Accuracy cost
    (what the export's approximations cost against the PyTorch model) is reported apart: ppl per runtime and
    dataset, ``ppl_increase`` relative to torch, and the cost of each approximation alone (PyTorch emulating
    it), checked against ``settings.max_ppl_increase`` when the recipe sets one."""
    start = time.perf_counter()
    reference = torch_runtime("torch", model, note)
    keys = list(dict.fromkeys([reference.key] + [rt.key for rt in others]))
    floors_rt = {key: _floor_runtimes(model, reference, *key) for key in keys}
    extra = [rt for rts in floors_rt.values() for rt in rts if rt is not reference]
    judged = [reference, *others]
    clock = _Clock()
    first_name = next(iter(windows))
    n_sample = min(settings.sample_windows, windows[first_name].shape[0])
    sample = windows[first_name][:n_sample]
    ariths = list(dict.fromkeys(key[0] for key in keys))
    # one float64 layer loop over the whole sample per arithmetic; logits are projected one window at a time
    hidden64 = {a: clock(float64_hidden, model, sample, n_sample, a) for a in ariths}
    stats = {rt.name: SampleStats() for rt in judged + extra}

    rows, ppl = [], {}
    for name, win in windows.items():
        chunks = list(sample.split(1)) if name == first_name else []
        chunks += [c for c in win[len(chunks):].split(batch_size) if c.shape[0]]  # (splitting 0 rows gives one)
        nll = {rt.name: 0.0 for rt in judged + extra}
        for i, chunk in enumerate(chunks):
            truth = ({a: clock(float64_project, model, hidden64[a][i : i + 1], a) for a in ariths}
                     if name == first_name and i < n_sample else None)
            for rt in judged + extra:
                if rt.sample_only and truth is None:
                    continue
                logits = rt.logits_fn(chunk)
                nll[rt.name] += nll_sum(logits, chunk)
                if truth is not None:
                    stats[rt.name].add(logits, truth[rt.arith], chunk)
        tokens = win.numel() - win.shape[0]
        ppl[name] = {n: float(np.exp(v / tokens)) for n, v in nll.items()}

    floors = {label: {fig: max(f[fig] for f in fl) for fig in fl[0]}
              for label, fl in ((_key_label(key), list(floors_from({rt.name: stats[rt.name] for rt in rts}).values()))
                                for key, rts in floors_rt.items())}
    prompt = windows[first_name][:1, :PROMPT_TOKENS]
    gens = {rt.name: torch.from_numpy(np.asarray(rt.generate_fn(prompt, settings.generate_tokens))) for rt in judged}
    new_ref = gens[reference.name][0, prompt.shape[1]:]
    k, verdicts, failures, layer_rows = settings.noise_k, {}, [], {}
    for rt in judged:
        s, f = stats[rt.name], floors[_key_label(rt.key)]
        # float64 on the runtime's own greedy prefix (a runtime may stop early at EOS: compared as far as it went)
        g = greedy_divergence(gens[rt.name], clock(float64_logits, model, gens[rt.name][:, :-1], 1, rt.arith),
                              prompt.shape[1])
        new = gens[rt.name][0, prompt.shape[1]:]
        compared = min(len(new), len(new_ref))
        agree = int(torch.cumprod((new[:compared] == new_ref[:compared]).long(), 0).sum())
        where = f" at step {g['worst']}" if g["worst"] is not None else ""
        figures = {"logits": judge(rt.name, "logits", s.max_dev, f["logits"], rt.floor_kind, k, s.scale),
                   "ppl": judge(rt.name, "ppl", s.ppl_dev, f["ppl"], rt.floor_kind, k, s.nll64 / max(s.tokens, 1)),
                   "greedy": judge(rt.name, "greedy", g["max_margin"], f["logits"], rt.floor_kind, k, g["scale"],
                                   where)}
        if rt.arith.activations:  # discontinuous: one rounding jump moves a max, a sum or a token (see parity.py)
            figures["logits_rows"] = judge(rt.name, "logits_rows", s.row_median, f["logits_rows"], rt.floor_kind, k,
                                           s.scale)
        if rt.streams_fn is not None:  # layer by layer on the runtime's own inputs: half prefill, half decode
            prefill = max(1, sample.shape[1] // 2)
            streams, got = rt.streams_fn(sample, prefill)
            layer_rows[rt.name] = clock(layer_deviations, model, sample, streams, got, prefill, rt.arith,
                                        DTYPE_OF_KIND[rt.floor_kind])
            figures["layers"] = judge_layers(rt.name, layer_rows[rt.name], rt.floor_kind, k)
        judged_here = [x for name, x in figures.items() if name in judged_figures(rt.arith, "layers" in figures)]
        if rt is not reference:  # the in-memory model is the floor of the exact arithmetic: shown, not judged
            verdicts[rt.name] = [{**x.as_dict(), "judged": x in judged_here} for x in figures.values()]
            failures += [x.message for x in judged_here if not x.ok]
        stopped = f"; stopped after {len(new)} of {settings.generate_tokens} tokens" \
            if len(new) < settings.generate_tokens else ""

        def tol(fig):
            x = figures.get(fig)
            return None if x is None or rt is reference else (x.tolerance if x in judged_here else "reported")

        for name in windows:
            first = name == first_name
            lay = figures.get("layers")
            rows.append({"dataset": name, "runtime": rt.name, "ppl": ppl[name][rt.name],
                         "ppl_increase": ppl[name][rt.name] / ppl[name][reference.name] - 1,
                         "logit_dev_f64": s.max_dev if first else None, "logit_tol": tol("logits") if first else None,
                         "logit_rows_f64": s.row_median if first and "logits_rows" in figures else None,
                         "logit_rows_tol": tol("logits_rows") if first else None,
                         "ppl_dev_f64": s.ppl_dev if first else None, "ppl_tol": tol("ppl") if first else None,
                         "layers": f"{lay.deviation:.2g} <= {lay.tolerance:.2g}{lay.where}" if first and lay else None,
                         "greedy": _greedy_label(g, agree, compared) + stopped if first else None,
                         "floor": _key_label(rt.key), "note": rt.note,
                         "ok": (all(x.ok for x in judged_here) if rt is not reference else "floor") if first else None})
    for rt in extra:
        s = stats[rt.name]
        rows.append({"dataset": first_name, "runtime": rt.name,
                     "ppl": None if rt.sample_only else ppl[first_name][rt.name],
                     "logit_dev_f64": s.max_dev, "ppl_dev_f64": s.ppl_dev, "floor": _key_label(rt.key),
                     "note": rt.note, "ok": "floor"})
    s_ref = stats[reference.name]
    rows.append({"dataset": first_name, "runtime": "float64 reference", "ppl": None, "logit_dev_f64": 0.0,
                 "ppl_dev_f64": 0.0, "note": f"sample ppl {s_ref.ppl64:.6g} over {n_sample} windows"})
    known = {rt.arith: ppl[first_name][rt.name] for rt in extra
             if rt.floor_kind == "fp32" and not rt.sample_only}
    cost = accuracy_cost(model, [rt for rt in others if not rt.arith.exact], windows[first_name],
                         ppl[first_name], reference.name, batch_size, known)
    budget = getattr(settings, "max_ppl_increase", None)
    if budget is not None:
        for name in windows:
            for rt in others:
                inc = ppl[name][rt.name] / ppl[name][reference.name] - 1
                if inc > budget:
                    failures.append(f"{rt.name}: accuracy cost on {name}: ppl {ppl[name][rt.name]:.4g} vs torch "
                                    f"{ppl[name][reference.name]:.4g} (+{100 * inc:.2f}%) exceeds "
                                    f"validation.max_ppl_increase {budget:g} (+{100 * budget:.2f}%)")
    return {"rows": rows, "passed": not failures, "failures": failures, "verdicts": verdicts, "noise_k": k,
            "floors": floors, "layers": layer_rows, "accuracy_cost": cost, "max_ppl_increase": budget,
            "sample": {"dataset": first_name, "windows": n_sample, "tokens": s_ref.tokens,
                       "ppl_float64": s_ref.ppl64, "prompt_tokens": int(prompt.shape[1]),
                       "generate_tokens": settings.generate_tokens},
            "float64_seconds": round(clock.seconds, 2), "seconds": round(time.perf_counter() - start, 2)}


def judged_figures(arith: Arithmetic, layers: bool) -> set[str]:
    """The figures that decide a runtime's verdict (``layers``: the runtime shows its values between layers). An
    arithmetic that quantizes activations is discontinuous: one rounding jump that no PyTorch run happens to
    make moves a maximum, a perplexity or a greedy token, and through attention and the layers after it, every
    later row of its sequence. End to end, those figures are reported beside their floors; the verdict rests on
    the layer-by-layer figure, where nothing compounds, or, for a runtime that cannot show its layers, on the
    end-to-end row median. Exact arithmetic: every figure."""
    if arith.activations:
        return {"layers"} if layers else {"logits_rows"}
    return {"logits", "ppl", "greedy", "layers"}


def _key_label(key: tuple) -> str:
    arith, kind = key
    return kind if arith.exact else f"{kind}, {arith.describe()}"


def accuracy_cost(model, runtimes: list[Runtime], windows: torch.Tensor, ppl: dict, ref_name: str,
                  batch_size: int, known: dict | None = None) -> list[dict]:
    """What each approximation of each export costs alone: ppl of PyTorch (fp32) emulating only it, over
    ``windows``, against the PyTorch model's; and all of them together beside the runtime's own ppl."""
    from .evaluate import perplexity

    out, seen = [], dict(known or {})  # known: arithmetic -> ppl already measured on these windows
    for rt in runtimes:
        for label, arith in {**rt.arith.approximations(), "all together": rt.arith}.items():
            if arith not in seen:
                seen[arith] = perplexity(emulated_logits_fn(model, arith), windows, batch_size,
                                         desc=f"cost of {label}")["ppl"]
            out.append({"runtime": rt.name, "approximation": label, "ppl_emulated": seen[arith],
                        "ppl_increase": seen[arith] / ppl[ref_name] - 1,
                        "ppl_runtime": ppl[rt.name] if label == "all together" else None})
    return out
