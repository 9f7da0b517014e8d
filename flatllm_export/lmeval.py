"""Downstream task accuracy through lm-evaluation-harness (``evaluation.tasks``), on every runtime.

- PyTorch (in memory, before export; the reloaded GPTQ checkpoint): lm-eval's own ``HFLM`` over our model object.
- Exported runtimes (onnxruntime, onnxruntime-genai): ``RuntimeLM``, an ``HFLM`` whose model calls go to the
  runtime's logits function and greedy generator (``validate.Runtime``). Tokenization, batching, padding and
  scoring stay lm-eval's, so every runtime sees the very same token batches and differs only in arithmetic.

Task names are looked up in lm-eval's registry plus ``flatllm_export/tasks/`` and ``evaluation.task_paths``.
Local tasks read their data with ``dataset_path: json``; a relative ``data_files`` entry is resolved against the
task's YAML folder. ``task_parity`` compares per-item correctness across runtimes for the validation table.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .errors import UserError
from .tasks import TASKS_DIR

# an exported fp32 runtime must score every item as PyTorch does; other precisions may differ by this much
# absolute accuracy (validation.task_tolerance overrides it)
DEFAULT_TASK_TOLERANCE = 0.02


class TaskError(UserError, ValueError):
    """An evaluation task cannot be run as asked; the message names the task and the fix."""


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError("evaluation.tasks needs lm-evaluation-harness: pip install -e '.[eval]' "
                        "(lm-eval 0.4.13)") from None
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=4)
def task_manager(paths: tuple[str, ...], hub: bool):
    """lm-eval's TaskManager over our local task folders, plus its own registry when ``hub`` (indexing the
    registry's ~15,000 YAML files takes seconds: skipped when every task is local)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(TASKS_DIR), *paths], include_defaults=hub)


def include_paths(evaluation) -> tuple[str, ...]:
    return tuple(str(Path(os.path.expanduser(p)).resolve()) for p in evaluation.task_paths)


def _manager_for(names: list[str], paths: tuple[str, ...]):
    local = task_manager(paths, False)
    if all(n in local.task_index for n in names):
        return local
    full = task_manager(paths, True)
    unknown = [n for n in names if n not in full.task_index]
    if unknown:
        close = {n: [t for t in full.all_tasks if n.lower() in t.lower()][:5] for n in unknown}
        raise TaskError(f"evaluation.tasks: unknown lm-eval task(s) {unknown} (similar: {close}); use a name from "
                        "`lm-eval ls tasks`, a task of flatllm_export/tasks/, or add the folder of your task YAML "
                        "to evaluation.task_paths")
    return full


def _spec(manager, name: str):
    """The task as lm-eval loads it: its name, or for a local YAML with relative data_files, the name plus the
    data_files resolved against the YAML's folder (the json loader resolves them against the cwd)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader lm-eval's TaskFactory uses

    entry = manager.task_index[name]
    files = ((entry.cfg or {}).get("dataset_kwargs") or {}).get("data_files")
    if entry.yaml_path is None or not files:
        return name
    cfg = load_yaml(entry.yaml_path, resolve_func=True)  # a dict spec replaces the YAML: give it all of it
    base = Path(entry.yaml_path).parent
    fix = (lambda f: str(base / f) if not os.path.isabs(f) else f)
    files = {k: (fix(v) if isinstance(v, str) else [fix(x) for x in v]) for k, v in files.items()} \
        if isinstance(files, dict) else (fix(files) if isinstance(files, str) else [fix(x) for x in files])
    return {**cfg, "dataset_kwargs": {**cfg["dataset_kwargs"], "data_files": files}}


def load_task(manager, name: str):
    """The built lm-eval Task (its data loaded), or a TaskError naming the task and the fix."""
    try:
        built = manager.load([_spec(manager, name)])
    except Exception as exc:  # datasets / hub / YAML errors come in many types: name the task and the fix
        raise TaskError(f"evaluation.tasks: task '{name}' could not be loaded ({type(exc).__name__}: "
                        f"{str(exc)[:300]}). Its data must be reachable: on an offline machine use a local task "
                        "(dataset_path: json with data_files, see flatllm_export/tasks/) or run where the hub "
                        "is reachable") from None
    if len(built["tasks"]) != 1:
        raise TaskError(f"evaluation.tasks: '{name}' is a group of {len(built['tasks'])} tasks; list its tasks "
                        f"one by one: {sorted(built['tasks'])[:10]}")
    return next(iter(built["tasks"].values()))


def _docs(task) -> int:
    docs = task.eval_docs
    return len(docs)


def check_tasks(evaluation, load_data: bool | None = None) -> dict[str, int]:
    """Names known, data loadable, limits within the task's size. ``load_data``: None = load local tasks only
    (cheap, done at ``check``), True = every task (done by ``run`` before any model work). Returns
    {task: number of documents} for the tasks loaded."""
    paths = include_paths(evaluation)
    names = [t.name for t in evaluation.tasks]
    manager = _manager_for(names, paths)
    local = task_manager(paths, False).task_index
    sizes = {}
    for t in evaluation.tasks:
        if load_data is None and t.name not in local:
            continue  # a hub task: its data is fetched by run, not by check
        sizes[t.name] = n = _docs(load_task(manager, t.name))
        if isinstance(t.limit, int) and t.limit > n:
            raise TaskError(f"evaluation.tasks: task '{t.name}' has {n} documents, limit {t.limit} is out of "
                            f"range: use a limit from 1 to {n} (or a fraction below 1, or no limit)")
    return sizes


class _Shell(torch.nn.Module):
    """What HFLM reads of a model object (config, device) for a runtime that is not a torch module."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    @property
    def device(self):
        return torch.device("cpu")

    def tie_weights(self):
        pass


