"""Peer of tests/node_labels.rs: an operator labels frames the node inspected (~/label), then a
behaviour tree teaches a new model from them (~/teach action).

A camera publishes a good and a defective image in turn at 5 Hz (best effort, as a driver does).
The peer labels by the stamps of the AnomalyResults it received:
  before_frames: a label before any frame was inspected (refused);
  good, good_again: a good frame, then the same frame again (replaces);
  box, polygon, mask, verdict: defective frames with a box, a polygon, a mask image, nothing;
  unknown_stamp, bad_label, good_with_box, mask_wrong_size, mask_bad_data, bad_type, two_areas:
  refused, with reasons.
Then ~/teach goals: bad_method (aborted), collect_cancelled (cancelled while collecting),
fit_cancelled (cancelled while fitting), taught (supersimplenet from frames and labels, to the
end, with feedback); and the ~/teach service asked to overwrite the taught model (refused).
Writes what it saw as JSON.

usage: label_teach.py --good good.png --defect defect.png --out obs.json
"""
import argparse
import json

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from geometry_msgs.msg import Point32
from PIL import Image as PILImage
from rclpy.action import ActionClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from anomaly_inspector_msgs.action import Teach as TeachAction
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import Label, Teach

from peer_common import call, key, spin_until

STATUS = {GoalStatus.STATUS_SUCCEEDED: "succeeded", GoalStatus.STATUS_CANCELED: "canceled",
          GoalStatus.STATUS_ABORTED: "aborted"}
NS = "/anomaly_inspector"


