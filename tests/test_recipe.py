import subprocess
import sys

import pytest
import yaml

from flatllm_export.preflight import preflight
from flatllm_export.recipe import RecipeError, apply_overrides, load_recipe, parse_recipe

from .conftest import ROOT

GOOD = {"model": {"path": "ref-llama"}, "evaluation": {"seqlen": 128}}


def bad(raw, *needles):
    with pytest.raises(RecipeError) as err:
        parse_recipe(raw, "r.yaml")
    for n in needles:
        assert n in str(err.value), str(err.value)
    return str(err.value)


def test_good_recipe_parses_with_defaults():
    r = parse_recipe(GOOD)
    assert r.calibration.nsamples == 128 and r.evaluation.seqlen == 128 and r.compression is None


def test_unknown_top_level_key():
    bad({**GOOD, "compresion": {"ratio": 0.3}}, "compresion", "unknown key")


def test_unknown_nested_key_names_path():
    bad({**GOOD, "compression": {"ratio": 0.3, "rato": 0.2}}, "compression.rato", "unknown key")


def test_wrong_type():
    bad({**GOOD, "calibration": {"nsamples": "many"}}, "calibration.nsamples", "'many'")


def test_out_of_range_ratio():
    bad({**GOOD, "compression": {"ratio": 1.5}}, "compression.ratio", "less than or equal to 0.9", "1.5")


def test_bad_enum_dtype():
    bad({"model": {"path": "ref-llama", "dtype": "int8"}}, "model.dtype", "float32", "int8")


def test_missing_model_section():
    bad({"evaluation": {}}, "model", "required key is missing")


def test_missing_model_folder():
    with pytest.raises(RecipeError, match="model.path: './no/such/model' is not an existing model folder"):
        preflight(parse_recipe({"model": {"path": "./no/such/model"}}))


