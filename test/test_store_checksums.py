"""Row checksums of a store end to end: written at conversion, checked on every runtime read, found by
`nchunk verify`, added to a version-1 store by `nchunk upgrade`.

Damage is real: 64 KiB of flipped bytes in the middle of a weight file, read back with real direct I/O.
"""
import json
import shutil

import numpy as np
import pytest

from nchunk_core import cli
from nchunk_core.demo.model import shipped_store
from nchunk_core.demo.scenes import random_scene, render_scene
from nchunk_core.io.checksum import crc32c_rows
from nchunk_core.io.latency import LatencyTable
from nchunk_core.io.reader import ChecksumError, Reader
from nchunk_core.runtime.layers import read_runs
from nchunk_core.runtime.session import Session, SessionConfig
from nchunk_core.store import VERSION, Store, StoreCorruptError, StoreFormatError, StoreWriter


def write_store(path):
    """Three groups in one weight file, the middle one [1536, 640] fp32 (2.5 KiB rows, 3.75 MiB)."""
    rng = np.random.default_rng(5)
    with StoreWriter(path, model_info={"arch": "test"}) as w:
        for name, (out, inp) in {"a": (256, 512), "b": (640, 1536), "c": (128, 256)}.items():
            w.add_group(name, f"{name}_in", [("w", rng.standard_normal((out, inp), dtype=np.float32))],
                        layer=0, permutation=rng.permutation(inp))
    return Store.open(path)


def flip(path, start, length):
    data = np.fromfile(path, np.uint8)
    data[start:start + length] ^= 0xA5
    data.tofile(path)


def downgrade_to_version_1(path):
    """What the writer of format version 1 left: no row checksum file, fields or version 2."""
    manifest = json.loads((path / "manifest.json").read_text())
    name = manifest.pop("row_checksums")["file"]
    del manifest["files"][name]
    for g in manifest["groups"]:
        del g["row_checksum_index"]
    manifest["version"] = 1
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (path / name).unlink()
    return manifest


def test_writer_records_the_crc32c_of_every_row(tmp_path):
    store = write_store(tmp_path / "s")
    assert store.version == VERSION == 2
    assert store.manifest["row_checksums"] == {"file": "row-crc32c.bin", "algo": "crc32c"}
    index = 0
    for g in store.groups.values():
        rows = store.read_group_dense(g.name).view(np.uint8)
        assert g.row_checksum_index == index and g.row_checksums.dtype == np.uint32
        np.testing.assert_array_equal(g.row_checksums, crc32c_rows(rows, g.row_bytes))
        index += g.rows
    report = store.verify()
    assert report.ok and report.rows_checked == index


def test_flipped_bytes_in_a_weight_file_fail_the_first_runtime_read_that_touches_them(tmp_path):
    store = write_store(tmp_path / "s")
    g = store.groups["b"]
    bad_start = g.offset + g.nbytes // 2  # 64 KiB in the middle of the store's largest group
    flip(g.file, bad_start, 64 << 10)
    first_bad, last_bad = (bad_start - g.offset) // g.row_bytes, (bad_start + (64 << 10) - 1 - g.offset) // g.row_bytes
    store = Store.open(tmp_path / "s")  # opening reads no weight row: it succeeds
    with Reader(threads=3) as reader:
        handles = [reader.open(str(g.file))]
        buf = reader.empty(g.nbytes)
        clean = np.array([[0, first_bad], [last_bad + 1, g.rows - last_bad - 1]])
        read_runs(reader, handles, [g], clean, buf)  # untouched rows still read, and are right
        rows = np.concatenate([store.read_group_dense("b")[s:s + n] for s, n in clean])
        assert buf[:rows.nbytes].tobytes() == rows.tobytes()
        for group in ("a", "c"):
            other = store.groups[group]
            read_runs(reader, [reader.open(str(other.file))], [other], np.array([[0, other.rows]]), buf)
        touching = np.array([[3, 10], [first_bad - 2, 5]])
        with pytest.raises(ChecksumError) as info:
            read_runs(reader, handles, [g], touching, buf)
        e = info.value
        assert (e.path, e.group, e.row) == (g.file, "b", first_bad)
        assert e.offset == g.offset + first_bad * g.row_bytes and e.length == g.row_bytes
        assert f"group 'b', row {first_bad}" in str(e) and "weights-00000.bin" in str(e)
        read_runs(reader, handles, [g], touching, buf, verify=False)  # the check is what stops it
    report = store.verify()
    assert not report.ok and {b.group for b in report.bad} == {"b"}
    assert f"rows {first_bad}, {first_bad + 1}" in str(report)


