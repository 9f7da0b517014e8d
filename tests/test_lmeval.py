"""evaluation.tasks: lm-eval task accuracy after each stage and across runtimes, offline, on local task files
(tests/lmeval_tasks/nextline_mini: 24 next-line questions; flatllm_export/tasks/shakespeare_nextline: 300)."""

import json
import subprocess
import sys

import pytest

from flatllm_export import lmeval
from flatllm_export.preflight import preflight
from flatllm_export.recipe import RecipeError, parse_recipe
from flatllm_export.tasks import TASKS_DIR
from flatllm_export.tasks.nextline import nextline_items

from .conftest import ROOT

MINI = str(ROOT / "tests" / "lmeval_tasks")


def _recipe(tasks, **evaluation):
    return {"model": {"path": "ref-llama"},
            "evaluation": {"dataset": "shakespeare", "seqlen": 64, "max_windows": 1, "task_paths": [MINI],
                           "tasks": tasks, **evaluation}}


def test_committed_task_is_what_the_generator_writes():
    committed = [json.loads(x) for x in (TASKS_DIR / "shakespeare_nextline" / "shakespeare_nextline.jsonl")
                 .read_text().splitlines()]
    assert committed == nextline_items("test", 300, seed=0)
    plays = {}
    for item in committed:
        assert len(set(item["choices"])) == 4 and 0 <= item["label"] < 4
        # the true answer follows the context's last line in its play; no distractor does
        from flatllm_export import data

        text = plays.setdefault(item["play"], data.strip_markdown(
            data.shakespeare_plays()[item["play"]].read_text(encoding="utf-8")))
        last = item["context"].rstrip("\n").split("\n")[-1]
        assert f"{last}\n{item['choices'][item['label']]}" in text
    assert {i["play"] for i in committed} == set(data.SHAKESPEARE_TEST)  # held-out plays only


def checked(raw):
    recipe = parse_recipe(raw)
    preflight(recipe)
    return recipe


def test_task_names_and_limits_are_checked_before_any_work():
    rec = checked(_recipe(["nextline_mini", {"name": "shakespeare_nextline", "num_fewshot": 0, "limit": 0.5}]))
    assert [t.name for t in rec.evaluation.tasks] == ["nextline_mini", "shakespeare_nextline"]
    with pytest.raises(RecipeError, match=r"nextline_mini' has 24 documents, limit 25 is out of range: use a limit "
                                          r"from 1 to 24"):
        checked(_recipe([{"name": "nextline_mini", "limit": 25}]))
    for bad in (0, -3, 1.5, 0.0):
        with pytest.raises(RecipeError, match=r"evaluation.tasks.0.limit: .*out of range"):
            parse_recipe(_recipe([{"name": "nextline_mini", "limit": bad}]))
    with pytest.raises(RecipeError, match=r"evaluation.tasks.0.colour: unknown key"):
        parse_recipe(_recipe([{"name": "nextline_mini", "colour": 1}]))
    with pytest.raises(RecipeError, match=r"task_paths.*not a folder"):
        checked(_recipe(["nextline_mini"], task_paths=["/no/such/folder"]))
    with pytest.raises(RecipeError, match=r"repeats a task"):
        parse_recipe(_recipe(["nextline_mini", "nextline_mini"]))


def test_unknown_task_is_refused_by_check_naming_the_fix():
    res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "check", "recipes/ref-llama-tasks.yaml",
                          "--set", "evaluation.tasks=[arc_easyy]"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "unknown lm-eval task(s) ['arc_easyy']" in res.stderr and "arc_easy" in res.stderr
    assert "evaluation.task_paths" in res.stderr


def test_local_task_whose_data_cannot_be_loaded_is_refused_at_check(tmp_path):
    text = (ROOT / "tests" / "lmeval_tasks" / "nextline_mini.yaml").read_text()
    (tmp_path / "broken.yaml").write_text(text.replace("task: nextline_mini", "task: broken")
                                          .replace("nextline_mini.jsonl", "missing.jsonl"))
    with pytest.raises(RecipeError, match=r"task 'broken' could not be loaded .*missing.jsonl.*local task"):
        checked(_recipe(["broken"], task_paths=[str(tmp_path)]))


