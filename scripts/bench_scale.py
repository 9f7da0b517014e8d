"""Scale: peak memory and time of a whole ``flatllm-export run`` streamed from disk (the default for a model
stored as safetensors) against the same run with every weight in memory (``model.stream: false``), on a
random-weight Llama of several GB and on SmolLM2-135M. A benchmark, not a test.

1. Builds a random-weight Llama as sharded safetensors on disk without ever holding it whole: one decoder layer
   is generated and written at a time, each into its own shard (``model-000NN-of-000MM.safetensors``; shard 1
   holds the embedding, the last the final norm and the untied lm_head), with ``model.safetensors.index.json``,
   a Llama ``config.json`` (float32) and SmolLM2-135M's tokenizer (same vocab). Seeded; weights ~ N(0, 0.02),
   norm weights 1. Default shape (~8.2 GB fp32): hidden 2560, MLP 6912, 26 layers, 20 query / 4 KV heads of 128,
   vocab 49152. The folder is reused when it holds a complete model of the same shape and seed.
2. Runs ``flatllm-export run`` on it in a subprocess (this checkout's code: ``python -m flatllm_export.cli``
   with PYTHONPATH set to the repository; ``OMP_NUM_THREADS`` 1 unless set), streamed, or in memory with
   ``--memory``; progress bars show as the run goes.
3. Runs SmolLM2-135M with the same recipe in memory and streamed, alternating, ``--rounds`` times each.
4. Reads every stage's seconds and peak RSS from each run's report.json, and the run process's lifetime peak RSS
   (wait4), and sets it against the checkpoint's size (its safetensors files).

``--plain`` uses the plain recipe (plain_recipe: FLAT-LLM 30% with the default variant, calibration on the bundled
``general`` corpus, a small evaluation, an hf export, no quantization, no ``model.stream`` key); without it, the
recipe adds GPTQ int4 and an onnx export (make_recipe).

Writes docs/bench_scale.{md,json}. Results are kept in out/bench_scale/results.json, so ``--report-only`` (or a
later invocation of the same settings) reports every run recorded there.

    python scripts/bench_scale.py --plain --skip-small --layers 14 --hidden 2048 --intermediate 5632 --heads 16
    python scripts/bench_scale.py --plain --skip-small --memory ...   # the same model in memory
    python scripts/bench_scale.py --plain --skip-big --rounds 3       # SmolLM2 both ways, alternating
    python scripts/bench_scale.py --report-only                       # the docs from results.json
    python scripts/bench_scale.py --build-only --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2
    python scripts/bench_scale.py --time-layers --layers 2   # per-layer FLAT-LLM / GPTQ times at the big width
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flatllm_export.stages import maxrss_bytes  # noqa: E402
from common import commit  # noqa: E402  (scripts/common.py)

DOCS = ROOT / "docs"
OUT = ROOT / "out" / "bench_scale"
MODEL_CACHE = Path(os.environ.get("FLATLLM_EXPORT_CACHE", Path.home() / ".cache" / "flatllm-export")) / "bench-scale"
SMALL = "smollm2-135m"
SMALL_FP32_MB = 538  # SmolLM2-135M's fp32 safetensors (tied embedding written once)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MARKER = "bench_scale_model.json"  # written last: the folder holds a complete model of these settings
RUNTIME_MB = 300  # the bound's allowance for the Python / torch runtime
BOUND_STAGES = ("compress", "quantize")


# ---- the random-weight model ----------------------------------------------------------------------------------

def shape_of(args) -> dict:
    head_dim = args.head_dim or args.hidden // args.heads
    return {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": head_dim, "vocab": args.vocab, "seed": args.seed, "std": 0.02}


def layer_shapes(s: dict, i: int) -> dict[str, tuple[int, ...]]:
    h, p = s["hidden"], f"model.layers.{i}."
    return {p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (s["heads"] * s["head_dim"], h),
            p + "self_attn.k_proj.weight": (s["kv_heads"] * s["head_dim"], h),
            p + "self_attn.v_proj.weight": (s["kv_heads"] * s["head_dim"], h),
            p + "self_attn.o_proj.weight": (h, s["heads"] * s["head_dim"]),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (s["intermediate"], h),
            p + "mlp.up_proj.weight": (s["intermediate"], h),
            p + "mlp.down_proj.weight": (h, s["intermediate"])}


def shard_shapes(s: dict) -> list[dict[str, tuple[int, ...]]]:
    """Tensor shapes of every shard: the embedding, one shard per decoder layer, then the final norm + lm_head."""
    return ([{"model.embed_tokens.weight": (s["vocab"], s["hidden"])}]
            + [layer_shapes(s, i) for i in range(s["layers"])]
            + [{"model.norm.weight": (s["hidden"],), "lm_head.weight": (s["vocab"], s["hidden"])}])


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fp32_bytes(s: dict) -> int:
    return 4 * sum(numel(v) for shard in shard_shapes(s) for v in shard.values())


def llama_config(s: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
            "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False,
            "initializer_range": s["std"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
            "use_cache": True}


def model_complete(folder: Path, s: dict) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    n = len(shard_shapes(s))
    return marker.get("shape") == s and all((folder / shard_name(k, n)).is_file() for k in range(n))


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def check_disk(folder: Path, need: int, what: str) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        sys.exit(f"bench_scale: {what} needs about {need / 1e9:.1f} GB of disk, but the file system of {probe} has "
                 f"{free / 1e9:.1f} GB free: free space, pass --model-dir / --out on a larger disk, or shrink the "
                 "model (--layers, --hidden, --intermediate)")


def build_model(folder: Path, s: dict) -> dict:
    """The random-weight Llama in ``folder`` (built unless already complete): one shard at a time, so at most one
    decoder layer (or the embedding / lm_head) is ever in memory. Returns facts about it."""
    import torch
    from safetensors.torch import save_file

    from flatllm_export.modeling.loading import resolve_model_path

    size = fp32_bytes(s)
    shards = shard_shapes(s)
    info = {"path": str(folder), "fp32_bytes": size, "fp32_gb": round(size / 1e9, 2), "shards": len(shards),
            "parameters": size // 4, "shape": s}
    if model_complete(folder, s):
        print(f"bench_scale: reusing {folder} ({size / 1e9:.2f} GB fp32, {len(shards)} shards)", flush=True)
        marker = json.loads((folder / MARKER).read_text())
        return {**info, **{k: marker.get(k) for k in ("built_seconds", "builder_peak_rss_mb")}}
    print(f"bench_scale: building a random-weight Llama of {size / 1e9:.2f} GB fp32 ({size // 4 / 1e9:.2f}B "
          f"parameters) in {folder}, one shard at a time", flush=True)
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete or different model (no marker, or another shape / seed)
    folder.mkdir(parents=True)
    t0 = time.time()
    weight_map, total = {}, 0
    for k, shapes in enumerate(shards):
        gen = torch.Generator().manual_seed(s["seed"] * 1_000_003 + k)  # each shard its own stream: order-free
        tensors = {}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape)
            else:
                tensors[name] = torch.randn(shape, generator=gen).mul_(s["std"])
        name = shard_name(k, len(shards))
        save_file(tensors, str(folder / (name + ".tmp")), metadata={"format": "pt"})
        os.chmod(folder / (name + ".tmp"), 0o644)
        os.replace(folder / (name + ".tmp"), folder / name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({t: name for t in tensors})
        del tensors
        print(f"  {name}  {(k + 1) / len(shards):5.0%}  {total / 1e9:6.2f} GB  {time.time() - t0:5.0f} s", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    (folder / "config.json").write_text(json.dumps(llama_config(s), indent=1) + "\n")
    tok_dir = Path(resolve_model_path(SMALL))
    for f in TOKENIZER_FILES:
        if (tok_dir / f).is_file():
            shutil.copy2(tok_dir / f, folder / f)
    info["built_seconds"] = round(time.time() - t0, 1)
    import resource

    info["builder_peak_rss_mb"] = round(maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20, 1)
    (folder / MARKER).write_text(json.dumps({"shape": s, "fp32_bytes": total, "built_seconds": info["built_seconds"],
                                             "builder_peak_rss_mb": info["builder_peak_rss_mb"],
                                             "tokenizer_from": str(tok_dir)}, indent=1) + "\n")
    print(f"bench_scale: built {folder}: {total / 1e9:.2f} GB in {info['built_seconds']:.0f} s, peak RSS "
          f"{info['builder_peak_rss_mb']:.0f} MB", flush=True)
    return info


def default_model_dir(s: dict) -> Path:
    return MODEL_CACHE / (f"llama-L{s['layers']}-h{s['hidden']}-i{s['intermediate']}-q{s['heads']}-kv{s['kv_heads']}"
                          f"-d{s['head_dim']}-v{s['vocab']}-s{s['seed']}")


# ---- recipes and runs -----------------------------------------------------------------------------------------

def stream_supported() -> bool:
    from flatllm_export.recipe import ModelSection

    return "stream" in ModelSection.model_fields


def plain_recipe(model_path: str, stream: bool, args) -> dict:
    """A plain recipe: FLAT-LLM at --ratio with the library's default variant, calibration on the bundled
    ``general`` corpus (the default dataset), a small evaluation, an hf export, no quantization. Streamed: no
    ``model.stream`` key (the default); in memory: ``model.stream: false``."""
    model = {"path": model_path}
    if not stream:
        model["stream"] = False
    return {"model": model,
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size},
            "evaluation": {"seqlen": args.eval_seqlen, "max_windows": args.eval_windows,
                           "batch_size": args.batch_size},
            "compression": {"method": "flatllm", "ratio": args.ratio},
            "export": {"targets": ["hf"]}}


def make_recipe(model_path: str, stream: bool, args, group_size: int) -> dict:
    if args.plain:
        return plain_recipe(model_path, stream, args)
    model = {"path": model_path, "dtype": "float32", "device": "cpu"}
    if stream_supported():
        model["stream"] = stream
    elif stream:
        sys.exit("bench_scale: this checkout has no model.stream recipe key (streaming has not landed here): "
                 "merge it first, or run --memory")
    calibration = {"dataset": "shakespeare", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                   "batch_size": args.batch_size}
    if args.activation_dtype:
        calibration["activation_dtype"] = args.activation_dtype
    recipe = {
        "model": model,
        "calibration": calibration,
        "evaluation": {"dataset": "shakespeare", "split": "test", "seqlen": args.eval_seqlen,
                       "max_windows": args.eval_windows, "batch_size": args.batch_size},
        "compression": {"method": "flatllm", "ratio": args.ratio, "allocation": "iprs", "variant": args.variant},
        "quantization": {"method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": False,
                         "damp_percent": 0.01},
        "export": {"targets": args.targets.split(","), "dtype": "float16"},
    }
    if args.validate:
        recipe["validation"] = {"runtimes": ["torch", "onnxruntime"], "sample_windows": 1, "generate_tokens": 8}
    return recipe


def settings_key(recipe: dict) -> str:
    """The settings that make two results comparable: the recipe without the model section and the group size
    (chosen per model)."""
    quant = {k: v for k, v in (recipe.get("quantization") or {}).items() if k != "group_size"}
    return json.dumps({**{k: v for k, v in recipe.items() if k != "model"}, "quantization": quant}, sort_keys=True)


def run_recipe(run_id: str, recipe: dict, out_root: Path) -> dict:
    """``flatllm-export run`` in a child process (progress on this terminal); the report's stages and the child's
    own lifetime peak RSS (wait4)."""
    out_root.mkdir(parents=True, exist_ok=True)
    recipe_path = out_root / f"{run_id}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    output = out_root / run_id
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "flatllm_export.cli", "run", str(recipe_path), "--output", str(output)]
    if (output / "report.json").is_file():
        cmd.append("--overwrite")
    print(f"\nbench_scale: {run_id}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    report_file = output / "report.json"
    if proc.returncode not in (0, 3) or not report_file.is_file():  # 3: finished, a parity check failed
        sys.exit(f"bench_scale: {run_id} failed (exit {proc.returncode}); its recipe is {recipe_path}")
    rep = json.loads(report_file.read_text())
    comp = rep.get("compression", {})
    return {"run": run_id, "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
            "process_peak_rss_mb": round(maxrss_bytes(usage.ru_maxrss) / 2**20, 1), "output": str(output),
            "stages": {k: {f: v[f] for f in ("seconds", "start_rss_mb", "peak_rss_mb", "peak_cuda_mb", "ppl") if f in v}
                       for k, v in rep["stages"].items()},
            "perplexity": rep.get("perplexity"), "model": rep.get("model"),
            "achieved_ratio": comp.get("achieved_ratio"), "variant": (comp.get("options") or {}).get("mlp_select"),
            "exports": {t: {k: v for k, v in e.items() if k in ("path", "dtype", "int4", "nodes", "passed")}
                        for t, e in (rep.get("exports") or {}).items()},
            "validation_passed": (rep.get("validation") or {}).get("passed"),
            "output_bytes": folder_bytes(output)}


def folder_bytes(folder: Path) -> dict:
    return {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in folder.iterdir() if p.is_dir()}


# ---- a memory bound for compress and quantize -----------------------------------------------------------------

def bound(config: dict, nsamples: int, seqlen: int, runtime_mb: float | None = None) -> dict:
    """embeddings + lm_head + 2 decoder layers (fp32, from config.json) + calibration activations (2 buffers of
    nsamples x seqlen x hidden fp32) + 300 MB. A tied lm_head is counted as its own tensor too (as the bound is stated;
    GPTQ's quantized head is one)."""
    s = {"layers": config["num_hidden_layers"], "hidden": config["hidden_size"],
         "intermediate": config["intermediate_size"], "heads": config["num_attention_heads"],
         "kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
         "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
         "vocab": config["vocab_size"]}
    mb = 2**20
    embed = 4 * s["vocab"] * s["hidden"]
    layer = 4 * sum(numel(v) for v in layer_shapes(s, 0).values())
    acts = nsamples * seqlen * s["hidden"] * 4 * 2
    total_params = (2 - config.get("tie_word_embeddings", False)) * embed + s["layers"] * layer + 4 * s["hidden"]
    parts = {"embeddings_mb": embed / mb, "lm_head_mb": embed / mb, "two_layers_mb": 2 * layer / mb,
             "activations_mb": acts / mb, "runtime_mb": RUNTIME_MB}
    out = {**{k: round(v, 1) for k, v in parts.items()}, "bound_mb": round(sum(parts.values()), 1),
           "model_fp32_mb": round(total_params / mb, 1)}
    if runtime_mb is not None:  # the same bound with the runtime's measured resident memory instead of 300 MB
        out["runtime_measured_mb"] = runtime_mb
        out["bound_measured_runtime_mb"] = round(sum(parts.values()) - RUNTIME_MB + runtime_mb, 1)
    return out


def runtime_rss_mb() -> float:
    """Resident memory of a fresh process that has imported what a run imports (torch, transformers, the package,
    the exporters, onnxruntime) and holds no model: the run's fixed cost, measured, against the bound's 300 MB."""
    code = ("import flatllm_export.api, flatllm_export.modeling, flatllm_export.compress, flatllm_export.quantize, "
            "exporters.hf, exporters.onnx, onnxruntime, os\n"
            "print(int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE'))")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return round(int(out.stdout.split()[-1]) / 2**20, 1)


def model_config(model_path: str) -> dict:
    from flatllm_export.modeling.loading import resolve_model_path

    return json.loads((Path(resolve_model_path(model_path)) / "config.json").read_text())


# ---- per-layer timing at the big width (before the big run) ---------------------------------------------------

def time_layers(args, folder: Path) -> dict:
    """In memory, on a few-layer model of the big width: seconds per decoder layer of block influence, FLAT-LLM
    (both variants) and GPTQ, of GPTQ on the lm_head, and of one evaluation window, to estimate the big run."""
    import torch

    import flatllm_export.quantize as quantize
    from flatllm_export import data
    from flatllm_export.compress import compress
    from flatllm_export.modeling import load_model, load_tokenizer
    from flatllm_export.recipe import CompressionSection, QuantizationSection
    from flatllm_export.evaluate import perplexity, torch_logits_fn

    torch.manual_seed(0)
    tok = load_tokenizer(str(folder))
    calib = data.calibration_windows(data.tokenize(tok, data.shakespeare_text("train")), args.nsamples,
                                     args.seqlen, 0)
    evalw = data.evaluation_windows(data.tokenize(tok, data.shakespeare_text("test")), args.eval_seqlen,
                                    args.eval_windows)
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    out = {"layers_timed": layers, "calibration": list(calib.shape)}
    model = load_model(str(folder))
    t0 = time.time()
    perplexity(torch_logits_fn(model), evalw, args.batch_size)
    out["evaluate_seconds"] = round(time.time() - t0, 1)
    for variant in args.time_variants.split(","):
        model = load_model(str(folder))
        t0 = time.time()
        rep = compress(model, calib, CompressionSection(method="flatllm", ratio=args.ratio, variant=variant),
                       "cpu", args.batch_size, 128)
        out[f"flatllm_{variant}"] = {"seconds": round(time.time() - t0, 1),
                                     "importance_seconds": rep["importance_seconds"],
                                     "per_layer_seconds": round(rep["compress_seconds"] / layers, 1),
                                     "achieved_ratio": rep["achieved_ratio"]}
        print(f"bench_scale: FLAT-LLM {variant}: {out[f'flatllm_{variant}']}", flush=True)
    head = {}
    orig = quantize.quantize_lm_head

    def timed_head(*a, **k):
        t = time.time()
        r = orig(*a, **k)
        head["seconds"] = round(time.time() - t, 1)
        return r

    quantize.quantize_lm_head = timed_head  # this process only: to tell the head's time from the layers'
    try:
        t0 = time.time()
        quantize.quantize_model(model, calib, QuantizationSection(bits=4, group_size=128), "cpu", args.batch_size,
                                lm_head_bits=4)
        total = time.time() - t0
    finally:
        quantize.quantize_lm_head = orig
    out["gptq"] = {"seconds": round(total, 1), "lm_head_seconds": head["seconds"],
                   "per_layer_seconds": round((total - head["seconds"]) / layers, 1), "after": "the last variant"}
    print(f"bench_scale: GPTQ: {out['gptq']}", flush=True)
    return out


# ---- report ---------------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**20, 1),
            "disk_free_gb": round(shutil.disk_usage(ROOT).free / 1e9, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def goals(result: dict) -> dict:
    b, st = result["bound"], result["stages"]
    g = {f"{s}_within_bound": st[s]["peak_rss_mb"] <= b["bound_mb"] for s in BOUND_STAGES if s in st}
    if "bound_measured_runtime_mb" in b:
        g.update({f"{s}_within_bound_measured_runtime": st[s]["peak_rss_mb"] <= b["bound_measured_runtime_mb"]
                  for s in BOUND_STAGES if s in st})
    if "compress" in st:
        g["compress_below_half_fp32"] = st["compress"]["peak_rss_mb"] < b["model_fp32_mb"] / 2
    g["max_stage_peak_rss_mb"] = max(v["peak_rss_mb"] for v in st.values())
    g["max_stage"] = max(st, key=lambda k: st[k]["peak_rss_mb"])
    return g


def checkpoint_bytes(model_path: str) -> int:
    """Bytes of the model's safetensors files (the checkpoint a run reads)."""
    from flatllm_export.modeling.loading import resolve_model_path

    return sum(f.stat().st_size for f in Path(resolve_model_path(model_path)).glob("*.safetensors"))


def write_docs(results: list[dict], notes: list[str]) -> None:
    """docs/bench_scale.{md,json}: per model, streamed against in memory (medians over rounds): the whole run's
    peak RSS against the checkpoint, seconds, and every stage's seconds and peak."""
    gib, mib = 2**30, 2**20
    by_model: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        by_model.setdefault(r["label"], {}).setdefault(r["mode"], []).append(r)
    summary = ["| model | checkpoint GiB | mode | runs | whole run peak RSS GiB | peak / checkpoint | below half the "
               "checkpoint | largest stage (peak MiB) | runtime + embeddings + lm_head MiB | whole run s (median) | "
               "s streamed / in memory |", "|" + "---|" * 11]
    stages = ["| model | stage | s in memory | s streamed | streamed / in memory | peak RSS MiB in memory | "
              "peak RSS MiB streamed |", "|" + "---|" * 7]
    rows = []
    for label, modes in by_model.items():
        mem, st = modes.get("in memory", []), modes.get("streamed", [])
        wall = {m: statistics.median(r["wall_seconds"] for r in rs) for m, rs in modes.items()}
        ratio = f"{wall['streamed'] / wall['in memory']:.2f}" if mem and st else "-"
        for mode in ("in memory", "streamed"):
            rs = modes.get(mode, [])
            if not rs:
                continue
            ck = rs[0]["checkpoint_bytes"]
            peak = max(r["process_peak_rss_mb"] for r in rs) * mib
            row = {"model": label, "checkpoint_gib": round(ck / gib, 2), "mode": mode, "runs": len(rs),
                   "whole_run_peak_gib": round(peak / gib, 2), "peak_over_checkpoint": round(peak / ck, 2),
                   "below_half_checkpoint": peak < ck / 2, "whole_run_seconds_median": wall[mode],
                   "seconds_streamed_over_in_memory": ratio if mode == "streamed" else None}
            top = max((r for r in rs), key=lambda r: r["goals"]["max_stage_peak_rss_mb"])["goals"]
            b = rs[0]["bound"]
            row.update(largest_stage=top["max_stage"], largest_stage_peak_mb=top["max_stage_peak_rss_mb"],
                       resident_floor_mb=round(b.get("runtime_measured_mb", b["runtime_mb"]) + b["embeddings_mb"]
                                               + b["lm_head_mb"]))
            rows.append(row)
            summary.append(f"| {label} | {row['checkpoint_gib']} | {mode} | {len(rs)} | {row['whole_run_peak_gib']}"
                           f" | {row['peak_over_checkpoint']} | {'yes' if row['below_half_checkpoint'] else 'no'} "
                           f"| {row['largest_stage']} ({row['largest_stage_peak_mb']:.0f}) | "
                           f"{row['resident_floor_mb']} | {wall[mode]:.1f} | {ratio if mode == 'streamed' else ''} |")
        names = list(dict.fromkeys(k for r in mem + st for k in r["stages"]))
        for name in names:
            def med(rs, field):
                v = [r["stages"][name][field] for r in rs if name in r["stages"]]
                return statistics.median(v) if v else None

            sm, ss = med(mem, "seconds"), med(st, "seconds")
            pm = max((r["stages"][name]["peak_rss_mb"] for r in mem if name in r["stages"]), default=None)
            ps = max((r["stages"][name]["peak_rss_mb"] for r in st if name in r["stages"]), default=None)
            cells = [f"{sm:.1f}" if sm is not None else "-", f"{ss:.1f}" if ss is not None else "-",
                     f"{ss / sm:.2f}" if sm and ss is not None else "-",
                     f"{pm:.0f}" if pm is not None else "-", f"{ps:.0f}" if ps is not None else "-"]
            stages.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    commands = list(dict.fromkeys((r.get("command", "?"), r.get("commit", "?")) for r in results))
    facts = results[0].get("machine", {})
    first = next((r for r in results if r["mode"] == "streamed"), results[0])
    recipe = {**first["recipe"], "model": {**first["recipe"]["model"], "path": "<model>"}}
    md = ["## Scale: memory and time of a streamed run against one in memory (`scripts/bench_scale.py`)", "",
          "Measured with " + "; ".join(f"`{c}` at commit `{h}`" for c, h in commands) + ".", "",
          f"Machine: {facts.get('cpu')}, {facts.get('cores')} cores, {facts.get('memory_gb')} GiB RAM; Python "
          f"{facts.get('python')}, torch {facts.get('torch')}; every run with one thread (`OMP_NUM_THREADS="
          f"{facts.get('omp_num_threads')}`).", "",
          "Each row is `flatllm-export run` in its own process, on this recipe (streamed: as shown, `model.stream` "
          "unset, which streams a model stored as safetensors; in memory: the same with `model.stream: false`):", "",
          "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "",
          "*Whole run peak RSS* is the run process's lifetime maximum resident memory (wait4's ru_maxrss), against "
          "the checkpoint's size (the bytes of its safetensors files). Stage peaks are resident memory sampled every "
          "20 ms during the stage (report.json `stages.<name>.peak_rss_mb`); both include the Python / torch runtime "
          "and the mapped pages of safetensors files read. Seconds are medians over the runs of a mode; runs of the "
          "two modes alternate. *Runtime + embeddings + lm_head* is what a streamed run holds throughout: a fresh "
          "process that has imported what a run imports (measured), and the embedding and head tables in fp32 "
          "(counted apart even when tied). The random model's weights are N(0, 0.02) (seeded), its norms 1, its head untied, "
          "its tokenizer SmolLM2's: its perplexity means nothing, only memory and time do.", "",
          *summary, "", *stages, ""]
    if notes:
        md += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "bench_scale.json").write_text(json.dumps({"commands": [{"command": c, "commit": h} for c, h in commands],
                                                      "machine": facts, "summary": rows, "results": results,
                                                      "notes": notes}, indent=1) + "\n")
    (DOCS / "bench_scale.md").write_text("\n".join(md))
    print("\n".join(md))


# ---- main -----------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("random-weight model")
    g.add_argument("--layers", type=int, default=26)
    g.add_argument("--hidden", type=int, default=2560)
    g.add_argument("--intermediate", type=int, default=6912)
    g.add_argument("--heads", type=int, default=20)
    g.add_argument("--kv-heads", type=int, default=4)
    g.add_argument("--head-dim", type=int, default=None, help="default hidden / heads")
    g.add_argument("--vocab", type=int, default=49152, help="SmolLM2's tokenizer has 49152 tokens: keep >= that")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--model-dir", type=Path, default=None,
                   help=f"where the model is built (default under {MODEL_CACHE}); reused when complete and matching")
    g = ap.add_argument_group("runs")
    g.add_argument("--out", type=Path, default=OUT, help="run outputs and results.json (default out/bench_scale)")
    g.add_argument("--ratio", type=float, default=0.3)
    g.add_argument("--variant", choices=["paper", "ablation"], default="paper",
                   help="FLAT-LLM variant (default paper: the ablation's greedy MLP selection is slow at 6912 wide)")
    g.add_argument("--nsamples", type=int, default=16)
    g.add_argument("--seqlen", type=int, default=256)
    g.add_argument("--eval-windows", type=int, default=4)
    g.add_argument("--eval-seqlen", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--activation-dtype", choices=["model", "float32", "bfloat16", "float16"], default=None,
                   help="calibration.activation_dtype (default: the recipe's default)")
    g.add_argument("--targets", default="hf,onnx", help="export targets, comma-separated")
    g.add_argument("--validate", action="store_true", help="add a validation section (torch + onnxruntime)")
    g.add_argument("--plain", action="store_true", help="the plain recipe (plain_recipe): FLAT-LLM with the "
                   "default variant, general calibration, hf export, no quantization, no model.stream key")
    g.add_argument("--rounds", type=int, default=1, help="SmolLM2 runs per mode, alternating in-memory / streamed")
    g.add_argument("--note", action="append", default=[], help="a note for the docs (repeatable)")
    g.add_argument("--memory", action="store_true", help="run the random model in memory (stream: false)")
    g.add_argument("--skip-big", action="store_true", help="no random-weight model run")
    g.add_argument("--skip-small", action="store_true", help="no SmolLM2-135M runs")
    g.add_argument("--keep", action="store_true", help="keep the big run's output folder (default: deleted after "
                   "its report is read, to free disk)")
    g.add_argument("--report-only", action="store_true", help="write the docs from out/bench_scale/results.json "
                   "(every run recorded there) without running anything")
    g.add_argument("--build-only", action="store_true", help="build the random model and stop")
    g.add_argument("--time-layers", action="store_true", help="time FLAT-LLM / GPTQ per layer on the random model "
                   "in memory (use a small --layers at the big width) and stop")
    g.add_argument("--time-variants", default="paper,ablation")
    args = ap.parse_args(argv)

    s = shape_of(args)
    folder = (args.model_dir or default_model_dir(s)).expanduser().resolve()
    size = fp32_bytes(s)
    print(f"bench_scale: random model {s}: {size / 1e9:.2f} GB fp32 ({size // 4 / 1e9:.2f}B parameters)", flush=True)
    if args.time_layers or args.build_only:
        if not model_complete(folder, s):
            check_disk(folder, size, "building the model")
        info = build_model(folder, s)
        if args.time_layers:
            out = time_layers(args, folder)
            out["model"] = info
            OUT.mkdir(parents=True, exist_ok=True)
            path = OUT / f"time-layers-L{s['layers']}-h{s['hidden']}-i{s['intermediate']}.json"
            path.write_text(json.dumps(out, indent=1) + "\n")
            print(json.dumps(out, indent=1))
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the runs inherit it: one thread each unless set otherwise
    command = "python scripts/bench_scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine()
    runtime_mb = facts["runtime_rss_mb"] = runtime_rss_mb()
    results_file = args.out / "results.json"
    cached = json.loads(results_file.read_text()) if results_file.is_file() else {}
    notes: list[str] = list(args.note)
    fresh: dict[str, dict] = {}

    def record(run_id, label, mode, recipe, model_path, extra=None):
        res = run_recipe(run_id, recipe, args.out)
        cfg = model_config(model_path)
        res.update(label=label, mode=mode, recipe=recipe, settings=settings_key(recipe),
                   bound=bound(cfg, args.nsamples, args.seqlen, runtime_mb), command=command, commit=commit(),
                   machine=facts, checkpoint_bytes=checkpoint_bytes(model_path), **(extra or {}))
        res["goals"] = goals(res)
        fresh[run_id] = res
        if results_file.is_file():  # another invocation may have recorded runs meanwhile
            cached.update(json.loads(results_file.read_text()))
        cached[run_id] = res
        args.out.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(cached, indent=1) + "\n")
        return res

    if args.report_only:
        args.skip_small = args.skip_big = True
    if not args.skip_small:
        for r in range(args.rounds):  # alternating, so a change in the machine's load hits both modes alike
            for stream in (False, True):
                mode = "streamed" if stream else "in memory"
                suffix = f"-r{r + 1}" if args.rounds > 1 else ""
                record(f"smollm2-135m{'-plain' if args.plain else ''}-{'stream' if stream else 'memory'}{suffix}",
                       "SmolLM2-135M", mode, make_recipe(SMALL, stream, args, 32), SMALL, {"round": r + 1})
    if not args.skip_big:
        need = (0 if model_complete(folder, s) else size) + 2 * size  # model + run outputs and streamed layers
        check_disk(folder, need, f"the random model ({size / 1e9:.1f} GB) and its run's outputs (~2x)")
        info = build_model(folder, s)
        run_id = (f"random-{s['layers']}L-h{s['hidden']}{'-plain' if args.plain else ''}-"
                  f"{'memory' if args.memory else 'stream'}")
        res = record(run_id, f"random Llama {size // 4 / 1e9:.2f}B", "in memory" if args.memory else "streamed",
                     make_recipe(str(folder), not args.memory, args, 128), str(folder), {"model_built": info})
        if not args.keep:
            shutil.rmtree(res["output"], ignore_errors=True)
    # this invocation's rows, plus earlier ones of the same settings (e.g. the big run before a --skip-big rerun)
    settings = {r["settings"] for r in fresh.values()}
    results = [r for k, r in cached.items() if k in fresh or r["settings"] in settings or not fresh]
    if results:
        write_docs(results, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
