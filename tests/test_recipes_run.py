"""Every recipe in recipes/ that fits this machine runs (with fewer samples and windows) end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT

FAST = ["--set", "calibration.nsamples=8", "--set", "evaluation.max_windows=4"]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("ref-*.yaml")
                 if p.name not in ("ref-gqa-full.yaml", "ref-llama-eval.yaml", "ref-gqa-eval.yaml",
                                "ref-llama-tasks.yaml"))  # run elsewhere (test_lmeval.py)


@pytest.mark.parametrize("recipe", RECIPES)
def test_reference_recipe_runs(tmp_path, recipe):
    out = tmp_path / "out"
    extra = ["--set", "validation.generate_tokens=16"] if "validation" in (ROOT / "recipes" / recipe).read_text() else []
    res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "run", f"recipes/{recipe}", "--output", str(out),
                          *FAST, *extra], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert "compressed" in rep["perplexity"] and abs(rep["compression"]["achieved_ratio"] - 0.3) < 0.08
    assert rep.get("validation", {"passed": True})["passed"]
    for target in rep["recipe"]["export"]["targets"]:
        assert (out / target).is_dir()


REAL = sorted(p.name for p in (ROOT / "recipes").glob("smollm2-135m-*.yaml"))


@pytest.mark.parametrize("recipe", REAL)
def test_real_model_recipes_calibrate_on_general_and_score_a_kind_kept_out(recipe):
    """The real model's recipes calibrate on the general corpus and are scored on its test split and on
    Shakespeare, the kind of text kept out of it (docs/data.md)."""
    raw = yaml.safe_load((ROOT / "recipes" / recipe).read_text())
    assert raw.get("calibration", {"dataset": "general"})["dataset"] == "general"
    assert raw["evaluation"]["dataset"] == ["general", "shakespeare"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", REAL)
def test_real_model_recipe_runs(tmp_path, recipe):
    """The real-model recipes end to end (minutes each on 2 cores): `python -m pytest -m slow`."""
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "run", f"recipes/{recipe}", "--output", str(out),
                          "--set", "evaluation.max_windows=4"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["layers"] == 30 and rep.get("validation", {"passed": True})["passed"]
    assert list(rep["perplexity_by_dataset"]) == ["general", "shakespeare"]
    if "compression" in rep:
        assert abs(rep["compression"]["achieved_ratio"] - 0.3) < 0.03
        assert rep["perplexity"]["compressed"] < 3 * rep["perplexity"]["dense"]
