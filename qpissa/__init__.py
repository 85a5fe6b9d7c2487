"""qpissa: SVD-initialized adapters over an NF4 residual (QPiSSA), end to end."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message on one line and exits with status 2."""
