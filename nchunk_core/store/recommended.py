"""The settings a store was validated at: the manifest's optional `recommended` object.

    "recommended": {"sparsity": 0.1, "method": "chunking", "max_frames": 1, "max_new_tokens": 4,
                    "basis": "how these were found"}

`nchunk convert` records the settings that reproduce the checkpoint (sparsity 0), `nchunk train-demo`
the ones measured for the built-in model; `set_recommended` records new ones in an existing store
(for example after `nchunk bench accuracy`), rewriting only that field of the manifest, atomically.
`Store.recommended` is a `Recommended`, or None for a store written before stores carried one.
Keys other than these are ignored when reading, so a later nchunk may add some.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from pathlib import Path

from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.store.format import MANIFEST, StoreFormatError, check_header, write_text_atomically

KEY = "recommended"


@dataclasses.dataclass(frozen=True)
class Recommended:
    """Recommended run-time settings of one store (the names are the node's parameters)."""

    sparsity: float  # fraction of each projection's input rows not read, in [0, 1)
    method: str  # row selection: dense | magnitude | chunking | dp
    max_frames: int  # frames kept in context
    max_new_tokens: int  # answer length limit in tokens
    basis: str = ""  # for people: what these settings were validated with

    def __post_init__(self):
        selection = SelectionSettings(self.sparsity, self.method)  # the one check of these two
        object.__setattr__(self, "sparsity", selection.sparsity)
        for name in ("max_frames", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.basis, str):
            raise ValueError(f"basis must be a string, got {self.basis!r}")

    @property
    def selection(self) -> SelectionSettings:
        """sparsity and method as the runtime takes them (per-matrix default windows)."""
        return SelectionSettings(self.sparsity, self.method)

    def to_json(self) -> dict:
        out = {"sparsity": self.sparsity, "method": self.method, "max_frames": self.max_frames,
               "max_new_tokens": self.max_new_tokens}
        if self.basis:
            out["basis"] = self.basis
        return out

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Recommended | None":
        """The manifest's recommended settings; None when it has none; StoreFormatError when malformed."""
        entry = manifest.get(KEY)
        if entry is None:
            return None
        where = f"{MANIFEST}: {KEY}"
        if not isinstance(entry, dict):
            raise StoreFormatError(f"{where} must be an object, got {type(entry).__name__}")
        missing = [k for k in ("sparsity", "method", "max_frames", "max_new_tokens") if k not in entry]
        if missing:
            raise StoreFormatError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(entry["sparsity"], entry["method"], entry["max_frames"], entry["max_new_tokens"],
                       entry.get("basis", ""))
        except ValueError as exc:
            raise StoreFormatError(f"{where}: {exc}") from exc


def set_recommended(store_dir, recommended: Recommended) -> Path:
    """Record `recommended` in the manifest of the store in `store_dir`; every other field, and the
    order of the keys, stays as it was. Atomic: written to a temporary file, synced, then renamed
    over the manifest. Returns the manifest's path."""
    if not isinstance(recommended, Recommended):
        raise TypeError(f"recommended must be a Recommended, got {type(recommended).__name__}")
    from nchunk_core.store.loader import Store  # the store must open before and after

    store = Store.open(store_dir, check_alignment=False)
    path = store.path / MANIFEST
    text = path.read_text()
    manifest = json.loads(text)
    check_header(manifest)
    manifest[KEY] = recommended.to_json()
    write_text_atomically(path, json.dumps(manifest, indent=1) + ("\n" if text.endswith("\n") else ""))
    Store.open(store.path, check_alignment=False)
    return path
