"""The ROS entry points' command lines: --help prints every parameter and starts nothing; an argument
before --ros-args is refused with the reason; a bad parameter value ends the camera with a reason."""
import subprocess
import sys

import pytest

pytest.importorskip("rclpy", reason="ROS 2 (rclpy) is not installed")

from nchunk_ros import parameters  # noqa: E402
from nchunk_ros.entry_args import check_arguments  # noqa: E402
from nchunk_ros.tools import synthetic_camera  # noqa: E402

ENTRY_POINTS = {"nchunk_ros.vqa_node": parameters.PARAMETERS, "nchunk_ros.tools.synthetic_camera":
                synthetic_camera.PARAMETERS}


def entry_point(module, *args, timeout=180):  # a hang guard, not a speed bound
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_help_lists_every_parameter_and_starts_nothing(module):
    done = entry_point(module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: ") and done.stderr == ""  # no node logged its start
    for spec in ENTRY_POINTS[module]:
        assert f"\n  {spec.name} (default " in done.stdout, spec.name
    assert "0.1 to 3600" in done.stdout  # a range (ask_timeout_s, scene_period_s)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_an_argument_before_ros_args_is_refused(module):
    done = entry_point(module, "-p", "rate_hz:=2.0")
    assert done.returncode == 2 and "unrecognized argument '-p'" in done.stderr and "--ros-args" in done.stderr


def test_help_after_ros_args_belongs_to_ros_and_ros_arguments_pass():
    specs = parameters.PARAMETERS
    assert check_arguments(["vqa_node"], "vqa_node", "", "", specs) is None
    assert check_arguments(["vqa_node", "--ros-args", "-p", "sparsity:=0.5", "--help"], "vqa_node", "", "",
                           specs) is None


def test_a_bad_camera_parameter_ends_the_camera_with_its_reason():
    done = entry_point("nchunk_ros.tools.synthetic_camera", "--ros-args", "-p", "split:=holdout")
    assert done.returncode == 1 and "split must be one of" in done.stderr and "Traceback" not in done.stderr
    done = entry_point("nchunk_ros.tools.synthetic_camera", "--ros-args", "-p", "rate_hz:=1000.0")
    assert done.returncode == 1 and "rate_hz" in done.stderr and "Traceback" not in done.stderr