def test_hub_task_offline_fails_before_any_model_work(tmp_path, monkeypatch):
    """A hub task passes check (its name is known); run loads its data first and stops with a clear error."""
    from flatllm_export import api

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rec = parse_recipe({**_recipe(["arc_easy"]), "compression": {"ratio": 0.3}})
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(RecipeError, match=r"task 'arc_easy' could not be loaded .*offline machine use a local task"):
        api.run(rec, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def tasks_run(tmp_path_factory):
    """recipes/ref-llama-tasks.yaml end to end, small: FLAT-LLM 30% -> GPTQ int4 -> gptq + onnx, validated."""
    out = tmp_path_factory.mktemp("tasks") / "out"
    res = subprocess.run([sys.executable, "-m", "flatllm_export.cli", "run", "recipes/ref-llama-tasks.yaml", "-o",
                          str(out), "--set", "calibration.nsamples=8", "--set", "calibration.seqlen=128",
                          "--set", "evaluation.max_windows=2", "--set", "evaluation.seqlen=128",
                          "--set", "validation.generate_tokens=8"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def test_recipe_with_tasks_runs_end_to_end_with_task_parity(tasks_run):
    out, rep = tasks_run
    task = "shakespeare_nextline"
    assert list(rep["tasks"]) == ["dense", "compressed", "quantized"]
    for point in rep["tasks"].values():
        m = point[task]
        assert m["items"] == 20 and m["num_fewshot"] == 0 and 0 <= m["acc"] <= 1 and m["acc_stderr"] > 0
        assert m["acc_norm"] is not None
    rows = {r["runtime"]: r for r in rep["validation"]["rows"] if r["dataset"] == f"task {task}"}
    assert set(rows) == {"torch", "gptq", "onnxruntime"}
    assert rows["torch"]["acc"] == rep["tasks"]["quantized"][task]["acc"]  # the exported model is the reference
    for r in rows.values():  # fp32 arithmetic everywhere (int4 at accuracy_level 0): every item scored alike
        assert r["ok"] and r["items_differ"] == "none" and r["acc_tol"] == 0.0 and r["items"] == 20
    assert rep["validation"]["passed"]
    md = (out / "report.md").read_text()
    assert "## Task accuracy (lm-evaluation-harness)" in md and f"| task {task} | onnxruntime |" in md


def test_task_parity_names_the_items_that_differ():
    ref = {"t": {"acc": 0.5, "items": 4, "correct": {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}}}
    moved = {"t": {"acc": 0.5, "items": 4, "correct": {0: 0.0, 1: 1.0, 2: 1.0, 3: 0.0}}}
    rows, failures = lmeval.task_parity({"torch": ref, "onnxruntime": moved}, {"onnxruntime": "fp32"}, 0.02)
    assert rows[1]["items_differ"] == "0, 1" and not rows[1]["ok"]  # same accuracy, different items: fp32 fails
    assert "items that differ: [0, 1]" in failures[0]
    rows, failures = lmeval.task_parity({"torch": ref, "onnxruntime": moved}, {"onnxruntime": "approximate"}, 0.02)
    assert rows[1]["ok"] and not failures and rows[1]["acc_tol"] == 0.02  # int8: within the accuracy tolerance


def test_runtime_adapter_generates_and_scores_like_pytorch(tasks_run):
    """The onnxruntime adapter's greedy generation, rolling log-likelihood and choice log-likelihoods against
    lm-eval's HFLM on the reloaded GPTQ checkpoint (the same int4 weights, dequantized in PyTorch)."""
    from lm_eval.api.instance import Instance

    from flatllm_export.modeling import load_model, load_tokenizer
    from flatllm_export.validate import onnx_runtime

    out, _ = tasks_run
    model, tok = load_model(str(out / "gptq")), load_tokenizer(str(out / "gptq"))
    ours, theirs = lmeval.runtime_lm(onnx_runtime(out / "onnx"), model.config, tok, 4), lmeval.hf_lm(model, tok, 4)

    def req(kind, args):
        return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]

    prompts = ["HAMLET\nTo be, or not to be", "KING\nHow fares our cousin"]
    gen = [(p, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}) for p in prompts]
    got, want = ours.generate_until(req("generate_until", gen)), theirs.generate_until(req("generate_until", gen))
    assert got == want and all(len(g) > 0 for g in got)
    rolling = [("HAMLET\nTo be, or not to be, that is the question:\n",)]
    a, b = ours.loglikelihood_rolling(req("loglikelihood_rolling", rolling)), \
        theirs.loglikelihood_rolling(req("loglikelihood_rolling", rolling))
    assert a[0] == pytest.approx(b[0], abs=1e-3)
    pairs = [("HAMLET\nTo be, or not to be,", " that is the question"), ("KING\n", "Good morrow")]
    a, b = ours.loglikelihood(req("loglikelihood", pairs)), theirs.loglikelihood(req("loglikelihood", pairs))
    assert [x[1] for x in a] == [x[1] for x in b] and [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-3)
