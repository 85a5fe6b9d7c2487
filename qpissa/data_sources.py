"""Where training and held-out records come from, checked: one split of a source (`data_read` reads it),
its format picked, every record checked, `samples` drawn; the held-out split of eval data.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpissa import UserError
from qpissa.data_files import is_saved, json_files, json_records, leaf_features, stray_item
from qpissa.data_formats import KNOWN_ROLES, check_record, detect_format
from qpissa.data_read import read_dataset
from qpissa.recipe import DataSource
from qpissa.settings import DataFormat

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

# where `samples` draws records, each one's number in its source, for messages that name a record
RECORD_COLUMN = "__qpissa_record__"
# why a record that is fine as written fails as datasets read it
MIXED_FIELD = (
    "(as datasets reads it: a field holding text in some records and lists or numbers in others is read as "
    'JSON, so text such as "4" turns into a number); write that field in one form in every record (chat '
    "content: all text, or all lists of text parts)"
)


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
    return check_records(dataset, source, seed, format_setting, _beside(split_setting, "samples"))


def check_records(
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
    except UserError as error:
        files = json_files(source.path, source.split, source.subset)
        if files and any(isinstance(feature, datasets.Json) for feature in leaf_features(dataset.features)):
            # a field mixing text and other values across records: datasets reads it back from JSON, text
            # such as " 1" as a number, so the record to blame is found as written
            stray = stray_item(source.path, files)  # or a list mixing texts and records
            if stray:
                raise UserError(stray) from None
            _check_each(json_records(files), data_format, source.path)
            raise UserError(f"{error} {MIXED_FIELD}") from None  # as written, the record is fine
        raise
    if empty:
        log.warning(
            "data %s: %d of %d records have an empty answer; trained, they teach the model to answer nothing "
            "(only the end of turn is left to learn): fill or remove them", source.path, empty, len(dataset),
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
    read = read_dataset(path, subset, _beside(split_setting, "subset"))
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
        read = read_dataset(path, None)
        names = list(read) if isinstance(read, dict) else ["train"]  # a DatasetDict, or one split
        split = _heldout(names, path, split_setting)
        records = _one_split(read, split, path, split_setting)
    else:
        records = load_records(path, split=split, split_setting=split_setting)
    source = DataSource(path, data_format, split=split)
    records, data_format = check_records(records, source, format_setting=format_setting)
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
        if is_saved(path):  # the splits it was saved with, not files named after splits
            named = " (the splits it was saved with, as its dataset_dict.json lists them)"
        elif path.is_dir():
            named = " (a folder's files are split by name: train*, validation*, test* or eval*)"
        else:
            named = ""
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
    import numpy as np

    numbered = dataset.add_column(RECORD_COLUMN, np.arange(total))  # the drawn records' own numbers
    return numbered.shuffle(seed=seed).select(range(count))


def _beside(split_setting: str | None, name: str) -> str | None:
    """The setting `name` of the source whose split `split_setting` sets (`data.sources.1.split` ->
    `data.sources.1.subset`); None where the command has no such setting (eval's `--split`)."""
    if split_setting is None or not split_setting.endswith(".split"):
        return None
    return split_setting.removesuffix("split") + name
