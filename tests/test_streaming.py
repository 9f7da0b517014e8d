"""Streaming (model.stream): decoder layers read from disk one at a time give bitwise the results of the model in
memory; at most one decoder layer is ever materialized; activation storage options; bad inputs."""

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flatllm_export import data
from flatllm_export.api import run
from flatllm_export.calibration import activation_storage
from flatllm_export.compress import compress_flap, compress_flatllm
from flatllm_export.evaluate import model_perplexity, perplexity, torch_logits_fn
from flatllm_export.modeling import load_model, load_tokenizer
from flatllm_export.modeling.streaming import StreamError, layers_of
from flatllm_export.quantize import quantize_model
from flatllm_export.recipe import QuantizationSection, parse_recipe
from .test_reliability import main_err, text_file, tiny_recipe, write_recipe  # noqa: F401 (fixture)


@functools.cache
def _tokens(split: str) -> torch.Tensor:
    return data.tokenize(load_tokenizer("ref-llama"), data.shakespeare_text(split)[:200_000])


def windows(n=16, t=64, seed=0):
    """Calibration windows of the plays (seed 0: train split; other seeds: test split, for evaluation)."""
    return data.calibration_windows(_tokens("train" if seed == 0 else "test"), n, t, seed)


def layers_on_meta(model) -> bool:
    return all(p.device.type == "meta" for layer in model.model.layers for p in layer.parameters())


def layer_state(model) -> dict:
    store, out = layers_of(model), {}
    for i in range(len(store)):
        layer = store.load(i)
        out.update({f"{i}.{k}": v.clone() for k, v in layer.state_dict().items()})
        store.release(i, layer)
        del layer  # else it lives on while the next one loads
    return out


@pytest.mark.parametrize("method", ["flatllm", "flap"])
def test_streamed_compression_and_gptq_hold_one_layer_and_match_memory(method, tmp_path):
    """The same calibration on the in-memory and the streamed model: identical layer tensors and shapes, and the
    streamed store never had more than one decoder layer alive (counted by the modules it handed out)."""
    x = windows()
    q = QuantizationSection(bits=4, group_size=32)
    results = {}
    for stream in (False, True):
        model = load_model("ref-gqa", stream=stream, work_dir=tmp_path / "layers")
        if method == "flatllm":
            compress_flatllm(model, x, 0.3, linear_multiple=32, batch_size=4)
        else:
            compress_flap(model, x, 0.3, batch_size=4, linear_multiple=32)
        quantize_model(model, x, q, batch_size=4, lm_head_bits=4)
        ppl = model_perplexity(model, windows(4, 64, 1), batch_size=2)
        results[stream] = (layer_state(model), model.config.layer_shapes, ppl, model.lm_head.qweight.clone())
        if stream:
            store = layers_of(model)
            assert store.peak_live == 1 and store.live == 0 and store.loads >= 3 * len(store)
            assert layers_on_meta(model)  # nothing of any decoder layer stays in the model
            # one file per layer: its latest version (quantized; compressed before unless the plan kept it whole)
            assert sorted(p.name.split(".")[0] for p in (tmp_path / "layers").iterdir()) == \
                [f"layer-{i:05d}" for i in range(len(store))]
    (a, shapes_a, ppl_a, head_a), (b, shapes_b, ppl_b, head_b) = results[False], results[True]
    assert shapes_a == shapes_b and a.keys() == b.keys() and ppl_a == ppl_b and torch.equal(head_a, head_b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_layerwise_perplexity_is_the_models_perplexity():
    model = load_model("ref-llama")
    w = windows(6, 40)
    got, want = model_perplexity(model, w, batch_size=4), perplexity(torch_logits_fn(model), w, 4)
    assert got["tokens"] == want["tokens"] and abs(got["ppl"] - want["ppl"]) / want["ppl"] < 1e-6
    streamed = load_model("ref-llama", stream=True)
    assert torch.equal(torch_logits_fn(streamed)(w[:2]), torch_logits_fn(model)(w[:2]))


def test_activation_storage_spill_is_exact_and_bfloat16_is_close(tmp_path):
    x = windows()
    shapes = {}
    for name, storage in {"memory": {}, "spill": {"spill_dir": tmp_path / "spill"},
                          "bf16": {"dtype": torch.bfloat16}}.items():
        model = load_model("ref-llama")
        with activation_storage(**storage):
            compress_flatllm(model, x, 0.3, batch_size=4)
        shapes[name] = (model.config.layer_shapes, model_perplexity(model, windows(4, 64, 1), 2)["ppl"])
    assert shapes["spill"] == shapes["memory"]
    assert not any((tmp_path / "spill").iterdir())  # the mapped files are gone when calibration ends
    assert shapes["bf16"][1] != shapes["memory"][1]
    assert abs(shapes["bf16"][1] - shapes["memory"][1]) / shapes["memory"][1] < 0.05


def _run_recipe(tmp_path, name, stream):
    raw = yaml.safe_load(Path("recipes/ref-gqa-full.yaml").read_text())
    raw["model"].pop("stream", None)
    if stream is not None:  # None: the default
        raw["model"]["stream"] = stream
    raw["calibration"].update(nsamples=16, seqlen=128)
    raw["evaluation"].update(seqlen=128, max_windows=4)
    raw["validation"]["generate_tokens"] = 8
    raw["export"]["targets"] = ["hf", "gptq", "onnx"]
    raw["validation"]["runtimes"] = ["torch", "gptq", "onnxruntime"]
    return run(parse_recipe(raw), tmp_path / name)


def assert_each_part_once(rep: dict) -> None:
    """No part of a report (a dict or list of more than 200 characters of JSON) is written twice: each section
    once, the stages' entries for timing and what no section holds."""
    seen = {}

    def walk(node, path):
        if isinstance(node, (dict, list)):
            text = json.dumps(node, sort_keys=True)
            if len(text) > 200:
                assert text not in seen, f"{path} repeats {seen.get(text)}"
                seen[text] = path
            for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                walk(v, f"{path}.{k}")

    walk(rep, "report")
    assert not any(k.startswith("_") for k in rep)


def test_streamed_run_writes_the_same_files(tmp_path, monkeypatch):
    """The whole recipe (FLAT-LLM, GPTQ, every export, validation) with model.stream: false and with the default,
    which streams: every exported file is byte-identical and every perplexity equal; the streamed run leaves no
    layer files behind. Each run opens its ONNX export and reloads its GPTQ checkpoint once: validation uses what
    the exporters' self-checks opened."""
    import exporters.gptq
    from flatllm_export import api
    from flatllm_export.runtime.ort import OrtDecoder

    opened = []
    init = OrtDecoder.__init__
    monkeypatch.setattr(OrtDecoder, "__init__", lambda self, folder, *a, **k: (
        opened.append(Path(folder).name), init(self, folder, *a, **k))[1])
    for module in (exporters.gptq, api):
        monkeypatch.setattr(module, "load_model", functools.partial(
            lambda load, path, *a, **k: (opened.append(Path(path).name), load(path, *a, **k))[1], module.load_model))
    mem, streamed = _run_recipe(tmp_path, "memory", False), _run_recipe(tmp_path, "stream", None)
    assert sorted(opened) == sorted(["ref-gqa", "gptq", "onnx"] * 2), opened  # the model, then each export once
    assert "most_layers_in_memory" not in mem["model"]
    for name in ("memory", "stream"):
        assert_each_part_once(json.loads((tmp_path / name / "report.json").read_text()))
    assert mem["perplexity"] == streamed["perplexity"]
    assert streamed["model"]["most_layers_in_memory"] == 1 and streamed["validation"]["passed"]
    files = sorted(p.relative_to(tmp_path / "memory") for p in (tmp_path / "memory").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "stream") for p in (tmp_path / "stream").rglob("*")
                           if p.is_file())
    for f in files:
        if f.name not in ("report.json", "report.md", "recipe.yaml", "allocation.png", "validation.json"):
            assert (tmp_path / "memory" / f).read_bytes() == (tmp_path / "stream" / f).read_bytes(), f


