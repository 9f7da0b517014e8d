"""Bad input a new or careless user gives: each refused with a message naming the problem and the fix, no
traceback, and no output folder that looks complete."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import yaml

from flatllm_export import data
from flatllm_export.api import run
from flatllm_export.modeling import load_tokenizer
from flatllm_export.modeling.loading import ModelLoadError
from flatllm_export.recipe import RecipeError, load_recipe, parse_recipe

from .conftest import ROOT, ref_path, run_python


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flatllm_export.cli", *args], capture_output=True, text=True, cwd=ROOT)


def eval_recipe(path, **evaluation):
    return parse_recipe({"model": {"path": str(path)}, "evaluation": {"seqlen": 64, "max_windows": 1, **evaluation}})


def test_missing_onnx_extra_refuses_only_its_targets():
    out = run_python("""
import sys
sys.modules["onnx"] = sys.modules["onnxruntime"] = None  # as if the onnx extra were not installed
from flatllm_export.recipe import RecipeError, parse_recipe
parse_recipe({"model": {"path": "ref-llama"}, "export": {"targets": ["hf"]}})
try:
    parse_recipe({"model": {"path": "ref-llama"}, "export": {"targets": ["hf", "onnx"]}})
except RecipeError as exc:
    print(exc)
""")
    assert "export.targets" in out and "pip install 'flatllm-export[onnx]'" in out


def test_corrupt_weights_refused_and_nothing_left(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ref_path("ref-llama"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        run(eval_recipe(model), out)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_folder_without_weights_and_missing_shard(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ref_path("ref-llama"), model)
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        run(eval_recipe(model), tmp_path / "out")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="lists the shard model-00001-of-00002.safetensors, which is missing"):
        run(eval_recipe(model), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_windows_longer_than_the_context(tiny_model_dir):
    # the tiny model's max_position_embeddings is 512
    with pytest.raises(RecipeError, match=r"evaluation.seqlen 1024 is longer than the model's context of 512"):
        eval_recipe(tiny_model_dir, seqlen=1024)
    assert eval_recipe(tiny_model_dir, seqlen=1024, allow_beyond_context=True).evaluation.seqlen == 1024
    with pytest.raises(RecipeError, match=r"calibration.seqlen 2048 is longer than the model's context of 512"):
        parse_recipe({"model": {"path": str(tiny_model_dir)}, "calibration": {"seqlen": 2048},
                      "compression": {"ratio": 0.3}})


def test_unused_calibration_is_said():
    recipe = parse_recipe({"model": {"path": "ref-llama"}, "calibration": {"nsamples": 64}})
    assert any("compresses and quantizes nothing" in w for w in recipe.warnings())
    assert parse_recipe({"model": {"path": "ref-llama"}, "calibration": {}, "compression": {}}).warnings() == []
    res = cli("check", "recipes/ref-llama-eval.yaml", "--set", "calibration.nsamples=4")
    assert res.returncode == 0 and "warning: the calibration section is used by no stage" in res.stderr


def test_failed_run_kept_only_when_asked(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to evaluate.")
    recipe = eval_recipe("ref-llama", dataset=str(short))
    with pytest.raises(ValueError, match="pass --keep-failed") as err:
        run(recipe, tmp_path / "a")
    assert "fewer than seqlen=64" in str(err.value) and not (tmp_path / "a.partial").exists()
    with pytest.raises(ValueError, match=r"kept in .*a\.partial for inspection"):
        run(recipe, tmp_path / "a", keep_failed=True)
    assert (tmp_path / "a.partial" / "recipe.yaml").exists() and not (tmp_path / "a").exists()
    run(eval_recipe("ref-llama"), tmp_path / "a")  # the next run with the same output succeeds
    assert (tmp_path / "a" / "report.json").exists() and not (tmp_path / "a.partial").exists()


def test_tokenizing_a_corpus_does_not_warn_about_length(caplog):
    tok = load_tokenizer("ref-llama")
    limit = tok.model_max_length = 128
    with caplog.at_level(logging.WARNING):
        ids = data.tokenize(tok, data.shakespeare_text("validation")[:20000])
    assert ids.numel() > 1000 and tok.model_max_length == limit
    assert "Token indices sequence length" not in caplog.text


@pytest.mark.parametrize("override, message", [
    ("compression.ratio=abc", "compression.ratio: Input should be a valid number"),
    ("compression.ratio=1.5", "compression.ratio: Input should be less than or equal to 0.9"),
    ("export.targets=onnx", "export.targets: Input should be a valid list"),
    ("model=ref-llama", "model: Input should be a valid dictionary"),
    ("ratio", "must look like KEY.PATH=VALUE"),
    ("model.path.x=1", "'path' is a value, not a section"),
])
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes" / "ref-llama-flatllm.yaml", [override])


def test_recipe_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text(yaml.safe_dump([{"model": {"path": "ref-llama"}}]))
    with pytest.raises(RecipeError, match="must be a YAML mapping of sections"):
        load_recipe(bad)
