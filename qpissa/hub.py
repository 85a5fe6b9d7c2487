"""Hugging Face Hub names: telling one from a local path, and a model id resolved to its local snapshot.

`huggingface_hub.snapshot_download` fetches only the files a checkpoint needs (config, safetensors,
tokenizer); with `HF_HUB_OFFLINE=1` it answers from the cache a previous download filled.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from qpissa import UserError

# what a checkpoint directory needs: configs and the weights index, safetensors, tokenizer and template
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def is_hub_name(path: Path) -> bool:
    """`name` or `owner/name` as written: not absolute, not starting with a dot, no file extension."""
    parts = path.as_posix().split("/")
    return not path.is_absolute() and len(parts) <= 2 and not parts[0].startswith(".") and not path.suffix


def resolve_model(path: Path, what: str) -> Path:
    """A local directory as it is; a Hub model id (`owner/name`, no such local path) as its snapshot.

    Raises:
        UserError: the id is unknown, gated, or not in the cache while offline (naming `what`, the
            setting or argument the user gave it in).
    """
    if path.exists() or not is_hub_name(path) or "/" not in path.as_posix():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(path.as_posix(), allow_patterns=MODEL_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError, ConnectionError, ValueError) as error:
        if path.parent.is_dir():  # most likely a typo in a local path, not a Hub id
            close = difflib.get_close_matches(path.name, [entry.name for entry in path.parent.iterdir()], n=1)
            hint = f" (did you mean {path.parent / close[0]}?)" if close else ""
            raise UserError(
                f"{what} {path} does not exist{hint}; check the path "
                "(as a Hub model id it cannot be fetched either)"
            ) from None
        reason = next(
            (line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__
        )
        raise UserError(
            f"{what} {path} is not a local directory and cannot be fetched from the Hugging Face Hub "
            f"({reason}); check the path or the model id, your connection, or (HF_HUB_OFFLINE=1) that a "
            "previous download is in the cache"
        ) from None
