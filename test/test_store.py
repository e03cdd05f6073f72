"""Store format: round trips, layout on disk, and clear errors for every kind of damaged store."""
import json
import os

import numpy as np
import pytest
import torch

from nchunk_core.store import VERSION, Store, StoreCorruptError, StoreError, StoreFormatError, StoreWriter
from nchunk_core.store import group_rows_to_torch

RNG = np.random.default_rng(0)


def matrix(out_features, in_features, dtype):
    """A random nn.Linear-layout weight [out, in]: numpy for fp16/fp32, torch for bf16."""
    w = RNG.standard_normal((out_features, in_features), dtype=np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(w).to(torch.bfloat16)
    return w.astype(dtype)


def as_bits(w) -> np.ndarray:
    """The stored representation of a weight: numpy, bfloat16 as uint16 bits."""
    if isinstance(w, torch.Tensor):
        return w.view(torch.uint16).numpy()
    return w


def expected_rows(mats, perm):
    """Row j = concat over matrices of W[:, perm[j]]."""
    rows = np.concatenate([as_bits(w).T for _, w in mats], axis=1)
    return rows if perm is None else rows[perm]


def write_small_store(path, **kwargs):
    """Two layers: bundled qkv, unbundled gate/up sharing an input, down with a permutation."""
    mats = {}
    with StoreWriter(path, model_info={"arch": "test", "layers": 2}, **kwargs) as w:
        for layer in range(2):
            qkv = [("q_proj", matrix(64, 48, "float16")), ("k_proj", matrix(16, 48, "float16")),
                   ("v_proj", matrix(16, 48, "float16"))]
            w.add_group(f"layers.{layer}.attn.qkv", f"layers.{layer}.attn_in", qkv, layer=layer)
            mats[f"layers.{layer}.attn.qkv"] = (qkv, None)
            perm = RNG.permutation(48)
            for proj in ("gate_proj", "up_proj"):
                m = [(proj, matrix(96, 48, "float16"))]
                w.add_group(f"layers.{layer}.mlp.{proj}", f"layers.{layer}.mlp_in", m, layer=layer,
                            permutation=perm)
                mats[f"layers.{layer}.mlp.{proj}"] = (m, perm)
        w.add_resident("embed_tokens.weight", torch.randn(10, 8, dtype=torch.bfloat16))
        w.add_resident("layers.0.attn.q_proj.bias", np.arange(64, dtype=np.float32))
    return mats


@pytest.fixture
def store_dir(tmp_path):
    path = tmp_path / "store"
    write_small_store(path)
    return path


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


# ---- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("permuted", [False, True])
def test_bundled_round_trip(tmp_path, dtype, permuted):
    mats = [("gate_proj", matrix(40, 300, dtype)), ("up_proj", matrix(24, 300, dtype))]
    perm = RNG.permutation(300) if permuted else None
    with StoreWriter(tmp_path / "s", block_bytes=1000) as w:  # many small write blocks
        w.add_group("layers.0.mlp.gate_up", "layers.0.mlp_in", mats, layer=0, permutation=perm)
    store = Store.open(tmp_path / "s")
    g = store.groups["layers.0.mlp.gate_up"]
    itemsize = 2 if dtype != "float32" else 4
    assert (g.rows, g.dtype, g.row_bytes, g.nbytes) == (300, dtype, 64 * itemsize, 300 * 64 * itemsize)
    assert [(o["name"], o["out_features"], o["offset"]) for o in g.outputs] == [
        ("gate_proj", 40, 0), ("up_proj", 24, 40)]
    np.testing.assert_array_equal(store.read_group_dense(g.name), expected_rows(mats, perm))
    if permuted:
        np.testing.assert_array_equal(store.permutation("layers.0.mlp_in"), perm)
    else:
        assert store.permutation("layers.0.mlp_in") is None
    t = group_rows_to_torch(store.read_group_dense(g.name), g)
    assert t.dtype == getattr(torch, dtype) and t.shape == (300, 64)
    w0 = torch.as_tensor(mats[0][1])
    torch.testing.assert_close(t[:, :40], w0.T if perm is None else w0.T[perm], rtol=0, atol=0)
    assert store.verify().ok


def test_unbundled_groups_share_input_and_residents(store_dir):
    mats = write_small_store(store_dir, overwrite=True)
    store = Store.open(store_dir)
    assert store.model_info == {"arch": "test", "layers": 2}
    assert store.inputs() == ["layers.0.attn_in", "layers.0.mlp_in", "layers.1.attn_in",
                              "layers.1.mlp_in"]
    assert [g.name for g in store.groups_for_input("layers.1.mlp_in")] == [
        "layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"]
    for name, (m, perm) in mats.items():
        np.testing.assert_array_equal(store.read_group_dense(name), expected_rows(m, perm))
    np.testing.assert_array_equal(store.permutation("layers.0.mlp_in"),
                                  mats["layers.0.mlp.gate_proj"][1])
    assert sorted(store.resident_names()) == ["embed_tokens.weight", "layers.0.attn.q_proj.bias"]
    res = store.resident()
    assert res["embed_tokens.weight"].dtype == torch.bfloat16
    torch.testing.assert_close(res["layers.0.attn.q_proj.bias"], torch.arange(64.0))


def test_groups_aligned_to_drive_and_files_padded(store_dir):
    store = Store.open(store_dir)
    manifest = store.manifest
    a = store.alignment
    assert a >= 4096 and a & (a - 1) == 0
    dio = manifest["dio_alignment"]
    if dio["direct"]:
        assert a % dio["offset"] == 0
    for g in store.groups.values():
        assert g.offset % a == 0 and os.path.isabs(g.file)
    for name, entry in manifest["files"].items():
        assert (store_dir / name).stat().st_size == entry["size"]
        if name.startswith("weights-"):
            assert entry["size"] % a == 0


def test_small_file_cap_rolls_to_new_files(tmp_path):
    with StoreWriter(tmp_path / "s", file_size_cap=20000) as w:
        for i in range(5):
            w.add_group(f"g{i}", f"in{i}", [("o", matrix(100, 40, "float32"))])  # 16000 bytes each
    store = Store.open(tmp_path / "s")
    files = {os.path.basename(g.file) for g in store.groups.values()}
    assert files == {f"weights-{i:05d}.bin" for i in range(5)}
    assert all(g.offset == 0 for g in store.groups.values())
    assert store.verify().ok


def test_rows_read_back_with_direct_io(store_dir):
    from nchunk_core.io.reader import Reader

    store = Store.open(store_dir)
    g = store.groups["layers.1.mlp.up_proj"]
    rows = [(3, 5), (20, 1), (40, 8)]  # (first stored row, count)
    with Reader(threads=2) as reader:
        f = reader.open(g.file)
        out = reader.empty(sum(n for _, n in rows) * g.row_bytes)
        dest = np.cumsum([0] + [n * g.row_bytes for _, n in rows[:-1]])
        extents = [(g.offset + r * g.row_bytes, n * g.row_bytes, d) for (r, n), d in zip(rows, dest)]
        reader.read(f, np.array(extents, dtype=np.int64), out)
    dense = store.read_group_dense(g.name)
    want = np.concatenate([dense[r:r + n] for r, n in rows])
    np.testing.assert_array_equal(out.view(g.storage_dtype).reshape(-1, g.row_width), want)


# ---- damage ----------------------------------------------------------------------------------------

def test_truncated_weight_file_names_file_and_group(store_dir):
    store = Store.open(store_dir)
    last = max(store.groups.values(), key=lambda g: g.offset)
    os.truncate(last.file, last.offset + 100)
    with pytest.raises(StoreCorruptError) as err:
        Store.open(store_dir)
    msg = str(err.value)
    assert "weights-00000.bin" in msg and "truncated" in msg and last.name in msg


def test_flipped_byte_located_by_verify(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.add_group("layers.0.mlp.down", "layers.0.down_in", [("down_proj", matrix(640, 1024, "float32"))])
    store = Store.open(tmp_path / "s")
    g = store.groups["layers.0.mlp.down"]
    assert len(g.checksum["blocks"]) == 3  # 2.5 MiB in 1 MiB blocks
    bad_at = g.offset + (1 << 20) + 12345  # inside the second block
    with open(g.file, "r+b") as f:
        f.seek(bad_at)
        byte = f.read(1)
        f.seek(bad_at)
        f.write(bytes([byte[0] ^ 0x40]))
    report = Store.open(tmp_path / "s").verify()
    assert not report.ok and len(report.bad) == 1
    bad = report.bad[0]
    assert (bad.file, bad.group, bad.offset) == ("weights-00000.bin", g.name, g.offset + (1 << 20))
    assert f"group '{g.name}'" in str(report) and str(g.offset + (1 << 20)) in str(report)
    with pytest.raises(StoreCorruptError):
        report.raise_if_bad()


def test_corrupted_resident_reported_by_verify(store_dir):
    path = store_dir / "resident.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    report = Store.open(store_dir).verify()
    assert [b.file for b in report.bad] == ["resident.safetensors"]


def first_group(m):
    return m["groups"][0]


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("groups"), "missing key 'groups'"),
    (lambda m: first_group(m).pop("rows"), "missing key 'rows'"),
    (lambda m: first_group(m).update(rows="48"), "'rows' must be an integer"),
    (lambda m: first_group(m).update(dtype="int4"), "unknown dtype 'int4'"),
    (lambda m: first_group(m).update(row_bytes=2), "row_bytes"),
    (lambda m: first_group(m).update(nbytes=10), "nbytes=10"),
    (lambda m: first_group(m).update(offset=512), "not a multiple of the store alignment"),
    (lambda m: first_group(m)["checksum"]["blocks"].append(1), "checksum blocks"),
    (lambda m: m["groups"][1].update(offset=0), "overlap"),
    (lambda m: m["groups"][1].update(name=first_group(m)["name"]), "duplicate group name"),
    (lambda m: first_group(m).update(file="../etc/passwd"), "not a plain file name"),
    (lambda m: m.update(version=VERSION + 1), f"version {VERSION + 1} is newer"),
    (lambda m: first_group(m).update(row_checksum_index=10**6), "lie outside the"),
    (lambda m: m["groups"][1].update(row_checksum_index=first_group(m)["row_checksum_index"]),
     "share row checksum entries"),
    (lambda m: m["row_checksums"].update(algo="crc64"), "unknown row checksum algorithm"),
    (lambda m: m.update(format="something"), "not an nchunk store"),
    (lambda m: first_group(m).update(offset=1 << 30), "lie beyond the end of weights-00000.bin"),
])
def test_damaged_manifest_gives_clear_error(store_dir, change, words):
    edit_manifest(store_dir, change)
    with pytest.raises(StoreFormatError) as err:
        Store.open(store_dir)
    assert words in str(err.value)


