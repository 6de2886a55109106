#!/usr/bin/env python3
"""rclpy lifecycle client for tests/node_lifecycle.rs: takes a running anomaly_inspector node
through every lifecycle transition with the standard lifecycle_msgs services (as `ros2
lifecycle` and Nav2's lifecycle manager do), and in each state publishes frames and calls
~/inspect to see whether they are inspected. Writes what it observed as JSON; the Rust test
makes the assertions.

    lifecycle.py --good G.png --model GOOD_MODEL_DIR --node-name anomaly_inspector --out obs.json
        [--unmanaged]
"""
import argparse
import json
import time

import numpy as np
import rclpy
from PIL import Image as PILImage
from lifecycle_msgs.msg import Transition, TransitionEvent
from lifecycle_msgs.srv import ChangeState, GetAvailableStates, GetAvailableTransitions, GetState
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from std_srvs.srv import Trigger
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import Inspect, LoadModel
from peer_common import call, key, spin_until

RELIABLE = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=50)


class Client(Node):
    def __init__(self, target, good):
        super().__init__("lifecycle_client")
        ns = f"/{target}"
        self.change = self.create_client(ChangeState, f"{ns}/change_state")
        self.get_state = self.create_client(GetState, f"{ns}/get_state")
        self.states = self.create_client(GetAvailableStates, f"{ns}/get_available_states")
        self.available = self.create_client(GetAvailableTransitions, f"{ns}/get_available_transitions")
        self.graph = self.create_client(GetAvailableTransitions, f"{ns}/get_transition_graph")
        self.inspect = self.create_client(Inspect, f"{ns}/inspect")
        self.load = self.create_client(LoadModel, f"{ns}/load_model")
        self.params = self.create_client(SetParameters, f"{ns}/set_parameters")
        self.describe_client = self.create_client(Trigger, f"{ns}/describe")
        self.pub = self.create_publisher(Image, "image", RELIABLE)
        self.results = {}
        self.events = []
        self.create_subscription(AnomalyResult, "anomaly/result", lambda m: self.results.__setitem__(key(m.header), m),
                                 RELIABLE)
        self.create_subscription(TransitionEvent, f"{ns}/transition_event", self.events.append, RELIABLE)
        rgb = np.asarray(PILImage.open(good).convert("RGB"))
        self.frame = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3,
                           data=rgb.tobytes())
        self.stamp = time.time_ns()

    def state(self):
        r = call(self, self.get_state, GetState.Request(), 10.0)
        return r.current_state.label if r else None

    def transition(self, tid=0, label=""):
        r = call(self, self.change, ChangeState.Request(transition=Transition(id=tid, label=label)), 60.0)
        return {"asked": label or tid, "success": bool(r and r.success), "state": self.state()}

    def available_labels(self):
        r = call(self, self.available, GetAvailableTransitions.Request(), 10.0)
        return [d.transition.label for d in r.available_transitions] if r else None

    def frames_answered(self, n=4, wait=5.0):
        """Publishes n frames lock-step and counts the results for them. A frame gets `wait`
        seconds while frames are answered (a slow first inspection must not make the next frame
        replace a waiting one), 0.3 s once one was not (an inactive node answers none)."""
        stamps, answering = [], True
        for _ in range(n):
            self.stamp += 1_000_000
            self.frame.header.stamp.sec, self.frame.header.stamp.nanosec = divmod(self.stamp, 1_000_000_000)
            self.pub.publish(self.frame)
            stamps.append(self.stamp)
            answering = spin_until(self, lambda s=self.stamp: s in self.results, wait if answering else 0.3)
        spin_until(self, lambda: False, 0.3)  # a late result still counts
        return sum(s in self.results for s in stamps)

    def inspect_call(self):
        """~/inspect while frames keep coming; returns (success, message)."""
        fut = self.inspect.call_async(Inspect.Request(timeout_s=3.0)) if self.inspect.wait_for_service(10.0) else None
        if fut is None:
            return (False, "no service")
        end = time.monotonic() + 8.0
        while not fut.done() and time.monotonic() < end:
            self.frames_answered(1, 0.2)
        r = fut.result() if fut.done() else None
        return (bool(r and r.success), r.message if r else "no reply")

    def describe(self):
        r = call(self, self.describe_client, Trigger.Request(), 15.0)
        return json.loads(r.message) if r and r.success else None

    def set_model(self, path):
        p = Parameter(name="model", value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=path))
        r = call(self, self.params, SetParameters.Request(parameters=[p]), 10.0)
        return bool(r and r.results and r.results[0].successful)


