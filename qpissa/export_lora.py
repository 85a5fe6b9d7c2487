"""`qpissa export --to lora`: the trained model as a LoRA for the ORIGINAL model (REFERENCE.md §1).

On the original `W` the trained model is `W + ΔW` with `ΔW = s·(B'A' − BA) = s·[B', −B]·[A'; A]`, a LoRA of
rank 2r with r and alpha doubled (same scale); where the initial product BA is zero (QLoRA's B = 0) it is
`s·B'A'`, the trained adapter itself, of rank r. It differs from what was trained by the residual's NF4
error `W_res − deq(Q)`, which this module measures, matrix by matrix, and writes into the adapter's README.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qpissa import UserError
from qpissa.architecture import Architecture
from qpissa.artifacts import (
    ADAPTER_DIR,
    ADAPTER_README,
    ADAPTER_WEIGHTS,
    CONFIG_NAME,
    EXPORT_REPORT,
    REPORT_NAME,
    RUN_MARKER,
    ModelSource,
    has_adapter,
    read_report,
)
from qpissa.chat_template import TEMPLATE_NAME
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, read_config
from qpissa.console import lora_summary
from qpissa.settings import ExportSettings
from qpissa.stored import Adapter, Residual, adapter_key, read_adapter, write_lora_config

log = logging.getLogger(__name__)


@dataclass
class LoraInputs:
    """What a LoRA export needs beyond the trained adapter.

    Attributes:
        initial: the adapter as initialized by `qpissa convert` (B, A).
        original: the full-precision model the QPiSSA directory was converted from.
        method: the conversion's method (`qpissa`, `loftq`, `qlora`), for the README's words.
        zero_initial: every initial product B·A is zero (QLoRA): the LoRA is B', A' alone, of rank r.
    """

    initial: Adapter
    original: CheckpointReader
    method: str
    zero_initial: bool

    @property
    def exact_rank(self) -> int:
        """The rank of the exact change on the original: r where the initial adapter is zero, else 2r."""
        return self.initial.rank * (1 if self.zero_initial else 2)

    def original_weight(self, architecture: Architecture, module: str) -> torch.Tensor:
        """The original weight of adapted module `module` (a model name), float32 `[out, in]`."""
        stored = architecture.stored_names().get(module, module)
        return architecture.swap_layout(stored, self.original.read(f"{stored}.weight").float())


def check_lora_inputs(
    source: ModelSource,
    residual: Residual,
    trained: Adapter,
    settings: ExportSettings,
    architecture: Architecture,
) -> LoraInputs:
    """Find the initial adapter and the original model and check that they fit the trained adapter.

    Raises:
        UserError: no initial adapter or report, no original model, shapes that differ, an original model
            that is not the one converted (`original_model_dir`, `_check_converted_from`), or `--rank`
            above the exact rank (2r, or r from a zero initial adapter).
    """
    initial_dir = source.base_dir / ADAPTER_DIR  # the untrained B, A written by `qpissa convert`
    if not has_adapter(initial_dir):
        raise UserError(
            f"{source.base_dir} has no {ADAPTER_DIR}/ with the initial adapter B, A, which --to lora "
            "subtracts; point RUN at a run of a QPiSSA directory made by `qpissa convert`, or use --to merged"
        )
    initial = read_adapter(initial_dir)
    if initial.shapes != trained.shapes or initial.rank != trained.rank:
        raise UserError(
            f"the trained adapter {trained.path} (rank {trained.rank}) does not match the initial adapter "
            f"{initial_dir} (rank {initial.rank}); the run was trained from another QPiSSA directory"
        )
    if not (source.base_dir / REPORT_NAME).is_file():
        raise UserError(
            f"{source.base_dir} has no {REPORT_NAME}, which names the original model and the conversion's "
            "errors that --to lora needs; point RUN at a run of a QPiSSA directory made by `qpissa convert`, "
            "or use --to merged"
        )
    report = read_report(source.base_dir)
    recorded = Path(report["fingerprint"]["model"])
    original = CheckpointReader(original_model_dir(source.base_dir, recorded, settings.base))
    stored = architecture.stored_names()
    wrong = [
        module for module, shape in trained.shapes.items()
        if _stored_shape(original, architecture, stored.get(module, module)) != shape
    ]  # fmt: skip
    if wrong:
        raise UserError(
            f"{original.model_dir} is not the model {source.base_dir} was converted from ({wrong[0]} is "
            "missing or has another shape); pass the right one with --base DIR"
        )
    inputs = LoraInputs(initial, original, report["settings"]["method"], _zero_initial(initial))
    _check_converted_from(source.base_dir, report, residual, inputs, architecture)
    exact = inputs.exact_rank
    if settings.rank is not None and settings.rank > exact:
        named = "r" if inputs.zero_initial else "2r"
        raise UserError(
            f"--rank {settings.rank} is above the exact rank {named} = {exact}; use --rank ≤ {exact}"
        )
    return inputs


def _zero_initial(initial: Adapter) -> bool:
    """Every initial product B·A is zero (QLoRA's B = 0): then W_res = W, and the trained B', A' alone
    are the change on the original, exactly."""
    return all(not B.any() or not A.any() for A, B in map(initial.factors, initial.shapes))


# The conversion recorded each matrix's error ‖W − deq(Q) − s·B·A‖ against the W it was converted from
# (qpissa_report.json, err_fro): on that W it comes out again, to float rounding. On another model with
# the same shapes it is about ‖W' − W‖, of the order of ‖W‖ itself, ten times the NF4 error. Twice
# the recorded error is far above any rounding and far below such a model; three matrices across the
# depth (first, middle, last) show it at the cost of three matrix reads, whatever the model's size. A
# model that differs from W by less than its NF4 error (a light fine-tune of it) is not told apart.
WRONG_BASE_FACTOR = 2.0


def _check_converted_from(
    base_dir: Path, report: dict, residual: Residual, inputs: LoraInputs, architecture: Architecture
) -> None:
    """The original model must be the one `base_dir` was converted from: on another, the LoRA would add
    the trained change to weights it was never computed for.

    Raises:
        UserError: a probed matrix is much farther from deq(Q) + s·B·A than the conversion measured.
    """
    recorded = {layer["name"]: layer["err_fro"] for layer in report["layers"]}
    stored = architecture.stored_names()
    modules = sorted(module for module in inputs.initial.shapes if stored.get(module, module) in recorded)
    probes = dict.fromkeys(modules[i] for i in (0, len(modules) // 2, -1)) if modules else {}
    for module in probes:
        name = stored.get(module, module)
        A0, B0 = inputs.initial.factors(module)
        rebuilt = residual.weight(name) + inputs.initial.scale * (B0 @ A0)
        W = inputs.original_weight(architecture, module)
        error, norm = _sq(W - rebuilt) ** 0.5, max(_sq(W), 1e-30) ** 0.5
        if error > WRONG_BASE_FACTOR * recorded[name] + 1e-6 * norm:
            raise UserError(
                f"{inputs.original.model_dir} is not the model {base_dir} was converted from: its {module} "
                f"is {error / norm:.1%} of its norm away from deq(Q) + s·B·A, where the conversion measured "
                f"{recorded[name] / norm:.1%} on the original ({REPORT_NAME}); pass that one with --base DIR"
            )


def is_untrained(source: ModelSource) -> bool:
    """`source` is a QPiSSA directory with its own adapter, as `qpissa convert` initialized it."""
    return (
        source.adapter_dir is not None
        and source.adapter_dir.resolve() == (source.base_dir / ADAPTER_DIR).resolve()
    )


def check_trained(source: ModelSource) -> None:
    """`--to lora` exports what training changed: of a QPiSSA directory's own adapter, nothing."""
    if is_untrained(source):
        raise UserError(
            f"{source.base_dir} is a QPiSSA directory, not a training run: its adapter is the initial one, "
            "so its LoRA for the original model would be zero; export a run trained from it (or --to merged)"
        )


# what --base may name by mistake, told by the file that marks it: each holds a model made from a
# conversion (a merged export of a run holds the training already, which the LoRA would add twice), or none
_NOT_ORIGINAL = (
    (EXPORT_REPORT, "an export made by qpissa export"),
    (REPORT_NAME, "a QPiSSA directory made by qpissa convert"),
    (RUN_MARKER, "a training run"),
)


def original_model_dir(base_dir: Path, recorded: Path, override: Path | None) -> Path:
    """The full-precision model a QPiSSA directory was converted from: `--base`, else the one its report
    records (`recorded`).

    Raises:
        UserError: `--base` names a qpissa output (unless the conversion was made from it), or the model
            is missing or not a model directory (no config.json).
    """
    if override is None:
        path, fix = recorded, "pass it, where it is now, with --base DIR"
        named = f"the original model {path} (named by {base_dir / REPORT_NAME})"
    else:
        path, named = override, f"--base {override}"
        fix = f"--base must name the full-precision model {base_dir} was converted from ({recorded})"
        what = next((what for marker, what in _NOT_ORIGINAL if (path / marker).is_file()), None)
        if what is None and (path.parent / RUN_MARKER).is_file():
            what = f"a part of the training run {path.parent}"
        if what is not None and path.resolve() != recorded.resolve():  # not the export converted
            raise UserError(f"{named} is {what}, not an original model; {fix}")
    if not path.exists():
        raise UserError(f"{named} is missing; --to lora needs the original model: {fix}")
    if not (path / CONFIG_NAME).is_file():
        what = f"a directory without {CONFIG_NAME}" if path.is_dir() else "a file"
        raise UserError(f"{named} is {what}, not a model; {fix}")
    read_config(path)
    return path


def write_lora(
    residual: Residual,
    architecture: Architecture,
    trained: Adapter,
    inputs: LoraInputs,
    partial: Path,
    dtype: torch.dtype,
    rank: int | None,
    bar: tqdm,
) -> dict:
    """Write `s·[B', −B]·[A'; A]`, or `s·B'A'` from a zero initial adapter (re-truncated to `rank` if
    given) as a PEFT adapter; measure its distance.

    Returns:
        base_model, method, zero_initial, ranks, scale, and in Frobenius norm: `distance` (adapter on the
        original vs the trained weights), `residual_nf4_error` (`W_res − deq(Q)`), `truncation` (from
        `--rank`, or None).
    """
    s = trained.scale
    out_rank = rank or inputs.exact_rank
    sums = dict.fromkeys(("distance", "nf4", "weights", "delta", "dropped"), 0.0)
    worst, changed = 0.0, False
    writer = SafetensorsWriter(partial / ADAPTER_WEIGHTS)
    for module in sorted(trained.shapes):
        A1, B1 = trained.factors(module)  # A' [r, in], B' [out, r]
        A0, B0 = inputs.initial.factors(module)  # A [r, in], B [out, r]
        changed = changed or not (torch.equal(A1, A0) and torch.equal(B1, B0))
        if inputs.zero_initial:  # BA = 0: [B', −B]·[A'; A] = B'A', and B' alone has rank r
            A2, B2 = A1, B1
        else:
            A2 = torch.cat([A1, A0])  # [2r, in]
            B2 = torch.cat([B1, -(inputs.initial.scale / s) * B0], dim=1)  # [out, 2r]; -B when scales agree
        delta = s * (B2 @ A2)  # ΔW [out, in]
        if rank is not None:
            A2, B2, dropped = _truncate(A2, B2, rank)
            sums["dropped"] += s * s * dropped
        A2, B2 = A2.to(dtype), B2.to(dtype)
        W = inputs.original_weight(architecture, module)  # [out, in]
        deq = residual.weight(architecture.stored_names().get(module, module))
        trained_W = deq + s * (B1 @ A1)
        exported_W = W + s * (B2.float() @ A2.float())  # what PEFT computes from the stored factors
        distance = _sq(exported_W - trained_W)
        worst = max(worst, (distance / max(_sq(W), 1e-30)) ** 0.5)
        sums["distance"] += distance
        sums["nf4"] += _sq(W - inputs.initial.scale * (B0 @ A0) - deq)  # W_res − deq(Q)
        sums["weights"] += _sq(W)
        sums["delta"] += _sq(delta)
        writer.add(adapter_key(module, "A"), A2)
        writer.add(adapter_key(module, "B"), B2)
        bar.update(1)
    writer.close()
    base_model = inputs.original.model_dir.resolve()
    # same s = alpha / r as the trained adapter (2·alpha for 2r)
    write_lora_config(
        partial, out_rank, s * out_rank, trained.config["target_modules"], str(base_model),
        trained.config.get("task_type"), bool(trained.config.get("fan_in_fan_out")),
    )  # fmt: skip
    if not changed:  # a run stopped before its learning rate left 0: ΔW is rounding noise
        log.warning(
            "the adapter equals its initial one: training changed nothing (a learning rate still 0 at the "
            "last step?), so this LoRA adds only rounding noise to the original model"
        )
    norm = max(sums["weights"], 1e-30) ** 0.5
    truncation = None
    if rank is not None:  # ≤ 1 but for rounding, which dominates where ΔW is about 0
        relative = min(1.0, (sums["dropped"] / max(sums["delta"], 1e-30)) ** 0.5)
        truncation = {"rank": rank, "abs_fro": sums["dropped"] ** 0.5, "relative_to_delta_fro": relative}
    return {
        "base_model": str(base_model), "method": inputs.method, "zero_initial": inputs.zero_initial,
        "trained_rank": trained.rank, "rank": out_rank, "scale": s,
        "lora_alpha": s * out_rank,
        "distance": {"abs_fro": sums["distance"] ** 0.5, "relative_fro": sums["distance"] ** 0.5 / norm,
                     "max_matrix_relative_fro": worst},
        "residual_nf4_error": {"abs_fro": sums["nf4"] ** 0.5, "relative_fro": sums["nf4"] ** 0.5 / norm},
        "truncation": truncation,
    }  # fmt: skip


def write_readme(partial: Path, out_dir: Path, report: dict) -> None:
    """The adapter's README.md: how to load it from `out_dir` (where `partial` ends up), with the run's
    own chat template if it has one, why it has its rank, how far it is from the trained model."""
    base = report["details"]["base_model"]
    own_template = (partial / TEMPLATE_NAME).is_file()
    template = (
        f" The run trained with its own chat template, saved here as `{TEMPLATE_NAME}`: render prompts "
        "with it, not with the base tokenizer's template, as the code below does."
        if own_template
        else ""
    )
    text = (
        "# LoRA adapter exported by qpissa\n\n"
        f"A PEFT LoRA adapter of rank {report['details']['rank']} for the original model `{base}`, "
        f"exported from the QPiSSA run `{report['source']['run']}`. Load it with plain transformers + PEFT "
        "(the paths are where export wrote them; change them if you move the model or this adapter)."
        f"{template}\n\n```python\n{_loading_code(base, out_dir.resolve(), own_template)}```\n\n"
        f"{lora_summary(report)}\n"
    )
    (partial / ADAPTER_README).write_text(text)


def _loading_code(base: str, adapter: Path, own_template: bool) -> str:
    """Python loading the original model and the adapter, and with the run's own chat template (kept
    in the adapter folder, which holds no tokenizer) the base tokenizer set to use it."""
    lines = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{adapter}")',
    ]
    if own_template:
        lines[1] += ", AutoTokenizer"
        lines[:0] = ["from pathlib import Path", ""]
        lines += [
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
            f'tokenizer.chat_template = Path("{adapter / TEMPLATE_NAME}").read_text()  # the run\'s template',
        ]
    return "\n".join(lines) + "\n"


