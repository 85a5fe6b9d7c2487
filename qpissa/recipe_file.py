"""A recipe file read: YAML with no key given twice, `key=value` overrides applied, every TrainingArguments
option gathered under `trainer`, then checked as a `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from qpissa import UserError
from qpissa.artifacts import ADAPTER_DIR, RUN_MARKERS, has_adapter, latest_checkpoint, read_text
from qpissa.options import RecipeLoader, api_path, apply_overrides, from_dict, got, yaml_problem
from qpissa.recipe import TrainConfig


class _UniqueKeyLoader(RecipeLoader):
    """The recipe loader, but a key given twice in one mapping is an error: PyYAML keeps the last, so a
    recipe edited by appending `learning_rate: ...` would train with whichever came last, silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: Path | str, overrides: list[str]) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` / `--key value` overrides and validate it.

    Keys that are no recipe key go to `trainer` (TrainingArguments options), which `train` checks
    against transformers' own dataclass.

    Raises:
        UserError: missing/unparseable file, unknown keys, wrong types, bad combinations.
    """
    if isinstance(overrides, str):
        raise UserError(f"overrides must be a list of key=value texts, got one text; write [{overrides!r}]")
    path = api_path(path, "path")  # the Python API takes a text path too
    text = read_text(path, "config", "pass a YAML recipe such as configs/demo.yaml")
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML ({yaml_problem(error)}); fix that line") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of settings, not {type(values).__name__}")
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    written = values.get("trainer")
    nested = written if isinstance(written, dict) else {}
    twice = [f"`{key}` ({values[key]}) and `trainer.{key}` ({nested[key]})" for key in nested
             if key in values and key not in own]  # fmt: skip
    if twice:  # else the top level's would win, silently; an override of either is the user's choice
        raise UserError(f"config {path} sets {'; '.join(twice)}: one option twice; keep one of them")
    if written is None or isinstance(written, dict):  # the file's options in one place: an override wins
        values["trainer"] = {**nested, **{key: values.pop(key) for key in list(values) if key not in own}}
    values = apply_overrides(values, overrides)
    if isinstance(values.get("resume_from_checkpoint"), bool):  # the Trainer's idiom for the newest one
        values["resume_from_checkpoint"] = (
            _newest_checkpoint(values) if values["resume_from_checkpoint"] else None
        )
    trainer = {key: values.pop(key) for key in list(values) if key not in own}  # checked by train
    nested = values.get("trainer") or {}  # `trainer:` with every entry commented out is empty
    if not isinstance(nested, dict):
        raise UserError(
            f"`trainer` must be a mapping of TrainingArguments options ({{report_to: ...}}), "
            f"{got(nested)}; or write each option at the top level of the recipe"
        )
    trainer = {**nested, **trainer}
    if values.get("warmup_ratio") and "warmup_steps" in trainer:  # else warmup_steps would win, silently
        raise UserError(
            f"warmup_ratio={values['warmup_ratio']} and warmup_steps={trainer['warmup_steps']} both set the "
            "warmup; keep one (warmup_steps counts steps, or is a fraction of them below 1; an override "
            "warmup_ratio=0 turns the recipe's ratio off)"
        )
    _check_samples_written(values.get("data"))
    return from_dict(TrainConfig, {**values, "trainer": trainer})


def _check_samples_written(data: Any) -> None:
    """`samples: 1.0` in a recipe reads as the count of one record (settings store every count as a
    number), where "all of it" was most likely meant: refuse it while the written value is still seen.

    Raises:
        UserError: naming the key, with both ways to write what was meant.
    """
    if not isinstance(data, dict):
        return  # from_dict names the wrong type
    sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    written = {"data.samples": data.get("samples")} | {
        f"data.sources.{index}.samples": source.get("samples")
        for index, source in enumerate(sources)
        if isinstance(source, dict)
    }
    for key, samples in written.items():
        if isinstance(samples, float) and samples == 1.0:
            raise UserError(
                f"`{key}` is 1.0, which would draw one record; write 1 for one, or leave it out for all"
            )


def _newest_checkpoint(values: dict) -> str:
    """`resume_from_checkpoint: true`: the newest complete checkpoint-N in output_dir."""
    output_dir = values.get("output_dir")
    checkpoint = latest_checkpoint(Path(output_dir)) if output_dir else None
    if checkpoint is None:
        directory = Path(output_dir) if output_dir else None
        if directory is not None and has_adapter(directory / ADAPTER_DIR):  # finished, saving no checkpoint
            start = "leave resume_from_checkpoint out and choose a new output_dir to train again"
        elif directory is not None and any((directory / marker).is_file() for marker in RUN_MARKERS):
            # stopped before its first checkpoint: nothing to resume, and train does not mix runs
            start = "replace resume_from_checkpoint with overwrite_output_dir=true to start the run again"
        else:
            start = "leave resume_from_checkpoint out to start the run"
        raise UserError(
            f"resume_from_checkpoint=true, but output_dir {output_dir} holds no complete checkpoint-N; "
            f"name one, or {start}"
        )
    return str(checkpoint)
