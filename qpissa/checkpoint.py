"""Hugging Face checkpoints on disk: lazy, validated reading and streaming, atomic writing.

Reading opens each safetensors shard memory-mapped and hands out one tensor at a time. Writing
appends each tensor to disk as it arrives (`SafetensorsWriter`, and `ShardedWriter` over several
shards), so memory is bounded by one tensor, not by a shard or a model. Shard names and the index
file follow the Hugging Face scheme (`shard_names`, `write_index`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from qpissa import UserError
from qpissa.artifacts import CONFIG_NAME, EXPORT_REPORT, REPORT_NAME, read_json
from qpissa.safetensors_file import DTYPE_WIDTHS, read_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
INDEX_NAME = "model.safetensors.index.json"
SHARD_GLOB = "model*.safetensors"  # every shard `shard_names` names
# Keys that only a quantized checkpoint has (bitsandbytes, GPTQ/AWQ, int8).
QUANTIZED_KEY_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".qweight", ".qzeros", ".scales", ".SCB")

log = logging.getLogger(__name__)

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
FLOAT_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items() if dtype.is_floating_point}


class CheckpointReader:
    """The tensors of a safetensors checkpoint directory, read one at a time.

    Args:
        model_dir: a directory with `config.json` and `*.safetensors` shards (optionally indexed).

    Raises:
        UserError: missing directory or config, no safetensors, a truncated or corrupt shard.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.config = read_config(model_dir)
        self.shards = _shard_files(model_dir)
        fix = _remake(model_dir)
        parsed = {shard: read_header(shard, fix) for shard in self.shards}
        self.headers = {shard: header for shard, (header, _) in parsed.items()}
        self.data_start = {shard: start for shard, (_, start) in parsed.items()}  # byte offset of the data
        self.location = {name: shard for shard, header in self.headers.items() for name in header}

    def stores_quantized(self) -> bool:
        """Whether the checkpoint holds quantized weights: a quantization_config, or quant-state tensors."""
        return "quantization_config" in self.config or any(
            marker in name for name in self.location for marker in QUANTIZED_KEY_MARKERS
        )

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, sorted within a shard): deterministic."""
        return [name for shard in self.shards for name in sorted(self.headers[shard])]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.location[name]][name]["shape"])

    def dtype_code(self, name: str) -> str:
        return self.headers[self.location[name]][name]["dtype"]

    def nbytes(self, name: str) -> int:
        start, end = self.headers[self.location[name]][name]["data_offsets"]
        return end - start

    def read(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (CPU), in its stored dtype.

        The shard is mapped for this one read only: a mapping kept open would leave every page read so
        far resident, and the process would grow with the model instead of with its largest tensor.
        """
        from safetensors import safe_open

        with safe_open(str(self.location[name]), framework="pt") as f:
            return f.get_tensor(name)

    def read_bytes(self, name: str) -> Iterator[bytes]:
        """The stored bytes of one tensor, in chunks: a tensor copied unchanged never sits in memory."""
        shard = self.location[name]
        start, end = self.headers[shard][name]["data_offsets"]
        with open(shard, "rb") as f:
            f.seek(self.data_start[shard] + start)
            yield from _chunks(f, end - start)

    def file_stats(self) -> dict[str, list[int]]:
        """`{file name: [size, mtime_ns]}` of config.json, the index and the shards: a rewrite shows."""
        index = self.model_dir / INDEX_NAME
        files = [self.model_dir / CONFIG_NAME, *([index] if index.is_file() else []), *self.shards]
        stats = {path.name: path.stat() for path in files}
        return {name: [stat.st_size, stat.st_mtime_ns] for name, stat in stats.items()}


