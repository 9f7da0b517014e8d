"""Local lm-eval tasks (read offline through lm-eval's own ``dataset_path: json`` mechanism), and the generator of
``shakespeare_nextline``: a few lines of a speech from a held-out play, choose the true next line among 4 (the
3 distractors are lines of similar length from other speeches of the same play). Chance is 25%.

Regenerate: python -m flatllm_export.tasks.nextline OUT_DIR --name NAME --items N [--split test] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from .. import data


CONTEXT_LINES = 4

TASK_YAML = """\
# {name}: {items} next-line questions from the {split} plays ({plays}); written by python -m flatllm_export.tasks.nextline
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {name}.jsonl}}  # relative to this file (flatllm_export.lmeval resolves it)
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""


def _speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) blocks: a blank-line-separated block whose first line is an upper-case speaker tag."""
    out = []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.splitlines() if ln.strip()]
        if len(lines) > 1 and lines[0].isupper() and len(lines[0]) < 40:
            out.append((lines[0], lines[1:]))
    return out


def nextline_items(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` questions, spread evenly over the plays of ``split``, in shuffled order: {context, choices, label,
    play}."""
    rng = random.Random(seed)
    plays = data.shakespeare_split(split)
    files = data.shakespeare_plays()
    items = []
    for p, play in enumerate(plays):
        speeches = _speeches(data.strip_markdown(files[play].read_text(encoding="utf-8")))
        pool = [(s, i) for s, (_, lines) in enumerate(speeches) for i in range(2, len(lines))
                if 20 <= len(lines[i]) <= 80]
        want = n // len(plays) + (p < n % len(plays))
        for s, i in rng.sample(pool, min(want * 3, len(pool))):
            if sum(it["play"] == play for it in items) == want:
                break
            speaker, lines = speeches[s]
            answer = lines[i]
            similar = [ln for t, (_, other) in enumerate(speeches) if t != s for ln in other
                       if 0.7 * len(answer) <= len(ln) <= 1.3 * len(answer) and ln != answer]
            if len(set(similar)) < 3:
                continue
            choices = rng.sample(sorted(set(similar)), 3) + [answer]
            rng.shuffle(choices)
            context = "\n".join([speaker] + lines[max(0, i - CONTEXT_LINES) : i]) + "\n"
            items.append({"context": context, "choices": choices, "label": choices.index(answer), "play": play})
    rng.shuffle(items)  # plays interleaved: a task limit (the first N items) still spans every play
    return items


def write_task(out_dir: str | Path, name: str, items: int, split: str = "test", seed: int = 0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = nextline_items(split, items, seed)
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plays = ", ".join(data.shakespeare_split(split))
    (out / f"{name}.yaml").write_text(TASK_YAML.format(name=name, items=len(rows), split=split, plays=plays))
    return out / f"{name}.yaml"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--name", default="shakespeare_nextline")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--split", default="test", choices=data.SPLITS)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(write_task(a.out_dir, a.name, a.items, a.split, a.seed))
