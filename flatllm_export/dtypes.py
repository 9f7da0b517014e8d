"""Float dtypes by the names recipes and commands use (model.dtype, import-gguf --dtype, activation storage). A
leaf module: every layer may use it."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
