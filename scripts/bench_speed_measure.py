"""One speed measurement, run by bench_onnx_speed.py in a fresh process (so peak RSS is this model's alone):

    python scripts/bench_speed_measure.py RUNTIME PATH --inputs INPUTS.npz [--threads 2] [--no-ppl]

RUNTIME: ``onnxruntime`` (our session wrapper), ``onnxruntime-genai`` or ``torch`` (PyTorch eager). INPUTS.npz
holds ``prompt`` (1, P) for prefill and short-context decode, ``long`` (1, L) for decode at a long context and
``windows`` (n, seqlen) for perplexity. Prints one JSON line: prefill_ms (median of 3 after a warm-up),
decode_tok_s (after the P-token prompt, ``--new`` greedy tokens), decode_long_tok_s (after the L-token
prompt, ``--new-long`` tokens), peak_rss_mb (taken before perplexity), ppl, and the first greedy tokens.
Decode speed is 1 / the median time of one step: robust to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flatllm_export.evaluate import perplexity  # noqa: E402
from flatllm_export.stages import maxrss_bytes  # noqa: E402


class Ours:
    """Our onnxruntime wrapper: the cache stays in onnxruntime between steps (updated in place with
    GroupQueryAttention)."""

    def __init__(self, path: str, threads: int):
        from flatllm_export.runtime.ort import OrtDecoder

        self.dec = OrtDecoder(path, threads=threads)
        self.logits_fn = self.dec.logits_fn()

    def prefill(self, ids: np.ndarray, new_tokens: int):
        cache, last = self.dec.prefill(ids, new_tokens)
        return cache, int(last[0].argmax())

    def step(self, cache, token: int):
        return cache, int(self.dec.step(cache, np.array([token]))[0].argmax())


class Genai:
    """onnxruntime-genai's own loop. append_tokens runs the prompt and the first generate_next_token only picks
    from its logits; every later generate_next_token is one step (runs the last token, then picks)."""

    def __init__(self, path: str, threads: int):
        from flatllm_export.runtime.genai import GenaiDecoder

        self.dec = GenaiDecoder(path, threads=threads)
        self.logits_fn = self.dec.logits_fn()

    def prefill(self, ids: np.ndarray, new_tokens: int):
        gen = self.dec.generator(ids.shape[1] + new_tokens + 1, fixed_length=True)
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()
        return gen, int(gen.get_next_tokens()[0])

    def step(self, gen, token):
        gen.generate_next_token()
        return gen, int(gen.get_next_tokens()[0])


class Torch:
    """PyTorch eager with the model's KV cache."""

    def __init__(self, path: str, threads: int):
        from flatllm_export.evaluate import torch_logits_fn
        from flatllm_export.modeling import load_model

        torch.set_num_threads(threads)
        self.model = load_model(path)
        self.logits_fn = torch_logits_fn(self.model)

    @torch.no_grad()
    def prefill(self, ids: np.ndarray, new_tokens: int):
        out = self.model(torch.from_numpy(ids), use_cache=True)
        return out.past_key_values, int(out.logits[0, -1].argmax())

    @torch.no_grad()
    def step(self, past, token: int):
        out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
        return out.past_key_values, int(out.logits[0, -1].argmax())


RUNTIMES = {"onnxruntime": Ours, "onnxruntime-genai": Genai, "torch": Torch}


def decode(rt, ids: np.ndarray, new_tokens: int) -> tuple[float, list[int]]:
    """(tokens/s from the median step time, greedy tokens) for new_tokens steps after prefilling ids."""
    state, token = rt.prefill(ids, new_tokens)
    times, tokens = [], [token]
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        state, token = rt.step(state, token)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    return 1.0 / statistics.median(times), tokens


def prefill_ms(rt, ids: np.ndarray) -> float:
    rt.prefill(ids, 1)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        rt.prefill(ids, 1)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20


def measure(runtime: str, path: str, inputs: dict, threads: int, new: int, new_long: int, ppl: bool) -> dict:
    rt = RUNTIMES[runtime](path, threads)
    res = {"prefill_ms": prefill_ms(rt, inputs["prompt"])}
    res["decode_tok_s"], tokens = decode(rt, inputs["prompt"], new)
    res["tokens"] = tokens[:32]
    if "long" in inputs and new_long:
        res["decode_long_tok_s"] = decode(rt, inputs["long"], new_long)[0]
    res["peak_rss_mb"] = peak_rss_mb()
    if ppl and "windows" in inputs:
        res["ppl"] = perplexity(rt.logits_fn, torch.from_numpy(inputs["windows"]), 1, desc="ppl")["ppl"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runtime", choices=sorted(RUNTIMES))
    ap.add_argument("path")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--new-long", type=int, default=32)
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    inputs = dict(np.load(args.inputs))
    res = measure(args.runtime, args.path, inputs, args.threads, args.new, args.new_long, not args.no_ppl)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
