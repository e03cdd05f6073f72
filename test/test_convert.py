"""Checkpoint → store conversion: what goes where, hot–cold rows, sharded input, clear errors.

The checkpoints are the tiny real-architecture VLMs of tiny_models.py, saved by transformers (which
writes the older key layout, so the key renaming is exercised too).
"""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from nchunk_core import cli
from nchunk_core.convert.checkpoint import Checkpoint, CheckpointError
from nchunk_core.convert.converter import CONVERTED, convert
from nchunk_core.runtime.adapters import adapter_class
from nchunk_core.store import Recommended, Store, StoreError
from nchunk_core.store.naming import CALIBRATION_PREFIX
from nchunk_core.testing.tiny_models import ARCHS, load_tiny_vlm, make_frame


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """arch -> saved tiny checkpoint directory."""
    return {arch: tiny_checkpoints[arch] for arch in ARCHS}


@pytest.fixture(scope="module")
def frames_dir(calibration_frames):
    """Four calibration frames (PNG and JPEG) plus a file that is not a frame."""
    return calibration_frames


@pytest.fixture(scope="module")
def stores(tiny_stores):
    """arch -> converted store (bundled, calibrated), and qwen2_5_vl unbundled (it has q/k/v biases)."""
    return {case: tiny_stores[case] for case in (*ARCHS, "qwen2_5_vl-unbundled")}


def _weights(model_dir):
    model, _ = load_tiny_vlm(model_dir)
    return model, model.state_dict()


@pytest.mark.parametrize("case", [*ARCHS, "qwen2_5_vl-unbundled"])
def test_store_holds_the_model(models, stores, case):
    arch = case.split("-")[0]
    bundled = not case.endswith("unbundled")
    store = Store.open(stores[case])
    model, sd = _weights(models[arch])
    info = store.model_info
    assert info["arch"] == arch and info["bundled"] == bundled and info["text_layers"] == 2
    assert info["calibration"]["frames"] == 4 and not info["calibration"]["synthetic"]

    plan = adapter_class(arch).projection_groups(model)
    streamed = set()
    for i, layer in enumerate(plan):
        for kind, paths in layer.items():
            name = f"layers.{i}.{kind}"
            groups = store.groups_for_input(name)
            assert len(groups) == (1 if bundled else len(paths))
            perm = store.permutation(name)
            assert perm is not None and not np.array_equal(perm, np.arange(perm.size)), "hot-cold order"
            outputs = [o["name"] for g in groups for o in g.outputs]
            assert outputs == paths
            for g in groups:  # stored row j = W[:, perm[j]] of every projection, concatenated
                rows = store.read_group_dense(g.name)
                for o in g.outputs:
                    w = sd[o["name"] + ".weight"].numpy()
                    np.testing.assert_array_equal(rows[:, o["offset"]:o["offset"] + o["out_features"]], w[:, perm].T)
                    streamed.add(o["name"] + ".weight")
            stats = store.resident("cpu", [f"{CALIBRATION_PREFIX}{name}/mean_importance",
                                          f"{CALIBRATION_PREFIX}{name}/active_fraction"])
            mean, active = stats.values()
            assert mean.shape == active.shape == (perm.size,) and (mean > 0).all()
            assert ((active >= 0) & (active <= 1)).all() and active.sum() == pytest.approx(perm.size / 2, rel=0.02)
            # the order sorts channels by how often they were active
            assert (np.diff(active.numpy()[perm]) <= 1e-6).all()
    resident = {n for n in store.resident_names() if not n.startswith(CALIBRATION_PREFIX)}
    assert resident == set(sd) - streamed  # embeddings, norms, LM head, vision, biases
    got = store.resident("cpu", sorted(resident))
    assert all(torch.equal(got[k], sd[k]) for k in resident)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "processor_config.json"):
        assert (stores[case] / f).is_file()
    assert not any(p.name.endswith(".converting") for p in stores[case].parent.iterdir())
    assert store.verify().ok


def test_calibration_encodes_each_frame_once(stores, monkeypatch):
    """More frames than a context holds: a full context starts again empty instead of rebuilding (a
    rebuild's replays would cost dense forwards and add no samples)."""
    from nchunk_core.convert import converter
    from nchunk_core.runtime.session import SessionConfig

    phases = []

    class Recorder(converter.ImportanceRecorder):
        def __call__(self, phase, name, x):
            if name == "layers.0.attn_in":  # once per chunk
                phases.append(phase)
            super().__call__(phase, name, x)

    monkeypatch.setattr(converter, "ImportanceRecorder", Recorder)
    frames = [make_frame(seed=s) for s in range(SessionConfig().max_frames + 3)]
    log = []
    converter.calibrate(stores[ARCHS[0]], frames, progress=False, log=log.append)
    assert phases.count("frame") == len(frames) and "replay" not in phases
    assert phases.count("prefix") == 2  # a second context after max_frames frames
    assert not any("rebuilt" in line for line in log)


