"""qpissa: SVD-initialized adapters over an NF4 residual (QPiSSA), end to end."""

import logging
import warnings

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message on one line and exits with status 2."""


def hide_library_deprecation_notes() -> None:
    """Silence library notes users can do nothing about, for the CLI's processes.

    - transformers' notes that gradient checkpointing was renamed (5.2x): the range we support (>= 5.0)
      still needs the old name and PEFT reads the old attribute;
    - bitsandbytes' note, on CPUs with AVX512-BF16, that its bf16 CPU kernel could not be fetched from
      the Hugging Face hub: qpissa computes in float32 on the CPU and never uses that kernel.
    """
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.* is deprecated", FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward" not in record.getMessage()
    )
