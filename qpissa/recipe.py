"""The training recipe: `TrainConfig` and its data group, read from YAML plus `key=value` overrides.

Names follow transformers' TrainingArguments where one exists; `train.py` turns a recipe into a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.options import (
    coerce_fields,
)
from qpissa.settings import MIN_SEQ_LEN, SEED_LIMIT, DataFormat, Device

AUTO_OPTIM = "auto"  # paged 8-bit AdamW on CUDA, AdamW on CPU; any other name is transformers' own


@dataclass
class DataSource:
    """One source of training records, for mixing several in one run (`data.sources`)."""

    path: Path | None = field(
        default=None, metadata={"help": "a data file, a folder of them, a save_to_disk dir or a Hub name"}
    )
    format: DataFormat | None = field(default=None, metadata={"help": "record format; default: detected"})
    subset: str | None = field(default=None, metadata={"help": "Hub dataset configuration (subset)"})
    split: str = field(default="train", metadata={"help": "split to read"})
    samples: float | None = field(
        default=None,
        metadata={"help": "records to draw (seeded): a count >= 1 or a fraction in (0, 1); default: all"},
    )

    def __post_init__(self) -> None:
        if self.path is None:
            raise UserError("each of `data.sources` needs a `path`: a data file, directory or Hub name")
        coerce_fields(self)
        if self.samples is not None and not (
            0 < self.samples < 1 or (self.samples >= 1 and float(self.samples).is_integer())
        ):
            raise UserError(
                f"`samples` of {self.path} must be a whole count of at least 1 or a fraction in (0, 1), "
                f"got {self.samples:g}"
            )


@dataclass
class DataConfig:
    """Where the training data is and how to turn it into token sequences."""

    path: Path | None = field(
        default=None,
        metadata={"help": "training data: a .jsonl/.json/.csv/.parquet/.arrow file, a folder of them, a "
                  "save_to_disk dir or a Hub dataset name"},
    )  # fmt: skip
    format: DataFormat | None = field(default=None, metadata={"help": "record format; default: detected"})
    subset: str | None = field(default=None, metadata={"help": "Hub dataset configuration (subset)"})
    split: str = field(default="train", metadata={"help": "split of `path` to train on"})
    samples: float | None = field(
        default=None, metadata={"help": "records of `path` to draw (seeded): a count or a fraction"}
    )
    sources: list[DataSource] | None = field(
        default=None, metadata={"help": "several sources mixed (instead of path): [{path, format, samples}]"}
    )
    eval_path: Path | None = field(
        default=None, metadata={"help": "held-out data: a file, directory or Hub name (optional)"}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "split of `eval_path` to evaluate on; default: validation, else test, else train"},
    )
    max_seq_len: int = field(default=1024, metadata={"help": "tokens per sample; longer samples are cut"})
    response_only: bool = field(
        default=True, metadata={"help": "loss on response tokens only (else on all tokens)"}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "padding-free batches: samples end to end, attention kept within each sample"},
    )
    num_proc: int | None = field(default=None, metadata={"help": "processes that tokenize (datasets.map)"})
    eval_generate_samples: int = field(
        default=64,
        metadata={"help": "eval samples scored by greedy generation (exact match); 0 turns it off"},
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.path is not None and self.sources is not None:
            raise UserError("the config sets both `data.path` and `data.sources`; keep one of them")
        if self.path is None and self.sources is None:
            raise UserError(
                "the config needs one of `data.path` (a data file, directory or Hub dataset name) "
                "or `data.sources` (a list of them to mix)"
            )
        if self.sources is not None and not self.sources:
            raise UserError("`data.sources` is empty; list at least one {path: ...}")
        if self.path is not None:  # the shortcut for one source, checked as one
            DataSource(self.path, self.format, self.subset, self.split, self.samples)
        self._check_path_only_keys()
        if self.eval_split is not None and self.eval_path is None:
            raise UserError(
                "`data.eval_split` is set but `data.eval_path` is not; add held-out data or drop eval_split"
            )
        if self.max_seq_len < MIN_SEQ_LEN:
            raise UserError(f"`data.max_seq_len` must be at least {MIN_SEQ_LEN}, got {self.max_seq_len}")
        if self.eval_generate_samples < 0:
            raise UserError(
                f"`data.eval_generate_samples` must be 0 or more, got {self.eval_generate_samples}"
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise UserError(f"`data.num_proc` must be at least 1 (or left out), got {self.num_proc}")

    def _check_path_only_keys(self) -> None:
        """`subset`, `split` and `samples` choose from `data.path`: beside `data.sources` they would be
        ignored, silently (`format` is not among them: it is the held-out data's format, `eval_format`, and
        `qpissa eval` reads the run's with it)."""
        if self.sources is None:
            return
        defaults = {"subset": None, "split": "train", "samples": None}
        beside = [name for name, default in defaults.items() if getattr(self, name) != default]
        if beside:
            keys = ", ".join(f"`data.{name}`" for name in beside)
            raise UserError(
                f"the config sets {keys} beside `data.sources`, where only `data.path` takes it; set it on "
                f"each source instead (`data.sources.N.{beside[0]}`) or drop it"
            )

    def train_sources(self) -> list[DataSource]:
        """The sources to train on: `sources`, or `path` with its own options as the only one."""
        if self.sources is not None:
            return self.sources
        return [DataSource(self.path, self.format, self.subset, self.split, self.samples)]

    def source_prefix(self, index: int) -> str:
        """How the recipe names source `index`'s settings, for messages: `data.` or `data.sources.N.`."""
        return "data." if self.sources is None else f"data.sources.{index}."

    def eval_format(self) -> DataFormat | None:
        """`format`, or the one format every source names: eval data is read as the training data is
        (detected, it could take another format the records also fit, and score a rendering never trained)."""
        if self.format is not None or self.sources is None:
            return self.format
        named = {source.format for source in self.sources}
        return named.pop() if len(named) == 1 else None


@dataclass
class TrainConfig:
    """A training run; names follow transformers' TrainingArguments where one exists."""

    model: Path | None = field(
        default=None, metadata={"help": "QPiSSA directory written by `qpissa convert`"}
    )
    output_dir: Path | None = field(
        default=None, metadata={"help": "run directory (checkpoints, logs, adapter/)"}
    )
    data: DataConfig | None = field(
        default=None, metadata={"help": "training data (path, format, max_seq_len, ...)"}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (PiSSA wants ≤ 1e-4)"})
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "learning-rate schedule (any transformers SchedulerType)"}
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "samples per micro-batch"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "samples per evaluation batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 uses num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    optim: str = field(
        default=AUTO_OPTIM, metadata={"help": "optimizer: auto or any transformers OptimizerNames value"}
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 compute; default: on CUDA when supported"}
    )
    device: Device = field(default=Device.AUTO, metadata={"help": "auto, cpu or cuda"})
    seed: int = field(default=42, metadata={"help": "seed of data order and all other randomness"})
    logging_steps: int | float = field(
        default=10,
        metadata={"help": "print a log line every N steps, or a ratio of the run's in (0, 1) (the JSONL gets "
                  "every step)"},
    )  # fmt: skip
    save_steps: int | float = field(
        default=100,
        metadata={"help": "write output_dir/checkpoint-N every N steps, or a ratio of the run's in (0, 1)"},
    )
    save_total_limit: int | None = field(default=2, metadata={"help": "keep the last K checkpoints"})
    eval_steps: int | float | None = field(
        default=None,
        metadata={"help": "evaluate every N steps or a ratio of the run's (needs data.eval_path); "
                  "eval_strategy=steps alone: every logging_steps (save_steps with load_best_model_at_end)"},
    )  # fmt: skip
    resume_from_checkpoint: Path | None = field(
        default=None, metadata={"help": "checkpoint-N directory to resume, or true for output_dir's newest"}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing output_dir"})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "a .jinja file or the template itself; saved with the run (default: the model's)"},
    )
    trainer: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "every other TrainingArguments option, written flat in the YAML (report_to: ...)"},
    )

    def __post_init__(self) -> None:
        missing = [name for name in ("model", "output_dir", "data") if getattr(self, name) is None]
        if missing:
            raise UserError(f"the config needs {', '.join(f'`{m}`' for m in missing)}; see configs/demo.yaml")
        coerce_fields(self)
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        )
        problems = [f"`{name}` must be at least 1" for name in positive if getattr(self, name) < 1]
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append(
                f"`save_total_limit` must be at least 1 (or left out), got {self.save_total_limit}"
            )
        for name in ("logging_steps", "save_steps", "eval_steps"):
            steps = getattr(self, name)
            # written so that NaN fails too: a count of at least 1 or a ratio of the run in (0, 1)
            if steps is not None and not (0 < steps < 1 or (steps >= 1 and isinstance(steps, int))):
                problems.append(
                    f"`{name}` must be a count of steps (at least 1) or a ratio of the run in (0, 1), "
                    f"got {steps}"
                )
        # written so that NaN fails them too (every comparison with NaN is false)
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if not 0 < self.learning_rate < math.inf:
            problems.append(f"`learning_rate` must be positive, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm"):
            if not 0 <= getattr(self, name) < math.inf:
                problems.append(f"`{name}` must be 0 or a positive number, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"`max_steps` must be -1 or positive, got {self.max_steps}")
        if self.max_steps == -1 and not 0 < self.num_train_epochs < math.inf:
            problems.append(
                f"`num_train_epochs` must be a positive number, got {self.num_train_epochs}; or set max_steps"
            )
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"`seed` must be in [0, 2**32), got {self.seed}")
        shadowed = [name for name in self.trainer if name in {f.name for f in dataclasses.fields(self)}]
        if shadowed:
            keys = ", ".join(f"`trainer.{name}`" for name in shadowed)
            problems.append(
                f"{keys}: recipe keys go at the top level of the recipe (`{shadowed[0]}: ...`), where qpissa "
                "checks and records them, not under `trainer`"
            )
        if self.eval_steps is not None and self.data.eval_path is None:
            problems.append(
                "`eval_steps` is set but `data.eval_path` is not; add held-out data or drop eval_steps"
            )
        if problems:
            raise UserError("; ".join(problems))

    def data_inputs(self) -> dict[str, Path | None]:
        """Every file the run reads besides its model, by the name the config gives it: output_dir must
        stay apart from each (`overwrite_output_dir` replaces output_dir whole)."""
        inputs = {"data.eval_path": self.data.eval_path}
        if self.data.sources is None:
            inputs["data.path"] = self.data.path
        for index, source in enumerate(self.data.sources or []):
            inputs[f"data.sources.{index}.path"] = source.path
        template = Path(self.chat_template).expanduser() if self.chat_template else None
        inputs["chat_template"] = template if template is not None and template.is_file() else None
        return inputs


def recipe_keys_help() -> str:
    """`train --help`'s list of recipe keys, their defaults and what they do, from the dataclasses."""
    lines = ["recipe keys (default), besides any TrainingArguments option (README: train, eval):"]
    for prefix, settings in (("", TrainConfig), ("data.", DataConfig)):
        for setting in dataclasses.fields(settings):
            if setting.name in ("data", "trainer"):
                continue
            value = getattr(setting.default, "value", setting.default)  # an Enum's value: `auto`
            default = "" if value in (None, dataclasses.MISSING) else f" ({value})"
            lines.append(f"  {prefix}{setting.name}{default}: {setting.metadata.get('help', '')}")
    return "\n".join(lines)
