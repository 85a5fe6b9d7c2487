"""Local data files checked before `datasets` reads them, for what it would misread silently or name
without the fix: unknown and compressed types, JSON Lines lines, records wrapped in a JSON object, folders
whose files it would partly ignore, CSV values it would turn into numbers; and JSON records read as written,
for the text it turns into dates or numbers."""

from __future__ import annotations

import csv
import json
import logging
import lzma
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpissa import UserError
from qpissa.artifacts import DECOMPRESSORS, content_suffix, open_text, read_text
from qpissa.data_formats import REQUIRED_FIELDS

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

LOADERS = {
    ".jsonl": "json", ".ndjson": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".arrow": "arrow",
}  # fmt: skip
SAVED_MARKERS = ("state.json", "dataset_dict.json")  # what `save_to_disk` writes at a dataset's top
BOM = "\ufeff"  # the byte-order mark some editors write at the start of a UTF-8 file
TEXT_TYPES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")  # also read compressed (.gz, .bz2, .xz)
CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
# the file types datasets reads from a folder; it reads one type per folder and ignores the others
FOLDER_TYPES = LOADERS | {".txt": "text"}
METADATA_FILES = ("dataset_info.json", "dataset_infos.json")  # a Hub dataset's description, not records
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip")  # told apart from unknown types: decompress first
# a .txt file has no record boundaries; in a folder datasets reads each line as a record
PLAIN_TEXT = '; write JSON Lines, one {"text": ...} per sample (or a folder of .txt: a record per line)'


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
            else f"use {known} (the text types also as .gz, .bz2 or .xz)"
            + (PLAIN_TEXT if suffix == ".txt" else "")
        )  # fmt: skip
        raise UserError(f"{path}: unknown data file type {path.suffix!r}; {fix}")
    if path.stat().st_size == 0:
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    if suffix in CSV_SEPARATORS:
        return {"sep": CSV_SEPARATORS[suffix]}
    if LOADERS[suffix] != "json":
        return {}
    if suffix != ".json":
        _check_lines(path)
        return {}
    text = read_text(path, "dataset", "check the path").removeprefix(BOM)  # datasets reads past a BOM
    if not text.strip():
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    return _records_field(path, text)


def _check_lines(path: Path) -> None:
    """Every line of a JSON Lines file is a JSON object, read one line at a time (a large file is never
    held whole). Lines end at \n, \r\n or \r, as datasets reads them, not at U+2028 inside a string."""
    found = False
    try:
        with open_text(path) as file:
            for number, line in enumerate(file, 1):
                line = line.rstrip("\n").removeprefix(BOM if number == 1 else "")  # datasets reads past it
                if not line.strip():
                    continue
                found = True
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserError(
                        f"dataset {path} line {number} is not valid JSON ({error.msg}, column "
                        f"{error.colno}); fix or remove that line"
                    ) from None
                if not isinstance(record, dict):
                    raise UserError(
                        f"dataset {path} line {number} is not a JSON object (one record per line)"
                    )
    except (UnicodeDecodeError, EOFError, OSError, lzma.LZMAError, zlib.error):
        read_text(path, "dataset", "check the path")  # reads it whole to say which byte, or why, as elsewhere
        raise
    if not found:
        raise UserError(f"dataset {path} is empty; it needs at least one record")


def check_folder(path: Path, subset: str | None = None, subset_setting: str | None = None) -> list[Path]:
    """Every data file of a folder is read: as its README.md's configs name them (a Hub snapshot's), else
    by name. datasets reads only the files named after a split once some are, and of those only the most
    common type; those, and the files no config names, it ignores silently.

    Returns the data files read (a config's: `subset`, else the default one); `subset_setting` chooses it.
    """
    data_files = [
        file for file in sorted(path.rglob("*"))
        if content_suffix(file) in FOLDER_TYPES and file.is_file() and file.name not in METADATA_FILES
        and not any(part.startswith((".", "__")) for part in file.relative_to(path).parts)
    ]  # fmt: skip
    if not data_files:
        raise UserError(
            f"dataset {path} holds no data files ({', '.join(LOADERS)}, also compressed); put them in it, "
            "or give a data file itself as the path"
        )
    import datasets

    configs = datasets.get_dataset_config_names(str(path)) if declares_configs(path) else [None]
    chosen = (subset or datasets.get_dataset_default_config_name(str(path))) if configs != [None] else None
    if chosen not in configs:
        which = f"not {subset!r}" if subset else "none is the default"
        fix = f"set {subset_setting} to one of them" if subset_setting else "give one's files as the path"
        raise UserError(f"dataset {path} has the configs {', '.join(configs)} (README.md), {which}; {fix}")
    read = _read_by(path, chosen)
    named = read.union(*(_read_by(path, config) for config in configs if config != chosen))
    ignored = [str(file.relative_to(path)) for file in data_files if file.resolve() not in named]
    if ignored:
        why = "no config of its README.md names it); add it to a config's data_files" if chosen else (
            "once some files are named after a split, only those are); name every file after its split "
            "(train, validation, test)"
        )  # fmt: skip
        raise UserError(f"dataset {path}: {_some(ignored)} would not be read ({why}, or give it as a data "
                        "source of its own")  # fmt: skip
    data_files = [file for file in data_files if file.resolve() in read]
    if chosen:
        log.info("data %s: config %s of its README.md, %d of its data files", path, chosen, len(data_files))
    for file in data_files:  # a lone JSON value crashes datasets' reader
        if content_suffix(file) == ".json" and _opening(file) not in ("", "[", "{"):
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


