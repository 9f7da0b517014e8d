"""Train the bundled reference models from scratch, deterministically, on CPU.

    python scripts/train_reference.py ref-llama      # multi-head attention, Llama-2-like
    python scripts/train_reference.py ref-gqa        # grouped-query attention, Mistral-like

Each writes models/<name>/ in Hugging Face format (config.json, model.safetensors, tokenizer files) plus
training_log.json (loss curve, held-out perplexity). A byte-level BPE tokenizer is trained on the same
train split of the bundled Shakespeare corpus. The same seed and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from flatllm_export import data  # noqa: E402

VOCAB = 4096
COMMON = dict(
    vocab_size=VOCAB, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=32,
    max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=0,
)
MODELS = {
    # MHA: 8 query heads, 8 KV heads; MLP 2.5x
    "ref-llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=8, intermediate_size=640)),
    # GQA: 8 query heads share 2 KV heads (groups of 4, as Llama-3-8B / Mistral-7B); MLP 2.75x
    "ref-gqa": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, intermediate_size=704, sliding_window=None)),
}


def train_tokenizer(text: str) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)],
                            vocab_size=VOCAB, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=1024)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int) -> float:
    model.eval()
    windows = data.evaluation_windows(tokens, seqlen)
    nll, count = 0.0, 0
    for batch in windows.split(16):
        out = model(input_ids=batch, labels=batch)
        n = batch.numel() - batch.shape[0]
        nll += out.loss.item() * n
        count += n
    model.train()
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="fixed thread count keeps runs bit-reproducible")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or ROOT / "models" / args.name
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    train_text = data.shakespeare_text("train")
    tok = train_tokenizer(train_text)
    train_ids = data.tokenize(tok, train_text)
    val_ids = data.tokenize(tok, data.shakespeare_text("validation"))
    test_ids = data.tokenize(tok, data.shakespeare_text("test"))
    print(f"tokens: train {train_ids.numel()}, validation {val_ids.numel()}, test {test_ids.numel()}", flush=True)

    config_cls, model_cls, extra = MODELS[args.name]
    config = config_cls(**COMMON, **extra)
    model = model_cls(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    log = {"loss_steps": [], "loss": [], "eval_steps": [], "val_ppl": []}
    t0 = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, train_ids.numel() - args.seqlen - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 20 == 0:
            log["loss_steps"].append(step)
            log["loss"].append(round(loss.item(), 4))
        if step % 200 == 0 or step == args.steps:
            ppl = perplexity(model, val_ids, args.seqlen)
            log["eval_steps"].append(step)
            log["val_ppl"].append(round(ppl, 3))
            print(f"step {step}/{args.steps} loss {loss.item():.3f} val ppl {ppl:.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    train_seconds = time.time() - t0
    test_ppl = perplexity(model, test_ids, args.seqlen)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log.update(name=args.name, parameters=n_params, train_seconds=round(train_seconds, 1), threads=args.threads,
               steps=args.steps, batch=args.batch, seqlen=args.seqlen, lr=args.lr, seed=args.seed,
               test_ppl=round(test_ppl, 3), test_plays=list(data.SHAKESPEARE_TEST))
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"done in {train_seconds:.0f}s: test ppl {test_ppl:.2f} -> {out}", flush=True)


if __name__ == "__main__":
    main()
