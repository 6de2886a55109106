#!/usr/bin/env python3
"""rclpy peer for tests/node_bad_input.rs: feeds a running anomaly_inspector node every kind of
bad input (lying sensor_msgs/Image fields, NaN/Inf float frames, corrupt and truncated
CompressedImage data, broken model directories, bad teach requests, invalid parameter values)
and after EACH one publishes a valid frame and waits for its AnomalyResult. It only observes
and writes JSON; the Rust test makes the assertions.

    bad_input.py --good G.png --out obs.json --scenario raw --models DIR
    bad_input.py --good G.png --out obs.json --scenario compressed
"""
import argparse
import io
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import rclpy
from PIL import Image as PILImage
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import Parameter as P, ParameterType as PT, ParameterValue as PV
from rcl_interfaces.srv import GetParameters, SetParameters
from anomaly_inspector_msgs.msg import AnomalyResult
from anomaly_inspector_msgs.srv import LoadModel, Teach
from peer_common import call, key, spin_until

RELIABLE = QoSProfile(reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST, depth=50)
# Time a bad frame gets to reach the node and be refused before the next frame replaces it in
# the node's one-frame mailbox (the node is idle then: the previous result has arrived).
BAD_FRAME_GAP_S = 0.4
U32_MAX = 2**32 - 1


class Peer(Node):
    def __init__(self, compressed):
        super().__init__("bad_input_peer")
        self.pub = (self.create_publisher(CompressedImage, "image/compressed", RELIABLE) if compressed
                    else self.create_publisher(Image, "image", RELIABLE))
        self.results, self.diags = {}, []
        self.create_subscription(AnomalyResult, "anomaly/result", lambda m: self.results.__setitem__(key(m.header), m), RELIABLE)
        self.create_subscription(DiagnosticArray, "/diagnostics", lambda m: self.diags.append(m), RELIABLE)
        self.stamp = time.time_ns()

    def next_stamp(self):
        self.stamp += 1_000_000
        return self.stamp


def stamped(m, stamp):
    m.header.stamp.sec, m.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
    m.header.frame_id = "cam"
    return m


def raw_msg(node, rows, encoding, width, height, step=None, big_endian=0):
    """rows: bytes of the whole frame."""
    m = stamped(Image(), node.next_stamp())
    m.width, m.height, m.encoding, m.is_bigendian = width, height, encoding, big_endian
    m.step = step if step is not None else (len(rows) // height if height else 0)
    m.data = bytes(rows)
    return m


def rgb8(node, rgb):
    h, w, _ = rgb.shape
    return raw_msg(node, np.ascontiguousarray(rgb).tobytes(), "rgb8", w, h)


def gray_of(rgb):
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).round().astype(np.uint8)


def compressed_msg(node, data, fmt):
    m = stamped(CompressedImage(), node.next_stamp())
    m.format, m.data = fmt, bytes(data)
    return m


def encode(rgb, fmt):
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def result_dict(r):
    if r is None:
        return None
    return {"stamp": key(r.header), "score": r.score, "threshold": r.threshold,
            "is_anomalous": bool(r.is_anomalous), "model_id": r.model_id}


def send_and_wait(node, msg, timeout=30.0):
    node.pub.publish(msg)
    k = key(msg.header)
    spin_until(node, lambda: k in node.results, timeout)
    return result_dict(node.results.get(k))


class Run:
    """Bad input, then a valid frame: records whether the bad one got a result (it must not) and
    the valid frame's result (it must come)."""

    def __init__(self, node, valid):
        self.node, self.valid, self.cases = node, valid, {}

    def after(self):
        return send_and_wait(self.node, self.valid())

    def bad_frames(self, name, msgs):
        got = 0
        for m in msgs:
            self.node.pub.publish(m)
            spin_until(self.node, lambda: False, BAD_FRAME_GAP_S)
            got += key(m.header) in self.node.results
        self.cases[name] = {"bad_results": got, "sent": len(msgs), "after": self.after()}

    def action(self, name, observed):
        self.cases[name] = {"observed": observed, "after": self.after()}