def test_unparsable_or_missing_manifest(store_dir):
    (store_dir / "manifest.json").write_text('{"format": "nchunk-store", ')
    with pytest.raises(StoreFormatError, match="cannot parse"):
        Store.open(store_dir)
    (store_dir / "manifest.json").unlink()
    with pytest.raises(StoreFormatError, match="no manifest.json"):
        Store.open(store_dir)


def test_file_size_differs_from_manifest(store_dir):
    edit_manifest(store_dir, lambda m: m["files"]["weights-00000.bin"].update(size=1 << 20))
    with pytest.raises(StoreCorruptError, match="weights-00000.bin: truncated: .* records 1048576"):
        Store.open(store_dir)


def test_missing_or_truncated_resident_file(store_dir):
    path = store_dir / "resident.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(StoreCorruptError, match="resident.safetensors.*truncated"):
        Store.open(store_dir)
    path.unlink()
    with pytest.raises(StoreCorruptError, match="resident.safetensors: listed in manifest.json but missing"):
        Store.open(store_dir)


def test_drive_with_larger_alignment_is_refused(store_dir, monkeypatch):
    import nchunk_core.io.reader as reader

    class BigBlocks:  # a drive whose direct-I/O offset alignment exceeds the store's
        offset, memory, direct = 1 << 16, 4096, True

    monkeypatch.setattr(reader, "dio_alignment", lambda path: BigBlocks())
    with pytest.raises(StoreError, match="not a multiple of this drive's direct-I/O alignment"):
        Store.open(store_dir)
    assert Store.open(store_dir, check_alignment=False).verify().ok


