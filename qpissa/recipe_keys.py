"""What an unknown recipe key may mean: a qpissa recipe key first (a data key written at the top level, a
misspelling), then another fine-tuner's name for a qpissa setting, then a TrainingArguments option."""

from __future__ import annotations

import dataclasses
import difflib

from qpissa.recipe import DataConfig, TrainConfig

# suggested keys whose name alone does not say how to use them (`qpissa convert --resume` is a flag)
SUGGESTIONS = {"resume_from_checkpoint": "`resume_from_checkpoint=true` (resume after a kill)"}
# names other fine-tuners (TRL, Axolotl, LLaMA-Factory, litgpt) give settings that qpissa takes elsewhere
ALIASES = {
    **dict.fromkeys(("max_seq_length", "sequence_len", "cutoff_len", "max_length"), "`data.max_seq_len`"),
    **dict.fromkeys(("packing", "sample_packing"), "`data.packing`"),
    **dict.fromkeys(("completion_only_loss", "assistant_only_loss"), "`data.response_only`"),
    "train_on_inputs": "`data.response_only`, inverted (train_on_inputs=true is data.response_only=false)",
    "lr": "`learning_rate`",
    "num_epochs": "`num_train_epochs`",
    **dict.fromkeys(("micro_batch_size", "batch_size", "train_batch_size"), "`per_device_train_batch_size`"),
    "group_by_length": "`train_sampling_strategy=group_by_length`",
    **dict.fromkeys(("r", "lora_r", "lora_rank"), "`qpissa convert --rank R` (the conversion's rank)"),
    "lora_alpha": "`qpissa convert --alpha A` (the conversion's scale, alpha/r)",
    **dict.fromkeys(
        ("target_modules", "lora_target_modules", "lora_target"),
        "`qpissa convert --targets q_proj,v_proj` (the conversion chooses the adapted layers)",
    ),
}
OWN_CUTOFF = 0.8  # a recipe key is suggested first, when close; a TrainingArguments option at difflib's 0.6


def own_keys() -> dict[str, str]:
    """qpissa's recipe keys, by the name a key is compared with: `max_seq_len` -> `data.max_seq_len`."""
    top = {f.name: f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("data", "trainer")}
    return top | {f.name: f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.name not in top}


def spelling_hint(key: str, trainer_fields: list[str]) -> str:
    """The names `key` may mean: a recipe key close in spelling (a data key: `data.max_seq_len`), another
    fine-tuner's name for a qpissa setting, an option close in spelling, else names holding `key` as whole
    words (`resume`, `epochs`), which difflib misses when the name is much longer than the key."""
    if key in ALIASES:
        return f"qpissa takes it as {ALIASES[key]}"
    own = own_keys()
    if key in own:  # a data key at the top level
        return f"did you mean `{own[key]}`?"
    names = dict(own)  # recipe keys first, then the options
    names.update((name, name) for name in trainer_fields if name not in own)
    close = difflib.get_close_matches(key, list(own), n=1, cutoff=OWN_CUTOFF)
    close = close or difflib.get_close_matches(key, list(names), n=1)
    close = close or list(dict.fromkeys(name for name in names if f"_{key}_" in f"_{name}_"))[:3]
    if not close:
        return "check the spelling (README: Trainer options)"
    shown = (SUGGESTIONS.get(names[name], f"`{names[name]}`") for name in close)
    return f"did you mean {', '.join(shown)}?"
