"""Sizes of the bundled datasets (documents, characters, SmolLM2 tokens, evaluation windows of 512 tokens) per kind
and split: the table of docs/data.md, rewritten between its size markers (and docs/corpus_sizes.json).

    python scripts/corpus_sizes.py            # SmolLM2-135M's tokenizer (the smollm2-135m short name)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatllm_export import corpus, data  # noqa: E402
from flatllm_export.modeling import load_tokenizer  # noqa: E402

DOC = ROOT / "docs" / "data.md"
BEGIN, END = "<!-- sizes: written by scripts/corpus_sizes.py -->", "<!-- end of sizes -->"
WINDOW = 512


def rows(tokenizer) -> list[dict]:
    out = []
    for name in ("general", *(f"general-{k}" for k in corpus.KINDS), "shakespeare"):
        kinds = data.general_kinds(name)
        for split in data.SPLITS:
            text = data.load_text(name, split)
            tokens = int(data.tokenize(tokenizer, text).numel())
            docs = (len(corpus.split_documents(kinds, split)) if kinds else len(data.shakespeare_split(split)))
            out.append({"dataset": name, "split": split, "documents": docs, "characters": len(text),
                        "tokens": tokens, f"windows of {WINDOW}": tokens // WINDOW})
    return out


def markdown(table: list[dict], model: str) -> str:
    cols = list(table[0])
    lines = [f"Tokens counted with {model}'s tokenizer (no special tokens).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |"
              for r in table]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="whose tokenizer counts the tokens")
    args = ap.parse_args()
    table = rows(load_tokenizer(args.model))
    md = markdown(table, args.model)
    (ROOT / "docs" / "corpus_sizes.json").write_text(json.dumps(table, indent=1) + "\n")
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the markers {BEGIN} ... {END}")
    DOC.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{md}\n{END}", doc,
                          flags=re.S))
    print(md)


if __name__ == "__main__":
    main()
