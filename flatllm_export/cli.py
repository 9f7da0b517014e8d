"""flatllm-export: parse, call the API, print. No logic here."""

from __future__ import annotations

import argparse
import json
import sys

from .recipe import RecipeError, load_recipe


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe value, e.g. --set compression.ratio=0.5 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flatllm-export", description="Compress, quantize, export and validate "
                                 "Llama-family models with per-layer shapes.")
    sub = ap.add_subparsers(dest="command", required=True)
    _recipe_args(sub.add_parser("check", help="validate a recipe without running it"))
    p = sub.add_parser("run", help="run a recipe")
    _recipe_args(p)
    p.add_argument("--output", "-o", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "check":
            print(f"recipe {args.recipe} is valid: sections "
                  f"{', '.join(k for k, v in recipe.model_dump(exclude_none=True).items())}")
            return 0
        from .api import run

        rep = run(recipe, args.output, args.overwrite)
        print(json.dumps({"output": args.output, "perplexity": rep.get("perplexity"),
                          "total_seconds": rep["total_seconds"]}, indent=1))
        return 0
    except (RecipeError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
