"""What the VQA node does with what the user did not set, over real rclpy and DDS.

- The default params file alone (config/vqa.yaml has an empty store_path, which is what
  `ros2 launch nchunk_ros vqa.launch.py` with no arguments passes): the node runs the built-in demo
  model at its store's recommended settings and answers about a camera frame right. It runs as a
  process, as launch starts it.
- A store's recommended settings: parameters the user did not set take the store's values (shown
  by the parameter service, as `ros2 param get` does); a value given at start-up (`-p`, parameter
  overrides) or set later wins, also when the model is reloaded from another store.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from rclpy.signals import SignalHandlerOptions  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from nchunk_core.demo.model import RECOMMENDED, shipped_store  # noqa: E402
from nchunk_core.demo.scenes import Scene, Shape, render_scene  # noqa: E402
from nchunk_core.io.latency import LatencyTable  # noqa: E402
from nchunk_core.io.profile import cache_path  # noqa: E402
from nchunk_core.store import Recommended, set_recommended  # noqa: E402
from nchunk_ros import diagnostics  # noqa: E402
from nchunk_ros.image_conversion import array_to_image  # noqa: E402
from ros_rig import World, feed, publish_until, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "vqa.yaml"
START_TIMEOUT_S = 90.0  # only reached when something is wrong
DEFAULT_TOPIC = "/camera/image_raw"  # config/vqa.yaml's image_topics


def red_square_on_white() -> np.ndarray:
    """A frame like the built-in model's scenes (scenes.py): one red square in one cell of a white
    320×240 frame."""
    return render_scene(Scene(0, 320, 240, "white", [Shape("square", "red", (120, 90), 48)]))


def read_until(proc, text, lines):
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any(text in line for line in lines):
        line = proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"no {text!r} from the node:\n" + "".join(lines)
        lines.append(line)


def test_the_default_params_file_alone_answers_with_the_built_in_model(ros_env):
    LatencyTable.synthetic().save(cache_path(shipped_store(), 6))  # no drive profiling in a test
    domain = (int(ros_env["ROS_DOMAIN_ID"]) + 5) % 200 + 20
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "nchunk_ros.vqa_node", "--ros-args", "--params-file", str(CONFIG)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    ctx = Context()
    rclpy.init(args=[], context=ctx, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
    tester = World(ctx)
    camera = tester.create_publisher(Image, DEFAULT_TOPIC, qos_profile_sensor_data)
    executor = MultiThreadedExecutor(num_threads=2, context=ctx)
    executor.add_node(tester)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    lines = []
    try:
        read_until(proc, "ready: /ask served", lines)
        assert tester.ask_client.wait_for_service(timeout_sec=START_TIMEOUT_S)
        assert tester.params.wait_for_services(timeout_sec=START_TIMEOUT_S)
        frame = array_to_image(red_square_on_white(), "rgb8")
        publish_until(lambda: camera.publish(frame),
                      lambda: any(name == diagnostics.FRAME for name, _, _ in list(tester.statuses)), "the frame")
        r = tester.call("what color is the square?")
        assert r.success and r.answer == "red", r
        in_effect = {name: tester.get_param(name) for name in ("sparsity", "method", "max_frames", "max_new_tokens")}
        assert in_effect == {"sparsity": RECOMMENDED.sparsity, "method": RECOMMENDED.method,
                             "max_frames": RECOMMENDED.max_frames, "max_new_tokens": RECOMMENDED.max_new_tokens}
        assert tester.get_param("store_path") == ""
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        executor.shutdown()
        tester.destroy_node()
        rclpy.try_shutdown(context=ctx)
    log = "".join(lines) + out
    assert proc.returncode == 0, log
    assert f"the built-in demo model ({shipped_store()})" in log
    assert "from the store's recommended settings" in log and "Traceback" not in log


@pytest.fixture(scope="module")
def stores(node_store, tmp_path_factory):
    """(a copy of the tiny store recommending magnitude at 0.2, max_frames 3, max_new_tokens 6; the tiny
    store itself, which recommends what `nchunk convert` records)."""
    import shutil

    copy = shutil.copytree(node_store, tmp_path_factory.mktemp("recommending") / "store")
    set_recommended(copy, Recommended(sparsity=0.2, method="magnitude", max_frames=3, max_new_tokens=6))
    LatencyTable.synthetic().save(cache_path(copy, 6))
    return copy, node_store


def test_unset_parameters_follow_the_store_and_set_ones_win(start_rig, stores):
    from nchunk_core.store import Store

    recommending, converted = stores
    assert Store.open(converted).recommended.method == "chunking"
    # sparsity and max_new_tokens given as parameter overrides (ros_rig), max_frames with -p
    rig = start_rig(name="vqa_recommended", service="/ask_recommended", store=recommending,
                    ros_args=["-p", "max_frames:=5"])
    node, tester = rig.node, rig.tester
    try:
        def in_effect():
            return {name: tester.get_param(name) for name in ("sparsity", "method", "max_frames", "max_new_tokens")}

        assert in_effect() == {"sparsity": 0.5, "method": "magnitude", "max_frames": 5, "max_new_tokens": 4}
        assert node.session.config.selection.method == "magnitude" and node.session.config.max_frames == 5

        assert tester.set_params(store_path=str(converted))[0].successful  # a reload: method follows the store
        wait_for(lambda: node.session.store.path == Path(converted), what="the reload")
        assert in_effect() == {"sparsity": 0.5, "method": "chunking", "max_frames": 5, "max_new_tokens": 4}

        assert tester.set_params(method="dp")[0].successful  # set by the user now: it stays
        assert tester.set_params(store_path=str(recommending))[0].successful
        wait_for(lambda: node.session.store.path == Path(recommending), what="the reload back")
        assert in_effect() == {"sparsity": 0.5, "method": "dp", "max_frames": 5, "max_new_tokens": 4}
        seen = len(tester.frame_statuses())
        feed(tester, node, frames=1, seed=7)
        stats = wait_for(lambda: tester.frame_statuses()[seen:], what="the frame's statistics")[-1]
        assert (stats["method"], stats["sparsity"], stats["max_frames"]) == ("dp", "0.5", "5")
    finally:
        rig.stop()
