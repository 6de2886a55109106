"""Peer of tests/node_large_frames.rs: a camera-style publisher of large rgb8 frames, lock-step.

For each size and QoS it publishes N frames, each only after the node's result for the previous
one came back (or a timeout passed), while subscribed to every output as RViz and a behaviour
tree would be; it calls ~/inspect once per phase, and writes a JSON summary: frames answered,
results with the input's stamp, maps/heatmaps/overlays received (the node skips pictures while its
image thread is busy, so these may be fewer) and the size of each, the ~/inspect reply time.

usage: large_frames.py --sizes 640x480,2448x2048 --qos best_effort,reliable --frames 100 --summary S
"""
import argparse
import json
import time

import rclpy
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import Image
from visualization_msgs.msg import MarkerArray
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import Inspect

from peer_common import call, key, spin_until


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", required=True)
    p.add_argument("--qos", default="best_effort,reliable")
    p.add_argument("--encodings", default="rgb8", help="rgb8 and/or mono8, comma separated")
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one frame's result")
    p.add_argument("--summary", required=True)
    p.add_argument("--give-up-after", type=int, default=3,
                   help="consecutive unanswered frames that end a phase (a stuck node fails in minutes, not hours)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after the match before the first frame")
    a = p.parse_args()

    rclpy.init()
    node = rclpy.create_node("large_frames_peer")
    reliable = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=10)
    results, pictures = {}, {"anomaly/map": {}, "anomaly/heatmap": {}, "anomaly/overlay": {}}
    node.create_subscription(AnomalyResult, "anomaly/result", lambda m: results.setdefault(key(m.header), m), reliable)
    for topic, seen in pictures.items():
        node.create_subscription(
            Image, topic, lambda m, seen=seen: seen.setdefault(key(m.header), (m.width, m.height, len(m.data))), reliable)
    markers = []
    node.create_subscription(MarkerArray, "anomaly/markers", lambda m: markers.append(1), reliable)
    inspect = node.create_client(Inspect, "/anomaly_inspector/inspect")

    phases = []
    stamp = 1_000
    for size, encoding in [(s, e) for s in a.sizes.split(",") for e in a.encodings.split(",")]:
        w, h = (int(v) for v in size.split("x"))
        channels = 1 if encoding == "mono8" else 3
        for qos_name in a.qos.split(","):
            qos = qos_profile_sensor_data if qos_name == "best_effort" else QoSProfile(
                reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=1)
            pub = node.create_publisher(Image, "image", qos)
            spin_until(node, lambda: pub.get_subscription_count() > 0, 20.0)
            spin_until(node, lambda: False, a.settle)  # the node's side of discovery (and its QoS choice)
            # A grey frame with a brighter square: the content does not matter here, the bytes do.
            row = bytes([128] * (w * channels))
            data = bytearray(row * h)
            msg = Image(width=w, height=h, encoding=encoding, step=w * channels)
            msg.header.frame_id = "camera_optical"
            stamps, answered, waits, missed_in_a_row = [], 0, [], 0
            t_phase = time.monotonic()
            for i in range(a.frames):
                stamp += 1
                msg.header.stamp.sec, msg.header.stamp.nanosec = stamp, 0
                data[(i % h) * w * channels:(i % h) * w * channels + 30] = bytes([255] * 30)
                msg.data = bytes(data)
                k = stamp * 1_000_000_000
                t0 = time.monotonic()
                pub.publish(msg)
                stamps.append(k)
                if spin_until(node, lambda: k in results, a.timeout):
                    answered += 1
                    missed_in_a_row = 0
                    waits.append(time.monotonic() - t0)
                else:
                    missed_in_a_row += 1
                    if missed_in_a_row >= a.give_up_after:
                        print(f"{size} {encoding} {qos_name}: {missed_in_a_row} frames in a row unanswered, phase ended",
                              flush=True)
                        break
            # ~/inspect answers with the next fresh frame: one more frame, then the reply's time.
            stamp += 1
            msg.header.stamp.sec = stamp
            fut = inspect.call_async(Inspect.Request(timeout_s=20.0)) if inspect.wait_for_service(timeout_sec=10.0) else None
            t0 = time.monotonic()
            spin_until(node, lambda: False, 0.2)
            pub.publish(msg)
            spin_until(node, lambda: fut is None or fut.done(), 25.0)
            reply = fut.result() if fut is not None and fut.done() else None
            inspect_s = time.monotonic() - t0 if reply is not None else None
            spin_until(node, lambda: False, 2.0)  # the last pictures
            node.destroy_publisher(pub)
            phases.append({
                "size": size, "encoding": encoding, "qos": qos_name, "sent": len(stamps), "answered": answered,
                "seconds": time.monotonic() - t_phase,
                "max_result_wait_s": max(waits) if waits else None,
                "pictures": {t.split("/")[1]: sum(1 for s in stamps if s in seen) for t, seen in pictures.items()},
                "picture_sizes_ok": all(
                    seen[s][:2] == (w, h) and seen[s][2] == w * h * (4 if t == "anomaly/map" else 3)
                    for t, seen in pictures.items() for s in stamps if s in seen),
                "inspect_success": bool(reply is not None and reply.success),
                "inspect_reply_s": inspect_s,
            })
            print(json.dumps(phases[-1]), flush=True)
    with open(a.summary, "w") as f:
        json.dump({"phases": phases, "markers": len(markers)}, f, indent=1)
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
