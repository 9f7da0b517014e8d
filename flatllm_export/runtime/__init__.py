"""Runtimes other than PyTorch: an onnxruntime session wrapper with per-layer KV buffers."""
