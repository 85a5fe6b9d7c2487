"""Every split of a dataset read with `datasets`: a local data file, a folder of them, a `save_to_disk`
directory or a Hub dataset, quietly for small local data, and read errors said in one line.

A path that exists is read locally; any other `name` or `owner/name` goes to `datasets.load_dataset`,
which works online and, offline (`HF_HUB_OFFLINE=1`), from what a previous download left in the cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from qpissa import UserError
from qpissa.artifacts import content_suffix
from qpissa.data_files import (
    FOLDER_TYPES,
    LOADERS,
    all_json,
    as_written,
    check_file,
    check_folder,
    csv_options,
    declares_configs,
    folder_options,
    holds_dates,
    is_saved,
    split_files,
    stray_item,
)
from qpissa.hub import is_hub_name

if TYPE_CHECKING:
    import datasets

# local data below this size is read in a few seconds (~100 MB/s measured), so datasets' "Generating
# train split" bars are hidden: they would only stand above the data's own error line
QUIET_READ_BYTES = 256 << 20


def read_dataset(
    path: Path, subset: str | None, subset_setting: str | None = None
) -> datasets.Dataset | datasets.DatasetDict:
    """Every split of a dataset (one Dataset for a file, or a `save_to_disk`'d Dataset); `subset_setting`
    chooses a folder's config, for the message when none is chosen."""
    import datasets

    local = path.exists()
    if not local and not is_hub_name(path):
        raise UserError(f"dataset {path} does not exist; check the path (or give a Hub name: owner/name)")
    saved = is_saved(path)
    files = [path] if path.is_file() else []  # a local dataset's files; none for a Hub name
    try:
        with _bars_hidden_below(QUIET_READ_BYTES, _local_bytes(path) if local else None), _datasets_quiet():
            data_files = check_folder(path, subset, subset_setting) if path.is_dir() and not saved else []
            options = check_file(path) if path.is_file() else folder_options(path, data_files)
            files = files or data_files
            if saved:
                return _load_saved(path)
            if not local:
                return datasets.load_dataset(str(path), subset)
            if path.is_file():
                read = _load_file(path, options)
            else:
                read = _load_folder(path, subset, data_files, options)
    except UserError:
        raise
    except Exception as error:  # datasets wraps parse and connection errors in many exception types
        stray = stray_item(path, files) if local and all_json(files) else None
        raise UserError(stray or _read_problem(path, local, error, files)) from None
    return as_written(read, path, subset) if all_json(files) and holds_dates(read) else read


def _load_file(path: Path, options: dict[str, str]) -> datasets.Dataset:
    import datasets

    loader = LOADERS[content_suffix(path)]
    as_text = csv_options(path) if loader == "csv" else {}
    return datasets.load_dataset(loader, data_files=str(path), split="train", **as_text, **options)


def _load_folder(
    path: Path, subset: str | None, data_files: list[Path], options: dict[str, str]
) -> datasets.DatasetDict:
    """Every split of a folder of data files, one without records as an empty Dataset: datasets'
    `load_dataset` reads no split of a folder once one of them is empty."""
    import datasets

    csv_files = [f for f in data_files if FOLDER_TYPES[content_suffix(f)] == "csv"]
    as_text = csv_options(csv_files[0]) if csv_files else {}  # a folder holds one type
    # a README.md config's files, found: datasets keys their cache by the names in the README alone, so
    # another folder's, or an edited file, would be read from the cache
    files = split_files(path, subset) if declares_configs(path) else None
    found = {split: [str(file) for file in names] for split, names in files.items()} if files else None
    builder = datasets.load_dataset_builder(str(path), subset, data_files=found, **as_text, **options)
    builder.download_and_prepare()
    splits = {
        name: builder.as_dataset(name) if info.num_examples else datasets.Dataset.from_list([])
        for name, info in builder.info.splits.items()
    }
    return datasets.DatasetDict(splits)


def _load_saved(path: Path) -> datasets.Dataset | datasets.DatasetDict:
    """A `save_to_disk` directory, split by split: datasets reads none of a DatasetDict's splits once one
    of them is empty (it saved no data file for it)."""
    import datasets

    if not (path / "dataset_dict.json").is_file():
        return _load_saved_split(path)
    names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    return datasets.DatasetDict({name: _load_saved_split(path / name) for name in names})


def _load_saved_split(path: Path) -> datasets.Dataset:
    """One saved Dataset, in memory: a transform of a memory-mapped one writes its cache into the user's
    files. One saved without records, which datasets cannot load back, is read as empty."""
    import datasets

    if json.loads((path / "state.json").read_text()).get("_data_files") == []:  # saved without records
        return datasets.Dataset.from_list([])
    return datasets.load_from_disk(str(path), keep_in_memory=True)


def _local_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


@contextmanager
def _bars_hidden_below(threshold: int, size: int | None) -> Iterator[None]:
    """datasets' progress bars hidden while reading local data of fewer than `threshold` bytes."""
    import datasets

    if size is None or size >= threshold or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    """datasets logs a read error twice (its own handler and the root's) before raising it, and notes such
    as a dataset card without metadata: the error it raises is said once, as one line, by the caller."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_problem(path: Path, local: bool, error: Exception, files: list[Path]) -> str:
    cause = error.__cause__ or error
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if "corresponds to no data" in reason or "EmptyDatasetError" in type(error).__name__:
        return f"dataset {path} has no records; it needs at least one"
    if "column names don't match" in str(cause):  # files (or lines) of one folder with other fields
        return (
            f"dataset {path} holds records with different fields; make every record's fields the same, "
            "or give each file as a data source of its own"
        )
    if not local:
        return (
            f"dataset {path} is no local file or directory, and as a Hub dataset it cannot be loaded "
            f"({type(error).__name__}: {reason}); check the path or name, your connection, or (with "
            "HF_HUB_OFFLINE=1) that a previous download is in the datasets cache"
        )
    for file in files if path.is_dir() else []:  # the folder's file datasets failed on, as it names one alone
        try:
            if file.stat().st_size and content_suffix(file) in LOADERS:  # an empty one is an empty split
                check_file(file)  # (a folder's .txt, which a file alone may not be, is left to datasets)
        except UserError as damaged:
            return str(damaged)
    kind = path.suffix.lstrip(".") or "save_to_disk or data-file folder"
    return f"cannot read dataset {path} ({type(cause).__name__}: {reason}); check that it is a valid {kind}"
