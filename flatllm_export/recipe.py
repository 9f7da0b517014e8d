"""Recipes: YAML -> a typed, self-checking Recipe. Unknown keys, wrong types, out-of-range values and sections
that contradict each other fail here, with the key path, the bad value and what is allowed. Parsing reads no
model, folder or task: what a recipe needs of this machine is checked by preflight.py, before any work."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exporters import DEFAULT_ACCURACY_LEVEL

from . import data
from .compress.flatllm import DEFAULT_VARIANT, OPTION_KEYS, resolve_options
from .dtypes import DTYPES
from .errors import UserError
from .lmeval import DEFAULT_TASK_TOLERANCE
from .parity import DEFAULT_K


class RecipeError(UserError, ValueError):
    """A recipe is not valid; the message names every problem with its key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, strict=True)  # "0.3" is not a number here


DATASET_HELP = (f"a bundled dataset ({', '.join(data.BUNDLED)}; docs/data.md), a hub dataset "
                f"({', '.join(data.HUB_DATASETS)}), a local text file or glob, or a local corpus folder with "
                "train.txt / validation.txt / test.txt")


def _dataset_names(value: Union[str, list[str]]) -> Union[str, list[str]]:
    """One dataset name or a non-empty list of distinct names (whether each exists here, with the split asked
    for, is preflight's question: data.check_dataset)."""
    names = value if isinstance(value, list) else [value]
    if not names:
        raise ValueError(f"is an empty list: name at least one dataset ({DATASET_HELP})")
    if len(set(names)) != len(names):
        raise ValueError(f"repeats a dataset: {names}")
    return value


class ModelSection(Strict):
    path: str = Field(description="local HF folder, .gguf file, short name (ref-llama, ref-gqa, smollm2-135m) "
                      "or hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", description="where each decoder layer is computed (with stream: only the current "
                        "layer is there)")
    stream: Optional[bool] = Field(None, description="read decoder layers from the safetensors files one at a time "
                                   "and write changed layers to stream_dir: memory holds embeddings, lm_head and "
                                   "one layer, with bitwise the same results. Default (unset): true, except with "
                                   "evaluation.tasks (lm-eval scores a model held in memory); false: every weight "
                                   "in memory")
    stream_dir: Optional[str] = Field(None, description="where streamed layers are written while the run works "
                                      "(default: inside the output folder; removed when the run ends)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        base = v.split(":")[0]
        if base not in ("cpu", "cuda") or (":" in v and not v.split(":", 1)[1].isdigit()):
            raise ValueError(f"'{v}' is not a device; use cpu, cuda or cuda:N")
        return v


class CalibrationSection(Strict):
    dataset: str = Field(data.GENERAL, description=f"the train split of {DATASET_HELP}")
    nsamples: int = Field(128, ge=1, le=100_000)
    seqlen: int = Field(256, ge=8, le=131_072)
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=1024)
    activation_dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model", description="dtype calibration activations are kept in between layers (model: the model's dtype)")
    spill_dir: Optional[str] = Field(None, description="keep calibration activations in memory-mapped files in "
                                     "this folder (for activations larger than memory); removed when done")

    _dataset = field_validator("dataset")(classmethod(lambda cls, v: _dataset_names(v)))


class TaskEntry(Strict):
    name: str = Field(description="an lm-eval task: a registry name (arc_easy, piqa, ...), a task of "
                      "flatllm_export/tasks/ (shakespeare_nextline) or of a folder in evaluation.task_paths")
    num_fewshot: Optional[int] = Field(None, ge=0, le=64, description="default: the task's own")
    limit: Optional[Union[int, float]] = Field(None, description="first N documents (int >= 1) or a fraction "
                                               "(0 < limit < 1); default: all")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v):
        if v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1):
            return v
        raise ValueError(f"limit {v} is out of range: use a number of documents >= 1 or a fraction 0 < limit < 1")


