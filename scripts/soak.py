#!/usr/bin/env python3
"""Overload and endurance run against a real anomaly_inspector node (started here, on loopback).

Publishes frames at --rate Hz (several times what the node can inspect) for --seconds, and
meanwhile: samples the node's resident memory every second, restarts the result subscriber and
the camera publisher (peers that come and go), calls ~/inspect every few seconds and swaps the
model with ~/load_model while frames stream. Writes a JSON report; prints a summary.

    soak.py --node target/release/anomaly_inspector_node --model DIR --image X.png \
            --seconds 60 [--rate 60] [--frame 640x480] --out soak.json

Used by scripts/bench.sh --soak (long runs) and tests/node_soak.rs (a short one, with asserts).
Needs ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and a ROS_DOMAIN_ID (scripts/env.sh sets both).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from PIL import Image as PILImage
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import Inspect, LoadModel

QOS = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=5)


def rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class Soak(Node):
    def __init__(self, frame):
        super().__init__("soak_peer")
        self.frame = frame
        self.pub = None
        self.sub = None
        self.arrivals = []  # (sent stamp ns, arrival ns)
        self.diag = {}
        self.create_subscription(DiagnosticArray, "/diagnostics", self.on_diag, 10)
        self.inspect = self.create_client(Inspect, "anomaly_inspector/inspect")
        self.load = self.create_client(LoadModel, "anomaly_inspector/load_model")
        self.restart_publisher()
        self.restart_subscriber()

    def restart_publisher(self):
        if self.pub is not None:
            self.destroy_publisher(self.pub)
        self.pub = self.create_publisher(Image, "image", QOS)

    def restart_subscriber(self):
        if self.sub is not None:
            self.destroy_subscription(self.sub)
        self.sub = self.create_subscription(AnomalyResult, "anomaly/result", self.on_result, QOS)

    def on_result(self, m):
        sent = m.header.stamp.sec * 1_000_000_000 + m.header.stamp.nanosec
        self.arrivals.append((sent, time.time_ns()))

    def on_diag(self, m):
        for st in m.status:
            if "anomaly inspection" in st.name:
                self.diag = {kv.key: kv.value for kv in st.values}
                self.diag["level"] = int.from_bytes(st.level, "little") if isinstance(st.level, bytes) else int(st.level)

    def publish(self):
        now = time.time_ns()
        self.frame.header.stamp.sec = now // 1_000_000_000
        self.frame.header.stamp.nanosec = now % 1_000_000_000
        self.pub.publish(self.frame)


def make_frame(path, size):
    img = PILImage.open(path).convert("RGB").resize(size, PILImage.BILINEAR)
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    m = Image()
    m.header.frame_id = "camera_optical_frame"
    m.height, m.width = arr.shape[0], arr.shape[1]
    m.encoding, m.is_bigendian, m.step = "rgb8", 0, arr.shape[1] * 3
    m.data = arr.tobytes()
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node", type=Path, required=True, help="anomaly_inspector_node binary")
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=60.0, help="frames per second published")
    ap.add_argument("--frame", default="640x480")
    ap.add_argument("--restart-every", type=float, default=10.0, help="seconds between peer restarts")
    ap.add_argument("--inspect-every", type=float, default=3.0, help="seconds between ~/inspect calls")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--node-log", type=Path)
    args = ap.parse_args()
    for var in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set: source scripts/env.sh first (DDS must stay on loopback)")

    log = open(args.node_log, "w") if args.node_log else subprocess.DEVNULL
    node_proc = subprocess.Popen([str(args.node), "--ros-args", "-p", f"model:={args.model}",
                                  "-p", "input_qos:=reliable"], stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    peer = Soak(make_frame(args.image, tuple(int(v) for v in args.frame.split("x"))))
    report = {"rate_hz": args.rate, "seconds": args.seconds, "frame": args.frame}
    try:
        t_connect = time.monotonic()
        while peer.pub.get_subscription_count() == 0 or not peer.inspect.service_is_ready():
            rclpy.spin_once(peer, timeout_sec=0.1)
            if time.monotonic() - t_connect > 60 or node_proc.poll() is not None:
                sys.exit("the node did not come up (see --node-log)")
        rclpy.spin_once(peer, timeout_sec=0.5)

        period = 1.0 / args.rate
        t0 = time.monotonic()
        t0_wall_ns = time.time_ns()
        next_pub = t0
        next_sample = t0
        next_restart = t0 + args.restart_every
        next_inspect = t0 + 1.0
        reload_at = t0 + args.seconds / 4  # before the middle third: growth is measured after it
        reloaded = None
        published, restarts = 0, 0
        last_restart_ns = time.time_ns()
        memory, inspects, pending = [], [], []
        while time.monotonic() - t0 < args.seconds:
            now = time.monotonic()
            if now >= next_pub:
                peer.publish()
                published += 1
                next_pub += period
                if next_pub < now - 1.0:  # we fell behind by a second: do not burst to catch up
                    next_pub = now
            if now >= next_sample:
                memory.append((round(now - t0, 2), rss_mib(node_proc.pid)))
                next_sample += 1.0
            if now >= next_restart:
                # A subscriber and a camera that go away and come back.
                peer.restart_subscriber() if restarts % 2 == 0 else peer.restart_publisher()
                restarts += 1
                last_restart_ns = time.time_ns()
                next_restart += args.restart_every
            if now >= next_inspect:
                req = Inspect.Request()
                req.timeout_s = 10.0
                pending.append((now, peer.inspect.call_async(req)))
                next_inspect += args.inspect_every
            if reloaded is None and now >= reload_at:
                req = LoadModel.Request()
                req.model = str(args.model)
                reloaded = peer.load.call_async(req)
            rclpy.spin_once(peer, timeout_sec=max(0.0, min(next_pub, next_sample) - time.monotonic()))
            if node_proc.poll() is not None:
                break
        # Let outstanding service calls finish (each has a 10 s timeout in the node).
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (any(not f.done() for _, f in pending)
                                               or (reloaded is not None and not reloaded.done())):
            rclpy.spin_once(peer, timeout_sec=0.1)
        spin_end = time.monotonic() + 2.5  # one more /diagnostics message
        while time.monotonic() < spin_end:
            rclpy.spin_once(peer, timeout_sec=0.1)

        for sent_at, f in pending:
            r = f.result() if f.done() else None
            inspects.append({"at_s": round(sent_at - t0, 2), "answered": r is not None,
                             "success": bool(r and r.success), "message": r.message if r else "no answer"})
        lat = sorted((arr - sent) / 1e6 for sent, arr in peer.arrivals)
        # Per minute of the run, so that a slow stretch can be matched with what else ran then.
        by_minute = {}
        for sent, arr in peer.arrivals:
            by_minute.setdefault(int((arr - t0_wall_ns) / 60e9), []).append((arr - sent) / 1e6)
        minutes = []
        for m in sorted(by_minute):
            v = sorted(by_minute[m])
            minutes.append({"minute": m, "results": len(v), "p50": round(v[len(v) // 2], 1),
                            "p99": round(v[int(len(v) * 0.99)], 1), "max": round(v[-1], 1)})
        mem = [m for _, m in memory if m is not None]
        third = max(1, len(mem) // 3)
        report.update({
            "node_alive": node_proc.poll() is None,
            "published": published,
            "results": len(peer.arrivals),
            "peer_restarts": restarts,
            "results_after_last_restart": sum(1 for _, arr in peer.arrivals if arr > last_restart_ns),
            "latency_ms": {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)], "max": lat[-1]} if lat else None,
            "latency_by_minute": minutes,
            "memory_mib": memory,
            "rss_growth_mib": (statistics.median(mem[-third:]) - statistics.median(mem[third:2 * third])) if len(mem) >= 3 else None,
            "inspect_calls": inspects,
            "reload": ({"answered": reloaded.done(), "success": bool(reloaded.done() and reloaded.result().success),
                        "message": reloaded.result().message if reloaded.done() else "no answer"} if reloaded else None),
            "diagnostics": peer.diag,
        })
    finally:
        alive = node_proc.poll() is None
        node_proc.terminate()
        try:
            report["node_exit"] = node_proc.wait(timeout=15) if alive else node_proc.returncode
        except subprocess.TimeoutExpired:
            node_proc.kill()
            report["node_exit"] = "killed"
        args.out.write_text(json.dumps(report, indent=1))
        peer.destroy_node()
        rclpy.shutdown()
    lat = report.get("latency_ms") or {}
    print(f"soak {args.seconds:.0f} s at {args.rate:.0f} Hz ({args.frame}): published {report.get('published')}, "
          f"results {report.get('results')}, dropped by the node {report.get('diagnostics', {}).get('frames_dropped')}, "
          f"latency p50 {lat.get('p50', float('nan')):.1f} / p99 {lat.get('p99', float('nan')):.1f} / max "
          f"{lat.get('max', float('nan')):.1f} ms, RSS growth {report.get('rss_growth_mib')} MiB, "
          f"~/inspect answered {sum(i['answered'] for i in report.get('inspect_calls', []))}/"
          f"{len(report.get('inspect_calls', []))}, reload {report.get('reload')}")


if __name__ == "__main__":
    main()