def _truncate(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of `B @ A` without forming it: QR of both factors, SVD of the small core.

    Args:
        A: `[k, in]`; B: `[out, k]`; rank ≤ k.

    Returns:
        `A_r [rank, in]`, `B_r [out, rank]`, and `Σ_{i>rank} σ_i²`, the dropped squared norm of `B @ A`.
    """
    Qb, Rb = torch.linalg.qr(B)  # [out, m], [m, k]
    Qa, Ra = torch.linalg.qr(A.T)  # [in, n], [n, k]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core [m, n] = U S Vh
    keep = min(rank, S.numel())
    root = S[:keep].sqrt()
    B_r = torch.zeros(B.shape[0], rank)
    A_r = torch.zeros(rank, A.shape[1])
    B_r[:, :keep] = (Qb @ U[:, :keep]) * root  # [out, keep]
    A_r[:keep] = root[:, None] * (Vh[:keep] @ Qa.T)  # [keep, in]
    return A_r, B_r, S[keep:].square().sum().item()


def _sq(E: torch.Tensor) -> float:
    return E.double().square().sum().item()


def _stored_shape(
    reader: CheckpointReader, architecture: Architecture, module: str
) -> tuple[int, ...] | None:
    """`(out, in)` of a stored module's weight (a `Conv1D`'s `[in, out]` turned around), or None."""
    name = f"{module}.weight"
    if name not in reader.location:
        return None
    shape = reader.shape(name)
    layer = architecture.linears.get(module)
    return tuple(shape[::-1]) if layer is not None and layer.transposed else shape
