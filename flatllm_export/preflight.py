"""The one step that checks a parsed recipe against this machine before any work: what `flatllm-export check`
runs, and what `run` runs before it starts. Parsing (recipe.py) reads nothing; everything that reads files,
tries folders, parses a GGUF header, looks for installed packages or builds lm-eval's task index is here.
Each problem is reported with its recipe key path and the fix."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import data
from .errors import UserError
from .recipe import Recipe, RecipeError


def writable_folder(value: str) -> None:
    """A folder that exists and can be written, or can be made inside one that can."""
    path = Path(os.path.expanduser(value)).absolute()
    parent = next(p for p in (path, *path.parents) if p.exists())
    if not parent.is_dir():
        raise RecipeError(f"'{value}' is not a folder ({parent} is a file): give a folder")
    try:  # try it: permission bits say nothing to root, and a read-only file system only shows on writing
        tempfile.TemporaryDirectory(dir=parent).cleanup()
    except OSError as exc:
        raise RecipeError(f"'{value}' is not writable ({parent}: {exc.strerror}): give a folder you can write "
                          "to") from None


def model_source(value: str) -> None:
    """model.path: a short name, a supported model folder with weights, a whole GGUF file of a supported
    architecture, or something shaped like a hub id (checked when downloaded)."""
    from .modeling.gguf_import import inspect_gguf
    from .modeling.loading import SHORT_NAMES, check_model_folder

    if value in SHORT_NAMES:
        return
    expanded = os.path.expanduser(value)
    if os.path.isdir(expanded):
        check_model_folder(expanded)  # config.json readable and supported, weights present
    elif value.endswith(".gguf"):
        inspect_gguf(expanded)  # exists, is GGUF, is whole, is llama / mistral
    elif value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise RecipeError(f"'{value}' is not an existing model folder, a .gguf file, a short name "
                          f"({', '.join(SHORT_NAMES)}) or a hub id like 'meta-llama/Llama-2-7b-hf'")


def task_folders(paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.isdir(os.path.expanduser(p))]
    if missing:
        raise RecipeError(f"{missing} not a folder: give folders that hold lm-eval task YAML files")


def export_packages(targets: list[str]) -> None:
    from exporters import missing_requirement

    missing = [m for m in map(missing_requirement, targets) if m]
    if missing:
        raise RecipeError("; ".join(missing))


def preflight(recipe: Recipe, source: str = "", load_task_data: bool | None = None) -> dict:
    """Every check of ``recipe`` that needs this machine; raises one RecipeError listing each problem as
    ``key.path: what, and the fix``. ``load_task_data``: None = local lm-eval tasks' data only (``check``),
    True = every task's (``run``, before any model work). Returns {"task_documents": {task: documents}}."""
    from .modeling.loading import model_context

    problems, facts = [], {}

    def check(key: str, fn, *args):
        try:
            return fn(*args)
        except (UserError, ValueError) as exc:
            problems.append(f"{key}: {exc}" if key else str(exc))
            return None

    check("model.path", model_source, recipe.model.path)
    if not problems:  # the model's context, from its config.json when it is on disk already
        context = model_context(recipe.model.path)
        problems += recipe.context_problems(context) if context is not None else []  # each names its key
    for key, value in (("model.stream_dir", recipe.model.stream_dir),
                       ("calibration.spill_dir", recipe.calibration.spill_dir)):
        if value is not None:
            check(key, writable_folder, value)
    if recipe.export is not None:
        check("export.targets", export_packages, recipe.export.targets)
    if recipe.uses_calibration():
        check("calibration.dataset", data.check_dataset, recipe.calibration.dataset, "train")
    ev = recipe.evaluation
    if ev is not None:
        for name in ev.datasets:
            check("evaluation.dataset", data.check_dataset, name, ev.split)
        for name in recipe.validation.datasets if recipe.validation else []:
            check("validation.datasets", data.check_dataset, name, ev.split)
        before = len(problems)
        check("evaluation.task_paths", task_folders, ev.task_paths)
        if ev.tasks and len(problems) == before:
            from .lmeval import check_tasks

            facts["task_documents"] = check("", check_tasks, ev, load_task_data)  # its messages name their key
    if problems:
        where = f"recipe {source}" if source else "the recipe"
        raise RecipeError(f"{where} cannot run here:\n" + "\n".join(f"  - {p}" for p in problems))
    return facts