def image_msg(arr, encoding):
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return Image(height=h, width=w, encoding=encoding, step=w * channels, data=arr.tobytes())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--good", required=True)
    p.add_argument("--defect", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    rclpy.init()
    node = rclpy.create_node("label_teach_peer")
    pub = node.create_publisher(Image, "image", qos_profile_sensor_data)
    pictures = [np.asarray(PILImage.open(path).convert("RGB"), dtype=np.uint8) for path in (a.good, a.defect)]
    height, width = pictures[0].shape[:2]
    camera = {"on": False, "sent": 0, "only_good": False}
    # stamp (ns) -> (picture index, the header's stamp, the result)
    sent = {}
    results = {}

    def tick():
        if not camera["on"]:
            return
        i = 0 if camera["only_good"] else camera["sent"] % 2
        camera["sent"] += 1
        msg = image_msg(pictures[i], "rgb8")
        msg.header.stamp.sec = 1000 + camera["sent"]
        msg.header.stamp.nanosec = 250
        msg.header.frame_id = "camera_optical"
        sent[key(msg.header)] = (i, msg.header.stamp)
        pub.publish(msg)

    node.create_timer(0.2, tick)
    node.create_subscription(AnomalyResult, "anomaly/result", lambda r: results.__setitem__(key(r.header), r), 10)
    labeller = node.create_client(Label, f"{NS}/label")
    obs = {}

    def label(name, stamp, kind, **fields):
        req = Label.Request(stamp=stamp, label=kind)
        for k, v in fields.items():
            setattr(req, k, v)
        resp = call(node, labeller, req, 20)
        obs[name] = None if resp is None else {
            "success": resp.success, "message": resp.message, "path": resp.path, "good": resp.good,
            "defective": resp.defective, "defective_with_region": resp.defective_with_region}

    first = Image().header.stamp
    first.sec = 1001
    label("before_frames", first, Label.Request.GOOD)

    camera["on"] = True
    spin_until(node, lambda: len(results) >= 8, 60.0)

    def inspected(picture):
        """Stamps of inspected frames showing `picture` (0 good, 1 defect), newest first."""
        return [sent[k][1] for k in sorted(results, reverse=True) if k in sent and sent[k][0] == picture]

    goods, defects = inspected(0), inspected(1)
    obs["inspected"] = {"good": len(goods), "defect": len(defects)}
    label("good", goods[0], Label.Request.GOOD)
    label("good_again", goods[0], Label.Request.GOOD)
    box = Label.Request().box
    box.x_offset, box.y_offset, box.width, box.height = 10, 20, 30, 40
    label("box", defects[0], Label.Request.DEFECTIVE, defect_type="scratch", box=box)
    poly = Label.Request().polygon
    poly.points = [Point32(x=5.0, y=5.0), Point32(x=60.0, y=5.0), Point32(x=30.0, y=50.0)]
    label("polygon", defects[1], Label.Request.DEFECTIVE, defect_type="scratch", polygon=poly)
    mask = np.zeros((height, width), np.uint8)
    mask[100:140, 50:90] = 255
    label("mask", defects[2], Label.Request.DEFECTIVE, defect_type="dent", mask=image_msg(mask, "mono8"))
    label("verdict", defects[3], Label.Request.DEFECTIVE)

    unknown = Image().header.stamp
    unknown.sec = 5
    label("unknown_stamp", unknown, Label.Request.GOOD)
    label("bad_label", goods[1], 7)
    label("good_with_box", goods[1], Label.Request.GOOD, box=box)
    label("mask_wrong_size", defects[0], Label.Request.DEFECTIVE, mask=image_msg(np.full((8, 8), 255, np.uint8), "mono8"))
    short = image_msg(mask, "mono8")
    short.data = short.data[: len(short.data) // 2]
    label("mask_bad_data", defects[0], Label.Request.DEFECTIVE, mask=short)
    label("bad_type", defects[0], Label.Request.DEFECTIVE, defect_type="../escape")
    label("two_areas", defects[0], Label.Request.DEFECTIVE, box=box, polygon=poly)

    # Teach-in goals, the camera now looking at good parts only.
    camera["only_good"] = True
    client = ActionClient(node, TeachAction, f"{NS}/teach")
    obs["teach_server"] = client.wait_for_server(timeout_sec=20.0)

    def goal(name, cancel_when=None, **fields):
        feedback = []
        sending = client.send_goal_async(TeachAction.Goal(**fields), feedback_callback=lambda f: feedback.append(f.feedback))
        spin_until(node, sending.done, 10.0)
        handle = sending.result() if sending.done() else None
        if handle is None or not handle.accepted:
            obs[name] = {"accepted": False}
            return
        if cancel_when is not None:
            spin_until(node, lambda: any(cancel_when(f) for f in feedback), 120.0)
            cancelling = handle.cancel_goal_async()
            spin_until(node, cancelling.done, 10.0)
        done = handle.get_result_async()
        spin_until(node, done.done, 300.0)
        if not done.done():
            obs[name] = {"accepted": True, "finished": False}
            return
        # Feedback (a topic) and the result (a service reply) travel apart: take in what is
        # still on its way before reading the feedback list.
        spin_until(node, lambda: False, 0.5)
        r = done.result()
        obs[name] = {
            "status": STATUS.get(r.status, str(r.status)), "success": r.result.success, "message": r.result.message,
            "model_path": r.result.model_path, "frames_used": r.result.frames_used,
            "labels_good": r.result.labels_good, "labels_defective": r.result.labels_defective,
            "feedback": [{"stage": f.stage, "frames_collected": f.frames_collected, "frames_requested": f.frames_requested,
                          "fit_step": f.fit_step, "done": f.done, "total": f.total} for f in feedback]}

    goal("bad_method", num_frames=4, model_name="never", method="random_forest")
    goal("collect_cancelled", cancel_when=lambda f: f.stage == "collecting" and f.frames_collected >= 1,
         num_frames=400, model_name="collect_cancelled", timeout_s=120.0, method="patchcore")
    goal("fit_cancelled", cancel_when=lambda f: f.stage == "fitting", num_frames=4, model_name="fit_cancelled",
         timeout_s=60.0, method="supersimplenet")
    goal("taught", num_frames=6, model_name="taught_ssn", timeout_s=60.0, method="supersimplenet")

    # The node now runs the taught model.
    before = len(results)
    spin_until(node, lambda: len(results) >= before + 3, 30.0)
    newest = results[max(results)]
    obs["after_teach"] = {"model_id": newest.model_id, "method": newest.method}

    teacher = node.create_client(Teach, f"{NS}/teach")
    resp = call(node, teacher, Teach.Request(num_frames=2, model_name="taught_ssn", timeout_s=30.0), 60)
    obs["overwrite"] = None if resp is None else {"success": resp.success, "message": resp.message}
    camera["on"] = False

    with open(a.out, "w") as f:
        json.dump(obs, f, indent=1)
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
