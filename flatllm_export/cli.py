"""flatllm-export: parse, call the API, print. No logic here."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import traceback
from pathlib import Path

from . import interrupts
from .errors import UserError

# nothing heavy is imported before main()'s try: a Ctrl-C while torch loads is handled like any other


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value, e.g. --set compression.ratio=0.5 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flatllm-export", description="Compress, quantize, export and validate "
                                 "Llama-family models with per-layer shapes.")
    ap.add_argument("--debug", action="store_true", help="print the traceback of a user error too (an internal "
                    "error always shows its traceback)")
    sub = ap.add_subparsers(dest="command", required=True)
    _recipe_args(sub.add_parser("check", help="validate a recipe without running it"))
    p = sub.add_parser("run", help="run a recipe")
    _recipe_args(p)
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--keep-failed", action="store_true",
                   help="when the run fails, keep its unfinished output in DIR.partial for inspection")
    p = sub.add_parser("import-gguf", help="convert a llama.cpp GGUF file (llama / mistral) to a Hugging Face folder")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--output", "-o", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the written safetensors (GGUF tensors are dequantized to it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p = sub.add_parser("validate", help="cross-runtime parity of a finished run's output directory")
    p.add_argument("dir")
    p = sub.add_parser("generate", help="generate text from an exported model (onnxruntime, onnxruntime-genai, llama.cpp or PyTorch)")
    p.add_argument("dir", help="a run's output directory, or one export folder (onnx/, hf/, gptq/)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--runtime", choices=["auto", "onnxruntime", "onnxruntime-genai", "llama.cpp", "torch"], default="auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    # Ctrl-C and `kill PID` (SIGTERM) end the work where it is: the unfinished output is removed on the way out
    restore = interrupts.install()
    try:
        if args.command == "import-gguf":
            from .modeling.gguf_import import import_gguf

            print(json.dumps(import_gguf(args.file, args.output, args.dtype, args.overwrite), indent=1))
            return 0
        if args.command == "validate":
            from .api import validate_dir

            result = validate_dir(args.dir)
            print((Path(args.dir) / "validation.md").read_text())
            return 0 if result["passed"] else 3
        if args.command == "generate":
            from .generate import generate_text

            print(generate_text(args.dir, args.prompt, args.runtime, args.max_new_tokens, args.sample,
                                args.temperature, args.top_k, args.seed))
            return 0
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe, args.overrides)
        for warning in recipe.warnings():
            print(f"warning: {warning}", file=sys.stderr)
        if args.command == "check":
            from .preflight import preflight

            preflight(recipe, args.recipe)
            print(f"recipe {args.recipe} is valid: sections "
                  f"{', '.join(k for k, v in recipe.model_dump(exclude_none=True).items())}")
            return 0
        from .api import run

        rep = run(recipe, args.output, args.overwrite, args.keep_failed)
        print(json.dumps({"output": args.output, "perplexity": rep.get("perplexity_by_dataset"),
                          "validation": rep.get("validation", {}).get("passed"),
                          "total_seconds": rep["total_seconds"]}, indent=1))
        if "validation" in rep and not rep["validation"]["passed"]:
            failures = "\n".join(f"  - {m}" for m in rep["validation"]["failures"])
            print(f"error: cross-runtime parity failed (see {args.output}/report.md):\n{failures}", file=sys.stderr)
            return 3
        return 0
    except (UserError, OSError) as exc:  # RecipeError, ModelLoadError, ExportError ...; an unwritable folder, a
        #                                   full disk, a file removed under us. Anything else is an internal error:
        #                                   its traceback shows (exit 1)
        if args.debug:
            traceback.print_exc()
        print(f"error: {_os_message(exc) if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        where = f"; {args.output} was not written" if args.command == "run" else ""
        what = "terminated (SIGTERM)" if isinstance(exc, interrupts.Terminated) else "interrupted"
        print(f"{what}{where}: no output folder was completed", file=sys.stderr)
        return 143 if isinstance(exc, interrupts.Terminated) else 130
    finally:
        restore()


def _os_message(exc: OSError) -> str:
    if exc.errno is None or exc.strerror is None:  # our own messages (OutputError, FileExistsError ...)
        return str(exc)
    where = f" {exc.filename}" if exc.filename else ""
    hint = {errno.ENOSPC: "free disk space or choose another --output",
            errno.EFBIG: "the file system refused a file this large: choose another --output",
            errno.EACCES: "choose a path you can write to", errno.EPERM: "choose a path you can write to",
            errno.EROFS: "the file system is read-only: choose another --output"}.get(exc.errno, "")
    return f"cannot access{where}: {exc.strerror}" + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
