"""Where training and held-out records come from: local files and folders, `save_to_disk` datasets, Hub
datasets, and several of them mixed, each read with `datasets` so that nothing is held as Python lists.

A path that exists is read locally; any other `name` or `owner/name` goes to `datasets.load_dataset`,
which works online and, offline (`HF_HUB_OFFLINE=1`), from what a previous download left in the cache.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    json_files,
    json_records,
    leaf_features,
    split_files,
    stray_item,
)
from qpissa.data_formats import KNOWN_ROLES, check_record, detect_format
from qpissa.hub import is_hub_name
from qpissa.recipe import DataSource
from qpissa.settings import DataFormat

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

# local data below this size is read in a few seconds (~100 MB/s measured), so datasets' "Generating
# train split" bars are hidden: they would only stand above the data's own error line
QUIET_READ_BYTES = 256 << 20


def load_source(
    source: DataSource,
    seed: int = 0,
    format_setting: str | None = "data.format",
    split_setting: str | None = "data.split",
) -> tuple[datasets.Dataset, DataFormat]:
    """Read one source, pick its format (detected when not given, and said) and check every record.

    `format_setting` and `split_setting` are how the user chooses the format and the split where a
    command lets them (None: it does not), for the message when no format fits or no such split exists.

    Returns:
        The records (one split, `source.samples` of them when set) and their format.

    Raises:
        UserError: missing or unreadable data, unknown extension, no such split, or a bad record.
    """
    dataset = load_records(source.path, source.subset, source.split, split_setting)
    return _check_records(dataset, source, seed, format_setting, _beside(split_setting, "samples"))


def _check_records(
    dataset: datasets.Dataset,
    source: DataSource,
    seed: int = 0,
    format_setting: str | None = "data.format",
    samples_setting: str | None = None,
) -> tuple[datasets.Dataset, DataFormat]:
    """`load_source` on records read already: the format picked, every record checked, `samples` drawn
    (`samples_setting`: how the user sets it, for the message when there are too few records)."""
    import datasets

    data_format = source.format or _detected_format(dataset, source.path, format_setting)
    try:
        unknown_roles, empty = _check_each(dataset, data_format, source.path)
    except UserError:
        if any(isinstance(feature, datasets.Json) for feature in leaf_features(dataset.features)):
            # a field mixing text and other values across records: datasets reads it back from JSON, text
            # such as " 1" as a number, so the record to blame is found as written
            files = json_files(source.path, source.split, source.subset)
            stray = stray_item(source.path, files)  # or a list mixing texts and records
            if stray:
                raise UserError(stray) from None
            _check_each(json_records(files), data_format, source.path)
        raise
    if empty:
        log.warning(
            "data %s: %d of %d records have an empty answer (or text); trained, they teach the model to "
            "answer nothing (only the end of turn is left to learn): fill or remove them", source.path, empty,
            len(dataset),
        )  # fmt: skip
    if unknown_roles:
        found = ", ".join(f"{role!r} in {count} record(s)" for role, count in unknown_roles.most_common())
        log.warning(
            "data %s: turns with the role %s are rendered by the chat template as given and never trained "
            "on; check the spelling (known: %s)", source.path, found, ", ".join(sorted(KNOWN_ROLES)),
        )  # fmt: skip
    return _subsample(dataset, source, seed, samples_setting or "samples"), data_format


def _check_each(
    records: Iterable[dict[str, Any]], data_format: DataFormat, path: Path
) -> tuple[Counter[str], int]:
    """Every record checked: the roles no template knows, counted, and the records with an empty answer."""
    unknown_roles: Counter[str] = Counter()
    empty = 0
    for index, record in enumerate(records):
        checked = check_record(record, data_format, f"{path} record {index}")
        unknown_roles.update(checked.roles - KNOWN_ROLES)
        empty += checked.empty_answer
    return unknown_roles, empty


def load_records(
    path: Path, subset: str | None = None, split: str = "train", split_setting: str | None = "split"
) -> datasets.Dataset:
    """A local data file, a folder of data files, a `save_to_disk` directory or a Hub dataset, as one split.

    Raises:
        UserError: naming the path (or Hub name) and the fix; a split without records is one.
    """
    if path.is_file() and (subset is not None or split != "train"):  # they would be ignored, silently
        asked = f"subset {subset!r}" if subset is not None else f"split {split!r}"
        raise UserError(
            f"dataset {path} is a single file, which has no subsets or splits (asked for {asked}); "
            "leave them unset, or point at a folder, a save_to_disk directory or a Hub dataset"
        )
    read = _read(path, subset, _beside(split_setting, "subset"))
    if not isinstance(read, dict) and (subset is not None or split != "train"):  # a save_to_disk'd Dataset
        asked = f"subset {subset!r}" if subset is not None else f"split {split!r}"
        raise UserError(
            f"dataset {path} is one saved Dataset, which has no subsets or splits (asked for {asked}); leave "
            "them unset, or save a DatasetDict with its splits"
        )
    return _one_split(read, split, path, split_setting)


def load_heldout(
    path: Path,
    split: str | None,
    data_format: DataFormat | None,
    split_setting: str,
    format_setting: str | None = "data.format",
) -> tuple[datasets.Dataset, DataFormat, str]:
    """Held-out records checked as `load_source` checks them, their format, and the split they came from.

    Without `split`, the held-out one among the splits read: validation, else test, else train (a file is
    its one split). Training reads the train split by default; evaluating it too would measure fit, not
    held-out loss. Choosing among the splits read reads the data once and asks a Hub dataset once.

    Args:
        path: a data file, folder, `save_to_disk` directory or Hub dataset name.
        split: the split to read; None: the held-out one.
        data_format: the records' format; None: detected from the first record (and said).
        split_setting, format_setting: how the user sets each (`--split`, `data.eval_split`), for errors.

    Raises:
        UserError: as `load_records`, or a dataset with several splits and none of them held out.
    """
    if split is None:
        read = _read(path, None)
        names = list(read) if isinstance(read, dict) else ["train"]  # a DatasetDict, or one split
        split = _heldout(names, path, split_setting)
        records = _one_split(read, split, path, split_setting)
    else:
        records = load_records(path, split=split, split_setting=split_setting)
    source = DataSource(path, data_format, split=split)
    records, data_format = _check_records(records, source, format_setting=format_setting)
    return records, data_format, split


def _heldout(names: list[str], path: Path, split_setting: str) -> str:
    chosen = next((name for name in ("validation", "test", "train") if name in names), None)
    if chosen is None and len(names) == 1:
        chosen = names[0]
    if chosen is None:
        raise UserError(f"dataset {path} has splits {', '.join(names)}; set {split_setting} to one of them")
    if len(names) > 1:
        log.info("data %s: split %s (the held-out one; set %s to choose)", path, chosen, split_setting)
    return chosen


def _detected_format(dataset: datasets.Dataset, path: Path, format_setting: str | None) -> DataFormat:
    data_format = detect_format(dataset[0], f"{path} record 0", format_setting)
    choose = f"; set {format_setting} to choose" if format_setting else ""  # convert --calib has none
    log.info("data %s: format %s (detected%s)", path, data_format.value, choose)
    return data_format


def _read(
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


def _one_split(
    read: datasets.Dataset | datasets.DatasetDict, split: str, path: Path, split_setting: str | None
) -> datasets.Dataset:
    """`split` of the splits read (a file or a saved Dataset is its one split), if it holds records: a
    split without any is an error only when it is the one asked for."""
    if not isinstance(read, dict):
        if len(read) == 0:
            raise UserError(f"dataset {path} has no records; it needs at least one")
        return read
    records = _split(read, split, path, split_setting)
    if len(records) == 0:
        other = f" (or set {split_setting} to another split)" if split_setting else ""
        raise UserError(f"dataset {path} has no records in its split {split!r}; it needs at least one{other}")
    return records


def _split(dataset: Any, split: str, path: Path, split_setting: str | None) -> datasets.Dataset:
    if split not in dataset:
        fix = f"set {split_setting}" if split_setting else "give one of its files instead"
        named = (
            " (a folder's files are split by name: train*, validation*, test* or eval*)"
            if path.is_dir()
            else ""
        )
        raise UserError(f"dataset {path} has splits {', '.join(dataset)}, not {split!r}{named}; {fix}")
    return dataset[split]


def _subsample(dataset: datasets.Dataset, source: DataSource, seed: int, setting: str) -> datasets.Dataset:
    """`samples` records drawn without replacement (seeded), or all of them; more than there are, or a
    fraction that rounds to none, is an error rather than a silent repeat (or an empty source)."""
    if source.samples is None:
        return dataset
    total, samples = len(dataset), source.samples
    count = int(samples if samples >= 1 else round(samples * total))
    if count < 1:
        raise UserError(
            f"data source {source.path} has {total} records; {setting}={samples:g} of them rounds to 0 "
            f"records; set {setting} to a larger fraction, or to a count from 1 to {total}"
        )
    if count > total:
        raise UserError(
            f"data source {source.path} has {total} records; {setting}={samples:g} asks for {count}; use at "
            f"most {total} (or a fraction in (0, 1))"
        )
    return dataset.shuffle(seed=seed).select(range(count))


def _beside(split_setting: str | None, name: str) -> str | None:
    """The setting `name` of the source whose split `split_setting` sets (`data.sources.1.split` ->
    `data.sources.1.subset`); None where the command has no such setting (eval's `--split`)."""
    if split_setting is None or not split_setting.endswith(".split"):
        return None
    return split_setting.removesuffix("split") + name


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