# ---- bad input

def test_missing_shard_named_before_any_work(capsys, tmp_path, tiny_model_dir, text_file):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    state = load_model(str(model)).state_dict()
    from flatllm_export.modeling.shards import write_sharded

    for f in model.glob("*.safetensors"):
        f.unlink()
    write_sharded(model, ({k: v} for k, v in state.items()), max_shard_bytes=2**20)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (model / gone).unlink()
    with pytest.raises(StreamError, match=f"lists the shard {gone}, which is missing"):
        load_model(str(model), stream=True)
    raw = tiny_recipe(model, text_file)
    raw["model"]["stream"] = True
    recipe = write_recipe(tmp_path, raw)
    rc, err = main_err(capsys, "run", recipe, "--output", tmp_path / "out")
    assert rc == 2 and f"lists the shard {gone}, which is missing from {model}" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("key", ["model.stream_dir", "calibration.spill_dir"])
def test_unwritable_stream_or_spill_folder_refused(key, capsys, tmp_path, tiny_model_dir, text_file):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    section, leaf = key.split(".")
    raw = tiny_recipe(tiny_model_dir, text_file, compression={"ratio": 0.3})
    raw.setdefault(section, {})[leaf] = str(blocker / "sub")
    raw["model"]["stream"] = True
    rc, err = main_err(capsys, "check", write_recipe(tmp_path, raw))
    assert rc == 2 and key in err and "is a file" in err and str(blocker) in err, err


def test_disk_full_while_writing_a_layer(capsys, monkeypatch, tmp_path, tiny_model_dir, text_file):  # noqa: F811
    import errno
    import os

    from flatllm_export.modeling import streaming

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # part of the file made it before the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(streaming, "save_file", full)
    raw = tiny_recipe(tiny_model_dir, text_file, compression={"ratio": 0.3},
                      calibration={"dataset": str(text_file), "nsamples": 4, "seqlen": 32})
    raw["model"]["stream"] = True
    rc, err = main_err(capsys, "run", write_recipe(tmp_path, raw), "--output", tmp_path / "out")
    assert rc == 2 and f"could not write {tmp_path}/out.partial/.layers/layer-00000.v1.safetensors" in err, err
    assert "No space left on device" in err and "free disk space" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- memory of writing shards

def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise OSError("no RssFile")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_shard_check_holds_one_tensor_of_the_written_file(tmp_path, monkeypatch):
    """write_sharded reads each shard back to compare it: the file's mapped pages read must not pile up into the
    whole shard (they stay resident until the file is closed), only one tensor's at a time."""
    import flatllm_export.modeling.shards as shards

    mb = 16
    tensors = {f"t{i}": torch.randn(mb * 2**18) for i in range(12)}  # 12 x 16 MiB in one shard
    seen = []
    equal = torch.equal

    def sampled_equal(a, b):
        out = equal(a, b)
        seen.append(_rss_file_mb())
        return out

    monkeypatch.setattr(shards.torch, "equal", sampled_equal)
    base = _rss_file_mb()
    shards.write_sharded(tmp_path, [tensors])
    assert len(seen) == len(tensors)
    assert max(seen) - base < 3 * mb, f"file-backed RSS grew by {max(seen) - base:.0f} MiB while checking a shard"