class EvaluationSection(Strict):
    dataset: Union[str, list[str]] = Field(
        data.GENERAL, description=f"one dataset or a list of them, each scored apart: {DATASET_HELP}. The first is "
        "the primary (its windows are validation's parity sample)")
    split: Literal["train", "validation", "test"] = "test"
    seqlen: int = Field(256, ge=8, le=131_072)
    allow_beyond_context: bool = Field(False, description="evaluate windows longer than the model's context")
    max_windows: Optional[int] = Field(None, ge=1)
    batch_size: int = Field(8, ge=1, le=1024, description="perplexity windows and lm-eval requests per batch")
    tasks: list[TaskEntry] = Field(default_factory=list, description="lm-eval tasks scored after each stage "
                                   "(and across runtimes by validation): names or {name, num_fewshot, limit}")
    task_paths: list[str] = Field(default_factory=list, description="folders of local lm-eval task YAMLs")

    _dataset = field_validator("dataset")(classmethod(lambda cls, v: _dataset_names(v)))

    @property
    def datasets(self) -> list[str]:
        """``dataset`` as a list (a single name is a list of one)."""
        return self.dataset if isinstance(self.dataset, list) else [self.dataset]

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, v):
        return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _tasks_once(self) -> "EvaluationSection":
        names = [t.name for t in self.tasks]  # whether they are known is checked by preflight
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation.tasks repeats a task: {names}")
        return self


class CompressionSection(Strict):
    method: Literal["flatllm", "flap", "svd-llm"] = "flatllm"
    ratio: float = Field(0.3, ge=0.0, le=0.9, description="fraction of decoder linear-weight parameters removed")
    allocation: Literal["iprs", "uniform"] = "iprs"
    qk: bool = False
    round_to: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 1
    # FLAT-LLM options (README: FLAT-LLM ablations); None = the variant's value
    variant: Literal["paper", "ablation"] = Field(DEFAULT_VARIANT, description="FLAT-LLM: 'paper' = the official code's "
                                                 "behaviour; 'ablation' = the changes that paid alone in bench_ablation, combined (the default: SmolLM2-135M test ppl 50.1 vs 65.8 at 30%, 68.1 vs 103.1 at 50%)")
    vo_basis: Optional[Literal["values", "attention", "weighted"]] = None
    o_proj: Optional[Literal["fold", "lstsq"]] = None
    mlp_select: Optional[Literal["leverage", "greedy"]] = None
    ridge: Optional[float] = Field(None, gt=0.0)
    ridge_scale: Optional[Literal["absolute", "trace"]] = None
    vo_scale: Optional[float] = Field(None, gt=0.0, le=10.0)
    iprs_smoothing: Optional[float] = Field(None, ge=0.0)
    importance_windows: Optional[int] = Field(None, ge=0)
    stats_dtype: Optional[Literal["float32", "float64"]] = None
    metric: Literal["IFV", "WIFV", "WIFN"] = Field("WIFV", description="FLAP only")
    structure: Literal["UL-UM", "UL-MM", "AL-MM", "AL-AM"] = Field("AL-AM", description="FLAP only")

    @model_validator(mode="after")
    def _method_keys(self) -> "CompressionSection":
        only = {"flatllm": {"allocation", "qk", "variant", *OPTION_KEYS}, "flap": {"metric", "structure"}}
        for method, keys in only.items():
            # a key of another method is an error unless it only repeats the default (as dumped recipes do)
            stray = sorted(k for k in keys & self.model_fields_set
                           if getattr(self, k) != type(self).model_fields[k].default) if self.method != method else []
            if stray:
                raise ValueError(f"keys {stray} belong to method '{method}', not to method '{self.method}'")
        if self.method == "flatllm":
            resolve_options(self.variant, **{k: getattr(self, k) for k in OPTION_KEYS})  # combinations
        return self


class QuantizationSection(Strict):
    method: Literal["gptq"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = Field(True, description="act-order: columns quantized in order of decreasing Hessian "
                           "diagonal")
    static_groups: bool = Field(True, description="with desc_act: each group's grid chosen before GPTQ's updates "
                                "on consecutive columns, so groups stay consecutive (what ONNX int4 and GGUF can "
                                "hold); without it act-order groups are permuted")
    scale: Literal["minmax", "search"] = Field("search", description="how each group's grid is chosen: minmax = "
                                               "GPTQ's min/max range; search = the scale that minimizes the "
                                               "rounding error weighted by each input's mean square (as llama.cpp's "
                                               "importance matrix does)")
    first_token_weight: float = Field(64.0, ge=1.0, le=1e6, description="how many tokens each calibration "
                                      "window's first token counts for in GPTQ's Hessians: the first position is the "
                                      "attention sink (every later token reads it)")
    damp_percent: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)

    @property
    def permuted_groups(self) -> bool:
        """Act-order without static groups: g_idx is permuted (ONNX int4 and GGUF blocks cannot hold it)."""
        return self.desc_act and not self.static_groups

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and (v < 16 or v & (v - 1)):
            raise ValueError(f"{v} is not allowed; use -1 (one group per row) or a power of two >= 16")
        return v


