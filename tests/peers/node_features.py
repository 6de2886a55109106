#!/usr/bin/env python3
"""rclpy peer for tests/node_features.rs: drives a running anomaly_inspector node through every
input kind, output, service and the frame policy, and writes what it observed as JSON. The Rust
test makes the assertions; this script only observes (and fails loudly if the node is absent).

    node_features.py --good G.png --defect D.png --node-name anomaly_inspector --out obs.json
        [--taught-root DIR] [--model DIR] [--bag DIR] [--compressed]
"""
import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from PIL import Image as PILImage
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Float32
from visualization_msgs.msg import MarkerArray
from diagnostic_msgs.msg import DiagnosticArray
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import Inspect, LoadModel, SetThreshold, Teach
from peer_common import call, key, spin_until

RELIABLE = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=50)
LATCHED = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=1,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


class Peer(Node):
    def __init__(self, compressed, best_effort=False):
        global RELIABLE
        super().__init__("node_features_peer")
        self.pub = (self.create_publisher(CompressedImage, "image/compressed", RELIABLE) if compressed
                    else self.create_publisher(Image, "image", RELIABLE))
        if best_effort:  # for the outputs only
            RELIABLE = QoSProfile(reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST, depth=50)
        self.results, self.scores, self.maps, self.heatmaps, self.overlays = {}, [], {}, {}, {}
        self.markers, self.diags, self.verdicts = [], [], []
        self.arrival = {}
        self.create_subscription(AnomalyResult, "anomaly/result", self.on_result, RELIABLE)
        self.create_subscription(Float32, "anomaly/score", lambda m: self.scores.append(m.data), RELIABLE)
        self.create_subscription(Image, "anomaly/map", lambda m: self.maps.__setitem__(key(m.header), m), RELIABLE)
        self.create_subscription(Image, "anomaly/heatmap", lambda m: self.heatmaps.__setitem__(key(m.header), m), RELIABLE)
        self.create_subscription(Image, "anomaly/overlay", lambda m: self.overlays.__setitem__(key(m.header), m), RELIABLE)
        self.create_subscription(MarkerArray, "anomaly/markers", lambda m: self.markers.append(m), RELIABLE)
        self.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diags.append(m), RELIABLE)
        self.stamp = time.time_ns()

    def on_result(self, m):
        self.results[key(m.header)] = m
        self.arrival[key(m.header)] = time.monotonic()

    def next_stamp(self):
        self.stamp += 1_000_000
        return self.stamp


def raw_msg(rgb, encoding, stamp, pad=0, big_endian=False):
    """rgb: HxWx3 uint8. Builds an Image of `encoding` carrying the same picture."""
    h, w, _ = rgb.shape
    gray = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).round().astype(np.uint8)
    if encoding == "rgb8":
        arr = rgb
    elif encoding == "bgr8":
        arr = rgb[..., ::-1]
    elif encoding == "rgba8":
        arr = np.dstack([rgb, np.full((h, w), 255, np.uint8)])
    elif encoding == "bgra8":
        arr = np.dstack([rgb[..., ::-1], np.full((h, w), 255, np.uint8)])
    elif encoding == "mono8":
        arr = gray
    elif encoding == "mono16":
        arr = (gray.astype(np.uint16) * 257).astype(">u2" if big_endian else "<u2")
    else:
        arr = rgb
    arr = np.ascontiguousarray(arr)
    row = arr.reshape(h, -1).view(np.uint8)
    if pad:
        row = np.hstack([row, np.zeros((h, pad), np.uint8)])
    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    m.header.frame_id = "cam"
    m.height, m.width, m.encoding = h, w, encoding
    m.is_bigendian = 1 if big_endian else 0
    m.step = row.shape[1]
    m.data = row.tobytes()
    return m


def compressed_msg(path, fmt, stamp):
    import io
    buf = io.BytesIO()
    PILImage.open(path).convert("RGB").save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=95)
    m = CompressedImage()
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    m.header.frame_id = "cam"
    m.format = fmt
    m.data = buf.getvalue()
    return m