def step(c, obs, name, **kw):
    """A transition, then what frames and ~/inspect do in the state it leaves the node in."""
    t = c.transition(**kw)
    t["frames_answered"] = c.frames_answered()
    t["inspect"] = c.inspect_call()
    t["available"] = c.available_labels()
    obs["steps"].append(dict(t, name=name))
    print(json.dumps(obs["steps"][-1]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--node-name", default="anomaly_inspector")
    ap.add_argument("--out", required=True)
    ap.add_argument("--unmanaged", action="store_true")
    a = ap.parse_args()
    rclpy.init()
    c = Client(a.node_name, a.good)
    t0 = time.monotonic()
    assert c.change.wait_for_service(timeout_sec=30.0), "no ~/change_state: is the node running?"
    spin_until(c, lambda: c.count_subscribers("image") > 0 and c.count_publishers("anomaly/result") > 0, 10.0)
    time.sleep(0.5)
    obs = {"steps": []}
    obs["start_state"] = c.state()
    obs["start_available"] = c.available_labels()
    obs["start_frames_answered"] = c.frames_answered()
    obs["start_inspect"] = c.inspect_call()
    obs["start_describe"] = c.describe()
    r = call(c, c.states, GetAvailableStates.Request(), 10.0)
    obs["states"] = [(s.id, s.label) for s in r.available_states] if r else None
    r = call(c, c.graph, GetAvailableTransitions.Request(), 10.0)
    obs["graph"] = [(d.transition.id, d.transition.label, d.start_state.label, d.goal_state.label)
                    for d in r.available_transitions] if r else None

    if a.unmanaged:
        step(c, obs, "deactivate", label="deactivate")
        step(c, obs, "activate", label="activate")
    else:
        # Not available from unconfigured: refused, nothing changes.
        step(c, obs, "activate_refused", tid=Transition.TRANSITION_ACTIVATE)
        # The node was started on a model whose weights are damaged: configure fails.
        step(c, obs, "configure_broken", tid=Transition.TRANSITION_CONFIGURE)
        obs["set_good_model"] = c.set_model(a.model)
        step(c, obs, "configure", tid=Transition.TRANSITION_CONFIGURE)
        step(c, obs, "activate", tid=Transition.TRANSITION_ACTIVATE)
        obs["active_describe"] = c.describe()
        step(c, obs, "deactivate", label="deactivate")
        step(c, obs, "activate_again", label="activate")
        step(c, obs, "deactivate_again", tid=Transition.TRANSITION_DEACTIVATE)
        step(c, obs, "cleanup", tid=Transition.TRANSITION_CLEANUP)
        r = call(c, c.load, LoadModel.Request(model=a.model), 30.0)
        obs["load_model_unconfigured"] = (bool(r and r.success), r.message if r else "no reply")
        step(c, obs, "configure_again", label="configure")
        step(c, obs, "activate_third", label="activate")
        # ros2 lifecycle set <node> shutdown: by label, id 0.
        step(c, obs, "shutdown", label="shutdown")
        step(c, obs, "configure_after_shutdown", label="configure")
    spin_until(c, lambda: False, 0.5)
    obs["events"] = [(e.transition.id, e.transition.label, e.start_state.label, e.goal_state.label) for e in c.events]
    obs["seconds"] = time.monotonic() - t0
    with open(a.out, "w") as f:
        json.dump(obs, f, indent=1)
    c.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
