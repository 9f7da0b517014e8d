"""Bad input a new or careless user gives: each refused with a message naming the problem and the fix, no
traceback, and no output folder that looks complete."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from flatllm_export import data
from flatllm_export.api import run
from flatllm_export.modeling import load_tokenizer
from flatllm_export.errors import UserError
from flatllm_export.preflight import preflight
from flatllm_export.recipe import RecipeError, load_recipe, parse_recipe

from .conftest import ROOT, ref_path, run_python


def cli(*args):
    return subprocess.run([sys.executable, "-m", "flatllm_export.cli", *args], capture_output=True, text=True, cwd=ROOT)


def eval_recipe(path, **evaluation):
    recipe = parse_recipe({"model": {"path": str(path)},
                           "evaluation": {"dataset": "shakespeare", "seqlen": 64, "max_windows": 1, **evaluation}})
    preflight(recipe)
    return recipe


def test_missing_onnx_extra_refuses_only_its_targets():
    out = run_python("""
import sys
sys.modules["onnx"] = sys.modules["onnxruntime"] = None  # as if the onnx extra were not installed
from flatllm_export.preflight import preflight
from flatllm_export.recipe import RecipeError, parse_recipe
preflight(parse_recipe({"model": {"path": "ref-llama"}, "export": {"targets": ["hf"]}}))
recipe = parse_recipe({"model": {"path": "ref-llama"}, "export": {"targets": ["hf", "onnx"]}})
try:
    preflight(recipe)
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
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
        run(eval_recipe(model), out)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_folder_without_weights_and_missing_shard(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ref_path("ref-llama"), model)
    (model / "model.safetensors").unlink()  # a folder with config and tokenizer but no weights: refused by the recipe
    with pytest.raises(RecipeError, match=r"model.path: no model.safetensors or model.safetensors.index.json in"):
        eval_recipe(model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="lists the shard model-00001-of-00002.safetensors, which is missing"):
        run(eval_recipe(model), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_windows_longer_than_the_context(tiny_model_dir):
    # the tiny model's max_position_embeddings is 512
    with pytest.raises(RecipeError, match=r"evaluation.seqlen 1024 is longer than the model's context of 512"):
        eval_recipe(tiny_model_dir, seqlen=1024)
    assert eval_recipe(tiny_model_dir, seqlen=1024, allow_beyond_context=True).evaluation.seqlen == 1024
    with pytest.raises(RecipeError, match=r"calibration.seqlen 2048 is longer than the model's context of 512"):
        preflight(parse_recipe({"model": {"path": str(tiny_model_dir)}, "calibration": {"seqlen": 2048},
                                "compression": {"ratio": 0.3}}))


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
    ("compression..ratio=0.5", "the key path 'compression..ratio' has an empty part"),
    ("=0.5", "the key path '' has an empty part"),
])
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(ROOT / "recipes" / "ref-llama-flatllm.yaml", [override])


def test_recipe_that_is_not_a_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text(yaml.safe_dump([{"model": {"path": "ref-llama"}}]))
    with pytest.raises(RecipeError, match="must be a YAML mapping of sections"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="must be a YAML mapping of sections"):
        load_recipe(bad, ["compression.ratio=0.5"])  # overrides do not walk into a list
    bad.write_text("just a sentence\n")
    with pytest.raises(RecipeError, match="must be a YAML mapping of sections"):
        load_recipe(bad)


# ---- the command line, in-process: each bad input refused with exit 2, a message naming it, no traceback (an
# exception escaping main() would fail the test), and no output folder left behind

def main_err(capsys, *args) -> tuple[int, str]:
    from flatllm_export.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "plays.txt"
    path.write_text(data.shakespeare_text("validation")[:20000])
    return path


def tiny_recipe(model, text, **sections) -> dict:
    raw = {"model": {"path": str(model)}, "evaluation": {"dataset": str(text), "seqlen": 32, "max_windows": 2}}
    return {**raw, **sections}


def write_recipe(folder, raw) -> str:
    path = folder / "recipe.yaml"
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return str(path)


def edited_model(tmp_path, tiny_model_dir, edit):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    edit(model)
    return model