def test_parsing_reads_nothing_and_preflight_names_every_problem(tmp_path, monkeypatch):
    """A recipe parses without touching the file system, lm-eval or the installed packages; preflight (what
    `check` and `run` do first) then reports each problem of this machine with its key path."""
    import builtins
    import importlib.util
    import os
    import tempfile

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    raw = {"model": {"path": str(tmp_path / "no-model"), "stream_dir": str(blocker / "sub")},
           "calibration": {"spill_dir": str(blocker / "spill")}, "compression": {"ratio": 0.3},
           "evaluation": {"seqlen": 64, "tasks": ["no_such_task"], "task_paths": [str(tmp_path / "no-tasks")]},
           "export": {"targets": ["hf", "onnx"]}}

    def refuse(*args, **kwargs):
        raise AssertionError(f"parsing did I/O: {args[:1]}")

    with monkeypatch.context() as m:
        for owner, name in ((builtins, "open"), (os, "stat"), (os, "scandir"), (os.path, "isdir"),
                            (tempfile, "TemporaryDirectory"), (importlib.util, "find_spec")):
            m.setattr(owner, name, refuse)
        recipe = parse_recipe(raw)
    assert recipe.model.stream_dir == str(blocker / "sub")
    with pytest.raises(RecipeError) as err:
        preflight(recipe, "r.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == "recipe r.yaml cannot run here:"
    for key, needle in (("model.path", "is not an existing model folder"), ("model.stream_dir", "is a file"),
                        ("calibration.spill_dir", "is a file"), ("evaluation.task_paths", "not a folder")):
        assert any(line.startswith(f"  - {key}: ") and needle in line for line in lines), (key, lines)


def test_missing_dataset_file():
    refused({**GOOD, "calibration": {"dataset": "/no/such/*.txt"}, "quantization": {"method": "gptq"}},
            "calibration.dataset", "neither a known dataset")


def test_unknown_export_target():
    bad({**GOOD, "export": {"targets": ["tflite"]}}, "export.targets", "tflite", "available")


def test_bad_group_size():
    bad({**GOOD, "quantization": {"group_size": 100}}, "quantization.group_size", "power of two")


def test_bad_device():
    bad({"model": {"path": "ref-llama", "device": "tpu"}}, "model.device", "cpu, cuda or cuda:N")


def test_method_specific_keys_are_checked():
    bad({**GOOD, "compression": {"method": "flap", "allocation": "uniform"}}, "compression", "'allocation'",
        "belong to method 'flatllm'")


def test_flatllm_variant_and_option_keys():
    from flatllm_export.compress import flatllm_options
    from flatllm_export.compress.flatllm import VARIANTS

    r = parse_recipe({**GOOD, "compression": {"method": "flatllm", "variant": "paper", "vo_scale": 1.5}})
    opt = flatllm_options(r.compression)
    assert opt.vo_scale == 1.5 and opt.mlp_select == VARIANTS["paper"].mlp_select
    assert flatllm_options(parse_recipe({**GOOD, "compression": {"method": "flatllm"}}).compression) == VARIANTS["ablation"]
    bad({**GOOD, "compression": {"method": "flatllm", "variant": "best"}}, "compression.variant", "'paper'")
    bad({**GOOD, "compression": {"method": "flatllm", "variant": "paper", "vo_basis": "weighted"}},
        "compression.vo_basis", "o_proj: lstsq")
    bad({**GOOD, "compression": {"method": "flap", "mlp_select": "greedy"}}, "'mlp_select'", "belong to method 'flatllm'")


def test_onnx_int4_constraints_are_checked_up_front():
    bad({**GOOD, "quantization": {"bits": 3}, "export": {"targets": ["onnx"]}}, "MatMulNBits", "bits=3")


def test_a_dumped_recipe_loads_back(tmp_path):
    from flatllm_export.recipe import dump_recipe

    r = parse_recipe({**GOOD, "compression": {"method": "flap", "ratio": 0.2}})
    (tmp_path / "r.yaml").write_text(dump_recipe(r))
    assert load_recipe(tmp_path / "r.yaml") == r


def test_several_errors_reported_together():
    msg = bad({"model": {"path": "ref-llama", "dtype": "x"}, "compression": {"ratio": -1}}, "model.dtype",
              "compression.ratio")
    assert msg.count("\n  - ") == 2


def test_overrides_set_nested_values_and_reject_bad_syntax():
    raw = apply_overrides(GOOD, ["compression.ratio=0.5", "evaluation.max_windows=3"])
    assert raw["compression"]["ratio"] == 0.5 and raw["evaluation"]["max_windows"] == 3
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        apply_overrides(GOOD, ["compression.ratio"])


def test_invalid_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {path: ref-llama\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")):
        load_recipe(path)


def test_cli_check_reports_key_path_and_exit_code(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**GOOD, "compression": {"ratio": 3}}))
    res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "check", str(p)], capture_output=True, text=True)
    assert res.returncode == 2 and "compression.ratio" in res.stderr and "Traceback" not in res.stderr


def test_onnxruntime_genai_runtime_needs_an_export_it_can_hold():
    val = {"runtimes": ["torch", "onnxruntime-genai"]}
    bad({**GOOD, "validation": val}, "onnxruntime-genai", "neither 'genai' nor 'onnx'")
    bad({**GOOD, "compression": {"method": "flatllm"}, "export": {"targets": ["onnx"], "attention": "standard"},
         "validation": val}, "onnxruntime-genai", "value cache", "add export target 'genai'")
    bad({**GOOD, "export": {"targets": ["hf"], "attention": "gqa"}}, "export.attention", "no 'onnx'")
    for method, targets in (("flap", ["onnx"]), ("flatllm", ["genai"]), ("flatllm", ["onnx"])):
        ok = parse_recipe({**GOOD, "compression": {"method": method}, "export": {"targets": targets},
                           "validation": val})
        assert ok.validation.runtimes == ["torch", "onnxruntime-genai"]


