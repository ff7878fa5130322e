"""Reading a safetensors weight file for an in-place update: views of a memory map, no copy.

`map_safetensors` checks the whole header (dtypes, shapes against byte ranges, ranges inside the
file) and returns each tensor as a view of a private memory map. Copying those views into the
model's parameters is then the only pass over the data: an update costs about one read of the
file and never holds a second copy of the weights in memory.

Not covered: checksums (`offbeat.weights.verify` runs before this) and formats other than
safetensors.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of a private memory map of it (no copy yet).

    Copying them into the parameters is then the only pass over the data, so an update costs about
    one read of the file and needs no second copy of the weights in memory. The header is checked
    completely (dtypes, shapes against byte ranges, ranges inside the file) before any view exists.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"header of {n} bytes does not fit in {size}")
        header = json.loads(f.read(n))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{name}: dtype {info['dtype']} is not supported")
        begin, stop = info["data_offsets"]
        numel = math.prod(info["shape"])
        if not 0 <= begin <= stop <= size - base or stop - begin != numel * dtype.itemsize:
            raise ValueError(
                f"{name}: byte range {begin}..{stop} does not hold {info['shape']} {info['dtype']}"
            )
        flat = (
            torch.frombuffer(mapped, dtype=dtype, count=numel, offset=base + begin)
            if numel
            else torch.empty(0, dtype=dtype)
        )
        tensors[name] = flat.view(info["shape"])
    return tensors