def hf_lm(model, tokenizer, batch_size: int):
    """lm-eval's own HF wrapper over our (possibly compressed / quantized) model object."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")


def runtime_lm(runtime, config, tokenizer, batch_size: int):
    """An lm-eval model over a ``validate.Runtime`` (log-likelihoods from its logits, greedy generation)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    class RuntimeLM(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            return runtime.logits_fn(inps.cpu())

        def _model_generate(self, context, max_length, stop, attention_mask=None, **kwargs):
            rows = []  # one prompt at a time, left padding removed; the padded prompt is kept in the output
            for i in range(context.shape[0]):
                keep = attention_mask[i].bool() if attention_mask is not None else slice(None)
                ids = context[i][keep][None].cpu()
                new = torch.as_tensor(runtime.generate_fn(ids, max_length - context.shape[1]))[0, ids.shape[1]:]
                rows.append(torch.cat([context[i].cpu(), new]))
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=self.tokenizer.pad_token_id)

    return RuntimeLM(pretrained=_Shell(config), tokenizer=tokenizer, batch_size=batch_size, backend="causal")


METRICS = ("acc", "acc_norm")


def evaluate_tasks(lm, evaluation) -> dict:
    """{task: {acc, acc_stderr, acc_norm, acc_norm_stderr, items, num_fewshot, correct: {doc_id: 0/1}}} for the
    recipe's tasks, each through ``lm_eval.simple_evaluate`` (correct: per-item acc, for the parity table)."""
    _lm_eval()
    from lm_eval import simple_evaluate

    paths = include_paths(evaluation)
    manager = _manager_for([t.name for t in evaluation.tasks], paths)
    out = {}
    for t in evaluation.tasks:
        res = simple_evaluate(model=lm, tasks=[_spec(manager, t.name)], task_manager=manager,
                              num_fewshot=t.num_fewshot, limit=t.limit, log_samples=True,
                              bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                              fewshot_random_seed=0)
        name = next(iter(res["results"]))
        metrics = res["results"][name]
        row = {"items": len(res["samples"][name]), "num_fewshot": res["n-shot"].get(name)}
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if metric in METRICS or metric.removesuffix("_stderr") in METRICS or metric == "exact_match":
                row[metric] = value if isinstance(value, (int, float)) else None
        samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
        main = "acc" if "acc" in row else next((m for m in row if m not in ("items", "num_fewshot")), None)
        row["correct"] = {int(s["doc_id"]): float(s[main]) for s in samples if main in s}
        out[t.name] = row
    return out


def task_parity(results: dict[str, dict], floor_kinds: dict[str, str], tolerance: float) -> tuple[list, list]:
    """Rows for the validation table and failure messages. ``results``: runtime -> evaluate_tasks(); the first
    runtime is the reference. fp32 runtimes must score every item as the reference does; others may differ
    in accuracy by at most ``tolerance``. Each row names the doc ids scored differently."""
    ref_name = next(iter(results))
    rows, failures = [], []
    for rt, tasks in results.items():
        for task, row in tasks.items():
            ref = results[ref_name][task]
            differ = sorted(d for d, c in row["correct"].items() if ref["correct"].get(d) != c)
            main = "acc" if "acc" in row else "exact_match"
            diff = abs(row[main] - ref[main])
            exact = floor_kinds.get(rt, "fp32") == "fp32"
            ok = not differ if exact else diff <= tolerance
            rows.append({"dataset": f"task {task}", "runtime": rt, "acc": row.get("acc"),
                         "acc_stderr": row.get("acc_stderr"), "acc_norm": row.get("acc_norm"),
                         "items": row["items"], "acc_diff": diff,
                         "acc_tol": 0.0 if exact else tolerance,
                         "items_differ": ", ".join(map(str, differ)) if differ else "none",
                         "floor": floor_kinds.get(rt, "fp32"), "ok": ok})
            if not ok:
                failures.append(f"{rt}: task {task} {main} {row[main]:.4f} vs {ref_name} {ref[main]:.4f} "
                                f"({'items must agree at fp32' if exact else f'tolerance {tolerance:g}'}); "
                                f"items that differ: {differ[:20]}")
    return rows, failures
