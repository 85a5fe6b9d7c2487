"""The safetensors format: the width of each dtype, and a file's header read and checked against the file.

A header lists each tensor's dtype, shape and byte range; a damaged or hostile file can lie in any of
them, so `read_header` checks every tensor's shape × dtype against its range, the ranges against each
other (in order, no gap, no overlap) and their end against the file's size before anyone reads a byte.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from qpissa import UserError

# bytes per element of every safetensors dtype code: a header's shapes are checked against its offsets
DTYPE_WIDTHS = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def read_header(shard: Path, fix: str = "download it again") -> tuple[dict[str, dict], int]:
    """Parse a safetensors file's header and check it against the file: every tensor's shape × dtype
    fills exactly its byte range, the ranges follow each other without gap or overlap, and the file holds
    every byte they promise.

    Args:
        shard: the file.
        fix: what to do about a damaged file, for the message.

    Returns:
        The header's tensor entries (dtype, shape, data_offsets) and the byte offset at which their
        data starts.

    Raises:
        UserError: an unreadable header, one that contradicts itself, or a file shorter or longer than it.
    """
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{shard} is not a readable safetensors file ({error}); {fix}") from None
    header.pop("__metadata__", None)
    problem = _header_problem(header)
    if problem:
        raise UserError(f"{shard} is corrupt: {problem}; {fix}")
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end != size:
        raise UserError(
            f"{shard} is truncated or corrupt: its header describes {8 + length + end} bytes, the file has "
            f"{size}; {fix}"
        )
    return header, 8 + length


def _header_problem(header: dict) -> str | None:
    """What is wrong with a safetensors header's tensor entries, or None."""
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            return f"tensor {name} has no dtype, shape and data_offsets"
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_WIDTHS:
            return f"tensor {name} has an unknown dtype {dtype!r}"
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            return f"tensor {name} has an invalid shape {shape!r}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            return f"tensor {name} has invalid data_offsets {offsets!r}"
        needed = math.prod(shape) * DTYPE_WIDTHS[dtype]
        if offsets[1] - offsets[0] != needed:
            return (
                f"tensor {name} ({dtype} {shape}) needs {needed} bytes but its data_offsets {offsets} "
                f"span {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    position = 0
    for start, end, name in sorted(spans):
        if start != position:
            what = (
                "overlaps the tensor before it"
                if start < position
                else f"starts {start - position} bytes after the tensor before it ends"
            )
            return f"tensor {name} {what}"
        position = end
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