class ExportSection(Strict):
    targets: list[str] = Field(default_factory=lambda: ["hf"])
    dtype: Literal["float32", "float16"] = "float32"
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        DEFAULT_ACCURACY_LEVEL, description="MatMulNBits accuracy_level of int4 ONNX: 4 = int8 activations "
        "(measured on SmolLM2: 1.3-1.5x the decode speed of 0 for +0.4% ppl; validation models them, see "
        "docs/parity.md), 0 = float32 activations (the exact twin of the PyTorch GPTQ model)")
    embedding: Literal["auto", "float", "int8", "int4"] = Field(
        "auto", description="ONNX embedding table: float, or block-quantized (GatherBlockQuantized, symmetric RTN; "
                            "a tied table is read from the lm_head's data); auto: a tied table read from a quantized lm_head, else float")
    lm_head: Literal["auto", "float", "int8", "int4"] = Field(
        "auto", description="lm_head: float or block-quantized (MatMulNBits in ONNX); GPTQ-calibrated when the recipe "
                            "has a quantization section of the same bits, else round-to-nearest at export; auto: GPTQ at the "
                            "quantization's bits (4 or 8), else float")
    pad_value_cache: bool = Field(False, description="ONNX value cache padded to the key head dim (what "
                                                     "onnxruntime-genai allocates); the genai target and "
                                                     "attention: gqa always pad")
    attention: Literal["gqa", "standard"] = Field(
        "gqa", description="ONNX attention: gqa = com.microsoft GroupQueryAttention (rotary inside, KV cache "
                           "updated in place in a shared buffer; value cache padded to the key head dim), standard "
                           "= opset-23 Attention (each layer's value head dim kept in the cache; past and new "
                           "concatenated every step)")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        from exporters import TARGETS

        unknown = [t for t in v if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown export target(s) {unknown}; available: {sorted(TARGETS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"targets repeat: {v}")
        return v  # whether their packages are installed is checked by preflight


REMOVED_VALIDATION_KEYS = ("max_ppl_rel_diff", "max_ppl_rel_diff_lowp", "max_logit_diff")


class ValidationSection(Strict):
    runtimes: list[Literal["torch", "onnxruntime", "onnxruntime-genai", "gptq", "llama.cpp"]] = Field(default_factory=lambda: ["torch", "onnxruntime"])
    datasets: list[str] = Field(default_factory=list, description="evaluation datasets (default: evaluation's)")
    noise_k: float = Field(DEFAULT_K, ge=1.0, le=1e6, description="a runtime passes when its deviation from the "
                           "float64 reference is at most noise_k x PyTorch's own (the noise floor); export "
                           "self-checks use it too")
    sample_windows: int = Field(1, ge=1, le=256, description="evaluation windows compared with the float64 reference "
                                "(each costs about two float32 passes)")
    generate_tokens: int = Field(64, ge=1, le=4096)
    task_tolerance: float = Field(DEFAULT_TASK_TOLERANCE, ge=0.0, le=1.0, description="largest task accuracy "
                                  "difference from PyTorch allowed for runtimes that are not fp32 (fp32 runtimes "
                                  "must score every item the same)")
    max_ppl_increase: Optional[float] = Field(None, gt=0.0, le=100.0, description="accuracy budget: the run fails "
                                              "(exit 3) when a runtime's perplexity exceeds the PyTorch model's by "
                                              "more than this fraction on any validation dataset (0.02: +2%); "
                                              "default: reported, not enforced")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, raw):
        stale = [k for k in REMOVED_VALIDATION_KEYS if isinstance(raw, dict) and k in raw]
        if stale:
            raise ValueError(f"keys {stale} were removed: parity is judged against a float64 reference, with "
                             "tolerances from PyTorch's own deviation (the noise floor); delete them and set "
                             f"validation.noise_k (default {DEFAULT_K:g}) to loosen or tighten every check at once")
        return raw

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, v: list[str]) -> list[str]:
        return _dataset_names(v) if v else v  # (empty: the evaluation's datasets)