RECIPE_CASES = {  # name -> (recipe edit, extra --set, message fragments)
    "ratio as a string": ({"compression": {"ratio": "0.3"}}, [], ["compression.ratio", "valid number", "'0.3'"]),
    "negative nsamples": ({"compression": {}, "calibration": {"nsamples": -4}}, [],
                          ["calibration.nsamples", "greater than or equal to 1", "-4"]),
    "boolean as a string": ({"compression": {"qk": "yes"}}, [], ["compression.qk", "valid boolean"]),
    "unknown method": ({"compression": {"method": "flat-llm"}}, [], ["compression.method", "'flatllm', 'flap' or "
                                                                      "'svd-llm'", "'flat-llm'"]),
    "unknown key": ({"compression": {"ratio": 0.3, "rato": 0.2}}, [], ["compression.rato", "unknown key"]),
    "unknown export target": ({"export": {"targets": ["hf", "tflite"]}}, [], ["export.targets", "'tflite'",
                                                                              "available"]),
    "repeated export target": ({"export": {"targets": ["hf", "hf"]}}, [], ["export.targets", "targets repeat"]),
    "gptq target without quantization": ({"export": {"targets": ["gptq"]}}, [], ["'gptq'", "no quantization section"]),
    "validation runtime without its export": ({"export": {"targets": ["hf"]}, "validation": {
        "runtimes": ["torch", "onnxruntime"]}}, [], ["validation.runtimes has 'onnxruntime'", "lacks 'onnx'"]),
    "validation without evaluation": ({"evaluation": None, "validation": {}}, [], ["needs an evaluation section"]),
    "removed validation key": ({"validation": {"max_logit_diff": 1e-3}}, [], ["validation", "were removed",
                                                                              "noise_k"]),
    "--set of a key that does not exist": ({}, ["compression.method_name=flap"],
                                           ["compression.method_name", "unknown key"]),
    "--set of a section that does not exist": ({}, ["quantisation.bits=4"], ["quantisation", "unknown key"]),
    "--set of a value as a section": ({}, ["evaluation.seqlen.max=3"], ["'seqlen' is a value, not a section"]),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_refused_by_check_and_run(case, capsys, tmp_path, tiny_model_dir, text_file):
    edit, overrides, needles = RECIPE_CASES[case]
    raw = {k: v for k, v in {**tiny_recipe(tiny_model_dir, text_file), **edit}.items() if v is not None}
    recipe = write_recipe(tmp_path, raw)
    sets = [a for o in overrides for a in ("--set", o)]
    for command in (["check", recipe], ["run", recipe, "--output", tmp_path / "out"]):
        rc, err = main_err(capsys, *command, *sets)
        assert rc == 2 and all(n in err for n in needles), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


MODEL_CASES = {  # a model folder edited by hand -> message fragments
    "config.json that is not JSON": (lambda m: (m / "config.json").write_text("{'model_type': llama,"),
                                     ["config.json is not valid JSON", "line 1"]),
    "config.json without model_type": (lambda m: (m / "config.json").write_text('{"hidden_size": 128}'),
                                       ["config.json has no model_type", "supported: llama, mistral"]),
    "unsupported model_type": (lambda m: (m / "config.json").write_text('{"model_type": "gpt2"}'),
                               ["has model_type 'gpt2', which is not supported"]),
    "tokenizer but no weights": (lambda m: (m / "model.safetensors").unlink(),
                                 ["model.path: no model.safetensors or model.safetensors.index.json in"]),
    "pickled weights only": (lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"),
                             ["found pickled ['pytorch_model.bin']", "convert them to safetensors"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_folder_refused_before_any_work(case, capsys, tmp_path, tiny_model_dir, text_file):
    edit, needles = MODEL_CASES[case]
    model = edited_model(tmp_path, tiny_model_dir, edit)
    recipe = write_recipe(tmp_path, tiny_recipe(model, text_file))
    rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
    assert rc == 2 and "model.path" in err and all(n in err for n in needles), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_output_folder_that_cannot_be_made(capsys, tmp_path, tiny_model_dir, text_file):
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, text_file))
    (tmp_path / "a-file").write_text("not a folder")
    rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "a-file" / "out")
    assert rc == 2 and f"cannot create the output folder {tmp_path}/a-file/out.partial: Not a directory" in err
    rc, err = main_err(capsys, "run", recipe, "--output", "/sys/flatllm-export-out")  # no one may write there
    assert rc == 2 and "cannot create the output folder /sys/flatllm-export-out.partial" in err, err
    assert "folder you can write to" in err and not os.path.exists("/sys/flatllm-export-out.partial")


def test_disk_full_during_export(capsys, monkeypatch, tmp_path, tiny_model_dir, text_file):
    import exporters.onnx as onnx_exporter

    def full_disk(proto, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # part of the file made it before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(onnx_exporter.onnx, "save", full_disk)
    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, text_file, export={"targets": ["hf", "onnx"]}))
    rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
    assert rc == 2 and f"cannot access {tmp_path}/out.partial/onnx/model.onnx: No space left on device" in err
    assert "free disk space" in err and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_file_too_large_for_the_file_system(capsys, tmp_path, tiny_model_dir, text_file):
    """A real failed write (RLIMIT_FSIZE: writes past 1 MB fail with EFBIG) inside safetensors, which reports it as
    its own error type: said as a write failure naming the folder."""
    import resource
    import signal

    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, text_file, export={"targets": ["hf"]}))
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
    try:
        rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert rc == 2 and f"could not write {tmp_path}/out.partial/hf" in err and "File too large" in err, err
    assert "free disk space" in err and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_partial_folder_of_a_live_run_is_not_taken(capsys, tmp_path, tiny_model_dir, text_file):
    import fcntl

    recipe = write_recipe(tmp_path, tiny_recipe(tiny_model_dir, text_file))
    partial = tmp_path / "out.partial"
    partial.mkdir()
    with open(partial / ".lock", "a") as held:  # as a run that is still working holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
        assert rc == 2 and f"{partial} is being written by another run that is still working" in err
        assert partial.is_dir()
    # once that run is gone (the kernel drops its lock), the folder is stale: removed, said, and the run succeeds
    (partial / "report.json").write_text("{}")
    rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
    assert rc == 0 and f"note: removed {partial}, left by an earlier run that did not finish" in err
    assert (tmp_path / "out" / "report.json").is_file() and not partial.exists()
    assert not (tmp_path / "out" / ".lock").exists()


