"""How many large sensor_msgs/Image frames reach a subscriber on this host, by size and QoS,
with and without config/fastdds_large_frames.xml on the publisher. No anomaly_inspector node is
involved: this measures the middleware alone (README, "QoS and large frames").

    source scripts/env.sh
    python scripts/dds_probe.py                      # the default table
    python scripts/dds_probe.py --sizes 640x480 --frames 100 --rate 10
    python scripts/dds_probe.py --transport udp      # both sides UDP only (a camera on another host)

Each row runs a publisher and a subscriber in two processes of their own, in a ROS domain of
their own, on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST).
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "config" / "fastdds_large_frames.xml"


def child(role, width, height, qos_name, frames, rate):
    """One side of a row: publishes `frames` frames at `rate` Hz, or counts what arrives."""
    import rclpy
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
    from sensor_msgs.msg import Image

    qos = qos_profile_sensor_data if qos_name == "best_effort" else QoSProfile(
        reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=1)
    rclpy.init()
    node = rclpy.create_node(f"dds_probe_{role}")
    if role == "pub":
        pub = node.create_publisher(Image, "dds_probe/image", qos)
        end = time.monotonic() + 20
        while pub.get_subscription_count() == 0 and time.monotonic() < end:
            rclpy.spin_once(node, timeout_sec=0.05)
        time.sleep(1.0)  # discovery of the reverse direction
        msg = Image(width=width, height=height, encoding="rgb8", step=width * 3, data=bytes(width * height * 3))
        for i in range(frames):
            msg.header.frame_id = str(i)
            pub.publish(msg)
            until = time.monotonic() + 1.0 / rate
            while time.monotonic() < until:
                rclpy.spin_once(node, timeout_sec=0.005)
        time.sleep(2.0)
    else:
        got = set()
        node.create_subscription(Image, "dds_probe/image", lambda m: got.add(m.header.frame_id), qos)
        end = time.monotonic() + 25 + frames / rate
        while time.monotonic() < end and len(got) < frames:
            rclpy.spin_once(node, timeout_sec=0.05)
        print(len(got))
    node.destroy_node()
    rclpy.shutdown()


def row(domain, size, qos_name, frames, rate, publisher_profile, transport):
    """Runs one pair; returns the frames received."""
    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", ROS_DOMAIN_ID=str(domain))
    env.pop("FASTDDS_DEFAULT_PROFILES_FILE", None)
    env.pop("FASTDDS_BUILTIN_TRANSPORTS", None)
    if transport == "udp":
        # Fast DDS's own switch: no shared memory, every sample through loopback UDP, as
        # between two hosts (within the LOCALHOST discovery range).
        env["FASTDDS_BUILTIN_TRANSPORTS"] = "UDPv4"
    pub_env = dict(env, FASTDDS_DEFAULT_PROFILES_FILE=str(PROFILE)) if publisher_profile else env
    w, h = size
    args = [str(w), str(h), qos_name, str(frames), str(rate)]
    sub = subprocess.Popen([sys.executable, __file__, "--child", "sub", *args], env=env, stdout=subprocess.PIPE, text=True)
    subprocess.run([sys.executable, __file__, "--child", "pub", *args], env=pub_env, check=True)
    out, _ = sub.communicate(timeout=120)
    return int(out.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        role, w, h, qos_name, frames, rate = sys.argv[2:8]
        child(role, int(w), int(h), qos_name, int(frames), float(rate))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="256x256,512x512,640x480,1280x1024,2448x2048")
    p.add_argument("--qos", default="best_effort,reliable")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--transport", choices=["default", "udp"], default="default",
                   help="default: Fast DDS's (shared memory on one host when it fits); udp: UDPv4 only on both sides")
    p.add_argument("--domain", type=int, default=140, help="first ROS_DOMAIN_ID; each row takes the next")
    a = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes.split(",")]
    domain = a.domain
    print(f"{'frame':>10} {'MB':>5} {'qos':>12} {'publisher':>22} {'received':>9}")
    for size in sizes:
        for qos_name in a.qos.split(","):
            # Over UDP only, the profile's shared memory cannot be used: one column.
            for profile in (False, True) if a.transport == "default" else (False,):
                got = row(domain, size, qos_name, a.frames, a.rate, profile, a.transport)
                domain += 1
                label = "fastdds_large_frames" if profile else ("UDPv4 only" if a.transport == "udp" else "Fast DDS defaults")
                mb = size[0] * size[1] * 3 / 1e6
                print(f"{size[0]:>5}x{size[1]:<4} {mb:5.1f} {qos_name:>12} {label:>22} {got:>4}/{a.frames}", flush=True)


if __name__ == "__main__":
    main()
