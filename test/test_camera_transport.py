"""The node's camera transport set-up and its watch for silent and shared topics, without DDS (the end-to-end
check with a VGA camera in another process is in test_node_robustness.py)."""
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from nchunk_ros.camera_transport import (SilenceWatch, apply_camera_transport_profile,  # noqa: E402
                                         profile_in_use, silence_cause)

ROOT = Path(__file__).resolve().parents[1]


def test_profile_applied_before_init_unless_the_user_configured_dds():
    env = {}
    assert apply_camera_transport_profile(env) == str(ROOT / "config" / "fastdds_camera.xml")
    assert env == {"FASTDDS_DEFAULT_PROFILES_FILE": str(ROOT / "config" / "fastdds_camera.xml")}
    assert profile_in_use(env) == env["FASTDDS_DEFAULT_PROFILES_FILE"]

    env = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "localhost"}  # rmw would add its own SHM transport again
    path = apply_camera_transport_profile(env)
    assert path.endswith("fastdds_camera_localhost.xml") and Path(path).is_file()
    assert env["ROS_AUTOMATIC_DISCOVERY_RANGE"] == "SYSTEM_DEFAULT"

    for left_alone in ({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}, {"FASTDDS_DEFAULT_PROFILES_FILE": "/mine.xml"},
                       {"FASTRTPS_DEFAULT_PROFILES_FILE": "/mine.xml"}, {"RMW_FASTRTPS_USE_QOS_FROM_XML": "1"},
                       {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_STATIC_PEERS": "10.0.0.2"}):
        env = dict(left_alone)
        assert apply_camera_transport_profile(env) is None and env == left_alone
        assert profile_in_use(env) is None


def test_silence_is_reported_once_per_silence_and_only_with_publishers():
    watch = SilenceWatch(silence_s=5.0)
    watch.restart(["/a", "/b"], now=0.0)
    assert watch.update({"/a": 1, "/b": 0}, now=4.0) == []
    assert watch.update({"/a": 1, "/b": 0}, now=5.0) == ["/a"]  # no frame since the subscription
    assert watch.update({"/a": 1, "/b": 0}, now=9.0) == [] and watch.silent == ["/a"]  # said once
    assert watch.update({"/a": 1, "/b": 1}, now=12.0) == []  # /b's clock starts with its publisher
    assert watch.update({"/a": 1, "/b": 1}, now=17.0) == ["/b"]
    watch.frame("/a", now=17.5)
    assert watch.silent == ["/b"]
    assert watch.update({"/a": 1, "/b": 1}, now=22.0) == []
    assert watch.update({"/a": 1, "/b": 1}, now=22.5) == ["/a"]  # silent again: said again
    assert watch.update({"/a": 0, "/b": 1}, now=23.0) == [] and watch.silent == ["/b"]  # no publisher, no silence


def test_a_shared_topic_is_reported_once_while_it_stays_shared():
    watch = SilenceWatch()
    watch.restart(["/a", "/b"], now=0.0)
    assert watch.update_shared({"/a": 1, "/b": 0}) == [] and watch.shared == []
    assert watch.update_shared({"/a": 2, "/b": 1, "/other": 3}) == ["/a"]  # /other is not watched
    assert watch.update_shared({"/a": 3, "/b": 2}) == ["/b"] and watch.shared == ["/a", "/b"]
    assert watch.update_shared({"/a": 1, "/b": 2}) == [] and watch.shared == ["/b"]
    assert watch.update_shared({"/a": 2, "/b": 2}) == ["/a"]  # shared again: said again


def test_silence_causes():
    assert "set qos_reliability to best_effort" in silence_cause("reliable", ["best_effort"], {})
    assert "512 KiB" in silence_cause("best_effort", ["best_effort"], {})
    profile = {"FASTDDS_DEFAULT_PROFILES_FILE": str(ROOT / "config" / "fastdds_camera.xml")}
    assert "socket buffers" in silence_cause("best_effort", ["best_effort"], profile)
