"""The reference models: held-out perplexity, training curve, and the naive-truncation sanity figure
(drop the second half of every head's value dims and of every MLP's channels, no calibration).

    python scripts/bench_reference.py      # writes docs/reference.{md,json} and docs/training_curve.png
"""

from __future__ import annotations

import json

import torch
from common import DOCS, ROOT, load_model, ppl, save, table, windows

from flatllm_export import accounting
from flatllm_export.compress.surgery import reshape_layer


def naive_truncate(model, keep: float) -> None:
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        s, attn, mlp = cfg.layer_shapes[i], layer.self_attn, layer.mlp
        dv, kv, h = s["v_head_dim"], s["num_kv_heads"], s["num_heads"]
        r, k = int(dv * keep), int(s["intermediate_size"] * keep)
        wv = attn.v_proj.weight.view(kv, dv, -1)[:, :r].reshape(kv * r, -1)
        wo = attn.o_proj.weight.view(-1, h, dv)[:, :, :r].reshape(-1, h * r)
        reshape_layer(layer, cfg, i, {"self_attn.v_proj.weight": wv, "self_attn.o_proj.weight": wo,
                                      "mlp.gate_proj.weight": mlp.gate_proj.weight[:k],
                                      "mlp.up_proj.weight": mlp.up_proj.weight[:k],
                                      "mlp.down_proj.weight": mlp.down_proj.weight[:, :k]},
                      v_head_dim=r, intermediate_size=k)


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name in ("ref-llama", "ref-gqa"):
        log = json.loads((ROOT / "models" / name / "training_log.json").read_text())
        win = windows(name)
        model = load_model(name)
        dense = ppl(model, win)
        naive = load_model(name)
        naive_truncate(naive, 0.5)
        cfg = model.config
        rows.append({"model": name, "type": cfg.source_model_type,
                     "shape": f"{cfg.num_hidden_layers}L h{cfg.hidden_size} {cfg.num_attention_heads}q/"
                              f"{cfg.num_key_value_heads}kv MLP {cfg.intermediate_size}",
                     "params (M)": accounting.model_params(model) / 1e6,
                     "MB": (ROOT / "models" / name / "model.safetensors").stat().st_size / 2**20,
                     "train steps": log["steps"], "train min": log["train_seconds"] / 60,
                     "held-out ppl": dense, "naive 50% ppl": ppl(naive, win)})
        loss_steps = log.get("loss_steps") or [20 * (i + 1) for i in range(len(log["loss"]))]  # logged every 20
        axes[0].plot(loss_steps, log["loss"], label=name)
        axes[1].plot(log["eval_steps"], log["val_ppl"], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="train loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="validation ppl", title="validation perplexity", yscale="log")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    DOCS.mkdir(exist_ok=True)
    fig.savefig(DOCS / "training_curve.png", dpi=110)
    md = ("Held-out perplexity: Hamlet, The Tempest, Much Ado (never trained on), windows of 256 tokens. "
          "'naive 50%' drops the second half of every head's value dims and of every MLP's channels with no "
          "calibration.\n\n" + table(rows, list(rows[0])))
    save("reference", rows, md)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
