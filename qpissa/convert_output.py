"""The QPiSSA directory being written: built in `OUT.partial/`, recorded shard by shard, moved into place.

`convert` decides what goes in; this module decides where and how: the shard plan, the resume record,
config.json's `quantization_config`, the adapter parts joined into one PEFT adapter, the shard index.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.architecture import Architecture
from qpissa.artifacts import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    CALIBRATION_DIR,
    CONFIG_NAME,
    FIDELITY_NAME,
    PROGRESS_NAME,
    REPORT_NAME,
    partial_dir,
    read_json,
    read_report,
)
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, copy_tensors, shard_names, write_json
from qpissa.convert_settings import ConvertSettings
from qpissa.options import from_dict
from qpissa.outputs import check_not_current, check_only_own, check_replaceable, files_in, replace_dir
from qpissa.run_marker import as_recorded
from qpissa.safetensors_file import read_header
from qpissa.stored import ADAPTER_KEY, adapter_key, write_lora_config
from qpissa.targets import module_type

log = logging.getLogger(__name__)


def plan_shards(
    reader: CheckpointReader, targets: set[str], blocksize: int, double_quant: bool, shard_size_mb: float
) -> list[tuple[str, list[str]]]:
    """Split the tensors into output shards of at most `shard_size_mb`, from shapes alone (deterministic).

    Returns:
        `(file name, tensor names)` per shard, in the HF naming scheme (`model-00001-of-00003.safetensors`).
    """
    limit = shard_size_mb * 1_000_000
    shards: list[list[str]] = [[]]
    size = 0
    for name in reader.names():
        if name.endswith(".weight") and name.removesuffix(".weight") in targets:
            numel = math.prod(reader.shape(name))
            nbytes = numel // 2 + numel // blocksize * (1 if double_quant else 4)  # codes + absmax
        else:
            nbytes = reader.nbytes(name)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return list(zip(shard_names(len(shards)), shards, strict=True))


def check_overwritable(out_dir: Path) -> None:
    """`--overwrite` replaces a QPiSSA directory, and only what its conversion wrote there.

    Raises:
        UserError: OUT is not a QPiSSA directory, or holds files or folders its conversion did not write.
    """
    check_replaceable(out_dir, "OUT", (REPORT_NAME,), "a QPiSSA directory")
    if not out_dir.is_dir():
        return
    ours = {PROGRESS_NAME, FIDELITY_NAME, f"{FIDELITY_NAME}.tmp"}  # and the record `compare` keeps there
    check_only_own(out_dir, REPORT_NAME, ours, {ADAPTER_DIR}, "conversion")


def written_files(partial: Path) -> list[str]:
    """The finished conversion's files, as its report records them for `--overwrite`'s check (the resume
    record and the calibration's scratch folder are removed once it is in place)."""
    kept = [name for name in files_in(partial) if not name.startswith(f"{CALIBRATION_DIR}/")]
    return sorted({*kept, REPORT_NAME} - {PROGRESS_NAME})


def prepare_output(out_dir: Path, fingerprint: dict, *, resume: bool, overwrite: bool) -> dict | None:
    """Check the output location and return the progress record to continue from.

    Returns:
        The progress record (empty for a fresh start), or None when `resume` finds `out_dir` already
        finished with the same fingerprint.

    Raises:
        UserError: an occupied output, an interrupted one without `--resume`, other settings on resume.
    """
    check_not_current(out_dir, "OUT")
    partial = partial_dir(out_dir)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} is a file; choose a directory path")
    if resume and (partial / PROGRESS_NAME).is_file():
        fix = "it records an interrupted conversion: use --overwrite to start over"
        progress = read_json(partial / PROGRESS_NAME, fix, required=("fingerprint", "shards", "seconds"))
        _check_same_checkpoint(progress["fingerprint"], fingerprint, f"the conversion in {partial} started")
        started, now = _comparable(progress["fingerprint"]), _comparable(fingerprint)
        if started != as_recorded(now, started):
            differences = _differences(progress["fingerprint"], fingerprint, started, now)
            raise UserError(
                f"{partial} was started with other settings ({differences}); rerun with the same options, "
                "or use --overwrite to start over"
            )
        check_overwritable(out_dir)  # finished, the resumed conversion replaces OUT as --overwrite does
        damaged = f"{partial} holds an interrupted conversion: use --overwrite to start over"
        for entry in progress["shards"]:  # checked now, not once every other shard is written
            shard = partial / entry["file"]
            if not shard.is_file():
                raise UserError(f"{shard}, written before the interruption, is missing; {damaged}")
            read_header(shard, damaged)
        return progress
    if resume and (out_dir / REPORT_NAME).is_file():
        recorded = read_report(out_dir)["fingerprint"]
        _check_same_checkpoint(recorded, fingerprint, f"{out_dir} was converted", finished=True)
        resolved, now = _comparable(recorded), _comparable(fingerprint)
        if resolved == as_recorded(now, resolved):
            return None
        differences = _differences(recorded, fingerprint, resolved, now)
        raise UserError(
            f"{out_dir} holds a finished conversion with other settings ({differences}); use --overwrite to "
            "replace it"
        )
    if resume and not partial.exists():
        log.info("%s holds no interrupted conversion: --resume starts it from the beginning", partial)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        check_replaceable(out_dir, "OUT", (REPORT_NAME,), "a QPiSSA directory")  # else --overwrite is refused
        raise UserError(
            f"output {out_dir} exists and is not empty; pass --overwrite to replace it, or another OUT"
        )
    unknown = partial.is_dir() and not (partial / PROGRESS_NAME).is_file() and any(partial.iterdir())
    if unknown or (partial.exists() and not partial.is_dir()):  # the user's, not an interrupted conversion
        raise UserError(
            f"{partial} exists and holds no interrupted conversion (no {PROGRESS_NAME}), so it is not "
            "removed; move it away or choose another OUT"
        )
    if partial.exists() and not overwrite and not resume:
        raise UserError(
            f"{partial} holds an interrupted conversion; add --resume to continue it "
            "or --overwrite to start over"
        )
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    progress = {"fingerprint": fingerprint, "shards": [], "seconds": 0.0}
    write_json(partial / PROGRESS_NAME, progress)
    return progress


