"""Memory facts: the peak resident memory every report and log states, what the system can spare, and
the estimate of a training run's peak logged before its first step."""

from __future__ import annotations

import math
import os
import resource
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qpissa.recipe import TrainConfig
    from qpissa.runtime import Runtime

# optimizer state bytes per trainable parameter (AdamW keeps two moments)
OPTIMIZER_BYTES = {
    "adamw_torch": 8.0,
    "paged_adamw_32bit": 8.0,
    "adamw_bnb_8bit": 2.0,
    "paged_adamw_8bit": 2.0,
}


def peak_rss_mb() -> float:
    """This process's own peak resident set size, in MB.

    `ru_maxrss` alone is not that on Linux: a program started by fork and exec begins with its parent's
    high-water mark, so a conversion started from a large process would report the parent's peak.
    `VmHWM` counts the memory of this program only; elsewhere `ru_maxrss` is all there is.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS, kB elsewhere


def available_memory_bytes() -> int:
    """Memory the system can still give this process without swapping (Linux `MemAvailable`).

    Elsewhere the free physical pages, or, where not even that is known, 64 GB (no limit in practice).
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 64 << 30


def estimate_memory(model: torch.nn.Module, config: TrainConfig, runtime: Runtime) -> dict[str, Any]:
    """Estimate the peak memory of training, as the step log measures it, once the model is loaded (and,
    in a fresh run, has made one forward pass: the step-0 loss).

    Parts: `loaded`, the peak measured so far (on a CPU the process's high-water mark: Python, the
    libraries, the model as loaded, the tokenized data and the working memory of a forward pass, which
    the allocator keeps; on CUDA the most memory allocated on the GPU), then what training adds on top:
    adapter gradients (fp32), optimizer states, activations (with gradient checkpointing each layer's
    input, plus one layer recomputed in backward with its attention scores) and the logits at
    max_seq_len (fp32 logits, their log-softmax and gradient).

    Returns:
        trainable_params, frozen_params, parts_mb (name -> MB), total_mb.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_params = sum(_logical_numel(p) for p in model.parameters() if not p.requires_grad)
    cfg = model.config.get_text_config()  # a multimodal model's language model: what trains at max_seq_len
    batch, seq = config.per_device_train_batch_size, config.data.max_seq_len
    act_bytes = runtime.dtype.itemsize
    hidden, layers, heads = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    inter = getattr(cfg, "intermediate_size", 4 * hidden)
    per_layer = batch * seq * (10 * hidden + 4 * inter + 2 * heads * seq) * act_bytes
    kept = batch * seq * hidden * act_bytes * layers if config.gradient_checkpointing else per_layer * layers
    parts = {
        "gradients": trainable * 4,
        "optimizer": trainable * OPTIMIZER_BYTES.get(runtime.optim, 8.0),
        "activations": kept + (per_layer if config.gradient_checkpointing else 0),
        "logits": batch * seq * cfg.vocab_size * 4 * 3,
    }
    parts_mb = {"loaded": _loaded_mb(runtime), **{name: value / 2**20 for name, value in parts.items()}}
    return {
        "frozen_params": frozen_params,
        "parts_mb": parts_mb,
        "total_mb": sum(parts_mb.values()),
        "trainable_params": trainable,
    }


def _loaded_mb(runtime: Runtime) -> float:
    """The peak so far, measured as the step log measures it."""
    if runtime.device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(runtime.device) / 2**20
    return peak_rss_mb()


def _logical_numel(parameter: torch.nn.Parameter) -> int:
    """Parameters a weight stands for: a packed NF4 tensor holds two per byte."""
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()


def return_freed_memory() -> None:
    """Give memory freed by the process back to the OS (glibc's `malloc_trim`; elsewhere nothing).

    Loading, running and unloading one decoder layer after another leaves glibc's heaps fragmented:
    measured on the demo model, a calibrated conversion's RSS grew by ~12 MB per layer (float32) and
    stayed flat at its first layer's level when trimmed after each.
    """
    if sys.platform.startswith("linux"):
        import contextlib
        import ctypes

        with contextlib.suppress(OSError, AttributeError):  # musl or another libc: no trim, no harm
            ctypes.CDLL("libc.so.6").malloc_trim(0)


# the words of torch's CPU allocator and of a failed memory map when memory runs out ("can't allocate
# memory" on Linux and macOS, "not enough memory" on Windows); on a GPU torch raises OutOfMemoryError
_OUT_OF_MEMORY_WORDS = ("can't allocate memory", "cannot allocate memory", "not enough memory")
_OUT_OF_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")  # strerror of ENOSPC, EDQUOT


def out_of_memory(error: BaseException) -> bool:
    """`error` says this machine's memory ran out (torch's `OutOfMemoryError` on a GPU, its allocator's or
    a memory map's `RuntimeError` on a CPU, Python's `MemoryError`): no bug, and no user mistake either.
    Torch-free, for the CLI."""
    if isinstance(error, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(error).__mro__):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(words in text for words in _OUT_OF_MEMORY_WORDS)


def out_of_memory_line(error: BaseException) -> str | None:
    """The error line for `error` if it says memory ran out (`out_of_memory`), else None."""
    if not out_of_memory(error):
        return None
    return (
        f"out of memory ({error_reason(error)}); free memory (other programs, other jobs on the GPU) "
        "or use a machine with more"
    )


def out_of_space_line(error: BaseException) -> str | None:
    """The error line for a library's own error that wraps a full disk (safetensors' writer raises
    `SafetensorError: ... No space left on device (os error 28)`, no OSError), else None."""
    if not any(words in str(error) for words in _OUT_OF_SPACE_WORDS):
        return None
    return f"no space left on device ({error_reason(error)}); free some space"


def error_reason(error: BaseException) -> str:
    """`Type: first line` of an error for a one-line message, cut to 200 characters (CUDA's out-of-memory
    runs on with advice)."""
    line = next((part.strip() for part in str(error).splitlines() if part.strip()), "")
    return f"{type(error).__name__}: {line[:200]}"
