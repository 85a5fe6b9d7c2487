"""The calibration input of `convert --calib`: a data file or text file turned into token windows.

Records of any training format are rendered as `qpissa train` renders them (chat template included), so
calibrating on the data you will train on sees exactly the text training sees. Texts are shuffled with
the seed, joined into one token stream, cut into windows of `seq_len` tokens, and `samples` windows are
drawn with the seed: the same file, tokenizer and seed always give the same windows. A share of them
(`--calib-general`) is drawn from general prose shipped with qpissa, so narrow data does not make the
conversion fit that data alone.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from qpissa import UserError
from qpissa.artifacts import content_suffix, read_text
from qpissa.convert_settings import ConvertSettings
from qpissa.data_formats import CHAT_FORMATS, REQUIRED_FIELDS, check_tokenizer, detect_format, render
from qpissa.data_sources import check_records, load_records
from qpissa.recipe import DataSource
from qpissa.settings import DataFormat

TEXT_SUFFIXES = (".txt", ".md")  # read whole as plain text (also .gz, .bz2 or .xz compressed)
GENERAL_TEXT = "calibration.txt"  # in qpissa/texts: general English prose written for the project
OVERLAP_NGRAM = 32  # tokens: a shared run this long between calibration and held-out text is an overlap


@dataclass
class CalibrationTokens:
    """The calibration windows and where they came from (recorded in qpissa_report.json).

    Attributes:
        windows: int64 `[samples, seq_len]`.
        source: the path given. format: how its records were read (`text file`, `messages`, ...).
        records: texts read. asked: windows asked of it. available: whole windows its stream held.
        general: windows drawn from the shipped general prose, the last ones. sha256: of the windows' ids.
    """

    windows: torch.Tensor
    source: str
    format: str
    records: int
    asked: int
    available: int
    general: int
    sha256: str

    def describe(self) -> dict[str, Any]:
        """JSON-ready record of the calibration, without the windows themselves."""
        samples, seq_len = self.windows.shape
        return {"source": self.source, "format": self.format, "records": self.records, "samples": samples,
                "seq_len": seq_len, "tokens": samples * seq_len, "windows_available": self.available,
                "general_windows": self.general, "sha256": self.sha256}  # fmt: skip


def calibration_of(settings: ConvertSettings, tokenizer: Any) -> CalibrationTokens:
    """The windows `--calib` and its settings choose (`convert` and `compare` calibrate on the same)."""
    calibration = settings.calibration
    return calibration_tokens(
        settings.calib, tokenizer, calibration["samples"], calibration["seq_len"], settings.seed,
        calibration["general"],
    )  # fmt: skip


def calibration_tokens(
    path: Path, tokenizer: Any, samples: int, seq_len: int, seed: int, general: float
) -> CalibrationTokens:
    """Read `path` and draw `samples` windows of `seq_len` tokens, the share `general` of them (at least one
    left to `path`) from the shipped general prose, unless `path` is that prose; fewer when the data holds
    fewer, the general windows then fewer too, to keep their share.

    Args:
        path: a plain text file (.txt, .md), or a data file or directory `qpissa train` reads; its format
            is detected from its fields.
        tokenizer: the model's tokenizer.
        samples, seq_len: windows to draw and their length. seed: the shuffle and the draws.

    Raises:
        UserError: a missing, empty or unreadable input, an unknown record format, or fewer tokens than
            one window.
    """
    texts, data_format = _read_texts(path, tokenizer)
    prose = general_prose()
    count = 0 if texts == [prose] else min(round(samples * general), samples - 1)
    asked = samples - count
    windows, available = _draw(texts, tokenizer, asked, seq_len, seed, f"--calib {path}", "more data")
    if len(windows) < asked:  # short data: as many general windows as keep their share
        count = min(count, round(len(windows) * general / (1 - general)))
    if count:
        general_windows, _ = _draw(
            [prose],
            tokenizer,
            count,
            seq_len,
            seed,
            f"qpissa's general prose ({GENERAL_TEXT})",
            "--calib-general 0",
        )
        windows = torch.cat([windows, general_windows])
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return CalibrationTokens(windows, str(path), data_format, len(texts), asked, available, count, digest)


def general_prose() -> str:
    """The general English prose that ships with qpissa for calibration (not the held-out prose)."""
    return resources.files("qpissa").joinpath("texts", GENERAL_TEXT).read_text(encoding="utf-8")


def _draw(
    texts: list[str], tokenizer: Any, samples: int, seq_len: int, seed: int, source: str, fix: str
) -> tuple[torch.Tensor, int]:
    """`samples` windows of `seq_len` tokens drawn with `seed` from `texts` shuffled and joined, and how many
    whole windows they held; `source` and `fix` tell a stream shorter than one window."""
    rng = random.Random(seed)
    rng.shuffle(texts)
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + separator
    available = len(stream) // seq_len
    if available == 0:
        raise UserError(
            f"{source} holds {len(stream)} tokens, fewer than one window of --calib-seq-len {seq_len}; "
            f"pass {fix} or a smaller --calib-seq-len"
        )
    chosen = sorted(rng.sample(range(available), min(samples, available)))
    windows = torch.tensor([stream[i * seq_len : (i + 1) * seq_len] for i in chosen], dtype=torch.long)
    return windows, available


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
    dataset = load_records(path, split_setting=None)
    source = DataSource(path, format=_format_without_template(dataset[0], path, tokenizer))
    records, data_format = check_records(dataset, source, format_setting=None)
    check_tokenizer(tokenizer, data_format)
    texts = [
        "".join(text for text, _ in render(record, data_format, tokenizer).segments) for record in records
    ]
    return texts, data_format.value


def _format_without_template(first: dict[str, Any], path: Path, tokenizer: Any) -> DataFormat | None:
    """prompt_completion where the model has no chat template and the records fit a chat format and that
    too (the demo task's): convert has no flag to choose a format; else None, the format detected."""
    chat = detect_format(first, f"{path} record 0", None) in CHAT_FORMATS
    fields = REQUIRED_FIELDS[DataFormat.PROMPT_COMPLETION]
    if chat and not tokenizer.chat_template and all(isinstance(first.get(name), str) for name in fields):
        return DataFormat.PROMPT_COMPLETION
    return None