class ChangedCheckpoint(UserError):
    """MODEL's files changed since a recorded conversion read them (`what`: which, and since when)."""

    def __init__(self, what: str, why: str, redo: str) -> None:
        super().__init__(f"{what}; {why}: use --overwrite to {redo}")
        self.what = what


def _check_same_checkpoint(recorded: dict, current: dict, since: str, finished: bool = False) -> None:
    """The files of MODEL (`CheckpointReader.file_stats`) are those the recorded conversion read: resuming
    from rewritten weights would mix the two versions in one output, and a finished one holds the old.

    Raises:
        ChangedCheckpoint: naming the files whose size or modification time changed; the fix is --overwrite.
    """
    if recorded.get("model") != current["model"] or "checkpoint" not in recorded:
        return  # another MODEL (`_differences` says so), or recorded before qpissa kept the files' stats
    before, now = recorded["checkpoint"], current["checkpoint"]
    changed = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
    if changed:
        files = ", ".join(changed)
        what = f"{current['model']} changed since {since} ({files}: another size or modification time)"
        if finished:
            raise ChangedCheckpoint(what, "it holds a conversion of the earlier files", "convert it again")
        raise ChangedCheckpoint(what, "resuming would mix the weights of both versions", "start over")


def _comparable(fingerprint: dict) -> dict:
    """A fingerprint as every spelling of one conversion shares it: its settings' defaults resolved
    (`--iters 5` is the default's conversion), and no --calib path where the hash of the tokens drawn pins
    the data (`data.jsonl` and `/home/me/data.jsonl` are one file). Settings these cannot read (another
    version's) stay as written."""
    try:
        settings = from_dict(ConvertSettings, fingerprint["settings"]).resolved_dict()
    except (UserError, KeyError, TypeError, AttributeError):
        return fingerprint
    settings.pop("workers")
    if "calibration" in fingerprint:
        settings.pop("calib")
    return {**fingerprint, "settings": {k: getattr(v, "value", v) for k, v in settings.items()}}


def _differences(recorded: dict, current: dict, *resolved: dict) -> str:
    """What differs between two conversions' fingerprints, as the user sets it (`--rank, --calib data`);
    given the `resolved` pair (`_comparable`), what differs both as given and as resolved (a default that
    follows another setting, --alpha's r, is not named)."""
    names = _named(recorded, current)
    if resolved:
        differing = _named(*resolved)
        names = [name for name in names if name in differing] or differing
    return ", ".join(names)


def _named(recorded: dict, current: dict) -> list[str]:
    names = []
    for key in sorted(set(recorded) | set(current)):
        before, now = recorded.get(key), current.get(key)
        if before == now:
            continue
        if key in ("settings", "calibration") and isinstance(before, dict) and isinstance(now, dict):
            changed = sorted(name for name in set(before) | set(now) if before.get(name) != now.get(name))
            if key == "settings":
                names += [f"--{name.replace('_', '-')}" for name in changed]
            else:  # the tokens drawn, or dtypes chosen for this device
                names += [_CALIBRATION_PARTS.get(name, f"calibration {name} dtype") for name in changed]
        else:
            names.append({"model": "MODEL", "sketch": "--sketch-dtype auto as resolved here"}.get(key, key))
    return names