def test_sharded_checkpoint_and_dtype(models, tmp_path):
    """A checkpoint in several shards with an index converts to the same rows; --dtype casts them."""
    model, _ = load_tiny_vlm(models["smolvlm"])
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    for f in models["smolvlm"].iterdir():
        if f.suffix != ".safetensors" and not (sharded / f.name).exists():
            shutil.copy(f, sharded / f.name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = Store.open(convert(models["smolvlm"], tmp_path / "a", reorder=False, progress=False))
    measured = Recommended(sparsity=0.3, method="magnitude", max_frames=2, max_new_tokens=8, basis="measured")
    b = Store.open(convert(sharded, tmp_path / "b", reorder=False, recommended=measured, progress=False))
    assert a.permutation("layers.0.attn_in") is None and a.model_info["calibration"] is None
    assert a.recommended == CONVERTED and a.recommended.sparsity == 0.0  # the exact model
    assert b.recommended == measured  # what the caller validated
    for name in a.groups:
        np.testing.assert_array_equal(a.read_group_dense(name), b.read_group_dense(name))
    half = Store.open(convert(sharded, tmp_path / "half", reorder=False, dtype="bfloat16", progress=False))
    assert {g.dtype for g in half.groups.values()} == {"bfloat16"}
    assert half.resident("cpu", ["lm_head.weight"])["lm_head.weight"].dtype == torch.bfloat16


def test_synthetic_calibration_warns(models, tmp_path):
    with pytest.warns(UserWarning, match="synthetic"):
        path = convert(models["llava_onevision"], tmp_path / "s", None, calib_frames=1, progress=False)
    assert Store.open(path).model_info["calibration"]["synthetic"]


# ---- bad checkpoints ----------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(ckpt, edit):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_mismatched_shape_is_named(models, tmp_path):
    ckpt = _copy(models["qwen2_5_vl"], tmp_path / "ck")
    key = "model.layers.1.mlp.up_proj.weight"  # older layout, as transformers saves it

    def widen(t):
        t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])
    _edit_weights(ckpt, widen)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\[129, 64\].*\[128, 64\]"):
        convert(ckpt, tmp_path / "s", reorder=False, progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("lm_head.weight"), r"missing: lm_head\.weight"),
    (lambda t: t.update({"model.text_model.extra.weight": torch.zeros(2)}), r"does not have: model\.text_model\.extra"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.int32)}), r"I32"),
], ids=["missing", "unexpected", "integer"])
def test_bad_keys_are_named(models, tmp_path, edit, match):
    ckpt = _copy(models["smolvlm"], tmp_path / "ck")
    _edit_weights(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(ckpt)


def test_unsupported_architecture(models, tmp_path):
    ckpt = _copy(models["smolvlm"], tmp_path / "ck")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config["text_config"]))  # a plain Llama
    with pytest.raises(ValueError, match=r"'llama'.*supported"):
        convert(ckpt, tmp_path / "s", progress=False)


@pytest.mark.parametrize("remove,error,match", [
    ("config.json", FileNotFoundError, "config.json"),
    ("model.safetensors", FileNotFoundError, "no safetensors weights"),
])
def test_missing_files(models, tmp_path, remove, error, match):
    ckpt = _copy(models["smolvlm"], tmp_path / "ck")
    (ckpt / remove).unlink()
    with pytest.raises(error, match=match):
        convert(ckpt, tmp_path / "s", progress=False)


def test_missing_shard_and_directory(models, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "s", progress=False)
    ckpt = tmp_path / "ck"
    load_tiny_vlm(models["smolvlm"])[0].save_pretrained(ckpt, max_shard_size="40KB")
    shutil.copy(models["smolvlm"] / "config.json", ckpt)
    victim = sorted(ckpt.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Checkpoint(ckpt)


def test_destination_and_calibration_errors(models, frames_dir, stores, tmp_path):
    with pytest.raises(StoreError, match="not empty"):
        convert(models["smolvlm"], stores["smolvlm"], progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(StoreError, match="not an nchunk store"):
        convert(models["smolvlm"], foreign, overwrite=True, progress=False)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="calibration folder"):
        convert(models["smolvlm"], tmp_path / "s", tmp_path / "no-frames", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .png"):
        convert(models["smolvlm"], tmp_path / "s", empty, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "f.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="f.png"):
        convert(models["smolvlm"], tmp_path / "s", broken, progress=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".*converting"))


def test_cli_convert_and_overwrite(models, frames_dir, tmp_path, capsys):
    dst = tmp_path / "store"
    args = ["convert", str(models["smolvlm"]), str(dst), "--calib", str(frames_dir), "--calib-frames", "2",
            "--no-bundle"]
    assert cli.main(args) == 0
    first = Store.open(dst)
    assert first.model_info["calibration"]["frames"] == 2 and not first.model_info["bundled"]
    assert cli.main(args) == 1
    assert "not empty" in capsys.readouterr().err
    assert cli.main(args[:3] + ["--no-reorder", "--overwrite"]) == 0
    assert Store.open(dst).model_info["bundled"] and Store.open(dst).permutation("layers.0.mlp_in") is None
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
