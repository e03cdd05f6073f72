"""Camera frames from other processes: the node's Fast DDS profile, and a watch for topics that stay silent.

Large best-effort frames (640×480 rgb8 is 900 KiB) from another process on this host mostly never
arrive over Fast DDS's default 512 KiB shared-memory segment, which belongs to the publisher
(docs/camera_transport.md). `apply_camera_transport_profile`, called by the node's `main` before
`rclpy.init`, makes the node's participant offer no shared-memory locator, so every publisher sends
to it over UDP into a 4 MiB socket buffer (config/fastdds_camera*.xml). It leaves the environment
alone when the user configured Fast DDS themselves or runs another RMW.

`SilenceWatch` tells when a camera topic has publishers but no frame has arrived for
`SILENCE_S` seconds, and logs once per silence what usually causes that (`silence_cause`). It also
tells when a topic has more than one publisher: the node appends the frames of all of them as if
they came from one camera (a forgotten camera process left running, most often).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from rclpy.qos import ReliabilityPolicy

PROFILE = "fastdds_camera.xml"
PROFILE_LOCALHOST = "fastdds_camera_localhost.xml"
USER_SETTINGS = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE", "RMW_FASTRTPS_USE_QOS_FROM_XML")
SILENCE_S = 5.0  # publishers present and no frame for this long: warn
UNKNOWN_NODE = "_NODE_NAME_UNKNOWN_"  # rmw's name for a publisher whose node is not discovered yet


def _config_file(name: str) -> Path | None:
    path = Path(__file__).resolve().parent.parent / "config" / name  # source tree, pip -e
    if path.is_file():
        return path
    try:  # a colcon or setup.sh install: share/nchunk_ros/config
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return None
    try:
        path = Path(get_package_share_directory("nchunk_ros")) / "config" / name
    except PackageNotFoundError:
        return None
    return path if path.is_file() else None


def apply_camera_transport_profile(environ=os.environ) -> str | None:
    """Point Fast DDS at the node's camera profile in `environ` (before rclpy.init); the profile's
    path, or None when it was left alone (another RMW, the user's own Fast DDS settings, LOCALHOST
    with static peers, or no profile file found)."""
    if environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp") != "rmw_fastrtps_cpp":
        return None  # Cyclone DDS etc.: docs/camera_transport.md, "Other RMWs"
    if any(environ.get(k) for k in USER_SETTINGS):
        return None  # the user's own Fast DDS set-up wins
    localhost = environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "").strip().upper() == "LOCALHOST"
    if localhost and environ.get("ROS_STATIC_PEERS"):
        return None  # SYSTEM_DEFAULT would drop the static peers
    path = _config_file(PROFILE_LOCALHOST if localhost else PROFILE)
    if path is None:
        return None
    environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(path)
    if localhost:  # under LOCALHOST rmw_fastrtps would add its own shared-memory transport again
        environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "SYSTEM_DEFAULT"
    return str(path)


def profile_in_use(environ=os.environ) -> str | None:
    """The node's camera profile when the environment applies it, else None."""
    path = environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "")
    return path if Path(path).name in (PROFILE, PROFILE_LOCALHOST) else None


def describe(environ=os.environ) -> str:
    """One line for the node's log: the camera transport in use."""
    profile = profile_in_use(environ)
    if profile:
        return f"camera transport: Fast DDS profile {profile} (UDP, 4 MiB buffers)"
    return "camera transport: as configured by the environment (docs/camera_transport.md)"


def silence_cause(reliability: str, publisher_reliabilities: list[str], environ=os.environ) -> str:
    """What usually keeps frames from a topic with publishers, for a subscription of `reliability`
    ("best_effort" or "reliable") and the publishers' reliabilities."""
    if reliability == "reliable" and "best_effort" in publisher_reliabilities:
        return ("a best-effort publisher does not match a reliable subscription: set qos_reliability "
                "to best_effort")
    if reliability == "reliable":
        return "the publisher is not publishing, or its frames are not delivered"
    if profile_in_use(environ) is None:
        return ("large best-effort frames from another process are dropped by Fast DDS's 512 KiB "
                "shared-memory segment, and the node's UDP profile is not in use (the node's main applies it "
                "unless FASTDDS_DEFAULT_PROFILES_FILE or another RMW is set): see docs/camera_transport.md, "
                "or set qos_reliability to reliable")
    return ("best-effort frames are lost on the way (a publisher on another machine with small socket "
            "buffers, or frames above 4 MiB): see docs/camera_transport.md, or set qos_reliability to reliable")