_CALIBRATION_PARTS = {"sha256": "the --calib data's contents"}


def record_shard(partial: Path, progress: dict, shard_file: str, layers: list[dict]) -> None:
    """Record a finished shard and its matrices' metrics: a resume starts after it."""
    progress["shards"].append({"file": shard_file, "layers": layers})
    write_json(partial / PROGRESS_NAME, progress)


def write_config(
    reader: CheckpointReader,
    architecture: Architecture,
    partial: Path,
    targets: set[str],
    double_quant: bool,
    compute_dtype: torch.dtype,
    quant_storage: torch.dtype,
) -> None:
    """The original config plus the `quantization_config` that makes transformers load the stored codes.

    Every layer transformers would turn into `Linear4bit` but the targets is listed in
    `llm_int8_skip_modules` under the model's name for it: lm_head (stored or tied), untargeted layers.
    """
    from transformers import BitsAndBytesConfig

    targeted = {architecture.linears[name].module for name in targets}
    skip = sorted(name for name in architecture.quantizable if name not in targeted)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
        llm_int8_skip_modules=skip,
    ).to_dict()
    write_json(partial / CONFIG_NAME, {**reader.config, "quantization_config": quantization})


def adapter_part(partial: Path, shard_file: str) -> Path:
    """The adapter factors of one output shard, kept apart until `write_adapter` joins them."""
    return partial / f"adapter-{shard_file}"


def write_adapter(
    architecture: Architecture,
    partial: Path,
    shard_files: list[str],
    targets: set[str],
    rank: int,
    alpha: float,
    out_dir: Path,
) -> None:
    """Join the per-shard adapter parts into a PEFT LoRA adapter (`init_lora_weights: true`, §4).

    The parts name each factor after the checkpoint's tensor; PEFT names it after the model's module,
    which differs where transformers renames tensors at load (a base-model prefix, for instance).
    """
    model_names = architecture.model_names()

    def model_key(key: str) -> str:
        module, factor = ADAPTER_KEY.match(key).groups()
        return adapter_key(model_names[module], factor)

    adapter_dir = partial / ADAPTER_DIR
    parts = [adapter_part(partial, shard_file) for shard_file in shard_files]
    # a finish stopped after this (a failed rename into OUT, then --resume) joined and removed the parts
    joined = (adapter_dir / ADAPTER_WEIGHTS).is_file() and not all(part.is_file() for part in parts)
    if not joined:
        adapter_dir.mkdir(exist_ok=True)
        writer = SafetensorsWriter(adapter_dir / ADAPTER_WEIGHTS)
        for part in parts:
            copy_tensors(part, writer, model_key)
        writer.close()
    for part in parts:  # only once the adapter is whole: until then a resumed finish joins them again
        part.unlink(missing_ok=True)
    target_modules = peft_target_modules(sorted(model_names[name] for name in targets), architecture)
    write_lora_config(
        adapter_dir, rank, alpha, target_modules, str(out_dir.resolve()), architecture.task_type,
        any(architecture.linears[name].transposed for name in targets),  # PEFT's fan_in_fan_out
    )  # fmt: skip


def peft_target_modules(modules: list[str], architecture: Architecture) -> list[str]:
    """PEFT's `target_modules` for exactly `modules` (model names): their types (`q_proj`) where every
    layer of those types is among them, as after all-linear, and no tensor kept unquantized is named like
    them; else the modules' own names, so that PEFT adapts nothing the conversion did not decompose (PEFT
    0.22 adapts MoE experts merged at load, Qwen2-MoE's `experts.down_proj`, for the type `down_proj`)."""
    types = {module_type(name) for name in modules}
    same_type = [name for name in architecture.modules if module_type(name) in types]
    kept = [name for names in architecture.kept.values() for name in names]
    clash = any(part in types for name in kept for part in name.split("."))
    return sorted(types) if sorted(same_type) == sorted(modules) and not clash else modules


def move_into_place(partial: Path, out_dir: Path) -> None:
    """Make the finished directory appear under its final name, then drop the resume record.

    `replace_dir` swaps an earlier OUT (--overwrite) out in one step, so a kill leaves the old OUT or the
    new one, never neither; and until the rename succeeds `progress.json` stays, so a failed one leaves
    an `OUT.partial/` that `--resume` finishes.
    """
    replace_dir(partial, out_dir)
    (out_dir / PROGRESS_NAME).unlink(missing_ok=True)
