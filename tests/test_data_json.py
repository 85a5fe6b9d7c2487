"""JSON and JSON Lines records read as written: date-like text, fields mixing text and other values,
records wrapped in an object inside a folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.data_sources import load_source
from qpissa.recipe import DataSource
from qpissa.settings import DataFormat

DATES = [
    {"prompt": "Normalize the date: March 1, 2023\nAnswer:", "completion": "2023-03-01"},
    {"prompt": "Normalize: 2 March 2023, 10 am\nAnswer:", "completion": "2023-03-02T10:00:00"},
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_date_like_text_is_read_as_the_text_written(tmp_path: Path) -> None:
    """datasets' JSON reader (pyarrow's) turns ISO-like text into timestamps, `2023-03-01 00:00:00` once
    read back; every record format needs the text itself."""
    (tmp_path / "dates.json").write_text(json.dumps(DATES))
    (tmp_path / "folder").mkdir()
    _write_jsonl(tmp_path / "folder" / "train.jsonl", DATES)
    _write_jsonl(tmp_path / "folder" / "test.jsonl", DATES[:1])
    for path in (_write_jsonl(tmp_path / "dates.jsonl", DATES), tmp_path / "dates.json", tmp_path / "folder"):
        records, data_format = load_source(DataSource(path))
        assert data_format is DataFormat.PROMPT_COMPLETION, path
        assert records.to_list() == DATES, path
    assert load_source(DataSource(tmp_path / "folder", split="test"))[0].to_list() == DATES[:1]
    chat = [{"role": "user", "content": "Today, as a date?"}, {"role": "assistant", "content": "2023-03-01"}]
    late = {"messages": chat, "sent": {"at": "2023-03-01T10:00:00"}}  # nested, in one record only
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}, late])
    records, data_format = load_source(DataSource(path))
    assert data_format is DataFormat.MESSAGES and records["messages"] == [chat, chat]
    assert records["sent"] == [None, {"at": "2023-03-01T10:00:00"}]


def test_a_field_mixing_text_and_numbers_blames_the_record_holding_a_number(tmp_path: Path) -> None:
    """datasets stores such a field as JSON and reads the text ` 1` back as the number 1: the error named
    record 0 (got int), which is text as written, not record 5."""
    records = [{"prompt": f"Q{i}: what is {i}+1?\nA:", "completion": f" {i + 1}"} for i in range(8)]
    records[5]["completion"] = 6
    (tmp_path / "folder").mkdir()
    _write_jsonl(tmp_path / "folder" / "train.jsonl", records)
    for path in (_write_jsonl(tmp_path / "mixed.jsonl", records), tmp_path / "folder"):
        where = re.escape(str(path))
        with pytest.raises(UserError, match=rf"^{where} record 5: field `completion` must be text, got int$"):
            load_source(DataSource(path))


def test_records_wrapped_in_an_object_are_read_from_a_folder_as_from_a_file(tmp_path: Path) -> None:
    """datasets read `{"version": 2, "data": [...]}` in a folder as one record, which fits no format."""
    records = [{"prompt": "What is 30 plus 7?", "completion": " 37"}, {"prompt": "And 2?", "completion": "2"}]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"version": 2, "data": records}))
    (folder / "test.json").write_text(json.dumps({"version": 2, "data": records[:1]}))
    read, data_format = load_source(DataSource(folder))
    assert data_format is DataFormat.PROMPT_COMPLETION and read.to_list() == records
    assert load_source(DataSource(folder, split="test"))[0].to_list() == records[:1]
    _write_jsonl(folder / "test.json", records[:1])  # JSON Lines: no field to read it from
    wrapped = r"train\.json holds its records in the field `data`, test\.json as a list or JSON Lines; "
    with pytest.raises(UserError, match=wrapped):
        load_source(DataSource(folder))


def test_a_list_of_date_like_texts_is_read_as_text(tmp_path: Path) -> None:
    """datasets reads a JSON list of texts as the field `text`; date-like ones were read again as records."""
    path = tmp_path / "dates.json"
    path.write_text(json.dumps(["2023-03-01", "2023-03-02T10:00:00"]))
    records, data_format = load_source(DataSource(path))
    assert data_format is DataFormat.TEXT and records["text"] == ["2023-03-01", "2023-03-02T10:00:00"]


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([{"text": "a"}, 5], r"item 1 is 5 where item 0 is a record; make every item a record \("),
        ([{"text": "a"}, "b"], r'item 1 is "b" where item 0 is a record; make every item a record \('),
        (["a", {"text": "b"}], r'item 1 is \{"text": "b"\} where item 0 is a text; make every item a text$'),
        ([5, {"text": "b"}], r"item 0 is 5; make every item a record \("),
    ],
)
def test_a_list_mixing_records_with_other_items_names_the_first_stray_one(
    tmp_path: Path, items: list, error: str
) -> None:
    """datasets failed on `[{...}, 5]` with a bare TypeError, and a list of texts with a record in it
    reached the record checks as a text."""
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "list.json", tmp_path / "folder" / "train.json"):
        path.write_text(json.dumps(items))
    for path, where in ((tmp_path / "list.json", ""), (tmp_path / "folder", r": train\.json")):
        with pytest.raises(UserError, match=rf"^dataset {re.escape(str(path))}{where} {error}"):
            load_source(DataSource(path))


def test_a_compressed_json_file_in_a_folder_is_read_as_the_same_file_uncompressed(tmp_path: Path) -> None:
    """Records wrapped in an object, and a lone value, were left to datasets when compressed: one record,
    and a bare error."""
    import gzip

    records = [{"prompt": "What is 30 plus 7?", "completion": " 37"}, {"prompt": "And 2?", "completion": "2"}]
    (tmp_path / "wrapped").mkdir()
    with gzip.open(tmp_path / "wrapped" / "train.json.gz", "wt") as f:
        f.write(json.dumps({"version": 2, "data": records}))
    assert load_source(DataSource(tmp_path / "wrapped"))[0].to_list() == records
    (tmp_path / "value").mkdir()
    with gzip.open(tmp_path / "value" / "train.json.gz", "wt") as f:
        f.write("5")
    with pytest.raises(UserError, match=r"train\.json\.gz holds a JSON number, not records; "):
        load_source(DataSource(tmp_path / "value"))


def test_line_separators_inside_a_string_are_text_not_line_ends(tmp_path: Path) -> None:
    """`json.dumps(..., ensure_ascii=False)` writes U+2028, U+2029 and U+0085 raw: str.splitlines ended a
    line there, so a valid file was refused, and in a folder, with a date-like field, crashed."""
    records = [
        {"prompt": "Line one\u2028still the prompt\u2029and\x85more:", "completion": "2023-03-01"},
        {"prompt": "And then?", "completion": "2024-01-02"},
    ]
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    (tmp_path / "folder").mkdir()
    for path in (tmp_path / "u2028.jsonl", tmp_path / "folder" / "train.jsonl"):
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "cr.jsonl").write_bytes("".join(line + "\r" for line in lines).encode())  # old Mac endings
    for path in (tmp_path / "u2028.jsonl", tmp_path / "folder", tmp_path / "cr.jsonl"):
        assert load_source(DataSource(path))[0].to_list() == records, path
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(line + "\n" for line in lines) + '{"prompt": \n', encoding="utf-8")
    with pytest.raises(
        UserError, match=r"bad\.jsonl line 3 is not valid JSON \(Expecting value, column 12\)"
    ):
        load_source(DataSource(bad))


def test_json_lines_are_checked_without_holding_the_file(tmp_path: Path) -> None:
    """The check read the whole file into one string and a list of lines, ~8 times its size in memory
    before datasets read it; line by line it holds one line. Its errors still name the line and byte."""
    import tracemalloc

    from qpissa.data_files import check_file

    line = json.dumps(
        {"prompt": "Q: " + "word " * 200 + "\U0001f389", "completion": " a"}, ensure_ascii=False
    )
    path = tmp_path / "big.jsonl"
    path.write_text((line + "\n") * 4000, encoding="utf-8")  # 4 MB
    tracemalloc.start()
    try:
        check_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < path.stat().st_size // 10, peak
    path.write_bytes((line + "\n").encode() * 2 + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"is not UTF-8 text \(byte {2 * len(line.encode()) + 2 + 15} "):
        check_file(path)
    path.write_text(line + "\n\n  \n[1]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"big\.jsonl line 4 is not a JSON object"):
        check_file(path)