def publisher_nodes(node, topic: str) -> list[str]:
    """The fully qualified names of the nodes publishing on `topic`, as `node` (an rclpy Node) sees them
    ("a node not yet discovered" for a publisher whose node name has not arrived)."""
    return [f"{i.node_namespace.rstrip('/')}/{i.node_name}" if i.node_name != UNKNOWN_NODE
            else "a node not yet discovered" for i in node.get_publishers_info_by_topic(topic)]


class SilenceWatch:
    """Per camera topic: whether publishers have been present for SILENCE_S seconds without a frame.

    The camera callbacks call `frame`, the node's once-a-second timer `check`; thread-safe.
    """

    def __init__(self, silence_s: float = SILENCE_S):
        self._silence_s = silence_s
        self._lock = threading.Lock()
        self.restart(())

    def restart(self, topics, now: float | None = None) -> None:
        """Watch `topics` afresh from `now` (the node subscribed again)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._heard = {t: now for t in topics}  # last frame, subscription, or a publisher's arrival
            self._publishers = {t: None for t in topics}  # present at the last update; None: not asked yet
            self._silent: set[str] = set()
            self._shared: set[str] = set()  # more than one publisher

    def frame(self, topic: str, now: float) -> None:
        with self._lock:
            if topic in self._heard:
                self._heard[topic] = now
                self._silent.discard(topic)

    def update(self, publishers: dict[str, int], now: float | None = None) -> list[str]:
        """Topics that became silent since the last call (each reported once per silence), given the
        number of `publishers` per topic now."""
        now = time.monotonic() if now is None else now
        newly = []
        with self._lock:
            for topic, heard in self._heard.items():
                present = publishers.get(topic, 0) > 0
                if present and self._publishers[topic] is False:
                    self._heard[topic] = max(heard, now)  # the clock starts when a publisher appears
                self._publishers[topic] = present
                if not present:
                    self._silent.discard(topic)
                elif now - self._heard[topic] >= self._silence_s and topic not in self._silent:
                    self._silent.add(topic)
                    newly.append(topic)
        return newly

    def update_shared(self, publishers: dict[str, int]) -> list[str]:
        """Topics that have more than one publisher now and did not at the last call, given the number
        of `publishers` per topic."""
        with self._lock:
            shared = {t for t in self._heard if publishers.get(t, 0) > 1}
            newly = sorted(shared - self._shared)
            self._shared = shared
        return newly

    @property
    def shared(self) -> list[str]:
        """Topics with more than one publisher at the last check."""
        with self._lock:
            return sorted(self._shared)

    @property
    def silent(self) -> list[str]:
        """Topics with publishers and no frame for SILENCE_S seconds, now."""
        with self._lock:
            return sorted(self._silent)

    def check(self, node, reliability: str) -> list[str]:
        """Ask `node` (an rclpy Node) for the publishers of the watched topics, log one warning for
        each topic that became silent or shared, and return the silent topics (`shared` then holds the
        shared ones)."""
        with self._lock:
            topics = list(self._heard)
        publishers = {t: node.count_publishers(t) for t in topics}
        for topic in self.update_shared(publishers):
            names = sorted(publisher_nodes(node, topic))
            node.get_logger().warning(
                f"camera topic {topic} has {publishers[topic]} publishers ({', '.join(names)}): their frames are "
                f"appended as if from one camera; stop the ones you did not mean to run (a camera process left "
                f"running?), or give each camera its own topic in image_topics")
        for topic in self.update(publishers):
            offered = ["reliable" if i.qos_profile.reliability == ReliabilityPolicy.RELIABLE else "best_effort"
                       for i in node.get_publishers_info_by_topic(topic)]
            node.get_logger().warning(
                f"camera topic {topic} has {publishers[topic]} publisher(s) ({', '.join(offered)}) but no frame "
                f"arrived for {self._silence_s:g} s on this {reliability}, depth-1 subscription; likely cause: "
                f"{silence_cause(reliability, offered)}")
        return self.silent
