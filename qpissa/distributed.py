"""Several processes (`torchrun`, `accelerate launch`): which one this is, and work done by the main one.

Every rank trains; only the main process writes files and prints (DESIGN.md, data flow). transformers'
`TrainingArguments` starts the process group (accelerate's `PartialState`); this module reads the
launcher's environment and uses accelerate's barrier and broadcast, so no process group of its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qpissa import UserError
from qpissa.artifacts import CONFIG_NAME, read_json

if TYPE_CHECKING:
    from transformers import TrainingArguments

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes a launcher started (one process: rank 0 of 1)."""

    rank: int
    local_rank: int  # index on this machine: the GPU it trains on
    count: int
    launcher: str  # none, torchrun or accelerate

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def processes() -> Processes:
    """Read from the variables torchrun and `accelerate launch` set (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`)."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by every `accelerate launch`, never by torchrun
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = "torchrun"
    else:
        launcher = "none"
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    return Processes(rank, local_rank, count, launcher)


def warn_fewer_processes() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process (accelerate's own rule: on a CPU it
    needs MPI for several), which trains as if N were 1; its launcher still sets the address that several
    processes would meet at (`MASTER_ADDR`), beside no `WORLD_SIZE`."""
    if (
        processes().launcher == "accelerate"
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        log.warning(
            "accelerate launch asked for several processes but started one (on a CPU accelerate needs MPI "
            "for several): this run trains as 1 process; launch with --multi_gpu or --config_file "
            "configs/accelerate/ddp.yaml to train in several"
        )


def one_process_refusal(command: str) -> str | None:
    """Why `qpissa COMMAND` cannot run under this launch (None when it can): a command other than train
    would be done whole by every process side by side (results printed twice, one output written twice)."""
    launched = processes()
    if launched.count == 1:
        return None
    how = {"torchrun": "torchrun", "accelerate": "accelerate launch"}.get(launched.launcher, "its launcher")
    return (
        f"qpissa {command} runs in one process, and {launched.count} were launched; run it without {how} "
        "(only train uses several)"
    )


def is_main_process() -> bool:
    """Whether this process prints and writes (torch-free, for the CLI)."""
    return processes().is_main


def wait_for_everyone() -> None:
    """A barrier across the launched processes; nothing when there is one."""
    if processes().count > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def on_main(function: Callable[[], T]) -> T | None:
    """Run `function` on the main process only; every process ends with its outcome.

    A `UserError` there is raised on every process (replicas get its message, and the CLI prints it
    only on the main one), so no replica waits at a later barrier for a main process that has stopped.

    Returns:
        What `function` returned, on the main process; None on the others.
    """
    ranks = processes()
    if ranks.count == 1:
        return function()
    from accelerate.utils import broadcast_object_list

    result, message = None, [None]
    if ranks.is_main:
        try:
            result = function()
        except UserError as error:
            message = [str(error)]
    broadcast_object_list(message, from_process=0)
    if message[0] is not None:
        raise UserError(message[0])
    return result


def gather(value: Any) -> list[Any]:
    """`value` from every process, in rank order (a list of one without a launcher)."""
    if processes().count == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def process_record(arguments: TrainingArguments, ranks: Processes) -> dict[str, Any]:
    """What the run marker says about the processes: how many, how launched, and the batch sizes."""
    per_device = arguments.per_device_train_batch_size
    return {
        "count": ranks.count,
        "global_batch_size": per_device * ranks.count * arguments.gradient_accumulation_steps,
        "launcher": ranks.launcher,
        "per_device_train_batch_size": per_device,
    }


def check_process_count(checkpoint_processes: int, checkpoint: str, ranks: Processes) -> None:
    """A checkpoint continues exactly only with the process count that wrote it: each process restores
    its own random state and the data position is counted in per-process batches.

    Raises:
        UserError: the counts differ, naming both and the launcher setting that fixes it.
    """
    if checkpoint_processes != ranks.count:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} was written by {checkpoint_processes} process(es) but "
            f"{ranks.count} are running; resume with the same count (torchrun --nproc_per_node "
            f"{checkpoint_processes}, accelerate launch --num_processes {checkpoint_processes}, or no "
            "launcher for 1), as its data order and random states are per process"
        )


def uses_fsdp(arguments: TrainingArguments) -> bool:
    """FSDP asked for by `accelerate launch` (its config file) or by the recipe's `fsdp` option."""
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("true", "1")
    return launched or bool(arguments.fsdp)


def check_fsdp(device_type: str, compute_dtype: str, model_dir: Path) -> None:
    """FSDP-QLoRA runs on GPUs and shards the NF4 residual only if it is stored in the compute dtype
    (bitsandbytes' `quant_storage`): FSDP flattens and shards float tensors of one dtype.

    Raises:
        UserError: FSDP on a CPU, or a QPiSSA directory whose codes are stored as another dtype.
    """
    if device_type != "cuda":
        raise UserError(
            "FSDP needs CUDA GPUs (accelerate's FSDP plugin has no CPU mode); on a CPU launch with "
            "configs/accelerate/ddp.yaml instead"
        )
    quantization = read_json(model_dir / CONFIG_NAME, "convert the model again").get(
        "quantization_config", {}
    )
    storage = quantization.get("bnb_4bit_quant_storage", "uint8")
    if storage != compute_dtype:
        raise UserError(
            f"FSDP shards the NF4 residual only when it is stored as the compute dtype ({compute_dtype}), "
            f"but {model_dir} stores it as {storage}; convert again with --quant-storage {compute_dtype}"
        )


def check_gpu_count(device_type: str) -> None:
    """Each process on a machine trains on its own GPU, so there are no more processes than GPUs.

    Raises:
        UserError: more processes on this machine (`LOCAL_WORLD_SIZE`) than visible CUDA GPUs.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device_type != "cuda" or local == 1:
        return
    import torch

    visible = torch.cuda.device_count()
    if local > visible:
        raise UserError(
            f"{local} processes were launched on this machine but {visible} CUDA GPU(s) are visible; "
            f"launch at most {visible} (torchrun --nproc_per_node {visible}, accelerate launch "
            f"--num_processes {visible}), one per GPU"
        )