class Recipe(Strict):
    model: ModelSection
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    evaluation: Optional[EvaluationSection] = None
    compression: Optional[CompressionSection] = None
    quantization: Optional[QuantizationSection] = None
    export: Optional[ExportSection] = None
    validation: Optional[ValidationSection] = None

    def context_problems(self, context: int) -> list[str]:
        """Window lengths the model (``context`` = max_position_embeddings) was never trained for."""
        out = []
        if self.uses_calibration() and self.calibration.seqlen > context:
            out.append(f"calibration.seqlen {self.calibration.seqlen} is longer than the model's context of "
                       f"{context} tokens (max_position_embeddings): use at most {context}")
        ev = self.evaluation
        if ev is not None and ev.seqlen > context and not ev.allow_beyond_context:
            out.append(f"evaluation.seqlen {ev.seqlen} is longer than the model's context of {context} tokens "
                       f"(max_position_embeddings): use at most {context}, or set "
                       "evaluation.allow_beyond_context: true to measure beyond it on purpose")
        return out

    def streams(self) -> bool:
        """model.stream resolved: as set, else true unless evaluation.tasks needs the whole model in memory."""
        if self.model.stream is not None:
            return self.model.stream
        return not (self.evaluation is not None and self.evaluation.tasks)

    def uses_calibration(self) -> bool:
        return self.compression is not None or self.quantization is not None

    def warnings(self) -> list[str]:
        if "calibration" in self.model_fields_set and not self.uses_calibration():
            return ["the calibration section is used by no stage (there is no compression or quantization "
                    "section): this run compresses and quantizes nothing"]
        return []

    @model_validator(mode="after")
    def _cross(self) -> "Recipe":
        targets = self.export.targets if self.export else []
        if self.model.stream is True and self.evaluation is not None and self.evaluation.tasks:
            raise ValueError("evaluation.tasks scores the whole model in memory (lm-eval's HFLM): it cannot run with "
                             "model.stream: true; remove evaluation.tasks or set model.stream: false")
        if "gptq" in targets and self.quantization is None:
            raise ValueError("export.targets has 'gptq' but there is no quantization section to produce it")
        q = self.quantization
        onnx_targets = [t for t in ("onnx", "genai") if t in targets]
        if onnx_targets and q is not None and (q.bits not in (2, 4, 8) or q.permuted_groups):
            raise ValueError(f"export target {onnx_targets[0]!r} turns GPTQ weights into MatMulNBits, which needs "
                             "quantization.bits in [2, 4, 8] and groups of consecutive columns (desc_act: false, or "
                             f"static_groups: true) (got bits={q.bits}, desc_act={q.desc_act}, "
                             f"static_groups={q.static_groups})")
        if "gguf" in targets:
            self._gguf_check(q)
        if self.export and self.export.pad_value_cache and not onnx_targets:
            raise ValueError("export.pad_value_cache pads the ONNX value cache, but export.targets has no 'onnx'")
        if self.export and "attention" in self.export.model_fields_set and not onnx_targets:
            raise ValueError("export.attention chooses the ONNX attention op, but export.targets has no 'onnx' or "
                             "'genai'")
        if self.validation:
            if self.evaluation is None and self.validation.max_ppl_increase is not None:
                raise ValueError("validation.max_ppl_increase is a budget on perplexity, which needs an evaluation "
                                 "section (dataset, split, seqlen of the windows): add one or remove the key")
            if self.evaluation is None:
                raise ValueError("validation needs an evaluation section (dataset, split, seqlen of the windows)")
            for rt in self.validation.runtimes:
                if rt in RUNTIME_TARGETS and RUNTIME_TARGETS[rt] not in targets:
                    raise ValueError(f"validation.runtimes has '{rt}' but export.targets lacks "
                                     f"'{RUNTIME_TARGETS[rt]}'")
            if "onnxruntime-genai" in self.validation.runtimes and "genai" not in targets:
                c = self.compression
                if "onnx" not in targets:
                    raise ValueError("validation.runtimes has 'onnxruntime-genai' but export.targets has neither "
                                     "'genai' nor 'onnx'")
                if c is not None and c.method == "flatllm" and not self.export.pad_value_cache \
                        and self.export.attention == "standard":
                    raise ValueError("validation.runtimes has 'onnxruntime-genai', but FLAT-LLM narrows each "
                                     "layer's value heads and the 'onnx' target keeps that narrower value cache, "
                                     "which onnxruntime-genai cannot hold (it shapes the value cache like the key "
                                     "cache): remove export.attention: standard (GroupQueryAttention pads it), "
                                     "or add export target 'genai'")
        return self

    def _gguf_check(self, q) -> None:
        """What the gguf target (llama.cpp) cannot hold, refused before any work, with the fix."""
        from .quantize.ggml import ggml_blocker

        fix = "or remove 'gguf' from export.targets"
        if q is not None:
            reason = ggml_blocker(q.bits, q.group_size, q.sym, q.permuted_groups)
            if reason:
                raise ValueError(f"export target 'gguf' writes GPTQ weights as llama.cpp's Q4_0 / Q8_0 unchanged, "
                                 f"which cannot hold {reason}; {fix}")
        c = self.compression
        if c is not None and c.method == "svd-llm":
            raise ValueError("export target 'gguf': SVD-LLM stores projections as two low-rank factors, which "
                             f"llama.cpp cannot represent: use compression.method flatllm or flap, {fix}")
        if c is not None and c.method == "flatllm" and c.qk:
            raise ValueError("export target 'gguf': compression.qk: true makes Q/K low-rank per head, which "
                             f"llama.cpp cannot represent: set compression.qk: false, {fix}")
        if self.export.dtype != "float32":
            raise ValueError(f"export target 'gguf' writes float weights as F32 only (export.dtype is "
                             f"{self.export.dtype}): set export.dtype: float32, {fix}")

    def head_format(self, which: str) -> str:
        """export.embedding / export.lm_head resolved: float, int8 or int4. ``auto`` lm_head: the quantization's
        own bits when the recipe GPTQ-quantizes to 4 or 8 bits (then GPTQ-calibrated like the decoder), else
        float. ``auto`` embedding stays ``auto`` for the exporter: a tied table is read from the quantized
        lm_head's data (no extra bytes), an untied one stays float."""
        value = getattr(self.export, which) if self.export else "auto"
        if value != "auto" or which == "embedding":
            return value
        q = self.quantization
        return f"int{q.bits}" if q is not None and q.bits in (4, 8) else "float"


