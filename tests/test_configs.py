"""Every shipped recipe in configs/ loads into TrainConfig (unknown keys or wrong types would fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.recipe import TrainConfig, load_config
from qpissa.settings import DataFormat

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "llama3-8b-24gb.yaml", "mix-chat.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path: Path, tmp_path: Path) -> None:
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    config = load_config(path, [])
    assert isinstance(config, TrainConfig) and config.data.train_sources()
    formats = [config.data.format, *(source.format for source in config.data.train_sources())]
    assert all(f is None or isinstance(f, DataFormat) for f in formats)  # None: detected from the data
    assert config.learning_rate <= 1e-4  # shipped recipes stay in the range PiSSA-style inits tolerate
    training_arguments(config, resolve_runtime(), tmp_path, show_progress=False)  # every Trainer option


def test_overrides_reach_nested_groups() -> None:
    config = load_config(CONFIGS[0], ["data.max_seq_len=128", "learning_rate=3e-5", "max_steps=7"])
    assert (config.data.max_seq_len, config.learning_rate, config.max_steps) == (128, 3e-5, 7)


def test_warmup_steps_replace_the_recipes_ratio_only_when_it_is_turned_off(tmp_path: Path) -> None:
    """Both set would leave warmup_steps winning silently; `warmup_ratio=0` says which one is meant."""
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    with pytest.raises(UserError, match=r"warmup_ratio=0\.03 and warmup_steps=10 both set the warmup"):
        load_config(demo, ["warmup_steps=10"])
    config = load_config(demo, ["warmup_ratio=0", "warmup_steps=10"])
    arguments = training_arguments(config, resolve_runtime(), tmp_path, show_progress=False)
    assert arguments.warmup_steps == 10 and arguments.get_warmup_steps(100) == 10


def test_data_format_beside_sources_is_kept_as_the_held_out_datas_format() -> None:
    """Unlike `data.samples`, `split` and `subset`, which beside `data.sources` are refused, `data.format`
    there reads eval_path (and `qpissa eval` of the run): it is accepted and used."""
    mix = next(path for path in CONFIGS if path.name == "mix-chat.yaml")
    config = load_config(mix, ["data.format=prompt_completion"])
    assert config.data.sources and config.data.eval_format() is DataFormat.PROMPT_COMPLETION


def test_samples_one_point_zero_is_refused_and_a_count_of_one_stays_a_count() -> None:
    """YAML `samples: 1.0` would draw one record where "all of it" was meant; `1` is the count one."""
    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    mix = next(path for path in CONFIGS if path.name == "mix-chat.yaml")
    with pytest.raises(UserError, match=r"`data\.samples` is 1\.0, which would draw one record; write 1"):
        load_config(demo, ["data.samples=1.0"])
    with pytest.raises(UserError, match=r"`data\.sources\.0\.samples` is 1\.0, which would draw one record"):
        load_config(mix, ["data.sources.0.samples=1.0"])
    assert load_config(demo, ["data.samples=1"]).data.samples == 1  # the count one
    assert load_config(demo, ["data.samples=0.5"]).data.samples == 0.5
