"""A synthetic camera: scenes of coloured shapes published as sensor_msgs/Image, with ground truth.

    synthetic_camera --ros-args -p rate_hz:=5.0 -p scene_period_s:=4.0

Every `scene_period_s` seconds a new random scene is drawn (a plain background and one to
`max_shapes` circles, squares and triangles in named colours, drawn with NumPy, no OpenCV) and
published at `rate_hz` as rgb8 on `image_topic`. Each scene's ground truth goes to `scene_topic` as a
std_msgs/String holding JSON, for example

    {"scene": 3, "width": 320, "height": 240, "background": "white",
     "shapes": [{"shape": "circle", "color": "red", "center": [80, 60], "size": 40}],
     "description": "a red circle on a white background"}

published once per scene with transient-local durability, so a late subscriber still gets the
current scene. `render_scene` and `random_scene` are plain functions (tests, the demo).
"""
from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import Image
from std_msgs.msg import String

from .image_conversion import array_to_image

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


@dataclasses.dataclass
class Shape:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    center: tuple[int, int]  # (x, y) px
    size: int  # circle diameter, square side, triangle base and height (px)


@dataclasses.dataclass
class Scene:
    index: int
    width: int
    height: int
    background: str
    shapes: list[Shape]

    def description(self) -> str:
        things = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.shape}" for s in self.shapes]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed} on a {self.background} background"

    def to_json(self) -> str:
        return json.dumps({
            "scene": self.index, "width": self.width, "height": self.height, "background": self.background,
            "shapes": [dataclasses.asdict(s) | {"center": list(s.center)} for s in self.shapes],
            "description": self.description(),
        })


def random_scene(rng: np.random.Generator, width: int, height: int, index: int = 0,
                 max_shapes: int = 3) -> Scene:
    """One to `max_shapes` shapes of distinct colours at random places, fully inside the image."""
    count = int(rng.integers(1, max_shapes + 1))
    colors = rng.choice(list(COLORS), size=count, replace=False)
    shapes = []
    for color in colors:
        size = int(rng.integers(max(4, min(width, height) // 6), max(5, min(width, height) // 3)))
        half = size // 2 + 1
        center = (int(rng.integers(half, max(half + 1, width - half))),
                  int(rng.integers(half, max(half + 1, height - half))))
        shapes.append(Shape(str(rng.choice(SHAPES)), str(color), center, size))
    background = str(rng.choice(list(BACKGROUNDS)))
    return Scene(index, width, height, background, shapes)


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as uint8 [H, W, 3] RGB; later shapes are drawn over earlier ones."""
    img = np.empty((scene.height, scene.width, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    y, x = np.mgrid[0:scene.height, 0:scene.width]
    for s in scene.shapes:
        cx, cy, half = s.center[0], s.center[1], s.size / 2.0
        if s.shape == "circle":
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= half ** 2
        elif s.shape == "square":
            mask = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
        else:  # triangle, apex up: inside when below the apex and within the widening sides
            top, bottom = cy - half, cy + half
            rel = (y - top) / max(s.size, 1)  # 0 at the apex, 1 at the base
            mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= rel * half)
        img[mask] = COLORS[s.color]
    return img


def _describe(text, lo=None, hi=None, integer=False) -> ParameterDescriptor:
    d = ParameterDescriptor(description=text)
    if lo is not None and integer:
        d.integer_range = [IntegerRange(from_value=lo, to_value=hi, step=1)]
    elif lo is not None:
        d.floating_point_range = [FloatingPointRange(from_value=lo, to_value=hi, step=0.0)]
    return d


class SyntheticCamera(Node):
    """Publishes rendered scenes as rgb8 Images and each scene's ground truth as JSON."""

    def __init__(self, **node_options):
        super().__init__("synthetic_camera", **node_options)
        # Settings are read once: a camera's geometry and rate are fixed while it runs.
        self.declare_parameter("image_topic", "/camera/image_raw",
                               _describe("topic the frames are published on (sensor_msgs/Image rgb8)"))
        self.declare_parameter("scene_topic", "/camera/scene",
                               _describe("topic of each scene's ground truth (std_msgs/String JSON)"))
        self.declare_parameter("frame_id", "camera", _describe("header.frame_id of the frames"))
        self.declare_parameter("rate_hz", 5.0, _describe("frames per second", 0.1, 120.0))
        self.declare_parameter("scene_period_s", 4.0, _describe("seconds between scene changes", 0.1, 3600.0))
        self.declare_parameter("width", 320, _describe("frame width in px", 16, 4096, integer=True))
        self.declare_parameter("height", 240, _describe("frame height in px", 16, 4096, integer=True))
        self.declare_parameter("max_shapes", 3, _describe("most shapes in a scene", 1, len(COLORS), integer=True))
        self.declare_parameter("seed", 0, _describe("random seed of the scene sequence", 0, 2**31 - 1, integer=True))
        p = {name: self.get_parameter(name).value for name in
             ("image_topic", "scene_topic", "frame_id", "rate_hz", "scene_period_s", "width", "height",
              "max_shapes", "seed")}
        self._p = p
        self._rng = np.random.default_rng(p["seed"])
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
        self.scene = random_scene(self._rng, self._p["width"], self._p["height"], index, self._p["max_shapes"])
        self._frame = render_scene(self.scene)
        self._scene_pub.publish(String(data=self.scene.to_json()))

    def _publish_frame(self) -> None:
        msg = array_to_image(self._frame, "rgb8", stamp=self.get_clock().now().to_msg(),
                             frame_id=self._p["frame_id"])
        self._image_pub.publish(msg)
        self.frames_published += 1


def main(args=None) -> int:
    """Console entry point `synthetic_camera` (ROS arguments as usual: --ros-args -p rate_hz:=10.0)."""
    rclpy.init(args=sys.argv if args is None else args)
    node = None
    try:
        node = SyntheticCamera()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