def test_damaged_demo_store_stops_the_session_with_the_group_and_row(tmp_path):
    path = shutil.copytree(shipped_store(), tmp_path / "store")
    weights = path / "weights-00000.bin"
    start = weights.stat().st_size // 2
    flip(weights, start, 64 << 10)
    store = Store.open(path)
    damaged = {g.name for g in store.groups.values()
               if g.offset < start + (64 << 10) and start < g.offset + g.nbytes}
    image = render_scene(random_scene(np.random.default_rng(0)))
    with Session.open(path, SessionConfig(reader_threads=2), table=LatencyTable.synthetic()) as session:
        with pytest.raises(ChecksumError) as info:
            session.append_frame(image)
    e = info.value
    g = store.groups[e.group]
    assert e.group in damaged and e.path == str(weights)
    assert e.offset == g.offset + e.row * g.row_bytes and start - g.row_bytes < e.offset < start + (64 << 10)


def test_version_1_store_is_refused_and_upgraded_in_place(tmp_path, capsys):
    path = tmp_path / "s"
    written = write_store(path)
    old = downgrade_to_version_1(path)
    with pytest.raises(StoreFormatError, match=rf"version 1 has no row checksums.*`nchunk upgrade {path}`"):
        Store.open(path)
    assert cli.main(["verify", str(path)]) == 1 and "nchunk upgrade" in capsys.readouterr().err
    assert cli.main(["upgrade", str(path)]) == 0
    assert "upgraded from format version 1 to 2" in capsys.readouterr().out
    store = Store.open(path)
    new = json.loads((path / "manifest.json").read_text())
    assert new.pop("version") == 2 and old.pop("version") == 1
    assert new.pop("row_checksums") == {"file": "row-crc32c.bin", "algo": "crc32c"}
    assert new["files"].pop("row-crc32c.bin")["size"] == 4 * sum(g.rows for g in written.groups.values())
    for g in new["groups"]:
        assert g.pop("row_checksum_index") == written.groups[g["name"]].row_checksum_index
    assert new == old  # every other field as it was
    for g in store.groups.values():
        np.testing.assert_array_equal(g.row_checksums, written.groups[g.name].row_checksums)
    assert cli.main(["upgrade", str(path)]) == 0 and "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cli.main(["upgrade", "--help"])
    assert done.value.code == 0 and "row-crc32c.bin" in capsys.readouterr().out


def test_upgrade_refuses_a_damaged_store(tmp_path, capsys):
    path = tmp_path / "s"
    g = write_store(path).groups["a"]
    downgrade_to_version_1(path)
    before = (path / "manifest.json").read_text()
    flip(g.file, g.offset + 1000, 1)
    assert cli.main(["upgrade", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not upgraded: the store is damaged" in err and "group 'a'" in err
    assert (path / "manifest.json").read_text() == before


def test_damaged_row_checksum_file_is_named_at_open(tmp_path):
    path = tmp_path / "s"
    write_store(path)
    flip(path / "row-crc32c.bin", 100, 1)
    with pytest.raises(StoreCorruptError, match=r"row-crc32c.bin: bytes \[0, \d+\).*row checksums are damaged"):
        Store.open(path)


def test_verify_names_a_row_whose_table_entry_disagrees(tmp_path):
    """A row checksum file rewritten with a wrong entry (its own block CRC updated to match)."""
    path = tmp_path / "s"
    g = write_store(path).groups["c"]
    table = np.fromfile(path / "row-crc32c.bin", "<u4")
    table[g.row_checksum_index + 7] ^= 1
    table.tofile(path / "row-crc32c.bin")
    from nchunk_core.store.row_checksums import write

    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["row-crc32c.bin"] = write(path, "row-crc32c.bin", table)
    (path / "manifest.json").write_text(json.dumps(manifest))
    report = Store.open(path).verify()
    assert len(report.bad) == 1
    bad = report.bad[0]
    assert (bad.group, bad.offset, bad.length) == ("c", g.offset + 7 * g.row_bytes, g.row_bytes)
    assert "row checksum file disagrees" in bad.reason