# validation runtime -> the export target it runs (onnxruntime-genai: the genai target, else onnx)
RUNTIME_TARGETS = {"onnxruntime": "onnx", "gptq": "gptq", "llama.cpp": "gguf"}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"recipe {source} is not valid:"]
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling; see recipes/ for the allowed keys)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        value = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
        lines.append(f"  - {path}: {msg}{value}")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``KEY.PATH=VALUE`` overrides (VALUE parsed as YAML) on a raw recipe dict."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set '{item}' must look like KEY.PATH=VALUE, e.g. compression.ratio=0.5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if "" in parts:
            raise RecipeError(f"--set '{item}': the key path '{key}' has an empty part; write e.g. compression.ratio=0.5")
        node = raw
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise RecipeError(f"--set {key}: '{p}' is a value, not a section")
            node = node[p]
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def parse_recipe(raw: dict, source: str = "<dict>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source} must be a YAML mapping of sections (model, calibration, ...)")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(exc, source)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} " + ("is a folder: give a .yaml file" if path.is_dir() else
                                                    "does not exist"))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):  # before the overrides, which walk sections
        return parse_recipe(raw, str(path))
    return parse_recipe(apply_overrides(raw, list(overrides)), str(path))


def dump_recipe(recipe: Recipe) -> str:
    raw = recipe.model_dump(exclude_none=True)
    if not recipe.uses_calibration():
        raw.pop("calibration")  # a default nobody asked for; it would read as if the run used it
    return yaml.safe_dump(raw, sort_keys=False)