def declares_configs(path: Path) -> bool:
    """A folder's README.md declares configs (`configs:` in its YAML header), as a Hub dataset's does."""
    from huggingface_hub import DatasetCard

    return (path / "README.md").is_file() and bool(DatasetCard.load(path / "README.md").data.get("configs"))


def split_files(path: Path, config: str | None = None) -> dict[str, list[Path]]:
    """A folder's data files by split, as datasets splits them: as its README.md's `config` (None: the
    default) names them, else by name (train*, validation*, test*...)."""
    import datasets
    from datasets.data_files import DataFilesDict, get_data_patterns

    if declares_configs(path):
        files = datasets.load_dataset_builder(str(path), config).config.data_files
    else:
        files = DataFilesDict.from_patterns(get_data_patterns(str(path)), str(path))
    return {str(split): [Path(file) for file in names] for split, names in files.items()}


def _read_by(path: Path, config: str | None) -> set[Path]:
    return {file.resolve() for files in split_files(path, config).values() for file in files}


def folder_options(path: Path, data_files: list[Path]) -> dict[str, str]:
    """What `load_dataset` needs besides a folder: the field its JSON files wrap their records in
    (`{"data": [...]}`). datasets reads every file of a folder alike, so all of them must do so, or none.

    Raises:
        UserError: naming a file that wraps its records and one that does not (or in another field).
    """
    fields = {file: _wrapping_field(file) for file in data_files if _is_json(file)}
    wrapped = [(file, field) for file, field in fields.items() if field is not None]
    if not wrapped:
        return {}
    first, field = wrapped[0]
    other = next((file for file, other_field in fields.items() if other_field != field), None)
    if other is not None:
        how = f"in the field `{fields[other]}`" if fields[other] else "as a list or JSON Lines"
        raise UserError(
            f"dataset {path}: {first.relative_to(path)} holds its records in the field `{field}`, "
            f"{other.relative_to(path)} {how}; a folder's JSON files are read alike: write them in one form, "
            "or give each file as a data source of its own"
        )
    return {"field": field}


def json_records(files: list[Path]) -> list[Any]:
    """The records of JSON and JSON Lines files exactly as written. datasets' reader (pyarrow's) turns
    date-like text into timestamps, which keep no trace of the text, and reads text such as ` 1` back as
    a number when other records hold numbers there; it has no option to keep either as written."""
    records: list[Any] = []
    for file in files:
        text = read_text(file, "dataset", "check the path").removeprefix(BOM)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:  # JSON Lines (also in a .json file, as datasets reads them)
            # lines end at "\n" only: str.splitlines also ends them at U+2028 or U+0085 inside a string
            records += [json.loads(line) for line in text.split("\n") if line.strip()]
            continue
        if isinstance(data, dict):  # one record, or records wrapped in a field of a .json file
            field = _field_of_records(file, data) if content_suffix(file) == ".json" else None
            data = data[field] if field else [data]
        records += data
    return records


def json_dataset(files: list[Path]) -> datasets.Dataset:
    """`json_records` as a Dataset with the fields of all of them, as datasets' JSON reader gives them
    (`Dataset.from_list` takes the first record's fields only; a list of texts is a `text` field)."""
    import datasets

    records = [{"text": record} if isinstance(record, str) else record for record in json_records(files)]
    names = dict.fromkeys(name for record in records for name in record)
    columns = {name: [record.get(name) for record in records] for name in names}
    return datasets.Dataset.from_dict(columns, on_mixed_types="use_json")


def stray_item(path: Path, files: list[Path]) -> str | None:
    """Which item of a JSON file's list is not of the first item's kind (a record, or a text), as in
    `[{...}, 5]`, on which datasets' reader fails with a bare TypeError: the error line, or None."""
    for file in files:
        try:
            items = json_records([file])
        except (UserError, ValueError):  # not JSON at all: datasets' own error says more
            return None
        kind = str if items and isinstance(items[0], str) else dict
        first, wanted = ("a text",) * 2 if kind is str else ("a record", 'a record ({"field": value, ...})')
        for index, item in enumerate(items):
            if not isinstance(item, kind):
                shown = json.dumps(item)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                where = f"dataset {path}" if file == path else f"dataset {path}: {file.relative_to(path)}"
                against = f" where item 0 is {first}" if index else ""
                return f"{where} item {index} is {shown}{against}; make every item {wanted}"
    return None


