"""qpissa: SVD-initialized adapters over an NF4 residual (QPiSSA), end to end."""

import warnings

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message on one line and exits with status 2."""


def hide_library_deprecation_notes() -> None:
    """Silence transformers' notes that gradient checkpointing was renamed (5.2x), for the CLI's processes.

    The range we support (>= 5.0) still needs the old name and PEFT reads the old attribute: the notes
    are for library authors, and users can do nothing about them.
    """
    warnings.filterwarnings("ignore", r".*gradient_checkpointing.* is deprecated", FutureWarning)
