"""run(recipe): load -> evaluate -> compress -> evaluate -> export, each a timed stage, into one report."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import accounting, data, report
from .errors import InputError
from .evaluate import model_perplexity
from .modeling import load_model, load_tokenizer
from .recipe import RUNTIME_TARGETS, Recipe, RecipeError, dump_recipe
from .files import OutputDir, finished_folder, read_json
from .stages import StageLog, pin_mmap_threshold
from .parity import DEFAULT_K
from .preflight import preflight
from .validate import PROMPT_TOKENS, genai_runtime, llamacpp_runtime, onnx_runtime, parity, torch_runtime

RUN_FORMAT = "flatllm-export-run/1"  # report.json's "format": validate refuses a run folder of any other


def evaluation_windows(recipe: Recipe, tokenizer, dataset: str | None = None) -> torch.Tensor:
    """The evaluation windows of one dataset (default: the evaluation's first, its primary)."""
    ev = recipe.evaluation
    tokens = data.tokenize(tokenizer, data.load_text(dataset or ev.datasets[0], ev.split))
    return data.evaluation_windows(tokens, ev.seqlen, ev.max_windows)


def evaluation_sets(recipe: Recipe, tokenizer, datasets: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Dataset name -> its evaluation windows, for ``datasets`` (default: every evaluation dataset), in order."""
    return {name: evaluation_windows(recipe, tokenizer, name) for name in datasets or recipe.evaluation.datasets}


def calibration_windows(recipe: Recipe, tokenizer) -> torch.Tensor:
    cal = recipe.calibration
    tokens = data.tokenize(tokenizer, data.load_text(cal.dataset, "train"))
    return data.calibration_windows(tokens, cal.nsamples, cal.seqlen, cal.seed)


def _evaluate(model, tokenizer, recipe: Recipe, sets: dict[str, torch.Tensor], point: str
              ) -> tuple[dict, dict | None]:
    """Perplexity on every dataset's windows (the stage's figures: the primary, first dataset's, and every
    dataset's under 'datasets') and, with evaluation.tasks, lm-eval's results per task (None without tasks)."""
    by_dataset = {name: model_perplexity(model, windows, recipe.evaluation.batch_size, recipe.model.device,
                                         desc=f"ppl {point} {name}") for name, windows in sets.items()}
    stats = {**next(iter(by_dataset.values())), "datasets": by_dataset}
    if not recipe.evaluation.tasks:
        return stats, None
    from . import lmeval

    return stats, lmeval.evaluate_tasks(lmeval.hf_lm(model, tokenizer, recipe.evaluation.batch_size), recipe.evaluation)


def activations(recipe: Recipe):
    """The calibration activations' storage the recipe asks for (dtype, spill folder)."""
    from .calibration import activation_storage
    from .dtypes import DTYPES

    cal = recipe.calibration
    return activation_storage(DTYPES.get(cal.activation_dtype), cal.spill_dir and Path(cal.spill_dir).expanduser())


@contextlib.contextmanager
def layer_folder(recipe: Recipe, work: Path):
    """Where a streamed run writes its changed layers: a fresh folder in model.stream_dir or in the work folder;
    removed when the run ends (the output folder holds only the exports)."""
    if not recipe.streams():
        yield None
        return
    if recipe.model.stream_dir:
        base = Path(recipe.model.stream_dir).expanduser()
        base.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="flatllm-layers-", dir=base))
    else:
        folder = work / ".layers"
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run(recipe: Recipe, output: str | Path, overwrite: bool = False, keep_failed: bool = False) -> dict:
    """Run every section the recipe has; returns the report (also written as report.json / report.md)."""
    out = OutputDir(output, overwrite, keep_failed, marker="report.json")
    out.check()  # before any work
    log = StageLog()
    with log.stage("preflight") as st:  # the recipe against this machine, every task's data loaded (hub tasks too)
        st.update(preflight(recipe, load_task_data=True))
    pin_mmap_threshold()  # freed tensors go back to the system during the run (stages.pin_mmap_threshold)
    rep: dict = {"format": RUN_FORMAT, "recipe": recipe.model_dump(exclude_none=True),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                 "host": platform.machine()}}
    if recipe.warnings():
        rep["warnings"] = recipe.warnings()
    with out as work, layer_folder(recipe, work) as layers:
        (work / "recipe.yaml").write_text(dump_recipe(recipe))
        with log.stage("load") as st:
            model = load_model(recipe.model.path, recipe.model.dtype, "cpu" if recipe.streams() else
                               recipe.model.device, stream=recipe.streams(), work_dir=layers)
            tokenizer = load_tokenizer(recipe.model.path)
            st.update(path=model.name_or_path, source_model_type=model.config.source_model_type)
            problems = recipe.context_problems(model.config.max_position_embeddings)
            if problems:  # known only now for a model that was fetched or built by this run
                raise RecipeError("; ".join(problems))
        rep["model"] = {"path": recipe.model.path, "layers": model.config.num_hidden_layers,
                        "parameters": accounting.model_params(model),
                        "decoder_linear_params": accounting.decoder_linear_params(model.config)}
        published = set()  # stages whose whole entry is a section of the report: listed in "stages" by time only
        eval_sets, calib, torch_tasks = None, None, None

        def evaluate(point: str) -> None:
            """Perplexity (and tasks) of the model as it is now, as point ``point`` of the report: rep['perplexity']
            holds the primary (first) dataset's, rep['perplexity_by_dataset'] every dataset's."""
            nonlocal eval_sets, torch_tasks
            if recipe.evaluation is None:
                return
            with log.stage(f"evaluate_{point}") as st:
                if eval_sets is None:
                    eval_sets = evaluation_sets(recipe, tokenizer)
                stats, torch_tasks = _evaluate(model, tokenizer, recipe, eval_sets, point)
                st.update(stats)
            rep.setdefault("perplexity", {})[point] = stats["ppl"]
            for name, s in stats["datasets"].items():
                rep.setdefault("perplexity_by_dataset", {}).setdefault(name, {})[point] = s["ppl"]
            if torch_tasks is not None:  # the last point's results are the exported model's: validation's torch row
                rep.setdefault("tasks", {})[point] = {t: {k: v for k, v in r.items() if k != "correct"}
                                                     for t, r in torch_tasks.items()}

        def calibration() -> torch.Tensor:
            nonlocal calib
            if calib is None:
                with log.stage("calibration_data") as st:
                    calib = calibration_windows(recipe, tokenizer)
                    st.update(windows=list(calib.shape))
            return calib

        evaluate("dense")
        if recipe.compression:
            rep["compression"] = compress_stage(model, calibration(), recipe, log)
            published.add("compress")
            rep["model"]["parameters_after"] = accounting.model_params(model)
            report.plot_allocation(rep["compression"], work / "allocation.png")
            evaluate("compressed")
        if recipe.quantization:
            rep["quantization"] = quantize_stage(model, calibration(), recipe, log)
            published.add("quantize")
            evaluate("quantized")
        opened = {}
        if recipe.export:
            rep["exports"], opened = export_stages(model, tokenizer, recipe, eval_sets, work, log)
            published.update(f"export_{t}" for t in recipe.export.targets)
        if recipe.validation:
            with log.stage("validate") as st:
                st.update(validate_outputs(work, recipe, tokenizer, model, "in memory", torch_tasks, eval_sets,
                                           opened))
            del opened
            rep["validation"] = log.stages["validate"]
            published.add("validate")
        if layers is not None:  # (layer_folder removes the layer files before the output folder is completed)
            rep["model"]["streamed_layer_loads"] = model.layer_store.loads
            rep["model"]["most_layers_in_memory"] = model.layer_store.peak_live
        rep["stages"] = {name: {k: v for k, v in entry.items() if name not in published or k in TIMING}
                         for name, entry in log.stages.items()}
        rep["total_seconds"] = round(sum(s["seconds"] for s in log.stages.values()), 2)
        (work / "report.json").write_text(json.dumps(rep, indent=1) + "\n")
        (work / "report.md").write_text(report.markdown(rep))
    return rep


