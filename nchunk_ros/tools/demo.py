"""`nchunk demo`: a camera, the VQA node and questions over ROS 2, all on this machine.

Needs no ROS install (the PyPI wheels of scripts/setup.sh do), no model download and no network:

1. the built-in model (nchunk_core/demo/data/shapes-vlm: a small SmolVLM trained from scratch on scenes
   of coloured shapes by `nchunk train-demo`, already converted to a store), or `--store STORE`;
2. in one process, on DDS restricted to this host unless ROS_AUTOMATIC_DISCOVERY_RANGE says
   otherwise: the VQA node (vqa_node.py) on that store, the synthetic camera (synthetic_camera.py)
   showing held-out test scenes of the same generator, and an observer node that records the
   camera's ground truth and sets parameters; the node hands each frame's statistics (FrameStats)
   to the demo directly;
3. for a few scenes, the scene's questions over the real /ask service from a separate client
   participant (ask_client.py), each answer beside the truth, once a frame of that scene is in
   context (the built-in model answers about one frame, so the node keeps one: max_frames 1);
4. the sparsity and selection method changed live through the parameter services (what
   `ros2 param set /vqa_node sparsity 0.7` does), with the drive reads per frame under each setting,
   and an out-of-range value refused with its reason;
5. the intake counters; then everything shuts down. About 30 s once the drive profile is cached
   (the first run on a drive adds the one-time quick profile).

Exit status 0 when every answer was right, 1 when one was wrong (or none could be graded) or a step
failed. An answer based on a frame of another scene than the question's (the camera moved on while
the questions were asked, on a busy machine) is shown with "?" and not graded. The demo refuses to
run when another process publishes on its camera topics (a camera left running, most often): its
frames and ground truth would be mixed with the demo's.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from nchunk_core.demo.model import TRAIN_MINUTES, shipped_store

CAMERA = {"rate_hz": 10.0, "scene_period_s": 5.0, "width": 320, "height": 240}
NODE = {"max_append_rate_hz": 4.0, "max_new_tokens": 4, "max_frames": 1, "sparsity": 0.1,
        "method": "chunking"}
SCENES = 3  # scenes whose questions are asked
SETTINGS = (("chunking", 0.0), ("magnitude", 0.5), ("chunking", 0.5), ("chunking", 0.7))
FRAMES_PER_SETTING = 3
WAIT_S = 15.0  # for anything that should take a second or two
TOPICS = ("/camera/image_raw", "/camera/scene")  # the synthetic camera's defaults


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
    from std_msgs.msg import String

    class Observer(Node):
        """Records the camera's ground truth and the frames the node appended; sets parameters."""

        def __init__(self, context):
            super().__init__("nchunk_demo_observer", context=context)
            self.frames: list = []  # FrameStats of every frame appended, in order
            self.scene: dict | None = None
            latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
            self.create_subscription(String, "/camera/scene", self._on_scene, latched)
            self.params = AsyncParameterClient(self, "vqa_node")

        def on_frame(self, topic: str, stats) -> None:
            """vqa_node's frame listener (called on its worker thread)."""
            self.frames.append(stats)

        def _on_scene(self, msg) -> None:
            self.scene = json.loads(msg.data)

        def set(self, **values) -> list:
            """Set parameters on vqa_node through its parameter service; the SetParametersResults."""
            future = self.params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
            _wait_until(future.done, what="the parameter service")
            return list(future.result().results)

    return Observer


def other_publishers(node) -> str:
    """What is wrong when a topic of TOPICS has a publisher besides the demo's camera, as `node` sees
    the graph; "" when none has."""
    from nchunk_ros.camera_transport import publisher_nodes

    for topic in TOPICS:
        names = publisher_nodes(node, topic)
        if len(names) > 1:
            return (f"{len(names)} publishers on {topic} ({', '.join(sorted(names))}): another process publishes "
                    f"on the demo's camera topics, and the demo would ask about its frames with the wrong ground "
                    f"truth. Stop it (a synthetic_camera left running: `pkill -f synthetic_camera`), or run the "
                    f"demo with another ROS_DOMAIN_ID")
    return ""


def _next_scene_in_context(observer) -> dict:
    """Wait for the camera's next scene and for a frame of it appended by the node; its truth."""
    first = observer.scene["scene"] if observer.scene else -1
    period = CAMERA["scene_period_s"]
    _wait_until(lambda: observer.scene and observer.scene["scene"] > first, period + WAIT_S, "a new scene")
    scene = observer.scene
    _wait_until(lambda: any(f.stamp >= scene["stamp"] for f in observer.frames[-4:]),
                what="a frame of the new scene in context")
    return scene


def _other_scene(stamp: float, scene: dict, newest: dict) -> str:
    """A note when the answer's newest frame (header stamp) shows another scene than `scene`."""
    if stamp < scene["stamp"]:
        return "  (answered from a frame of the previous scene)"
    if newest["scene"] != scene["scene"] and stamp >= newest["stamp"]:
        return "  (answered from a frame of the next scene)"
    return ""


def accuracy_note(store: Path) -> str:
    """The model's test accuracy as recorded at training time, if the store has training.json."""
    try:
        report = json.loads((store / "training.json").read_text())
        test = report["test"]
    except (OSError, ValueError, KeyError):
        return "no training record in the store"
    return (f"dense test accuracy at training: {test['all']:.1%} of {test['questions']} held-out questions, "
            + ", ".join(f"{k} {test[k]:.0%}" for k in ("colour", "presence", "count", "position") if k in test))


