#!/usr/bin/env python3
"""A real rclpy peer for the anomaly_inspector node: replays image files as a camera would,
collects the node's verdicts, and (optionally) saves the heatmap and overlay it publishes.

Used by the demo (scripts/demo.sh) and the integration tests. Frames are sent in lock-step:
the next one goes out when the result of the previous one arrived (or after --timeout), so
that every frame gets a verdict and stamps can be checked one by one.

    image_peer.py --images a.png b.png ... [--save-dir DIR] [--summary out.json]

Needs ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID (scripts/env.sh sets both).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from PIL import Image as PILImage
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, HistoryPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import Float32
from anomaly_inspector_msgs.msg import AnomalyResult


def to_msg(path, stamp_ns, encoding, frame_id, resize=None):
    img = PILImage.open(path)
    if resize:
        img = img.convert("RGB").resize(resize, PILImage.BILINEAR)
    if encoding == "mono8":
        arr = np.asarray(img.convert("L"), dtype=np.uint8)
        channels = 1
    else:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if encoding == "bgr8":
            arr = arr[:, :, ::-1]
        channels = 3
    msg = Image()
    msg.header.stamp.sec = stamp_ns // 1_000_000_000
    msg.header.stamp.nanosec = stamp_ns % 1_000_000_000
    msg.header.frame_id = frame_id
    msg.height, msg.width = arr.shape[0], arr.shape[1]
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels
    msg.data = np.ascontiguousarray(arr).tobytes()
    return msg


def save_rgb(msg, path):
    arr = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)[:, : msg.width * 3]
    PILImage.fromarray(arr.reshape(msg.height, msg.width, 3), "RGB").save(path)


class Peer(Node):
    def __init__(self, with_images=True):
        super().__init__("anomaly_inspector_peer")
        reliable = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=10)
        self.pub = self.create_publisher(Image, "image", reliable)
        self.results = {}
        self.scores = []
        self.heatmaps = {}
        self.overlays = {}
        self.create_subscription(AnomalyResult, "anomaly/result", self.on_result, reliable)
        self.create_subscription(Float32, "anomaly/score", lambda m: self.scores.append(m.data), reliable)
        if with_images:
            self.create_subscription(Image, "anomaly/heatmap", lambda m: self.on_image(self.heatmaps, m), reliable)
            self.create_subscription(Image, "anomaly/overlay", lambda m: self.on_image(self.overlays, m), reliable)

    @staticmethod
    def key(header):
        return header.stamp.sec * 1_000_000_000 + header.stamp.nanosec

    def on_result(self, msg):
        self.results[self.key(msg.header)] = msg

    def on_image(self, store, msg):
        store[self.key(msg.header)] = msg


def spin_until(node, cond, timeout):
    # A message ends rcl's wait at once, so a long wait delays nothing; polling every 20 ms
    # instead took 4.4 % of a core in Python and slowed an engine beside it 1.13-1.54x on 2 cores
    # (each wake-up stalls its OpenMP threads), which a camera driver in C++ does not do.
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        if cond():
            return True
        rclpy.spin_once(node, timeout_sec=min(left, 0.25))
    return cond()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", nargs="+", required=True, type=Path)
    ap.add_argument("--encoding", default="rgb8", choices=["rgb8", "bgr8", "mono8"])
    ap.add_argument("--frame-id", default="camera_optical_frame")
    ap.add_argument("--save-dir", type=Path, help="write <stem>_heatmap.png / <stem>_overlay.png here")
    ap.add_argument("--summary", type=Path, help="write a JSON summary here")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each result")
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--resize", help="WxH: send frames at this size (latency measurements)")
    ap.add_argument("--repeat", type=int, default=1, help="send the image list this many times")
    ap.add_argument("--no-images", action="store_true",
                    help="do not subscribe to the heatmap/overlay images (latency measurements: on a small "
                         "machine, decoding them in Python competes with the node for the CPU)")
    args = ap.parse_args()
    for var in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set: source scripts/env.sh first (DDS must stay on loopback)")

    rclpy.init()
    node = Peer(with_images=not args.no_images)
    # Wait until the node's subscription and our result subscription are both matched, then
    # settle briefly: Fast DDS matches the publisher side first (PLATFORM.md, quirk 8).
    if not spin_until(node, lambda: node.pub.get_subscription_count() > 0, args.connect_timeout):
        sys.exit("no subscriber on 'image' appeared: is anomaly_inspector_node running on this ROS_DOMAIN_ID?")
    spin_until(node, lambda: False, 0.5)
    # The node's default input_qos (auto) first reads best effort and subscribes reliably once it
    # has seen that every publisher is reliable (about a second): a frame over ~512 KB sent before
    # that travels as UDP fragments to a best-effort reader, which may lose it (README, large
    # frames). Wait for the reliable reader, briefly (a node told to read best effort shows none).
    topic = node.resolve_topic_name("image")
    spin_until(node, lambda: any(i.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                                 for i in node.get_subscriptions_info_by_topic(topic)), 3.0)

    if args.save_dir:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    t_start = time.time_ns()
    resize = tuple(int(v) for v in args.resize.lower().split("x")) if args.resize else None
    images = list(args.images) * max(1, args.repeat)
    args.images = images
    # A few distinct images (the benchmarks repeat one) are decoded and resized once, before the
    # first frame goes out: a camera driver has its frame ready when it publishes, and decoding
    # in the timed loop would take a core from the node while it publishes its result (measured:
    # the node's result publish took 1-5 ms instead of 0.3 at 640x480 on 2 cores). Many images
    # are decoded one by one, so that memory stays small.
    distinct = list(dict.fromkeys(images))
    ready = {p: to_msg(p, 0, args.encoding, args.frame_id, resize) for p in distinct} if len(distinct) <= 16 else {}
    for i, path in enumerate(images):
        stamp = t_start + i * 1_000_000  # unique, increasing stamps
        msg = ready.get(path) or to_msg(path, stamp, args.encoding, args.frame_id, resize)
        msg.header.stamp.sec = stamp // 1_000_000_000
        msg.header.stamp.nanosec = stamp % 1_000_000_000
        sent = time.monotonic()
        node.pub.publish(msg)
        ok = spin_until(node, lambda: stamp in node.results, args.timeout)
        latency_ms = (time.monotonic() - sent) * 1e3
        if not ok:
            print(f"[{i + 1:3d}/{len(args.images)}] {path.name:28s} NO RESULT within {args.timeout} s", flush=True)
            frames.append({"image": str(path), "stamp_ns": stamp, "received": False})
            continue
        # heatmap/overlay may trail the result by a few ms
        if not args.no_images:
            spin_until(node, lambda: stamp in node.heatmaps and stamp in node.overlays, 2.0)
        r = node.results[stamp]
        verdict = "ANOMALOUS" if r.is_anomalous else "good"
        regions = [
            {"x": g.bbox.x_offset, "y": g.bbox.y_offset, "w": g.bbox.width, "h": g.bbox.height,
             "area_px": g.area_px, "peak": round(g.peak_score, 3)}
            for g in r.regions
        ]
        print(f"[{i + 1:3d}/{len(args.images)}] {path.parent.name + '/' + path.name:28s} score {r.score:.3f} "
              f"(threshold {r.threshold:.2f}) {verdict:9s} regions {len(regions)}  "
              f"node {r.inference_time.sec * 1e3 + r.inference_time.nanosec / 1e6:6.1f} ms  "
              f"round trip {latency_ms:6.1f} ms", flush=True)
        entry = {
            "image": str(path), "stamp_ns": stamp, "received": True,
            "result_stamp_ns": Peer.key(r.header), "frame_id": r.header.frame_id,
            "score": r.score, "raw_score": r.raw_score, "threshold": r.threshold,
            "is_anomalous": bool(r.is_anomalous), "model_id": r.model_id, "method": r.method,
            "regions": regions, "latency_ms": latency_ms,
            "inference_ms": r.inference_time.sec * 1e3 + r.inference_time.nanosec / 1e6,
            "heatmap": stamp in node.heatmaps, "overlay": stamp in node.overlays,
        }
        if args.save_dir:
            stem = f"{path.parent.name}_{path.stem}"
            for name, store in (("heatmap", node.heatmaps), ("overlay", node.overlays)):
                if stamp in store:
                    out = args.save_dir / f"{stem}_{name}.png"
                    save_rgb(store[stamp], out)
                    entry[name + "_png"] = str(out)
        frames.append(entry)

    spin_until(node, lambda: False, 0.2)
    lat = sorted(f["latency_ms"] for f in frames if f["received"])
    if lat:
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        print(f"round trip (image published -> AnomalyResult received) over {len(lat)} frames: "
              f"median {pct(0.5):.1f} ms, p90 {pct(0.9):.1f} ms, max {lat[-1]:.1f} ms", flush=True)
    summary = {"frames": frames, "n_scores": len(node.scores)}
    if args.summary:
        args.summary.write_text(json.dumps(summary, indent=1))
    node.destroy_node()
    rclpy.shutdown()
    missing = sum(not f["received"] for f in frames)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
