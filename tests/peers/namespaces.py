#!/usr/bin/env python3
"""rclpy peer for tests/node_namespaces.rs: two anomaly_inspector nodes run side by side, one in
/cell1 with its input remapped to /cam1/image_raw, one in /cell2/top. This peer lists every
topic and service each node has (by node, as `ros2 node info` does), sends a frame to each
input and sees which result topics answer, and sets a parameter to see the /parameter_events
that `ros2 param` tools rely on. Writes what it observed as JSON; the Rust test asserts.

    namespaces.py --good G.png --out obs.json
"""
import argparse
import json
import time

import numpy as np
import rclpy
from PIL import Image as PILImage
from rcl_interfaces.msg import Parameter, ParameterEvent, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from anomaly_inspector_msgs.msg import AnomalyResult
from peer_common import call, key, spin_until

RELIABLE = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=50)
NODES = {"/cell1": "/cam1/image_raw", "/cell2/top": "/cell2/top/image"}
NAME = "anomaly_inspector"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rclpy.init()
    n = Node("namespaces_peer")
    t0 = time.monotonic()
    results = {ns: {} for ns in NODES}
    for ns in NODES:
        n.create_subscription(AnomalyResult, f"{ns}/anomaly/result",
                              lambda m, ns=ns: results[ns].__setitem__(key(m.header), m), RELIABLE)
    events = []
    n.create_subscription(ParameterEvent, "/parameter_events", events.append, RELIABLE)
    pubs = {ns: n.create_publisher(Image, topic, RELIABLE) for ns, topic in NODES.items()}
    names = lambda: set(n.get_node_names_and_namespaces())
    ok = spin_until(n, lambda: all((NAME, ns) in names() for ns in NODES), 30.0)
    assert ok, f"nodes not found: {names()}"
    spin_until(n, lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 15.0)
    time.sleep(0.5)
    obs = {"nodes": sorted(f"{ns}/{nm}" for nm, ns in names())}
    for ns in NODES:
        obs[ns] = {
            "publishes": sorted(t for t, _ in n.get_publisher_names_and_types_by_node(NAME, ns)),
            "subscribes": sorted(t for t, _ in n.get_subscriber_names_and_types_by_node(NAME, ns)),
            "services": sorted(s for s, _ in n.get_service_names_and_types_by_node(NAME, ns)),
        }
    rgb = np.asarray(PILImage.open(a.good).convert("RGB"))
    frame = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3, data=rgb.tobytes())
    stamp = time.time_ns()
    obs["answers"] = {}
    for ns in NODES:
        got = {other: 0 for other in NODES}
        for _ in range(3):
            stamp += 1_000_000
            frame.header.stamp.sec, frame.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
            pubs[ns].publish(frame)
            spin_until(n, lambda s=stamp: s in results[ns], 10.0)
            spin_until(n, lambda: False, 0.3)
            for other in NODES:
                got[other] += stamp in results[other]
        obs["answers"][ns] = got
    # A parameter set on one node: the reply, the value read back, and the event.
    setter = n.create_client(SetParameters, f"/cell1/{NAME}/set_parameters")
    getter = n.create_client(GetParameters, f"/cell2/top/{NAME}/get_parameters")
    p = Parameter(name="threshold", value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=0.6))
    r = call(n, setter, SetParameters.Request(parameters=[p]), 10.0)
    obs["set_ok"] = bool(r and r.results[0].successful)
    spin_until(n, lambda: any(e.node == f"/cell1/{NAME}" and e.changed_parameters for e in events), 5.0)
    obs["events"] = [{"node": e.node, "changed": [(c.name, c.value.double_value) for c in e.changed_parameters]}
                     for e in events if e.changed_parameters]
    r = call(n, getter, GetParameters.Request(names=["threshold"]), 10.0)
    obs["other_threshold"] = r.values[0].double_value if r else None
    obs["seconds"] = time.monotonic() - t0
    with open(a.out, "w") as f:
        json.dump(obs, f, indent=1)
    n.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
