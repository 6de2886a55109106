"""Helpers shared by the rclpy test peers (imported from the peer's own folder)."""
import time

import rclpy


def key(h):
    """A header's stamp in nanoseconds: the peers tell frames and results apart by it."""
    return h.stamp.sec * 1_000_000_000 + h.stamp.nanosec


def spin_until(node, cond, timeout):
    """Spins `node` until `cond()` holds or `timeout` seconds pass; returns `cond()`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        rclpy.spin_once(node, timeout_sec=0.01)
    return cond()


def call(node, client, request, timeout):
    """Calls a service and waits for the reply; None when the service or the reply never came."""
    if not client.wait_for_service(timeout_sec=10.0):
        return None
    fut = client.call_async(request)
    spin_until(node, fut.done, timeout)
    return fut.result() if fut.done() else None
