"""Read a local Hugging Face VLM checkpoint tensor by tensor, checked against its architecture.

`Checkpoint(model_dir)` reads config.json, builds the architecture on the meta device (shapes only,
no memory) and reads the headers of every safetensors shard (one `model.safetensors`, or the shards
named by `model.safetensors.index.json`). Before any tensor is loaded it checks that every key of
the checkpoint maps to a parameter of the model, that every parameter is present (tied ones may be
absent), and that every shape matches; any mismatch is a `CheckpointError` naming the key, file and
shapes. `tensor(key)` then loads one tensor at a time (memory-mapped shards), so a converter never
holds more than the group it is writing.

Keys are the model's own state-dict keys (transformers 5.x layout). Checkpoints saved in an older
layout (the one transformers still writes on `save_pretrained`) are renamed with LEGACY_KEYS.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import torch

from nchunk_core.runtime.flash_model import load_config, meta_model, tied_keys
from nchunk_core.runtime.adapters import ADAPTERS, adapter_class
from nchunk_core.store.naming import SAFETENSORS_DTYPES, STORAGE_DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# Older key layouts, per architecture: (pattern, replacement), the first that matches is used.
LEGACY_KEYS = {
    "llava_onevision": [
        (r"^language_model\.lm_head\.", "lm_head."),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^vision_tower\.vision_model\.", "model.vision_tower."),
        (r"^vision_tower\.", "model.vision_tower."),
        (r"^multi_modal_projector\.", "model.multi_modal_projector."),
        (r"^image_newline$", "model.image_newline"),
    ],
    "qwen2_5_vl": [
        (r"^visual\.", "model.visual."),
        (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    ],
    "smolvlm": [],
    "idefics3": [],  # SmolVLM v1 checkpoints already use the model's own names
}
# Keys some checkpoints carry that the model computes itself.
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """The checkpoint does not fit its architecture: keys or shapes, named in the message."""


@dataclasses.dataclass(frozen=True)
class TensorRef:
    key: str  # model key
    source: str  # key in the checkpoint file
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name (F32, F16, BF16, ...)


def _shard_files(root: Path) -> list[Path]:
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: shard(s) named in {INDEX} are missing: {', '.join(missing[:5])}")
        return [root / f for f in files]
    if (root / SINGLE).is_file():
        return [root / SINGLE]
    shards = sorted(root.glob("*.safetensors"))
    if shards:
        return shards
    other = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
    hint = f" (found {', '.join(other[:3])}: convert it to safetensors first)" if other else ""
    raise FileNotFoundError(f"{root}: no safetensors weights ({SINGLE} or {INDEX}){hint}")


class Checkpoint:
    """A validated checkpoint directory (see the module docstring). Use as a context manager."""

    def __init__(self, model_dir):
        from safetensors import safe_open

        self.path = Path(model_dir)
        if not self.path.is_dir():
            raise FileNotFoundError(f"model directory {self.path} does not exist")
        self.config = load_config(self.path)
        self.arch = self.config.model_type
        if self.arch not in ADAPTERS:
            raise CheckpointError(f"{self.path}: architecture {self.arch!r} is not supported; "
                                  f"supported: {', '.join(sorted(ADAPTERS))}")
        model = meta_model(self.config)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # model key -> shape
        self.tied = tied_keys(model)
        self.plan = adapter_class(self.arch).projection_groups(model)  # per layer {kind: [paths]}
        self.text_layers = len(self.plan)
        del model
        self.files = _shard_files(self.path)
        self._handles: dict[Path, object] = {}
        self.refs: dict[str, TensorRef] = {}
        rules = [(re.compile(p), r) for p, r in LEGACY_KEYS[self.arch]]
        unexpected = []
        for file in self.files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own error type for damaged files
                raise CheckpointError(f"{file}: not a readable safetensors file: {exc}") from exc
            self._handles[file] = handle
            for source in handle.keys():
                key = self._model_key(source, rules)
                if key is None:
                    if not IGNORED_KEYS.search(source):
                        unexpected.append(f"{source} ({file.name})")
                    continue
                view = handle.get_slice(source)
                ref = TensorRef(key, source, file, tuple(view.get_shape()), view.get_dtype())
                if key in self.refs:
                    raise CheckpointError(f"{self.path}: {key!r} appears twice, as {self.refs[key].source!r} "
                                          f"in {self.refs[key].file.name} and {source!r} in {file.name}")
                if ref.shape != self.shapes[key]:
                    raise CheckpointError(f"{file.name}: tensor {source!r} has shape {list(ref.shape)}, but "
                                          f"the {self.arch} config expects {list(self.shapes[key])} "
                                          f"for {key!r}")
                if ref.dtype not in SAFETENSORS_DTYPES:
                    raise CheckpointError(f"{file.name}: tensor {source!r} is {ref.dtype}; expected one of "
                                          f"{', '.join(SAFETENSORS_DTYPES)} (quantised checkpoints are not supported)")
                self.refs[key] = ref
        if unexpected:
            raise CheckpointError(f"{self.path}: {len(unexpected)} tensor(s) that the {self.arch} model "
                                  f"does not have: {', '.join(unexpected[:5])}"
                                  f"{' ...' if len(unexpected) > 5 else ''}")
        missing = sorted(set(self.shapes) - set(self.refs) - set(self.tied))
        if missing:
            raise CheckpointError(f"{self.path}: {len(missing)} tensor(s) of the {self.arch} model are "
                                  f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    def _model_key(self, source: str, rules) -> str | None:
        if source in self.shapes:
            return source
        for pattern, replacement in rules:
            if pattern.search(source):
                key = pattern.sub(replacement, source, count=1)
                return key if key in self.shapes else None
        return None

    # -- contents -----------------------------------------------------------------------------------
    def projection_paths(self) -> set[str]:
        return {p for layer in self.plan for paths in layer.values() for p in paths}

    def resident_keys(self) -> list[str]:
        """Every tensor that stays in RAM: all but the decoder projection weights (biases stay)."""
        streamed = {p + ".weight" for p in self.projection_paths()}
        return [k for k in self.refs if k not in streamed]

    def dtype(self) -> str:
        """The dtype of the decoder projections ("float32", "float16" or "bfloat16")."""
        first = self.plan[0]["attn_in"][0]
        return SAFETENSORS_DTYPES[self.refs[first + ".weight"].dtype]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(r.shape) * STORAGE_DTYPES[SAFETENSORS_DTYPES[r.dtype]].itemsize for r in self.refs.values())

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor by model key, loaded from its shard."""
        ref = self.refs[key]
        return self._handles[ref.file].get_tensor(ref.source)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