TIMING = ("seconds", "peak_rss_mb", "start_rss_mb", "peak_cuda_mb")


def compress_stage(model, calib: torch.Tensor, recipe: Recipe, log: StageLog) -> dict:
    from .compress import compress

    with log.stage("compress") as st, activations(recipe):
        # GPTQ packing wants every linear's in/out a multiple of 32, and int4 kernels (GPTQModel's CPU kernel, for
        # one) want in_features a multiple of the group size: shape the ranks for both
        q = recipe.quantization
        multiple = (math.lcm(32, q.group_size) if q.group_size > 0 else 32) if q else 1
        st.update(compress(model, calib, recipe.compression, recipe.model.device, recipe.calibration.batch_size,
                           multiple))
    return st


def quantize_stage(model, calib: torch.Tensor, recipe: Recipe, log: StageLog) -> dict:
    """GPTQ of the model in place; returns the report's quantization section."""
    from .quantize import quantize_model

    with log.stage("quantize") as st, activations(recipe):
        # a quantized lm_head of the model's own bit width is GPTQ-calibrated here (the checkpoint formats hold one
        # bit width); another width is rounded to nearest by the ONNX exporter
        head_bits = {"int4": 4, "int8": 8}.get(recipe.head_format("lm_head"))
        st.update(quantize_model(model, calib, recipe.quantization, recipe.model.device,
                                 recipe.calibration.batch_size,
                                 lm_head_bits=head_bits if head_bits == recipe.quantization.bits else None))
    return st


