"""The settings a store was validated at: the manifest's `recommended` object, Store.recommended,
set_recommended (only that field changes, atomically), and what the shipped store records."""
import json

import numpy as np
import pytest

from nchunk_core.demo.model import RECOMMENDED, shipped_store
from nchunk_core.runtime.select import SelectionSettings
from nchunk_core.store import (Recommended, Store, StoreError, StoreFormatError, StoreWriter,
                               set_recommended)


@pytest.fixture
def store_dir(tmp_path):
    path = tmp_path / "store"
    rng = np.random.default_rng(0)
    with StoreWriter(path, model_info={"arch": "test", "layers": 1}) as w:
        w.add_group("layers.0.mlp.down_proj", "layers.0.mlp_out",
                    [("down_proj", rng.standard_normal((32, 64)).astype(np.float32))], layer=0)
        w.add_resident("norm.weight", np.ones(32, dtype=np.float32))
    return path


def test_a_store_without_recommended_settings_opens_with_none(store_dir):
    assert "recommended" not in json.loads((store_dir / "manifest.json").read_text())
    assert Store.open(store_dir).recommended is None


def test_set_recommended_changes_only_that_field(store_dir):
    manifest_path = store_dir / "manifest.json"
    before = json.loads(manifest_path.read_text())
    files_before = {p.name: p.read_bytes() for p in store_dir.iterdir() if p.name != "manifest.json"}
    rec = Recommended(sparsity=0.25, method="magnitude", max_frames=3, max_new_tokens=16, basis="a test")
    assert set_recommended(store_dir, rec) == manifest_path
    after = json.loads(manifest_path.read_text())
    assert list(after) == list(before) + ["recommended"]  # key order kept, the new key last
    assert {k: v for k, v in after.items() if k != "recommended"} == before
    assert after["recommended"] == {"sparsity": 0.25, "method": "magnitude", "max_frames": 3,
                                    "max_new_tokens": 16, "basis": "a test"}
    assert {p.name: p.read_bytes() for p in store_dir.iterdir() if p.name != "manifest.json"} == files_before
    store = Store.open(store_dir)
    assert store.recommended == rec
    assert store.recommended.selection == SelectionSettings(0.25, "magnitude")
    # a second call replaces the value in place
    set_recommended(store_dir, Recommended(0.0, "dense", 1, 4))
    again = json.loads(manifest_path.read_text())
    assert list(again) == list(after)
    assert again["recommended"] == {"sparsity": 0.0, "method": "dense", "max_frames": 1, "max_new_tokens": 4}
    assert Store.open(store_dir).recommended == Recommended(0.0, "dense", 1, 4)


@pytest.mark.parametrize("fields, words", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(method="fastest"), "method must be one of"),
    (dict(max_frames=0), "max_frames"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_frames=True), "max_frames"),
])
def test_invalid_values_are_refused(fields, words):
    values = dict(sparsity=0.1, method="chunking", max_frames=1, max_new_tokens=4) | fields
    with pytest.raises(ValueError, match=words):
        Recommended(**values)


@pytest.mark.parametrize("entry, words", [
    ([0.1], "must be an object"),
    ({"sparsity": 0.1, "method": "chunking", "max_frames": 1}, "missing max_new_tokens"),
    ({"sparsity": "high", "method": "chunking", "max_frames": 1, "max_new_tokens": 4}, "sparsity"),
])
def test_a_malformed_entry_is_a_clear_store_error(store_dir, entry, words):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["recommended"] = entry
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreFormatError, match=f"recommended.*{words}"):
        Store.open(store_dir)


def test_unknown_keys_are_ignored_for_later_versions(store_dir):
    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["recommended"] = {"sparsity": 0.5, "method": "dp", "max_frames": 2, "max_new_tokens": 8,
                               "reader_threads": 4}
    (store_dir / "manifest.json").write_text(json.dumps(manifest))
    assert Store.open(store_dir).recommended == Recommended(0.5, "dp", 2, 8)


def test_set_recommended_refuses_what_is_not_a_store(tmp_path, store_dir):
    with pytest.raises(StoreError):
        set_recommended(tmp_path / "nowhere", RECOMMENDED)
    with pytest.raises(TypeError):
        set_recommended(store_dir, {"sparsity": 0.1})
    assert Store.open(store_dir).recommended is None
    assert not (store_dir / "manifest.json.tmp").exists()


def test_the_shipped_store_records_the_built_in_model_settings():
    store = Store.open(shipped_store(), check_alignment=False)
    assert store.recommended == RECOMMENDED
    assert store.recommended.max_frames == 1  # trained on one frame
    assert store.recommended.basis  # says how the values were found
