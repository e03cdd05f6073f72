"""Shared test fixtures.

- Tiny models and stores, built once per test run and only when a test asks for them:
  `tiny_checkpoints[arch]` (a saved random-init checkpoint of nchunk_core.testing.tiny_models),
  `calibration_frames` (a folder of frames), `tiny_stores[case]` (a checkpoint converted with
  `nchunk convert`, calibrated on those frames, without a sparsity allocation) and
  `allocated_store` (the SmolVLM one with an allocation). Tests never change them: copy one to damage it.
- The VQA node over real rclpy and DDS: `ros_env` (a random domain, discovery on this host, a
  private drive-profile cache), `node_store` (the tiny SmolVLM store with a synthetic drive profile
  cached for reader_threads 6), `start_rig` (a node in its own Context and executor plus a tester
  node in a second Context, as another process would be; ros_rig.py) and `rig` (one per module).
"""
from __future__ import annotations

import os
import random

import pytest

# Stores other than one per architecture (bundled): case -> (checkpoint arch, conversion options).
STORE_VARIANTS = {"qwen2_5_vl-unbundled": ("qwen2_5_vl", {"bundle": False})}  # it has q/k/v biases


class BuiltOnDemand(dict):
    """A dict whose missing entries are built on first use (a test file builds only what it needs)."""

    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, key):
        value = self[key] = self._build(key)
        return value


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> directory of its saved tiny checkpoint (build_tiny_vlm, seed 0)."""
    from nchunk_core.testing.tiny_models import build_tiny_vlm

    root = tmp_path_factory.mktemp("checkpoints")
    return BuiltOnDemand(lambda arch: build_tiny_vlm(arch, root / arch, seed=0))


@pytest.fixture(scope="session")
def calibration_frames(tmp_path_factory):
    """Four calibration frames (PNG and JPEG) plus a file that is not a frame."""
    from PIL import Image

    from nchunk_core.testing.tiny_models import make_frame

    d = tmp_path_factory.mktemp("frames")
    for i in range(4):
        Image.fromarray(make_frame(seed=10 + i)).save(d / f"frame_{i:03d}.{'png' if i % 2 else 'jpg'}")
    (d / "notes.txt").write_text("not a frame")
    return d


@pytest.fixture(scope="session")
def tiny_stores(tiny_checkpoints, calibration_frames, tmp_path_factory):
    """case -> store converted from the tiny checkpoint, calibrated on calibration_frames; a case is an
    architecture (bundled store) or one of STORE_VARIANTS."""
    from nchunk_core.convert.converter import convert

    root = tmp_path_factory.mktemp("stores")

    def build(case):
        arch, options = STORE_VARIANTS.get(case, (case, {}))
        # no sparsity allocation: these stores drop the same fraction of every matrix (allocated_store has one)
        return convert(tiny_checkpoints[arch], root / case, calibration_frames, progress=False, allocation=False,
                       **options)

    return BuiltOnDemand(build)


@pytest.fixture(scope="session")
def allocated_store(tiny_stores, calibration_frames, tmp_path_factory):
    """A copy of the tiny SmolVLM store with a layer-wise sparsity allocation measured on two of the
    calibration frames at three levels (convert/sensitivity.py)."""
    import shutil

    from nchunk_core.convert.converter import load_frame
    from nchunk_core.convert.sensitivity import calibrate_allocation

    store = tmp_path_factory.mktemp("allocated") / "smolvlm"
    shutil.copytree(tiny_stores["smolvlm"], store)
    frames = [load_frame(p) for p in sorted(calibration_frames.glob("frame_*"))[:2]]
    calibrate_allocation(store, frames, levels=(0.25, 0.5, 0.75), progress=False)
    return store


# ---- the VQA node over DDS (helpers in ros_rig.py, imported only by tests that use them) -----------

@pytest.fixture(scope="module")
def ros_env(tmp_path_factory):
    """ROS and nchunk environment for one module (restored afterwards); subprocesses inherit it.

    A random ROS domain, discovery restricted to this host, and a private drive-profile cache.
    """
    saved = dict(os.environ)
    os.environ["ROS_DOMAIN_ID"] = str(random.randint(20, 200))
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ["NCHUNK_CACHE_DIR"] = str(tmp_path_factory.mktemp("nchunk-cache"))
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def node_store(ros_env, tiny_stores):
    """The tiny SmolVLM store, with a synthetic drive profile cached for reader_threads 6 (the
    default), so that no node profiles the drive."""
    from nchunk_core.io.latency import LatencyTable
    from nchunk_core.io.profile import cache_path

    path = tiny_stores["smolvlm"]
    LatencyTable.synthetic().save(cache_path(path, 6))
    return path


@pytest.fixture(scope="module")
def start_rig(node_store, ros_env):
    """start_rig(name="vqa_node", service="/ask", store=node_store, ros_args=(), **parameter overrides)
    -> a running ros_rig.Rig (stop it with .stop())."""
    import ros_rig

    def start(name="vqa_node", service="/ask", store=None, ros_args=(), **overrides):
        return ros_rig.Rig(store or node_store, int(ros_env["ROS_DOMAIN_ID"]), name, service, ros_args, **overrides)

    return start


@pytest.fixture(scope="module")
def rig(start_rig):
    """One node and tester shared by the module's tests."""
    running = start_rig()
    yield running
    running.stop()
