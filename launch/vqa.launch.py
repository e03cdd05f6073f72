"""Launch the nchunk VQA node with its parameters from a YAML file.

    ros2 launch nchunk_ros vqa.launch.py                                  # the built-in demo model
    ros2 launch nchunk_ros vqa.launch.py params_file:=/path/to/my_vqa.yaml

`params_file` defaults to the installed config/vqa.yaml, whose store_path is empty: the node then
answers with the built-in demo model at that store's recommended settings, from /camera/image_raw.
For your own model, copy the file, set store_path (and the camera topics), and pass the copy.
Without `launch` (ROS 2 from PyPI wheels) the same is:

    vqa_node --ros-args --params-file /path/to/my_vqa.yaml
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "nchunk_ros"


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory(PACKAGE), "config", "vqa.yaml")
    params_file = LaunchConfiguration("params_file")
    return LaunchDescription([
        DeclareLaunchArgument(
            "params_file",
            default_value=default_params,
            description="YAML file with the vqa_node parameters (see config/vqa.yaml)",
        ),
        Node(
            package=PACKAGE,
            executable="vqa_node",
            name="vqa_node",
            parameters=[params_file],
            output="screen",
            emulate_tty=True,
        ),
    ])
