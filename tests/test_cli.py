import json
import subprocess
import sys

import pytest

from .conftest import ROOT


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flatllm_export.cli", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("name", ["ref-llama", "ref-gqa"])
def test_eval_recipe_end_to_end(tmp_path, name):
    out = tmp_path / "run"
    res = cli("run", f"recipes/{name}-eval.yaml", "--output", str(out), "--set", "evaluation.max_windows=16")
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads((out / "report.json").read_text())
    assert 1 < rep["perplexity"]["dense"] < 200
    assert rep["stages"]["evaluate_dense"]["windows"] == 16 and rep["stages"]["load"]["peak_rss_mb"] > 0
    assert "## Perplexity" in (out / "report.md").read_text()
    assert not (tmp_path / "run.partial").exists()
    again = cli("run", f"recipes/{name}-eval.yaml", "--output", str(out))
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr


def test_failed_run_leaves_no_complete_looking_output(tmp_path):
    out = tmp_path / "run"
    short = tmp_path / "short.txt"
    short.write_text("Too short to evaluate.")
    res = cli("run", "recipes/ref-llama-eval.yaml", "--output", str(out), "--set", f"evaluation.dataset={short}")
    assert res.returncode == 2 and "fewer than seqlen=256" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def test_user_errors_are_named_internal_errors_show_their_traceback(monkeypatch, capsys):
    """A user error (here a ModelLoadError) prints one line and exits 2 (its traceback with --debug); anything else
    is an internal error: it is not dressed up as a user error, its traceback shows."""
    from flatllm_export import api, cli
    from flatllm_export.modeling.loading import ModelLoadError

    def user_error(*args, **kwargs):
        raise ModelLoadError("models/x: config.json is missing; give a Hugging Face model folder")

    def internal_error(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x576 and 512x576)")

    argv = ["run", str(ROOT / "recipes/ref-llama-eval.yaml"), "--output", "/nonexistent/never-written"]
    monkeypatch.setattr(api, "run", user_error)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: models/x: config.json is missing; give a Hugging Face model folder"
    assert cli.main(["--debug", *argv]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setattr(api, "run", internal_error)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(argv)