def send_and_wait(node, msg, timeout=30.0):
    node.pub.publish(msg)
    k = key(msg.header)
    ok = spin_until(node, lambda: k in node.results, timeout)
    return node.results.get(k) if ok else None


def result_dict(r):
    if r is None:
        return None
    return {"stamp": key(r.header), "frame_id": r.header.frame_id, "score": r.score, "raw_score": r.raw_score,
            "threshold": r.threshold, "is_anomalous": bool(r.is_anomalous), "model_id": r.model_id,
            "n_regions": len(r.regions),
            "regions": [{"x": g.bbox.x_offset, "y": g.bbox.y_offset, "w": g.bbox.width, "h": g.bbox.height,
                         "cx": g.centroid_x, "cy": g.centroid_y, "area": g.area_px} for g in r.regions]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", type=Path, required=True)
    ap.add_argument("--defect", type=Path, required=True)
    ap.add_argument("--node-name", default="anomaly_inspector")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--taught-name", default="")
    ap.add_argument("--bag", type=Path)
    ap.add_argument("--compressed", action="store_true")
    ap.add_argument("--best-effort", action="store_true", help="subscribe to the outputs best effort")
    ap.add_argument("--scenario", default="all", choices=["all", "compressed", "policy"])
    args = ap.parse_args()
    for var in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set (DDS must stay on loopback)")
    rclpy.init()
    node = Peer(args.compressed, args.best_effort)
    if not spin_until(node, lambda: node.pub.get_subscription_count() > 0, 60):
        sys.exit("the node's input subscription never appeared")
    spin_until(node, lambda: False, 0.5)
    obs = {}
    good = np.asarray(PILImage.open(args.good).convert("RGB"))
    defect = np.asarray(PILImage.open(args.defect).convert("RGB"))

    if args.scenario == "compressed":
        for fmt in ("jpeg", "png"):
            for name, path in (("good", args.good), ("defect", args.defect)):
                r = send_and_wait(node, compressed_msg(path, fmt, node.next_stamp()))
                obs[f"{fmt}_{name}"] = result_dict(r)
        corrupt = compressed_msg(args.good, "jpeg", node.next_stamp())
        corrupt.data = bytes(corrupt.data)[: len(corrupt.data) // 2]
        obs["truncated_jpeg"] = result_dict(send_and_wait(node, corrupt, timeout=3.0))
        # best-effort outputs may drop a message: the property is that the node goes on, so try thrice
        after = None
        for _ in range(3):
            after = after or send_and_wait(node, compressed_msg(args.good, "png", node.next_stamp()), timeout=5.0)
        obs["after_truncated"] = result_dict(after)
        infos = node.get_publishers_info_by_topic("/anomaly/result")
        obs["result_reliability"] = [str(i.qos_profile.reliability.name) for i in infos]
        args.out.write_text(json.dumps(obs, indent=1))
        return 0

    if args.scenario == "policy":
        # Publish far faster than inference; the node must keep only the newest frame.
        stamps = []
        t0 = time.monotonic()
        for i in range(60):
            m = raw_msg(good if i % 2 else defect, "rgb8", node.next_stamp())
            stamps.append(key(m.header))
            node.pub.publish(m)
            rclpy.spin_once(node, timeout_sec=0.0)
            time.sleep(0.005)
        t_sent = time.monotonic()
        spin_until(node, lambda: stamps[-1] in node.results, 30)
        spin_until(node, lambda: False, 1.5)
        got = [s for s in stamps if s in node.results]
        obs["sent"] = len(stamps)
        obs["received"] = len(got)
        obs["last_received"] = stamps[-1] in node.results
        obs["last_latency_s"] = node.arrival.get(stamps[-1], float("nan")) - t_sent
        obs["publish_seconds"] = t_sent - t0
        spin_until(node, lambda: False, 1.2)
        diag = [s for d in node.diags for s in d.status if s.name.startswith(args.node_name)]
        obs["diag"] = {kv.key: kv.value for kv in diag[-1].values} if diag else None
        args.out.write_text(json.dumps(obs, indent=1))
        return 0

    # 1. Every raw encoding of the same picture, padded rows, both mono16 byte orders.
    enc = {}
    for encoding, pad, be in [("rgb8", 0, False), ("bgr8", 0, False), ("rgba8", 0, False), ("bgra8", 0, False),
                              ("rgb8", 13, False), ("mono8", 0, False), ("mono8", 7, False),
                              ("mono16", 0, False), ("mono16", 0, True)]:
        r = send_and_wait(node, raw_msg(defect, encoding, node.next_stamp(), pad, be))
        enc[f"{encoding}{'_pad' if pad else ''}{'_be' if be else ''}"] = result_dict(r)
    obs["encodings"] = enc

    # 2. Bad frames, then a good one: the node must go on.
    bad = raw_msg(good, "rgb8", node.next_stamp())
    bad.encoding = "yuv422_weird"
    # one at a time: the node keeps only the newest frame, and each must be seen
    node.pub.publish(bad)
    spin_until(node, lambda: False, 0.4)
    short = raw_msg(good, "rgb8", node.next_stamp())
    short.data = bytes(short.data)[: len(short.data) // 2]
    node.pub.publish(short)
    spin_until(node, lambda: False, 0.4)
    zero = raw_msg(good, "rgb8", node.next_stamp())
    zero.width = 0
    node.pub.publish(zero)
    spin_until(node, lambda: False, 0.5)
    obs["bad_frames_got_results"] = sum(key(m.header) in node.results for m in (bad, short, zero))
    obs["after_bad"] = result_dict(send_and_wait(node, raw_msg(good, "rgb8", node.next_stamp())))

    # 3. Outputs of one defective frame (camera_info first, for 3-D markers on the surface plane).
    from sensor_msgs.msg import CameraInfo
    info_pub = node.create_publisher(CameraInfo, "camera_info", RELIABLE)
    info = CameraInfo()
    info.header.frame_id = "cam"
    info.width, info.height = int(defect.shape[1]), int(defect.shape[0])
    info.k = [500.0, 0.0, defect.shape[1] / 2, 0.0, 500.0, defect.shape[0] / 2, 0.0, 0.0, 1.0]
    spin_until(node, lambda: info_pub.get_subscription_count() > 0, 10)
    for _ in range(3):
        info_pub.publish(info)
        spin_until(node, lambda: False, 0.1)
    m = raw_msg(defect, "rgb8", node.next_stamp())
    r = send_and_wait(node, m)
    k = key(m.header)
    has_markers = lambda: any(a.markers and key(a.markers[0].header) == k for a in node.markers)
    spin_until(node, lambda: k in node.maps and k in node.heatmaps and k in node.overlays and has_markers(), 10)
    spin_until(node, lambda: False, 0.3)
    out = {"result": result_dict(r), "scores_seen": len(node.scores)}
    if k in node.maps:
        mp = node.maps[k]
        vals = np.frombuffer(bytes(mp.data), dtype="<f4").reshape(mp.height, mp.width)
        out["map"] = {"encoding": mp.encoding, "w": mp.width, "h": mp.height, "step": mp.step,
                      "min": float(vals.min()), "max": float(vals.max()), "frame_id": mp.header.frame_id}
    for name, store in (("heatmap", node.heatmaps), ("overlay", node.overlays)):
        if k in store:
            im = store[k]
            out[name] = {"encoding": im.encoding, "w": im.width, "h": im.height, "frame_id": im.header.frame_id}
    mk = [a for a in node.markers if a.markers and key(a.markers[0].header) == k]
    if mk:
        arr = mk[-1].markers
        out["markers"] = {"first_action": arr[0].action, "n": len(arr), "types": [x.type for x in arr[1:]],
                          "frame_id": arr[0].header.frame_id,
                          "texts": [x.text for x in arr if x.text],
                          "sphere_z": [x.pose.position.z for x in arr if x.type == 2]}
    # latched verdict: a subscriber that joins now still gets the latest verdict
    latched = []
    node.create_subscription(Bool, "anomaly/verdict", lambda v: latched.append(v.data), LATCHED)
    spin_until(node, lambda: latched, 5)
    out["latched_verdict"] = latched[-1] if latched else None
    spin_until(node, lambda: False, 1.2)
    diag = [s for d in node.diags for s in d.status if s.name.startswith(args.node_name)]
    out["diag"] = ({"level": int.from_bytes(diag[-1].level, "little") if isinstance(diag[-1].level, bytes) else int(diag[-1].level),
                    "message": diag[-1].message, "values": {kv.key: kv.value for kv in diag[-1].values}}
                   if diag else None)
    obs["outputs"] = out

    # 3b. Parameters at run time: a region of interest (right half of the frame).
    from rcl_interfaces.srv import SetParameters
    from rcl_interfaces.msg import Parameter as P, ParameterValue as PV, ParameterType as PT
    params = node.create_client(SetParameters, f"/{args.node_name}/set_parameters")
    w, h = int(defect.shape[1]), int(defect.shape[0])
    roi = [w // 2, 0, w - w // 2, h]
    req = SetParameters.Request(parameters=[P(name="roi", value=PV(type=PT.PARAMETER_INTEGER_ARRAY, integer_array_value=roi))])
    resp = call(node, params, req, 10)
    obs["roi_set"] = bool(resp and all(r.successful for r in resp.results))
    spin_until(node, lambda: False, 0.3)
    m = raw_msg(defect, "rgb8", node.next_stamp())
    r = send_and_wait(node, m)
    k = key(m.header)
    spin_until(node, lambda: k in node.maps, 5)
    roi_obs = {"roi": roi, "result": result_dict(r)}
    if k in node.maps:
        mp = node.maps[k]
        vals = np.frombuffer(bytes(mp.data), dtype="<f4").reshape(mp.height, mp.width)
        roi_obs["max_outside"] = float(vals[:, : w // 2].max())
        roi_obs["max_inside"] = float(vals[:, w // 2:].max())
        roi_obs["map_size"] = [mp.width, mp.height]
    obs["roi"] = roi_obs
    req = SetParameters.Request(parameters=[P(name="roi", value=PV(type=PT.PARAMETER_INTEGER_ARRAY, integer_array_value=[0, 0, 0, 0]))])
    call(node, params, req, 10)
    # an invalid value is refused and the node keeps serving
    req = SetParameters.Request(parameters=[P(name="threshold", value=PV(type=PT.PARAMETER_DOUBLE, double_value=3.0))])
    call(node, params, req, 10)
    spin_until(node, lambda: False, 0.3)
    obs["after_bad_param"] = result_dict(send_and_wait(node, raw_msg(good, "rgb8", node.next_stamp())))

    # 4. Services.
    ns = f"/{args.node_name}"
    inspect = node.create_client(Inspect, f"{ns}/inspect")
    # a) no frame comes: clear failure within the timeout
    t = time.monotonic()
    resp = call(node, inspect, Inspect.Request(timeout_s=1.0), 10)
    obs["inspect_no_frame"] = {"success": resp.success, "message": resp.message, "seconds": time.monotonic() - t} if resp else None
    # b) a frame published after the request: returned with its stamp
    fut = inspect.call_async(Inspect.Request(timeout_s=10.0))
    spin_until(node, lambda: False, 0.3)
    late = raw_msg(defect, "rgb8", node.next_stamp())
    node.pub.publish(late)
    spin_until(node, fut.done, 15)
    resp = fut.result() if fut.done() else None
    obs["inspect"] = {"success": resp.success, "message": resp.message, "stamp": key(resp.result.header),
                      "expected_stamp": key(late.header), "is_anomalous": bool(resp.result.is_anomalous)} if resp else None

    setter = node.create_client(SetThreshold, f"{ns}/set_threshold")
    resp = call(node, setter, SetThreshold.Request(threshold=0.99), 10)
    obs["set_threshold"] = {"success": resp.success, "message": resp.message} if resp else None
    spin_until(node, lambda: False, 0.2)
    obs["after_threshold"] = result_dict(send_and_wait(node, raw_msg(good, "rgb8", node.next_stamp())))
    resp = call(node, setter, SetThreshold.Request(threshold=7.0), 10)
    obs["set_threshold_bad"] = {"success": resp.success, "message": resp.message} if resp else None
    call(node, setter, SetThreshold.Request(threshold=0.5), 10)

    loader = node.create_client(LoadModel, f"{ns}/load_model")
    resp = call(node, loader, LoadModel.Request(model="/nonexistent/model"), 20)
    obs["load_bad"] = {"success": resp.success, "message": resp.message} if resp else None
    obs["after_load_bad"] = result_dict(send_and_wait(node, raw_msg(good, "rgb8", node.next_stamp())))
    if args.model:
        resp = call(node, loader, LoadModel.Request(model=str(args.model)), 30)
        obs["load_good"] = {"success": resp.success, "message": resp.message, "model_id": resp.model_id} if resp else None

    teacher = node.create_client(Teach, f"{ns}/teach")
    resp = call(node, teacher, Teach.Request(num_frames=1, model_name="x"), 10)
    obs["teach_too_few"] = {"success": resp.success, "message": resp.message} if resp else None
    resp = call(node, teacher, Teach.Request(num_frames=3, model_name="../escape"), 10)
    obs["teach_bad_name"] = {"success": resp.success, "message": resp.message} if resp else None
    if args.taught_name:
        fut = teacher.call_async(Teach.Request(num_frames=6, model_name=args.taught_name, timeout_s=120.0))
        # stream good frames (a camera looking at good parts) until the teach-in answers
        end = time.monotonic() + 150
        while not fut.done() and time.monotonic() < end:
            node.pub.publish(raw_msg(good, "rgb8", node.next_stamp()))
            spin_until(node, fut.done, 0.15)
        resp = fut.result() if fut.done() else None
        obs["teach"] = {"success": resp.success, "message": resp.message, "model_path": resp.model_path,
                        "frames_used": resp.frames_used, "fit_seconds": resp.fit_seconds} if resp else None
        spin_until(node, lambda: False, 0.3)
        obs["after_teach"] = result_dict(send_and_wait(node, raw_msg(good, "rgb8", node.next_stamp())))

    # 5. Record a short rosbag2 of the outputs (replayable by users) with the rosbags package.
    if args.bag:
        from rosbags.rosbag2 import Reader, StoragePlugin, Writer
        from rosbags.typesys import Stores, get_typestore, get_types_from_msg
        from rclpy.serialization import serialize_message
        store = get_typestore(Stores.ROS2_KILTED)
        share = Path(os.environ["ANOMALY_INSPECTOR_ROOT"]) / ".ros_overlay/share/anomaly_inspector_msgs/msg"
        add = {}
        for name in ("DefectRegion", "AnomalyResult"):
            add.update(get_types_from_msg((share / f"{name}.msg").read_text(), f"anomaly_inspector_msgs/msg/{name}"))
        store.register(add)
        with Writer(args.bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
            conn = w.add_connection("/anomaly/result", "anomaly_inspector_msgs/msg/AnomalyResult", typestore=store)
            for s in sorted(node.results):
                w.write(conn, s, serialize_message(node.results[s]))
        # read it back as a user replaying the bag would
        with Reader(args.bag) as r:
            msgs = [store.deserialize_cdr(raw, c.msgtype) for c, _, raw in r.messages()]
        obs["bag"] = {"written": len(node.results), "read": len(msgs),
                      "scores_match": [round(m.score, 5) for m in msgs] == [round(node.results[s].score, 5) for s in sorted(node.results)],
                      "files": sorted(p.name for p in args.bag.iterdir())}

    args.out.write_text(json.dumps(obs, indent=1))
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
