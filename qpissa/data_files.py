"""Local data files checked before `datasets` reads them, for what it would misread silently or name
without the fix: unknown and compressed types, JSON Lines lines, records wrapped in a JSON object, folders
whose files it would partly ignore, CSV values it would turn into numbers."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from qpissa import UserError
from qpissa.artifacts import content_suffix, open_text, read_text
from qpissa.data_formats import REQUIRED_FIELDS

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

LOADERS = {
    ".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".arrow": "arrow",
}  # fmt: skip
BOM = "\ufeff"  # the byte-order mark some editors write at the start of a UTF-8 file
TEXT_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")  # also read compressed (.gz, .bz2, .xz)
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
# the file types datasets reads from a folder; it reads one type per folder and ignores the others
FOLDER_TYPES = LOADERS | {".txt": "text"}
METADATA_FILES = ("dataset_info.json", "dataset_infos.json")  # a Hub dataset's description, not records
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # told apart from unknown types: decompress first


def check_file(path: Path) -> dict[str, str]:
    """A data file's type is known and it holds something; JSON Lines: every line a JSON object
    (datasets names neither the line nor the fix).

    Returns:
        What `load_dataset` needs besides the file: a CSV file's separator, or the field of a JSON object
        that holds the records.
    """
    suffix = content_suffix(path)
    if suffix not in LOADERS or (suffix != path.suffix.lower() and suffix not in TEXT_TYPES):
        known = ", ".join(LOADERS)
        packed = path.suffix.lower() in COMPRESSED and Path(path.stem).suffix.lower() in LOADERS
        fix = (
            f"decompress it first ({Path(path.stem).name})" if packed
            else f"use {known} (the text types also as .gz, .bz2 or .xz) or a directory"
        )  # fmt: skip
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; {fix}")
    if path.stat().st_size == 0:
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    if suffix in CSV_SEPARATORS:
        return {"sep": CSV_SEPARATORS[suffix]}
    if LOADERS[suffix] != "json":
        return {}
    text = read_text(path, "dataset", "check the path").removeprefix(BOM)  # datasets reads past a BOM
    if not text.strip():
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    if suffix == ".json":
        return _records_field(path, text)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"dataset {path} line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                "fix or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"dataset {path} line {number} is not a JSON object (one record per line)")
    return {}


def check_folder(path: Path) -> list[Path]:
    """Every data file of a folder is read. datasets reads only the files named after a split once some
    are, and of those only the most common file type; it ignores the others, silently.

    Returns:
        The folder's data files (none when datasets finds none: reading it then says so).
    """
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        read = {
            Path(f).resolve()
            for files in DataFilesDict.from_patterns(patterns, str(path)).values()
            for f in files
        }
    except Exception:  # no data file at all: load_dataset says so, with the message of its own
        return []
    data_files = [
        file for file in sorted(path.rglob("*"))
        if content_suffix(file) in FOLDER_TYPES and file.is_file() and file.name not in METADATA_FILES
        and not any(part.startswith((".", "__")) for part in file.relative_to(path).parts)
    ]  # fmt: skip
    ignored = [str(file.relative_to(path)) for file in data_files if file.resolve() not in read]
    if ignored:
        raise UserError(
            f"dataset {path}: {_some(ignored)} would not be read (once some files are named after a split, "
            "only those are); name every file after its split (train, validation, test), or give it as a "
            "data source of its own"
        )
    for file in data_files:  # a lone JSON value crashes datasets' reader (a compressed file is left to it)
        if file.suffix.lower() == ".json" and _opening(file) not in ("", "[", "{"):
            _refuse_json_value(file, read_text(file, "dataset", "check the path").removeprefix(BOM))
    kinds: dict[str, list[str]] = {}
    for file in data_files:
        kinds.setdefault(FOLDER_TYPES[content_suffix(file)], []).append(str(file.relative_to(path)))
    if len(kinds) > 1:
        found = "; ".join(f"{kind}: {_some(names)}" for kind, names in kinds.items())
        raise UserError(
            f"dataset {path} mixes data file types ({found}), and only one type would be read; "
            "keep one type in the folder, or give each file as a data source of its own"
        )
    return data_files


def csv_as_text(path: Path) -> datasets.Features | None:
    """Every column of a CSV file as text: pandas would read an answer ` 37` as the integer 37, which no
    record format accepts and no quoting in the file can prevent. None if the header is unreadable (the
    read then says why)."""
    import datasets

    try:
        with open_text(path, newline="") as file:
            header = next(csv.reader(file, delimiter=CSV_SEPARATORS[content_suffix(path)]))
    except Exception:  # unreadable, empty, not UTF-8 or a damaged archive: the read says which
        return None
    if len(set(header)) != len(header) or not all(header):
        return None  # unnamed or repeated columns: datasets names them, and the record check says so
    header[0] = header[0].removeprefix(BOM)  # datasets reads past a byte-order mark; so must its columns
    return datasets.Features({name: datasets.Value("string") for name in header})


def _records_field(path: Path, text: str) -> dict[str, str]:
    """A JSON file that wraps its records in an object (`{"data": [{...}, ...]}`) is read from that field;
    datasets would read the object as one record that fits no format."""
    start = text.lstrip()[:1]
    if start == "[":
        return {}  # a list of records: read as it is, nothing parsed twice
    if start != "{":  # a lone JSON value (datasets' reader crashes the process on `null`)
        _refuse_json_value(path, text)
        return {}  # not JSON at all: datasets names the problem
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}  # JSON Lines named .json, or broken JSON: datasets reads the one and names the other
    if any(all(name in data for name in names) for names in REQUIRED_FIELDS.values()):
        return {}  # one record as an object
    lists = [
        key for key, value in data.items() if isinstance(value, list) and value and isinstance(value[0], dict)
    ]
    if len(lists) > 1:
        raise UserError(
            f"dataset {path} holds lists of records in several fields ({', '.join(lists)}); keep one list "
            "per file (or write JSON Lines, one record per line)"
        )
    if not lists:
        return {}  # no list of records: reading it says which fields it has
    log.debug("data %s: records read from its %r field", path, lists[0])
    return {"field": lists[0]}


def _opening(path: Path) -> str:
    """The first character of a text file that is not white space ("" when there is none)."""
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").removeprefix(BOM).lstrip()
    return head[:1]


def _refuse_json_value(path: Path, text: str) -> None:
    """Refuse a file whose JSON is one value, not records; text that is no JSON is left to datasets."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    kind = {type(None): "null", bool: "boolean", str: "string"}.get(type(value), "number")
    raise UserError(
        f"dataset {path} holds a JSON {kind}, not records; write a list of records ([{{...}}, ...]) or "
        "JSON Lines (one record per line)"
    )


def _some(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
