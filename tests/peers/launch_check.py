#!/usr/bin/env python3
"""Reads launch/*.launch.py without executing them (ROS launch cannot run on the project's
machines) and config/*.yaml, and prints JSON of what they reference: packages, executables,
parameter files, parameter names, remapped names, launch arguments used and declared.
tests/launch_files.rs checks every reference against the project."""
import ast
import json
import sys
from pathlib import Path

import yaml


def const(node):
    return node.value if isinstance(node, ast.Constant) else None


def call_name(node):
    f = node.func
    return f.id if isinstance(f, ast.Name) else (f.attr if isinstance(f, ast.Attribute) else None)


def scan_launch(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    out = {"file": path.name, "nodes": [], "declared": [], "used": [], "files": [], "has_generate": False}
    for n in ast.walk(tree):
        if isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description":
            out["has_generate"] = True
        if not isinstance(n, ast.Call):
            continue
        name = call_name(n)
        args = [const(a) for a in n.args]
        if name == "DeclareLaunchArgument":
            out["declared"].append(args[0] if args and args[0] else ast.unparse(n.args[0]))
        elif name == "LaunchConfiguration":
            out["used"].append(args[0] if args and args[0] else ast.unparse(n.args[0]))
        elif name == "join":
            parts = [const(a) for a in n.args]
            strs = [p for p in parts if isinstance(p, str)]
            if strs and strs[-1].endswith((".yaml", ".rviz")):
                out["files"].append("/".join(strs))
        elif name == "Node":
            kw = {k.arg: k.value for k in n.keywords}
            node = {"package": const(kw.get("package")), "executable": const(kw.get("executable")),
                    "inline_params": [], "remap_from": []}
            if "parameters" in kw and isinstance(kw["parameters"], ast.List):
                for p in kw["parameters"].elts:
                    if isinstance(p, ast.Dict):
                        node["inline_params"] += [const(k) for k in p.keys]
            if "remappings" in kw and isinstance(kw["remappings"], ast.List):
                for r in kw["remappings"].elts:
                    if isinstance(r, ast.Tuple):
                        node["remap_from"].append(const(r.elts[0]))
            out["nodes"].append(node)
    # f-strings (f"{cam}_image") are reported as their unparsed source; keep only plain names
    return out


def scan_yaml(path):
    data = yaml.safe_load(path.read_text())
    names = []
    for node_key, section in (data or {}).items():
        params = (section or {}).get("ros__parameters", {})
        names += list(params)
    return {"file": path.name, "params": names}


root = Path(sys.argv[1])
print(json.dumps({
    "launch": [scan_launch(p) for p in sorted((root / "launch").glob("*.launch.py"))],
    "yaml": [scan_yaml(p) for p in sorted((root / "config").glob("*.yaml"))],
    "rviz": sorted(p.name for p in (root / "config").glob("*.rviz")),
}, indent=1))
