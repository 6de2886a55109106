"""Launch one anomaly_inspector per camera (two cameras here; copy a block for more).

Why one node per camera rather than one node watching a list of topics: each camera gets its
own inference thread, model, threshold and ROI; a camera that stalls or floods cannot delay
another's verdicts; results and services are namespaced per camera (/cell1/top/anomaly/result,
/cell1/top/anomaly_inspector/inspect), which is what a behaviour tree addresses; and it is the
ROS way (remapping, namespaces, one composable unit per sensor). The cost is one model copy per
camera in memory, small for PatchCore with EfficientNet-Lite0.

    ros2 launch anomaly_inspector multi_camera.launch.py \
        top_image:=/top_camera/image_raw side_image:=/side_camera/image_raw
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory("anomaly_inspector")
    default_params = os.path.join(share, "config", "anomaly_inspector.yaml")
    cameras = ("top", "side")
    args = [DeclareLaunchArgument("params_file", default_value=default_params, description="parameter YAML")]
    nodes = []
    for cam in cameras:
        args.append(DeclareLaunchArgument(f"{cam}_image", default_value=f"/{cam}_camera/image_raw"))
        args.append(DeclareLaunchArgument(f"{cam}_camera_info", default_value=f"/{cam}_camera/camera_info"))
        nodes.append(Node(
            package="anomaly_inspector",
            executable="anomaly_inspector_node",
            name="anomaly_inspector",
            namespace=cam,
            parameters=[LaunchConfiguration("params_file"), {"roi": [0, 0, 0, 0]}],
            remappings=[
                ("image", LaunchConfiguration(f"{cam}_image")),
                ("camera_info", LaunchConfiguration(f"{cam}_camera_info")),
            ],
            output="screen",
        ))
    return LaunchDescription(args + nodes)
