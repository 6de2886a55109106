"""Launch anomaly_inspector on one camera.

    ros2 launch anomaly_inspector anomaly_inspector.launch.py \
        image:=/camera/image_raw params_file:=/path/to/anomaly_inspector.yaml namespace:=cell1
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("anomaly_inspector"), "config", "anomaly_inspector.yaml")
    return LaunchDescription([
        DeclareLaunchArgument("image", default_value="/camera/image_raw", description="camera image topic"),
        DeclareLaunchArgument("camera_info", default_value="/camera/camera_info", description="camera info topic"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="parameter YAML"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        Node(
            package="anomaly_inspector",
            executable="anomaly_inspector_node",
            name="anomaly_inspector",
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file")],
            remappings=[
                ("image", LaunchConfiguration("image")),
                ("camera_info", LaunchConfiguration("camera_info")),
            ],
            output="screen",
        ),
    ])
