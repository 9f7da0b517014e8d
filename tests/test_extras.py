"""Every extra installs what its feature needs: the feature runs in a fresh process that sees only the standard
library, this project and the distributions that ``flatllm-export[EXTRA]`` requires (the base dependencies, the
extra's, and theirs, read from the installed metadata), linked into a folder of their own; nothing else is on its
path. A package that the feature imports and the extra forgets is then missing, as in a fresh venv."""

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import ROOT, ref_path

FEATURES = {  # extra -> code exercising its feature (offline)
    "eval": f"""
from flatllm_export import lmeval
from flatllm_export.modeling import load_model, load_tokenizer
from flatllm_export.recipe import EvaluationSection
ev = EvaluationSection(tasks=[{{"name": "shakespeare_nextline", "limit": 4}}])
model, tok = load_model({str(ref_path("ref-llama"))!r}), load_tokenizer({str(ref_path("ref-llama"))!r})
res = lmeval.evaluate_tasks(lmeval.hf_lm(model, tok, 2), ev)
assert res["shakespeare_nextline"]["items"] == 4, res
print("ok")
""",
    "onnx": f"""
import tempfile, pathlib
from exporters import ExportContext, export
from flatllm_export.modeling import load_model
model = load_model({str(ref_path("ref-llama"))!r})
out = pathlib.Path(tempfile.mkdtemp()) / "onnx"
rep = export("onnx", model, None, out, ExportContext())
assert rep["max_abs_logit_diff"] <= rep["tolerance"], rep
print("ok")
""",
    "llamacpp": f"""
import tempfile, pathlib
from exporters import ExportContext, export
from flatllm_export.modeling import load_model, load_tokenizer
model, tok = load_model({str(ref_path("ref-llama"))!r}), load_tokenizer({str(ref_path("ref-llama"))!r})
out = pathlib.Path(tempfile.mkdtemp()) / "gguf"
rep = export("gguf", model, tok, out, ExportContext())  # written, loaded in llama.cpp and judged
assert rep["max_abs_logit_diff"] <= rep["tolerance"], rep
print("ok")
""",
}


def closure(extra: str) -> set[str]:
    """The installed distributions ``flatllm-export[extra]`` requires, transitively (canonical names)."""
    seen, todo = set(), [("flatllm-export", extra)]
    while todo:
        name, ex = todo.pop()
        key = (canonicalize_name(name), ex)
        if key in seen:
            continue
        seen.add(key)
        for line in md.requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ex or ""}):
                continue
            try:
                md.distribution(req.name)
            except md.PackageNotFoundError:
                continue  # an optional requirement that is not installed here is not needed by the feature
            todo += [(req.name, None)] + [(req.name, e) for e in req.extras]
    return {name for name, _ in seen} - {"flatllm-export"}


def link_farm(dists: set[str], folder: Path) -> None:
    """Every top-level entry (packages, modules, .libs, .dist-info) of ``dists`` linked into ``folder``."""
    for name in dists:
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            src, dst = Path(dist.locate_file(top)), folder / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)


@pytest.mark.parametrize("extra", list(FEATURES))
def test_each_extra_alone_runs_its_feature(tmp_path, extra):
    dists = closure(extra)
    assert "torch" in dists and ("accelerate" in dists or extra != "eval")  # lm-eval's HFLM imports accelerate
    link_farm(dists, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-S", "-c", FEATURES[extra]], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_the_farm_hides_what_the_extra_does_not_require(tmp_path):
    """The check can fail: without the eval extra's own requirements lm-eval cannot even be imported."""
    link_farm(closure("onnx"), tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]), PYTHONNOUSERSITE="1")
    res = subprocess.run([sys.executable, "-S", "-c", "import lm_eval"], capture_output=True, text=True, env=env)
    assert res.returncode != 0 and "No module named 'lm_eval'" in res.stderr, res.stderr[-2000:]
