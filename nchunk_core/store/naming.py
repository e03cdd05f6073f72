"""Names shared by the converter, the store and the runtime: inputs, groups, calibration, dtypes.

- input name  ``layers.{i}.{kind}``, kind in attn_in, attn_out, mlp_in, mlp_out (one activation,
  one selection, one permutation),
- group name  ``layers.{i}.qkv | o | gate_up | down`` when bundled, ``layers.{i}.q_proj`` ... when not,
- output name the projection's module path in the model (``model.language_model.layers.0.self_attn
  .q_proj``); its bias, if any, is the resident tensor ``<output name>.bias``,
- calibration statistics are resident tensors under ``calibration/`` (not model weights),
- dtype names: ``float32``, ``float16``, ``bfloat16``, for stored rows and for computation alike.

NumPy only: importing this module never imports torch (`torch_dtype` does, when called).
"""
from __future__ import annotations

import numpy as np

CALIBRATION_PREFIX = "calibration/"
BUNDLED_GROUP_NAMES = {"attn_in": "qkv", "attn_out": "o", "mlp_in": "gate_up", "mlp_out": "down"}

DTYPES = ("float32", "float16", "bfloat16")
# dtype name -> numpy dtype the rows are held in (numpy has no bfloat16: its bits are kept as uint16)
STORAGE_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}
# safetensors header dtype -> dtype name (the float types a checkpoint may hold)
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def torch_dtype(name: str):
    """The torch dtype of a dtype name (one of DTYPES); imports torch."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


def input_name(layer: int, kind: str) -> str:
    return f"layers.{layer}.{kind}"


def group_names(layer: int, kind: str, paths: list[str], bundled: bool) -> list[str]:
    """Store group names for the projections `paths` of one input (one name if bundled)."""
    if bundled:
        return [f"layers.{layer}.{BUNDLED_GROUP_NAMES[kind]}"]
    return [f"layers.{layer}.{p.rsplit('.', 1)[-1]}" for p in paths]
