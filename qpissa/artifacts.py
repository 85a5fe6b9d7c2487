"""Every file and directory name qpissa writes or looks for, and the finders that read them back.

A QPiSSA directory, a training run, an export and a comparison are plain directories; these names
are what tells them apart (`model_source.resolve_source` turns a MODEL_OR_RUN argument into what to load).
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpissa import UserError

log = logging.getLogger(__name__)

# Hugging Face and PEFT names qpissa reads and writes
CONFIG_NAME = "config.json"
# a model directory holds a tokenizer when it holds one of these (without, transformers 5 builds a
# placeholder from config.json that reads every text as unknown tokens)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
TRAINER_STATE = "trainer_state.json"  # written last into a Trainer checkpoint: it marks one complete
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-N: Trainer's checkpoint after step N

# a QPiSSA directory (`qpissa convert`)
REPORT_NAME = "qpissa_report.json"
ADAPTER_DIR = "adapter"  # also the final adapter of a run
PROGRESS_NAME = "progress.json"  # in OUT.partial/: the finished shards and their metrics
CALIBRATION_DIR = "calibration"  # in OUT.partial/ of a calibrated conversion: layer results, hidden states
PARTIAL_MARKER = ".qpissa-partial"  # in OUT.partial/ of export, report, fetch-model: qpissa is building it
LOCK_SUFFIX = ".lock"  # OUT.lock beside OUT: the pid of the process writing OUT (`output_lock`)
JSON_KINDS = {dict: "an object", list: "an array", str: "a string"}  # as JSON names them
FIDELITY_NAME = "qpissa_fidelity.json"  # written by `qpissa compare` into each QPiSSA directory it measured
OWN_JSON = "qpissa_*.json"  # every qpissa record above: they describe the QPiSSA directory only

# a training run (`qpissa train`)
RUN_MARKER = "qpissa_run.json"  # {"model": QPiSSA dir, "config": ..., "runtime": ...}
MODEL_FROM_RUN = "model_from_run"  # the run marker's path to its model, relative to the run
RUN_MARKERS = (RUN_MARKER, f"{RUN_MARKER}.tmp")  # the second: a marker whose write was cut short
DATA_FINGERPRINT = "data_fingerprint"  # the run marker's hash of the tokenized training samples
# how records become token ids (data.py), recorded with a run and in datasets' cache key: bump it with them.
# 2: segments tokenized in sequence, EOS at a conversation's end only; 3: a text's own end-of-turn once
TOKENIZATION = "tokenization"
TOKENIZATION_VERSION = 3
LOG_NAME = "trainer_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"
EVAL_RESULTS_NAME = "eval_results.json"

# an export, a comparison, a report, a fetched demo model
EXPORT_REPORT = "export_report.json"
ADAPTER_README = "README.md"  # of a LoRA export
COMPARE_NAME = "compare.json"
CONVERSIONS_DIR = "conversions"  # conversions/<method>/ of a comparison
RUNS_DIR = "runs"  # runs/<method>/ of a comparison
CALIBRATED_DIR_SUFFIX = "-calib"  # conversions/<method>-calib/ and runs/<method>-calib/: with --calib
SUMMARY_NAME = "summary.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
FETCH_MARKER = "qpissa_fetch.json"


@dataclass
class ModelSource:
    """Where the weights of a model come from.

    Attributes:
        base_dir: a QPiSSA directory (4-bit residual) or a plain HF checkpoint (e.g. a merged export).
        adapter_dir: the PEFT adapter to apply on top, or None for a plain checkpoint.
        run_dir: the training run it belongs to, if any.
    """

    base_dir: Path
    adapter_dir: Path | None
    run_dir: Path | None = None


def partial_dir(out_dir: Path) -> Path:
    """Where `out_dir` is built until it is complete: beside it, or beside the directory it links to
    (`outputs.resolve_output`); `.` and `..` are resolved first.

    Raises:
        UserError: `out_dir` is the file-system root, which has no place beside it.
    """
    if out_dir.name in ("", ".", "..") or out_dir.is_symlink():
        out_dir = Path(os.path.realpath(out_dir))  # never raises, even on a link that loops
    if not out_dir.name:
        raise UserError(f"{out_dir} is the file-system root; choose a directory to write")
    return out_dir.with_name(out_dir.name + ".partial")


def has_adapter(path: Path) -> bool:
    """Whether `path` holds a PEFT adapter (its config and weights)."""
    return all((path / name).is_file() for name in ADAPTER_FILES)


def is_qpissa_dir(path: Path) -> bool:
    """Whether `path` is a finished QPiSSA directory (written by `qpissa convert`)."""
    return (path / REPORT_NAME).is_file() and (path / CONFIG_NAME).is_file()


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's `checkpoint-N` directories, complete or not, oldest first."""
    found = [path for path in run_dir.glob(CHECKPOINT_PREFIX + "*") if _step(path).isdigit()]
    return sorted(found, key=lambda path: int(_step(path)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a run (one with trainer_state.json), if any."""
    complete = [path for path in checkpoints(run_dir) if (path / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def _step(checkpoint: Path) -> str:
    return checkpoint.name.removeprefix(CHECKPOINT_PREFIX)


# compressed files are read as what they hold, as datasets reads them: train.jsonl.gz is JSON Lines
DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def content_suffix(path: Path) -> str:
    """A file's type suffix, lowercased, through a compression ending (`.jsonl` for train.jsonl.gz)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if len(suffixes) > 1 and suffixes[-1] in DECOMPRESSORS:
        return suffixes[-2]
    return path.suffix.lower()


def open_text(path: Path, newline: str | None = None) -> Any:
    """A UTF-8 text stream of a file, decompressed if it ends in .gz, .bz2 or .xz (`newline`: as `open`)."""
    opener = DECOMPRESSORS.get(path.suffix.lower())
    if opener is None:
        return path.open(encoding="utf-8", newline=newline)
    return opener(path, "rt", encoding="utf-8", newline=newline)


def read_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 text file (decompressed if it is .gz, .bz2 or .xz), or one line naming it and what to do.

    Args:
        path: the file. what: how the user knows it (`config`, `--text`). fix: what to do about it.

    Raises:
        UserError: missing, a directory, unreadable, or not UTF-8.
    """
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory, not a file; {fix}")
    if not path.exists():
        raise UserError(f"{what} {path} does not exist; {fix}")
    try:
        with open_text(path) as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise UserError(
            f"{what} {path} is not UTF-8 text (byte {error.start} cannot be decoded); save it as UTF-8"
        ) from None
    except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as error:
        raise UserError(f"{what} {path} is not a readable {path.suffix} file ({error}); {fix}") from None
    except OSError as error:
        reason = error.strerror or str(error)  # bz2 says "Invalid data stream" without a strerror
        raise UserError(f"cannot read {what} {path}: {reason}; {fix}") from None


def read_json(path: Path, fix: str, required: tuple[str, ...] | dict[str, type] = ()) -> dict[str, Any]:
    """A JSON object from a file qpissa or Hugging Face wrote, or one line naming the file and the fix.

    Args:
        path: the file.
        fix: what the user can do when it is damaged (`restore it from the original model`).
        required: keys the object must have (as a dict: and the type of each one's value).

    Raises:
        UserError: missing, unreadable, not UTF-8, not JSON, not an object, or a required key missing or
            of another type.
    """
    text = read_text(path, "file", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:  # its msg may end in "at" ("Unterminated string starting at")
        what = f"{error.msg.removesuffix(' at')} at line {error.lineno}, column {error.colno}"
        raise UserError(f"{path} is not valid JSON ({what}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    missing = [key for key in required if key not in data]
    if missing:
        raise UserError(f"{path} lacks {', '.join(f'`{key}`' for key in missing)}; {fix}")
    kinds = required.items() if isinstance(required, dict) else ()
    wrong = [f"`{key}` is not {JSON_KINDS[kind]}" for key, kind in kinds if not isinstance(data[key], kind)]
    if wrong:  # told here, not as a TypeError in the reader that takes the value apart
        raise UserError(f"{path} is damaged ({', '.join(wrong)}); {fix}")
    return data


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The records of a JSONL log, one per line; none when the file does not exist.

    A process killed while appending leaves a half-written last line: it is ignored with a warning.

    Raises:
        UserError: a line before the last that is not a JSON object with the `required` keys, each a
            number (a log's step and loss).
    """
    if not path.is_file():
        return []
    lines = read_text(path, "log", "delete it or restore it").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and all(_is_number(row.get(key)) for key in required):
            rows.append(row)
        elif number == len(lines):
            log.warning(
                "%s: its last line is incomplete (the writer was stopped mid-line); ignoring it", path
            )
        else:
            raise UserError(
                f"{path} line {number} is not a complete log record; the log is damaged: "
                "delete that line (or the file) and rerun"
            )
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_report(qpissa_dir: Path) -> dict:
    """`qpissa_report.json` of a finished QPiSSA directory."""
    fix = "it is written by `qpissa convert`: convert again into a new directory"
    return read_json(qpissa_dir / REPORT_NAME, fix, {"fingerprint": dict, "settings": dict, "layers": list,
                                                     "summary": dict})  # fmt: skip


def comparison_members(compare_dir: Path, kind: str) -> list[Path]:
    """The conversion (`kind=CONVERSIONS_DIR`) or run (`RUNS_DIR`) directories of a comparison, by method."""
    fix = "it is written by `qpissa compare`: rerun the comparison"
    record = read_json(compare_dir / COMPARE_NAME, fix, required=("methods",))
    paths = [compare_dir / kind / str(name) for name in record["methods"]]
    return [path for path in paths if path.is_dir()]
