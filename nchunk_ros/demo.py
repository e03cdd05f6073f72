"""`nchunk demo`: a camera, the VQA node and questions over ROS 2, all on this machine.

Needs no ROS install (the PyPI wheels of scripts/setup.sh do), no model download and no network:

1. a store: `--store STORE`, or the demo store in the nchunk cache (~/.cache/nchunk/demo-store, or
   $NCHUNK_CACHE_DIR/demo-store), built once from a tiny random-initialised SmolVLM (tiny_models.py)
   with `nchunk convert`, calibrated on frames of the synthetic camera. A random model's answers are
   noise; the frames, reads, timings and the ROS plumbing are real.
2. in one process, on DDS restricted to this host unless ROS_AUTOMATIC_DISCOVERY_RANGE says
   otherwise: the VQA node (vqa_node.py) on that store, the synthetic camera (synthetic_camera.py),
   and an observer node that records the node's statistics and the camera's ground truth;
3. questions over the real /ask service from a separate client participant (ask_client.py), with
   the ground truth of the scene beside each answer;
4. the sparsity and selection method changed live through the parameter services (what
   `ros2 param set /vqa_node sparsity 0.7` does), with the drive reads per frame under each setting,
   and an out-of-range value refused with its reason;
5. the intake counters; then everything shuts down. About 20 s once the store and the drive
   profile are cached (the first run adds their one-time setup).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

DEMO_ARCH = "smolvlm"  # the tiny architecture with the fewest tokens per frame: the quickest demo
CAMERA = {"rate_hz": 10.0, "scene_period_s": 4.0, "width": 320, "height": 240}
NODE = {"max_append_rate_hz": 4.0, "max_new_tokens": 12, "sparsity": 0.5, "method": "chunking"}
QUESTIONS = (
    ("What shapes do you see?", False),
    ("What colour is the largest shape?", False),
    ("What is in front of the camera right now?", True),  # reset_context: only the newest frame
)
SETTINGS = (("chunking", 0.0), ("magnitude", 0.5), ("chunking", 0.5), ("chunking", 0.7))
FRAMES_PER_SETTING = 3
WAIT_S = 15.0  # for anything that should take a second or two


def demo_store_path() -> Path:
    from nchunk_core.profile import cache_dir

    return cache_dir().parent / "demo-store"


def ensure_demo_store(log=print) -> Path:
    """The demo store, built on first use (a few seconds) and reused after."""
    from nchunk_core.store import Store, StoreError
    from nchunk_core.store.format import MANIFEST

    path = demo_store_path()
    if (path / MANIFEST).is_file():
        try:
            Store.open(path)
            return path
        except StoreError as exc:
            log(f"the demo store is damaged ({exc}); building it again")
    if path.exists():
        shutil.rmtree(path)  # our own cache entry, incomplete or damaged
    import numpy as np
    from PIL import Image

    from nchunk_core.convert import convert
    from nchunk_core.tiny_models import build_tiny_vlm

    from .synthetic_camera import random_scene, render_scene

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's one-shard bar is noise here
    log(f"building the demo store (tiny random-init {DEMO_ARCH}) in {path} ...")
    with tempfile.TemporaryDirectory(prefix="nchunk-demo-") as tmp:
        model = build_tiny_vlm(DEMO_ARCH, Path(tmp) / "model", seed=0)
        frames = Path(tmp) / "frames"
        frames.mkdir()
        rng = np.random.default_rng(1)
        for i in range(8):
            scene = random_scene(rng, CAMERA["width"], CAMERA["height"], i)
            Image.fromarray(render_scene(scene)).save(frames / f"{i:02d}.png")
        convert(model, path, frames, progress=False, log=lambda m: None)
    return path


def _wait_until(condition, timeout_s: float = WAIT_S, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: gave up waiting for {what} after {timeout_s:g} s")
        time.sleep(0.05)


def _observer_class():
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from diagnostic_msgs.msg import DiagnosticArray
    from std_msgs.msg import String

    class Observer(Node):
        """Records vqa_node's per-frame statistics and the camera's ground truth; sets parameters."""

        def __init__(self, context):
            super().__init__("nchunk_demo_observer", context=context)
            self.frames: list[dict] = []
            self.scene: dict | None = None
            self.create_subscription(DiagnosticArray, "/vqa_node/statistics", self._on_stats, 50)
            latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(String, "/camera/scene", self._on_scene, latched)
            self.params = AsyncParameterClient(self, "vqa_node")

        def _on_stats(self, msg) -> None:
            for status in msg.status:
                if status.name == "vqa_node: frame" and status.level == b"\x00":
                    self.frames.append({kv.key: kv.value for kv in status.values})

        def _on_scene(self, msg) -> None:
            self.scene = json.loads(msg.data)

        def set(self, **values) -> list:
            """Set parameters on vqa_node through its parameter service; the SetParametersResults."""
            future = self.params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
            _wait_until(future.done, what="the parameter service")
            return list(future.result().results)

    return Observer


def _setting_rows(observer, settings) -> list[tuple]:
    rows = []
    for method, sparsity in settings:
        results = observer.set(method=method, sparsity=sparsity)
        if not all(r.successful for r in results):
            raise RuntimeError(f"demo: vqa_node refused {method} at {sparsity}: {results[0].reason}")
        start = len(observer.frames)

        def matching():
            fresh = observer.frames[start + 1:]  # the first may have started before the change
            return [f for f in fresh if f["method"] == method and float(f["sparsity"]) == sparsity]

        _wait_until(lambda: len(matching()) >= FRAMES_PER_SETTING, what=f"frames at {method} {sparsity}")
        got = matching()[:FRAMES_PER_SETTING]

        def med(key):
            return statistics.median(float(f[key]) for f in got)

        rows.append((f"{method} {sparsity:g}", med("rows_read") / med("rows_total"), med("bytes_read") / 2**10,
                     med("reads"), med("bytes_read") / max(med("reads"), 1) / 2**10, med("io_s") * 1e3,
                     med("est_io_s") * 1e3, med("select_s") * 1e3, med("retained"), med("total_s") * 1e3))
    return rows


def run(store: str | None = None) -> int:
    """`nchunk demo` (see the module docstring). Exit status 0 when every step worked."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # before any rclpy context
    print("nchunk demo: a synthetic camera, the VQA node and questions over ROS 2 /ask, on this machine\n",
          flush=True)
    path = Path(store).expanduser() if store else ensure_demo_store()

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.logging import LoggingSeverity
    from rclpy.parameter import Parameter

    from nchunk_core.profile import cache_path

    from .ask_client import AskClient, format_response
    from .synthetic_camera import SyntheticCamera
    from .vqa_node import DEFAULTS, EXECUTOR_THREADS, StartupError, VQANode, spin

    if path.is_dir() and not cache_path(path, DEFAULTS["reader_threads"]).exists():
        print("first run on this drive: measuring its latency profile once (about 10-40 s, progress on stderr); "
              "later runs reuse it", flush=True)
    context = Context()
    rclpy.init(args=[], context=context)
    nodes, executor, spinner = [], None, None
    try:
        t0 = time.monotonic()
        node = VQANode(context=context, parameter_overrides=[
            Parameter("store_path", value=str(path)), *[Parameter(k, value=v) for k, v in NODE.items()]])
        nodes.append(node)
        node.get_logger().set_level(LoggingSeverity.WARN)  # start-up was logged; keep the demo readable
        camera = SyntheticCamera(context=context, parameter_overrides=[Parameter(k, value=v)
                                                                       for k, v in CAMERA.items()])
        camera.get_logger().set_level(LoggingSeverity.WARN)
        nodes.append(camera)
        observer = _observer_class()(context)
        nodes.append(observer)
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS + 2, context=context)
        for n in nodes:
            executor.add_node(n)
        spinner = threading.Thread(target=spin, args=(executor,), name="demo-executor", daemon=True)
        spinner.start()
        model = node.session.store.manifest.get("model", {})
        print(f"\nstore    {path}  ({model.get('arch', 'unknown architecture')})")
        if not store:
            print("         a tiny random-initialised model built on this machine: its answers are noise;\n"
                  "         the frames, drive reads, timings and ROS 2 plumbing are real")
        print(f"camera   /camera/image_raw {CAMERA['width']}x{CAMERA['height']} rgb8 at {CAMERA['rate_hz']:g} Hz, "
              f"a new scene every {CAMERA['scene_period_s']:g} s (ground truth on /camera/scene)")
        print(f"node     vqa_node up in {time.monotonic() - t0:.1f} s: {NODE['method']} at sparsity "
              f"{NODE['sparsity']:g}, at most {NODE['max_append_rate_hz']:g} frames/s appended, "
              f"answers of up to {NODE['max_new_tokens']} tokens", flush=True)
        _wait_until(lambda: node.session.frames_in_context >= 2, what="the first camera frames")

        print("\n== 1. questions over /ask (a separate DDS participant, as another process would be)\n")
        with AskClient() as client:
            if not client.wait_for_service(WAIT_S):
                raise TimeoutError("demo: the /ask service did not appear")
            for question, reset in QUESTIONS:
                scene, asked_at = observer.scene, time.time()
                response = client.ask(question, reset_context=reset)
                if reset:
                    print("(reset_context: only the newest frame)")
                print(format_response(question, response, asked_at))
                if scene:
                    print(f"truth: {scene['description']}")
                print(flush=True)
                if not response.success:
                    return 1

        print("== 2. selection changed live through the parameter service "
              "(as `ros2 param set /vqa_node sparsity 0.7`)\n")
        rows = _setting_rows(observer, SETTINGS)
        print(f"{'setting':<14} {'rows read':>9} {'KiB read':>9} {'reads':>6} {'KiB/read':>9} {'I/O ms':>7} "
              f"{'est. ms':>8} {'select ms':>10} {'retained':>9} {'frame ms':>9}")
        for r in rows:
            print(f"{r[0]:<14} {r[1]:>9.0%} {r[2]:>9.0f} {r[3]:>6.0f} {r[4]:>9.2f} {r[5]:>7.1f} {r[6]:>8.1f} "
                  f"{r[7]:>10.1f} {r[8]:>9.3f} {r[9]:>9.1f}")
        row_bytes = sorted({g.row_bytes for g in node.session.store.groups.values()})
        print(f"(medians of {FRAMES_PER_SETTING} frames each; 'retained': share of activation importance in the rows "
              f"read.\n Rows of this store are {row_bytes[0]}-{row_bytes[-1]} B, so each read costs about the same "
              "whatever its size and\n fewer, larger reads matter more than fewer rows; `nchunk bench io` shows "
              "7B-model row sizes.)")
        refused = observer.set(sparsity=1.5)[0]
        print(f"\nsparsity 1.5 refused: {refused.reason}")
        restored = observer.set(**{k: NODE[k] for k in ("method", "sparsity")})
        assert all(r.successful for r in restored)

        counters = node.counters()
        print("\n== 3. camera intake\n")
        print(f"frames received {counters.get('frames_received', 0)}, appended {counters.get('frames_appended', 0)}, "
              f"skipped {counters.get('frames_skipped', 0)} (newest frame wins), malformed "
              f"{counters.get('frames_malformed', 0)}; {node.session.frames_in_context} frames in context; "
              f"questions answered {counters.get('asks_answered', 0)}")
        print(f"\ndemo finished in {time.monotonic() - t0:.1f} s. Next: `nchunk convert MODEL_DIR STORE`, then "
              f"`vqa_node --ros-args --params-file config/vqa.yaml -p store_path:=STORE`, "
              f"and `nchunk ask \"...\"` from another shell.")
        return 0
    except StartupError as exc:
        print(f"nchunk demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if executor is not None:
            executor.shutdown()
        for n in reversed(nodes):
            n.destroy_node()
        rclpy.try_shutdown(context=context)
        if spinner is not None:
            spinner.join(timeout=5.0)