def _setting_rows(observer, settings) -> list[tuple]:
    rows = []
    for method, sparsity in settings:
        results = observer.set(method=method, sparsity=sparsity)
        if not all(r.successful for r in results):
            raise RuntimeError(f"demo: vqa_node refused {method} at {sparsity}: {results[0].reason}")
        start = len(observer.frames)

        def matching():  # each frame says which settings it was appended with
            return [f for f in observer.frames[start:]
                    if f.selection.method == method and f.selection.sparsity == sparsity]

        _wait_until(lambda: len(matching()) >= FRAMES_PER_SETTING, what=f"frames at {method} {sparsity}")
        got = matching()[:FRAMES_PER_SETTING]

        def med(key):
            return statistics.median(getattr(f, key) for f in got)

        rows.append((f"{method} {sparsity:g}", med("rows_read") / med("rows_total"), med("bytes_read") / 2**10,
                     med("reads"), med("bytes_read") / max(med("reads"), 1) / 2**10, med("io_s") * 1e3,
                     med("est_io_s") * 1e3, med("select_s") * 1e3, med("retained"), med("total_s") * 1e3))
    return rows


def run(store: str | None = None) -> int:
    """`nchunk demo` (see the module docstring). Exit status 0 when every step worked."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")  # before any rclpy context
    print("nchunk demo: a synthetic camera, the VQA node and questions over ROS 2 /ask, on this machine\n",
          flush=True)
    path = Path(store).expanduser() if store else shipped_store()
    if not store and not path.is_dir():
        print(f"nchunk demo: the built-in model is missing from {path}; `nchunk train-demo` rebuilds it "
              f"(about {TRAIN_MINUTES} min on 2 cores)", file=sys.stderr)
        return 1

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.logging import LoggingSeverity
    from rclpy.parameter import Parameter

    from nchunk_core.io.profile import cache_path

    from nchunk_ros.ask_client import AskClient, format_response
    from nchunk_ros.tools.synthetic_camera import SyntheticCamera
    from nchunk_ros.parameters import DEFAULTS
    from nchunk_ros.vqa_node import EXECUTOR_THREADS, StartupError, VQANode, spin

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
        node.add_frame_listener(observer.on_frame)
        nodes.append(observer)
        executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS + 2, context=context)
        for n in nodes:
            executor.add_node(n)
        spinner = threading.Thread(target=spin, args=(executor,), name="demo-executor", daemon=True)
        spinner.start()
        model = node.session.store.manifest.get("model", {})
        print(f"\nstore    {path}  ({model.get('arch', 'unknown architecture')})")
        if not store:
            print("         the built-in model: a small SmolVLM trained from scratch on scenes of coloured shapes")
        print(f"camera   /camera/image_raw {CAMERA['width']}x{CAMERA['height']} rgb8 at {CAMERA['rate_hz']:g} Hz, "
              f"a new scene every {CAMERA['scene_period_s']:g} s (ground truth on /camera/scene)")
        print(f"node     vqa_node up in {time.monotonic() - t0:.1f} s: {NODE['method']} at sparsity "
              f"{NODE['sparsity']:g}, at most {NODE['max_append_rate_hz']:g} frames/s appended, "
              f"answers of up to {NODE['max_new_tokens']} tokens", flush=True)
        _wait_until(lambda: node.session.frames_in_context >= 1, what="the first camera frame")
        crowded = other_publishers(observer)
        if crowded:
            print(f"nchunk demo: {crowded}", file=sys.stderr)
            return 1

        print(f"\n== 1. questions about {SCENES} scenes over /ask (a separate DDS participant, as another "
              f"process would be)")
        right = total = ungraded = 0
        with AskClient() as client:
            if not client.wait_for_service(WAIT_S):
                raise TimeoutError("demo: the /ask service did not appear")
            for _ in range(SCENES):
                scene = _next_scene_in_context(observer)
                print(f"\nscene {scene['scene']}: {scene['description']}")
                for q in scene["questions"]:
                    response = client.ask(q["question"])
                    if not response.success:
                        print(format_response(q["question"], response))
                        return 1
                    stamp = response.newest_frame_stamp.sec + response.newest_frame_stamp.nanosec * 1e-9
                    ok = response.answer == q["answer"]
                    late = _other_scene(stamp, scene, observer.scene)
                    if late:  # the truth is of another frame than the one the answer saw: not graded
                        ungraded += 1
                    else:
                        right, total = right + ok, total + 1
                    mark = "?" if late else "✓" if ok else "✗"
                    print(f"  Q: {q['question']:<36} A: {response.answer:<16} truth: {q['answer']:<16} "
                          f"{mark}  {response.total_s * 1e3:4.0f} ms{late}", flush=True)
        print(f"\n{right} of {total} answers correct ({NODE['method']} at sparsity {NODE['sparsity']:g}; "
              f"{accuracy_note(path)})" + (f"; {ungraded} answered from another scene's frame, not graded (?)"
                                           if ungraded else "") + "\n")

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
        print(f"frames received {counters.frames_received}, appended {counters.frames_appended}, "
              f"skipped {counters.frames_skipped} (newest frame wins), malformed "
              f"{counters.frames_malformed}; {node.session.frames_in_context} frames in context; "
              f"questions answered {counters.asks_answered}")
        print(f"\ndemo finished in {time.monotonic() - t0:.1f} s. Next: `nchunk convert MODEL_DIR STORE`, then "
              f"`vqa_node --ros-args --params-file config/vqa.yaml -p store_path:=STORE`, "
              f"and `nchunk ask \"...\"` from another shell.")
        if right < total or not total:
            crowded = other_publishers(observer)
            print(f"nchunk demo: {total - right} of {total} answers were wrong" + (f"; {crowded}" if crowded else ""),
                  file=sys.stderr)
            return 1
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
