"""The calibration input of `convert --calib`: a data file or text file turned into token windows.

Records of any training format are rendered as `qpissa train` renders them (chat template included), so
calibrating on the data you will train on sees exactly the text training sees. Texts are shuffled with
the seed, joined into one token stream, cut into windows of `seq_len` tokens, and `samples` windows are
drawn with the seed: the same file, tokenizer and seed always give the same windows.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qpissa import UserError
from qpissa.artifacts import content_suffix, read_text
from qpissa.data_formats import check_tokenizer, render
from qpissa.data_sources import load_source
from qpissa.recipe import DataSource

TEXT_SUFFIXES = (".txt", ".md")  # read whole as plain text (also .gz, .bz2 or .xz compressed)
OVERLAP_NGRAM = 32  # tokens: a shared run this long between calibration and held-out text is an overlap


@dataclass
class CalibrationTokens:
    """The calibration windows and where they came from (recorded in qpissa_report.json).

    Attributes:
        windows: int64 `[samples, seq_len]`.
        source: the path given. format: how its records were read (`text file`, `messages`, ...).
        records: texts read. available: whole windows the stream held. sha256: of the windows' ids.
    """

    windows: torch.Tensor
    source: str
    format: str
    records: int
    available: int
    sha256: str

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the calibration, without the windows themselves."""
        samples, seq_len = self.windows.shape
        return {"source": self.source, "format": self.format, "records": self.records, "samples": samples,
                "seq_len": seq_len, "tokens": samples * seq_len, "windows_available": self.available,
                "sha256": self.sha256}  # fmt: skip


def calibration_tokens(
    path: Path, tokenizer: Any, samples: int, seq_len: int, seed: int
) -> CalibrationTokens:
    """Read `path` and draw `samples` windows of `seq_len` tokens (fewer when the data holds fewer).

    Args:
        path: a plain text file (.txt, .md), or a data file or directory `qpissa train` reads; its format
            is detected from its fields.
        tokenizer: the model's tokenizer.
        samples, seq_len: windows to draw and their length. seed: the shuffle and the draw.

    Raises:
        UserError: a missing, empty or unreadable input, an unknown record format, or fewer tokens than
            one window.
    """
    texts, data_format = _read_texts(path, tokenizer)
    rng = random.Random(seed)
    rng.shuffle(texts)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    available = len(stream) // seq_len
    if available == 0:
        raise UserError(
            f"--calib {path} holds {len(stream)} tokens, fewer than one window of --calib-seq-len {seq_len}; "
            "pass more data or a smaller --calib-seq-len"
        )
    chosen = sorted(rng.sample(range(available), min(samples, available)))
    windows = torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in chosen], dtype=torch.long)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return CalibrationTokens(windows, str(path), data_format, len(texts), available, digest)


def overlap_tokens(calibration: torch.Tensor, heldout: torch.Tensor, n: int = OVERLAP_NGRAM) -> int:
    """How many tokens of `heldout` lie in a run of `n` tokens that also occurs in `calibration`."""
    seen = {tuple(row[i : i + n]) for row in calibration.tolist() for i in range(len(row) - n + 1)}
    ids = heldout.tolist()
    covered = [False] * len(ids)
    for i in range(len(ids) - n + 1):
        if tuple(ids[i : i + n]) in seen:
            covered[i : i + n] = [True] * n
    return sum(covered)


def _read_texts(path: Path, tokenizer: Any) -> tuple[list[str], str]:
    if not path.exists():
        raise UserError(f"--calib {path} does not exist; pass a text file or a training data file")
    if path.is_file() and content_suffix(path) in TEXT_SUFFIXES:
        text = read_text(path, "--calib", "pass a text file or a training data file")
        if not text.strip():
            raise UserError(f"--calib {path} is empty; pass a file with text in it")
        return [text], "text file"
    # convert has no format or split flag: a folder's train split is read
    records, data_format = load_source(DataSource(path), format_setting=None, split_setting=None)
    check_tokenizer(tokenizer, data_format)
    texts = [
        "".join(text for text, _ in render(record, data_format, tokenizer).segments) for record in records
    ]
    return texts, data_format.value
