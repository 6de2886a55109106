"""Peer of tests/node_actions.rs: the ~/inspect action as a behaviour tree uses it.

A camera publishes the given images in turn at 5 Hz (best effort, as a driver does) while an
rclpy ActionClient sends goals:
  several:   num_frames=3, to the end (feedback after each frame);
  cancelled: num_frames=50, cancelled after the second feedback;
  no_camera: the camera stopped, num_frames=1, timeout_s=1 (aborted with a reason);
  too_many:  num_frames=5000 (aborted with a reason).
Writes what it saw as JSON: per goal the final status, the result's fields and the feedback.

usage: inspect_action.py --images a.png b.png --out obs.json
"""
import argparse
import json

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from PIL import Image as PILImage
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from anomaly_inspector_msgs.action import Inspect

from peer_common import key, spin_until

STATUS = {GoalStatus.STATUS_SUCCEEDED: "succeeded", GoalStatus.STATUS_CANCELED: "canceled",
          GoalStatus.STATUS_ABORTED: "aborted"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    rclpy.init()
    node = rclpy.create_node("inspect_action_peer")
    pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
    frames = []
    for path in a.images:
        arr = np.asarray(PILImage.open(path).convert("RGB"), dtype=np.uint8)
        frames.append(Image(height=arr.shape[0], width=arr.shape[1], encoding="rgb8",
                            step=arr.shape[1] * 3, data=arr.tobytes()))
    camera = {"on": True, "sent": 0}

    def tick():
        if not camera["on"]:
            return
        msg = frames[camera["sent"] % len(frames)]
        camera["sent"] += 1
        msg.header.stamp.sec = 100 + camera["sent"]
        msg.header.frame_id = "camera_optical"
        pub.publish(msg)

    node.create_timer(0.2, tick)
    client = ActionClient(node, Inspect, "/anomaly_inspector/inspect")
    obs = {"server": client.wait_for_server(timeout_sec=20.0)}
    spin_until(node, lambda: pub.get_subscription_count() > 0, 20.0)
    spin_until(node, lambda: False, 1.0)

    def run(name, num_frames, timeout_s, cancel_after=None):
        feedback = []
        sent = client.send_goal_async(Inspect.Goal(num_frames=num_frames, timeout_s=timeout_s),
                                      feedback_callback=lambda f: feedback.append(f.feedback))
        spin_until(node, sent.done, 10.0)
        handle = sent.result() if sent.done() else None
        if handle is None or not handle.accepted:
            obs[name] = {"accepted": False}
            return
        if cancel_after is not None:
            spin_until(node, lambda: len(feedback) >= cancel_after, 30.0)
            cancelling = handle.cancel_goal_async()
            spin_until(node, cancelling.done, 10.0)
        done = handle.get_result_async()
        spin_until(node, done.done, 60.0)
        if not done.done():
            obs[name] = {"accepted": True, "finished": False}
            return
        # Feedback (a topic) and the result (a service reply) travel apart: take in what is
        # still on its way before reading the feedback list.
        spin_until(node, lambda: False, 0.5)
        r = done.result()
        obs[name] = {
            "accepted": True, "finished": True, "status": STATUS.get(r.status, r.status),
            "success": r.result.success, "message": r.result.message,
            "is_anomalous": r.result.is_anomalous, "max_score": r.result.max_score,
            "results": [{"stamp_ns": key(x.header), "frame_id": x.header.frame_id, "score": x.score,
                         "is_anomalous": bool(x.is_anomalous)} for x in r.result.results],
            "feedback": [{"frames_done": f.frames_done, "frames_requested": f.frames_requested,
                          "stamp_ns": key(f.last_result.header)} for f in feedback],
        }

    run("several", 3, 10.0)
    run("cancelled", 50, 10.0, cancel_after=2)
    camera["on"] = False
    spin_until(node, lambda: False, 0.5)
    run("no_camera", 1, 1.0)
    run("too_many", 5000, 1.0)
    with open(a.out, "w") as f:
        json.dump(obs, f, indent=1)
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
