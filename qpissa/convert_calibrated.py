"""The first phase of a calibrated conversion: decoder layer by layer, statistics H, then decompositions.

For layer i: load it alone from the checkpoint onto the conversion's device (a GPU runs the forwards
and the products of H, not only the fits), run the calibration hidden states through it while
collecting H = Σ xxᵀ / n of every target Linear's input, decompose those targets under H (several at a
time), spool the results to `OUT.partial/calibration/layer-i.safetensors`, and keep the layer's outputs
(from the original or the converted layer) as layer i+1's inputs. Memory holds one decoder layer and the
hidden states. After each layer the hidden states and the resume record are saved, so `--resume`
continues after the last finished layer; the second phase (`convert.py`) writes the output shards
from the spools in checkpoint order (DESIGN.md, "Calibrated conversion").
"""

from __future__ import annotations

import logging
import pickle
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from qpissa import UserError
from qpissa.artifacts import CALIBRATION_DIR, PROGRESS_NAME, ModelSource
from qpissa.calibration import CalibrationTokens, calibration_of
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, write_json
from qpissa.console import counted
from qpissa.convert_matrix import DecomposedMatrix, decompose_matrix, one_thread_per_matrix
from qpissa.convert_settings import ConvertSettings, MetricKind, Propagation
from qpissa.layer_stream import InputStatistics, first_layer_inputs, loaded_layer, open_stack, run_layer
from qpissa.loading import check_context, load_tokenizer
from qpissa.memory import return_freed_memory
from qpissa.methods import DecomposeSettings
from qpissa.nf4 import dequantize_stored
from qpissa.runtime import calibration_dtype, statistics_dtype
from qpissa.safetensors_file import read_header
from qpissa.stored import adapter_key

log = logging.getLogger(__name__)

HIDDEN_PREFIX = "hidden-"  # in OUT.partial/calibration/: hidden-I.pt holds layer I's inputs
BATCH_TOKENS = 1024  # calibration tokens per forward pass: activations stay small, products stay large


@dataclass
class CalibrationRun:
    """What the calibrated phase needs besides the checkpoint.

    Attributes:
        windows: int64 `[samples, seq_len]` calibration token ids.
        dtype: dtype of the forward passes (bf16 where the hardware multiplies it natively).
        statistics_dtype: dtype of the products that sum to H (`runtime.statistics_dtype`).
        propagate: where layer i+1's inputs come from.
        decompose: resolved decomposition settings (with `calibrated` set).
        metrics: weight-space norms to measure. seed: the conversion's seed.
        device: where the calibration pass runs and matrices are decomposed. workers: matrices
            decomposed at once.
    """

    windows: torch.Tensor
    dtype: torch.dtype
    statistics_dtype: torch.dtype
    propagate: Propagation
    decompose: DecomposeSettings
    metrics: MetricKind
    seed: int
    device: torch.device
    workers: int


def calibration_tokens(reader: CheckpointReader, settings: ConvertSettings) -> CalibrationTokens | None:
    """The calibration windows of `--calib`, read and checked before anything is written."""
    if settings.calibration is None:
        return None
    calibration = settings.calibration
    check_context(reader.model_dir, calibration["seq_len"], "--calib-seq-len")
    tokenizer = load_tokenizer(ModelSource(reader.model_dir, None))
    tokens = calibration_of(settings, tokenizer)
    drawn, seq_len = tokens.windows.shape
    general, reserved = tokens.general, calibration["samples"] - tokens.asked
    if tokens.available < tokens.asked:
        log.warning(
            "--calib %s holds %s of %d tokens, fewer than the %d it is asked for (--calib-samples %d%s): "
            "calibrating on all of them%s", settings.calib, counted(tokens.available, "window"), seq_len,
            tokens.asked, calibration["samples"],
            f", less {reserved} of qpissa's general prose" if reserved else "",
            f", with {general} of the general prose to keep its --calib-general share" if reserved else "",
        )  # fmt: skip
    log.info(
        "calibrating on %d windows of %d tokens: %d from %s%s",
        drawn, seq_len, drawn - general, settings.calib,
        f" and {general} of qpissa's general prose (--calib-general)" if general else "",
    )  # fmt: skip
    return tokens


def calibration_run(
    tokens: CalibrationTokens,
    settings: ConvertSettings,
    decompose_settings: DecomposeSettings,
    device: torch.device,
    workers: int,
) -> CalibrationRun:
    """What the calibrated phase needs of the conversion's settings, resolved for `device`."""
    return CalibrationRun(
        windows=tokens.windows, dtype=calibration_dtype(device),
        statistics_dtype=statistics_dtype(device, settings.calibration["compensate"]),
        propagate=settings.calibration["propagate"],
        decompose=decompose_settings, metrics=settings.metrics, seed=settings.seed, device=device,
        workers=workers,
    )  # fmt: skip