def as_written(
    read: datasets.Dataset | datasets.DatasetDict, path: Path, subset: str | None = None
) -> datasets.Dataset | datasets.DatasetDict:
    """JSON records read again, as written: datasets' reader turned date-like text into timestamps.
    Only this rare case holds the records as Python objects while reading them."""
    import datasets

    if not isinstance(read, dict):  # a file
        return json_dataset([path])
    return datasets.DatasetDict({name: json_dataset(json_files(path, name, subset)) for name in read})


def json_files(path: Path, split: str, subset: str | None = None) -> list[Path]:
    """A local JSON file, or the files of a folder's split (of its config) if they are JSON (else none)."""
    if path.is_file():
        files = [path]
    elif path.is_dir() and not is_saved(path):
        files = split_files(path, subset).get(split, [])
    else:
        return []
    return files if all_json(files) else []


def holds_dates(read: datasets.Dataset | datasets.DatasetDict) -> bool:
    """Some field, at any depth, is a date, time or timestamp."""
    import datasets
    import pyarrow as pa

    splits = read.values() if isinstance(read, dict) else [read]
    return any(
        isinstance(feature, datasets.Value) and pa.types.is_temporal(feature.pa_type)
        for split in splits
        for feature in leaf_features(split.features)
    )


def leaf_features(feature: Any) -> Iterator[Any]:
    """The types of a (nested) feature's values: its fields', its list items', down to the leaves."""
    import datasets

    if isinstance(feature, dict):
        for field in feature.values():
            yield from leaf_features(field)
    elif isinstance(feature, (datasets.List, datasets.LargeList)):
        yield from leaf_features(feature.feature)
    else:
        yield feature


def all_json(files: list[Path]) -> bool:
    return all(_is_json(file) for file in files)


def _is_json(file: Path) -> bool:
    return FOLDER_TYPES[content_suffix(file)] == "json"


def is_saved(path: Path) -> bool:
    """A `save_to_disk` directory (which holds JSON files of its own, not records)."""
    return path.is_dir() and any((path / marker).is_file() for marker in SAVED_MARKERS)


def csv_options(path: Path) -> dict[str, Any]:
    """What `load_dataset` needs to read a CSV file's cells as written: every column as text (pandas would
    read an answer ` 37` as the integer 37, which no record format accepts and no quoting in the file can
    prevent), and only an empty cell as missing (pandas reads `NA`, `None` or `null` as missing too)."""
    import datasets

    options: dict[str, Any] = {"keep_default_na": False, "na_values": [""]}
    try:
        with open_text(path, newline="") as file:
            header = next(csv.reader(file, delimiter=CSV_SEPARATORS[content_suffix(path)]))
    except Exception:  # unreadable, empty, not UTF-8 or a damaged archive: the read says which
        return options
    if len(set(header)) != len(header) or not all(header):
        return options  # unnamed or repeated columns: datasets names them, and the record check says so
    header[0] = header[0].removeprefix(BOM)  # datasets reads past a byte-order mark; so must its columns
    return {**options, "features": datasets.Features({name: datasets.Value("string") for name in header})}


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
    field = _field_of_records(path, data)
    if field is None:
        return {}
    log.debug("data %s: records read from its %r field", path, field)
    return {"field": field}


def _field_of_records(path: Path, data: dict[str, Any]) -> str | None:
    """The field of a JSON object that holds its list of records; None for an object that is one record
    (or holds no list of records: reading it says which fields it has)."""
    if any(all(name in data for name in names) for names in REQUIRED_FIELDS.values()):
        return None
    lists = [
        key for key, value in data.items() if isinstance(value, list) and value and isinstance(value[0], dict)
    ]
    if len(lists) > 1:
        raise UserError(
            f"dataset {path} holds lists of records in several fields ({', '.join(lists)}); keep one list "
            "per file (or write JSON Lines, one record per line)"
        )
    return lists[0] if lists else None


def _wrapping_field(path: Path) -> str | None:
    """The field a folder's JSON file wraps its records in, if it does."""
    if content_suffix(path) != ".json" or _opening(path) != "{":
        return None
    return _records_field(path, read_text(path, "dataset", "check the path").removeprefix(BOM)).get("field")


def _opening(path: Path) -> str:
    """The first character of a text file (decompressed) that is not white space ("" when there is none)."""
    with DECOMPRESSORS.get(path.suffix.lower(), open)(path, "rb") as f:
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