# ---- writer safety ---------------------------------------------------------------------------------

def test_writer_does_not_overwrite_by_accident(store_dir, tmp_path):
    before = (store_dir / "manifest.json").read_bytes()
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(store_dir)
    assert (store_dir / "manifest.json").read_bytes() == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not part of a store"):
        StoreWriter(other, overwrite=True)
    assert (other / "todo.txt").exists()
    with StoreWriter(store_dir, overwrite=True) as w:
        w.add_group("only", "in", [("o", matrix(8, 8, "float32"))])
    store = Store.open(store_dir)
    assert list(store.groups) == ["only"] and store.resident_names() == []
    assert sorted(p.name for p in store_dir.iterdir()) == ["manifest.json", "row-crc32c.bin",
                                                           "weights-00000.bin"]


def test_exception_inside_writer_leaves_no_manifest(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with StoreWriter(path) as w:
            w.add_group("g", "in", [("o", matrix(8, 8, "float32"))])
            raise RuntimeError("conversion failed")
    assert not path.exists()  # the writer created the directory, so it removed it again
    with pytest.raises(StoreFormatError, match="no such store directory"):
        Store.open(path)


def test_writer_rejects_inconsistent_groups(tmp_path):
    with StoreWriter(tmp_path / "s") as w:
        w.add_group("a", "in", [("o", matrix(8, 16, "float32"))], permutation=RNG.permutation(16))
        with pytest.raises(ValueError, match="different permutation"):
            w.add_group("b", "in", [("o", matrix(8, 16, "float32"))], permutation=np.arange(16))
        with pytest.raises(ValueError, match="is float16 with 16 inputs"):
            w.add_group("c", "in2", [("x", matrix(8, 16, "float32")), ("y", matrix(8, 16, "float16"))])
        with pytest.raises(ValueError, match="not a permutation"):
            w.add_group("d", "in3", [("o", matrix(8, 4, "float32"))], permutation=[0, 0, 1, 2])
    assert list(Store.open(tmp_path / "s").groups) == ["a"]


def test_dtype_names_have_one_table_and_no_torch_import():
    from nchunk_core.store import naming
    from nchunk_core.testing.imports import imported_modules

    assert set(naming.STORAGE_DTYPES) == set(naming.DTYPES) == set(naming.SAFETENSORS_DTYPES.values())
    for name in naming.DTYPES:
        assert naming.torch_dtype(name).itemsize == naming.STORAGE_DTYPES[name].itemsize
    with pytest.raises(ValueError, match="dtype must be one of"):
        naming.torch_dtype("int8")
    done, modules = imported_modules(["-c", "import nchunk_core.store.naming"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nchunk_core.store.naming" in modules and "torch" not in modules
