"""Every shipped recipe in configs/ loads into TrainConfig (unknown keys or wrong types would fail here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.recipe import TrainConfig
from qpissa.recipe_file import load_config
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
    for overrides in ([], ["data.eval_path=data/eval.jsonl"]):
        config = load_config(mix, ["data.format=prompt_completion", *overrides])
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


def test_paths_and_texts_take_what_was_typed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`~` means the home directory in every path key, as the Trainer reads output_dir (a literal `./~`
    beside $HOME split one run in two); a number or a date typed for a path or a text is that text."""
    monkeypatch.setenv("HOME", str(tmp_path))
    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    config = load_config(demo, ["output_dir=~/runs/a", "data.path=~/train.jsonl", "data.split=2024"])
    assert (config.output_dir, config.data.path) == (tmp_path / "runs/a", tmp_path / "train.jsonl")
    assert config.data.split == "2024"
    assert load_config(demo, ["output_dir=2024-01-01"]).output_dir == Path("2024-01-01")
    with pytest.raises(UserError, match=r"`output_dir` must be a path, got true"):
        load_config(demo, ["output_dir=true"])


def test_a_list_entrys_setting_is_named_as_overrides_name_it() -> None:
    mix = next(path for path in CONFIGS if path.name == "mix-chat.yaml")
    with pytest.raises(UserError, match=r"unknown setting `data\.sources\.1\.pth`"):
        load_config(mix, ["data.sources.1.pth=x.jsonl"])


def test_step_settings_take_a_count_or_the_trainers_ratio_of_the_run(tmp_path: Path) -> None:
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    config = load_config(demo, ["save_steps=0.5", "logging_steps=0.25", "max_steps=8"])
    arguments = training_arguments(config, resolve_runtime(), tmp_path, show_progress=False)
    assert (arguments.save_steps, config.logging_steps) == (0.5, 0.25)
    assert load_config(demo, ["save_steps=50.0"]).save_steps == 50  # a count, as written in YAML
    with pytest.raises(UserError, match=r"`save_steps` must be a count of steps \(at least 1\) or a ratio"):
        load_config(demo, ["save_steps=1.5"])
    with pytest.raises(UserError, match=r"`logging_steps` must be a count .*, got 0"):
        load_config(demo, ["logging_steps=0"])


def test_a_trainer_option_of_text_takes_a_number_as_typed(tmp_path: Path) -> None:
    """`run_name: 2024` reads as a number in YAML; it was refused as `must be str`."""
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    config = load_config(demo, ["run_name=2024", "hub_model_id=2024-01-01"])
    arguments = training_arguments(config, resolve_runtime(), tmp_path, show_progress=False)
    assert (arguments.run_name, arguments.hub_model_id) == ("2024", "2024-01-01")


def test_a_minimal_recipe_gets_the_defaults_readme_lists(tmp_path: Path) -> None:
    """README's "Defaults that differ from the Trainer's" table, as the Trainer receives them on a CPU."""
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments

    recipe = tmp_path / "minimal.yaml"
    recipe.write_text("model: converted\noutput_dir: run\ndata:\n  path: train.jsonl\n")
    config = load_config(recipe, [])
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    arguments = training_arguments(config, runtime, tmp_path / "run", show_progress=False)
    assert arguments.learning_rate == 2e-5 and arguments.lr_scheduler_type.value == "cosine"
    assert arguments.get_warmup_steps(1000) == 30 and arguments.per_device_train_batch_size == 4
    assert arguments.gradient_checkpointing and not arguments.bf16 and arguments.optim.value == "adamw_torch"
    assert (config.logging_steps, arguments.save_steps, arguments.save_total_limit) == (10, 100, 2)
    assert arguments.report_to in ([], "none", ["none"])
    assert (arguments.seed, arguments.data_seed) == (42, 42)


def test_an_option_both_at_the_top_level_and_under_trainer_is_refused(tmp_path: Path) -> None:
    """The top level's value won, silently: `trainer: {adam_beta2: 0.5}` trained with the recipe's 0.9. An
    override of either spelling is the user's choice of the one value, as the README's overrides are."""
    demo = next(path for path in CONFIGS if path.name == "demo.yaml")
    twice = tmp_path / "twice.yaml"
    twice.write_text(demo.read_text() + "adam_beta2: 0.9\ntrainer:\n  adam_beta2: 0.5\n")
    with pytest.raises(
        UserError, match=r"twice.yaml sets `adam_beta2` \(0\.9\) and `trainer\.adam_beta2` \(0\.5\)"
    ):
        load_config(twice, [])
    nested = tmp_path / "nested.yaml"
    nested.write_text(demo.read_text() + "trainer:\n  report_to: none\n")
    for override in (
        ["report_to=tensorboard"],
        ["--report_to", "tensorboard"],
        ["trainer.report_to=tensorboard"],
    ):
        assert load_config(nested, override).trainer["report_to"] == "tensorboard", override
    top = tmp_path / "top.yaml"
    top.write_text(demo.read_text() + "report_to: none\n")
    for override in (["report_to=tensorboard"], ["trainer.report_to=tensorboard"]):
        assert load_config(top, override).trainer["report_to"] == "tensorboard", override