def calibrate_layers(
    reader: CheckpointReader,
    targets: set[str],
    run: CalibrationRun,
    partial: Path,
    progress: dict,
    bar: tqdm,
) -> None:
    """Decompose every target inside the decoder layers under its calibration statistics, into spools.

    `progress["calibration"]` records the layers done and the spooled modules' metrics; it is saved with
    the hidden states after each layer. Targets outside the decoder layers are left to the data-free pass.
    """
    state = progress.setdefault("calibration", {"layers_done": 0, "metrics": {}})
    folder = partial / CALIBRATION_DIR
    folder.mkdir(exist_ok=True)
    stack = open_stack(reader, targets, run.dtype, run.device)
    batch = max(1, BATCH_TOKENS // run.windows.shape[1])
    inputs = first_layer_inputs(stack, list(torch.split(run.windows, batch)))
    if state["layers_done"]:  # resumed: the saved inputs of the next layer replace the embeddings
        inputs.hidden = _resumed_hidden(folder, state["layers_done"], run.device)
    # one pool for every layer, not one per layer: new threads would each take a fresh malloc arena
    with ThreadPoolExecutor(run.workers) as pool:
        for index in range(state["layers_done"], len(stack.layers)):
            layer_targets = sorted(t for t in targets if t.startswith(f"{stack.prefix}.{index}."))
            with loaded_layer(stack, index, reader, run.dtype) as layer:
                local = f"{stack.prefix}.{index}."
                linears = {name: layer.get_submodule(name.removeprefix(local)) for name in layer_targets}
                with InputStatistics(layer, linears, run.statistics_dtype) as stats:
                    outputs = run_layer(layer, inputs, index, run.dtype)
                return_freed_memory()  # the forward's temporaries, before the decompositions allocate
                results = _decompose_layer(reader, layer_targets, stats, run, pool)
                _spool(folder / spool_name(index), results)
                if run.propagate is Propagation.CONVERTED:
                    for name, result in results.items():
                        weight = converted_weight(result, run.decompose)
                        linears[name].weight.data = weight.to(device=run.device, dtype=run.dtype)
                    outputs = run_layer(layer, inputs, index, run.dtype)
            inputs.hidden = outputs
            bar.update(len(results))
            # named by layer: a kill before the progress below is saved resumes from the file it names
            saved = _hidden_path(folder, index + 1)
            torch.save(inputs.hidden, saved.with_suffix(".tmp"))
            saved.with_suffix(".tmp").replace(saved)
            state["metrics"] |= {name: result.metrics for name, result in results.items()}
            state["layers_done"] = index + 1
            write_json(partial / PROGRESS_NAME, progress)
            _hidden_path(folder, index).unlink(missing_ok=True)
            return_freed_memory()
    state["layer_of"] = {name: _layer_index(name, stack.prefix) for name in state["metrics"]}
    write_json(partial / PROGRESS_NAME, progress)


def _resumed_hidden(folder: Path, layers_done: int, device: torch.device) -> list[torch.Tensor]:
    """The saved inputs of the next layer, once the spools of the layers done are checked whole.

    Raises:
        UserError: a spool or the hidden states damaged (a disk full, a file edited): named, with the fix.
    """
    fix = "use --overwrite to start the conversion over"
    for index in range(layers_done):
        read_header(folder / spool_name(index), fix)  # its length against the file's
    saved = _hidden_path(folder, layers_done)
    if not saved.exists() and (folder / "hidden.pt").exists():  # one name for every layer's, before
        raise UserError(
            f"{folder.parent} was written by an earlier qpissa, which this one cannot resume; {fix}"
        )
    try:
        return torch.load(saved, weights_only=True, map_location=device)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"{saved} is missing, truncated or corrupt ({reason}); {fix}") from None


def _hidden_path(folder: Path, layer: int) -> Path:
    return folder / f"{HIDDEN_PREFIX}{layer}.pt"


def spooled(partial: Path, progress: dict, module: str) -> DecomposedMatrix | None:
    """A target's result from the calibrated phase's spool, or None if it was not calibrated."""
    state = progress.get("calibration")
    if state is None or module not in state.get("layer_of", {}):
        return None
    path = partial / CALIBRATION_DIR / spool_name(state["layer_of"][module])
    prefix = f"{module}."
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefix)}  # noqa: SIM118
        A, B = f.get_tensor(adapter_key(module, "A")), f.get_tensor(adapter_key(module, "B"))
    return DecomposedMatrix(tensors, A, B, state["metrics"][module])


def spool_name(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def converted_weight(result: DecomposedMatrix, settings: DecomposeSettings) -> torch.Tensor:
    """`deq(Q) + s·B·A` of a result, float32 `[out, in]`: the converted layer's weight."""
    weight = next(key for key in result.tensors if key.endswith(".weight"))
    state = {key.removeprefix(weight + "."): value for key, value in result.tensors.items() if key != weight}
    deq = dequantize_stored(result.tensors[weight], state)
    return deq.addmm_(result.B, result.A, alpha=settings.scale)


def _decompose_layer(
    reader: CheckpointReader, names: list[str], stats: InputStatistics, run: CalibrationRun, pool: Executor
) -> dict[str, DecomposedMatrix]:
    """The layer's targets, decomposed under their H side by side (one thread each on a CPU)."""

    def one(name: str) -> DecomposedMatrix:
        W = reader.read(f"{name}.weight")
        H = stats.hessian(name)
        return decompose_matrix(name, W, run.decompose, run.metrics, run.seed, run.device, H)

    with one_thread_per_matrix(run.device):
        return dict(zip(names, pool.map(one, names), strict=True))


def _spool(path: Path, results: dict[str, DecomposedMatrix]) -> None:
    writer = SafetensorsWriter(path)
    for name, result in results.items():
        for key, value in result.tensors.items():
            writer.add(key, value)
        writer.add(adapter_key(name, "A"), result.A)
        writer.add(adapter_key(name, "B"), result.B)
    writer.close()


def _layer_index(name: str, prefix: str) -> int:
    return int(name.removeprefix(prefix + ".").split(".", 1)[0])
