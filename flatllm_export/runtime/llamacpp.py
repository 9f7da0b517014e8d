"""llama.cpp as a runtime for GGUF exports, through its maintained Python binding ``llama-cpp-python`` (which
compiles llama.cpp during ``pip install``; extra ``llamacpp``).

Validation runs llama.cpp with a float32 KV cache and without flash attention, so that what it computes is the
export's arithmetic (``emulation.Arithmetic.of_gguf``: Q8_0 activations into Q4_0 / Q8_0 matmuls) and nothing
more; llama.cpp's own defaults (a float16 cache) are what ``generate`` uses. A file llama.cpp cannot load is
refused with llama.cpp's own log lines.

Weights stay in llama.cpp's plain CPU buffers (its ``use_extra_bufts`` off): no AMX tiles or repacked layouts, so
one kernel family computes every file on every x86 CPU. llama.cpp's AMX kernels crash the process (SIGILL or
SIGSEGV in ``ggml_backend_amx_mul_mat``) on virtual machines that advertise AMX without running it, and the
binding gives no other way to keep them out. llama.cpp's own tools keep their defaults.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError

INSTALL = "pip install 'flatllm-export[llamacpp]'"
GGML_TYPE_F32 = 0


def missing_binding() -> str | None:
    """Why llama.cpp cannot run here (the binding is not installed, with the pip command), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"the llama.cpp runtime needs the binding llama-cpp-python, which is not installed: {INSTALL}"
    return None


def gguf_traits(path: str | Path) -> dict:
    """What a GGUF file asks of llama.cpp's arithmetic, from its tensor types: ``quantized`` (some weight is
    Q4_0 / Q8_0: llama.cpp quantizes the activations entering it to Q8_0), ``embedding`` and ``lm_head`` (float,
    int8, int4: the token_embd / output tables' types, the output being token_embd when the file has no
    ``output.weight``; as recorded by our exporter when it wrote the file, a GPTQ output being ``int<bits>-gptq``)."""
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    bits = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q8_0: 8}
    quantized = any(t in bits for t in types.values())

    def table(name: str) -> str:
        return f"int{bits[types[name]]}" if types.get(name) in bits else "float"

    def recorded(key: str) -> str | None:  # what our exporter recorded (a GPTQ output: 'int4-gptq')
        field = reader.get_field(f"flatllm_export.{key}")
        return None if field is None else field.contents()

    embedding = table("token_embd.weight")
    lm_head = recorded("lm_head") or (table("output.weight") if "output.weight" in types else embedding)
    return {"quantized": quantized, "embedding": recorded("embedding") or embedding, "lm_head": lm_head,
            "types": sorted({GGMLQuantizationType(t).name for t in types.values()})}


class LlamaCppError(InputError):
    """llama.cpp could not load or run a GGUF file; the message carries llama.cpp's own words."""


class _Log:
    """llama.cpp's log lines, kept (not printed) while a model loads, to show the reason of a failure."""

    def __init__(self, llama_cpp):
        self.lines: list[str] = []
        self.lib = llama_cpp

        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            self.lines.append(text.decode("utf-8", "replace"))

        self.callback = callback

    def __enter__(self):
        self.lib.llama_log_set(self.callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        return False

    def errors(self) -> str:
        text = "".join(self.lines)
        keep = [ln for ln in text.splitlines() if any(w in ln.lower() for w in ("error", "failed", "invalid",
                                                                                    "wrong", "missing"))]
        return "; ".join(keep[-4:]) or (text.strip().splitlines() or ["no message"])[-1]


@contextlib.contextmanager
def _plain_cpu_buffers(llama_cpp):
    """While a model loads, llama.cpp's default model parameters have ``use_extra_bufts`` off (the binding's
    ``Llama`` takes its parameters from ``llama_model_default_params`` and exposes no such argument)."""
    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


class LlamaCppDecoder:
    """A GGUF file in llama.cpp: ``logits_fn`` (every position of each window) and greedy ``generate``."""

    def __init__(self, path: str | Path, n_ctx: int = 512, threads: int = 2, validation: bool = True):
        reason = missing_binding()
        if reason:
            raise InputError(reason)
        import llama_cpp

        self.path = Path(path)
        if not self.path.is_file():
            raise LlamaCppError(f"GGUF file {self.path} does not exist")
        options = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                       logits_all=True, verbose=False, seed=0)
        if validation:  # the export's arithmetic only: a float32 cache, no flash attention
            options.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
        log = _Log(llama_cpp)
        with log, _plain_cpu_buffers(llama_cpp):
            try:
                self.llm = llama_cpp.Llama(model_path=str(self.path), **options)
            except (ValueError, RuntimeError) as exc:
                raise LlamaCppError(f"llama.cpp could not load {self.path}: {log.errors()} ({exc})") from None
        self.log = log
        self.n_ctx = n_ctx

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def _eval(self, tokens: list[int]) -> None:
        if len(tokens) > self.n_ctx:
            raise LlamaCppError(f"{len(tokens)} tokens exceed the llama.cpp context of {self.n_ctx}")
        self.llm.eval(tokens)

    def logits(self, row: np.ndarray) -> np.ndarray:
        """(T, vocab) float32 logits of one sequence, from an empty cache."""
        self.llm.reset()
        self._eval([int(t) for t in row])
        return np.array(self.llm.scores[: len(row)], dtype=np.float32)

    def logits_fn(self):
        def logits(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.stack([self.logits(r) for r in batch.numpy()]))

        return logits

    def start(self, prompt) -> np.ndarray:
        """Logits (vocab,) after ``prompt``, from an empty cache."""
        self.llm.reset()
        self._eval([int(t) for t in prompt])
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)

    def step(self, token: int) -> np.ndarray:
        """Logits (vocab,) after one more token."""
        self._eval([int(token)])
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float64)

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, pick=None, eos: int | None = None) -> np.ndarray:
        """Tokens after each prompt row, greedy unless ``pick(logits) -> token`` says otherwise, stopping at
        ``eos`` (rows padded with -1 when one stops early)."""
        pick = pick or (lambda logits: int(np.argmax(logits)))
        rows = []
        for prompt in np.asarray(input_ids, dtype=np.int64):
            seq, logits = [int(t) for t in prompt], self.start(prompt)
            for i in range(max_new_tokens):
                seq.append(pick(logits))
                if seq[-1] == eos or i == max_new_tokens - 1:
                    break
                logits = self.step(seq[-1])
            rows.append(np.array(seq, dtype=np.int64))
        width = max(len(r) for r in rows)
        return np.stack([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows])

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of ``text`` (the GGUF's tokenizer metadata; BOS if the vocab adds one)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.llm.metadata.get(
            "tokenizer.ggml.add_bos_token", "false") == "true", special=True)

    def detokenize(self, tokens) -> str:
        return self.llm.detokenize([int(t) for t in tokens if t >= 0]).decode("utf-8", "replace")
