"""A VLM whose decoder projections are streamed from a store: the model the session runs.

`build_flash_model(store, ...)` builds the transformers model from the config saved in the store
directory on the meta device (no weight is allocated), swaps every decoder projection for a
`ProjectionView` of a shared `FlashProjections`, and then fills in only what stays in RAM: the
resident tensors of the store (vision tower, projector, embeddings, norms, LM head) and the
non-persistent buffers (rotary frequencies, position ids), which are computed from the config by the
model's own initialiser. The key sets of the store and of the model must match exactly.

Input, group and output names and the calibration prefix are shared with the converter
(store/naming.py). A layer-wise selection takes each input's sparsity from the store's allocation
(store/allocation.py): `FlashVLM.settings_for(input)` is what every flash layer selects with.

The HF attention and MLP code calls q_proj(x), k_proj(x), v_proj(x) one after the other on the same
tensor x. The views of one input share a `SharedProjections`: the first call runs the flash layer
once for all projections, the others take their output from it (same tensor object and version
only; anything else recomputes, so results are always right).

Cancellation (cancel.py): before every decoder layer and every layer of the vision tower the model
asks `FlashVLM.cancel` (set by the session for the duration of one call); when it says stop, the
layer raises `Cancelled` instead of running.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from nchunk_core.runtime.adapters import adapter_class
from nchunk_core.io.latency import LatencyTable
from nchunk_core.runtime.cancel import CancelCheck, Cancelled
from nchunk_core.runtime.layers import FlashProjections, Workspace
from nchunk_core.runtime.row_cache import RowCache, build_cache
from nchunk_core.runtime.select import CACHE_POLICIES, SelectionSettings
from nchunk_core.store import Store, StoreFormatError
from nchunk_core.store.allocation import SparsityAllocation
from nchunk_core.store.naming import CALIBRATION_PREFIX, input_name

# Modules that turn pixels into visual tokens, timed as "vision" (module paths in the model).
VISION_MODULES = {
    "llava_onevision": ("model.vision_tower", "model.multi_modal_projector"),
    "qwen2_5_vl": ("model.visual",),
    "smolvlm": ("model.vision_model", "model.connector"),
    "idefics3": ("model.vision_model", "model.connector"),
}

# observer(phase, input_name, x [..., in]) sees every flash layer input (original channel order)
Observer = Callable[[str, str, torch.Tensor], None]


def load_config(path):
    """The transformers config saved in a model or store directory (offline)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (a store holds the model's config next to "
                                f"its manifest; a checkpoint directory must contain it)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ValueError(f"{path / 'config.json'}: cannot build a model config from it: {exc}") from exc


def meta_model(config) -> nn.Module:
    """The model for `config` with every parameter and buffer on the meta device (no memory)."""
    from transformers import AutoModelForImageTextToText

    adapter_class(config.model_type)  # clear error for an unsupported architecture
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval()


def tied_keys(model: nn.Module) -> dict[str, str]:
    """{tied parameter: its source} (e.g. lm_head.weight -> embed_tokens.weight when tied)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {str(k): str(v) for k, v in dict(tied).items()}


class SharedProjections:
    """One flash call per input tensor, handed out to the projection views that read it."""

    def __init__(self, flash: FlashProjections, owner: "FlashVLM"):
        self.flash = flash
        self.owner = owner
        self._x: torch.Tensor | None = None
        self._version = -1
        self._outs: tuple[torch.Tensor, ...] = ()
        self._taken: set[int] = set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        fresh = self._x is not x or self._version != x._version or index in self._taken
        if fresh:
            if self.owner.observer is not None:
                self.owner.observer(self.owner.phase, self.flash.input_name, x)
            self._outs = self.flash(x)
            self._x, self._version, self._taken = x, x._version, set()
        self._taken.add(index)
        out = self._outs[index]
        if len(self._taken) == len(self._outs):  # every view served: hold nothing between calls
            self._x, self._outs = None, ()
        return out


class ProjectionView(nn.Module):
    """Stands in for one nn.Linear of the decoder: output `index` of a shared flash call."""

    def __init__(self, shared: SharedProjections, index: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        object.__setattr__(self, "_shared", shared)  # not a submodule: shared by several views
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self._shared.output(self.index, x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input={self._shared.flash.input_name!r}, output {self.index}")


def per_input_settings(selection: SelectionSettings,
                       allocation: SparsityAllocation | None) -> dict[str, SelectionSettings]:
    """The settings of each input for `selection`: {} when every input takes `selection` as it is
    (uniform allocation, no store allocation, dense, sparsity 0), else input name -> `selection`
    with that input's sparsity from the store's allocation."""
    if (selection.allocation != "layerwise" or allocation is None or selection.method == "dense"
            or selection.sparsity == 0.0):
        return {}
    return {name: dataclasses.replace(selection, sparsity=s)
            for name, s in allocation.at(selection.sparsity).items()}


class FlashVLM:
    """The built model plus its flash layers, the selection settings in force (spread over the
    inputs by the store's allocation), per-call statistics and vision timing."""

    def __init__(self, model: nn.Module, arch: str, layers: dict[str, FlashProjections],
                 stats: list, selection: SelectionSettings, store: Store | None = None,
                 workspace: Workspace | None = None, allocation: SparsityAllocation | None = None):
        self.model = model
        self.store = store
        self.workspace = workspace  # reader, row stream and row cache shared by the layers
        self.arch = arch
        self.layers = layers  # input name -> FlashProjections
        self.stats = stats  # CallStats of every flash call since the last clear
        self.allocation = allocation  # the store's layer-wise sparsity, or None
        # input name -> settings that replace the resolved ones (sensitivity measurement); None: none
        self.overrides: dict[str, SelectionSettings] | None = None
        self.selection = selection  # read by every flash layer at each call (settings_for)
        self.observer: Observer | None = None
        self.phase = ""  # what the session is appending (passed to the observer)
        self.vision_s = 0.0
        self._vision_t0 = 0.0
        self.cancel: CancelCheck | None = None  # asked before every layer (the session sets it per call)
        layer_lists = [adapter_class(arch).decoder_layers(model)]
        for path in VISION_MODULES.get(arch, ()):
            module = model.get_submodule(path)
            module.register_forward_pre_hook(self._vision_start)
            module.register_forward_hook(self._vision_stop)
            layer_lists += [m for m in module.modules() if isinstance(m, nn.ModuleList)]
        for layers in layer_lists:
            for layer in layers:
                layer.register_forward_pre_hook(self._check_cancel)

    def _check_cancel(self, module, args):
        if self.cancel is not None and self.cancel():
            raise Cancelled("stopped at a layer boundary")

    def set_ram_budget(self, budget_bytes: int, policy: str = CACHE_POLICIES[0]) -> RowCache:
        """Replace the row cache by one planned for `budget_bytes` (0: none) that keeps its rows by
        `policy` (select.CACHE_POLICIES); the old one is freed first."""
        ws = self.workspace
        with ws.lock:
            ws.cache = RowCache()
            ws.stream.forget()  # remembered selections may hold rows that become cached
            if budget_bytes > 0:
                inputs = {name: (layer.groups, layer.handles) for name, layer in self.layers.items()}
                ws.cache = build_cache(self.store, ws.reader, inputs, ws.device, budget_bytes, policy)
            return ws.cache

    @property
    def selection(self) -> SelectionSettings:
        return self._selection

    @selection.setter
    def selection(self, value: SelectionSettings) -> None:
        self._per_input = per_input_settings(value, self.allocation)
        self._selection = value

    def settings_for(self, input_name: str) -> SelectionSettings:
        """The settings the flash layer of `input_name` selects with at this call."""
        if self.overrides is not None:
            return self.overrides.get(input_name, self._selection)
        return self._per_input.get(input_name, self._selection)

    def _vision_start(self, module, args):
        self._vision_t0 = time.perf_counter()

    def _vision_stop(self, module, args, output):
        self.vision_s += time.perf_counter() - self._vision_t0


def _materialise_buffers(model: nn.Module, device: torch.device) -> None:
    """Give the non-persistent buffers real memory and let the model's initialiser compute them.

    Parameters are still on the meta device here, where the initialiser's writes cost nothing.
    """
    for name, buf in list(model.named_buffers()):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(parent)
        if buf is not None and buf.is_meta and leaf in module._non_persistent_buffers_set:
            module._buffers[leaf] = torch.empty_like(buf, device=device)
    model.initialize_weights()


def _swap_projections(flash_model: FlashVLM, store: Store, table: LatencyTable, workspace: Workspace,
                      device: torch.device, dtype: torch.dtype, biases: dict) -> None:
    """Replace every decoder nn.Linear by a view of its input's FlashProjections, checking shapes."""
    model = flash_model.model
    for i, layer in enumerate(adapter_class(flash_model.arch).projection_groups(model)):
        for kind, paths in layer.items():
            name = input_name(i, kind)
            if not store.groups_for_input(name):
                raise StoreFormatError(f"{store.path}: no matrix group for input {name!r} "
                                       f"(projections {', '.join(p.rsplit('.', 1)[-1] for p in paths)})")
            flash = FlashProjections(store, name, table, lambda name=name: flash_model.settings_for(name),
                                     workspace, dtype=dtype,
                                     biases=biases, stats_sink=flash_model.stats).to(device)
            if flash.outputs != paths:
                raise StoreFormatError(f"{store.path}: input {name!r} holds outputs {flash.outputs}, "
                                       f"expected {paths}")
            shared = SharedProjections(flash, flash_model)
            for j, p in enumerate(paths):
                linear = model.get_submodule(p)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{p} is a {type(linear).__name__}, expected nn.Linear")
                if (linear.in_features, linear.out_features) != (flash.rows, flash.out_features[j]):
                    raise StoreFormatError(
                        f"{store.path}: {p} is [{linear.out_features}, {linear.in_features}] in the "
                        f"config but [{flash.out_features[j]}, {flash.rows}] in the store")
                if (linear.bias is not None) != (p in biases):
                    raise StoreFormatError(f"{store.path}: {p} {'has' if linear.bias is not None else 'has no'}"
                                           f" bias in the config, but resident tensor {p + '.bias'!r} is "
                                           f"{'missing' if linear.bias is not None else 'present'}")
                parent, _, leaf = p.rpartition(".")
                setattr(model.get_submodule(parent), leaf,
                        ProjectionView(shared, j, linear.in_features, linear.out_features))
            flash_model.layers[name] = flash


def _load_resident(model: nn.Module, store: Store, names: set[str], tied: dict[str, str],
                   device: torch.device, dtype: torch.dtype) -> None:
    """Assign the resident tensors (cast to `dtype`) to the meta model, then tie what is tied."""
    expected = set(model.state_dict())
    missing = sorted(expected - names - set(tied))
    extra = sorted(names - expected)
    if missing or extra:
        raise StoreFormatError(
            f"{store.path}: resident tensors do not match the model built from config.json: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    _materialise_buffers(model, device)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    resident = {}
    for k in sorted(names):  # one at a time: never the whole file in two dtypes at once
        v = store.resident(device, [k])[k]
        if tuple(v.shape) != shapes[k]:
            raise StoreFormatError(f"{store.path}: resident tensor {k!r} has shape {list(v.shape)}, "
                                   f"the model expects {list(shapes[k])}")
        resident[k] = v.to(dtype) if v.is_floating_point() else v
    model.load_state_dict(resident, strict=False, assign=True)
    del resident
    for target, source in tied.items():
        if target not in names:
            parent, _, leaf = target.rpartition(".")
            setattr(model.get_submodule(parent), leaf, model.get_parameter(source))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise StoreFormatError(f"{store.path}: tensors without values after loading: {left[:5]}")


def build_flash_model(store: Store, table: LatencyTable, selection: SelectionSettings,
                      workspace: Workspace, device="cpu", dtype: torch.dtype = torch.float32,
                      stats: list | None = None, allocation: SparsityAllocation | None = None) -> FlashVLM:
    """The store's VLM with streamed decoder projections (see the module docstring); `allocation`
    spreads a layer-wise selection's sparsity over the inputs (store/allocation.py)."""
    device = torch.device(device)
    config = load_config(store.path)
    stored_arch = store.model_info.get("arch")
    if stored_arch is not None and stored_arch != config.model_type:
        raise StoreFormatError(f"{store.path}: manifest says arch {stored_arch!r} but config.json "
                               f"says {config.model_type!r}")
    model = meta_model(config)
    tied = tied_keys(model)
    flash_model = FlashVLM(model, config.model_type, {}, [] if stats is None else stats, selection, store, workspace,
                           allocation)
    names = {n for n in store.resident_names() if not n.startswith(CALIBRATION_PREFIX)}
    paths = [p for layer in adapter_class(config.model_type).projection_groups(model)
             for group in layer.values() for p in group]
    biases = {k[:-len(".bias")]: t
              for k, t in store.resident("cpu", [p + ".bias" for p in paths if p + ".bias" in names]).items()}
    _swap_projections(flash_model, store, table, workspace, device, dtype, biases)
    _load_resident(model, store, names - {p + ".bias" for p in biases}, tied, device, dtype)
    model.config.use_cache = True
    return flash_model
