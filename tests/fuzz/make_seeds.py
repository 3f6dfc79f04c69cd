#!/usr/bin/env python3
"""Writes small valid seed files for the fuzz targets (standard library only):
a GGUF with metadata of every type and three tensors, and a safetensors file with F32/F16/BF16
tensors and metadata. Usage: make_seeds.py GGUF_DIR SAFETENSORS_DIR"""
import json
import os
import struct
import sys


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def gguf():
    kv = [
        (s("general.architecture"), 8, s("llama")),
        (s("general.alignment"), 4, struct.pack("<I", 32)),
        (s("u8"), 0, struct.pack("<B", 7)),
        (s("i16"), 3, struct.pack("<h", -3)),
        (s("i32"), 5, struct.pack("<i", -70000)),
        (s("u64"), 10, struct.pack("<Q", 1 << 40)),
        (s("i64"), 11, struct.pack("<q", -5)),
        (s("f32"), 6, struct.pack("<f", 0.5)),
        (s("f64"), 12, struct.pack("<d", 2.5)),
        (s("b"), 7, b"\x01"),
        (s("tokens"), 9, struct.pack("<IQ", 8, 3) + s("a") + s("bc") + s("<|im_end|>")),
        (s("types"), 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 1, 3)),
        (s("nested"), 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 2) + b"\x01\x02"),
    ]
    # (name, ne, ggml type id, bytes): F32 [2, 8], F16 [1, 32], Q8_0 [1, 32]
    tensors = [("a", [8, 2], 0, 64), ("h", [32, 1], 1, 64), ("q", [32, 1], 8, 34)]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for k, t, v in kv:
        out += k + struct.pack("<I", t) + v
    off = 0
    infos = b""
    for name, ne, t, nbytes in tensors:
        infos += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
        infos += struct.pack("<IQ", t, off)
        off += (nbytes + 31) // 32 * 32
    out += infos
    out += b"\0" * ((32 - len(out) % 32) % 32)
    for i, (_, _, _, nbytes) in enumerate(tensors):
        blob = bytes((i * 17 + j) % 251 for j in range(nbytes))
        out += blob + b"\0" * ((32 - nbytes % 32) % 32)
    return out


def safetensors():
    h = {"__metadata__": {"format": "pt", "dms_window_size": "16"},
         "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "h": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
         "s": {"dtype": "BF16", "shape": [], "data_offsets": [32, 34]}}
    hb = json.dumps(h).encode()
    return struct.pack("<Q", len(hb)) + hb + bytes(range(34))


def main():
    os.makedirs(sys.argv[1], exist_ok=True)
    os.makedirs(sys.argv[2], exist_ok=True)
    with open(os.path.join(sys.argv[1], "seed.gguf"), "wb") as f:
        f.write(gguf())
    with open(os.path.join(sys.argv[2], "seed.safetensors"), "wb") as f:
        f.write(safetensors())


if __name__ == "__main__":
    main()