class SafetensorsWriter:
    """Writes a `.safetensors` file tensor by tensor, holding none of them in memory.

    Tensor bytes go to one spool file per element size; `close()` writes the header and joins the spools
    from the widest element size down, which keeps every tensor aligned without gaps (the format
    forbids holes). The file appears under its final name only when complete.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, size, spool
        self.spools: dict[int, object] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        self.add_bytes(name, _DTYPE_CODES[tensor.dtype], list(tensor.shape), [memoryview(data)])

    def add_bytes(
        self, name: str, dtype: str, shape: list[int], chunks: Iterable[bytes | memoryview]
    ) -> None:
        """Append a tensor given as its raw little-endian bytes and safetensors dtype code (e.g. `BF16`)."""
        if name in self.entries:
            raise ValueError(f"tensor {name} written twice to {self.path.name}")
        width = DTYPE_WIDTHS[dtype]
        if width not in self.spools:
            self.spools[width] = open(self._spool_path(width), "wb")  # noqa: SIM115 - closed in close()
        size = sum(self.spools[width].write(chunk) for chunk in chunks)
        self.entries[name] = (dtype, list(shape), size, width)

    def close(self, metadata: dict[str, str] | None = None) -> None:
        """Write header and data to `path` atomically and remove the spools."""
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        widths = sorted(self.spools, reverse=True)
        for width in widths:
            for name, (dtype, shape, size, spool) in self.entries.items():
                if spool == width:
                    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                    offset += size
        raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        raw += b" " * (-len(raw) % 8)
        partial = self.path.with_name(self.path.name + ".tmp")
        with open(partial, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for width in widths:
                self.spools[width].close()
                with open(self._spool_path(width), "rb") as spool:
                    _append_file(spool, out)
                os.remove(self._spool_path(width))
        os.replace(partial, self.path)

    def _spool_path(self, width: int) -> Path:
        return self.path.with_name(f"{self.path.name}.spool{width}")


class ShardedWriter:
    """Shards of at most `limit` bytes, named `model-0000k-of-0000n.safetensors` once their count is known."""

    def __init__(self, out_dir: Path, limit: int) -> None:
        self.out_dir, self.limit = out_dir, limit
        self.parts: list[Path] = []
        self.writer: SafetensorsWriter | None = None
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.writer is None or (self.size and self.size + nbytes > self.limit):
            self._close_current()
            path = self.out_dir / f"part-{len(self.parts) + 1:05d}.safetensors"
            self.writer, self.size = SafetensorsWriter(path), 0
            self.parts.append(path)
        self.writer.add(name, tensor)
        self.size += nbytes

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names and write the index; return the names."""
        self._close_current()
        names = shard_names(len(self.parts))
        for path, final in zip(self.parts, names, strict=True):
            path.rename(self.out_dir / final)
        if len(names) > 1:
            write_index(self.out_dir, names)
        return names

    def _close_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _remake(model_dir: Path) -> str:
    """How to replace a damaged shard: made by qpissa, make it again; else download it again."""
    if (model_dir / REPORT_NAME).is_file():
        return "convert the model again (qpissa convert ... --overwrite)"
    if (model_dir / EXPORT_REPORT).is_file():
        return "export it again (qpissa export ... --overwrite)"
    return "download it again"


def copy_tensors(source: Path, writer: SafetensorsWriter, rename: Callable[[str], str] | None = None) -> None:
    """Append every tensor of a safetensors file to `writer` in name order, byte for byte (under
    `rename(name)` if given).

    Unlike reading through a memory map, whose pages stay resident while it is open, this holds at most
    one chunk in memory.
    """
    header, data_start = read_header(source)
    with open(source, "rb") as f:
        for name in sorted(header):
            start, end = header[name]["data_offsets"]
            f.seek(data_start + start)
            chunks = _chunks(f, end - start)
            writer.add_bytes(
                rename(name) if rename else name, header[name]["dtype"], header[name]["shape"], chunks
            )


def shard_names(count: int) -> list[str]:
    """File names of `count` shards: `model.safetensors` alone, else `model-0000k-of-0000n.safetensors`."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_index(directory: Path, shard_files: list[str]) -> None:
    """`model.safetensors.index.json` of a multi-shard checkpoint: each tensor's shard, the total size."""
    weight_map, total = {}, 0
    for shard_file in shard_files:
        header, _ = read_header(directory / shard_file)
        weight_map.update(dict.fromkeys(header, shard_file))
        total += (directory / shard_file).stat().st_size
    write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def read_config(model_dir: Path) -> dict:
    """`config.json` of a checkpoint directory, with user-facing errors for the usual mistakes."""
    if not model_dir.exists():
        raise UserError(
            f"model directory {model_dir} does not exist; pass a Hugging Face checkpoint directory"
        )
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is a file, not a directory; pass the checkpoint's directory")
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        raise UserError(
            f"{model_dir} has no config.json, so it is not a Hugging Face checkpoint; "
            "for the demo model run `qpissa fetch-model smollm2-135m DIR`"
        )
    return read_json(config_path, "restore it from the original model")


