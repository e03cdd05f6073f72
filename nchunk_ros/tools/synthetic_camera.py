"""A synthetic camera: scenes of coloured shapes published as sensor_msgs/Image, with ground truth.

    synthetic_camera --ros-args -p rate_hz:=5.0 -p scene_period_s:=4.0

The scenes come from the generator the built-in model was trained and tested on
(nchunk_core/demo/scenes.py): by default the held-out test split, scene 0, 1, 2, … of seed 0, so the demo
shows scenes the model has never seen. Every `scene_period_s` seconds the next scene is published at
`rate_hz` as rgb8 on `image_topic`, and its ground truth goes to `scene_topic` as a std_msgs/String
holding JSON, for example

    {"scene": 3, "width": 320, "height": 240, "background": "white",
     "shapes": [{"shape": "circle", "color": "red", "center": [40, 60], "size": 50}],
     "description": "a red circle on a white background, left to right", "stamp": 1763740000.25,
     "questions": [{"kind": "colour", "question": "what color is the circle?", "answer": "red"}, ...]}

published once per scene with transient-local durability, so a late subscriber still gets the
current scene; every frame whose header stamp is at or after "stamp" shows this scene. `render_scene` and `random_scene` are re-exported from nchunk_core.demo.scenes.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import rclpy
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from nchunk_core.demo.scenes import (COLUMNS, SPLIT_IDS, Scene, questions_for, random_scene, render_scene,
                                split_scene)

from nchunk_ros.entry_args import check_arguments
from nchunk_ros.image_conversion import array_to_image
from nchunk_ros.parameters import ParamSpec

__all__ = ["SyntheticCamera", "main", "random_scene", "render_scene"]

PARAMETERS = (  # read once: a camera's geometry and rate are fixed while it runs
    ParamSpec("image_topic", "/camera/image_raw", "topic the frames are published on (sensor_msgs/Image rgb8)"),
    ParamSpec("scene_topic", "/camera/scene", "topic of each scene's ground truth (std_msgs/String JSON)"),
    ParamSpec("frame_id", "camera", "header.frame_id of the frames"),
    ParamSpec("rate_hz", 5.0, "frames per second", 0.1, 120.0),
    ParamSpec("scene_period_s", 4.0, "seconds between scene changes", 0.1, 3600.0),
    ParamSpec("width", 320, "frame width in px", 16, 4096),
    ParamSpec("height", 240, "frame height in px", 16, 4096),
    ParamSpec("max_shapes", COLUMNS, "most shapes in a scene", 1, COLUMNS),
    ParamSpec("seed", 0, "seed of the scene generator", 0, 2**31 - 1),
    ParamSpec("split", "test", "generator split the scenes come from: test (held out from training), val or train"),
)
USAGE = "synthetic_camera [-h] [--ros-args -p NAME:=VALUE ...]"
SUMMARY = ("Publishes scenes of coloured shapes, the kind the built-in model was trained on, as sensor_msgs/Image "
           "frames, and each scene's ground truth and questions as JSON on scene_topic. The settings are read "
           "once, at start.")


class SyntheticCamera(Node):
    """Publishes rendered scenes as rgb8 Images and each scene's ground truth as JSON."""

    def __init__(self, **node_options):
        super().__init__("synthetic_camera", **node_options)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        p = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
        if p["split"] not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, not {p['split']!r}")
        self._p = p
        self._image_pub = self.create_publisher(Image, p["image_topic"], qos_profile_sensor_data)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._scene_pub = self.create_publisher(String, p["scene_topic"], latched)
        self.scene: Scene | None = None
        self._frame: np.ndarray | None = None
        self.frames_published = 0
        self._next_scene()
        self._scene_timer = self.create_timer(p["scene_period_s"], self._next_scene)
        self._frame_timer = self.create_timer(1.0 / p["rate_hz"], self._publish_frame)
        self.get_logger().info(f"publishing {p['width']}x{p['height']} rgb8 at {p['rate_hz']:g} Hz on "
                               f"{p['image_topic']}, a new scene every {p['scene_period_s']:g} s "
                               f"(ground truth on {p['scene_topic']})")

    def _next_scene(self) -> None:
        index = 0 if self.scene is None else self.scene.index + 1
        p = self._p
        self.scene = split_scene(p["split"], index, p["seed"], p["width"], p["height"], p["max_shapes"])
        self._frame = render_scene(self.scene)
        questions = [{"kind": q.kind, "question": q.text, "answer": q.answer}
                     for q in questions_for(self.scene, np.random.default_rng(index))]
        # Timers of one node never overlap (one mutually exclusive callback group): every frame
        # stamped at or after `stamp` shows this scene.
        stamp = self.get_clock().now().nanoseconds * 1e-9
        truth = self.scene.to_dict() | {"stamp": stamp, "questions": questions}
        self._scene_pub.publish(String(data=json.dumps(truth)))

    def _publish_frame(self) -> None:
        msg = array_to_image(self._frame, "rgb8", stamp=self.get_clock().now().to_msg(),
                             frame_id=self._p["frame_id"])
        self._image_pub.publish(msg)
        self.frames_published += 1


def main(args=None) -> int:
    """Console entry point `synthetic_camera` (ROS arguments as usual: --ros-args -p rate_hz:=10.0); exit
    status 0, 1 for a bad parameter value (the reason on stderr), 2 for an argument before --ros-args."""
    argv = sys.argv if args is None else args
    code = check_arguments(argv, "synthetic_camera", USAGE, SUMMARY, PARAMETERS)
    if code is not None:
        return code
    rclpy.init(args=argv)
    node = None
    code = 0
    try:
        node = SyntheticCamera()
        rclpy.spin(node)
    except (ValueError, ParameterException) as exc:
        print(f"synthetic_camera: {' '.join(str(exc).split())}", file=sys.stderr)
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
