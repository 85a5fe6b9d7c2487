"""Which matrices of a checkpoint get decomposed: `--targets` resolved against the checkpoint's own
tensor names and the model transformers builds for its config (`architecture.py`), checked before
anything is written; and which matrices stay unquantized whatever the targets, said rather than skipped."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from qpissa import UserError
from qpissa.architecture import Architecture, read_architecture
from qpissa.checkpoint import QUANTIZED_KEY_MARKERS, CheckpointReader
from qpissa.convert_settings import ALL_LINEAR, BLOCKSIZES
from qpissa.nf4 import cpu_decodes_by_rows

log = logging.getLogger(__name__)

CPU_KERNEL_BLOCK_N = 32
# model types whose out_proj / conv1d layers PEFT 0.22 refuses to adapt (`_check_lora_target_modules_mamba`)
PEFT_MAMBA_TYPES = {"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"}
PEFT_MAMBA_REFUSED = {
    "out_proj",
    "conv1d",
}  # bitsandbytes' packed CPU kernel takes out_features in blocks of 32 rows


@dataclass(frozen=True)
class TargetPlan:
    """`--targets` resolved against a checkpoint.

    Attributes:
        names: checkpoint module names to decompose (their weights are `<name>.weight`), sorted.
        architecture: the checkpoint's model: names there, `Conv1D` layers, its Auto class.
    """

    names: list[str]
    architecture: Architecture

    @property
    def transposed(self) -> set[str]:
        """Targets stored `[in, out]` (GPT-2's `Conv1D`): decomposed as their transpose `[out, in]`."""
        return {name for name in self.names if self.architecture.linears[name].transposed}


def plan_targets(spec: str, reader: CheckpointReader, rank: int, *, calibrated: bool = False) -> TargetPlan:
    """Resolve `--targets` against the checkpoint; refuse what cannot be converted, before any write.

    Args:
        spec: `all-linear` (every Linear layer but the output layer and those with a side of 1, which have no
            low-rank part), or comma-separated module names or
            name suffixes (`q_proj,v_proj`), matched against the checkpoint's and the model's names.
        reader: the checkpoint; its weights must exist, be full precision and be larger than `rank`.
        rank: adapter rank; every target needs `rank < min(out, in)`.
        calibrated: `--calib` is set: the model's decoder layers must run from the checkpoint's tensors.

    Raises:
        UserError: no target at all, a target that matches nothing (listing what exists), the output
            layer, a quantized weight, a matrix too small for the rank, or a calibration the
            architecture cannot run.
    """
    architecture = read_architecture(reader)
    candidates = {name: layer.shape for name, layer in architecture.linears.items()}
    if spec == ALL_LINEAR:
        targets = [name for name in candidates if name != architecture.output]
        vectors = [name for name in targets if min(candidates[name]) == 1]  # a gate to one scalar, say
        if vectors and len(vectors) < len(targets):
            log.info(
                "all-linear leaves out %d Linear layer(s) with a side of 1 (%s %s%s): no low-rank part to "
                "take out, kept in 16 bits", len(vectors), vectors[0], candidates[vectors[0]],
                " …" if len(vectors) > 1 else "",
            )  # fmt: skip
            targets = [name for name in targets if name not in vectors]
    else:
        targets = _match(spec, architecture)
    targets = _without_peft_refused(targets, reader.config.get("model_type"), explicit=spec != ALL_LINEAR)
    if not targets:
        raise UserError(_nothing_to_convert(reader, architecture))
    _check_full_precision(targets, reader)
    too_small = [f"{name} {candidates[name]}" for name in targets if rank >= min(candidates[name])]
    if too_small:
        raise UserError(_too_small(spec, rank, too_small, targets, candidates))
    if calibrated:
        _check_calibration(architecture, targets)
    return TargetPlan(sorted(targets), architecture)


def resolve_targets(spec: str, reader: CheckpointReader, rank: int) -> list[str]:
    """Module names to decompose for `--targets` (`plan_targets(...).names`)."""
    return plan_targets(spec, reader, rank).names


def kept_matrices(reader: CheckpointReader, architecture: Architecture | None = None) -> list[dict]:
    """Matrices that stay unquantized whatever the targets, and tensors of any shape the model does not load
    (copied unchanged), one entry per reason (qpissa_report.json's `kept_unquantized`): `{"reason", "tensors":
    [checkpoint names], "params": total elements}`. Norms and biases the model loads are not listed."""
    kept = (architecture or read_architecture(reader)).kept
    return [
        {"reason": reason, "tensors": names, "params": sum(math.prod(reader.shape(n)) for n in names)}
        for reason, names in kept.items()
    ]


def check_quant_storage(plan: TargetPlan, storage_width: int, storage: str) -> None:
    """Refuse, before any write, a `--quant-storage` of `storage_width` bytes that does not divide a target's
    packed codes (two per byte): bitsandbytes stores them as whole elements of that dtype.

    Raises:
        UserError: naming the first such target, its shape and its byte count.
    """
    for name in plan.names:
        shape = plan.architecture.linears[name].shape
        code_bytes = (math.prod(shape) + 1) // 2
        if code_bytes % storage_width:
            raise UserError(
                f"target {name} {tuple(shape)} has {code_bytes} bytes of NF4 codes, not a multiple of "
                f"{storage}'s {storage_width}, so it cannot be stored as {storage}; convert with "
                "--quant-storage uint8, or leave it out of --targets"
            )


def warn_cpu_kernel(plan: TargetPlan, blocksize: int) -> None:
    """One warning naming the targets bitsandbytes' packed CPU inference kernel rejects, and the fix.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weight for a faster kernel under `torch.no_grad()`
    in eval mode; that kernel needs out_features in blocks of 32 rows and in_features in whole NF4 blocks.
    """
    shapes = {name: plan.architecture.linears[name].shape for name in plan.names}
    rejected = [
        f"{name} {list(shape)}"
        for name, shape in shapes.items()
        if shape[0] % CPU_KERNEL_BLOCK_N or shape[1] % blocksize
    ]
    if rejected:
        log.warning(
            "%d target(s) will not run under bitsandbytes' packed CPU inference kernel (CPUs with "
            "AVX512-BF16, eval mode under torch.no_grad(): out_features must be a multiple of %d and "
            "in_features of --blocksize %d): %s%s; qpissa's own commands avoid that kernel; with plain "
            "transformers set `support_avx512bf16_for_cpu = False` on every Linear4bit (README, Known "
            "limitations), or leave these layers out with --targets",
            len(rejected), CPU_KERNEL_BLOCK_N, blocksize, ", ".join(rejected[:3]),
            " …" if len(rejected) > 3 else "",
        )  # fmt: skip


def check_cpu_decoding(plan: TargetPlan, blocksize: int, device_type: str) -> None:
    """Targets whose NF4 codes bitsandbytes' CPU kernel decodes with the wrong scales (see
    `nf4.cpu_decodes_by_rows`): refused on a CPU, where every later command would run on that decoding
    (qpissa's own refuse such a directory there: `loading.refuse_cpu_misdecoded`); on a GPU the codes
    decode as written, and a warning says the directory must not run on a CPU.

    Raises:
        UserError: on a CPU, naming the widths and a --blocksize that fits every target.
    """
    shapes = {name: plan.architecture.linears[name].shape for name in plan.names}
    widths = sorted({shape[1] for shape in shapes.values()})
    wrong = [width for width in widths if cpu_decodes_by_rows(width, blocksize)]
    if not wrong:
        return
    fitting = [size for size in BLOCKSIZES if not any(cpu_decodes_by_rows(width, size) for width in widths)]
    # the nearest that decodes right, finer blocks first (a coarser one raises the NF4 error)
    finer = [size for size in fitting if size <= blocksize]
    nearest = finer[-1] if finer else fitting[0] if fitting else None
    fix = f"--blocksize {nearest}" if nearest else "another --blocksize"
    layers = [name for name, shape in shapes.items() if shape[1] in wrong]
    shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    problem = (
        f"bitsandbytes' CPU kernel decodes NF4 weights {', '.join(map(str, wrong))} wide (not a multiple of "
        f"--blocksize {blocksize}) with the wrong block scales ({shown})"
    )
    if device_type == "cpu":
        raise UserError(f"{problem}; convert with {fix}, or leave those layers out with --targets")
    log.warning(
        "%s: this directory is right on a GPU but must not run on a CPU (or convert with %s)", problem, fix
    )


def module_type(name: str) -> str:
    """PEFT's module type of a matrix, which `target_modules` matches: the last part of its name (`q_proj`).

    The report's rows tell roles apart further (`roles.role_labels`: GPT-2's `attn.c_proj`, `mlp.c_proj`).
    """
    return name.rsplit(".", 1)[-1]


def _match(spec: str, architecture: Architecture) -> list[str]:
    """Checkpoint module names matching `--targets` by their stored or their model name."""
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    if not wanted:
        raise UserError("--targets is empty; use all-linear or names such as q_proj,v_proj")
    if ALL_LINEAR in wanted:
        raise UserError(f"--targets {spec}: {ALL_LINEAR} stands alone; use it by itself, or list names only")
    names = {name: (name, layer.module) for name, layer in architecture.linears.items()}
    output = architecture.output
    if output is not None and any(_matches(alias, w) for alias in names[output] for w in wanted):
        raise UserError(
            f"--targets includes the output layer {output}; it is often tied to the embeddings and "
            "is not quantized: leave it out"
        )
    targets = [
        name for name, aliases in names.items() if any(_matches(a, w) for a in aliases for w in wanted)
    ]
    unmatched = [w for w in wanted if not any(_matches(a, w) for aliases in names.values() for a in aliases)]
    if unmatched:
        raise UserError(_unmatched(unmatched, architecture))
    return targets


def _unmatched(unmatched: list[str], architecture: Architecture) -> str:
    for reason, tensors in architecture.kept.items():
        kept = [w for w in unmatched if any(_matches(t.removesuffix(".weight"), w) for t in tensors)]
        if kept:
            return (
                f"--targets {','.join(kept)} names matrices that stay unquantized in this "
                f"{architecture.name} ({reason}); leave them out of --targets"
            )
    types = sorted({module_type(name) for name in architecture.linears if name != architecture.output})
    return (
        f"--targets {','.join(unmatched)} matches no Linear layer of this {architecture.name}; its Linear "
        f"layers are {','.join(types) or 'none'} (or use all-linear)"
    )


def _nothing_to_convert(reader: CheckpointReader, architecture: Architecture) -> str:
    kept = "; ".join(
        f"{len(t)} tensors kept as {reason.split(':')[0]}" for reason, t in architecture.kept.items()
    )
    return (
        f"{reader.model_dir} ({architecture.name}) has no Linear layer that bitsandbytes can hold in 4 bits "
        f"besides its output layer{f' ({kept})' if kept else ''}, so there is nothing to convert; "
        "QPiSSA needs a model built from nn.Linear (or GPT-2 Conv1D) layers"
    )


def _too_small(
    spec: str, rank: int, too_small: list[str], targets: list[str], candidates: dict[str, tuple[int, int]]
) -> str:
    narrowest = min(targets, key=lambda name: min(candidates[name]))
    smallest = min(candidates[narrowest])
    fine = sorted({module_type(t) for t in targets if rank < min(candidates[t])})
    fix = (
        f"use --rank {smallest - 1} at most (the smallest side of the targets is {smallest}, "
        f"{module_type(narrowest)}'s {candidates[narrowest]}; a quarter of it is usual)"
    )
    if smallest < 2:  # a side of 1: no rank fits, whatever --rank says
        fix = f"no rank fits {module_type(narrowest)}'s {candidates[narrowest]}: leave those layers out"
        fix += f" with --targets {','.join(fine)}" if fine else " of --targets"
    elif fine and len(fine) < len({module_type(t) for t in targets}):
        fix += f", or leave them out with --targets {','.join(fine)}"
    shown = ", ".join(too_small[:3]) + (" …" if len(too_small) > 3 else "")
    if len(too_small) > 1:
        shown = f"{len(too_small)} of the {len(targets)} targets ({shown})"
    return f"--rank {rank} is not below min(out, in) of {shown} (--targets {spec}); {fix}"


def _check_calibration(architecture: Architecture, targets: list[str]) -> None:
    """`--calib` runs decoder layers built from the checkpoint's own tensors, hooking `nn.Linear` inputs."""
    problem = None
    if not architecture.causal_lm:
        problem = (
            f"it runs causal language models, and this is a {architecture.name} ({architecture.auto_class})"
        )
    elif any(architecture.linears[name].transposed for name in targets):
        problem = (
            "it collects the inputs of nn.Linear layers, and this model's targets are GPT-2 Conv1D layers"
        )
    elif architecture.renamed:
        stored, model = next(iter(architecture.renamed.items()))
        problem = (
            "it loads each decoder layer under the model's own tensor names, and transformers renames or "
            f"merges {len(architecture.renamed)} of this checkpoint's tensors at load ({stored} -> {model})"
        )
    if problem is not None:
        raise UserError(f"--calib cannot convert this model: {problem}; convert it without --calib")


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def _without_peft_refused(targets: list[str], model_type: str | None, explicit: bool) -> list[str]:
    """PEFT refuses a LoRA layer on a Mamba-style mixer's `out_proj` or `conv1d` (it would break the fused
    scan; `tuners_utils._check_lora_target_modules_mamba`), so no adapter of such a target could load:
    all-linear leaves them out, and naming one is refused."""
    if model_type not in PEFT_MAMBA_TYPES:
        return targets
    refused = [name for name in targets if name.rsplit(".", 1)[-1] in PEFT_MAMBA_REFUSED]
    if refused and explicit:
        raise UserError(
            f"PEFT loads no LoRA adapter on the {' or '.join(sorted(PEFT_MAMBA_REFUSED))} layers of a "
            f"{model_type} model ({refused[0]}{' …' if len(refused) > 1 else ''}); leave them out of "
            "--targets"
        )
    if refused:
        log.info("all-linear leaves out %d %s layer(s) (%s …): PEFT loads no LoRA adapter there, kept in 16 "
                 "bits", len(refused), model_type, refused[0])  # fmt: skip
    return [name for name in targets if name not in refused]


def _check_full_precision(targets: list[str], reader: CheckpointReader) -> None:
    int_weights = [t for t in targets if not reader.dtype_code(f"{t}.weight").startswith(("F", "BF"))]
    if reader.stores_quantized() or int_weights:
        method = (reader.config.get("quantization_config") or {}).get("quant_method")
        state = next((n for n in reader.names() if any(m in n for m in QUANTIZED_KEY_MARKERS)), None)
        stored = f"{int_weights[0]}.weight" if int_weights else None
        how = (
            method
            or (state and f"{state} is quantization state")
            or (stored and f"{stored} is stored as {reader.dtype_code(stored)}")
            or "config.json has a quantization_config"
        )
        raise UserError(
            f"{reader.model_dir} is already quantized ({how}); QPiSSA must decompose the full-precision "
            "weights: convert the original 16/32-bit checkpoint instead (the model it was quantized from)"
        )