def diagnostics(node, name):
    n = len(node.diags)
    spin_until(node, lambda: len(node.diags) > n + 1, 5)  # a fresh one, after the last frame
    diag = [s for d in node.diags for s in d.status if s.name.startswith(name)]
    if not diag:
        return None
    level = diag[-1].level
    return {"level": int.from_bytes(level, "little") if isinstance(level, bytes) else int(level),
            "message": diag[-1].message, "values": {kv.key: kv.value for kv in diag[-1].values}}


def raw_scenario(node, args, good, obs):
    run = Run(node, lambda: rgb8(node, good))
    h, w, _ = good.shape
    rgb = np.ascontiguousarray(good).tobytes()
    obs["baseline"] = run.after()

    # 1. Lying sensor_msgs/Image fields.
    run.bad_frames("step_too_small", [raw_msg(node, rgb, "rgb8", w, h, step=w * 3 - 1)])
    run.bad_frames("data_too_short", [raw_msg(node, rgb[: len(rgb) // 2], "rgb8", w, h, step=w * 3),
                                      raw_msg(node, rgb, "rgb8", w, h, step=U32_MAX)])
    run.bad_frames("unsupported_encoding", [raw_msg(node, rgb, "yuv422_weird", w, h, step=w * 3),
                                            raw_msg(node, rgb, "x" * 5000 + "\n\x1b[31mFAKE", w, h, step=w * 3)])
    run.bad_frames("zero_size", [raw_msg(node, rgb, "rgb8", 0, h, step=0), raw_msg(node, rgb, "rgb8", w, 0, step=w * 3)])
    run.bad_frames("too_large", [raw_msg(node, rgb[:64], "rgb8", 20000, 20000, step=60000),
                                 raw_msg(node, rgb[:64], "mono8", 1, 4_000_000_000, step=1)])
    # 2. Float frames: NaN/Inf, and little-endian data flagged big endian (a 0..1 ramp, whose
    # bytes reversed are far outside 0..1).
    gray = gray_of(good)
    f = (gray.astype(np.float32) / 255.0)
    nan, inf = f.copy(), f.copy()
    nan[3, 5] = np.nan
    inf[h - 1, w - 1] = np.inf
    bgr = (good[..., ::-1].astype(np.float32) / 255.0)
    ninf = bgr.copy()
    ninf[0, 0, 1] = -np.inf
    run.bad_frames("non_finite", [raw_msg(node, nan.astype("<f4").tobytes(), "32FC1", w, h),
                                  raw_msg(node, inf.astype(">f4").tobytes(), "32FC1", w, h, big_endian=1),
                                  raw_msg(node, ninf.astype("<f4").tobytes(), "32FC3", w, h)])
    # The picture's little-endian floats flagged big endian: read that way they are garbage.
    # Pixels whose reversed bytes would be NaN/Inf are set to 0.5 (reversed: a tiny number), so
    # that this frame shows the range check, not the NaN check.
    lying = f.copy()
    reversed_ = lambda a: np.frombuffer(a.astype("<f4").tobytes(), dtype=">f4").reshape(h, w)
    lying[~np.isfinite(reversed_(lying))] = 0.5
    assert np.isfinite(reversed_(lying)).all() and (np.abs(reversed_(lying) - 0.5) > 1.0).any()
    run.bad_frames("out_of_range", [raw_msg(node, lying.astype("<f4").tobytes(), "32FC1", w, h, big_endian=1),
                                    raw_msg(node, (f * 255).astype("<f4").tobytes(), "32FC1", w, h)])

    # 3. Valid variants: the endianness flag honoured, float frames read as intensities 0..1.
    g16 = gray.astype(np.uint16) * 257
    obs["valid"] = {
        "rgb8": obs["baseline"],
        "rgb8_bigendian_flag": send_and_wait(node, raw_msg(node, rgb, "rgb8", w, h, big_endian=1)),
        "mono8": send_and_wait(node, raw_msg(node, gray.tobytes(), "mono8", w, h)),
        "mono16_le": send_and_wait(node, raw_msg(node, g16.astype("<u2").tobytes(), "mono16", w, h)),
        "mono16_be": send_and_wait(node, raw_msg(node, g16.astype(">u2").tobytes(), "mono16", w, h, big_endian=1)),
        "32FC1_le": send_and_wait(node, raw_msg(node, f.astype("<f4").tobytes(), "32FC1", w, h)),
        "32FC1_be": send_and_wait(node, raw_msg(node, f.astype(">f4").tobytes(), "32FC1", w, h, big_endian=1)),
        "32FC3_le": send_and_wait(node, raw_msg(node, bgr.astype("<f4").tobytes(), "32FC3", w, h)),
        "32FC3_be": send_and_wait(node, raw_msg(node, bgr.astype(">f4").tobytes(), "32FC3", w, h, big_endian=1)),
    }

    # 4. Broken models through ~/load_model: a clear error, and the old model keeps serving.
    ns = f"/{args.node_name}"
    loader = node.create_client(LoadModel, f"{ns}/load_model")
    models = {}
    for name in ("missing", "empty_dir", "garbled_json", "wrong_version", "truncated_bank", "truncated_backbone", "nan_bank"):
        resp = call(node, loader, LoadModel.Request(model=str(args.models / name)), 60)
        run.action(f"load_{name}", {"success": resp.success, "message": resp.message} if resp else None)

    # 5. Parameters: refused in the set_parameters reply, with the reason; the old value stays.
    setter = node.create_client(SetParameters, f"{ns}/set_parameters")
    getter = node.create_client(GetParameters, f"{ns}/get_parameters")

    def set_param(name, value):
        if isinstance(value, bool):
            pv = PV(type=PT.PARAMETER_BOOL, bool_value=value)
        elif isinstance(value, float):
            pv = PV(type=PT.PARAMETER_DOUBLE, double_value=value)
        elif isinstance(value, int):
            pv = PV(type=PT.PARAMETER_INTEGER, integer_value=value)
        elif isinstance(value, str):
            pv = PV(type=PT.PARAMETER_STRING, string_value=value)
        else:
            pv = PV(type=PT.PARAMETER_INTEGER_ARRAY, integer_array_value=list(value))
        resp = call(node, setter, SetParameters.Request(parameters=[P(name=name, value=pv)]), 30)
        r = resp.results[0] if resp and resp.results else None
        return {"successful": r.successful, "reason": r.reason} if r else None

    def get_params(names):
        resp = call(node, getter, GetParameters.Request(names=names), 10)
        out = {}
        for n, v in zip(names, resp.values if resp else []):
            out[n] = {PT.PARAMETER_DOUBLE: v.double_value, PT.PARAMETER_INTEGER: v.integer_value,
                      PT.PARAMETER_STRING: v.string_value, PT.PARAMETER_INTEGER_ARRAY: list(v.integer_array_value),
                      PT.PARAMETER_DOUBLE_ARRAY: list(v.double_array_value)}.get(v.type, None)
        return out

    bad_params = [("threshold", -0.5), ("threshold", float("nan")), ("threshold", "high"), ("input_qos", "bogus"),
                  ("input_qos", "sensor_data"), ("device", "tpu"), ("roi", [0, 0, -5, 10]), ("roi", [1, 2, 3]),
                  ("min_region_area", -1), ("working_distance", -1.0), ("marker_pixel_size", 0.0),
                  ("model", str(args.models / "missing")), ("model", str(args.models / "garbled_json")),
                  ("model", str(args.models / "wrong_version"))]
    params = []
    for name, value in bad_params:
        params.append({"name": name, "value": value if not (isinstance(value, float) and math.isnan(value)) else "nan",
                       "reply": set_param(name, value)})
    # a value refused twice must still be refused (r2r skips unchanged values)
    params.append({"name": "threshold", "value": -0.5, "reply": set_param("threshold", -0.5)})
    obs["params"] = params
    # a valid change after the refused ones goes through, and nothing refused came back with it
    obs["param_valid"] = set_param("min_region_area", 30)
    # a model that passes the cheap checks but does not load: accepted by the reply, refused by
    # the load, and the parameter goes back to the model in force
    obs["param_truncated_bank"] = set_param("model", str(args.models / "truncated_bank"))
    spin_until(node, lambda: False, 3.0)
    obs["params_after"] = get_params(["threshold", "input_qos", "device", "roi", "min_region_area",
                                      "working_distance", "marker_pixel_size", "model"])
    run.action("params", None)

    # 6. A region of interest outside the frame: frames are refused with the reason until it is
    # set back.
    obs["roi_outside"] = set_param("roi", [w - 10, h - 10, 100, 100])
    spin_until(node, lambda: False, 0.3)
    obs["roi_outside_result"] = send_and_wait(node, rgb8(node, good), timeout=2.0)
    obs["roi_reset"] = set_param("roi", [0, 0, 0, 0])
    spin_until(node, lambda: False, 0.3)
    run.action("roi_outside_frame", None)

    # 7. Teach requests the node must refuse (no frames are streamed meanwhile).
    teacher = node.create_client(Teach, f"{ns}/teach")
    for name, req in [("teach_one_frame", Teach.Request(num_frames=1, model_name="t1")),
                      ("teach_zero_frames_no_stream", Teach.Request(num_frames=0, model_name="t0", timeout_s=1.0)),
                      ("teach_too_many", Teach.Request(num_frames=1_000_000, model_name="tbig")),
                      ("teach_bad_name", Teach.Request(num_frames=3, model_name="../escape"))]:
        t = time.monotonic()
        resp = call(node, teacher, req, 20)
        run.action(name, {"success": resp.success, "message": resp.message, "seconds": time.monotonic() - t} if resp else None)

    obs["cases"] = run.cases
    obs["diag"] = diagnostics(node, args.node_name)


def compressed_scenario(node, args, good, obs):
    png, jpeg = encode(good, "PNG"), encode(good, "JPEG")
    run = Run(node, lambda: compressed_msg(node, jpeg, "jpeg"))
    obs["baseline"] = run.after()
    obs["valid"] = {
        "png": send_and_wait(node, compressed_msg(node, png, "png")),
        "image_transport_format": send_and_wait(node, compressed_msg(node, jpeg, "rgb8; jpeg compressed bgr8")),
        "empty_format": send_and_wait(node, compressed_msg(node, png, "")),
    }
    rng = np.random.default_rng(3)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda k, p: struct.pack(">I", len(p)) + k + p + struct.pack(">I", zlib.crc32(k + p))
    lying = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    run.bad_frames("corrupt", [compressed_msg(node, rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "jpeg"),
                               compressed_msg(node, bytes(flipped), "png")])
    run.bad_frames("truncated", [compressed_msg(node, jpeg[: len(jpeg) // 2], "jpeg"),
                                 compressed_msg(node, png[: len(png) // 2], "png"),
                                 compressed_msg(node, b"", "jpeg")])
    run.bad_frames("unknown_format", [compressed_msg(node, jpeg, "theora"),
                                      compressed_msg(node, png, "16UC1; compressedDepth png")])
    run.bad_frames("too_large", [compressed_msg(node, lying, "png")])
    obs["cases"] = run.cases
    obs["diag"] = diagnostics(node, args.node_name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--good", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", type=Path, help="folder of broken model directories (raw scenario)")
    ap.add_argument("--node-name", default="anomaly_inspector")
    ap.add_argument("--scenario", choices=["raw", "compressed"], required=True)
    args = ap.parse_args()
    for var in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_DOMAIN_ID"):
        if not os.environ.get(var):
            sys.exit(f"{var} is not set (DDS must stay on loopback)")
    rclpy.init()
    node = Peer(args.scenario == "compressed")
    if not spin_until(node, lambda: node.pub.get_subscription_count() > 0, 60):
        sys.exit("the node's input subscription never appeared")
    spin_until(node, lambda: False, 0.5)
    good = np.asarray(PILImage.open(args.good).convert("RGB"))
    obs = {}
    t0 = time.monotonic()
    (raw_scenario if args.scenario == "raw" else compressed_scenario)(node, args, good, obs)
    obs["seconds"] = time.monotonic() - t0
    args.out.write_text(json.dumps(obs, indent=1))
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