def auto_config(model_dir: Path):
    """transformers' config of a checkpoint directory, or one line saying why transformers cannot use it.

    Raises:
        UserError: config.json is not a JSON object, or describes a model transformers cannot build
            (unknown `model_type`, missing or contradictory fields).
    """
    import transformers
    from huggingface_hub.errors import StrictDataclassError  # a field of the wrong type ("64" for 64)

    config = read_config(model_dir)
    try:
        return transformers.AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, StrictDataclassError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # a field's validation error names the field first and says what is wrong last
        reason = lines[-1] if isinstance(error, StrictDataclassError) else lines[0]
        raise UserError(
            f"{model_dir / CONFIG_NAME} describes a model transformers {transformers.__version__} cannot "
            f"build (model_type {config.get('model_type')!r}: {reason}); pass a checkpoint of an "
            "architecture transformers supports, or restore config.json from the original model"
        ) from None


def write_json(path: Path, data: object) -> None:
    """Write JSON (sorted keys, indented) atomically: a reader never sees half a file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config and other non-weight files; return their names.

    qpissa's own records (`qpissa_*.json`: a fetched demo model's marker, a report; a merged export's
    `export_report.json`) describe the input, not the output, and stay behind.
    """
    copied = []
    for path in sorted(model_dir.iterdir()):
        if (
            path.is_file()
            and path.name not in (CONFIG_NAME, INDEX_NAME, EXPORT_REPORT)
            and not path.name.endswith(WEIGHT_SUFFIXES)
            and not (path.name.startswith("qpissa_") and path.suffix == ".json")
        ):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def _shard_files(model_dir: Path) -> list[Path]:
    """The weight files transformers loads: model.safetensors if present (before any index), else the
    index's shards; others beside them are ignored, with a warning, as transformers ignores them."""
    index = model_dir / INDEX_NAME
    single = model_dir / shard_names(1)[0]
    if single.is_file():
        others = sorted(p.name for p in model_dir.glob("*.safetensors") if p != single)
        if others or index.is_file():
            log.warning(
                "%s: %s ignored, as transformers ignores them: it loads %s before any index",
                model_dir, ", ".join([*others, *[INDEX_NAME] * index.is_file()]), single.name,
            )  # fmt: skip
        return [single]
    if index.is_file():
        record = read_json(index, "restore it from the original model", required=("weight_map",))
        weight_map = record["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: `weight_map` is not a map of tensor names to files; restore it")
        shards = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise UserError(
                f"{index} lists shards that are missing: {', '.join(missing)}; download them again"
            )
        unlisted = sorted(p.name for p in model_dir.glob("*.safetensors") if p not in shards)
        if unlisted:
            log.warning(
                "%s: %s ignored, as transformers ignores them: %s does not list them",
                model_dir, ", ".join(unlisted), INDEX_NAME,
            )  # fmt: skip
        return shards
    unindexed = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if unindexed:
        raise UserError(
            f"{model_dir} has {', '.join(unindexed)} but neither {single.name} nor {INDEX_NAME}, so "
            f"transformers would load no weights from it; rename a single weights file to {single.name}, "
            "or add the index of its shards"
        )
    others = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if others and all(name.endswith(".gguf") for name in others):
        raise UserError(
            f"{model_dir} has only GGUF weights ({', '.join(others)}); write them as safetensors first: "
            "`AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME).save_pretrained(NEW_DIR)` "
            "dequantizes them (a quantized GGUF's rounding stays in the weights)"
        )
    if others:
        raise UserError(
            f"{model_dir} has no .safetensors weights, only {', '.join(others)}; convert them first, e.g. "
            "`AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)` writes safetensors"
        )
    raise UserError(f"{model_dir} has no weight files (*.safetensors); is it the right directory?")


def _chunks(f: BinaryIO, size: int, chunk_bytes: int = 4 << 20) -> Iterator[bytes]:
    for offset in range(0, size, chunk_bytes):
        yield f.read(min(chunk_bytes, size - offset))


def _append_file(source: BinaryIO, out: BinaryIO) -> None:
    """Append `source` to `out`: inside the kernel where it can (Linux; about twice as fast), else
    through a buffer, which also copies whatever the kernel left."""
    out.flush()
    remaining = os.fstat(source.fileno()).st_size
    try:
        while hasattr(os, "copy_file_range") and remaining > 0:
            copied = os.copy_file_range(source.fileno(), out.fileno(), remaining)
            if copied == 0:
                break
            remaining -= copied
    except OSError:  # e.g. a file system that cannot: the buffered copy goes on from here
        pass
    shutil.copyfileobj(source, out, 16 << 20)