def export_stages(model, tokenizer, recipe: Recipe, eval_sets: dict[str, torch.Tensor] | None, work: Path,
                  log: StageLog) -> tuple[dict, dict]:
    """Every export target of the recipe, each a stage: ({target: its report}, what the self-checks loaded that
    the recipe's validation runs: 'gptq' the reloaded model, 'onnx' the onnxruntime session)."""
    from exporters import ExportContext, export

    sample = next(iter(eval_sets.values()))[:2, :64] if eval_sets is not None else torch.randint(
        0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ctx = ExportContext(dtype=recipe.export.dtype, sample=sample,
                        noise_k=recipe.validation.noise_k if recipe.validation else DEFAULT_K,
                        extra={"accuracy_level": recipe.export.accuracy_level,
                               "embedding": recipe.head_format("embedding"), "lm_head": recipe.head_format("lm_head"),
                               "pad_value_cache": recipe.export.pad_value_cache,
                               "attention": recipe.export.attention})
    keep = {RUNTIME_TARGETS[rt] for rt in recipe.validation.runtimes if rt in RUNTIME_TARGETS} \
        if recipe.validation else set()
    exports = {}
    for target in recipe.export.targets:
        with log.stage(f"export_{target}") as st:
            st.update(export(target, model, tokenizer, work / target, ctx))
            if target not in keep:  # freed within its stage: its memory is not carried to the next
                ctx.opened.pop(target, None)
        exports[target] = st
    return exports, ctx.opened


def validate_outputs(folder: Path, recipe: Recipe, tokenizer, model, note: str, torch_tasks: dict | None = None,
                     eval_sets: dict[str, torch.Tensor] | None = None, opened: dict | None = None) -> dict:
    """Parity of every runtime the recipe's validation section names, judged against the float64 reference of
    ``model`` (the PyTorch model as exported). ``torch_tasks``: the task results of ``model`` when the run has just
    measured them (else measured here); ``eval_sets``: evaluation windows already made, by dataset; ``opened``: what
    the exporters' self-checks loaded (``ExportContext.opened``), used instead of loading those files again.

    Datasets: validation.datasets, else every evaluation dataset. Every runtime's perplexity is measured on every
    one of them (the ppl rows per dataset); the parity verdict (float64 reference, noise floors, greedy tokens)
    and the accuracy cost of each approximation stay on the first dataset's windows, where one sample suffices."""
    val = recipe.validation
    known = eval_sets or {}
    windows = {name: known[name] if name in known else evaluation_windows(recipe, tokenizer, name)
               for name in val.datasets or recipe.evaluation.datasets}
    others, gptq_model, opened = [], None, opened or {}
    if "gptq" in val.runtimes:
        gptq_model = opened.get("gptq")
        if gptq_model is None:
            gptq_model = load_model(str(folder / "gptq"), stream=recipe.streams())
        others.append(torch_runtime("gptq", gptq_model, "reloaded checkpoint"))
    if "onnxruntime" in val.runtimes:
        others.append(onnx_runtime(folder / "onnx", opened.get("onnx")))
    if "onnxruntime-genai" in val.runtimes:  # the genai target when there is one (padded value cache)
        others.append(genai_runtime(folder / "genai" if (folder / "genai").is_dir() else folder / "onnx"))
    if "llama.cpp" in val.runtimes:
        n_ctx = max(recipe.evaluation.seqlen, PROMPT_TOKENS + val.generate_tokens)
        others.append(llamacpp_runtime(folder / "gguf", n_ctx))
    result = parity(model, others, windows, val, recipe.evaluation.batch_size, note)
    if recipe.evaluation.tasks:  # task accuracy on every runtime, in the same table
        from . import lmeval

        bs = recipe.evaluation.batch_size
        results = {"torch": torch_tasks or lmeval.evaluate_tasks(lmeval.hf_lm(model, tokenizer, bs), recipe.evaluation)}
        for rt in others:
            lm = (lmeval.hf_lm(gptq_model, tokenizer, bs) if rt.name == "gptq"
                  else lmeval.runtime_lm(rt, model.config, tokenizer, bs))
            results[rt.name] = lmeval.evaluate_tasks(lm, recipe.evaluation)
        kinds = {rt.name: rt.floor_kind if rt.arith.exact else "approximate" for rt in others}
        rows, failures = lmeval.task_parity(results, kinds, val.task_tolerance)
        result["rows"] += rows
        result["failures"] += failures
        result["passed"] = result["passed"] and not failures
        result["task_tolerance"] = val.task_tolerance
    return result


def check_run_folder(folder: str | Path) -> Path:
    """A finished run's output folder of this version, or a message saying what it is instead."""
    folder = finished_folder(folder, "the --output folder of a finished run")
    report_file = folder / "report.json"
    if not report_file.is_file():
        raise FileNotFoundError(f"{folder} has no report.json: it is not the output folder of a finished "
                                "`flatllm-export run`")
    rep = read_json(report_file, InputError, "run the recipe again", want_object=False)
    found = rep.get("format", RUN_FORMAT) if isinstance(rep, dict) else None  # reports before the stamp: format 1
    if found != RUN_FORMAT:
        raise InputError(f"{report_file} has format {found!r}, this version of flatllm-export reads {RUN_FORMAT!r}: "
                         f"{folder} was written by another version; run its recipe again with this version")
    return folder


def validate_dir(folder: str | Path) -> dict:
    """``flatllm-export validate DIR``: re-run the parity checks of a finished run from its files alone."""
    from .recipe import ValidationSection, load_recipe

    folder = check_run_folder(folder)
    try:
        recipe = load_recipe(folder / "recipe.yaml")
    except RecipeError as exc:
        raise RecipeError(f"{exc}\n(was {folder} written by another version of flatllm-export? run its recipe "
                          "again with this version)") from None
    if recipe.evaluation is None:
        raise InputError(f"{folder}/recipe.yaml has no evaluation section: nothing to validate on")
    if recipe.validation is None:
        runtimes = ["torch"] + [rt for rt, t in RUNTIME_TARGETS.items() if (folder / t).is_dir()]
        recipe = recipe.model_copy(update={"validation": ValidationSection(runtimes=runtimes)})
    ref_dir = folder / "gptq" if (folder / "gptq").is_dir() else folder / "hf"
    if not ref_dir.is_dir():
        raise InputError(f"{folder} has neither gptq/ nor hf/: export a PyTorch target to validate against")
    result = validate_outputs(folder, recipe, load_tokenizer(str(ref_dir)),
                              load_model(str(ref_dir), stream=recipe.streams()), f"reloaded {ref_dir.name}/")
    (folder / "validation.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / "validation.md").write_text(report.validation_markdown(result))
    return result