# ---- finished folders edited by hand, cut, or written by another version: validate / generate name the file and key

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, text_file):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(parse_recipe(tiny_recipe(tiny_model_dir, text_file, export={"targets": ["hf", "onnx"]},
                                 validation={"runtimes": ["torch", "onnxruntime"], "generate_tokens": 4})), out)
    return out


def _meta_edit(change):
    def edit(run_dir):
        path = run_dir / "onnx" / "flatllm_onnx.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    return edit


def _layer1(key, value):
    return _meta_edit(lambda m: m["layers"][1].__setitem__(key, value))


META = "onnx/flatllm_onnx.json"
FOLDER_CASES = {  # name -> (edit of a finished run folder, commands, message fragments ({run} = the folder))
    "metadata that is not JSON": (lambda d: (d / META).write_text('{"format": "flatllm-onnx/2",'),
                                  ("validate", "generate"), [f"{{run}}/{META} is not valid JSON", "re-export"]),
    "metadata key missing": (_meta_edit(lambda m: m.pop("layers")), ("validate", "generate"),
                             [f"{{run}}/{META}: key 'layers' is missing"]),
    "metadata value of the wrong type": (_meta_edit(lambda m: m.__setitem__("vocab_size", "4096")),
                                         ("validate", "generate"),
                                         [f"{{run}}/{META}: key 'vocab_size' must be a positive integer, got '4096'"]),
    "metadata layer entry broken": (_layer1("value_dim", None), ("generate",),
                                    [f"{{run}}/{META}: key 'layers[1].value_dim' must be a positive integer"]),
    "metadata cache shape edited": (_layer1("key_dim", 32), ("validate", "generate"),
                                    ["flatllm_onnx.json gives past_key_values.1.key dim 3 = 32, the graph declares "
                                     "16: metadata and graph disagree"]),
    "metadata layer count edited": (_meta_edit(lambda m: m["layers"].pop()), ("generate",),
                                    ["key 'layers' lists 2 layers but 'num_hidden_layers' is 3"]),
    "metadata of another version": (_meta_edit(lambda m: m.__setitem__("format", "flatllm-onnx/0")), ("validate",),
                                    ["has format 'flatllm-onnx/0'", "reads 'flatllm-onnx/2'", "another version"]),
    "metadata without a format": (_meta_edit(lambda m: m.pop("format")), ("generate",),
                                  ["has format None", "another version"]),
    "graph file cut short": (lambda d: (d / "onnx/model.onnx").write_bytes((d / "onnx/model.onnx").read_bytes()[:5000]),
                             ("validate", "generate"), ["onnxruntime cannot load {run}/onnx/model.onnx", "re-export"]),
    "graph file missing": (lambda d: (d / "onnx/model.onnx").unlink(), ("generate",),
                           ["key 'filename' names model.onnx, which is missing"]),
    "report of another version": (lambda d: (d / "report.json").write_text('{"format": "flatllm-export-run/2"}'),
                                  ("validate",), ["report.json has format 'flatllm-export-run/2'", "another version"]),
    "report that is not JSON": (lambda d: (d / "report.json").write_text("{"), ("validate",),
                                ["report.json is not valid JSON"]),
    "no report (not a run folder)": (lambda d: (d / "report.json").unlink(), ("validate",),
                                     ["{run} has no report.json: it is not the output folder of a finished"]),
    "recipe of another version": (lambda d: (d / "recipe.yaml").write_text(
        (d / "recipe.yaml").read_text() + "pruning: {amount: 0.5}\n"), ("validate",),
        ["pruning: unknown key", "written by another version of flatllm-export"]),
    "folder with no export": (lambda d: [shutil.rmtree(d / s) for s in ("onnx", "hf")], ("generate",),
                              ["holds no export (looked for flatllm_onnx.json or config.json in it and in onnx/, "
                               "gptq/, hf/)"]),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_edited_or_foreign_folder_refused_by_name(case, capsys, tmp_path, finished_run):
    edit, commands, needles = FOLDER_CASES[case]
    folder = tmp_path / "run"
    shutil.copytree(finished_run, folder)
    edit(folder)
    for command in commands:
        args = ["generate", folder, "--prompt", "To be", "--max-new-tokens", "2"] if command == "generate" else \
            ["validate", folder]
        rc, err = main_err(capsys, *args)
        assert rc == 2 and all(n.format(run=folder) in err for n in needles), f"{command}: {err}"
    assert not (folder / "validation.json").exists()


def test_unfinished_or_missing_folder_is_not_mistaken(capsys, tmp_path, finished_run):
    partial = tmp_path / "run.partial"  # what a killed run leaves: may hold every file, some cut short
    shutil.copytree(finished_run, partial)
    for args in (["validate", partial], ["generate", partial / "onnx", "--prompt", "To be"]):
        rc, err = main_err(capsys, *args)
        assert rc == 2 and f"{partial} is the unfinished output of a run that did not complete" in err, err
    rc, err = main_err(capsys, "validate", tmp_path / "nowhere")
    assert rc == 2 and "nowhere is not a folder" in err
    rc, err = main_err(capsys, "validate", finished_run)  # the unedited folder passes
    assert rc == 0, err


def test_overwrite_replaces_only_an_earlier_output(capsys, monkeypatch, tmp_path, tiny_model_dir, text_file):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipe = write_recipe(tmp_path, tiny_recipe(model, text_file))
    before = sorted(p.name for p in model.iterdir())
    rc, err = main_err(capsys, "run", recipe, "--output", model, "--overwrite")  # the input model itself
    assert rc == 2 and f"--overwrite replaces only an earlier output of this command, and {model} is not one" in err
    monkeypatch.chdir(tmp_path)
    rc, err = main_err(capsys, "run", recipe, "--output", ".", "--overwrite")  # the current folder
    assert rc == 2 and f"{tmp_path} is not one (it has no report.json)" in err
    assert sorted(p.name for p in model.iterdir()) == before and not (tmp_path / "model.old").exists()
    rc, err = main_err(capsys, "run", recipe, "--output", "out")
    assert rc == 0 and (tmp_path / "out" / "report.json").is_file()
    rc, err = main_err(capsys, "run", recipe, "--output", "out", "--overwrite")  # an earlier run: replaced
    assert rc == 0 and not (tmp_path / "out.old").exists() and not (tmp_path / "out.partial").exists()


def test_recipe_file_that_is_a_folder_or_binary(capsys, tmp_path):
    rc, err = main_err(capsys, "check", tmp_path)
    assert rc == 2 and f"recipe file {tmp_path} is a folder: give a .yaml file" in err
    (tmp_path / "r.yaml").write_bytes(b"\xff\xfe\x00model")
    rc, err = main_err(capsys, "check", tmp_path / "r.yaml")
    assert rc == 2 and "is not a UTF-8 text file (invalid start byte at byte 0)" in err


def test_empty_prompt(capsys, finished_run):
    for runtime in ("onnxruntime", "torch"):
        rc, err = main_err(capsys, "generate", finished_run, "--prompt", "", "--runtime", runtime)
        assert rc == 2 and "--prompt '' gives no tokens" in err, err