def test_streaming_is_the_default_unless_tasks_need_the_model_in_memory():
    assert parse_recipe(GOOD).streams()
    assert not parse_recipe({**GOOD, "model": {"path": "ref-llama", "stream": False}}).streams()
    tasks = {**GOOD, "evaluation": {"seqlen": 128, "tasks": ["shakespeare_nextline"]}}
    assert not parse_recipe(tasks).streams()
    bad({**tasks, "model": {"path": "ref-llama", "stream": True}}, "evaluation.tasks", "model.stream: false")


def test_the_70b_recipe_streams_its_layers():
    """Llama-2-70B in bfloat16 is ~138 GB: its recipe streams the decoder (one layer on the GPU at a time)."""
    recipe = load_recipe(ROOT / "recipes" / "llama-2-70b-flatllm.yaml")
    assert recipe.streams() and recipe.model.device == "cuda" and not recipe.evaluation.tasks


def test_general_is_the_default_and_evaluation_takes_a_list():
    r = parse_recipe({"model": {"path": "ref-llama"}, "evaluation": {}})
    assert r.calibration.dataset == "general" and r.evaluation.datasets == ["general"]
    r = parse_recipe({**GOOD, "evaluation": {"dataset": ["general", "shakespeare"]}})
    assert r.evaluation.datasets == ["general", "shakespeare"] and r.evaluation.dataset == ["general", "shakespeare"]


def refused(raw, *needles):
    """Parsed, then refused by preflight (what check runs), each needle in the message."""
    with pytest.raises(RecipeError) as err:
        preflight(parse_recipe(raw, "r.yaml"), "r.yaml")
    for n in needles:
        assert n in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize("section", ["calibration", "evaluation"])
def test_unknown_dataset_is_refused_listing_what_exists(section):
    raw = {**GOOD, section: {"dataset": "wikitext3"}, "compression": {"method": "flatllm"}}
    msg = refused(raw, f"{section}.dataset", "'wikitext3'", "neither a known")
    for name in ("general", "general-technical", "shakespeare", "wikitext2", "local corpus folder"):
        assert name in msg


def test_bad_evaluation_lists_are_refused():
    msg = bad({**GOOD, "evaluation": {"dataset": []}}, "evaluation.dataset", "empty list", "general, ")
    assert "shakespeare" in msg
    refused({**GOOD, "evaluation": {"dataset": ["general", "nope"]}}, "evaluation.dataset", "'nope'",
            "neither a known")
    bad({**GOOD, "evaluation": {"dataset": ["general", "general"]}}, "evaluation.dataset", "repeats")
    refused({**GOOD, "evaluation": {"dataset": "general"}, "validation": {"datasets": ["nope"], "runtimes": ["torch"]}},
            "validation.datasets", "'nope'")


def test_a_split_missing_from_a_local_corpus_is_refused(tmp_path):
    (tmp_path / "train.txt").write_text("some text")
    (tmp_path / "validation.txt").write_text("more text")
    refused({**GOOD, "evaluation": {"dataset": ["general", str(tmp_path)]}}, "evaluation.dataset",
            "no test split (test.txt); it has: train, validation")
    assert preflight(parse_recipe({**GOOD, "evaluation": {"dataset": str(tmp_path), "split": "validation"}})) == {}
    only_test = tmp_path / "only-test"
    only_test.mkdir()
    (only_test / "test.txt").write_text("text")
    refused({**GOOD, "calibration": {"dataset": str(only_test)}, "quantization": {"method": "gptq"}},
            "calibration.dataset", "no train split (train.txt); it has: test")
    refused({**GOOD, "evaluation": {"dataset": "shakespeare", "split": "validation"},
             "validation": {"datasets": [str(only_test)], "runtimes": ["torch"]}}, "no validation split")


def test_check_refuses_bad_datasets_without_a_traceback(tmp_path):
    for override in ("evaluation.dataset=[]", "evaluation.dataset=[general, genral]", "calibration.dataset=genral",
                     f"evaluation.dataset={tmp_path}"):
        res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "check", "recipes/ref-llama-flatllm.yaml",
                              "--set", override], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 2 and "Traceback" not in res.stderr and "dataset" in res.stderr, (override, res.stderr)
        assert "general" in res.stderr or "train.txt" in res.stderr
