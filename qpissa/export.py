"""`qpissa export`: a trained adapter over the NF4 residual → a merged 16-bit model, or a rank-2r LoRA
for the original model (REFERENCE.md §1, "Merging / exporting").

Both exports stream one matrix at a time: the residual is dequantized from its stored bitsandbytes codes,
the adapter factors are read lazily, and every output tensor goes straight to disk. Output is built in
`OUT.partial/` and renamed to `OUT` only once written and verified.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from tqdm.auto import tqdm

import qpissa
from qpissa import UserError
from qpissa.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    SafetensorsWriter,
    copy_side_files,
    write_json,
)
from qpissa.config import to_dict
from qpissa.export_verify import verify_export
from qpissa.loading import resolve_source
from qpissa.memory import peak_rss_mb

log = logging.getLogger(__name__)

EXPORT_REPORT = "export_report.json"
QPISSA_REPORT = "qpissa_report.json"
QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


class ExportKind(str, Enum):
    MERGED = "merged"  # deq(Q) + s·B'·A' as a plain 16-bit checkpoint: exactly the trained model
    LORA = "lora"  # s·(B'A' − BA) as a rank-2r LoRA for the original model


class OutputDtype(str, Enum):
    AUTO = "auto"  # merged: the model's own dtype from config.json; lora: float32
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


@dataclass
class ExportSettings:
    """What to export and how. Every field is a `qpissa export` flag."""

    to: ExportKind = field(
        default=ExportKind.MERGED,
        metadata={"help": "merged: one 16-bit model; lora: rank-2r adapter for the original"},
    )
    dtype: OutputDtype = field(
        default=OutputDtype.AUTO,
        metadata={"help": "weights dtype (auto: merged keeps the model's dtype, lora writes float32)"},
    )
    rank: int | None = field(
        default=None,
        metadata={"help": "lora only: re-truncate ΔW to this rank with an SVD (adds a reported error)"},
    )
    base: Path | None = field(
        default=None,
        metadata={"help": "lora only: the original model (default: the one qpissa convert read)"},
    )
    verify: bool = field(
        default=True, metadata={"help": "compare the export's logits with the trained model's"}
    )
    shard_size_mb: int | None = field(
        default=None, metadata={"help": "merged only: largest output shard, in MB (default 2048)"}
    )

    def __post_init__(self) -> None:
        problems = []
        if self.to is ExportKind.MERGED and self.rank is not None:
            problems.append("--rank applies to --to lora only (a merged model has no rank); drop --rank")
        if self.to is ExportKind.MERGED and self.base is not None:
            problems.append("--base applies to --to lora only (a merged model needs no base); drop --base")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}")
        if self.to is ExportKind.LORA and self.shard_size_mb is not None:
            problems.append("--shard-size-mb applies to --to merged only (an adapter is one file); drop it")
        if self.shard_size_mb is not None and self.shard_size_mb < 1:
            problems.append(f"--shard-size-mb must be at least 1, got {self.shard_size_mb}")
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk, read one module at a time.

    Attributes:
        path: the adapter directory.
        config: its `adapter_config.json`.
        rank: r (every module has the same).
        scale: s = lora_alpha / r (rsLoRA: / sqrt(r)).
        shapes: `{module: (out, in)}` of the layers it adapts.
    """

    path: Path
    config: dict
    rank: int
    scale: float
    shapes: dict[str, tuple[int, int]]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`A` float32 `[r, in]` and `B` float32 `[out, r]` of one module."""
        from safetensors import safe_open

        with safe_open(str(self.path / "adapter_model.safetensors"), framework="pt") as f:
            prefix = f"base_model.model.{module}"
            return f.get_tensor(f"{prefix}.lora_A.weight").float(), f.get_tensor(
                f"{prefix}.lora_B.weight"
            ).float()


class Residual:
    """The base weights of a QPiSSA directory: NF4 (bitsandbytes codes) or 16-bit, dequantized on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.reader = CheckpointReader(model_dir)
        self.quantized = {
            name.removesuffix(QUANT_STATE_SUFFIX): name
            for name in self.reader.location
            if name.endswith(QUANT_STATE_SUFFIX)
        }

    def shape(self, module: str) -> tuple[int, ...] | None:
        """`(out, in)` of a module's weight, or None if the checkpoint has no such weight."""
        if module in self.quantized:
            return tuple(_quant_state_json(self.reader.read(self.quantized[module]))["shape"])
        name = f"{module}.weight"
        return self.reader.shape(name) if name in self.reader.location else None

    def is_quant_aux(self, name: str) -> bool:
        """A tensor that belongs to a quantized weight's state (absmax, quant_map, ...), not a weight."""
        module, _, rest = name.partition(".weight.")
        return bool(rest) and module in self.quantized

    def weight(self, module: str) -> torch.Tensor:
        """The weight as float32 `[out, in]`: for NF4 layers `deq(Q)`, exactly what `Linear4bit` uses."""
        name = f"{module}.weight"
        if module not in self.quantized:
            return self.reader.read(name).float()
        import bitsandbytes.functional as bnbf

        aux = {
            key.removeprefix(name + "."): self.reader.read(key)
            for key in self.reader.location
            if key.startswith(name + ".")
        }
        state = bnbf.QuantState.from_dict(aux, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(self.reader.read(name), state).float()


def export(run: Path, out_dir: Path, settings: ExportSettings, *, show_progress: bool = True) -> dict:
    """Export a trained (or freshly converted) QPiSSA model as a merged checkpoint or a LoRA for the original.

    Args:
        run: a training run, a `checkpoint-N` inside one, or a QPiSSA directory (its untrained adapter).
        out_dir: the directory to create; must not exist (or be empty).
        settings: kind of export, dtype, optional re-truncation rank, original model, verification.
        show_progress: show a progress bar (only on a terminal).

    Returns:
        The export report (also written to `out_dir/export_report.json`).

    Raises:
        UserError: no adapter, an adapter that does not fit the residual, a missing original model, or an
            existing `out_dir`; raised before anything is written.
    """
    started = time.perf_counter()
    source = resolve_source(run)
    if source.adapter_dir is None:
        raise UserError(
            f"{run} has no adapter to export (no adapter/ directory); pass a training run, a checkpoint-N "
            "directory or a QPiSSA directory made by `qpissa convert`"
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output {out_dir} already exists; remove it or choose another OUT")
    residual = Residual(source.base_dir)
    trained = read_adapter(source.adapter_dir)
    _check_fits(trained, residual)
    if settings.to is ExportKind.LORA:
        from qpissa.export_lora import check_lora_inputs

        lora_inputs = check_lora_inputs(source, residual, trained, settings)
    dtype = _resolve_dtype(settings, residual.reader.config)

    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    bar = tqdm(total=len(trained.shapes), unit="matrix", desc=f"export {settings.to.value}",
               disable=None if show_progress else True)  # fmt: skip
    try:
        if settings.to is ExportKind.MERGED:
            details = _write_merged(residual, trained, partial, dtype, settings.shard_size_mb or 2048, bar)
        else:
            from qpissa.export_lora import write_lora

            details = write_lora(residual, trained, lora_inputs, partial, dtype, settings.rank, bar)
        bar.close()
        write_seconds, write_peak_mb = time.perf_counter() - started, peak_rss_mb()
        report = {
            "kind": settings.to.value,
            "source": {
                "run": str(run),
                "base_dir": str(source.base_dir),
                "adapter_dir": str(source.adapter_dir),
            },
            "settings": to_dict(settings),
            "dtype": str(dtype).removeprefix("torch."),
            "matrices": len(trained.shapes),
            "details": details,
            "verify": verify_export(source, partial, details) if settings.verify else None,
            "write_seconds": write_seconds,
            "peak_rss_mb_write": write_peak_mb,  # before --verify loads models
            "seconds": time.perf_counter() - started,
            "versions": {"qpissa": qpissa.__version__, "torch": torch.__version__},
        }
        if settings.to is ExportKind.LORA:
            from qpissa.export_lora import write_readme

            write_readme(partial, report)
        write_json(partial / EXPORT_REPORT, report)
    except BaseException:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return report


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read a PEFT LoRA adapter's config and tensor shapes (not its values).

    Raises:
        UserError: not a plain LoRA (DoRA, per-module ranks, extra trained tensors), or a corrupt adapter.
    """
    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [
        key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)
    ]
    if config.get("peft_type") != "LORA" or unsupported:
        what = ", ".join(unsupported) or f"peft_type {config.get('peft_type')}"
        raise UserError(
            f"{adapter_dir} is not a plain LoRA adapter ({what}); qpissa exports plain LoRA adapters only"
        )
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    other = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
            match = _ADAPTER_KEY.match(key)
            if match is None:
                other.append(key)
                continue
            factors.setdefault(match[1], {})[match[2]] = tuple(f.get_slice(key).get_shape())
    if other:
        raise UserError(
            f"{adapter_dir} holds tensors other than LoRA factors ({', '.join(other[:3])}); "
            "qpissa cannot export them"
        )
    rank = config["r"]
    shapes = {}
    for module, pair in sorted(factors.items()):
        a_shape, b_shape = pair.get("A"), pair.get("B")
        if a_shape is None or b_shape is None or a_shape[0] != rank or b_shape[1] != rank:
            raise UserError(
                f"{adapter_dir}: {module} has lora_A {a_shape} and lora_B {b_shape}, not [r={rank}, in] and "
                "[out, r]; the adapter is corrupt, export another checkpoint"
            )
        shapes[module] = (b_shape[0], a_shape[1])
    alpha = float(config["lora_alpha"])
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return Adapter(path=adapter_dir, config=config, rank=rank, scale=scale, shapes=shapes)


def _check_fits(adapter: Adapter, residual: Residual) -> None:
    """Every adapted module exists in the residual with the adapter's `(out, in)`."""
    wrong = []
    for module, shape in adapter.shapes.items():
        found = residual.shape(module)
        if found != shape:
            wrong.append(f"{module} (adapter {list(shape)}, residual {list(found) if found else 'missing'})")
    if wrong:
        raise UserError(
            f"adapter {adapter.path} does not fit the model in {residual.reader.model_dir}: "
            f"{', '.join(wrong[:3])}{' …' if len(wrong) > 3 else ''}; "
            "the run was trained on another QPiSSA directory"
        )


def _resolve_dtype(settings: ExportSettings, config: dict) -> torch.dtype:
    if settings.dtype is not OutputDtype.AUTO:
        return getattr(torch, settings.dtype.value)
    if settings.to is ExportKind.LORA:
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    return getattr(torch, name) if name in ("bfloat16", "float16", "float32") else torch.bfloat16


def _write_merged(
    residual: Residual, adapter: Adapter, partial: Path, dtype: torch.dtype, shard_size_mb: int, bar: tqdm
) -> dict:
    """Write `deq(Q) + s·B'·A'` for adapted layers, every other tensor cast to `dtype`, config, side files."""
    reader = residual.reader
    shards = _ShardedWriter(partial, shard_size_mb * 1_000_000)
    for name in reader.names():
        if residual.is_quant_aux(name):
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (module in adapter.shapes or module in residual.quantized):
            W = residual.weight(module)  # [out, in] float32
            if module in adapter.shapes:
                A, B = adapter.factors(module)  # [r, in], [out, r]
                W = W + adapter.scale * (B @ A)  # merge in float32, round once
                bar.update(1)
            shards.add(name, W.to(dtype))
        else:
            tensor = reader.read(
                name
            )  # embeddings (tied lm_head included), norms: unchanged but for the dtype
            shards.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    files = shards.close()
    config = {key: value for key, value in reader.config.items() if key != "quantization_config"}
    config["dtype"] = str(dtype).removeprefix("torch.")
    write_json(partial / "config.json", config)
    copy_side_files(reader.model_dir, partial)
    for path in partial.glob("qpissa_*.json"):  # our reports describe the QPiSSA dir, not this model
        path.unlink()
    return {"shards": files, "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}


class _ShardedWriter:
    """Shards of at most `limit` bytes, named `model-0000k-of-0000n.safetensors` once their count is known."""

    def __init__(self, out_dir: Path, limit: int) -> None:
        self.out_dir, self.limit = out_dir, limit
        self.parts: list[tuple[Path, list[str]]] = []
        self.writer: SafetensorsWriter | None = None
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.writer is None or (self.size and self.size + nbytes > self.limit):
            self._close_current()
            path = self.out_dir / f"part-{len(self.parts) + 1:05d}.safetensors"
            self.writer, self.size = SafetensorsWriter(path), 0
            self.parts.append((path, []))
        self.writer.add(name, tensor)
        self.parts[-1][1].append(name)
        self.size += nbytes

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names and write the index; return the names."""
        self._close_current()
        count = len(self.parts)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        weight_map, total = {}, 0
        for (path, keys), final in zip(self.parts, names, strict=True):
            path.rename(self.out_dir / final)
            total += (self.out_dir / final).stat().st_size
            weight_map.update(dict.fromkeys(keys, final))
        if count > 1:
            write_json(
                self.out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        return names

    def _close_current(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _quant_state_json(blob: torch.Tensor) -> dict:
    return json.loads(bytes(blob.numpy()).decode())


def export_summary(report: dict, out_dir: Path) -> str:
    """What was written and how close it is to the trained model, for the terminal."""
    verify = report["verify"]
    check = "not verified (--no-verify)"
    if verify is not None:
        check = (f"vs trained model on {verify['tokens']} tokens: max |Δlogit| {verify['max_abs_diff']:.3g}, "
                 f"mean {verify['mean_abs_diff']:.3g}, KL {verify['kl_mean']:.3g}")  # fmt: skip
    if report["kind"] == ExportKind.MERGED.value:
        return f"merged {report['matrices']} matrices into a {report['dtype']} model -> {out_dir}; {check}"
    from qpissa.export_lora import lora_summary

    details = report["details"]
    head = f"rank-{details['rank']} LoRA for {details['base_model']} -> {out_dir}; {check}"
    return f"{head}\n\n{lora_summary(report)}"
