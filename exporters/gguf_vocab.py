"""Tokenizer metadata of a GGUF export (llama.cpp's ``tokenizer.*`` keys).

A model imported from a GGUF keeps its source's own tokenizer metadata (``gguf_tokenizer.json`` beside the
imported folder, written by ``import-gguf``). Otherwise the keys come from the Hugging Face tokenizer through the
``gguf`` package's own vocabularies: ``BpeVocab`` (byte-level BPE: SmolLM2, Llama-3, GPT-2 style) or
``SentencePieceVocab`` (SentencePiece with its tokenizer.model: Llama-2, Mistral), and ``SpecialVocab`` (merges, special token
ids, add-BOS/EOS flags, chat template). llama.cpp splits text before BPE with a named pre-tokenizer; the name is
read from the tokenizer's split pattern (``PRE_TOKENIZERS``), and an unknown pattern is refused.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from flatllm_export.modeling.gguf_import import GGUF_TOKENIZER_FILE

from . import ExportError

# split pattern of a byte-level BPE tokenizer (tokenizer.json pre_tokenizer) -> llama.cpp's pre-tokenizer name
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {GPT2_PATTERN: "gpt-2", LLAMA3_PATTERN: "llama-bpe"}  # names in llama.cpp's llama-vocab.cpp


def _split_pattern(pre: dict | None) -> str | None:
    """The regex a tokenizer.json pre_tokenizer splits by (ByteLevel with use_regex: GPT-2's), or None."""
    if not pre:
        return None
    if pre.get("type") == "Sequence":
        patterns = [_split_pattern(p) for p in pre.get("pretokenizers", [])]
        found = [p for p in patterns if p]
        return found[0] if len(found) == 1 else None
    if pre.get("type") == "Split":
        return pre.get("pattern", {}).get("Regex")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return GPT2_PATTERN
    return None


def write_tokenizer(writer, tokenizer, vocab_size: int) -> dict:
    """Add the tokenizer's metadata to ``writer``; returns what was written (model, pre-tokenizer, source)."""
    import gguf

    kept = Path(getattr(tokenizer, "name_or_path", "") or ".") / GGUF_TOKENIZER_FILE
    if kept.is_file():
        fields = json.loads(kept.read_text())
        for key, f in fields.items():
            types = [gguf.GGUFValueType(t) for t in f["types"]]
            writer.add_key_value(key, f["value"], types[0], sub_type=types[-1] if len(types) > 1 else None)
        return {"model": fields.get("tokenizer.ggml.model", {}).get("value"),
                "pre": fields.get("tokenizer.ggml.pre", {}).get("value"), "source": "the imported GGUF's own"}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        folder = Path(tmp)
        spec = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").exists() else {}
        bpe = spec.get("model", {}).get("type") == "BPE" and not spec["model"].get("byte_fallback", False)
        if bpe:
            vocab, pattern = gguf.vocab.BpeVocab(folder), _split_pattern(spec.get("pre_tokenizer"))
            pre = PRE_TOKENIZERS.get(pattern)
            if pre is None:
                raise ExportError(f"the tokenizer splits text with a pattern llama.cpp's pre-tokenizers are not known "
                                  f"to match here ({pattern!r}); known: {sorted(PRE_TOKENIZERS.values())}. Import "
                                  "the model from a GGUF of it (its tokenizer metadata is kept) or use the onnx/hf "
                                  "targets")
        elif (folder / "tokenizer.model").exists():  # SentencePiece with its scores (LlamaHfVocab has none)
            vocab, pre = gguf.vocab.SentencePieceVocab(folder), "default"
        else:
            raise ExportError("the tokenizer is neither byte-level BPE (tokenizer.json) nor SentencePiece with its "
                              "tokenizer.model, which the gguf target reads")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        for added in spec.get("added_tokens", []):  # as llama.cpp's converter marks them
            if added["id"] < len(types):
                types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        if len(tokens) > vocab_size:
            raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model's vocab_size is {vocab_size}")
        for i in range(len(tokens), vocab_size):  # rows of the embedding no token names
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if not bpe:
            writer.add_token_scores(scores)
        gguf.SpecialVocab(folder, load_merges=bpe, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    return {"model": vocab.tokenizer_model, "pre": pre, "source": "the Hugging Face tokenizer"}
